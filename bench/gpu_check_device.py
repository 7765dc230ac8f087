"""The GPU check as the lent GPU machine can run it: no network, no `make install`, the packages its image has
plus the wheels of bench/device_wheels.txt (bench/gpu_check_device.sh installs them and runs this).

    bash bench/gpu_check_device.sh                      # CUDA, SD-2.1-base size, every figure to $OUT
    bash bench/gpu_check_device.sh --device cpu --quick # the same code on a CPU, small sizes (the dry run)

Needs no assembled bundle: random weights of the SD-2.1-base diffusion model (`bench/real_size.py`'s configs) are
built where it runs and written as a diffusion-only bundle; the steps that need CLIP, DINO or the ONNX export
(the localizer's round, the evaluator, a whole extraction) are `make gpu-check`'s. Figures, each timed on its own
and written to `<out>/gpu-check-device.json` as soon as it is measured:

1. `train`: the learner's own `Trainer` steps per second in the object-level phase and in full-UNet refinement
   (bf16 autocast on CUDA, prior preservation from one class image, the attention loss), peak memory against the
   learner's estimate;
2. `class_images`: seconds per class image, generated as a learning job does (batches of 4, the job's steps);
3. `generate`: seconds per image of a Generate call's images in the batches the memory estimate sizes, against
   one image at a time (same seeds), and the largest pixel difference between the two;
4. `sinkhorn`: the attention loss's Sinkhorn on the device, scaling domain against log domain (same 200 updates);
5. `kl`: DiffSeg's merge step, the Triton kernel against torch (on a CPU: compiled against eager torch).

Sized for about 7 minutes on one H100 (building the random weights included); `--quick` for a CPU dry run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GIB = 1 << 30


def diffusion_bundle(work: Path, quick: bool) -> Path:
    """A bundle holding only `diffusion/`: random SD-2.1-base weights (`--quick`: a small UNet of the same
    layout at 64 px), with the file table and digest every bundle has."""
    import real_size

    from services.common.bundle import compute_digest, file_table

    root = work / ("bundle-quick" if quick else "bundle-sd21")
    if (root / "bundle.json").is_file():
        return root
    if quick:  # the same classes, a few channels: what a CPU dry run can afford
        saved = dict(real_size.SD21_BASE_UNET), dict(real_size.SD21_TEXT_ENCODER), dict(real_size.SD_VAE)
        real_size.SD21_BASE_UNET.update(sample_size=16, block_out_channels=(32, 64, 64, 64),
                                        attention_head_dim=(2, 2, 2, 2), cross_attention_dim=64, norm_num_groups=16)
        real_size.SD21_TEXT_ENCODER.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, projection_dim=64)
        real_size.SD_VAE.update(block_out_channels=(16, 32, 32, 32), norm_num_groups=16, sample_size=128)
    try:
        real_size.write_sd21_base(root / "diffusion")
    finally:
        if quick:
            for table, old in zip((real_size.SD21_BASE_UNET, real_size.SD21_TEXT_ENCODER, real_size.SD_VAE), saved,
                                  strict=True):
                table.clear()
                table.update(old)
    files = file_table(root)
    size = 128 if quick else 512
    info = {"format_version": 1, "name": "device-check", "version": "1", "kind": "random",
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "image_size": size,
            "precision": "float16", "files": files, "digest": compute_digest(files)}
    (root / "bundle.json").write_text(json.dumps(info, indent=1))
    return root


def measure_class_images(bundle, device: str, count: int, steps: int, work: Path) -> dict:
    import torch

    from services.learner.trainer import components_pipeline, load_components

    tokenizer, text_encoder, unet, vae, _ = load_components(bundle, device)
    pipe = components_pipeline(bundle.root / "diffusion", tokenizer, text_encoder, unet, vae)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)
    batch = 4
    pipe(["warm-up"], num_inference_steps=1, output_type="latent")
    sync(device)
    t0 = time.perf_counter()
    for start in range(0, count, batch):
        seeds = range(start, min(start + batch, count))
        with autocast:
            pipe(["a photo at the beach"] * len(seeds), num_inference_steps=steps,
                 generator=[torch.Generator("cpu").manual_seed(s) for s in seeds])
    sync(device)
    seconds = time.perf_counter() - t0
    return {"images": count, "steps": steps, "batch": batch, "seconds": round(seconds, 2),
            "seconds_per_image": round(seconds / count, 3)}


def measure_generation(bundle, device: str, images: int, steps: int, work: Path) -> dict:
    import numpy as np
    import torch

    from services.learner import generate as G
    from services.learner.memory import generation_batch

    pipe = bundle.load_diffusion(device, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    prompts = [G.Prompt("a photo of a cup"), G.Prompt("a red ball")]
    per_prompt = max(images // len(prompts), 1)
    batch = generation_batch(pipe, per_prompt * len(prompts), device)
    list(G.generate(pipe, prompts[:1], 1, 0, steps=1))  # warm-up
    sync(device)
    t0 = time.perf_counter()
    batched = [np.asarray(img, dtype=np.int16) for *_, img in G.generate(pipe, prompts, per_prompt, 0, steps=steps,
                                                                          batch_size=batch)]
    sync(device)
    t_batched = (time.perf_counter() - t0) / len(batched)
    # one at a time, the images of the first prompt (same seeds)
    t0 = time.perf_counter()
    single = [np.asarray(img, dtype=np.int16) for *_, img in G.generate(pipe, prompts[:1], min(per_prompt, 2), 0,
                                                                         steps=steps, batch_size=1)]
    sync(device)
    t_single = (time.perf_counter() - t0) / len(single)
    diff = max(int(np.abs(a - b).max()) for a, b in zip(single, batched, strict=False))
    return {"images": len(batched), "steps": steps, "batch": batch, "seconds_per_image_batched": round(t_batched, 4),
            "seconds_per_image_one_at_a_time": round(t_single, 4), "ratio": round(t_single / t_batched, 2),
            "max_pixel_difference": diff}


def measure_sinkhorn(device: str, quick: bool) -> dict:
    import torch
    from bench_sinkhorn import cases
    from harness import timeit

    from services.learner import losses as L

    cost = L.grid_cost(16, device=device, dtype=torch.float64)
    mu, nu = (torch.cat(x).to(device) for x in zip(*cases("sd21", 4), strict=True))
    args = (mu[:1], nu[:1], cost, L.SINKHORN_EPSILON, L.SINKHORN_ITERATIONS)
    ours = timeit(lambda: L._absorbed_sinkhorn(*args), repeat=3 if quick else 10)
    ref = timeit(lambda: L._log_sinkhorn(*args), repeat=2 if quick else 5)
    a, b = L._absorbed_sinkhorn(*args), L._log_sinkhorn(*args)
    finite = torch.isfinite(b[0])
    diff = max(float((a[0] - b[0])[finite].abs().max()), float((a[1] - b[1]).abs().max())) * L.SINKHORN_EPSILON
    return {"absorbed_ms": round(1e3 * ours, 3), "log_domain_ms": round(1e3 * ref, 3), "ratio": round(ref / ours, 2),
            "max_abs_diff_potential_gradient": diff}


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "gpu-check-device")
    ap.add_argument("--work", type=Path, default=None, help="where the random weights go (default: a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="small models and few steps: the CPU dry run")
    ap.add_argument("--only", default="train,class_images,generate,sinkhorn,kl")
    args = ap.parse_args(argv)

    import torch
    from gpu_check import measure_kl, measure_training
    from harness import device_name

    from services.common.bundle import Bundle

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check_device: no CUDA device (use --device cpu for the dry run)", file=sys.stderr)
        return 2
    only = set(args.only.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    out_path = args.out / "gpu-check-device.json"
    report: dict = {"device": device_name() if args.device.startswith("cuda") else f"cpu ({device_name()})",
                    "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
                    "python": sys.version.split()[0], "quick": args.quick, "seconds": {}, "errors": {}}

    def figure(name: str, measure) -> None:
        t0 = time.perf_counter()
        try:
            report[name] = measure()
            print(f"{name}: {json.dumps(report[name])}", flush=True)
        except Exception as exc:  # noqa: BLE001 - one failing figure must not lose the others
            traceback.print_exc()
            report["errors"][name] = f"{type(exc).__name__}: {exc}"[:500]
        report["seconds"][name] = round(time.perf_counter() - t0, 1)
        out_path.write_text(json.dumps(report, indent=2) + "\n")  # every figure reaches $OUT as soon as it exists

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        t0 = time.perf_counter()
        bundle = Bundle.open(diffusion_bundle(work, args.quick))
        report["seconds"]["build_random_weights"] = round(time.perf_counter() - t0, 1)
        report["image_size"] = bundle.image_size
        steps = 2 if args.quick else 10
        if "train" in only:
            figure("train", lambda: measure_training(bundle, args.device, steps, False, work))
        if "class_images" in only:
            figure("class_images", lambda: measure_class_images(bundle, args.device, 4 if args.quick else 16,
                                                                2 if args.quick else 50, work))
        if "generate" in only:
            figure("generate", lambda: measure_generation(bundle, args.device, 4 if args.quick else 16,
                                                          2 if args.quick else 25, work))
        if "sinkhorn" in only:
            figure("sinkhorn", lambda: measure_sinkhorn(args.device, args.quick))
        if "kl" in only:
            figure("kl", lambda: measure_kl(args.device, args.quick, compile_torch=args.device.startswith("cuda")))
    print(f"wrote {out_path}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU figures, in one run on a CUDA machine: what a CPU cannot measure.

    python bench/gpu_check.py                        # CUDA, SD-2.1-base size (random weights, built once)
    python bench/gpu_check.py --device cpu --bundle build/tiny-bundle --quick    # the same code on a CPU

Measures, and writes to `bench/results/gpu-check-<device kind>.json`:

1. `train`: training steps per second of the learner's own `Trainer` (bf16 autocast on CUDA, fp32 master weights,
   prior preservation, the attention loss) in the object-level phase and in full-UNet refinement (gradient
   checkpointing as the learner's default; 8-bit AdamW too when bitsandbytes is installed), with the peak device
   memory of each against the learner's estimate for the same job;
2. `kl`: DiffSeg's merge step, the Triton kernel against the torch formulation compiled with `torch.compile`
   (parity and time; on a CPU the compiled torch formulation against the eager one, Triton being CUDA-only);
3. `localizer`: seconds per round of the localizer loop on a 512 px photo;
4. `extraction`: one whole extraction in-process (`LocalIce`) at the published schedule (400/400/300 steps,
   1,000 class images, 8 images per prompt at 50 steps), seconds per stage (`--quick`: the smoke schedule).

Without `--bundle`, random weights with the SD-2.1-base, ViT-B-32 and ViT-S/16 configurations are built and
assembled under `build/real-size/` (`bench/real_size.py`; about 6 GB, a few minutes) and reused afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GIB = 1 << 30


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def photo(size: int = 512) -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).convert("RGB").resize((size, size)).save(buf, format="PNG")
    return buf.getvalue()


def real_size_bundle(work: Path) -> Path:
    """SD-2.1-base / ViT-B-32 / ViT-S/16 random weights, assembled once under `work`."""
    from real_size import write_all

    from services.common.assemble import assemble_bundle
    from services.common.bundle_cli import DEFAULT_VOCAB

    bundle = work / "bundle"
    if (bundle / "bundle.json").is_file():
        return bundle
    paths = json.loads((work / "weights" / "done.json").read_text()) if (work / "weights" / "done.json").is_file() \
        else {k: str(v) for k, v in write_all(work / "weights").items()}
    assemble_bundle(bundle, paths["diffusion"], paths["open_clip_config"], paths["open_clip_weights"],
                    paths["dino"], DEFAULT_VOCAB, precision="float16", force=True)
    return bundle


# -- 1. training --------------------------------------------------------------------------------------------------


def measure_training(bundle, device: str, steps: int, adam_8bit: bool, work: Path) -> dict:
    import numpy as np
    from PIL import Image

    from services.learner.memory import MemoryEstimator
    from services.learner.trainer import Concept, LearningSpec, Schedule, Trainer

    size = bundle.image_size
    mask = np.zeros((size, size), bool)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = True
    image = Image.open(io.BytesIO(photo(size))).convert("RGB")
    schedule = Schedule(phase1_steps=steps + 1, phase2_steps=0, refinement_steps=steps + 1, num_class_images=1,
                        checkpoint_every=0)
    spec = LearningSpec(image, [Concept("c0", "person", mask)], schedule=schedule, refinement="full", seed=0)
    times: dict[str, list[float]] = {}
    peaks: dict[str, int] = {}

    def on_step(info) -> None:
        _sync(device)
        times.setdefault(info.phase, []).append(info.losses["step_seconds"])
        p = _peak(device)
        if p is not None:
            peaks[info.phase] = max(peaks.get(info.phase, 0), p)

    _reset_peak(device)
    trainer = Trainer(bundle, spec, work / f"train-{int(adam_8bit)}", device=device, class_images_dir=work / "cls",
                      class_image_steps=2, on_step=on_step, adam_8bit=adam_8bit)
    t0 = time.perf_counter()
    trainer.run(resume=False)
    total = time.perf_counter() - t0
    trainer.release()
    estimate = MemoryEstimator(bundle, device, adam_8bit=adam_8bit).estimate_spec(spec)
    out = {"adam_8bit": adam_8bit, "seconds": round(total, 2), "estimate_gib": round(estimate.total / GIB, 2),
           "estimate_parts_gib": {k: round(v / GIB, 3) for k, v in estimate.parts.items()}}
    for phase, values in times.items():
        steady = values[1:] or values  # the first step of a phase warms up (and allocates the optimizer state)
        out[phase] = {"steps_per_s": round(len(steady) / sum(steady), 4),
                      "seconds_per_step": round(sum(steady) / len(steady), 4)}
        if phase in peaks:
            out[phase]["peak_gib"] = round(peaks[phase] / GIB, 2)
    return out


# -- 2. the KL merge kernel ---------------------------------------------------------------------------------------


def measure_kl(device: str, quick: bool, compile_torch: bool = True) -> dict:
    import torch
    from harness import timeit

    from services.localizer.kl import merge_step, symmetric_kl

    side = 32 if quick else 64
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(side * side, side * side, generator=g) * 4, dim=-1)
    p = q[torch.linspace(0, side * side - 1, 64 if quick else 256).long()]
    # a threshold near the 5% quantile with no distance within 1e-3 of it, so that float round-off cannot flip a
    # pair between two formulations (as bench/bench_localizer.py picks it)
    values = symmetric_kl(p, q).flatten().sort().values
    i = int(0.05 * values.numel())
    while float(values[i] - values[i - 1]) <= 2e-3:
        i += 1
    threshold = float(values[i - 1] + values[i]) / 2
    p, q = p.to(device), q.to(device)
    eager = merge_step(p, q, threshold)
    out: dict = {"pixels": side * side, "anchors": int(p.shape[0])}
    try:
        if not compile_torch:
            raise RuntimeError("not asked for (--no-compile)")
        compiled = torch.compile(merge_step)
        same = torch.allclose(compiled(p, q, threshold), eager, atol=1e-5, rtol=1e-4)
        out["torch_compiled_ms"] = round(1e3 * timeit(lambda: compiled(p, q, threshold), repeat=10), 3)
        out["torch_compiled_matches_eager"] = bool(same)
    except Exception as exc:  # noqa: BLE001 - no compiler toolchain: say so and go on
        out["torch_compiled_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    out["torch_eager_ms"] = round(1e3 * timeit(lambda: merge_step(p, q, threshold), repeat=5), 3)
    if device.startswith("cuda"):
        from services.localizer.kl_triton import merge_step_triton

        tri = merge_step_triton(p, q, threshold)
        out["triton_matches_torch"] = bool(torch.allclose(tri, eager, atol=1e-5, rtol=1e-4))
        out["triton_ms"] = round(1e3 * timeit(lambda: merge_step_triton(p, q, threshold), repeat=20), 3)
    else:
        out["triton"] = "skipped: Triton kernels run on CUDA only"
    return out


# -- 3. the localizer ---------------------------------------------------------------------------------------------


def measure_localizer(bundle, device: str, rounds: int) -> dict:
    from PIL import Image

    from services.common.service import compute_dtype
    from services.localizer.pipeline import Localizer

    t0 = time.perf_counter()
    localizer = Localizer(bundle, device, compute_dtype(device))
    load = time.perf_counter() - t0
    options = dataclasses.replace(localizer.defaults, max_rounds=rounds)
    image = Image.open(io.BytesIO(photo())).convert("RGB")
    localizer.localize(image, options)  # warm-up (kernels, caches)
    _sync(device)
    t0 = time.perf_counter()
    result = localizer.localize(image, options)
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"load_seconds": round(load, 2), "rounds": result.rounds,
            "seconds_per_round": round(seconds / max(result.rounds, 1), 3), "stop_reason": result.stop_reason}


# -- 4. one whole extraction --------------------------------------------------------------------------------------


def measure_extraction(bundle_dir: Path, device: str, quick: bool, work: Path) -> dict:
    from client.local import LocalIce
    from client.options import ExtractOptions, Schedule
    from client.pipeline import run_extraction

    options = ExtractOptions(schedule=Schedule.quick()) if quick else ExtractOptions()
    ice = LocalIce(bundle_dir, device=device, work_dir=work / "extraction", class_images_dir=work / "class-images")
    stages: dict[str, float] = {}
    marks: list[tuple[str, float]] = []
    t0 = time.perf_counter()
    run_extraction(ice, photo(), options, out_dir=work / "extraction" / "report", progress=False,
                   on_stage=lambda name: marks.append((name, time.perf_counter())))
    total = time.perf_counter() - t0
    for (name, at), nxt in zip(marks, [*[t for _, t in marks[1:]], t0 + total], strict=True):
        stages[name] = round(stages.get(name, 0) + nxt - at, 2)
    return {"schedule": "quick" if quick else "published", "seconds": round(total, 1), "stages": stages}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--bundle", type=Path, default=None, help="default: SD-2.1-size random weights")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "real-size")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 steps, the smoke extraction schedule")
    ap.add_argument("--only", default="train,kl,localizer,extraction")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the KL merge step")
    args = ap.parse_args(argv)

    import torch
    from harness import device_name

    from services.common.bundle import Bundle

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --device cpu for the CPU path)", file=sys.stderr)
        return 2
    only = set(args.only.split(","))
    bundle_dir = args.bundle or real_size_bundle(args.work)
    bundle = Bundle.open(bundle_dir)
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    out_path = args.out or ROOT / "bench" / "results" / f"gpu-check-{kind}.json"
    report: dict = {"device": device_name() if kind == "cuda" else f"cpu ({device_name()})",
                    "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "bundle": bundle.name,
                    "image_size": bundle.image_size, "torch": torch.__version__}
    steps = 2 if args.quick else 10
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "train" in only:
            report["train"] = [measure_training(bundle, args.device, steps, False, work)]
            try:
                import bitsandbytes  # noqa: F401

                if kind == "cuda":
                    report["train"].append(measure_training(bundle, args.device, steps, True, work))
            except ImportError:
                report["train_8bit"] = "skipped: bitsandbytes is not installed"
            print("train:", json.dumps(report["train"]), flush=True)
        if "kl" in only:
            report["kl"] = measure_kl(args.device, args.quick, not args.no_compile)
            print("kl:", json.dumps(report["kl"]), flush=True)
        if "localizer" in only:
            report["localizer"] = measure_localizer(bundle, args.device, 2 if args.quick else 3)
            print("localizer:", json.dumps(report["localizer"]), flush=True)
        if "extraction" in only:
            report["extraction"] = measure_extraction(bundle_dir, args.device, args.quick, work)
            print("extraction:", json.dumps(report["extraction"]), flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

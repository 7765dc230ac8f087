"""Localizer hot paths, each against a reference formulation on the same inputs in the same run:

- the first DiffSeg merge (KL of every anchor to every pixel, threshold, average) as entropies + GEMM against the
  direct [anchors, pixels, pixels] broadcast (and, on CUDA, the Triton kernel against the torch GEMM);
- our non-negative lasso against sklearn's Lasso (one image, and a batch of images);
- the CLIP image encoder in onnxruntime against torch (open_clip), on the tiny bundle;
- one Localize through gRPC on loopback against the same loop in-process, on the tiny bundle (seconds/photo).
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from harness import BenchResult, timeit


def _attention(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3.0 * torch.randn(n, n, generator=g), dim=-1)


def bench_kl(quick: bool) -> list[BenchResult]:
    from services.localizer.kl import merge_step, merge_step_direct, symmetric_kl, symmetric_kl_direct
    from services.localizer.segmentor import anchor_indices

    side = 32 if quick else 64
    q = _attention(side * side)
    p = q[anchor_indices(side, 16)]
    d = symmetric_kl(p, q)
    # A threshold near the 5% quantile with no distance within 1e-3 of it: float32 round-off (~1e-5 here) then
    # cannot flip a pair, so both formulations must select exactly the same maps.
    values = d.flatten().sort().values
    i = int(0.05 * values.numel())
    while float(values[i] - values[i - 1]) <= 2e-3:
        i += 1
    threshold = float(values[i - 1] + values[i]) / 2
    ours_out = merge_step(p, q, threshold)
    ref_out = merge_step_direct(p, q, threshold)  # 16 anchors per chunk: [16, N, N] intermediates
    same = torch.allclose(ours_out, ref_out, atol=1e-6, rtol=1e-4)
    same = same and torch.equal(d < threshold, symmetric_kl_direct(p, q) < threshold)
    ours = timeit(lambda: merge_step(p, q, threshold), repeat=3 if quick else 5)
    ref = timeit(lambda: merge_step_direct(p, q, threshold), repeat=1, warmup=0)
    results = [
        BenchResult(
            f"kl_merge_{side * side}px_x{p.shape[0]}anchors", ours, ref,
            "direct broadcast ½Σ(p−q)(log p−log q), 16 anchors per chunk", unit="merge step",
            notes=f"same output: {same}", extra={"same_output": bool(same), "threshold": threshold},
        )  # fmt: skip
    ]
    if torch.cuda.is_available():
        from services.localizer.kl_triton import merge_step_triton

        qc, pc = q.cuda(), p.cuda()
        same_gpu = torch.allclose(merge_step_triton(pc, qc, threshold).cpu(), ours_out, atol=1e-5, rtol=1e-4)
        tri = timeit(lambda: merge_step_triton(pc, qc, threshold), repeat=20)
        gemm = timeit(lambda: merge_step(pc, qc, threshold), repeat=20)
        results.append(BenchResult(
            f"kl_merge_{side * side}px_x{p.shape[0]}anchors_triton_cuda", tri, gemm, "torch GEMM formulation on CUDA",
            unit="merge step", notes=f"same output: {same_gpu}", extra={"same_output": bool(same_gpu)},
        ))  # fmt: skip
    return results


def _dictionary(v: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    c = torch.nn.functional.normalize(torch.randn(v, d, generator=g), dim=-1)
    return torch.nn.functional.normalize(c - c.mean(0), dim=-1)


def _images(c: torch.Tensor, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, c.shape[0], (n, 6), generator=g)
    z = (torch.rand(n, 6, 1, generator=g) * c[idx]).sum(1) + 0.05 * torch.randn(n, c.shape[1], generator=g)
    return torch.nn.functional.normalize(z, dim=-1)


def bench_lasso(quick: bool) -> list[BenchResult]:
    # sklearn's coordinate descent runs on one thread; so does torch here, for a like-for-like ratio (and because
    # a second intra-op thread only thrashes on a shared 2-core box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _bench_lasso(quick)
    finally:
        torch.set_num_threads(threads)


def _bench_lasso(quick: bool) -> list[BenchResult]:
    from sklearn.linear_model import Lasso

    from services.localizer.lasso import NonNegLasso, lasso_objective

    v, d, lam = (5000 if quick else 15000), 512, 0.2
    c = _dictionary(v, d)
    batch = 8 if quick else 32
    z = _images(c, batch)
    solver = NonNegLasso(c)
    x = c.T.double().numpy()

    def sklearn_one(i: int) -> np.ndarray:
        return Lasso(alpha=lam / (2 * d), fit_intercept=False, positive=True, max_iter=10000, tol=1e-6).fit(
            x, z[i].double().numpy()
        ).coef_

    ref_obj = torch.stack([lasso_objective(c, z[i], torch.from_numpy(sklearn_one(i)), lam) for i in range(batch)])
    ours_obj = solver.solve(z, lam).objective
    rel = float(((ours_obj - ref_obj) / ref_obj).abs().max())
    one_ours = timeit(lambda: solver.solve(z[0], lam), repeat=5)
    one_ref = timeit(lambda: sklearn_one(0), repeat=3)
    batch_ours = timeit(lambda: solver.solve(z, lam), repeat=3)
    batch_ref = timeit(lambda: [sklearn_one(i) for i in range(batch)], repeat=1, warmup=0)
    extra = {"max_rel_objective_diff": rel, "mean_support": float((solver.solve(z, lam).weights > 0).sum(1).float().mean())}
    return [
        BenchResult(f"lasso_{v}x{d}_one_image", one_ours, one_ref, "sklearn Lasso(positive) per image",
                    unit="image", notes=f"max rel. objective diff {rel:.1e}; 1 thread", extra=extra),
        BenchResult(f"lasso_{v}x{d}_batch{batch}", batch_ours, batch_ref, "sklearn Lasso(positive), a loop",
                    unit=f"{batch} images", notes=f"max rel. objective diff {rel:.1e}; 1 thread", extra=extra),
    ]  # fmt: skip


def _tiny_bundle_dir() -> Path:
    prebuilt = os.environ.get("ICE_TEST_BUNDLE")
    if prebuilt:
        return Path(prebuilt)
    from services.common.tiny_bundle import build_tiny_bundle

    return build_tiny_bundle(Path(tempfile.mkdtemp(prefix="ice-bench-")) / "tiny", seed=0)


def bench_clip_and_e2e(quick: bool) -> list[BenchResult]:
    import grpc
    from PIL import Image
    from skimage import data

    from ice.localizer.v1 import localizer_pb2, localizer_pb2_grpc
    from services.common.bundle import Bundle
    from services.common.server import start_server
    from services.common.settings import LocalizerSettings, from_sources
    from services.localizer.pipeline import Localizer
    from services.localizer.server import build_spec

    root = _tiny_bundle_dir()
    bundle = Bundle.open(root)
    model, preprocess, _ = bundle.load_clip()
    photo = Image.fromarray(data.coffee())
    x = torch.stack([preprocess(photo)] * 8)
    session = bundle.onnx_session(["CPUExecutionProvider"])
    xn = x.numpy()

    def run_torch():
        with torch.no_grad():
            return model.encode_image(x)

    ort_s = timeit(lambda: session.run(["image_embeds"], {"pixel_values": xn}), repeat=20)
    torch_s = timeit(run_torch, repeat=20)
    results = [BenchResult("clip_image_encoder_tiny_onnxruntime_vs_torch", ort_s, torch_s,
                           "open_clip torch forward (same weights)", unit="batch of 8 images",
                           notes=f"onnxruntime {ort_s * 1e3:.2f} ms, torch {torch_s * 1e3:.2f} ms")]  # fmt: skip

    localizer = Localizer(bundle)
    in_process = timeit(lambda: localizer.localize(photo), repeat=3)
    settings = from_sources(env={}, cls=LocalizerSettings, bundle=root, host="127.0.0.1", port=0, metrics_port=0)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        settings = from_sources(env={}, cls=LocalizerSettings, bundle=root, host="127.0.0.1",
                                port=s.getsockname()[1], metrics_port=0)  # fmt: skip
    running = start_server(build_spec(settings), settings)
    try:
        running.wait_ready(120)
        buf = io.BytesIO()
        photo.save(buf, format="PNG")
        request = localizer_pb2.LocalizeRequest(image=buf.getvalue())
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = localizer_pb2_grpc.LocalizerServiceStub(channel)
            over_grpc = timeit(lambda: stub.Localize(request, timeout=120), repeat=3)
    finally:
        running.stop(grace=0)
    results.append(BenchResult("localize_tiny_bundle_600x400_photo", over_grpc, in_process,
                               "the same loop in-process (no PNG transfer/decode/encode)", unit="photo",
                               notes=f"gRPC {over_grpc:.3f} s/photo, in-process {in_process:.3f} s/photo "
                                     "(default options; the random tiny UNet stops after 1 round)"))  # fmt: skip
    return results


def run(quick: bool) -> list[BenchResult]:
    return bench_kl(quick) + bench_lasso(quick) + bench_clip_and_e2e(quick)

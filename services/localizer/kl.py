"""Symmetric KL between attention distributions, as entropy terms plus one matrix product (torch).

DiffSeg (docs/method.md#segmentor) compares distributions over the N pixels of the attention map with

    D(p, q) = ½ Σ (p − q)(log p − log q) = ½ (Σ p log p + Σ q log q − Σ p log q − Σ q log p).

For K proposals P [K, N] against M maps Q [M, N] the two cross terms are one GEMM,
[P | log P] · [log Q | Q]ᵀ, and the entropies are row sums: O(K·M·N) flops in matrix units instead of a
[K, M, N] broadcast. `merge_step` then thresholds the distances and averages, for each proposal, the maps closer
than the threshold (itself a GEMM). The Triton kernel in `kl_triton` fuses the same steps; this torch version is
the CPU path and the reference in tests.
"""

from __future__ import annotations

import os

import torch

EPS = 1e-12  # log is taken of max(x, EPS): attention probabilities can underflow to 0 in low precision
BACKENDS = ("auto", "triton", "torch")


def _log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x.clamp_min(EPS))


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[K, N] × [M, N] -> [K, M] symmetric KL, via entropies and one GEMM (float32)."""
    p, q = p.float(), q.float()
    lp, lq = _log(p), _log(q)
    hp = (p * lp).sum(-1)
    hq = (q * lq).sum(-1)
    cross = torch.cat([p, lp], dim=1) @ torch.cat([lq, q], dim=1).T
    return 0.5 * (hp[:, None] + hq[None, :] - cross)


def symmetric_kl_direct(p: torch.Tensor, q: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """The per-pair formula ½ Σ (p − q)(log p − log q), broadcast over [chunk, M, N]: the reference."""
    p, q = p.float(), q.float()
    lq = _log(q)
    out = []
    for start in range(0, p.shape[0], chunk):
        pc = p[start : start + chunk]
        diff = (pc[:, None, :] - q[None]) * (_log(pc)[:, None, :] - lq[None])
        out.append(0.5 * diff.sum(-1))
    return torch.cat(out)


def masked_mean(close: torch.Tensor, q: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Row k: mean of the rows of q where close[k]; `fallback[k]` when there are none."""
    w = close.float()
    count = w.sum(1, keepdim=True)
    mean = (w @ q.float()) / count.clamp_min(1.0)
    return torch.where(count > 0, mean, fallback.float())


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """auto -> triton on CUDA (torch elsewhere); triton off CUDA only under TRITON_INTERPRET=1."""
    if backend not in BACKENDS:
        raise ValueError(f"kl backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        if not on_cuda:
            return "torch"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    if backend == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the triton KL backend needs a CUDA device (or TRITON_INTERPRET=1)")
    return backend


def kl_below(p: torch.Tensor, q: torch.Tensor, threshold: float, backend: str = "torch") -> torch.Tensor:
    """Bool [K, M]: symmetric KL(p_k, q_m) < threshold."""
    if backend == "triton":
        from services.localizer.kl_triton import kl_below_triton

        return kl_below_triton(p, q, threshold)
    return symmetric_kl(p, q) < threshold


def merge_step(p: torch.Tensor, q: torch.Tensor, threshold: float, backend: str = "torch") -> torch.Tensor:
    """DiffSeg's first merge: each proposal becomes the mean of the maps of q within `threshold` of it."""
    if backend == "triton":
        from services.localizer.kl_triton import merge_step_triton

        return merge_step_triton(p, q, threshold)
    return masked_mean(symmetric_kl(p, q) < threshold, q, p)


def merge_step_direct(p: torch.Tensor, q: torch.Tensor, threshold: float) -> torch.Tensor:
    """The same merge with the broadcast distance: the reference formulation of the benchmark."""
    return masked_mean(symmetric_kl_direct(p, q) < threshold, q, p)

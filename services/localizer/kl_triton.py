"""The attention-clustering kernels in Triton: symmetric KL as entropies + GEMM, fused with threshold and mean.

`_kl_below_kernel`, one program per [BLOCK_K × BLOCK_M] tile of the distance matrix, loops over the pixels once:
it loads a tile of P and of Q, takes their logs (fp32), accumulates Σ p log q and Σ log p · q with two `tl.dot`s
and the entropies Σ p log p, Σ q log q as row sums, and writes only `½(H_p + H_q − cross) < threshold` (or the
distance itself, for tests). `_masked_mean_kernel` then averages, for each proposal, the maps within the
threshold (a GEMM of that mask with Q) and divides by the count in its epilogue. The [K, M] distances never reach
global memory in float; the [K, M, N] broadcast of the direct formula never exists.

Used on CUDA (`kl_backend` auto/triton); tested against `services.localizer.kl` under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.localizer.kl import EPS


@triton.jit
def _kl_below_kernel(
    p_ptr, q_ptr, out_ptr, K, M, N, threshold, eps,
    stride_p, stride_q, stride_out,
    STORE_KL: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cross = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    hp = tl.zeros((BLOCK_K,), dtype=tl.float32)
    hq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        p = tl.load(p_ptr + rk[:, None] * stride_p + rn[None, :], mask=(rk[:, None] < K) & (rn[None, :] < N),
                    other=0.0).to(tl.float32)  # fmt: skip
        q = tl.load(q_ptr + rm[:, None] * stride_q + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N),
                    other=0.0).to(tl.float32)  # fmt: skip
        lp = tl.log(tl.maximum(p, eps))
        lq = tl.log(tl.maximum(q, eps))
        hp += tl.sum(p * lp, axis=1)
        hq += tl.sum(q * lq, axis=1)
        cross += tl.dot(p, tl.trans(lq), input_precision="ieee")
        cross += tl.dot(lp, tl.trans(q), input_precision="ieee")
    kl = 0.5 * (hp[:, None] + hq[None, :] - cross)
    out = out_ptr + rk[:, None] * stride_out + rm[None, :]
    inside = (rk[:, None] < K) & (rm[None, :] < M)
    if STORE_KL:
        tl.store(out, kl, mask=inside)
    else:
        tl.store(out, (kl < threshold).to(tl.float32), mask=inside)


@triton.jit
def _masked_mean_kernel(
    w_ptr, q_ptr, fallback_ptr, out_ptr, K, M, N,
    stride_w, stride_q, stride_fallback, stride_out,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    count = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for start in range(0, M, BLOCK_M):
        rm = start + tl.arange(0, BLOCK_M)
        w = tl.load(w_ptr + rk[:, None] * stride_w + rm[None, :], mask=(rk[:, None] < K) & (rm[None, :] < M),
                    other=0.0)  # fmt: skip
        q = tl.load(q_ptr + rm[:, None] * stride_q + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N),
                    other=0.0).to(tl.float32)  # fmt: skip
        acc += tl.dot(w, q, input_precision="ieee")
        count += tl.sum(w, axis=1)
    inside = (rk[:, None] < K) & (rn[None, :] < N)
    fallback = tl.load(fallback_ptr + rk[:, None] * stride_fallback + rn[None, :], mask=inside, other=0.0)
    mean = tl.where(count[:, None] > 0, acc / tl.maximum(count[:, None], 1.0), fallback.to(tl.float32))
    tl.store(out_ptr + rk[:, None] * stride_out + rn[None, :], mean, mask=inside)


def _launch_kl(p: torch.Tensor, q: torch.Tensor, threshold: float, store_kl: bool) -> torch.Tensor:
    p = p.float().contiguous()
    q = q.float().contiguous()
    (k, n), m = p.shape, q.shape[0]
    out = torch.empty(k, m, device=p.device, dtype=torch.float32)
    block_k, block_m, block_n = 32, 32, 32
    grid = (triton.cdiv(k, block_k), triton.cdiv(m, block_m))
    _kl_below_kernel[grid](
        p, q, out, k, m, n, float(threshold), EPS, p.stride(0), q.stride(0), out.stride(0),
        STORE_KL=store_kl, BLOCK_K=block_k, BLOCK_M=block_m, BLOCK_N=block_n,
    )  # fmt: skip
    return out


def symmetric_kl_triton(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[K, N] × [M, N] -> [K, M] symmetric KL (float32)."""
    return _launch_kl(p, q, 0.0, store_kl=True)


def kl_below_triton(p: torch.Tensor, q: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool [K, M]: symmetric KL < threshold."""
    return _launch_kl(p, q, threshold, store_kl=False) > 0.5


def merge_step_triton(p: torch.Tensor, q: torch.Tensor, threshold: float) -> torch.Tensor:
    """Each row of p becomes the mean of the rows of q within `threshold` (itself when there are none)."""
    close = _launch_kl(p, q, threshold, store_kl=False)
    q = q.float().contiguous()
    fallback = p.float().contiguous()
    (k, m), n = close.shape, q.shape[1]
    out = torch.empty(k, n, device=q.device, dtype=torch.float32)
    block_k, block_m, block_n = 32, 32, 64
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    _masked_mean_kernel[grid](
        close, q, fallback, out, k, m, n, close.stride(0), q.stride(0), fallback.stride(0), out.stride(0),
        BLOCK_K=block_k, BLOCK_M=block_m, BLOCK_N=block_n,
    )  # fmt: skip
    return out

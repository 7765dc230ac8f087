"""The attention loss's Sinkhorn (ε = 1e-3, 200 iterations from u = v = 1, float64, one concept per learner step):
the scaling-domain iterations on an absorbed kernel (`losses._absorbed_sinkhorn`, what the loss runs) against
the same 200 updates in the log domain (`losses._log_sinkhorn`, the published formulation), on the same inputs.

Both model sizes put the loss layers at 16×16, so the cost is 256×256 in both: ToyWorld (64 px images, latent 16,
the loss layers in the first down and last up block) and SD-2.1-base (512 px, latent 64, the loss layers in
`down_blocks.2` and `up_blocks.1`). What differs is what the loss sees: ToyWorld's objects cover a few cells of
the grid, a photo's object a large part of it, and the attention maps range from nearly flat to peaked. Each
size runs a set of such (mask, attention) pairs and reports the median time per call. Times are CPU seconds of
this process (`harness.cpu_clock`): on a busy shared machine they stay comparable where wall time does not.
"""

from __future__ import annotations

import numpy as np
import torch
from harness import BenchResult, cpu_clock, load_average, timeit

from services.learner import losses as L

SIDE = 16  # the loss grid of both sizes


def cases(kind: str, count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(μ, ν) pairs [1, 256]: a box mask of an object of that size's typical extent, and a softmax attention map
    with a bump near the object (offset, of random width and sharpness) over noise."""
    rng = np.random.default_rng(seed)
    lo, hi = (2, 7) if kind == "toyworld" else (5, 14)  # object side in grid cells
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    out = []
    for _ in range(count):
        h, w = rng.integers(lo, hi + 1, size=2)
        y, x = rng.integers(0, SIDE - h + 1), rng.integers(0, SIDE - w + 1)
        mask = np.zeros((SIDE, SIDE))
        mask[y : y + h, x : x + w] = 1
        cy, cx = y + h / 2 + rng.normal(0, 2), x + w / 2 + rng.normal(0, 2)
        width = rng.uniform(1.5, 6.0)
        logits = -((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2) * rng.uniform(1, 8) + rng.normal(0, 0.5, mask.shape)
        attention = np.exp(logits - logits.max())
        out.append((torch.tensor(mask.reshape(1, -1) / mask.sum()), torch.tensor(attention.reshape(1, -1) / attention.sum())))
    return out


def _agreement(mu, nu, cost) -> dict:
    ours = L._absorbed_sinkhorn(mu, nu, cost, L.SINKHORN_EPSILON, L.SINKHORN_ITERATIONS)
    ref = L._log_sinkhorn(mu, nu, cost, L.SINKHORN_EPSILON, L.SINKHORN_ITERATIONS)
    finite = torch.isfinite(ref[0])
    potential = max(float((ours[0] - ref[0])[finite].abs().max()), float((ours[1] - ref[1]).abs().max()))

    def value(lu, lv, lk):
        return float((torch.exp(lu.unsqueeze(2) + lk.unsqueeze(0) + lv.unsqueeze(1)) * cost).sum())

    v, r = value(*ours), value(*ref)
    return {"potential_gradient_abs": potential * L.SINKHORN_EPSILON, "value_rel": abs(v - r) / abs(r)}


def measure(kind: str, quick: bool) -> BenchResult:
    cost = L.grid_cost(SIDE, dtype=torch.float64)
    pairs = cases(kind, 3 if quick else 8, seed=0 if kind == "toyworld" else 1)
    ours_t, ref_t, worst = [], [], {"potential_gradient_abs": 0.0, "value_rel": 0.0}
    for mu, nu in pairs:
        ours_t.append(timeit(lambda mu=mu, nu=nu: L._absorbed_sinkhorn(mu, nu, cost, L.SINKHORN_EPSILON,
                                                                        L.SINKHORN_ITERATIONS),
                             repeat=3 if quick else 5, clock=cpu_clock))
        ref_t.append(timeit(lambda mu=mu, nu=nu: L._log_sinkhorn(mu, nu, cost, L.SINKHORN_EPSILON,
                                                                 L.SINKHORN_ITERATIONS),
                            repeat=1 if quick else 3, warmup=0, clock=cpu_clock))
        for k, v in _agreement(mu, nu, cost).items():
            worst[k] = max(worst[k], v)
    size = ("ToyWorld (64 px, latent 16)" if kind == "toyworld" else "SD-2.1-base (512 px, latent 64)")
    return BenchResult(
        f"sinkhorn_attention_loss_{kind}", float(np.median(ours_t)), float(np.median(ref_t)),
        "the same 200 updates in the log domain (the published formulation)", unit="call (CPU s)",
        notes=f"{size}: 16x16 loss grid, 256x256 cost, eps 1e-3, 200 iterations, float64, batch 1; "
              f"median over {len(pairs)} (mask, attention) pairs; CPU seconds",
        extra={"max_abs_diff_potential_gradient": worst["potential_gradient_abs"],
               "max_rel_diff_value": worst["value_rel"], "pairs": len(pairs), "load_average": load_average()})


def run(quick: bool = False) -> list[BenchResult]:
    return [measure("toyworld", quick), measure("sd21", quick)]

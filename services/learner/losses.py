"""The losses of ICE stage 2 (docs/method.md#losses), written from their formulas.

- `masked_reconstruction`: the diffusion loss on the concept's mask only; the mean runs over every element,
  background included.
- `sinkhorn_cost` / `attention_loss`: entropic optimal transport between a concept's mask and its tokens'
  cross-attention, log-domain Sinkhorn, batched, with the gradient the published code uses (scaled dual
  potentials, not autograd through the iterations).
- `phase1_triplet`, `intrinsic_margins`, `phase2_triplets`: the triplet losses over E(·), including
  the quirks documented there: with the default margin the phase-1 hinge is always active, and the phase-2
  loss is the plain sum of its terms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

SINKHORN_EPSILON = 1e-3
SINKHORN_ITERATIONS = 200
MARGIN_SCALE = 0.7  # m[x][c] = 0.7 (E(x) - E(c))^2, element-wise (docs/method.md#losses)
_POSITIVE = 1e-10  # a hinge value above this counts as an active triplet


def masked_reconstruction(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean((M ⊙ ε̂ − M ⊙ ε)²) over all elements, M = `mask` nearest-resized to the latent size.

    pred, target: [B, C, h, w]; mask: [B, 1, H, W] in {0, 1} at any resolution.
    """
    m = F.interpolate(mask.to(pred.dtype), size=pred.shape[-2:], mode="nearest")
    return F.mse_loss((pred * m).float(), (target * m).float(), reduction="mean")


def grid_cost(side: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[side², side²] Euclidean (not squared) distances between the cells of a side×side grid, in cell units."""
    ys, xs = torch.meshgrid(torch.arange(side, dtype=dtype), torch.arange(side, dtype=dtype), indexing="ij")
    points = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1)
    return torch.cdist(points, points).to(device)


# exp() of anything below this is under 1e-304 of the largest term of its sum: it cannot change a float64 sum,
# but left alone it lands among the subnormal numbers, whose arithmetic is 10-100x slower on x86 CPUs. With
# ε = 1e-3 the kernel -C/ε spans 0 to -21,000, so without the floor most of Sinkhorn's time went there.
_EXP_FLOOR = -700.0


def _logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """log Σ exp(x) along `dim`, as torch.logsumexp (−inf where every term is −inf), with negligible terms
    floored so that no subnormal number is ever formed."""
    top = x.amax(dim=dim, keepdim=True)
    finite = torch.isfinite(top)
    top = torch.where(finite, top, torch.zeros_like(top))
    total = torch.exp((x - top).clamp_min_(_EXP_FLOOR)).sum(dim)
    top, finite = top.squeeze(dim), finite.squeeze(dim)
    return torch.where(finite, torch.log(total) + top, torch.full_like(top, -math.inf))


def _log_sinkhorn(mu: torch.Tensor, nu: torch.Tensor, cost: torch.Tensor, epsilon: float, iterations: int,
                  logsumexp=_logsumexp):
    """Scaled potentials (log u, log v) after `iterations` updates (v first, then u), from u = v = 1."""
    log_k = -cost / epsilon  # [n, m]
    log_mu, log_nu = torch.log(mu), torch.log(nu)  # log 0 = -inf: those rows/columns carry no mass
    log_u = torch.zeros_like(mu)
    log_v = torch.zeros_like(nu)
    for _ in range(iterations):
        log_v = log_nu - logsumexp(log_k.unsqueeze(0) + log_u.unsqueeze(2), dim=1)
        log_u = log_mu - logsumexp(log_k.unsqueeze(0) + log_v.unsqueeze(1), dim=2)
    return log_u, log_v, log_k


# The published 200 iterations at ε = 1e-3 are far from convergence (after 200 the plan's ν-marginal is still
# ~0.8 off in L1, and every further iteration changes the value): stopping early or warm-starting would change
# the published quantity. What can go is the cost of each iteration. After the first updates, which move the
# potentials by up to C_max/ε (~21,000), they move by at most tens of units per iteration, so the same updates run
# in the scaling domain on a kernel that absorbs the potentials (K̃ = exp(log u + log K + log v), the current
# plan): two matrix-vector products per iteration instead of two 256×256 log-sum-exps, re-absorbed whenever a
# scaling factor would leave [e^-τ, e^τ].
_LOG_DOMAIN_HEAD = 3  # updates done in the log domain first: their moves are far beyond any useful τ
_FACTOR_BOUND = 150.0  # τ: at most e^±150 between absorptions ...
_KERNEL_FLOOR = 550.0  # ... on a kernel whose entries below e^-550 of the plan are dropped. A dropped entry can
# grow by at most e^(2τ) relative to the others of its column (whose sum is above e^-100 for any attention map),
# so it stays below e^-100 of that sum, and no product of an entry and a factor is subnormal (550 + 150 < 708).


def _absorbed_sinkhorn(mu: torch.Tensor, nu: torch.Tensor, cost: torch.Tensor, epsilon: float, iterations: int,
                       head: int = _LOG_DOMAIN_HEAD, bound: float = _FACTOR_BOUND):
    """The updates of `_log_sinkhorn`, the same ones in the same order from the same start, computed in the
    scaling domain: the same (log u, log v, log K) to rounding (tests/test_learner_losses.py states how close).

    An update that would move a factor beyond e^±`bound` (or lose a row's or column's mass) is not taken: the
    kernel absorbs the potentials first, and an update that is still out of bounds on a fresh kernel is done in
    the log domain."""
    done = min(head, iterations)
    log_u, log_v, log_k = _log_sinkhorn(mu, nu, cost, epsilon, done)
    log_mu, log_nu = torch.log(mu), torch.log(nu)
    empty_mu = (mu == 0).to(mu.dtype)  # a cell with no mass keeps u = 0 (log u = -inf), as in the log domain
    empty_nu = (nu == 0).to(nu.dtype)
    empty = torch.cat([empty_mu, empty_nu], dim=1)  # in the bounds check an empty cell's factor 0 counts as 1
    low, high = math.exp(-bound), math.exp(bound)
    while done < iterations:
        x = log_u.unsqueeze(2) + log_k.unsqueeze(0) + log_v.unsqueeze(1)
        kernel = torch.exp(x.masked_fill_(x < -_KERNEL_FLOOR, -math.inf))  # [B, n, m]
        kernel_t = kernel.transpose(1, 2).contiguous()
        a, b, taken = torch.ones_like(mu), torch.ones_like(nu), 0
        while done < iterations:
            b_next = nu / (torch.bmm(kernel_t, a.unsqueeze(2)).squeeze(2) + empty_nu)
            a_next = mu / (torch.bmm(kernel, b_next.unsqueeze(2)).squeeze(2) + empty_mu)
            bottom, top = torch.aminmax(torch.cat([a_next, b_next], dim=1) + empty)
            if not low < float(bottom) <= float(top) < high:  # NaN and inf fail too
                break
            a, b, taken, done = a_next, b_next, taken + 1, done + 1
        if taken:
            log_u, log_v = log_u + torch.log(a), log_v + torch.log(b)
        else:  # out of bounds on a fresh kernel: this one update in the log domain
            log_v = log_nu - _logsumexp(log_k.unsqueeze(0) + log_u.unsqueeze(2), dim=1)
            log_u = log_mu - _logsumexp(log_k.unsqueeze(0) + log_v.unsqueeze(1), dim=2)
            done += 1
    return log_u, log_v, log_k


class _SinkhornCost(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, nu, cost, epsilon, iterations):
        with torch.no_grad():
            log_u, log_v, log_k = _absorbed_sinkhorn(mu, nu, cost, epsilon, iterations)
            plan = torch.exp(log_u.unsqueeze(2) + log_k.unsqueeze(0) + log_v.unsqueeze(1))
            value = (plan * cost.unsqueeze(0)).sum(dim=(1, 2))
        ctx.save_for_backward(log_u, log_v)
        ctx.epsilon = epsilon
        return value

    @staticmethod
    def backward(ctx, grad_out):
        log_u, log_v = ctx.saved_tensors
        scale = grad_out.unsqueeze(1) * ctx.epsilon
        grad_mu = grad_nu = None
        # The published gradient: ε·log u and ε·log v (dual potentials); zero-mass entries get no gradient.
        if ctx.needs_input_grad[0]:
            grad_mu = scale * torch.where(torch.isfinite(log_u), log_u, torch.zeros_like(log_u))
        if ctx.needs_input_grad[1]:
            grad_nu = scale * torch.where(torch.isfinite(log_v), log_v, torch.zeros_like(log_v))
        return grad_mu, grad_nu, None, None, None


def sinkhorn_cost(
    mu: torch.Tensor,
    nu: torch.Tensor,
    cost: torch.Tensor,
    epsilon: float = SINKHORN_EPSILON,
    iterations: int = SINKHORN_ITERATIONS,
) -> torch.Tensor:
    """Transport cost Σ P ⊙ C of the entropic plan between histograms mu [B, n] and nu [B, m] (each row sums
    to 1), cost [n, m]. Returns [B]. Computed in float64 for stability at ε = 1e-3."""
    value = _SinkhornCost.apply(mu.double(), nu.double(), cost.double(), epsilon, iterations)
    return value.to(nu.dtype)


def mask_to_grid(mask: torch.Tensor, side: int) -> torch.Tensor:
    """[B, 1, H, W] binary mask -> [B, side, side]: nearest downsampling as published; a mask too thin to
    survive it falls back to max-pooling, so the target is never empty."""
    grid = F.interpolate(mask.float(), size=(side, side), mode="nearest")
    pooled = F.adaptive_max_pool2d(mask.float(), (side, side))
    empty = grid.flatten(1).sum(1) == 0
    grid = torch.where(empty[:, None, None, None], pooled, grid)
    return grid[:, 0]


def attention_loss(
    attention: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float = SINKHORN_EPSILON,
    iterations: int = SINKHORN_ITERATIONS,
) -> torch.Tensor:
    """Σ_batch W(mask, attention) / B, before the λ_att weight.

    attention: [B, s, s] the concept's averaged token attention Â (non-negative); mask: [B, 1, H, W].
    """
    b, side = attention.shape[0], attention.shape[-1]
    target = mask_to_grid(mask, side).reshape(b, -1)
    mu = target / target.sum(1, keepdim=True)
    a = attention.reshape(b, -1).float()
    nu = a / a.sum(1, keepdim=True)
    cost = grid_cost(side, device=attention.device)
    return sinkhorn_cost(mu, nu, cost, epsilon, iterations).sum() / b


def _msd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d(x, y) = mean over the last dimension of (x − y)² (MSE with reduction "mean")."""
    return ((x - y) ** 2).mean(dim=-1)


def phase1_triplet(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float) -> torch.Tensor:
    """max(d(a, p) − d(a, n) + γ, 0) summed over the batch, divided by the number of active triplets.

    anchor = E(object word), positive = E(<&i>), negative = E(<*i>); each [B, D] or [D]. With unit vectors
    d ≤ 4/D, so the default γ = 0.05 keeps the hinge always active. Where no triplet is active the
    published code would divide 0 by 0; we return 0 instead.
    """
    losses = F.relu(_msd(anchor, positive) - _msd(anchor, negative) + margin).reshape(-1)
    active = (losses > _POSITIVE).sum().clamp(min=1)
    return losses.sum() / active


def intrinsic_margins(embeddings: dict[str, torch.Tensor], anchors: Sequence[str]) -> dict[tuple[str, str], torch.Tensor]:
    """m[(x, c)] = 0.7 · (E(x) − E(c))², element-wise, for every word x in `embeddings` and anchor c ≠ x.

    `embeddings` maps a word (the intrinsic anchors and the object words) to its E(·) under the initial
    text encoder; computed once at start-up.
    """
    return {
        (x, c): (MARGIN_SCALE * (ex - embeddings[c]) ** 2).detach()
        for x, ex in embeddings.items()
        for c in anchors
        if x != c
    }


def _hinge_mean(anchor, close, far, margin) -> torch.Tensor:
    """mean over dims of max((a − close)² − (a − far)² + m, 0): the element-wise hinge (docs/method.md#losses)."""
    return F.relu((anchor - close) ** 2 - (anchor - far) ** 2 + margin).mean(dim=-1)


def _mean_of_positive(values: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack(values)
    positive = stacked > _POSITIVE
    return (stacked * positive).sum() / positive.sum().clamp(min=1)


def phase2_triplets(
    anchor_words: dict[str, torch.Tensor],
    object_word: torch.Tensor,
    object_name: str,
    concept_token: torch.Tensor,
    intrinsic_tokens: dict[str, torch.Tensor],
    margins: dict[tuple[str, str], torch.Tensor],
) -> torch.Tensor:
    """Σ_k L_k + L_obj, the phase-2 intrinsic triplets of one concept (before `reg_intrinsic_weight`).

    anchor_words: E(word k) per anchor k; object_word: E(a_i); concept_token: E(<&i>);
    intrinsic_tokens: E(c_{i,k}) per anchor k; margins from `intrinsic_margins`.
    L_k averages, over the other anchors j, the positive t_kj = hinge(E(k), c_{i,k}, c_{i,j}, m[k][j]):
    pull the k-token toward the word k and push the other intrinsic tokens of the concept away from it.
    L_obj averages the positive s_c = hinge(E(a_i), E(<&i>), c_{i,c}, m[a_i][c]). The published code sums
    the terms without normalising (as published).
    """
    anchors = list(intrinsic_tokens)
    total = concept_token.new_zeros(())
    for k in anchors:
        others = [
            _hinge_mean(anchor_words[k], intrinsic_tokens[k], intrinsic_tokens[j], margins[(k, j)])
            for j in anchors
            if j != k
        ]
        if others:
            total = total + _mean_of_positive(others)
    object_terms = [
        _hinge_mean(object_word, concept_token, intrinsic_tokens[c], margins[(object_name, c)])
        for c in anchors
        if c != object_name
    ]
    if object_terms:
        total = total + _mean_of_positive(object_terms)
    return total


def timestep_weights(num_train_timesteps: int, t_dist: float) -> torch.Tensor:
    """p(t) ∝ 1 − t_dist · cos(π t / T), t = 0 … T−1 (docs/method.md#a-training-step): large t up to 3× likelier at 0.5."""
    t = torch.arange(num_train_timesteps, dtype=torch.float64)
    weights = 1.0 - t_dist * torch.cos(math.pi * t / num_train_timesteps)
    return weights / weights.sum()

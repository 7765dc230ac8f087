"""The non-negative lasso of SpLiCE, solved exactly in torch for a batch of vectors.

    minimise_w  ‖z − Cᵀw‖² + λ‖w‖₁   subject to  w ≥ 0

with C the [V, D] dictionary (one centred, normalised word embedding per row) and z a centred, normalised image
embedding. This is sklearn's ``Lasso(alpha=λ/(2D), positive=True, fit_intercept=False)`` fit on X = Cᵀ, y = z
(docs/method.md#retriever), multiplied through by 2D.

It is the quadratic program min ½wᵀQw − bᵀw, w ≥ 0 with Q = 2CCᵀ and b = 2Cz − λ. Q is V × V (15,000² for
SpLiCE) and is never formed. A working-set method:

1. The working set W starts as the (up to 64) words with the largest positive b_j (only they can be non-zero
   at w = 0); large enough that one restricted solve usually finds the whole support, so most solves take the
   minimum of two passes over the dictionary (the correlations, then the KKT check).
2. The QP restricted to W (|W| × |W|, small) is solved exactly by Lawson–Hanson active-set steps.
3. One batched GEMM gives the full gradient g = 2C(Cᵀw − z) + λ for every vector of the batch. Where some
   g_j < −tol off the support, the most violating words join W and step 2 repeats; otherwise the KKT conditions
   hold (g = 0 on the support, g ≥ 0 off it) and w is the exact minimiser up to float64 round-off.

Sparse solutions need two or three passes over the dictionary, where coordinate descent (sklearn) needs one per
epoch and many epochs to reach its tolerance.

The passes over the dictionary run in float32 (half the bytes and twice the GEMM rate of float64) with a proven
error bound: a float32 dot product of length D is within (D + 2)·u·‖r‖·‖c_j‖ of the exact one (u = 2⁻²⁴), so a
word whose float32 gradient exceeds twice that bound cannot violate the KKT conditions. Every other word — those
near or below zero, a small minority — has its gradient recomputed exactly in float64. The restricted problems
and the objective are float64 throughout, so the result is the float64 minimiser, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class LassoResult:
    weights: torch.Tensor  # [B, V] (or [V]), non-negative, float32
    objective: torch.Tensor  # [B] (or []) float64: ‖z − Cᵀw‖² + λ‖w‖₁
    dictionary_passes: int  # full-gradient GEMMs over the dictionary


def lasso_objective(dictionary: torch.Tensor, z: torch.Tensor, w: torch.Tensor, l1_penalty: float) -> torch.Tensor:
    """‖z − Cᵀw‖² + λ‖w‖₁ per row, in float64."""
    r = z.double() - w.double() @ dictionary.double()
    return (r * r).sum(-1) + l1_penalty * w.double().abs().sum(-1)


def _restricted_qp(q: np.ndarray, b: np.ndarray, w: np.ndarray, tol: float, max_steps: int) -> np.ndarray:
    """Lawson–Hanson for min ½wᵀQw − bᵀw, w ≥ 0 (Q small, PSD), from the feasible point `w`.

    Every coordinate starts passive (those at zero too), so a whole block of new words is solved for at once;
    the step-back then drops the ones that would turn negative. Single additions are only the fallback.
    In numpy: the problem is a few dozen words, where torch's per-call overhead would dominate."""
    w = w.copy()
    passive = np.ones(w.shape, dtype=bool)
    for _ in range(max_steps):
        idx = np.flatnonzero(passive)
        while idx.size:
            # Minimise on the passive set; when a coordinate would go ≤ 0, step back to the boundary and drop it.
            sub = q[np.ix_(idx, idx)]
            sub[np.diag_indices_from(sub)] += 1e-12  # collinear words (duplicates) would make it singular
            s = np.linalg.solve(sub, b[idx])
            if (s > 0).all():
                w[:] = 0.0
                w[idx] = s
                break
            wi = w[idx]
            neg = s <= 0
            alpha = (wi[neg] / (wi[neg] - s[neg])).min()
            wi = wi + alpha * (s - wi)
            leaving = (neg & (wi <= 1e-15)) | (wi <= 0)  # brought to the boundary and still going down
            wi = np.maximum(wi, 0.0)
            wi[leaving] = 0.0
            w[:] = 0.0
            w[idx] = wi
            passive[idx[leaving]] = False
            idx = np.flatnonzero(passive)
        g = q @ w - b
        g[passive] = 0.0
        j = int(np.argmin(g))
        if g[j] >= -tol:
            return w
        passive[j] = True  # enters at zero; the next solve gives it a positive value
    return w


class NonNegLasso:
    """The solver bound to one dictionary [V, D] (float64 copy kept on the dictionary's device)."""

    def __init__(self, dictionary: torch.Tensor, *, working_set: int = 64, tol: float = 1e-10,
                 max_passes: int = 100):
        self.c = dictionary.double()
        self.c32 = dictionary.float()
        # twice the float32 dot-product error bound per unit residual norm (module docstring)
        self._screen = 2.0 * (self.c.shape[1] + 2) * 2.0**-24 * float(self.c.norm(dim=1).max()) * 2.0
        self.working_set = working_set
        self.tol = tol
        self.max_passes = max_passes

    def _gradient(self, residual: torch.Tensor, l1_penalty: float) -> torch.Tensor:
        """2·C·r + λ for each row of r ([n, D] float64): exact in float64 wherever it is below the float32 error
        margin (so every violation, and every value a decision reads, is exact); a certified positive elsewhere."""
        g32 = 2.0 * (residual.float() @ self.c32.T) + l1_penalty  # [n, V]
        margin = (self._screen * residual.norm(dim=1, keepdim=True)).float()
        grad = g32.double()
        for i in range(residual.shape[0]):
            near = (g32[i] < margin[i]).nonzero().squeeze(1)
            if near.numel():
                grad[i, near] = 2.0 * (self.c[near] @ residual[i]) + l1_penalty
        return grad

    def solve(self, z: torch.Tensor, l1_penalty: float = 0.2) -> LassoResult:
        """Solve for every row of `z` ([B, D] or [D])."""
        if not l1_penalty > 0:
            raise ValueError("l1_penalty must be positive")
        squeeze = z.ndim == 1
        zb = (z.unsqueeze(0) if squeeze else z).to(self.c)
        c = self.c
        n, v = zb.shape[0], c.shape[0]
        w = torch.zeros(n, v, dtype=torch.float64, device=c.device)
        residual = -zb.clone()  # Cᵀw − z, kept per row from the support only
        grad = self._gradient(residual, l1_penalty)  # at w = 0 it is −b, b = 2Cz − λ
        work = [torch.empty(0, dtype=torch.long, device=c.device) for _ in range(n)]
        todo = list(range(n))
        passes = 1
        while todo and passes <= self.max_passes:
            for i in todo:
                violating = (grad[i] < -self.tol).nonzero().squeeze(1)
                grow = max(self.working_set, work[i].numel())
                if violating.numel() > grow:
                    violating = violating[torch.topk(-grad[i, violating], grow).indices]
                idx = torch.unique(torch.cat([work[i], violating]))
                if not idx.numel():  # no word lowers the objective (a large λ): w = 0 is the solution
                    continue
                cw = c[idx]
                bi = 2.0 * (cw @ zb[i]) - l1_penalty  # exact float64 b on the working set
                wi = torch.from_numpy(_restricted_qp(
                    (2.0 * (cw @ cw.T)).cpu().numpy(), bi.cpu().numpy(), w[i, idx].cpu().numpy(),
                    self.tol, 4 * idx.numel() + 10)).to(c.device)
                w[i, idx] = wi
                # Keep only the words that ended up in the support: the working set stays small.
                work[i] = idx[wi > 0]
                residual[i] = wi[wi > 0] @ cw[wi > 0] - zb[i]
            rows = torch.tensor(todo, device=c.device)
            grad[rows] = self._gradient(residual[rows], l1_penalty)  # one GEMM over the dictionary
            passes += 1
            todo = [i for i in todo if bool((grad[i][w[i] == 0] < -self.tol).any())]
        objective = (residual * residual).sum(-1) + l1_penalty * w.sum(-1)
        weights = w.float()
        if squeeze:
            weights, objective = weights[0], objective[0]
        return LassoResult(weights=weights, objective=objective, dictionary_passes=passes)

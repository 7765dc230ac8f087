"""The stage-2 losses against independent computations: POT for Sinkhorn, numpy for the triplets, a
hand-made case for the masked loss."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

from services.learner import losses as L


def test_masked_reconstruction_hand_made_case():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.zeros_like(pred)
    # 4x4 mask whose nearest 2x2 downsampling keeps only the top-left and bottom-right cells
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, 0, 0] = 1
    mask[0, 0, 2, 2] = 1
    # (1² + 4²) / 4 elements: the mean includes the zeroed background
    assert L.masked_reconstruction(pred, target, mask).item() == pytest.approx(17 / 4)
    assert L.masked_reconstruction(pred, target, torch.ones(1, 1, 4, 4)).item() == pytest.approx(30 / 4)


def _histograms(seed: int, side: int, batch: int):
    rng = np.random.default_rng(seed)
    masks = (rng.random((batch, side * side)) > 0.6).astype(np.float64)
    mu = masks / masks.sum(1, keepdims=True)
    nu = rng.random((batch, side * side)) + 1e-3
    nu /= nu.sum(1, keepdims=True)
    return mu, nu


def test_sinkhorn_cost_matches_pot_sinkhorn2_and_its_potentials():
    side, batch = 16, 3
    mu, nu = _histograms(0, side, batch)
    cost = L.grid_cost(side, dtype=torch.float64)
    # the cost matrix is POT's euclidean ot.dist on the grid coordinates
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2).astype(float)
    np.testing.assert_allclose(cost.numpy(), ot.dist(grid, grid, metric="euclidean"), atol=1e-12)

    nu_t = torch.tensor(nu, requires_grad=True)
    ours = L.sinkhorn_cost(torch.tensor(mu), nu_t, cost)
    ours.sum().backward()
    for b in range(batch):
        ref = ot.sinkhorn2(mu[b], nu[b], cost.numpy(), reg=L.SINKHORN_EPSILON, method="sinkhorn_log",
                           numItermax=L.SINKHORN_ITERATIONS, stopThr=0.0, warn=False)
        assert ours[b].item() == pytest.approx(float(ref), rel=1e-9)
        _, log = ot.sinkhorn(mu[b], nu[b], cost.numpy(), reg=L.SINKHORN_EPSILON, method="sinkhorn_log",
                             numItermax=L.SINKHORN_ITERATIONS, stopThr=0.0, warn=False, log=True)
        # the published gradient: ε · log v, the scaled dual potential of ν
        np.testing.assert_allclose(nu_t.grad[b].numpy(), L.SINKHORN_EPSILON * log["log_v"], rtol=1e-9, atol=1e-12)


def test_sinkhorn_floor_changes_nothing_torch_logsumexp_would_compute():
    """Our log-sum-exp floors terms below exp(-700) relative to the largest (they would be subnormal, and slow):
    the potentials equal torch.logsumexp's, including the -inf of zero-mass cells and fully -inf rows."""
    mu, nu = _histograms(3, 16, 2)
    mu[0, :40] = 0.0  # cells with no mass
    mu /= mu.sum(1, keepdims=True)
    cost = L.grid_cost(16, dtype=torch.float64)
    args = (torch.tensor(mu), torch.tensor(nu), cost, L.SINKHORN_EPSILON, L.SINKHORN_ITERATIONS)
    ours = L._log_sinkhorn(*args)
    ref = L._log_sinkhorn(*args, logsumexp=torch.logsumexp)
    for a, b in zip(ours[:2], ref[:2], strict=True):
        assert torch.equal(torch.isneginf(a), torch.isneginf(b)) and torch.isneginf(a).any() == (a is ours[0])
        finite = torch.isfinite(b)
        assert torch.allclose(a[finite], b[finite], rtol=0, atol=1e-9)
    x = torch.tensor([[-math.inf, -math.inf], [0.0, -2000.0]], dtype=torch.float64)
    assert torch.equal(L._logsumexp(x, 1), torch.logsumexp(x, 1))


def _attention_cases(side: int = 16):
    """Masks and attention maps of every shape the attention loss meets: scattered cells, one cell, a box, the
    whole grid, a wide band; attention from nearly flat to sharply peaked, one with a cell of no attention."""
    rng = np.random.default_rng(7)
    masks = [rng.random(side * side) > 0.6, np.eye(1, side * side, 37)[0] > 0]
    for y, x, h, w in ((3, 4, 5, 7), (0, 0, side, side), (0, 0, side, 11), (9, 2, 2, 13)):
        box = np.zeros((side, side), bool)
        box[y : y + h, x : x + w] = True
        masks.append(box.ravel())
    mu, nu = [], []
    for k, m in enumerate(masks):
        for sharpness in (0.3, 6.0):
            mu.append(m / m.sum())
            logits = rng.normal(size=side * side) * sharpness
            a = np.exp(logits - logits.max())
            if k == 2 and sharpness > 1:
                a[100] = 0.0
            nu.append(a / a.sum())
    return np.array(mu), np.array(nu)


SINKHORN_TOLERANCE = 1e-9  # potentials ε·log u, ε·log v absolute; the transport cost relative


def _plan_cost(log_u, log_v, log_k, cost):
    return (torch.exp(log_u.unsqueeze(2) + log_k.unsqueeze(0) + log_v.unsqueeze(1)) * cost).sum(dim=(1, 2))


@pytest.mark.parametrize("bound", [L._FACTOR_BOUND, 2.0, 1e-3])
def test_absorbed_sinkhorn_is_the_fixed_200_log_domain_iterations(bound):
    """The scaling-domain Sinkhorn the loss runs computes the published 200 log-domain iterations: the potentials
    (whose ε-multiples are the gradient) to 1e-9 and the cost to 1e-9 relative, the -inf of empty cells where
    they are. A tight bound forces absorptions at almost every update (2.0) or every update into the log domain
    (1e-3): those paths agree too."""
    mu, nu = (torch.tensor(x) for x in _attention_cases())
    cost = L.grid_cost(16, dtype=torch.float64)
    args = (mu, nu, cost, L.SINKHORN_EPSILON, L.SINKHORN_ITERATIONS)
    ref = L._log_sinkhorn(*args)
    ours = L._absorbed_sinkhorn(*args, bound=bound)
    for a, b in zip(ours[:2], ref[:2], strict=True):
        assert torch.equal(torch.isneginf(a), torch.isneginf(b))
        finite = torch.isfinite(b)
        assert float((a[finite] - b[finite]).abs().max()) * L.SINKHORN_EPSILON < SINKHORN_TOLERANCE
    value, ref_value = _plan_cost(*ours, cost), _plan_cost(*ref, cost)
    assert torch.allclose(value, ref_value, rtol=SINKHORN_TOLERANCE, atol=0)
    # and it is a quantity 200 iterations fix: 199 or 201 give another cost, beyond the tolerance
    for n in (199, 201):
        other = _plan_cost(*L._log_sinkhorn(mu, nu, cost, L.SINKHORN_EPSILON, n), cost)
        moving = ref_value > 0  # a case whose transport costs nothing costs nothing at any count
        assert ((other - ref_value).abs()[moving] / ref_value[moving]).max() > 100 * SINKHORN_TOLERANCE


def test_the_loss_cost_and_gradient_match_pot_on_every_kind_of_attention():
    mu, nu = _attention_cases()
    cost = L.grid_cost(16, dtype=torch.float64)
    nu_t = torch.tensor(nu, requires_grad=True)
    ours = L.sinkhorn_cost(torch.tensor(mu), nu_t, cost)
    ours.sum().backward()
    for b in range(len(mu)):
        kept = nu[b] > 0  # POT's log-domain Sinkhorn takes strictly positive weights
        plan, log = ot.sinkhorn(mu[b], nu[b][kept], cost.numpy()[:, kept], reg=L.SINKHORN_EPSILON,
                                method="sinkhorn_log", numItermax=L.SINKHORN_ITERATIONS, stopThr=0.0, warn=False,
                                log=True)
        assert ours[b].item() == pytest.approx(float((plan * cost.numpy()[:, kept]).sum()), rel=SINKHORN_TOLERANCE)
        np.testing.assert_allclose(nu_t.grad[b].numpy()[kept], L.SINKHORN_EPSILON * log["log_v"], rtol=0,
                                   atol=SINKHORN_TOLERANCE)
        assert (nu_t.grad[b].numpy()[~kept] == 0).all()  # a cell with no attention gets no gradient


def test_attention_loss_is_small_when_attention_sits_on_the_mask():
    side = 16
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 8:24, 8:24] = 1
    on = torch.full((1, side, side), 1e-4)
    on[:, 2:6, 2:6] = 1.0
    off = torch.full((1, side, side), 1e-4)
    off[:, 10:14, 10:14] = 1.0
    near, far = L.attention_loss(on, mask).item(), L.attention_loss(off, mask).item()
    assert near < 0.5 and far > 4 and far < 8 * math.sqrt(2)  # the blocks are 8·√2 cells apart
    # gradient flows into the attention map and lowers the loss when followed
    att = off.clone().requires_grad_(True)
    L.attention_loss(att, mask).backward()
    stepped = (off - 1e3 * att.grad).clamp(min=1e-6)
    assert L.attention_loss(stepped, mask).item() < far


def test_mask_too_thin_for_nearest_downsampling_still_has_mass():
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 1, :] = 1  # a one-pixel line that nearest sampling at stride 4 misses
    grid = L.mask_to_grid(mask, 16)
    assert grid.sum() > 0


def _np_msd(x, y):
    return np.mean((x - y) ** 2, axis=-1)


def _unit(rng, n, d):
    v = rng.normal(size=(n, d))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.mark.parametrize("margin", [0.05, 1e-4])
def test_phase1_triplet_matches_numpy(margin):
    rng = np.random.default_rng(1)
    a, p, n = _unit(rng, 3, 32)
    ours = L.phase1_triplet(torch.tensor(a), torch.tensor(p), torch.tensor(n), margin).item()
    hinge = max(_np_msd(a, p) - _np_msd(a, n) + margin, 0.0)
    assert ours == pytest.approx(hinge, rel=1e-12, abs=1e-15)
    if margin == 0.05:
        # the documented quirk: always active, a linear function of the cosines
        expected = (2 / 32) * (a @ n - a @ p) + 0.05
        assert ours == pytest.approx(expected, rel=1e-9)


def test_phase2_triplets_match_numpy():
    rng = np.random.default_rng(2)
    d = 16
    anchors = ["texture", "material", "color"]
    words = dict(zip([*anchors, "bowl"], _unit(rng, 4, d), strict=True))
    concept = _unit(rng, 1, d)[0]
    intrinsic = dict(zip(anchors, _unit(rng, 3, d), strict=True))

    # perturb the words so the margins (0.7·(E(x)-E(c))²) differ from the ones at the current vectors
    margins = L.intrinsic_margins({w: torch.tensor(v) for w, v in words.items()}, anchors)
    ours = L.phase2_triplets(
        {k: torch.tensor(words[k]) for k in anchors}, torch.tensor(words["bowl"]), "bowl",
        torch.tensor(concept), {k: torch.tensor(v) for k, v in intrinsic.items()}, margins,
    ).item()

    def hinge(x, close, far, m):
        return np.mean(np.maximum((x - close) ** 2 - (x - far) ** 2 + m, 0.0))

    def mean_positive(values):
        values = [v for v in values if v > 1e-10]
        return sum(values) / len(values) if values else 0.0

    total = 0.0
    for k in anchors:
        total += mean_positive(
            [hinge(words[k], intrinsic[k], intrinsic[j], 0.7 * (words[k] - words[j]) ** 2) for j in anchors if j != k]
        )
    total += mean_positive(
        [hinge(words["bowl"], concept, intrinsic[c], 0.7 * (words["bowl"] - words[c]) ** 2) for c in anchors]
    )
    assert total > 0
    assert ours == pytest.approx(total, rel=1e-12)


def test_timestep_weights_favour_large_t():
    w = L.timestep_weights(1000, 0.5)
    assert w.sum().item() == pytest.approx(1.0)
    assert w[-1] / w[0] == pytest.approx(1.5 / 0.5, rel=1e-3)
    assert torch.allclose(L.timestep_weights(1000, 0.0), torch.full((1000,), 1e-3, dtype=torch.float64))

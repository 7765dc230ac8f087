"""The batched non-negative lasso solver against sklearn's coordinate descent on the same inputs."""

from __future__ import annotations

import pytest
import torch
from sklearn.linear_model import Lasso

from services.localizer.lasso import NonNegLasso, lasso_objective


def _dictionary(v: int, d: int, seed: int) -> torch.Tensor:
    """Like the SpLiCE dictionary: unit rows, centred on their mean, renormalised."""
    g = torch.Generator().manual_seed(seed)
    c = torch.nn.functional.normalize(torch.randn(v, d, generator=g), dim=-1)
    return torch.nn.functional.normalize(c - c.mean(0), dim=-1)


def _images(c: torch.Tensor, n: int, seed: int, noise: float) -> torch.Tensor:
    """Unit vectors near a few dictionary atoms, as a centred image embedding sits near a few words."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, c.shape[0], (n, 5), generator=g)
    z = (torch.rand(n, 5, 1, generator=g) * c[idx]).sum(1) + noise * torch.randn(n, c.shape[1], generator=g)
    return torch.nn.functional.normalize(z, dim=-1)


def _sklearn(c: torch.Tensor, z: torch.Tensor, lam: float) -> torch.Tensor:
    d = c.shape[1]
    model = Lasso(alpha=lam / (2 * d), fit_intercept=False, positive=True, max_iter=10000, tol=1e-6)
    model.fit(c.T.double().numpy(), z.double().numpy())
    return torch.from_numpy(model.coef_)


@pytest.fixture(scope="module")
def dictionary() -> torch.Tensor:
    return _dictionary(2000, 64, seed=0)


@pytest.mark.parametrize("lam", [0.2, 0.05])
@pytest.mark.parametrize("noise", [0.02, 0.2])
def test_matches_sklearn_objective_and_support(dictionary, lam, noise):
    z = _images(dictionary, 6, seed=1, noise=noise)
    ours = NonNegLasso(dictionary).solve(z, lam)
    assert (ours.weights >= 0).all()
    for i in range(z.shape[0]):
        ref = _sklearn(dictionary, z[i], lam)
        ref_obj = float(lasso_objective(dictionary, z[i], ref, lam))
        our_obj = float(ours.objective[i])
        assert abs(our_obj - ref_obj) <= 1e-4 * ref_obj
        assert our_obj <= ref_obj * (1 + 1e-9)  # exact minimiser: never worse than an approximate one
        assert set(ours.weights[i].nonzero().flatten().tolist()) == set(ref.nonzero().flatten().tolist())
        assert ours.weights[i].count_nonzero() > 0


def test_kkt_conditions_hold(dictionary):
    lam = 0.2
    z = _images(dictionary, 4, seed=2, noise=0.1)
    w = NonNegLasso(dictionary).solve(z, lam).weights.double()
    c = dictionary.double()
    grad = 2.0 * ((w @ c - z.double()) @ c.T) + lam
    on = w > 0
    assert grad[on].abs().max() < 1e-6  # stationary on the support
    assert grad[~on].min() > -1e-6  # no word off the support could lower the objective


def test_batch_equals_one_at_a_time_and_vector_input(dictionary):
    z = _images(dictionary, 3, seed=3, noise=0.05)
    solver = NonNegLasso(dictionary)
    batch = solver.solve(z).weights
    for i in range(3):
        single = solver.solve(z[i])
        assert single.weights.shape == (dictionary.shape[0],)
        torch.testing.assert_close(single.weights, batch[i], atol=1e-6, rtol=0)


def test_larger_penalty_is_sparser(dictionary):
    z = _images(dictionary, 1, seed=4, noise=0.1)[0]
    solver = NonNegLasso(dictionary)
    counts = [int(solver.solve(z, lam).weights.count_nonzero()) for lam in (0.02, 0.2, 1.0)]
    assert counts[0] > counts[1] >= counts[2]


def test_rejects_non_positive_penalty(dictionary):
    with pytest.raises(ValueError):
        NonNegLasso(dictionary).solve(torch.ones(64), 0.0)

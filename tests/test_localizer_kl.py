"""Symmetric KL: the GEMM formulation against the per-pair formula, and the Triton kernels against torch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from services.localizer.kl import (
    kl_below,
    merge_step,
    merge_step_direct,
    resolve_backend,
    symmetric_kl,
    symmetric_kl_direct,
)

ROOT = Path(__file__).resolve().parents[1]


def _distributions(n_rows: int, n: int, seed: int, sharpness: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(n_rows, n, generator=g), dim=-1)


def _kl_pair(a: torch.Tensor, b: torch.Tensor) -> float:
    """½ Σ a(log a − log b) − ½ Σ b(log a − log b), written out for one pair in float64."""
    a, b = a.double(), b.double()
    d = torch.log(a) - torch.log(b)
    return float(0.5 * (a * d).sum() - 0.5 * (b * d).sum())


def _threshold_in_a_gap(d: torch.Tensor) -> float:
    """A threshold near the median with no distance within 1e-3 of it, so that float noise cannot flip a pair."""
    values = d.flatten().sort().values
    middle = values.numel() // 2
    for offset in range(middle):
        for i in (middle + offset, middle - offset):
            if 0 < i < values.numel() and float(values[i] - values[i - 1]) > 2e-3:
                return float(values[i - 1] + values[i]) / 2
    raise AssertionError("no gap")


def test_gemm_formulation_equals_per_pair_formula():
    q = _distributions(40, 96, seed=0)
    p = _distributions(7, 96, seed=1)
    gemm = symmetric_kl(p, q)
    direct = symmetric_kl_direct(p, q, chunk=3)
    assert gemm.shape == (7, 40)
    torch.testing.assert_close(gemm, direct, atol=2e-5, rtol=1e-5)
    for k, m in [(0, 0), (3, 17), (6, 39)]:
        assert abs(float(gemm[k, m]) - _kl_pair(p[k], q[m])) < 1e-4


def test_distance_is_symmetric_non_negative_and_zero_on_itself():
    q = _distributions(20, 64, seed=2)
    d = symmetric_kl(q, q)
    torch.testing.assert_close(d, d.T, atol=1e-5, rtol=0)
    assert float(d.diagonal().abs().max()) < 1e-5
    assert float(d.min()) > -1e-5


def test_zeros_are_handled_like_the_direct_formula():
    q = _distributions(10, 32, seed=3)
    q[:, :4] = 0.0  # underflowed probabilities
    q = q / q.sum(-1, keepdim=True)
    torch.testing.assert_close(symmetric_kl(q[:3], q), symmetric_kl_direct(q[:3], q), atol=1e-3, rtol=1e-5)


def test_merge_step_averages_exactly_the_maps_within_threshold():
    q = _distributions(30, 50, seed=4, sharpness=1.0)
    p = q[::5]
    d = symmetric_kl_direct(p, q)
    threshold = _threshold_in_a_gap(d)
    merged = merge_step(p, q, threshold)
    for k in range(p.shape[0]):
        chosen = q[d[k] < threshold]
        torch.testing.assert_close(merged[k], chosen.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(merged, merge_step_direct(p, q, threshold), atol=1e-6, rtol=1e-5)
    assert torch.equal(kl_below(p, q, threshold), d < threshold)


def test_a_proposal_with_no_close_map_is_kept():
    q = _distributions(5, 16, seed=5)
    p = _distributions(2, 16, seed=6, sharpness=8.0)
    torch.testing.assert_close(merge_step(p, q, 1e-9), p)


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", "cpu") == "torch"  # auto: torch off CUDA ...
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("torch", "cuda") == "torch"
    with pytest.raises(ValueError, match="needs a CUDA device"):  # triton off CUDA is refused ...
        resolve_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", "cpu") == "triton"  # ... except under the interpreter
    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError):
        resolve_backend("cuda-magic", "cpu")


def test_auto_takes_triton_on_cuda_when_it_is_installed(monkeypatch):
    import builtins

    pytest.importorskip("triton")
    assert resolve_backend("auto", "cuda") == "triton"
    assert resolve_backend("auto", "cuda:1") == "triton"
    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("no triton here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    assert resolve_backend("auto", "cuda") == "torch"  # without Triton, CUDA runs the torch formulation


_TRITON_PARITY = textwrap.dedent(
    """
    import torch
    from tests.test_localizer_kl import _threshold_in_a_gap
    from services.localizer import kl, kl_triton

    g = torch.Generator().manual_seed(0)
    for k, m, n in [(16, 64, 64), (20, 48, 40), (32, 32, 96)]:  # includes sizes that are not block multiples
        q = torch.softmax(2.0 * torch.randn(m, n, generator=g), -1)
        p = q[torch.randperm(m, generator=g)[:k]]
        ref = kl.symmetric_kl(p, q)
        got = kl_triton.symmetric_kl_triton(p, q)
        assert got.shape == ref.shape
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-5), float((got - ref).abs().max())
        threshold = _threshold_in_a_gap(ref)
        close = kl_triton.kl_below_triton(p, q, threshold)
        assert torch.equal(close, ref < threshold)
        merged = kl_triton.merge_step_triton(p, q, threshold)
        assert torch.allclose(merged, kl.masked_mean(close, q, p), atol=1e-6, rtol=1e-5)
        assert torch.allclose(merged, kl.merge_step(p, q, threshold), atol=1e-6, rtol=1e-5)
    print("parity ok")
    """
)


def test_triton_kernels_match_torch_under_the_interpreter():
    pytest.importorskip("triton")
    # TRITON_INTERPRET must be set before triton is imported, so the check runs in its own interpreter.
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", _TRITON_PARITY], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parity ok" in result.stdout


_TRITON_LOCALIZE = textwrap.dedent(
    """
    import io, sys
    from PIL import Image
    from skimage import data
    from services.common.bundle import Bundle
    from services.localizer import kl_triton, pipeline
    from services.localizer.pipeline import Localizer, LocalizeOptions

    bundle = Bundle.open(sys.argv[1])
    calls = []
    for name in ("merge_step_triton", "kl_below_triton"):
        real = getattr(kl_triton, name)
        setattr(kl_triton, name, (lambda real, name: lambda *a, **k: (calls.append(name), real(*a, **k))[1])(real, name))
    image = Image.fromarray(data.coffee()).resize((96, 64))
    options = LocalizeOptions(max_rounds=1, merge_threshold=0.0008, min_area_fraction=0.0)
    results = {}
    for backend in ("triton", "torch"):
        localizer = Localizer(bundle, "cpu", kl_backend=backend)
        assert localizer.kl_backend == backend
        before = len(calls)
        results[backend] = localizer.localize(image, options)
        print(backend, "kernel calls", len(calls) - before)
    a, b = results["triton"], results["torch"]
    agree = float((a.removed == b.removed).mean())
    print("nouns", [c.noun for c in a.concepts][:3], [c.noun for c in b.concepts][:3])
    print("agreement", agree, "concepts", len(a.concepts), len(b.concepts))
    assert a.stop_reason == b.stop_reason and a.rounds == b.rounds
    assert agree >= 0.99, agree
    print("localize ok")
    """
)


def test_one_localize_round_runs_on_the_triton_kernels_under_the_interpreter(tiny_bundle_dir):
    """The whole loop with `kl_backend="triton"` on the CPU under TRITON_INTERPRET=1, at the tiny bundle's size:
    the kernels are called and the round removes what the torch formulation removes (to float rounding)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", _TRITON_LOCALIZE, str(tiny_bundle_dir)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "localize ok" in result.stdout
    counts = dict(line.rsplit(" kernel calls ", 1) for line in result.stdout.splitlines() if " kernel calls " in line)
    assert int(counts["triton"]) >= 2 and int(counts["torch"]) == 0, counts

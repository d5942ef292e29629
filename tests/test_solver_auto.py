"""svd_solver="auto": the certificate is sound, the choice follows it, the exact
kernel routing agrees with NumPy. No timings here (benchmarks/bench_engine.py)."""

import numpy as np
import pytest

import blocklowrank._svd as svd
from blocklowrank import approximate, batched_svd


def _with_spectrum(shape, s, seed):
    """A matrix (or stack) with singular values ``s`` and random singular vectors."""
    rng = np.random.default_rng(seed)
    *batch, m, n = shape
    L = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((*batch, m, L)))
    V, _ = np.linalg.qr(rng.standard_normal((*batch, n, L)))
    return (U * s[:L]) @ V.swapaxes(-1, -2)


def _spectrum(kind, L):
    i = np.arange(1, L + 1, dtype=float)
    return {
        "flat": np.ones(L),
        "geometric": 0.85**i,
        "power": i**-1.5,
        "gap": np.where(i <= 6, 1.0, 1e-2 / i),  # low rank plus a noise floor
        "cluster": np.where(i <= 20, 1.0, 0.5 * 0.9**i),  # no gap at k
    }[kind]


@pytest.fixture
def always_try(monkeypatch):
    """Make "auto" try the randomized solver on every size (the cost rule off)."""
    monkeypatch.setattr(svd, "_AUTO_MIN_SIDE", 1)
    monkeypatch.setattr(svd, "_AUTO_MAX_WORK", np.inf)


KINDS = ["flat", "geometric", "power", "gap", "cluster"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,k", [((3, 60, 40), 3), ((2, 90, 150), 5), ((1, 200, 200), 8)])
def test_deficit_bound_is_an_upper_bound(kind, shape, k):
    """The computed bound is never below the true captured-energy deficit."""
    L = min(shape[-2:])
    A = _with_spectrum(shape, _spectrum(kind, L), seed=L + k)
    if A.shape[-2] < A.shape[-1]:
        A = A.swapaxes(-1, -2)
    rng = np.random.default_rng(0)
    ell = min(k + max(10, k), L - 1)
    omega = rng.standard_normal((shape[0], A.shape[-1], ell))
    probe = rng.standard_normal((shape[0], A.shape[-1], svd._PROBES))
    Q, _ = np.linalg.qr(A @ (A.swapaxes(-1, -2) @ (A @ omega)))
    Uh, s, Vt = np.linalg.svd(Q.swapaxes(-1, -2) @ A, full_matrices=False)
    bound, discarded = svd._deficit_bound(A, Q, Q @ Uh, s, Vt, k, probe)
    sigma = np.linalg.svd(A, compute_uv=False)
    deficit = (sigma[:, :k] ** 2).sum(-1) - (s[:, :k] ** 2).sum(-1)
    total = (sigma**2).sum(-1)
    assert np.all(bound >= deficit - 1e-12 * total)
    np.testing.assert_allclose(discarded, total - (s[:, :k] ** 2).sum(-1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d,K,r", [(64, 1, 3), (120, 2, 4), (300, 1, 10), (256, 4, 2)])
def test_auto_error_matches_exact(always_try, kind, d, K, r):
    """auto's error is within 1e-6 relative of the exact solver's, and equal where
    it fell back."""
    X = _with_spectrum((d, d), _spectrum(kind, d), seed=d + r)
    auto = approximate(X, n_blocks=K, rank=r, svd_solver="auto", random_state=1)
    full = approximate(X, n_blocks=K, rank=r, svd_solver="full")
    (used,) = set(auto.report.svd_solver.values())
    assert used in ("full", "randomized")
    if used == "full":
        assert auto.error == full.error
        np.testing.assert_array_equal(auto.reconstruction, full.reconstruction)
    else:
        assert abs(auto.error - full.error) <= 1e-6 * full.error
    if kind == "flat" and d >= 64:
        assert used == "full"


def test_auto_picks_randomized_on_decay_and_full_on_flat():
    d, r = 1024, 16  # float32: the exact SVD (the fallback, and the reference) is the fast one
    rng = np.random.default_rng(0)
    U, V = (np.linalg.qr(rng.standard_normal((d, 160)))[0] for _ in range(2))
    decay = ((U * np.exp(-np.arange(160) / 8.0)) @ V.T).astype(np.float32)  # rank 160, decaying
    flat = np.random.default_rng(1).standard_normal((d, d), dtype=np.float32)
    a = approximate(decay, method="global", rank=r, svd_solver="auto", random_state=0)
    b = approximate(flat, method="global", rank=r, svd_solver="auto", random_state=0)
    assert a.report.svd_solver == {(d, d): "randomized"}
    assert b.report.svd_solver == {(d, d): "full"}
    ref = approximate(decay, method="global", rank=r, svd_solver="full")
    assert abs(a.error - ref.error) <= 1e-6 * ref.error


def test_auto_on_a_stack_of_blocks(always_try):
    X = _with_spectrum((4, 128, 96), 0.7 ** np.arange(96), seed=3)
    res = approximate(X, n_blocks=2, rank=3, svd_solver="auto", random_state=0)
    ref = approximate(X, n_blocks=2, rank=3, svd_solver="full")
    assert set(res.report.svd_solver.values()) == {"randomized"}
    np.testing.assert_allclose(res.error, ref.error, rtol=1e-6)


@pytest.mark.parametrize("mode", [dict(budget=4000), dict(max_error=0.5)])
def test_budget_and_max_error_stay_exact(always_try, mode):
    X = _with_spectrum((128, 128), 0.8 ** np.arange(128), seed=4)
    res = approximate(X, n_blocks=2, svd_solver="auto", **mode)
    assert set(res.report.svd_solver.values()) == {"full"}


def test_auto_is_deterministic_and_independent_of_n_jobs(always_try):
    X = _with_spectrum((6, 80, 80), 0.8 ** np.arange(80), seed=5)
    a = batched_svd(X, 4, svd_solver="auto", random_state=2, n_jobs=1)
    b = batched_svd(X, 4, svd_solver="auto", random_state=2, n_jobs=2)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-12)


@pytest.mark.parametrize("shape", [(200, 130), (130, 200), (3, 128, 128), (2, 150, 140)])
def test_float32_exact_kernel_agrees_with_numpy(shape):
    """The SciPy gesdd route (float32, side >= 128) against np.linalg.svd."""
    assert min(shape[-2:]) >= svd._GESDD_MIN_SIDE[np.dtype(np.float32)]
    A = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    k = 5
    U, s, Vt = batched_svd(A, k, svd_solver="full")
    u, sv, vt = np.linalg.svd(A, full_matrices=False)
    u, vt = svd.svd_flip_v(u[..., :k].copy(), vt[..., :k, :].copy())
    assert U.dtype == s.dtype == Vt.dtype == np.float32
    np.testing.assert_allclose(s, sv[..., :k], rtol=1e-5)
    np.testing.assert_allclose(U, u, atol=2e-4)
    np.testing.assert_allclose(Vt, vt, atol=2e-4)

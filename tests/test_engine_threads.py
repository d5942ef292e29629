"""The batched engine against a per-block loop, and independence from n_jobs.

No timings here: speed is measured by benchmarks/bench_engine.py.
"""

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from blocklowrank import BlockLayout, approximate, batched_svd
from blocklowrank._engine import block_spectra
from blocklowrank._parallel import resolve_n_jobs as _resolve_n_jobs
from blocklowrank._svd import svd_flip_v


def _stack(seed, shape, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("shape", [(7, 12, 9), (5, 9, 12), (3, 16, 16)])
def test_batched_exact_equals_per_block_loop(shape):
    A = _stack(0, shape)
    k = 3
    U, s, Vt = batched_svd(A, k, svd_solver="full", n_jobs=2)
    for t in range(shape[0]):
        u, sv, vt = np.linalg.svd(A[t], full_matrices=False)
        u, vt = svd_flip_v(u[:, :k].copy(), vt[:k].copy())
        np.testing.assert_allclose(s[t], sv[:k], rtol=1e-12)
        np.testing.assert_allclose(U[t], u, atol=1e-10)
        np.testing.assert_allclose(Vt[t], vt, atol=1e-10)


@pytest.mark.parametrize("solver", ["full", "randomized"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_n_jobs_does_not_change_the_result(solver, dtype):
    A = _stack(1, (11, 40, 30), dtype)
    kw = dict(svd_solver=solver, random_state=0, full_spectrum=solver == "full")
    with threadpool_limits(limits=1, user_api="blas"):  # same BLAS threads on both sides
        ref = batched_svd(A, 4, n_jobs=1, **kw)
    for n_jobs in (2, 3, -1, None):
        out = batched_svd(A, 4, n_jobs=n_jobs, **kw)
        for a, b in zip(ref, out):
            assert a.dtype == b.dtype == dtype
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=0, atol=50 * np.finfo(dtype).eps)


@pytest.mark.parametrize("shape", [(3, 128, 128), (2, 512, 512)])
def test_every_exact_route_is_the_svd(shape):
    """Claim: whichever LAPACK kernel the exact path routes a float32 stack to
    (SciPy's one matrix at a time with BLAS's threads, NumPy's gufunc split over
    worker threads, SciPy's on one thread), the singular values are those of a
    float64 reference SVD to float32 rounding, and U S V^T rebuilds the stack."""
    A = _stack(3, shape, np.float32)
    ref = np.linalg.svd(A.astype(np.float64), compute_uv=False)
    tol = 20 * np.finfo(np.float32).eps * ref[:, :1]
    routes = [dict(n_jobs=None), dict(n_jobs=2), dict(n_jobs=1)]
    for kw in routes:
        U, s, Vt = batched_svd(A, None, svd_solver="full", full_spectrum=True, **kw)
        assert s.dtype == np.float32 and np.all(np.abs(s - ref) <= tol), kw
        rebuilt = np.matmul(U * s[:, None, :], Vt, dtype=np.float64)
        assert np.max(np.abs(rebuilt - A)) <= 50 * np.finfo(np.float32).eps * ref[:, 0].max(), kw
        values = block_spectra(A, BlockLayout.block(shape[1:], 1), **kw).values[(0, 0)]  # singular values only
        assert values.dtype == np.float32 and np.all(np.abs(values - ref) <= tol), kw


def test_n_jobs_bit_for_bit_at_equal_blas_threads():
    A = _stack(2, (9, 30, 30))
    with threadpool_limits(limits=1, user_api="blas"):
        ref = batched_svd(A, 3, svd_solver="randomized", random_state=5, n_jobs=1)
    out = batched_svd(A, 3, svd_solver="randomized", random_state=5, n_jobs=2)
    for a, b in zip(ref, out):
        np.testing.assert_array_equal(a, b)


def test_randomized_is_deterministic_with_a_seed():
    X = _stack(3, (64, 64))
    a = approximate(X, n_blocks=4, rank=2, svd_solver="randomized", random_state=7, n_jobs=1)
    b = approximate(X, n_blocks=4, rank=2, svd_solver="randomized", random_state=7, n_jobs=2)
    c = approximate(X, n_blocks=4, rank=2, svd_solver="randomized", random_state=7)
    np.testing.assert_allclose(a.reconstruction, b.reconstruction, atol=1e-12)
    np.testing.assert_allclose(a.reconstruction, c.reconstruction, atol=1e-12)
    assert a.error == pytest.approx(b.error, rel=1e-12)


def test_approximate_threads_equal_loop_of_blocks():
    X = _stack(4, (50, 50))  # uneven 3 x 3 split: blocks 17 and 16
    res = approximate(X, n_blocks=3, rank=2, svd_solver="full", n_jobs=2)
    rows = np.array_split(np.arange(50), 3)
    ref = np.zeros_like(X)
    for ri in rows:
        for cj in rows:
            u, s, vt = np.linalg.svd(X[np.ix_(ri, cj)], full_matrices=False)
            ref[np.ix_(ri, cj)] = (u[:, :2] * s[:2]) @ vt[:2]
    np.testing.assert_allclose(res.reconstruction, ref, atol=1e-12)
    np.testing.assert_allclose(res.error, np.linalg.norm(X - ref) / np.linalg.norm(X), rtol=1e-10)


def test_resolve_n_jobs():
    assert _resolve_n_jobs(None) == 1
    assert _resolve_n_jobs(None, 1, 1e12) == 1  # one matrix: BLAS's own threads
    assert _resolve_n_jobs(None, 100, 10.0) == 1  # too little work for threads
    assert _resolve_n_jobs(3) == 3
    assert _resolve_n_jobs(-1) >= 1
    with threadpool_limits(limits=1, user_api="blas"):
        assert _resolve_n_jobs(None, 100, 1e12) == 1  # respects the caller's BLAS limit
    with pytest.raises(ValueError):
        _resolve_n_jobs(0)
    with pytest.raises(TypeError):
        _resolve_n_jobs(1.5)


def test_concurrent_calls_restore_the_blas_limit():
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info

    def blas_threads():
        return sorted(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")

    before = blas_threads()
    A = _stack(5, (16, 40, 40))
    ref = batched_svd(A, 3, n_jobs=2)
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda _: batched_svd(A, 3, n_jobs=2), range(8)))
    for out in outs:
        for a, b in zip(ref, out):
            np.testing.assert_allclose(a, b, atol=1e-12)
    assert blas_threads() == before


@pytest.mark.parametrize("solver", ["full", "randomized"])
def test_chunking_on_one_thread_changes_nothing(monkeypatch, solver):
    import blocklowrank._parallel as engine

    A = _stack(6, (10, 24, 20))
    kw = dict(svd_solver=solver, random_state=3, full_spectrum=solver == "full", n_jobs=1)
    ref = batched_svd(A, 3, **kw)
    monkeypatch.setattr(engine, "_CHUNK_ELEMS", 2 * 24 * 20)  # chunks of two matrices
    out = batched_svd(A, 3, **kw)
    for a, b in zip(ref, out):
        np.testing.assert_array_equal(a, b)

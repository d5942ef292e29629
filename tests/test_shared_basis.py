"""Shared-basis block structure (BLAST)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocklowrank import BlockLayout, BlockLowRank, GlobalLowRank
from blocklowrank._linalg import STEP_TOL, psd_solve
from blocklowrank.budget import match_budget
from blocklowrank.structures import SharedBasisLowRank, fit_shared_basis, shared_basis_params
from blocklowrank.structures._als import _gram, _pad, _s_solve, _u_solve, _v_solve
from blocklowrank.testing.strategies import layouts


def _random_state(layout, r, rng):
    kr, kc = layout.n_blocks
    mb, nb = max(layout.row_sizes), max(layout.col_sizes)
    U = np.zeros((kr, mb, r))
    V = np.zeros((kc, nb, r))
    for i, h in enumerate(layout.row_sizes):
        U[i, :h] = rng.standard_normal((h, r))
    for j, w in enumerate(layout.col_sizes):
        V[j, :w] = rng.standard_normal((w, r))
    S = rng.standard_normal((kr, kc, r))
    return U, V, S


def _W(layout, V, S, i):
    """Decoder of block-row i: [diag(s_i1) V_1^T, ..., diag(s_iK) V_K^T] (r x n)."""
    return np.concatenate([S[i, j][:, None] * V[j, :w].T for j, w in enumerate(layout.col_sizes)], axis=1)


# ---------------------------------------------------------------------------- counting
def test_params():
    assert shared_basis_params((28, 28), n_blocks=2, rank=3) == 3 * 56 + 3 * 4
    assert shared_basis_params((10, 7), n_blocks=(3, 2), rank=2) == 2 * 17 + 2 * 6
    # the budget rule (match_budget) and the count agree: one rule, no separate helper
    rec = match_budget((28, 28), 224, methods="shared_basis", n_blocks=2)[0]
    assert rec["rank"] == 3
    assert match_budget((256, 256), 8192, methods="shared_basis", n_blocks=4)[0]["rank"] == 15
    X = np.random.default_rng(0).standard_normal((10, 7))
    est = SharedBasisLowRank(n_blocks=(3, 2), rank=2).fit(X)
    U, V, S = est.factors_.shared
    counted = sum(u.size for u in U) + sum(v.size for v in V) + S.size
    assert est.n_params_ == counted == shared_basis_params((10, 7), n_blocks=(3, 2), rank=2)


# ---------------------------------------------------------------------------- exact steps
@pytest.mark.parametrize("shape, grid, r", [((9, 7), (2, 3), 2), ((12, 12), (3, 3), 3), ((6, 8), (1, 2), 2)])
def test_each_step_is_the_exact_least_squares_solution(shape, grid, r):
    rng = np.random.default_rng(1)
    X = rng.standard_normal(shape)
    lay = BlockLayout.from_blocks(shape, grid)
    T = _pad(X, lay)
    U, V, S = _random_state(lay, r, rng)
    re, ce = lay.row_edges, lay.col_edges
    # U step: U_i = argmin ||X_i - U_i W_i||
    S_new, TV = _s_solve(T, U, V, _gram(U), _gram(V))
    Un = _u_solve(TV, S, _gram(V))[0]
    for i, h in enumerate(lay.row_sizes):
        W = _W(lay, V, S, i)
        ref = np.linalg.lstsq(W.T, X[re[i] : re[i + 1]].T, rcond=None)[0].T
        np.testing.assert_allclose(Un[i, :h], ref, atol=1e-10)
        assert np.all(Un[i, h:] == 0)
    # V step: V_j = argmin ||X_{:,j} - [U_i diag(s_ij)]_i V_j^T||
    Vn = _v_solve(T, U, S, _gram(U))
    for j, w in enumerate(lay.col_sizes):
        L = np.concatenate([U[i, :h] * S[i, j] for i, h in enumerate(lay.row_sizes)], axis=0)
        ref = np.linalg.lstsq(L, X[:, ce[j] : ce[j + 1]], rcond=None)[0].T
        np.testing.assert_allclose(Vn[j, :w], ref, atol=1e-10)
        assert np.all(Vn[j, w:] == 0)
    # s step: s_ij = argmin ||X_ij - sum_k s_k u_k v_k^T|| over the r couplings
    for i, h in enumerate(lay.row_sizes):
        for j, w in enumerate(lay.col_sizes):
            design = np.stack([np.outer(U[i, :h, k], V[j, :w, k]).ravel() for k in range(r)], axis=1)
            ref = np.linalg.lstsq(design, X[re[i] : re[i + 1], ce[j] : ce[j + 1]].ravel(), rcond=None)[0]
            np.testing.assert_allclose(S_new[i, j], ref, atol=1e-10)


def test_psd_solve_singular_is_min_norm_least_squares():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((4, 2)) @ rng.standard_normal((2, 9))  # rank 2, 4 rows
    y = rng.standard_normal((9, 3))
    x = psd_solve(W @ W.T, W @ y)
    np.testing.assert_allclose(x, np.linalg.pinv(W.T) @ y, atol=1e-8)
    assert np.all(psd_solve(np.zeros((3, 3)), np.zeros((3, 1))) == 0)


# ---------------------------------------------------------------------------- monotone trace
@st.composite
def _problems(draw):
    """A full grid with one rank, a matrix of one of three kinds, an initialisation and a seed."""
    lay = draw(
        layouts(min_side=2, max_side=14, max_blocks=3, patterns=("full",), cuts="array_split", uniform_rank=True)
    )
    (m, n), (kr, kc), r = lay.shape, lay.n_blocks, lay.uniform_rank
    seed = draw(st.integers(0, 2**31 - 1))
    init = draw(st.sampled_from(["svd", "random"]))
    kind = draw(st.sampled_from(["gaussian", "low_rank", "sparse"]))
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        X = rng.standard_normal((m, n))
    elif kind == "low_rank":
        X = rng.standard_normal((m, 1)) @ rng.standard_normal((1, n))
    else:
        X = rng.standard_normal((m, n)) * (rng.random((m, n)) < 0.2)
    return X, (kr, kc), r, init, seed


@settings(max_examples=40, deadline=None)
@given(_problems())
def test_error_trace_never_increases(problem):
    X, grid, r, init, seed = problem
    res = fit_shared_basis(X, grid, r, init=init, random_state=seed, max_iter=25, tol=0.0)
    tr = res.error_trace
    assert np.all(np.isfinite(tr))
    # exact block-coordinate descent: monotone up to rounding (1e-12 of ||X||)
    assert np.all(np.diff(tr) <= STEP_TOL)
    assert res.stop_reason != "increase"
    nx = np.linalg.norm(X)
    direct = 0.0 if nx == 0 else np.linalg.norm(X - res.reconstruction) / nx
    assert res.error == pytest.approx(direct, rel=1e-8, abs=1e-10)


# ---------------------------------------------------------------------------- structure
def test_one_block_is_truncated_svd():
    X = np.random.default_rng(3).standard_normal((15, 12))
    est = SharedBasisLowRank(n_blocks=1, rank=3).fit(X)
    assert est.error_ == pytest.approx(GlobalLowRank(rank=3).fit(X).error_, rel=1e-10)


def test_never_better_than_independent_blocks_of_same_rank():
    X = np.random.default_rng(4).standard_normal((20, 20))
    sb = SharedBasisLowRank(n_blocks=2, rank=3, tol=0, max_iter=200).fit(X)
    bl = BlockLowRank(n_blocks=2, rank=3).fit(X)
    assert sb.error_ >= bl.error_ - 1e-12
    assert sb.n_params_ < bl.n_params_


def test_planted_shared_basis_improves_far_over_init():
    rng = np.random.default_rng(5)
    K, h, r = 2, 12, 2
    U = [rng.standard_normal((h, r)) for _ in range(K)]
    V = [rng.standard_normal((h, r)) for _ in range(K)]
    X = np.block([[(U[i] * rng.standard_normal(r)) @ V[j].T for j in range(K)] for i in range(K)])
    res = fit_shared_basis(X, K, r, tol=0, max_iter=500)
    assert res.error < 1e-3 * res.error_trace[0] + 1e-6
    assert res.error < 1e-3


def test_codes_reconstruct_the_approximation():
    X = np.random.default_rng(6).standard_normal((13, 11))
    est = SharedBasisLowRank(n_blocks=(3, 2), rank=2)
    Z = est.fit_transform(X)
    assert Z.shape == (13, 2) and est.n_codes_ == 2
    np.testing.assert_allclose(est.reconstruct(Z), est.reconstruct(), atol=1e-12)
    np.testing.assert_allclose(est.transform(X), Z, atol=1e-9)
    np.testing.assert_allclose(Z[:5], est.factors_.shared[0][0], atol=1e-12)
    assert est.score(X) == pytest.approx(-est.error_, rel=1e-8)
    dense = np.zeros_like(X)
    for (i, j), (B, A) in est.factors_.items():
        rs, cs = est.layout_.block_slice(i, j)
        dense[rs, cs] = B @ A
        np.testing.assert_allclose(B, est.factors_.shared[0][i] * est.factors_.shared[2][i, j], atol=1e-12)
    np.testing.assert_allclose(dense, est.reconstruct(), atol=1e-12)
    assert est.ranks_.tolist() == [[2, 2]] * 3


def test_degenerate_data_stays_finite():
    X = np.zeros((8, 8))
    X[:4, :4] = np.random.default_rng(7).standard_normal((4, 4))  # three zero blocks
    res = fit_shared_basis(X, 2, 2, max_iter=20, tol=0)
    assert np.all(np.isfinite(res.shared[2])) and np.all(np.diff(res.error_trace) <= STEP_TOL)
    assert fit_shared_basis(np.zeros((6, 6)), 2, 1).error == 0.0


def test_float32_preserved():
    X = np.random.default_rng(8).standard_normal((12, 10)).astype(np.float32)
    est = SharedBasisLowRank(n_blocks=2, rank=2)
    Z = est.fit_transform(X)
    assert Z.dtype == np.float32 and est.transform(X).dtype == np.float32
    assert est.reconstruct().dtype == np.float32 and est.factors_.shared[2].dtype == np.float32


def test_errors():
    X = np.random.default_rng(9).standard_normal((10, 7))
    with pytest.raises(ValueError, match="exceeds the smaller side of the smallest block"):
        SharedBasisLowRank(n_blocks=2, rank=4).fit(X)
    with pytest.raises(ValueError, match="block-columns"):
        SharedBasisLowRank(n_blocks=(1, 8)).fit(X)
    with pytest.raises(ValueError, match="init"):
        fit_shared_basis(X, 2, 1, init="nope")


# ---------------------------------------------------------------------------- stacks
def _mixed_stack(n, shape, seed):
    """Gaussian, rank-1, sparse and all-zero matrices (degenerate Grams included)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n):
        kind = t % 4
        if kind == 0:
            X = rng.standard_normal(shape)
        elif kind == 1:
            X = rng.standard_normal((shape[0], 1)) @ rng.standard_normal((1, shape[1]))
        elif kind == 2:
            X = rng.standard_normal(shape) * (rng.random(shape) < 0.2)
        else:
            X = np.zeros(shape)
            if t % 8 == 7:
                X[: shape[0] // 2, : shape[1] // 2] = rng.standard_normal((shape[0] // 2, shape[1] // 2))
        out.append(X)
    return np.stack(out)


@pytest.mark.parametrize("grid, r", [((2, 3), 2), (2, 3), (1, 1)])
def test_stack_equals_per_matrix_fits(grid, r):
    """A stack (more matrices than the small-stack threshold, so the vectorised solver
    runs) gives, matrix by matrix, the fit of that matrix alone: same error to 1e-9,
    same number of passes and stop reason, same reconstruction; each trace is
    non-increasing."""
    S = _mixed_stack(80, (12, 13), seed=11)
    batch = fit_shared_basis(S, grid, r, max_iter=40)
    assert batch.error.shape == (80,) and batch.shared[2].shape == (80,) + tuple(np.broadcast_to(grid, 2)) + (r,)
    rec = batch.reconstruction
    for t in range(len(S)):
        one = fit_shared_basis(S[t], grid, r, max_iter=40)
        assert batch.error[t] == pytest.approx(one.error, rel=1e-9, abs=1e-12)
        assert batch.n_iter[t] == one.n_iter and batch.stop_reason[t] == one.stop_reason
        np.testing.assert_allclose(rec[t], one.reconstruction, atol=1e-8 * (1 + np.abs(S[t]).max()))
        tr = batch.error_trace[t]
        assert np.all(np.isnan(tr[one.n_iter :])) and not np.any(np.isnan(tr[: one.n_iter]))
        np.testing.assert_allclose(tr[: one.n_iter], one.error_trace, rtol=1e-9, atol=1e-12)
        assert np.all(np.diff(tr[: one.n_iter]) <= STEP_TOL)
    nx = np.linalg.norm(S, axis=(1, 2))
    direct = np.where(nx > 0, np.linalg.norm(S - rec, axis=(1, 2)) / np.where(nx > 0, nx, 1), 0)
    np.testing.assert_allclose(batch.error, direct, rtol=1e-8, atol=1e-10)
    assert not np.any(batch.stop_reason == "increase")


def test_stack_threads_and_shapes():
    """n_jobs splits the stack (same results), leading dimensions are kept, random init
    on a stack keeps every trace non-increasing."""
    S = _mixed_stack(70, (10, 10), seed=12).reshape(7, 10, 10, 10)
    one = fit_shared_basis(S, 2, 2, max_iter=15)
    two = fit_shared_basis(S, 2, 2, max_iter=15, n_jobs=2)
    assert one.error.shape == (7, 10) and one.shared[0][0].shape == (7, 10, 5, 2)
    assert one.error_trace.shape[:2] == (7, 10) and one.reconstruction.shape == S.shape
    np.testing.assert_allclose(two.error, one.error, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(two.n_iter, one.n_iter)
    rnd = fit_shared_basis(S, 2, 2, init="random", random_state=0, max_iter=15, tol=0)
    d = np.diff(rnd.error_trace, axis=-1)
    assert np.all(d[~np.isnan(d)] <= STEP_TOL)
    W = one.decoders()
    assert W.shape == (7, 10, 2, 2, 10)
    np.testing.assert_allclose(one.shared[0][0][3, 4] @ W[3, 4, 0], one.reconstruction[3, 4, :5], atol=1e-10)


def test_spd_solve_matches_solve_and_pinv():
    from blocklowrank._linalg import SMALL_STACK, spd_solve

    rng = np.random.default_rng(13)
    n = SMALL_STACK + 40
    W = rng.standard_normal((n, 4, 7))
    W[::5, 3] = W[::5, 0]  # singular Grams on every fifth matrix
    G = W @ W.swapaxes(-1, -2)
    y = rng.standard_normal((n, 7, 2))
    want = np.linalg.pinv(W.swapaxes(-1, -2)) @ y
    for stack in (G, G[:3]):  # the vectorised path and the LAPACK path
        k = len(stack)
        np.testing.assert_allclose(spd_solve(stack, (W @ y)[:k]), want[:k], atol=1e-8)
    assert np.all(spd_solve(np.zeros((n, 3, 3)), np.ones((n, 3, 1))) == 0)

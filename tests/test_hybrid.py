"""Hybrid structure: blocks plus a global low-rank term."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocklowrank import BlockLayout, BlockLowRank, GlobalLowRank, approximate
from blocklowrank._linalg import STEP_TOL
from blocklowrank.budget import match_budget
from blocklowrank.structures import HybridLowRank, fit_hybrid, hybrid_params
from blocklowrank.testing.strategies import layouts, matrices


def _planted(rng, m=24, n=24, K=2, rg=2, rb=1):
    """Exact hybrid: global rank rg + rank-rb on every block of a K x K grid."""
    X = rng.standard_normal((m, rg)) @ rng.standard_normal((rg, n))
    lay = BlockLayout.block((m, n), K, rank=rb)
    for i in range(K):
        for j in range(K):
            rs, cs = lay.block_slice(i, j)
            h, w = lay.block_shape(i, j)
            X[rs, cs] += rng.standard_normal((h, rb)) @ rng.standard_normal((rb, w))
    return X


# ---------------------------------------------------------------------------- counting
@pytest.mark.parametrize(
    "shape, n_blocks, rank, rg, pattern",
    [((28, 28), 2, 1, 2, "full"), ((10, 7), (3, 2), 1, 1, "full"), ((9, 9), 3, 2, 3, "diagonal")],
)
def test_params_exact(shape, n_blocks, rank, rg, pattern):
    m, n = shape
    lay = BlockLayout.from_blocks(shape, n_blocks, rank=rank, pattern=pattern)
    expected = sum(rank * (lay.row_sizes[i] + lay.col_sizes[j]) for i, j in zip(*np.nonzero(lay.active))) + rg * (m + n)
    assert hybrid_params(shape, n_blocks=n_blocks, rank=rank, global_rank=rg, pattern=pattern) == expected
    X = np.random.default_rng(0).standard_normal(shape)
    est = HybridLowRank(n_blocks=n_blocks, rank=rank, global_rank=rg, pattern=pattern).fit(X)
    assert est.n_params_ == expected
    Bg, Ag = est.factors_.global_factors
    counted = Bg.size + Ag.size + sum(B.size + A.size for B, A in est.factors_.values())
    assert counted == expected


def test_ranks_for_budget():
    """The registry's budget rule (through match_budget) agrees with the count."""
    recs = match_budget((28, 28), 224, methods="hybrid", n_blocks=2)
    assert [(r["rank"], r["global_rank"]) for r in recs] == [(1, 2)]
    for budget in (200, 500, 1000):
        for r in match_budget((30, 20), budget, methods="hybrid", n_blocks=3):
            count = hybrid_params((30, 20), n_blocks=3, rank=r["rank"], global_rank=r["global_rank"])
            assert r["rank"] >= 1 and count == r["n_params"] <= budget
    with pytest.raises(ValueError, match="below the cheapest"):
        match_budget((28, 28), 100, methods="hybrid", n_blocks=2)


# ---------------------------------------------------------------------------- monotone trace
@st.composite
def _problems(draw):
    """A layout (full or diagonal, one rank), a Gaussian matrix at three scales, a global rank, a first step."""
    lay = draw(layouts(min_side=2, max_side=16, max_blocks=3, cuts="array_split", uniform_rank=True))
    X = draw(matrices(shape=lay.shape, elements="gaussian", max_abs=draw(st.sampled_from([1.0, 1e-3, 1e4]))))
    return X, lay, draw(st.integers(0, min(lay.shape))), draw(st.sampled_from(["global", "blocks"]))


@settings(max_examples=40, deadline=None)
@given(_problems())
def test_error_trace_never_increases(problem):
    X, lay, rg, init = problem
    res = fit_hybrid(X, lay, rg, first_step=init, max_iter=30, tol=0.0, svd_solver="full")
    tr = res.error_trace
    # the claim: every accepted step keeps or lowers the error (rounding: STEP_TOL)
    assert np.all(np.diff(tr) <= STEP_TOL)
    # ... and with the exact solver no step had to be discarded
    assert res.stop_reason != "increase"
    # the reported error is that of the returned factors
    direct = np.linalg.norm(X - res.reconstruction) / np.linalg.norm(X)
    assert res.error == pytest.approx(direct, rel=1e-9, abs=1e-12)
    assert tr[-1] == res.error
    # never worse than the part fitted first, alone
    if rg and lay.n_params:
        if init == "global":
            alone = approximate(X, method="global", rank=rg, svd_solver="full").error
        else:
            alone = approximate(X, lay, svd_solver="full").error
        assert res.error <= alone + STEP_TOL * (len(tr) + 1)


def test_planted_hybrid_is_recovered():
    X = _planted(np.random.default_rng(1))
    res = fit_hybrid(X, BlockLayout.block(X.shape, 2, rank=1), 2, tol=0, max_iter=1000)
    assert res.error < 1e-8
    assert res.stop_reason == "tol"
    # better than either part alone at its own ranks, and than global LoRA at the same budget
    assert res.error < approximate(X, method="global", rank=2).error
    budget = res.n_params
    assert res.error < approximate(X, method="global", rank=budget // sum(X.shape)).error


def test_randomized_solver_keeps_monotone_trace():
    X = np.random.default_rng(3).standard_normal((40, 30))
    res = fit_hybrid(
        X,
        BlockLayout.block(X.shape, 2, rank=2),
        2,
        svd_solver="randomized",
        random_state=0,
        iterated_power=1,
        n_oversamples=1,
        tol=0,
        max_iter=20,
    )
    assert np.all(np.diff(res.error_trace) <= STEP_TOL)
    assert res.stop_reason in {"tol", "max_iter", "increase"}


def test_global_rank_zero_is_block_structure():
    X = np.random.default_rng(2).standard_normal((20, 14))
    h = HybridLowRank(n_blocks=2, rank=2, global_rank=0).fit(X)
    b = BlockLowRank(n_blocks=2, rank=2).fit(X)
    assert h.error_ == pytest.approx(b.error_, rel=1e-12)
    np.testing.assert_allclose(h.reconstruct(), b.reconstruct(), atol=1e-12)
    assert h.n_params_ == b.n_params_ and h.stop_reason_ == "exact"


def test_one_block_plus_global_is_global_svd():
    # a 1x1 grid of rank r plus global rank g: the best rank r+g approximation
    X = np.random.default_rng(4).standard_normal((15, 12))
    h = HybridLowRank(n_blocks=1, rank=2, global_rank=1, tol=0, max_iter=200).fit(X)
    g = GlobalLowRank(rank=3).fit(X)
    assert h.error_ == pytest.approx(g.error_, rel=1e-6)


# ---------------------------------------------------------------------------- estimator
def test_codes_reconstruct_the_approximation():
    X = np.random.default_rng(5).standard_normal((28, 28))
    est = HybridLowRank(n_blocks=2, rank=1, global_rank=2)
    Z = est.fit_transform(X)
    assert Z.shape == (28, 2 + 2) and est.n_codes_ == 4
    np.testing.assert_allclose(est.reconstruct(Z), est.reconstruct(), atol=1e-12)
    np.testing.assert_allclose(est.inverse_transform(Z), est.reconstruct(), atol=1e-12)
    # transform of the fitted rows gives the same (least-squares) codes
    np.testing.assert_allclose(est.transform(X), Z, atol=1e-10)
    # the first r_g columns are the global codes
    np.testing.assert_allclose(Z[:, :2], est.factors_.global_factors[0], atol=1e-12)
    np.testing.assert_allclose(Z[14:, 3:4], est.factors_[(1, 1)][0], atol=1e-12)
    assert est.score(X) == pytest.approx(-est.error_, rel=1e-9)
    Bg, Ag = est.factors_.global_factors
    dense = Bg @ Ag
    for (i, j), (B, A) in est.factors_.items():
        rs, cs = est.layout_.block_slice(i, j)
        dense[rs, cs] += B @ A
    np.testing.assert_allclose(dense, est.reconstruct(), atol=1e-12)


def test_diagonal_pattern_and_uneven_codes():
    X = np.random.default_rng(6).standard_normal((11, 9))
    est = HybridLowRank(n_blocks=3, rank=np.diag([1, 2, 1]), global_rank=1, pattern="diagonal")
    Z = est.fit_transform(X)
    assert est.n_codes_ == 1 + 2
    assert est.ranks_.tolist() == [[1, 0, 0], [0, 2, 0], [0, 0, 1]]
    np.testing.assert_allclose(est.reconstruct(Z), est.reconstruct(), atol=1e-12)
    assert np.all(np.diff(est.error_trace_) <= STEP_TOL)
    assert len(est.get_feature_names_out()) == 3


def test_float32_preserved():
    X = np.random.default_rng(7).standard_normal((16, 12)).astype(np.float32)
    est = HybridLowRank(n_blocks=2, rank=1, global_rank=1)
    Z = est.fit_transform(X)
    assert Z.dtype == np.float32 and est.transform(X).dtype == np.float32
    assert est.reconstruct().dtype == np.float32
    assert est.factors_.global_factors[0].dtype == np.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_blocks=2, rank=1, global_rank=20), "global_rank=20 exceeds"),
        (dict(n_blocks=2, rank=9, global_rank=1), "exceeds the block's smaller side"),
        (dict(n_blocks=(2, 3), pattern="diagonal"), "square grid"),
        (dict(n_blocks=20), "block-rows"),
    ],
)
def test_errors(kwargs, match):
    X = np.random.default_rng(8).standard_normal((16, 12))
    with pytest.raises(ValueError, match=match):
        HybridLowRank(**kwargs).fit(X)


def test_fit_hybrid_argument_errors():
    X = np.ones((6, 6))
    lay = BlockLayout.block((6, 6), 2, rank=1)
    with pytest.raises(ValueError, match="both parts are empty"):
        fit_hybrid(X, BlockLayout.block((6, 6), 2), 0)
    with pytest.raises(ValueError, match="layout is for shape"):
        fit_hybrid(np.ones((5, 6)), lay, 1)
    with pytest.raises(ValueError, match="first_step"):
        fit_hybrid(X, lay, 1, first_step="nope")
    with pytest.raises(ValueError, match="tol"):
        fit_hybrid(X, lay, 1, tol=-1)


def test_zero_matrix():
    res = fit_hybrid(np.zeros((6, 6)), BlockLayout.block((6, 6), 2, rank=1), 1)
    assert res.error == 0.0 and np.all(res.reconstruction == 0)


# ---------------------------------------------------------------------------- stacks
@pytest.mark.parametrize(
    "grid, rank, rg, pattern, init",
    [
        (2, 1, 2, "full", "global"),
        ((3, 2), 1, 1, "full", "blocks"),
        (3, 2, 1, "diagonal", "global"),
        (2, 1, 0, "full", "global"),
        (2, 0, 2, "full", "global"),
    ],
)
def test_stack_equals_per_matrix_fits(grid, rank, rg, pattern, init):
    """A stack is fitted matrix by matrix within one alternation: each matrix gets the
    error, passes, stop reason, trace and factors of its own fit; traces never increase."""
    rng = np.random.default_rng(21)
    S = np.stack(
        [_planted(rng, 12, 13, K=2, rg=1, rb=1) + 0.3 * rng.standard_normal((12, 13)) for _ in range(9)]
        + [np.zeros((12, 13))]
    )
    lay = BlockLayout.from_blocks((12, 13), grid, rank=rank, pattern=pattern)
    batch = fit_hybrid(S, lay, rg, first_step=init, max_iter=25, svd_solver="full")
    assert batch.error.shape == (10,) and batch.reconstruction.shape == S.shape
    assert batch.global_factors[0].shape == (10, 12, rg)
    for t in range(len(S)):
        one = fit_hybrid(S[t], lay, rg, first_step=init, max_iter=25, svd_solver="full")
        assert batch.error[t] == pytest.approx(one.error, rel=1e-10, abs=1e-13)
        assert batch.n_iter[t] == one.n_iter and batch.stop_reason[t] == one.stop_reason
        tr = batch.error_trace[t]
        k = len(one.error_trace)
        assert np.all(np.isnan(tr[k:]))
        np.testing.assert_allclose(tr[:k], one.error_trace, rtol=1e-10, atol=1e-13)
        assert np.all(np.diff(tr[:k]) <= STEP_TOL)
        np.testing.assert_allclose(batch.reconstruction[t], one.reconstruction, atol=1e-10)
        for key, (B, A) in one.factors.items():
            np.testing.assert_allclose(batch.factors[key][0][t] @ batch.factors[key][1][t], B @ A, atol=1e-10)
    nx = np.linalg.norm(S, axis=(1, 2))
    direct = np.where(nx > 0, np.linalg.norm(S - batch.reconstruction, axis=(1, 2)) / np.where(nx > 0, nx, 1), 0)
    np.testing.assert_allclose(batch.error, direct, rtol=1e-9, atol=1e-12)


def test_stack_leading_dimensions():
    S = np.random.default_rng(22).standard_normal((2, 3, 8, 8)).astype(np.float32)
    res = fit_hybrid(S, BlockLayout.block((8, 8), 2, rank=1), 1, max_iter=5)
    assert res.error.shape == (2, 3) and res.n_iter.shape == (2, 3)
    assert res.reconstruction.shape == S.shape and res.reconstruction.dtype == np.float32
    assert res.decoders().shape == (2, 3, 2, 3, 8)

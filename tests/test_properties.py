"""Property tests: each test names the claim it checks in its docstring.

Reference values come from an independent computation in ``_reference.py``:
blocks cut with ``np.array_split`` (or from sizes the test chose), one
``np.linalg.svd`` per block in a plain loop. Nothing is compared against the
code under test itself.
"""

import numpy as np
import pytest

pytest.importorskip("hypothesis")
import _reference as ref  # noqa: E402
from hypothesis import assume, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from blocklowrank import BlockLayout, BlockLowRank, DiagonalBlockLowRank, GlobalLowRank, approximate, batched_svd  # noqa: E402
from blocklowrank.testing.generators import planted_matrix  # noqa: E402
from blocklowrank.testing.strategies import layouts, matrices, planted_matrices  # noqa: E402

ESTIMATORS = {"global": GlobalLowRank, "diagonal": DiagonalBlockLowRank, "block": BlockLowRank}


def _close(a, b, scale, rtol=1e-9):
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(scale, 1e-300))


def _fro(X):
    return float(np.linalg.norm(np.asarray(X, dtype=np.float64)))


# ---------------------------------------------------------------------------- strategies
@st.composite
def matrix_and_grid(draw, *, max_side=10, max_blocks=3, elements="floats", square_grid=False):
    """A matrix, a grid (K_rows, K_cols) that fits it, and a rank every block can hold."""
    X = draw(matrices(min_side=1, max_side=max_side, elements=elements))
    options = dict(patterns=("full",), cuts="array_split", square_grid=square_grid, uniform_rank=True)
    lay = draw(layouts(X.shape, max_blocks=max_blocks, **options))
    return X, lay.n_blocks, lay.uniform_rank


def _gapped(s, r, rel=1e-6):
    """True if the truncation at rank r is unique (s_r > s_{r+1} by a margin)."""
    return r >= len(s) or s[r - 1] - s[r] > rel * max(s[0], 1e-300)


# ---------------------------------------------------------------------------- K = 1 / N = 1
@given(matrix_and_grid(max_blocks=1, elements="gaussian"))
def test_one_block_is_global(case):
    """Claim: the block structure with K=1 and the diagonal structure with N=1 are the
    global truncated SVD (engine and estimators), equal to an independent SVD."""
    X, _, r = case
    s = np.linalg.svd(X, compute_uv=False)
    assume(_gapped(s, r))
    expected, _ = ref.block_svd_loop(X, [slice(None)], [slice(None)], ref.full_mask(1, 1), r)
    scale = _fro(X)
    g = approximate(X, method="global", rank=r, svd_solver="full").reconstruction
    b = approximate(X, method="block", n_blocks=1, rank=r, svd_solver="full").reconstruction
    d = approximate(X, method="diagonal", n_blocks=1, rank=r, svd_solver="full").reconstruction
    for Y in (g, b, d):
        _close(Y, expected, scale)
    est = {
        name: cls(rank=r, svd_solver="full", **({} if name == "global" else {"n_blocks": 1}))
        for name, cls in ESTIMATORS.items()
    }
    Z = {name: e.fit_transform(X) for name, e in est.items()}
    for name, e in est.items():
        _close(e.reconstruct(), expected, scale)
        _close(Z[name], Z["global"], scale)
        _close(e.transform(X), Z["global"], scale)
        assert e.n_params_ == r * sum(X.shape)


# ---------------------------------------------------------------------------- Eckart-Young
@given(matrices(max_side=10), st.data())
def test_global_error_is_discarded_energy(X, data):
    """Claim (Eckart-Young): the global rank-r error is sqrt(sum_{k>r} s_k^2) / ||X||,
    it is the error of the returned reconstruction, and no rank-r factorisation B A
    (random B, best A for it) does better."""
    r = data.draw(st.integers(1, min(X.shape)), label="rank")
    s = np.linalg.svd(X.astype(np.float64), compute_uv=False)
    nx = _fro(X)
    expected = 0.0 if nx == 0 else float(np.sqrt(np.sum(s[r:] ** 2)) / nx)
    res = approximate(X, method="global", rank=r, svd_solver="full")
    assert res.error == pytest.approx(expected, abs=1e-9)
    assert ref.rel_error(X, res.reconstruction) == pytest.approx(expected, abs=1e-9)
    est = GlobalLowRank(rank=r, svd_solver="full").fit(X)
    assert est.error_ == pytest.approx(expected, abs=1e-9)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    for _ in range(3):
        B = rng.standard_normal((X.shape[0], r))
        A = np.linalg.lstsq(B, X, rcond=None)[0]  # the best A for this B
        assert ref.rel_error(X, B @ A) >= expected - 1e-9
        A = rng.standard_normal((r, X.shape[1]))
        assert ref.rel_error(X, B @ A) >= expected - 1e-9


# ---------------------------------------------------------------------------- block vs diagonal
@given(matrix_and_grid(square_grid=True))
def test_block_never_worse_than_diagonal(case):
    """Claim: on the same K x K partition and rank, the full block structure's error is
    <= the diagonal structure's (the diagonal layout is the block layout with the
    off-diagonal blocks forced to zero); both equal the plain-loop reference."""
    X, (k, _), r = case
    m, n = X.shape
    rc, cc = ref.cuts(m, k), ref.cuts(n, k)
    blk = approximate(X, method="block", n_blocks=k, rank=r, svd_solver="full")
    dia = approximate(X, method="diagonal", n_blocks=k, rank=r, svd_solver="full")
    assert blk.error <= dia.error + 1e-12
    ref_blk = ref.rel_error(X, ref.block_svd_loop(X, rc, cc, ref.full_mask(k, k), r)[0])
    ref_dia = ref.rel_error(X, ref.block_svd_loop(X, rc, cc, ref.diag_mask(k), r)[0])
    assert blk.error == pytest.approx(ref_blk, abs=1e-9)
    assert dia.error == pytest.approx(ref_dia, abs=1e-9)
    eb = BlockLowRank(n_blocks=k, rank=r, svd_solver="full").fit(X).error_
    ed = DiagonalBlockLowRank(n_blocks=k, rank=r, svd_solver="full").fit(X).error_
    assert eb <= ed + 1e-12


# ---------------------------------------------------------------------------- monotone in rank
@pytest.mark.parametrize("structure", ["global", "diagonal", "block"])
@given(case=matrix_and_grid(square_grid=True))
def test_error_never_grows_with_rank(structure, case):
    """Claim: for each structure, the error is non-increasing in the (uniform) rank,
    up to the full rank where it is 0 (ranks capped per block with cap_rank=True)."""
    X, (k, _), _ = case
    kw = {} if structure == "global" else {"n_blocks": k}
    top = min(X.shape)  # past every block's smaller side: cap_rank lowers it per block
    errors = [
        approximate(X, method=structure, rank=r, cap_rank=True, svd_solver="full", **kw).error
        for r in range(1, top + 1)
    ]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors
    if structure != "diagonal":
        assert errors[-1] <= 1e-7
    est_errors = [ESTIMATORS[structure](rank=r, cap_rank=True, svd_solver="full", **kw).fit(X).error_ for r in (1, top)]
    assert est_errors[1] <= est_errors[0] + 1e-12


@given(case=matrix_and_grid(max_side=8))
def test_error_never_grows_with_budget(case):
    """Claim: the budget-optimal error is non-increasing in the budget."""
    X, grid, _ = case
    m, n = X.shape
    cheapest = min(s.stop - s.start for s in ref.cuts(m, grid[0])) + min(s.stop - s.start for s in ref.cuts(n, grid[1]))
    budgets = range(cheapest, cheapest + 3 * (m + n), max(1, (m + n) // 3))
    errors = [approximate(X, method="block", n_blocks=grid, budget=p).error for p in budgets]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors


# ---------------------------------------------------------------------------- codes round trip
@pytest.mark.parametrize("structure", ["global", "diagonal", "block"])
@given(case=matrix_and_grid(elements="gaussian", square_grid=True))
def test_reconstruct_of_transform_is_the_approximation(structure, case):
    """Claim: reconstruct(transform(X)) and inverse_transform(fit_transform(X)) are the
    fitted approximation, which is the plain-loop per-block truncated SVD."""
    X, (k, _), r = case
    m, n = X.shape
    kw = {} if structure == "global" else {"n_blocks": k}
    kk = 1 if structure == "global" else k
    rc, cc = ref.cuts(m, kk), ref.cuts(n, kk)
    mask = ref.diag_mask(kk) if structure == "diagonal" else ref.full_mask(kk, kk)
    expected, spectra = ref.block_svd_loop(X, rc, cc, mask, r)
    assume(all(_gapped(s, r) for s in spectra.values()))
    scale = _fro(X)
    est = ESTIMATORS[structure](rank=r, svd_solver="full", **kw)
    Z = est.fit_transform(X)
    X_hat = est.reconstruct()
    _close(X_hat, expected, scale)
    _close(est.reconstruct(est.transform(X)), X_hat, scale, rtol=1e-12)
    _close(est.inverse_transform(Z), X_hat, scale, rtol=1e-13)
    _close(est.transform(X), Z, scale, rtol=1e-12)
    res = approximate(X, method=structure, rank=r, svd_solver="full", **kw)
    _close(res.reconstruction, expected, scale)


# ---------------------------------------------------------------------------- budget allocation
def _brute_force_best(X, rc, cc, mask, budget):
    gains, inactive, total = ref.spectra_and_energies(X, rc, cc, mask)
    best = np.inf
    for ranks in ref.all_rank_tuples(rc, cc, mask):
        if ref.n_params(rc, cc, ranks) <= budget:
            best = min(best, ref.error_from_spectra(gains, inactive, total, ranks))
    return best, gains, inactive, total


@st.composite
def tiny_budget_case(draw, uneven):
    """A tiny matrix (<= 6 x 6) and a K x K grid: equal blocks (K <= 2 dividing both
    sides) or uneven ones (K = 2 and an odd number of rows, so block costs differ)."""
    if uneven:
        k = 2
        m = draw(st.sampled_from([3, 5]))
        n = draw(st.integers(2, 6))
    else:
        k = draw(st.integers(1, 2))
        m = k * draw(st.integers(1, 6 // k))
        n = k * draw(st.integers(1, 6 // k))
    X = draw(matrices(shape=(m, n), elements=draw(st.sampled_from(["floats", "gaussian"]))))
    pattern = draw(st.sampled_from(["full", "diagonal"]))
    rc, cc = ref.cuts(m, k), ref.cuts(n, k)
    mask = ref.full_mask(k, k) if pattern == "full" else ref.diag_mask(k)
    cheapest = min(
        (rc[i].stop - rc[i].start) + (cc[j].stop - cc[j].start) for i in range(k) for j in range(k) if mask[i, j]
    )
    budget = draw(st.integers(cheapest, 2 * (m + n) + 2))
    return X, k, pattern, rc, cc, mask, budget


@pytest.mark.parametrize("uneven", [False, True], ids=["equal-blocks", "uneven-blocks"])
@given(data=st.data())
def test_budget_allocation_equals_brute_force(uneven, data):
    """Claim: the budget-optimal allocation reaches the smallest error over every
    per-block rank tuple whose count is <= budget (enumerated here), and spends at
    most the budget."""
    X, k, pattern, rc, cc, mask, budget = data.draw(tiny_budget_case(uneven))
    best, gains, inactive, total = _brute_force_best(X, rc, cc, mask, budget)
    method = "block" if pattern == "full" else "diagonal"
    res = approximate(X, method=method, n_blocks=k, budget=budget)
    assert res.n_params <= budget
    got = {(i, j): int(res.ranks[i, j]) for (i, j) in gains}
    assert ref.n_params(rc, cc, got) == res.n_params
    assert ref.error_from_spectra(gains, inactive, total, got) == pytest.approx(best, abs=1e-9)
    assert res.error == pytest.approx(best, abs=1e-9)
    est = (BlockLowRank if pattern == "full" else DiagonalBlockLowRank)(n_blocks=k, budget=budget)
    assert est.fit(X).error_ == pytest.approx(best, abs=1e-9)


@given(data=st.data())
def test_budget_allocation_never_worse_than_uniform(data):
    """Claim: at the parameter count of a uniform rank r, the budget-optimal allocation's
    error is <= the uniform allocation's (equal and uneven blocks, full and diagonal)."""
    X = data.draw(matrices(min_side=2, max_side=12))
    (m, n), lay = (
        X.shape,
        data.draw(layouts(X.shape, max_blocks=3, cuts="array_split", square_grid=True, uniform_rank=True)),
    )
    k, r, pattern = lay.n_blocks[0], lay.uniform_rank, "diagonal" if lay.pattern == "diagonal" else "block"
    rc, cc = ref.cuts(m, k), ref.cuts(n, k)
    mask = ref.full_mask(k, k) if pattern == "block" else ref.diag_mask(k)
    uniform = {(i, j): r for i in range(k) for j in range(k) if mask[i, j]}
    count = ref.n_params(rc, cc, uniform)
    gains, inactive, total = ref.spectra_and_energies(X, rc, cc, mask)
    e_uniform = ref.error_from_spectra(gains, inactive, total, uniform)
    res = approximate(X, method=pattern, n_blocks=k, budget=count)
    assert res.n_params <= count
    assert res.error <= e_uniform + 1e-9
    assert approximate(X, method=pattern, n_blocks=k, rank=r).n_params == count


# ---------------------------------------------------------------------------- batched engine vs loop
@given(layouts(max_side=12, max_blocks=3), st.integers(0, 2**32 - 1), st.sampled_from([(), (2,), (2, 3)]))
def test_engine_equals_plain_loop(layout, seed, batch):
    """Claim: the batched engine equals a plain per-block loop of np.linalg.svd on any
    layout (uneven cuts, K_rows x K_cols grids, diagonal, per-block ranks) and on
    stacks (..., m, n): the reconstruction, every product B_ij A_ij, and the full
    spectrum of every block."""
    m, n = layout.shape
    X = np.random.default_rng(seed).standard_normal(batch + (m, n))
    rc, cc = ref.cuts_from_sizes(layout.row_sizes), ref.cuts_from_sizes(layout.col_sizes)
    ranks = np.array(layout.ranks)
    mask = np.array(layout.active)
    res = approximate(X, layout, svd_solver="full")
    assert res.reconstruction.shape == X.shape
    factors = res.factors
    spectra_got = res.singular_values
    for idx in np.ndindex(*batch):
        Xi = X[idx]
        expected, spectra = ref.block_svd_loop(Xi, rc, cc, mask, ranks)
        assume(all(_gapped(s, int(ranks[b])) for b, s in spectra.items()))
        scale = _fro(Xi)
        _close(res.reconstruction[idx], expected, scale)
        err = res.error if not batch else res.error[idx]
        assert err == pytest.approx(ref.rel_error(Xi, expected), abs=1e-9)
        for (i, j), s in spectra.items():
            np.testing.assert_allclose(spectra_got[(i, j)][idx], s, rtol=1e-10, atol=1e-12 * s[0])
            B, A = factors[(i, j)]
            _close(B[idx] @ A[idx], expected[rc[i], cc[j]], scale)
            # sign convention: the largest-magnitude entry of each row of A is positive
            Ai = A[idx]
            if Ai.shape[0]:
                top = Ai[np.arange(Ai.shape[0]), np.argmax(np.abs(Ai), axis=1)]
                assert np.all(top > 0)
    if batch:
        np.testing.assert_array_equal(res.ranks.shape, batch + layout.n_blocks)


@given(layouts(max_side=10, min_rank=0), matrices(max_side=10), st.data())
def test_reported_error_is_the_reconstruction_error(layout, X, data):
    """Claim: the error reported by approximate (and error_ of the estimators) is
    ||X - X_hat||_F / ||X||_F of the returned reconstruction, for any per-block ranks
    (zeros included) and for budget allocations."""
    m, n = layout.shape
    X = np.resize(X, (m, n))
    assume(layout.n_params > 0)
    res = approximate(X, layout, svd_solver="full")
    assert res.error == pytest.approx(ref.rel_error(X, res.reconstruction), abs=1e-9)
    assert np.sqrt(res.discarded_energy) == pytest.approx(_fro(X - res.reconstruction), abs=1e-9 * max(1, _fro(X)))
    budget = data.draw(st.integers(int(layout.block_costs[layout.active].min()), 3 * (m + n)))
    res = approximate(X, layout, budget=budget)
    assert res.n_params <= budget
    assert res.error == pytest.approx(ref.rel_error(X, res.reconstruction), abs=1e-9)
    # the estimators: array_split cuts of the same grid
    kr, kc = layout.n_blocks
    cheapest = min(s.stop - s.start for s in ref.cuts(m, kr)) + min(s.stop - s.start for s in ref.cuts(n, kc))
    est = BlockLowRank(n_blocks=(kr, kc), budget=max(budget, cheapest)).fit(X)
    assert est.error_ == pytest.approx(ref.rel_error(X, est.reconstruct()), abs=1e-9)
    if layout.active.all():
        est = BlockLowRank(n_blocks=(kr, kc), rank=np.array(layout.ranks), cap_rank=True).fit(X)
        assert est.error_ == pytest.approx(ref.rel_error(X, est.reconstruct()), abs=1e-9)


@given(matrices(elements="gaussian", max_side=10, batch_shape=st.sampled_from([(), (3,), (2, 2)])), st.data())
def test_batched_svd_equals_loop(A, data):
    """Claim: batched_svd on a stack equals np.linalg.svd matrix by matrix (singular
    values, rank-k products) and follows the svd_flip(u_based_decision=False) signs."""
    k = data.draw(st.integers(1, min(A.shape[-2:])))
    U, s, Vt = batched_svd(A, k)
    assert U.shape == A.shape[:-1] + (k,) and s.shape == A.shape[:-2] + (k,)
    assert Vt.shape == A.shape[:-2] + (k, A.shape[-1])
    for idx in np.ndindex(*A.shape[:-2]):
        u, sv, vt = np.linalg.svd(A[idx], full_matrices=False)
        np.testing.assert_allclose(s[idx], sv[:k], rtol=1e-10)
        if _gapped(sv, k, 1e-6) and np.all(-np.diff(sv[: k + 1]) > 1e-6 * sv[0]):
            _close((U[idx] * s[idx]) @ Vt[idx], (u[:, :k] * sv[:k]) @ vt[:k], _fro(A[idx]))
            # each singular pair equals LAPACK's up to the documented sign flip
            for t in range(k):
                sign = np.sign(vt[t, np.argmax(np.abs(vt[t]))])
                np.testing.assert_allclose(Vt[idx][t], sign * vt[t], atol=1e-8)
                np.testing.assert_allclose(U[idx][:, t], sign * u[:, t], atol=1e-8)


# ---------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("solver", ["full", "randomized"])
@given(layout=layouts(max_side=12), seed=st.integers(0, 2**32 - 1))
def test_float32_in_float32_out(solver, layout, seed):
    """Claim: float32 input gives float32 output everywhere (engine reconstruction,
    factors and spectra; batched_svd; estimators' fit_transform, transform,
    inverse_transform and reconstruct), with float32 accuracy."""
    X = np.random.default_rng(seed).standard_normal(layout.shape).astype(np.float32)
    res = approximate(X, layout, svd_solver=solver, random_state=0, n_oversamples=1)
    assert res.reconstruction.dtype == np.float32
    for B, A in res.factors.values():
        assert B.dtype == np.float32 and A.dtype == np.float32
    for s in res.singular_values.values():
        assert s.dtype == np.float32
    U, s, Vt = batched_svd(X[None], 1, svd_solver=solver, random_state=0)
    assert U.dtype == s.dtype == Vt.dtype == np.float32
    kr, kc = layout.n_blocks
    r = int(layout.max_ranks[layout.active].min())
    if layout.pattern == "diagonal" and kr > 1:
        est = DiagonalBlockLowRank(n_blocks=kr, rank=r, svd_solver=solver, random_state=0)
    else:
        est = BlockLowRank(n_blocks=(kr, kc), rank=r, svd_solver=solver, random_state=0)
    Z = est.fit_transform(X)
    assert Z.dtype == np.float32
    assert est.transform(X).dtype == np.float32
    assert est.inverse_transform(Z).dtype == np.float32
    assert est.reconstruct().dtype == np.float32
    assert est.reconstruct(Z).dtype == np.float32
    g = GlobalLowRank(rank=1, svd_solver=solver, random_state=0).fit(X)
    assert g.transform(X).dtype == g.reconstruct().dtype == g.components_.dtype == np.float32
    if solver == "full":
        rc, cc = ref.cuts_from_sizes(layout.row_sizes), ref.cuts_from_sizes(layout.col_sizes)
        expected, spectra = ref.block_svd_loop(X, rc, cc, np.array(layout.active), np.array(layout.ranks))
        if all(_gapped(s, int(layout.ranks[b]), 1e-2) for b, s in spectra.items()):
            _close(res.reconstruction, expected, _fro(X), rtol=1e-4)


# ---------------------------------------------------------------------------- counts
@given(layouts(max_side=40, max_blocks=5, cuts="array_split"))
def test_counts_match_the_formula(layout):
    """Claim: the parameter count is sum over active blocks of r_ij (m_i + n_j), with
    array_split cuts computed here, for the layout, the engine, the estimators and
    the sizes of the returned factors."""
    m, n = layout.shape
    kr, kc = layout.n_blocks
    rc, cc = ref.cuts(m, kr), ref.cuts(n, kc)
    ranks = {(i, j): int(layout.ranks[i, j]) for i in range(kr) for j in range(kc) if layout.active[i, j]}
    expected = ref.n_params(rc, cc, ranks)
    assert layout.n_params == expected
    X = np.ones((m, n)) + np.arange(m * n).reshape(m, n) % 7
    res = approximate(X, layout, svd_solver="full")
    assert res.n_params == expected
    assert sum(B.size + A.size for B, A in res.factors.values()) == expected
    if layout.pattern == "diagonal" and kr > 1:
        est = DiagonalBlockLowRank(n_blocks=kr, rank=np.array(layout.ranks), svd_solver="full")
    else:
        est = BlockLowRank(n_blocks=(kr, kc), rank=np.array(layout.ranks), svd_solver="full")
    assert est.fit(X).n_params_ == expected
    u = layout.uniform_rank
    if u is not None and layout.active.all():
        assert BlockLayout.block((m, n), (kr, kc), rank=u).n_params == u * (kc * m + kr * n)


def test_paper_counts():
    """Claim (paper): d=256, r=16, N=4 gives LoRA 8192, MELoRA 2048 (r_diag = r/N = 4),
    Localized 2048 (K=2, r_block=2); and all three cost 224 on 28 x 28 at budget 2rd, r=4."""
    assert BlockLayout.global_((256, 256), 16).n_params == 8192 == 2 * 256 * 16
    assert BlockLayout.diagonal((256, 256), 4, 4).n_params == 2048
    assert BlockLayout.block((256, 256), 2, 2).n_params == 2048
    Y = np.random.default_rng(0).standard_normal((28, 28))
    assert approximate(Y, method="global", rank=4).n_params == 224
    assert GlobalLowRank(rank=4).fit(Y).n_params_ == 224
    assert DiagonalBlockLowRank(n_blocks=4, rank=4).fit(Y).n_params_ == 224
    assert BlockLowRank(n_blocks=2, rank=2).fit(Y).n_params_ == 224


# ---------------------------------------------------------------------------- tol
@st.composite
def tol_case(draw, uneven):
    k = draw(st.integers(1, 2))
    if uneven:
        m, n = draw(st.integers(max(k, 1), 7)), draw(st.integers(max(k, 1), 7))
    else:
        m, n = k * draw(st.integers(1, 6 // k)), k * draw(st.integers(1, 6 // k))
    X = draw(matrices(shape=(m, n), elements=draw(st.sampled_from(["floats", "gaussian"]))))
    assume(np.any(X != 0))
    pattern = draw(st.sampled_from(["block", "diagonal"]))
    tol = draw(st.floats(0.01, 0.99))
    return X, k, pattern, tol


@pytest.mark.parametrize("uneven", [False, True], ids=["equal-blocks", "uneven-blocks"])
@given(data=st.data())
def test_tol_reaches_tol_with_fewest_parameters(uneven, data):
    """Claim: with tol, the chosen configuration's error (recomputed here from its ranks)
    is <= tol; with equal-sized blocks no rank tuple with fewer parameters (all of them
    enumerated here) reaches tol. A tol that the inactive blocks alone exceed raises."""
    X, k, pattern, tol = data.draw(tol_case(uneven))
    m, n = X.shape
    rc, cc = ref.cuts(m, k), ref.cuts(n, k)
    mask = ref.full_mask(k, k) if pattern == "block" else ref.diag_mask(k)
    gains, inactive, total = ref.spectra_and_energies(X, rc, cc, mask)
    if np.sqrt(inactive / total) > tol * (1 + 1e-9):
        with pytest.raises(ValueError, match="max_error"):
            approximate(X, method=pattern, n_blocks=k, max_error=tol)
        return
    assume(np.sqrt(inactive / total) < tol * (1 - 1e-9))
    res = approximate(X, method=pattern, n_blocks=k, max_error=tol)
    got = {b: int(res.ranks[b]) for b in gains}
    err = ref.error_from_spectra(gains, inactive, total, got)
    assert err <= tol * (1 + 1e-9)
    assert res.error <= tol * (1 + 1e-9)
    assert ref.n_params(rc, cc, got) == res.n_params
    if not uneven:
        for ranks in ref.all_rank_tuples(rc, cc, mask):
            if ref.n_params(rc, cc, ranks) < res.n_params:
                assert ref.error_from_spectra(gains, inactive, total, ranks) > tol * (1 - 1e-9), ranks


# ---------------------------------------------------------------------------- sklearn
@st.composite
def separated_matrix(draw):
    """m x n with singular values 10 * 0.6^k: well separated gaps (ratio 0.6)."""
    m, n = draw(st.integers(3, 25)), draw(st.integers(3, 25))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    L = min(m, n)
    U = np.linalg.qr(rng.standard_normal((m, L)))[0]
    V = np.linalg.qr(rng.standard_normal((n, L)))[0]
    s = 10 * 0.6 ** np.arange(L)
    return (U * s) @ V.T


@given(separated_matrix(), st.data())
def test_global_transform_equals_truncated_svd(X, data):
    """Claim: GlobalLowRank(svd_solver="full").transform equals scikit-learn's
    TruncatedSVD(algorithm="arpack", tol=0).transform directly (same sign
    convention, svd_flip(u_based_decision=False)); components_ agree too."""
    from sklearn.decomposition import TruncatedSVD

    k = data.draw(st.integers(1, min(X.shape) - 1))
    tsvd = TruncatedSVD(n_components=k, algorithm="arpack", tol=0.0, random_state=0).fit(X)
    est = GlobalLowRank(rank=k, svd_solver="full").fit(X)
    scale = _fro(X)
    np.testing.assert_allclose(est.components_, tsvd.components_, atol=1e-8)
    _close(est.transform(X), tsvd.transform(X), scale, rtol=1e-8)
    _close(est.fit_transform(X), tsvd.transform(X), scale, rtol=1e-8)
    _close(est.inverse_transform(est.transform(X)), tsvd.inverse_transform(tsvd.transform(X)), scale, rtol=1e-8)


# ---------------------------------------------------------------------------- randomized solver
@given(
    planted_matrices(structures=("global",), min_side=14, max_side=40, max_rank=3, noise=1e-6),
    st.integers(0, 2**31 - 1),
)
def test_randomized_recovers_exact_low_rank(planted, seed):
    """Claim: on a matrix of exact low rank r (plus 1e-6 relative noise), the randomized
    solver at rank r has the exact solver's error within 1e-6 (never below it), and is
    deterministic for a fixed random_state."""
    X, info = planted
    r = info.layout.uniform_rank
    exact = approximate(X, method="global", rank=r, svd_solver="full")
    rnd = approximate(X, method="global", rank=r, svd_solver="randomized", random_state=seed, n_oversamples=2)
    assert set(rnd.svd_solver.values()) == {"randomized"}
    assert rnd.error >= exact.error - 1e-12
    assert rnd.error <= exact.error + 1e-6
    assert ref.rel_error(X, rnd.reconstruction) == pytest.approx(rnd.error, abs=1e-9)
    again = approximate(X, method="global", rank=r, svd_solver="randomized", random_state=seed, n_oversamples=2)
    np.testing.assert_array_equal(again.reconstruction, rnd.reconstruction)
    e1 = GlobalLowRank(rank=r, svd_solver="randomized", random_state=seed, n_oversamples=2).fit(X)
    e2 = GlobalLowRank(rank=r, svd_solver="randomized", random_state=seed, n_oversamples=2).fit(X)
    np.testing.assert_array_equal(e1.transform(X), e2.transform(X))
    assert e1.error_ <= exact.error + 1e-6


@given(st.integers(0, 2**31 - 1), st.sampled_from([(2, 2), (2, 3), (3, 2)]), st.integers(1, 2))
def test_randomized_recovers_planted_blocks(seed, grid, r):
    """Claim: the same holds block by block: on a planted K_rows x K_cols block matrix of
    rank r per block (plus 1e-6 noise), BlockLowRank(svd_solver="randomized") at rank r
    has the exact error within 1e-6, deterministically for a fixed random_state."""
    X, info = planted_matrix((30, 36), structure="block", n_blocks=grid, rank=r, noise=1e-6, random_state=seed)
    exact = approximate(X, method="block", n_blocks=grid, rank=r, svd_solver="full")
    kw = dict(n_blocks=grid, rank=r, svd_solver="randomized", random_state=seed, n_oversamples=2)
    e1, e2 = BlockLowRank(**kw).fit(X), BlockLowRank(**kw).fit(X)
    del kw["n_blocks"]
    res = approximate(X, method="block", n_blocks=grid, **kw)
    assert set(res.svd_solver.values()) == {"randomized"}
    assert res.error == pytest.approx(e1.error_, abs=1e-12)
    assert exact.error - 1e-12 <= e1.error_ <= exact.error + 1e-6
    np.testing.assert_array_equal(e1.reconstruct(), e2.reconstruct())


@given(
    matrices(min_side=4, max_side=40),
    st.sampled_from([1, 2, 3]),
    st.sampled_from([1, 2, 4]),
    st.sampled_from([np.float64, np.float32]),
    st.integers(0, 2**31 - 1),
)
def test_randomized_error_is_the_error_of_its_reconstruction(X, K, r, dtype, seed):
    """Claim: the error reported by the randomized solver (computed as ||A||^2 - sum s^2 per
    block, the factors being a projection of the block, or from the residual where that
    difference is near rounding) equals ||X - X_hat||_F / ||X||_F computed independently from
    the reconstruction, on any matrix (flat, low-rank or zero) and in float32 too."""
    X = X.astype(dtype)
    K = min(K, *X.shape)
    lay = BlockLayout.block(X.shape, K)
    r = min(r, int(lay.max_ranks[lay.active].min()))
    res = approximate(
        X, method="block", n_blocks=K, rank=r, svd_solver="randomized", random_state=seed, n_oversamples=2
    )
    want = ref.rel_error(X.astype(np.float64), res.reconstruction.astype(np.float64))
    tol = 1e-9 if dtype == np.float64 else 2e-3 * max(want, 1e-2)
    assert res.error == pytest.approx(want, abs=tol)

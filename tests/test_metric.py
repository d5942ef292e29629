"""Fits in a data metric (``blocklowrank._metric``): each test states the claim it checks.

The objective is ``f(M) = tr(H (W - M) G (W - M)^T)``. References are computed
here with NumPy only (Cholesky whitening, normal equations, vectorised least
squares, direct sums over samples); nothing is compared with the code under
test itself, except where a test says it checks an invariance (scaling, float32).
"""

import functools
import itertools

import numpy as np
import pytest

pytest.importorskip("hypothesis")
import _reference as ref  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from blocklowrank import BlockLayout, approximate, block_spectra  # noqa: E402
from blocklowrank._metric import GramFactor, fit_blocks, fit_global, fit_majorize, metric_energy, output_error  # noqa: E402

# the references here are undamped: the fits are called with gram_damping=0 unless a test says otherwise
fit_global = functools.partial(fit_global, gram_damping=0.0)
fit_blocks = functools.partial(fit_blocks, gram_damping=0.0)
fit_majorize = functools.partial(fit_majorize, gram_damping=0.0)
from blocklowrank._metric._global import _fit_global  # noqa: E402
from blocklowrank._metric._objective import prepare  # noqa: E402

TRACE_TOL = 1e-12  # a relative error trace may rise by rounding only


# ---------------------------------------------------------------------------- independent references


def well_conditioned(rng, n, eps=0.3):
    """``I + eps * (a PSD matrix of norm <= 1)``: condition number at most ``1 + eps``."""
    A = rng.standard_normal((n, n))
    S = A @ A.T
    return np.eye(n) + eps * S / np.linalg.eigvalsh(S)[-1]


def dense(factors, rcuts, ccuts, shape):
    M = np.zeros(shape)
    for (i, j), (B, A) in factors.items():
        M[rcuts[i], ccuts[j]] = np.asarray(B, np.float64) @ np.asarray(A, np.float64)
    return M


def one_per_row_closed_form(W, G, rcuts, ccuts, pairs, r):
    """Each active block (i, c) alone in its block-row: minimise ||(W_i - X E_c^T) L||^2 over
    rank-r X: normal equations X G_cc = (W_i G)[:, c], then the whitened truncation in G_cc."""
    M = np.zeros(W.shape)
    for i, c in pairs:
        Gcc = G[ccuts[c], ccuts[c]]
        T = np.linalg.solve(Gcc, (W[rcuts[i]] @ G)[:, ccuts[c]].T).T
        L = np.linalg.cholesky(Gcc)
        M[rcuts[i], ccuts[c]] = ref.truncate(T @ L, r)[0] @ np.linalg.inv(L)
    return M


def restricted_least_squares(W, G, H, mask):
    """argmin over M supported on ``mask`` of tr(H (W - M) G (W - M)^T): with column-major
    vec, the objective is vec(D)^T (G kron H) vec(D), a linear least-squares problem."""
    Q = np.kron(G, H)
    w = W.flatten(order="F")
    sel = np.flatnonzero(mask.flatten(order="F"))
    S = np.eye(w.size)[:, sel]
    x = np.linalg.solve(S.T @ Q @ S, S.T @ Q @ w)
    M = np.zeros(w.size)
    M[sel] = x
    return M.reshape(W.shape, order="F")


def layout_cuts(m, n, kr, kc):
    return ref.cuts(m, kr), ref.cuts(n, kc)


# ---------------------------------------------------------------------------- strategies
@st.composite
def problems(draw, max_side=10, two_sided=False):
    seed = draw(st.integers(0, 2**31 - 1))
    m, n = draw(st.integers(2, max_side)), draw(st.integers(2, max_side))
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n)) * draw(st.sampled_from([1.0, 1e-3, 1e3]))
    _, G = ref.sample_gram(rng, n)
    H = ref.sample_gram(rng, m)[1] if two_sided else None
    return rng, W, G, H


def gapped(s, r, rel=1e-6):
    return r >= len(s) or s[r - 1] - s[r] > rel * max(s[0], 1e-300)


# ---------------------------------------------------------------------------- global fit
@given(problems(), st.data())
def test_global_one_sided_is_whitened_svd(prob, data):
    """Claim: with H absent the global metric fit equals SVD-LLM's whitened truncation
    [W L]_r L^{-1} (L = chol(G)), its objective is sum_{k>r} s_k^2 over the singular values
    of W L, its spectrum is that of W L, and output_error = sqrt(tail / total)."""
    _, W, G, _ = prob
    r = data.draw(st.integers(1, min(W.shape)))
    M_ref, s = ref.whitened(W, G, r)
    res = fit_global(W, r, G)
    B, A = res.factors[(0, 0)]
    tail, tot = float(np.sum(s[r:] ** 2)), float(np.sum(s**2))
    np.testing.assert_allclose(res.singular_values[(0, 0)], s, rtol=1e-9, atol=1e-12 * s[0])
    np.testing.assert_allclose(res.objective, tail, rtol=1e-9, atol=1e-12 * tot)
    np.testing.assert_allclose(res.total, tot, rtol=1e-12)
    np.testing.assert_allclose(ref.f_ref(W, B @ A, G), tail, rtol=1e-8, atol=1e-11 * tot)
    np.testing.assert_allclose(res.output_error, np.sqrt(tail / tot), rtol=1e-8, atol=1e-10)
    if gapped(s, r):
        np.testing.assert_allclose(B @ A, M_ref, atol=1e-8 * np.linalg.norm(W))
    assert np.linalg.norm(B @ A, 2) <= np.linalg.norm(W, 2) * (1 + 1e-10)  # an orthogonal projection of W


@given(problems(two_sided=True), st.data())
def test_global_two_sided_is_whitened_svd(prob, data):
    """Claim: with H = K K^T the global fit equals K^{-T} [K^T W L]_r L^{-1} and its objective
    is the tail energy of the singular values of K^T W L."""
    _, W, G, H = prob
    r = data.draw(st.integers(1, min(W.shape)))
    M_ref, s = ref.whitened(W, G, r, H)
    res = fit_global(W, r, G, H)
    B, A = res.factors[(0, 0)]
    tot = float(np.sum(s**2))
    np.testing.assert_allclose(res.objective, np.sum(s[r:] ** 2), rtol=1e-8, atol=1e-12 * tot)
    np.testing.assert_allclose(ref.f_ref(W, B @ A, G, H), np.sum(s[r:] ** 2), rtol=1e-7, atol=1e-11 * tot)
    if gapped(s, r):
        np.testing.assert_allclose(B @ A, M_ref, atol=1e-7 * np.linalg.norm(W))


@given(problems(two_sided=True), st.booleans(), st.data())
def test_global_fit_is_locally_optimal(prob, with_h, data):
    """Claim: no rank-r matrix found by random perturbation of the factors (small and large
    steps) or by random search does better in the metric than the global fit."""
    rng, W, G, H = prob
    H = H if with_h else None
    r = data.draw(st.integers(1, min(W.shape)))
    B, A = fit_global(W, r, G, H).factors[(0, 0)]
    best = ref.f_ref(W, B @ A, G, H)
    for eps in (1e-4, 1e-2, 1.0):
        for _ in range(10):
            Bp = B + eps * np.linalg.norm(B) * rng.standard_normal(B.shape)
            Ap = A + eps * np.linalg.norm(A) * rng.standard_normal(A.shape)
            assert ref.f_ref(W, Bp @ Ap, G, H) >= best * (1 - 1e-10) - 1e-12 * ref.f_ref(W, 0, G, H)
    for _ in range(20):
        Mr = rng.standard_normal((W.shape[0], r)) @ rng.standard_normal((r, W.shape[1]))
        assert ref.f_ref(W, Mr, G, H) >= best * (1 - 1e-10)


# ---------------------------------------------------------------------------- identity, scaling, samples
LAYOUTS = [("global", (1, 1), "full"), ("diagonal", (3, 3), "diagonal"), ("block", (2, 3), "full")]


@pytest.mark.parametrize("name, grid, pattern", LAYOUTS)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(3, 11), n=st.integers(3, 11))
def test_identity_metric_reproduces_plain_fits(name, grid, pattern, seed, m, n):
    """Claim: G = H = I gives today's fits exactly (approximate(..., svd_solver="full")):
    the same reconstruction, the same factors where the truncation is unique, and
    output_error equal to the Frobenius error."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n))
    lay = BlockLayout.from_blocks((m, n), grid, rank=1, pattern=pattern)
    plain = approximate(W, lay, svd_solver="full")
    for H in (None, np.eye(m)):
        res = fit_blocks(W, lay, np.eye(n), H)
        np.testing.assert_allclose(
            dense(res.factors, *layout_cuts(m, n, *grid), (m, n)), plain.reconstruction, atol=1e-12 * np.linalg.norm(W)
        )
        np.testing.assert_allclose(res.output_error, plain.error, rtol=1e-10, atol=1e-13)
        assert res.n_iter == 1 and res.exact
        for key, (B, A) in res.factors.items():
            s = plain.singular_values[key]
            if gapped(s, 1) and s[0] > 1e-8 * np.linalg.norm(W):
                np.testing.assert_allclose(B, plain.factors[key][0], atol=1e-10 * np.linalg.norm(W))
                np.testing.assert_allclose(A, plain.factors[key][1], atol=1e-10)
    g = fit_global(W, 2 if min(m, n) > 2 else 1, np.eye(n))
    e = approximate(W, method="global", rank=2 if min(m, n) > 2 else 1, svd_solver="full")
    np.testing.assert_allclose(
        g.factors[(0, 0)][0] @ g.factors[(0, 0)][1], e.reconstruction, atol=1e-12 * np.linalg.norm(W)
    )


@given(problems(two_sided=True), st.sampled_from([2.0**-30, 3.7, 1e-8, 1e6]), st.sampled_from([1.0, 0.01, 5e3]))
def test_scaling_grams_changes_no_fit(prob, cg, ch):
    """Claim: scaling G by cg > 0 and H by ch > 0 changes no fit (global, diagonal, K x K)
    and no output_error; the objective scales by cg * ch. With damping too."""
    _, W, G, H = prob
    m, n = W.shape
    for fit in (
        lambda G_, H_, d: fit_global(W, 1, G_, H_, gram_damping=d),
        lambda G_, H_, d: fit_blocks(W, BlockLayout.diagonal((m, n), 2, rank=1), G_, None, gram_damping=d),
        lambda G_, H_, d: fit_blocks(W, BlockLayout.block((m, n), 2, rank=1), G_, H_, gram_damping=d, max_iter=5),
    ):
        for d in (0.0, 0.05):
            a, b = fit(G, H, d), fit(cg * G, ch * H, d)
            Ma = (
                dense(a.factors, *layout_cuts(m, n, 2, 2), (m, n)) if len(a.factors) > 1 else np.dot(*a.factors[(0, 0)])
            )
            Mb = (
                dense(b.factors, *layout_cuts(m, n, 2, 2), (m, n)) if len(b.factors) > 1 else np.dot(*b.factors[(0, 0)])
            )
            np.testing.assert_allclose(Ma, Mb, atol=1e-7 * np.linalg.norm(W))
            np.testing.assert_allclose(a.output_error, b.output_error, rtol=1e-7, atol=1e-10)
    g1, g2 = fit_global(W, 1, G, H), fit_global(W, 1, cg * G, ch * H)
    np.testing.assert_allclose(g2.objective, cg * ch * g1.objective, rtol=1e-9, atol=1e-12 * g2.total)


@given(seed=st.integers(0, 2**31 - 1), n_samples=st.integers(1, 40))
def test_output_error_equals_direct_computation_from_samples(seed, n_samples):
    """Claim: with G = X^T X / N built from samples X, output_error of every fit (and of any
    factors or dense M) is ||(W - M) X^T|| / ||W X^T||, and the objective (no damping) is
    ||(W - M) X^T||^2 / N: the error of the layer's outputs on the calibration samples."""
    rng = np.random.default_rng(seed)
    m, n = 7, 9
    W = rng.standard_normal((m, n))
    X = rng.standard_normal((n_samples, n))
    G = X.T @ X / n_samples

    def direct(M):
        return np.linalg.norm((W - M) @ X.T) / np.linalg.norm(W @ X.T)

    lays = [BlockLayout.diagonal((m, n), 3, rank=2), BlockLayout.block((m, n), 2, rank=1)]
    for res, cuts in [(fit_global(W, 2, G), ([slice(None)], [slice(None)]))] + [
        (fit_blocks(W, lay, G, max_iter=20), layout_cuts(m, n, *lay.n_blocks)) for lay in lays
    ]:
        M = dense(res.factors, *cuts, (m, n))
        np.testing.assert_allclose(res.output_error, direct(M), rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(res.objective, np.linalg.norm((W - M) @ X.T) ** 2 / n_samples, rtol=1e-7, atol=1e-9)
    B, A = rng.standard_normal((m, 2)), rng.standard_normal((2, n))
    np.testing.assert_allclose(output_error(W, (B, A), G), direct(B @ A), rtol=1e-9)
    np.testing.assert_allclose(output_error(W, B @ A, G), direct(B @ A), rtol=1e-9)
    np.testing.assert_allclose(metric_energy(W, G), np.linalg.norm(W @ X.T) ** 2 / n_samples, rtol=1e-10)


def test_damping_is_the_data_objective_plus_a_frobenius_term():
    """Claim: gram_damping=delta fits exactly as delta=0 on G + delta mean(diag G) I (the data
    objective plus delta mean-diag times the Frobenius one); objective is the damped value and
    output_error the undamped one, computed directly."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 12))
    X, G = ref.sample_gram(rng, 12, n_samples=6)
    Gd = G + 0.1 * np.trace(G) / 12 * np.eye(12)
    for lay in (
        BlockLayout.global_((8, 12), rank=3),
        BlockLayout.diagonal((8, 12), 2, rank=2),
        BlockLayout.block((8, 12), 2, rank=1),
    ):
        a = fit_blocks(W, lay, G, gram_damping=0.1, max_iter=50, tol=0)
        b = fit_blocks(W, lay, Gd, max_iter=50, tol=0)
        cuts = layout_cuts(8, 12, *lay.n_blocks)
        Ma, Mb = dense(a.factors, *cuts, W.shape), dense(b.factors, *cuts, W.shape)
        np.testing.assert_allclose(Ma, Mb, atol=1e-9 * np.linalg.norm(W))
        np.testing.assert_allclose(a.objective, ref.f_ref(W, Ma, Gd), rtol=1e-9)
        np.testing.assert_allclose(a.output_error, np.sqrt(ref.f_ref(W, Ma, G) / ref.f_ref(W, 0, G)), rtol=1e-9)


# ---------------------------------------------------------------------------- diagonal and one-per-row: exact
@st.composite
def one_per_row_cases(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    k = draw(st.integers(1, 3))
    rsizes = draw(st.lists(st.integers(1, 4), min_size=k, max_size=k))
    csizes = draw(st.lists(st.integers(1, 4), min_size=k, max_size=k))
    perm = draw(st.permutations(range(k)))  # block-row i has its active block in block-column perm[i]
    return seed, rsizes, csizes, list(perm)


@given(one_per_row_cases(), st.sampled_from(["samples", "few_samples"]))
def test_one_block_per_row_is_the_exact_closed_form(case, kind):
    """Claim: with H absent and at most one active block per block-row (MELoRA's diagonal,
    uneven cuts, any such pattern) the fit equals, block by block, the independent closed
    form T = (W_i G)[:, c] G_cc^{-1} truncated in the metric G_cc, in one exact step."""
    seed, rsizes, csizes, perm = case
    rng = np.random.default_rng(seed)
    m, n = sum(rsizes), sum(csizes)
    W = rng.standard_normal((m, n))
    G = ref.sample_gram(rng, n, n_samples=3 * n + 5 if kind == "samples" else n + 2)[1]
    k = len(rsizes)
    active = np.zeros((k, k), bool)
    active[np.arange(k), perm] = True
    r = min(min(rsizes), min(csizes))
    lay = BlockLayout((m, n), rsizes, csizes, active, np.where(active, r, 0))
    res = fit_blocks(W, lay, G)
    rc, cc = ref.cuts_from_sizes(rsizes), ref.cuts_from_sizes(csizes)
    M_ref = one_per_row_closed_form(W, G, rc, cc, list(zip(range(k), perm)), r)
    M = dense(res.factors, rc, cc, (m, n))
    assert res.exact and res.n_iter == 1 and res.stop_reason == "exact"
    np.testing.assert_allclose(res.objective, ref.f_ref(W, M_ref, G), rtol=1e-8, atol=1e-12 * ref.f_ref(W, 0, G))
    np.testing.assert_allclose(M, M_ref, atol=1e-6 * np.linalg.norm(W))


# ---------------------------------------------------------------------------- block-coordinate descent
@st.composite
def grid_cases(draw, two_sided=None):
    seed = draw(st.integers(0, 2**31 - 1))
    m, n = draw(st.integers(3, 10)), draw(st.integers(3, 10))
    kr, kc = draw(st.integers(1, min(3, m))), draw(st.integers(1, min(3, n)))
    rng = np.random.default_rng(seed)
    active = rng.random((kr, kc)) < 0.7
    active[rng.integers(kr), rng.integers(kc)] = True
    r = draw(st.integers(1, min(m // kr, n // kc)))
    with_h = draw(st.booleans()) if two_sided is None else two_sided
    return rng, m, n, kr, kc, active, r, with_h


@given(grid_cases())
def test_bcd_never_increases_and_ends_no_worse_than_plain(case):
    """Claim: on any grid (uneven cuts, any active pattern, H or not) the damped objective's
    trace never increases, the result is no worse in the metric than the plain per-block SVD
    fit (computed by the engine), and objective / output_error match a direct computation."""
    rng, m, n, kr, kc, active, r, with_h = case
    W = rng.standard_normal((m, n))
    G = ref.sample_gram(rng, n)[1]
    H = ref.sample_gram(rng, m)[1] if with_h else None
    rc, cc = layout_cuts(m, n, kr, kc)
    lay = BlockLayout(
        (m, n), [s.stop - s.start for s in rc], [s.stop - s.start for s in cc], active, np.where(active, r, 0)
    )
    res = fit_blocks(W, lay, G, H, max_iter=30, tol=1e-9)
    assert np.all(np.diff(res.error_trace) <= TRACE_TOL)
    M = dense(res.factors, *layout_cuts(m, n, kr, kc), (m, n))
    plain = approximate(W, lay, svd_solver="full").reconstruction
    tot = ref.f_ref(W, 0, G, H)
    assert ref.f_ref(W, M, G, H) <= ref.f_ref(W, plain, G, H) + 1e-10 * tot
    np.testing.assert_allclose(res.objective, ref.f_ref(W, M, G, H), rtol=1e-8, atol=1e-12 * tot)
    np.testing.assert_allclose(res.output_error, np.sqrt(ref.f_ref(W, M, G, H) / tot), rtol=1e-8, atol=1e-12)
    assert res.n_iter <= 30 and res.stop_reason in ("tol", "max_iter", "exact")


@given(grid_cases(), st.booleans())
def test_bcd_is_exact_in_one_sweep_for_block_diagonal_grams(case, two_sided):
    """Claim: when G is block-diagonal over the column cuts (and H over the row cuts) one
    sweep is exact: every block is W_ic's own two-sided whitened truncation in G_cc, H_ii."""
    rng, m, n, kr, kc, active, r, _ = case
    W = rng.standard_normal((m, n))
    rc, cc = layout_cuts(m, n, kr, kc)
    G = np.zeros((n, n))
    for s in cc:
        G[s, s] = ref.sample_gram(rng, s.stop - s.start)[1]
    H = None
    if two_sided:
        H = np.zeros((m, m))
        for s in rc:
            H[s, s] = ref.sample_gram(rng, s.stop - s.start)[1]
    lay = BlockLayout(
        (m, n), [s.stop - s.start for s in rc], [s.stop - s.start for s in cc], active, np.where(active, r, 0)
    )
    res = fit_blocks(W, lay, G, H, max_iter=50)
    assert res.n_iter == 1 and res.exact and res.stop_reason == "exact"
    M_ref = np.zeros((m, n))
    M = dense(res.factors, rc, cc, (m, n))
    for i, c in zip(*np.nonzero(active)):
        Hi = None if H is None else H[rc[i], rc[i]]
        M_ref[rc[i], cc[c]], s = ref.whitened(W[rc[i], cc[c]], G[cc[c], cc[c]], r, Hi)
        if gapped(s, r):
            np.testing.assert_allclose(M[rc[i], cc[c]], M_ref[rc[i], cc[c]], atol=1e-7 * np.linalg.norm(W))
    np.testing.assert_allclose(res.objective, ref.f_ref(W, M_ref, G, H), rtol=1e-8, atol=1e-12 * ref.f_ref(W, 0, G, H))


@given(grid_cases())
def test_bcd_reaches_the_brute_force_optimum_with_full_rank_blocks(case):
    """Claim: with every active block at full rank the problem is a convex least-squares
    problem; block-coordinate descent reaches its optimum, computed independently by
    vectorised restricted least squares (G kron H)."""
    rng, m, n, kr, kc, active, _, with_h = case
    W = rng.standard_normal((m, n))
    G = well_conditioned(rng, n, 2.0)
    H = well_conditioned(rng, m, 2.0) if with_h else None
    rc, cc = layout_cuts(m, n, kr, kc)
    rs, cs = [s.stop - s.start for s in rc], [s.stop - s.start for s in cc]
    full = np.where(active, np.minimum.outer(rs, cs), 0)
    res = fit_blocks(W, BlockLayout((m, n), rs, cs, active, full), G, H, max_iter=3000, tol=1e-13)
    mask = np.zeros((m, n), bool)
    for i, c in zip(*np.nonzero(active)):
        mask[rc[i], cc[c]] = True
    M_ref = restricted_least_squares(W, G, np.eye(m) if H is None else H, mask)
    tot = ref.f_ref(W, 0, G, H)
    np.testing.assert_allclose(res.objective, ref.f_ref(W, M_ref, G, H), rtol=1e-6, atol=1e-10 * tot)
    np.testing.assert_allclose(dense(res.factors, rc, cc, (m, n)), M_ref, atol=1e-4 * np.linalg.norm(W))


def test_bcd_with_a_permuted_layout_is_the_fit_of_the_permuted_problem():
    """Claim: a permuted layout is fitted in its own coordinates: its diagonal fit equals the
    independent closed form on W[row_perm][:, col_perm] with G[col_perm][:, col_perm]."""
    rng = np.random.default_rng(3)
    W = rng.standard_normal((9, 8))
    G = ref.sample_gram(rng, 8)[1]
    rp, cp = rng.permutation(9), rng.permutation(8)
    lay = BlockLayout.diagonal((9, 8), 2, rank=2).with_permutation(rp, cp)
    res = fit_blocks(W, lay, G)
    Wp, Gp = W[rp][:, cp], G[np.ix_(cp, cp)]
    rc, cc = layout_cuts(9, 8, 2, 2)
    M_ref = one_per_row_closed_form(Wp, Gp, rc, cc, [(0, 0), (1, 1)], 2)
    np.testing.assert_allclose(dense(res.factors, rc, cc, (9, 8)), M_ref, atol=1e-8)


# ---------------------------------------------------------------------------- majorisation-minimisation
def global_plain_fit(r):
    def fit(Z, state):
        U, s, Vt = np.linalg.svd(Z, full_matrices=False)
        return (U[:, :r] * s[:r], Vt[:r]), None

    return fit


def grid_plain_fit(rc, cc, active, r):
    def fit(Z, state):
        M = np.zeros(Z.shape)
        for i, c in zip(*np.nonzero(active)):
            M[rc[i], cc[c]] = ref.truncate(Z[rc[i], cc[c]], r)[0]
        return M, None

    return fit


@given(problems(max_side=8, two_sided=True), st.booleans(), st.data())
def test_majorize_never_increases_and_reaches_the_global_optimum(prob, with_h, data):
    """Claim: majorisation-minimisation with a plain global SVD as the structure's fitter never
    increases f and converges to the exact global metric fit (independent whitened SVD)."""
    rng, W, _, _ = prob
    m, n = W.shape
    G, H = well_conditioned(rng, n), (well_conditioned(rng, m) if with_h else None)
    r = data.draw(st.integers(1, min(m, n)))
    res = fit_majorize(W, G, H, plain_fit=global_plain_fit(r), max_iter=3000, tol=1e-13)
    assert np.all(np.diff(res.error_trace) <= TRACE_TOL)
    B, A = res.approx
    M_ref, s = ref.whitened(W, G, r, H)
    tot = ref.f_ref(W, 0, G, H)
    np.testing.assert_allclose(ref.f_ref(W, B @ A, G, H), ref.f_ref(W, M_ref, G, H), rtol=1e-6, atol=1e-10 * tot)
    np.testing.assert_allclose(res.objective, ref.f_ref(W, B @ A, G, H), rtol=1e-8, atol=1e-12 * tot)
    assert res.objective <= ref.f_ref(W, ref.truncate(W, r)[0], G, H) * (1 + 1e-12) + 1e-12 * tot  # no worse than plain


def test_majorize_with_a_grid_fitter_reaches_the_block_optimum():
    """Claim: with a plain K x K fitter, MM converges to the exact block fit where one is known
    (block-diagonal G: the per-block whitened truncations), never increasing f."""
    rng = np.random.default_rng(5)
    m, n = 8, 10
    W = rng.standard_normal((m, n))
    rc, cc = layout_cuts(m, n, 2, 2)
    G = np.zeros((n, n))
    for s in cc:
        G[s, s] = well_conditioned(rng, s.stop - s.start)
    active = np.ones((2, 2), bool)
    res = fit_majorize(W, G, plain_fit=grid_plain_fit(rc, cc, active, 2), max_iter=3000, tol=1e-13)
    assert np.all(np.diff(res.error_trace) <= TRACE_TOL)
    M_ref = np.zeros((m, n))
    for i, c in itertools.product(range(2), range(2)):
        M_ref[rc[i], cc[c]] = ref.whitened(W[rc[i], cc[c]], G[cc[c], cc[c]], 2)[0]
    np.testing.assert_allclose(ref.f_ref(W, res.approx, G), ref.f_ref(W, M_ref, G), rtol=1e-7)


def test_majorize_refuses_a_fitter_worse_than_the_iterate():
    """Claim: a plain fitter that returns something worse on ||Z - M|| than the current
    iterate breaks the majorisation guarantee: MM stops ("callback") without taking it."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 7))
    G = well_conditioned(rng, 7)
    calls = []

    def bad(Z, state):
        calls.append(1)
        return (ref.truncate(W, 2)[0] if len(calls) == 1 else np.zeros_like(Z)), None

    res = fit_majorize(W, G, plain_fit=bad, max_iter=10)
    assert res.stop_reason == "callback" and res.n_iter == 1 and len(res.error_trace) == 1  # the start only
    np.testing.assert_allclose(res.approx, ref.truncate(W, 2)[0])


# ---------------------------------------------------------------------------- randomized and "auto"
def decaying(rng, m, n, rank=6, noise=1e-6):
    U, _ = np.linalg.qr(rng.standard_normal((m, rank)))
    V, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    return (U * 2.0 ** -np.arange(rank)) @ V.T * 10 + noise * rng.standard_normal((m, n))


class Spy(np.ndarray):
    """W that records the shape of the other operand of every product it takes part in."""

    log = []

    def __matmul__(self, other):
        Spy.log.append(np.shape(other))
        return np.asarray(self) @ np.asarray(other)

    def __rmatmul__(self, other):
        Spy.log.append(np.shape(other))
        return np.asarray(other) @ np.asarray(self)


class GramSpy:
    """A Gram factor that records the shape of every row stack it multiplies or solves."""

    def __init__(self, gram, log):
        self._gram, self._log = gram, log

    def __getattr__(self, name):
        attr = getattr(self._gram, name)
        if name.startswith(("rmul", "rsolve")):

            def spied(X, *a, **k):
                self._log.append(np.shape(X))
                return attr(X, *a, **k)

            return spied
        return attr


@pytest.mark.parametrize("with_h", [False, True])
def test_randomized_equals_exact_and_never_forms_w_l(with_h, monkeypatch):
    """Claim: the randomized metric fit (and the certified "auto" one), with K^T W L formed or
    as an operator, equals the exact one to rounding on a decaying spectrum; the operator
    sketch never forms W L: every product with W and every
    product or solve with a factor of G or H involves a thin operand (at most the sketch's width
    l = k + n_oversamples, or the certificate's 10 probes). The total energy, which the report
    and the certificate need, is taken here from an independent computation; its own pass
    (``m n^2``) forms W L in column chunks of bounded size (checked with a small chunk)."""
    from sklearn.utils import check_random_state

    import blocklowrank._metric._global as glob
    import blocklowrank._metric._objective as obj

    rng = np.random.default_rng(1)
    m, n = 420, 400  # large enough for "auto" to try the sketch (its cost model, _svd._auto_plan)
    W = decaying(rng, m, n)
    _, G = ref.sample_gram(rng, n, spread=0.5)
    H = ref.sample_gram(rng, m, spread=0.5)[1] if with_h else None
    exact = fit_global(W, 4, G, H)
    for solver in ("randomized", "auto"):  # the formed route: the engine's solvers on K^T W L
        res = fit_global(W, 4, G, H, svd_solver=solver, random_state=0)
        assert res.svd_solver == "randomized"
        np.testing.assert_allclose(
            np.dot(*res.factors[(0, 0)]), np.dot(*exact.factors[(0, 0)]), atol=1e-9 * np.linalg.norm(W)
        )
        np.testing.assert_allclose(res.objective, exact.objective, rtol=1e-6)
    for solver in ("randomized", "auto"):
        p = prepare(W, G, H, 0.0)
        tot = ref.f_ref(p.W, 0, np.ldexp(G, -p.G.log2_scale), None if H is None else np.ldexp(H, -p.H.log2_scale))
        monkeypatch.setattr(glob, "totals", lambda *a, **k: (tot, tot))
        log = []
        p.W, p.G, p.H = p.W.view(Spy), GramSpy(p.G, log), GramSpy(p.H, log)
        Spy.log = []
        res = _fit_global(p, 4, (solver, 10, "auto"), check_random_state(0), None, sketch="operator")
        monkeypatch.undo()
        assert res.svd_solver == "randomized"
        widths = [min(s) for s in Spy.log + log]
        assert Spy.log and log and max(widths) <= 4 + 10
        B, A = res.factors[(0, 0)]
        Be, Ae = exact.factors[(0, 0)]
        np.testing.assert_allclose(B @ A, Be @ Ae, atol=1e-9 * np.linalg.norm(W))
        np.testing.assert_allclose(res.objective, exact.objective, rtol=1e-6)
        np.testing.assert_allclose(res.output_error, exact.output_error, rtol=1e-6)
    monkeypatch.setattr(obj, "_CHUNK_ELEMS", m * 16)  # the energy pass: chunks of 16 columns
    p = prepare(W, G, H, 0.0)
    p.W = p.W.view(Spy)
    Spy.log = []
    e = obj._data_energy(p.W, p.G, p.H)[0]
    assert max(min(s) for s in Spy.log) <= 16
    np.testing.assert_allclose(np.ldexp(e, p.log2_energy), ref.f_ref(W, 0, G, H), rtol=1e-10)


def test_auto_falls_back_to_exact_on_a_flat_spectrum():
    """Claim: "auto" keeps the sketch only when its certificate holds; on a flat spectrum
    (Gaussian W, identity-like G) it fails and the exact fit is returned."""
    rng = np.random.default_rng(2)
    W = rng.standard_normal((300, 300))
    G = well_conditioned(rng, 300)
    res = fit_global(W, 3, G, svd_solver="auto", random_state=0)
    assert res.svd_solver == "full" and res.exact
    np.testing.assert_allclose(res.objective, np.sum(ref.whitened(W, G, 3)[1][3:] ** 2), rtol=1e-9)


# ---------------------------------------------------------------------------- hostile statistics
@pytest.mark.parametrize("case", list(ref.hostile_grams(4)))
@pytest.mark.parametrize("side", ["input_gram", "output_gram"])
def test_hostile_grams_are_refused_in_one_line_naming_the_argument(case, side):
    """Claim: a Gram that is not a real, dense, finite, symmetric PSD matrix of the right side
    raises one clear error naming input_gram / output_gram, for every fit and for output_error."""
    W = np.random.default_rng(0).standard_normal((4, 4))
    bad = ref.hostile_grams(4)[case]
    calls = [
        lambda g, h: fit_global(W, 1, g, h),
        lambda g, h: fit_blocks(W, BlockLayout.block((4, 4), 2, rank=1), g, h),
        lambda g, h: output_error(W, W, g, h),
    ]
    for call in calls:
        args = (bad, None) if side == "input_gram" else (np.eye(4), bad)
        with pytest.raises((ValueError, TypeError), match=side) as err:
            call(*args)
        assert "\n" not in str(err.value)


def test_bad_damping_and_shared_factor_of_wrong_size_are_refused():
    """Claim: gram_damping must be a finite float >= 0, and a shared GramFactor must have the
    layer's side; each error names its argument."""
    W = np.ones((3, 4))
    for d in (-0.1, np.nan, "x"):
        with pytest.raises((ValueError, TypeError), match="gram_damping"):
            fit_global(W, 1, np.eye(4), gram_damping=d)
    with pytest.raises(ValueError, match="input_gram"):
        fit_global(W, 1, GramFactor(np.eye(5)))


def test_rounding_level_negative_eigenvalues_are_accepted():
    """Claim: a singular second moment computed in float32 (fewer samples than features) has
    negative eigenvalues only at rounding level and is accepted."""
    X = np.random.default_rng(0).standard_normal((5, 40)).astype(np.float32)
    G = X.T @ X / np.float32(5)
    gf = GramFactor(G, 40, damping=0.0)
    assert gf.kind == "eigen" and gf.rank == 5  # the other 35 eigenvalues are rounding


# ---------------------------------------------------------------------------- singular statistics
def singular_grams(rng, n):
    """Dead inputs (zero columns), a handful of samples, one sample."""
    X = rng.standard_normal((4 * n, n))
    X[:, : n // 3] = 0.0
    out = {"dead inputs": (X.T @ X / len(X), np.arange(n // 3))}
    X = rng.standard_normal((3, n))
    out["3 samples"] = (X.T @ X / 3, None)
    X = rng.standard_normal((1, n))
    out["1 sample"] = (X.T @ X, None)
    return out


@pytest.mark.parametrize("damping", [0.0, 0.01])
def test_singular_grams_give_finite_bounded_factors(damping):
    """Claim: with a singular G (dead inputs, a handful of samples, one sample) every fit has
    finite factors; the global fit is an orthogonal projection of W (||M||_2 <= ||W||_2);
    without damping block fits put nothing on directions the calibration never saw (M G-null
    components are zero) and their objective is no worse than the plain fit's; with damping
    the never-seen directions follow W (the Frobenius term)."""
    rng = np.random.default_rng(7)
    m, n = 9, 12
    W = rng.standard_normal((m, n))
    for name, (G, dead) in singular_grams(rng, n).items():
        g = fit_global(W, 3, G, gram_damping=damping)
        B, A = g.factors[(0, 0)]
        assert np.all(np.isfinite(B)) and np.all(np.isfinite(A)), name
        assert np.linalg.norm(B @ A, 2) <= np.linalg.norm(W, 2) * (1 + 1e-9), name
        for lay in (BlockLayout.diagonal((m, n), 3, rank=2), BlockLayout.block((m, n), 2, rank=2)):
            res = fit_blocks(W, lay, G, gram_damping=damping, max_iter=30)
            rc, cc = layout_cuts(m, n, *lay.n_blocks)
            M = dense(res.factors, rc, cc, (m, n))
            assert np.all(np.isfinite(M)), name
            assert np.all(np.diff(res.error_trace) <= TRACE_TOL), name
            plain = approximate(W, lay, svd_solver="full").reconstruction
            Gd = G + damping * np.trace(G) / n * np.eye(n)
            assert ref.f_ref(W, M, Gd) <= ref.f_ref(W, plain, Gd) * (1 + 1e-9) + 1e-12, name
            for c in range(lay.n_blocks[1]):  # null directions of each G_cc
                w, Q = np.linalg.eigh(G[cc[c], cc[c]])
                null = Q[:, w < 1e-9 * max(w[-1], 1e-300)]
                if damping == 0 and null.size:
                    assert np.abs(M[:, cc[c]] @ null).max() <= 1e-8 * np.linalg.norm(W), name
            if dead is not None and damping > 0 and lay.pattern == "diagonal":
                for i in range(3):  # dead columns of a diagonal block: the target there is W itself
                    cols = np.intersect1d(np.arange(cc[i].start, cc[i].stop), dead)
                    assert np.linalg.norm(M[rc[i]][:, cols]) <= np.linalg.norm(W[rc[i]][:, cols]) * (1 + 1e-9)


def test_singular_output_gram_leaves_unweighted_outputs_alone():
    """Claim: with a singular H and no damping, the two-sided global fit puts nothing on the
    outputs H does not weigh (rows in its null space are zero) and its factors are finite."""
    rng = np.random.default_rng(8)
    W = rng.standard_normal((8, 10))
    Z = rng.standard_normal((20, 8))
    Z[:, :3] = 0
    H = Z.T @ Z / 20
    G = ref.sample_gram(rng, 10)[1]
    B, A = fit_global(W, 3, G, H).factors[(0, 0)]
    assert np.all(np.isfinite(B)) and np.all(np.isfinite(A))
    np.testing.assert_allclose((B @ A)[:3], 0, atol=1e-10 * np.linalg.norm(W))


# ---------------------------------------------------------------------------- spectra and allocation
def test_metric_spectra_allocate_exactly_where_blocks_decouple():
    """Claim: for the diagonal structure with H absent, the per-block metric spectra give the
    exact damped error of every rank choice, and allocating a budget (or a target error) on
    them is optimal: brute force over every rank tuple (objectives from the independent
    closed form) finds nothing better within the budget (or cheaper within the target)."""
    rng = np.random.default_rng(11)
    m, n, k = 9, 9, 3
    W = rng.standard_normal((m, n)) * np.exp(rng.uniform(-2, 2, n))
    G = ref.sample_gram(rng, n)[1]
    sp = block_spectra(W, BlockLayout.diagonal((m, n), k), input_gram=G, gram_damping=0.0)
    assert sp.exact
    rc, cc = layout_cuts(m, n, k, k)
    tot = ref.f_ref(W, 0, G)

    def f_of(ranks):
        M = np.zeros((m, n))
        for i, r in enumerate(ranks):
            if r:
                M += one_per_row_closed_form(W, G, rc, cc, [(i, i)], r)
        return ref.f_ref(W, M, G)

    combos = list(itertools.product(range(4), repeat=3))
    fs = {rk: f_of(rk) for rk in combos}
    for rk in combos[::5]:
        np.testing.assert_allclose(sp.error(np.diag(rk)), np.sqrt(fs[rk] / tot), rtol=1e-7)
    for budget in (6, 12, 20, 30):
        ranks, exact = sp.allocate(budget)
        assert exact
        chosen = tuple(int(v) for v in np.diag(ranks))
        feasible = [rk for rk in combos if 6 * sum(rk) <= budget]
        assert fs[chosen] <= min(fs[rk] for rk in feasible) * (1 + 1e-9)
    e_min = sp.error(3)  # what no rank captures
    with pytest.raises(ValueError, match="cannot be reached"):
        sp.allocate(max_error=0.9 * e_min)
    for target in e_min + (1 - e_min) * np.array([0.5, 0.2, 0.05, 1e-3]):
        ranks, exact = sp.allocate(max_error=target)
        assert exact
        chosen = tuple(int(v) for v in np.diag(ranks))
        assert np.sqrt(fs[chosen] / tot) <= target * (1 + 1e-9)
        ok = [rk for rk in combos if np.sqrt(fs[rk] / tot) <= target]
        assert sum(chosen) == min(sum(rk) for rk in ok)


def test_metric_spectra_say_when_allocation_is_not_exact():
    """Claim: on a full grid with a coupled G the spectra are the first sweep's targets and
    say exact=False (so exact_allocation is False); with block-diagonal G they are exact."""
    rng = np.random.default_rng(12)
    W = rng.standard_normal((8, 8))
    G = ref.sample_gram(rng, 8)[1]
    sp = block_spectra(W, BlockLayout.block((8, 8), 2), input_gram=G, gram_damping=0.0)
    assert not sp.exact and not sp.allocate(32)[1]
    Gb = np.zeros((8, 8))
    Gb[:4, :4], Gb[4:, 4:] = G[:4, :4], G[4:, 4:]
    assert block_spectra(W, BlockLayout.block((8, 8), 2), input_gram=Gb, gram_damping=0.0).exact


# ---------------------------------------------------------------------------- dtypes
def test_float32_in_float32_out():
    """Claim: float32 W gives float32 factors close to the float64 fit (global and blocks)."""
    rng = np.random.default_rng(4)
    W = rng.standard_normal((20, 16))
    G = ref.sample_gram(rng, 16)[1]
    for fit in (lambda X: fit_global(X, 3, G), lambda X: fit_blocks(X, BlockLayout.block((20, 16), 2, rank=2), G)):
        a, b = fit(W), fit(W.astype(np.float32))
        for key in a.factors:
            assert b.factors[key][0].dtype == np.float32 and b.factors[key][1].dtype == np.float32
        np.testing.assert_allclose(b.output_error, a.output_error, rtol=1e-4)

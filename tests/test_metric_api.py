"""Fits in a data metric through the public API, for every registered structure (issue 19, part 2a).

Each test states the claim it checks. The objective is ``f(M) = tr(H (W - M) G (W - M)^T)``
(``G``, ``H`` damped by ``delta mean(diag) I`` where a test says so). References are computed
here with NumPy only: whitened SVDs, per-block closed forms, brute force over rank vectors,
direct sums over calibration samples. Configurations come from the registry's own budget
rules, so no test branches on a structure's name.
"""

import itertools

import _reference as ref
import numpy as np
import pytest
import sklearn
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from blocklowrank import (
    BlockLayout,
    GlobalLowRank,
    GramFactor,
    allocate_total_budget,
    approximate,
    block_spectra,
    compare_at_budget,
    fit_layout,
    get_structure,
    output_error,
    single_fit_cv,
    structure_names,
)
from blocklowrank.budget import match_budget
from blocklowrank.structures import Structure, layout_structure, registered

SHAPE = (12, 10)
TRACE_TOL = 1e-12  # a relative error trace may rise by rounding only


# ---------------------------------------------------------------------------- independent references


def damped(G, delta):
    return None if G is None else G + delta * np.trace(G) / len(G) * np.eye(len(G))


def diagonal_closed_form(W, G, rc, cc, ranks):
    """Diagonal blocks, H absent: block i alone in its block-row minimises ||(W_i - X E_i^T) L||^2:
    normal equations X G_ii = (W_i G)[:, i], then the whitened truncation in G_ii."""
    M = np.zeros(W.shape)
    for i, r in enumerate(ranks):
        if r:
            Gii = G[cc[i], cc[i]]
            T = np.linalg.solve(Gii, (W[rc[i]] @ G)[:, cc[i]].T).T
            L = np.linalg.cholesky(Gii)
            M[rc[i], cc[i]] = ref.truncate(T @ L, r)[0] @ np.linalg.inv(L)
    return M


def problem(seed, with_h=False, shape=SHAPE):
    rng = np.random.default_rng(seed)
    m, n = shape
    W = rng.standard_normal((m, n)) * np.exp(rng.uniform(-1, 1, n))
    X, G = ref.sample_gram(rng, n)
    H = ref.sample_gram(rng, m)[1] if with_h else None
    return W, X, G, H


def config(name, shape=SHAPE, budget=88):
    """A configuration of the structure at about ``budget`` parameters, from its budget rule
    (at most 25 passes for the iterative fits: enough for the claims, and quick)."""
    s = get_structure(name)
    rec = match_budget(shape, budget, methods=[name], n_blocks=None if s.fixed_blocks else [2], exact=False)[0]
    iters = {"max_iter": 25} if "max_iter" in s.options else {}
    return {"n_blocks": rec["n_blocks"], "rank": rec["rank"], **{k: rec[k] for k in s.extra}, **iters}


NAMES = structure_names()
UPPER = layout_structure(
    "upper", "Upper blocks", "blocks on and above the diagonal", lambda kr, kc: np.triu(np.ones((kr, kc), bool))
)


# ---------------------------------------------------------------------------- identity and scaling
@pytest.mark.parametrize("name", NAMES)
def test_a_scalar_metric_is_the_plain_fit_for_every_structure(name):
    """Claim: G = I, G = c I (H absent or d I) and input_gram=None give today's fit exactly: the same
    factors, error, trace, passes and stop reason; output_error equals error (the plain metric)."""
    W, _, _, _ = problem(0)
    m, n = W.shape
    cfg = config(name)
    plain = approximate(W, method=name, **cfg)
    assert plain.output_error == plain.error
    for G, H in ((np.eye(n), None), (3.7 * np.eye(n), 0.2 * np.eye(m)), (None, 5.0 * np.eye(m))):
        res = approximate(W, method=name, input_gram=G, output_gram=H, **cfg)
        np.testing.assert_allclose(res.reconstruction, plain.reconstruction, rtol=0, atol=1e-13 * np.linalg.norm(W))
        for key in plain.factors:
            for a, b in zip(res.factors[key], plain.factors[key]):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-13 * np.linalg.norm(W))
        assert res.error == plain.error and res.output_error == res.error
        assert res.n_iter == plain.n_iter and res.stop_reason == plain.stop_reason
        if plain.error_trace is not None:
            np.testing.assert_array_equal(res.error_trace, plain.error_trace)


@pytest.mark.parametrize("name", NAMES)
def test_scaling_the_grams_changes_no_fit(name):
    """Claim: scaling G by cg > 0 and H by ch > 0 changes no fit of any structure (damped or not)
    and no output_error; the reported objective scales by cg * ch."""
    W, _, G, H = problem(1, with_h=True)
    cfg = config(name)
    for delta in (0.0, 0.05):
        a = approximate(W, method=name, input_gram=G, output_gram=H, gram_damping=delta, **cfg)
        b = approximate(W, method=name, input_gram=3.7 * G, output_gram=0.01 * H, gram_damping=delta, **cfg)
        np.testing.assert_allclose(a.reconstruction, b.reconstruction, atol=1e-6 * np.linalg.norm(W))
        np.testing.assert_allclose(b.output_error, a.output_error, rtol=1e-6)
        np.testing.assert_allclose(b.objective, 0.037 * a.objective, rtol=1e-6)


# ---------------------------------------------------------------------------- what every fit reports
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("with_h", [False, True])
def test_output_error_is_the_error_of_the_outputs_on_the_calibration_samples(name, with_h):
    """Claim: with G = X^T X / N from samples X (H absent), output_error of every structure's fit is
    ||(W - M) X^T|| / ||W X^T||, whatever the damping the fit used; with H it is the relative
    H-weighted error; objective and total_objective are the damped f(M) and f(0); error is the
    Frobenius ||W - M|| / ||W||."""
    W, X, G, H = problem(2, with_h)
    for delta in (0.0, 0.03):
        res = approximate(W, method=name, input_gram=G, output_gram=H, gram_damping=delta, **config(name))
        M = res.reconstruction
        if H is None:
            direct = np.linalg.norm((W - M) @ X.T) / np.linalg.norm(W @ X.T)
        else:
            direct = np.sqrt(ref.f_ref(W, M, G, H) / ref.f_ref(W, 0 * W, G, H))
        np.testing.assert_allclose(res.output_error, direct, rtol=1e-8)
        Gd, Hd = damped(G, delta), damped(H, delta)
        np.testing.assert_allclose(res.objective, ref.f_ref(W, M, Gd, Hd), rtol=1e-8)
        np.testing.assert_allclose(res.total_objective, ref.f_ref(W, 0 * W, Gd, Hd), rtol=1e-10)
        np.testing.assert_allclose(res.error, np.linalg.norm(W - M) / np.linalg.norm(W), rtol=1e-8)
        assert res.gram_damping == delta


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("with_h", [False, True])
def test_every_fit_in_the_metric_is_no_worse_than_the_plain_fit_and_never_increases(name, with_h):
    """Claim: every structure's metric fit has a damped objective no larger than the plain
    (Frobenius) fit of the same configuration, measured in the same damped metric; the iterative
    fits (block-coordinate descent, hybrid, shared-basis MM) never increase it along their trace."""
    for seed in range(3):
        W, _, G, H = problem(10 + seed, with_h)
        cfg = config(name)
        plain = approximate(W, method=name, **cfg).reconstruction
        for delta in (0.0, 0.02):
            res = approximate(W, method=name, input_gram=G, output_gram=H, gram_damping=delta, **cfg)
            Gd, Hd = damped(G, delta), damped(H, delta)
            assert res.objective <= ref.f_ref(W, plain, Gd, Hd) * (1 + 1e-9) + 1e-12 * ref.f_ref(W, 0 * W, Gd, Hd)
            if res.error_trace is not None:
                assert np.all(np.diff(res.error_trace) <= TRACE_TOL)
                np.testing.assert_allclose(res.error_trace[-1] ** 2 * res.total_objective, res.objective, rtol=1e-7)
                assert res.stop_reason in ("tol", "max_iter") and 1 <= res.n_iter <= 100


def test_a_user_registered_layout_structure_fits_in_the_metric():
    """Claim: a layout structure registered by a user (upper-triangular blocks) fits in the metric
    through the registry's layout path: block-coordinate descent no worse than its plain fit, and
    output_error equal to the direct computation from samples."""
    W, X, G, _ = problem(3)
    with registered(UPPER):
        plain = approximate(W, method="upper", n_blocks=3, rank=1)
        res = approximate(W, method="upper", n_blocks=3, rank=1, input_gram=G, gram_damping=0.0)
        assert res.stop_reason in ("tol", "max_iter") and np.all(np.diff(res.error_trace) <= TRACE_TOL)
        assert res.objective <= ref.f_ref(W, plain.reconstruction, G) * (1 + 1e-9)
        direct = np.linalg.norm((W - res.reconstruction) @ X.T) / np.linalg.norm(W @ X.T)
        np.testing.assert_allclose(res.output_error, direct, rtol=1e-8)
        est = UPPER.estimator(n_blocks=3, rank=1, gram_damping=0.0).fit(W, input_gram=G)
        np.testing.assert_allclose(est.output_error_, res.output_error, rtol=1e-10)


def test_a_structure_without_a_metric_fit_refuses_a_gram():
    """Claim: a registered structure whose fit takes no Gram says so in one line when given one."""
    base = get_structure("global")
    plain_only = Structure(**{**base.__dict__, "name": "plainonly", "metric": False})
    W, _, G, _ = problem(4)
    with registered(plain_only):
        with pytest.raises(ValueError, match="no fit in a data metric"):
            approximate(W, method="plainonly", rank=2, input_gram=G)


# ---------------------------------------------------------------------------- exact fits
@pytest.mark.parametrize("with_h", [False, True])
@pytest.mark.parametrize("delta", [0.0, 0.1])
def test_global_is_the_whitened_svd(with_h, delta):
    """Claim: the global structure (approximate and GlobalLowRank) in the metric is the whitened
    truncation K^{-T} [K^T W L]_r L^{-1} in the damped Grams, and its objective their tail energy."""
    W, _, G, H = problem(5, with_h)
    Gd, Hd = damped(G, delta), damped(H, delta)
    for r in (1, 3):
        M_ref, s = ref.whitened(W, Gd, r, Hd)
        res = approximate(W, method="global", rank=r, input_gram=G, output_gram=H, gram_damping=delta)
        np.testing.assert_allclose(res.reconstruction, M_ref, atol=1e-8 * np.linalg.norm(W))
        np.testing.assert_allclose(res.objective, np.sum(s[r:] ** 2), rtol=1e-9)
        est = GlobalLowRank(rank=r, gram_damping=delta).fit(W, input_gram=G, output_gram=H)
        np.testing.assert_allclose(est.reconstruct(), M_ref, atol=1e-8 * np.linalg.norm(W))
        assert est.objective_ == pytest.approx(res.objective, rel=1e-12)


def test_an_output_weight_alone_is_the_other_side_of_the_metric():
    """Claim: output_gram alone (input_gram absent, G = I) fits in the metric ||H^{1/2} (W - M)||_F:
    the global fit is the whitened truncation K^{-T} [K^T W]_r (G = I in the reference)."""
    W, _, _, H = problem(6, with_h=True)
    res = approximate(W, method="global", rank=2, output_gram=H, gram_damping=0.0)
    M_ref, _ = ref.whitened(W, np.eye(W.shape[1]), 2, H)
    np.testing.assert_allclose(res.reconstruction, M_ref, atol=1e-8 * np.linalg.norm(W))


def test_a_shared_basis_warm_start_is_no_worse_than_its_start():
    """Claim: fit_shared_basis(init=(U, V, S)) starts from the given bases: its first pass (the exact
    s and U steps on them) is no worse than the fit given, and its trace never increases."""
    from blocklowrank import fit_shared_basis

    W, _, _, _ = problem(7)
    start = fit_shared_basis(W, 2, 3, max_iter=2)
    warm = fit_shared_basis(W, 2, 3, init=start.factors.shared, max_iter=5)
    assert warm.error_trace[0] <= start.error * (1 + 1e-12)
    assert np.all(np.diff(warm.error_trace) <= TRACE_TOL)
    with pytest.raises(ValueError, match="init"):
        fit_shared_basis(W, 2, 3, init=(start.factors.shared[0][:1], start.factors.shared[1], None))


def test_diagonal_is_the_per_block_closed_form():
    """Claim: the diagonal structure with H absent is exact in one step: each block equals the
    independent closed form (normal equations in G, whitened truncation in G_ii), for uneven cuts."""
    for seed, (k, r) in itertools.product(range(3), [(2, 2), (3, 1)]):
        W, _, G, _ = problem(20 + seed)
        res = approximate(W, method="diagonal", n_blocks=k, rank=r, input_gram=G, gram_damping=0.0)
        rc, cc = ref.cuts(W.shape[0], k), ref.cuts(W.shape[1], k)
        M_ref = diagonal_closed_form(W, G, rc, cc, [r] * k)
        np.testing.assert_allclose(res.reconstruction, M_ref, atol=1e-7 * np.linalg.norm(W))
        assert res.error_trace is None and res.stop_reason is None  # one exact step, no iteration


# ---------------------------------------------------------------------------- budgets and targets
def _diagonal_objectives(W, G, k, rmax):
    """``{rank tuple: f}`` of the diagonal structure's exact fit at every rank tuple (brute force)."""
    rc, cc = ref.cuts(W.shape[0], k), ref.cuts(W.shape[1], k)
    return {
        rk: ref.f_ref(W, diagonal_closed_form(W, G, rc, cc, rk), G)
        for rk in itertools.product(range(rmax + 1), repeat=k)
    }


@pytest.mark.parametrize("delta", [0.0, 0.05])
def test_budget_allocation_is_exact_where_blocks_decouple(delta):
    """Claim: for the diagonal structure with H absent the budget's per-block ranks are optimal in
    the damped metric: no rank tuple within the budget has a smaller damped objective (brute
    force over every tuple, objectives from the independent closed form); exact_allocation is True."""
    W, _, G, _ = problem(30, shape=(9, 9))
    fs = _diagonal_objectives(W, damped(G, delta), 3, 3)
    for budget in (6, 18, 30, 48):
        res = approximate(W, method="diagonal", n_blocks=3, budget=budget, input_gram=G, gram_damping=delta)
        assert res.exact_allocation
        best = min(f for rk, f in fs.items() if 6 * sum(rk) <= budget)
        assert res.n_params <= budget
        assert res.objective <= best * (1 + 1e-9)


def test_block_budget_on_a_coupled_metric_says_it_is_not_proven():
    """Claim: on a full grid with a coupled G the allocation is a heuristic: exact_allocation is
    False, the budget is kept, the descent never increases its objective, and the fit is no worse
    in the metric than the uniform ranks the budget allows (fitted the same way)."""
    W, _, G, _ = problem(31)
    res = approximate(W, method="block", n_blocks=2, budget=88, input_gram=G, gram_damping=0.0)
    uniform = approximate(W, method="block", n_blocks=2, rank=2, input_gram=G, gram_damping=0.0)
    assert res.exact_allocation is False and res.n_params <= 88
    assert np.all(np.diff(res.error_trace) <= TRACE_TOL)
    assert res.objective <= uniform.objective * (1 + 1e-12)


def test_max_error_bounds_the_output_error_with_the_fewest_parameters_where_exact():
    """Claim: with a Gram, max_error is a target on the output error: for the diagonal structure
    (H absent, no damping) the fit reaches it with exactly the fewest parameters over every rank
    tuple (brute force); with damping it still reaches it (exact_allocation False); an unreachable
    target raises."""
    W, X, G, _ = problem(32, shape=(9, 9))
    fs = _diagonal_objectives(W, G, 3, 3)
    tot = ref.f_ref(W, 0 * W, G)
    lowest = np.sqrt(min(fs.values()) / tot)
    full_rank_damped = approximate(
        W, method="diagonal", n_blocks=3, rank=3, input_gram=G, gram_damping=0.05
    ).output_error
    for target in lowest + (1 - lowest) * np.array([0.6, 0.3, 0.1, 0.02]):
        res = approximate(W, method="diagonal", n_blocks=3, max_error=target, input_gram=G, gram_damping=0.0)
        assert res.exact_allocation and res.output_error <= target * (1 + 1e-9)
        fewest = min(sum(rk) for rk, f in fs.items() if np.sqrt(f / tot) <= target)
        assert res.n_params == 6 * fewest
        if target >= full_rank_damped:  # damping moves the fits: targets below what they reach at full rank fail
            damp = approximate(W, method="diagonal", n_blocks=3, max_error=target, input_gram=G, gram_damping=0.05)
            direct = np.linalg.norm((W - damp.reconstruction) @ X.T) / np.linalg.norm(W @ X.T)
            assert damp.exact_allocation is False and direct <= target * (1 + 1e-9)
    coupled = approximate(W, method="block", n_blocks=3, max_error=0.2, input_gram=G)
    assert coupled.output_error <= 0.2 and coupled.exact_allocation is False
    with pytest.raises(ValueError, match="cannot be reached"):
        approximate(W, method="diagonal", n_blocks=3, max_error=0.5 * lowest, input_gram=G, gram_damping=0.0)


def test_spectra_in_the_metric_give_the_fits_errors_where_exact():
    """Claim: block_spectra in a metric give, where the blocks decouple (global; diagonal with H
    absent), the damped relative error of the metric fit at any ranks; on a coupled grid they say
    exact=False; on a stack they are those of each matrix."""
    W, _, G, _ = problem(33)
    for name, k in (("global", 1), ("diagonal", 2)):
        lay = get_structure(name).layout(W.shape, k)
        sp = block_spectra(W, lay, input_gram=G, gram_damping=0.02)
        assert sp.exact
        for r in (1, 2, 4):
            res = approximate(W, method=name, n_blocks=k, rank=r, input_gram=G, gram_damping=0.02)
            np.testing.assert_allclose(sp.error(r), np.sqrt(res.objective / res.total_objective), rtol=1e-9)
    assert not block_spectra(W, BlockLayout.block(W.shape, 2), input_gram=G).exact
    S = np.stack([W, np.random.default_rng(1).standard_normal(W.shape)])
    lay = BlockLayout.diagonal(W.shape, 2)
    both = block_spectra(S, lay, input_gram=G)
    for t in range(2):
        np.testing.assert_allclose(both.error(2)[t], block_spectra(S[t], lay, input_gram=G).error(2), rtol=1e-12)


def test_one_total_budget_over_layers_minimises_the_sum_of_squared_relative_errors():
    """Claim: allocate_total_budget minimises sum_l f_l(r_l) / f_l(0) over every rank vector within the
    budget (brute force), for layers whose metrics have very different scales."""
    rng = np.random.default_rng(40)
    layers = []
    for scale, shape in ((1.0, (6, 5)), (1e4, (5, 7)), (1e-3, (6, 6))):
        W = rng.standard_normal(shape) @ np.diag(np.exp(rng.uniform(-2, 1, shape[1])))
        _, G = ref.sample_gram(rng, shape[1])
        layers.append((W, scale * G))
    sps = [block_spectra(W, BlockLayout.global_(W.shape), input_gram=G, gram_damping=0.0) for W, G in layers]

    def rel(t, r):
        W, G = layers[t]
        return ref.f_ref(W, ref.whitened(W, G, r)[0], G) / ref.f_ref(W, 0 * W, G) if r else 1.0

    costs = [sum(W.shape) for W, _ in layers]
    for budget in (11, 30, 60, 90):
        ranks, exact = allocate_total_budget(sps, budget)
        got = sum(rel(t, int(r.sum())) for t, r in enumerate(ranks))
        best = min(
            sum(rel(t, r) for t, r in enumerate(rk))
            for rk in itertools.product(range(6), range(6), range(7))
            if sum(r * c for r, c in zip(rk, costs)) <= budget
        )
        assert sum(int(r.sum()) * c for r, c in zip(ranks, costs)) <= budget
        assert got <= best + 1e-9
        assert exact


def test_compare_at_budget_ranks_by_output_error_in_the_metric():
    """Claim: compare_at_budget with a Gram fits every configuration in the metric: each row's
    output_error and error are those of that fit (approximate with the same configuration), and
    rows are sorted by output_error; without a Gram output_error equals error."""
    W, _, G, _ = problem(41)
    rows = compare_at_budget(W, 88, methods=NAMES, n_blocks=[2], input_gram=G)
    outs = [r["output_error"] for r in rows]
    assert outs == sorted(outs)
    for r in rows:
        if r["allocation"] == "uniform":
            kw = {
                "n_blocks": r["n_blocks"],
                "rank": r["rank"],
                **({"global_rank": r["global_rank"]} if r["global_rank"] else {}),
            }
            res = approximate(W, method=r["method"], input_gram=G, **kw)
            np.testing.assert_allclose(r["output_error"], res.output_error, rtol=1e-9)
            np.testing.assert_allclose(r["error"], res.error, rtol=1e-9)
    for r in compare_at_budget(W, 88, n_blocks=[2]):
        assert r["output_error"] == r["error"]


# ---------------------------------------------------------------------------- stacks, shared factors
@pytest.mark.parametrize("name", NAMES)
def test_a_stack_is_fitted_matrix_by_matrix_with_one_shared_gram(name):
    """Claim: the metric fit of a stack is the fit of each matrix alone (one GramFactor shared), and
    a GramFactor built once gives the fits an array gives."""
    W, _, G, _ = problem(50)
    S = np.stack([W, np.random.default_rng(2).standard_normal(W.shape)])
    cfg = config(name)
    gf = GramFactor(G, W.shape[1])
    both = approximate(S, method=name, input_gram=gf, **cfg)
    for t in range(2):
        one = approximate(S[t], method=name, input_gram=G, **cfg)
        np.testing.assert_allclose(both.reconstruction[t], one.reconstruction, atol=1e-10 * np.linalg.norm(S[t]))
        np.testing.assert_allclose(both.output_error[t], one.output_error, rtol=1e-9)


def test_a_gram_factor_keeps_its_factor_only_and_redamps_on_request():
    """Claim: a GramFactor holds its Cholesky factor only (n^2 float64 numbers), built once it serves
    every damping asked for (with_damping equals a fresh build in products), and a fit given it with
    another gram_damping equals the fit given the array with that damping."""
    W, _, G, _ = problem(51)
    n = W.shape[1]
    gf = GramFactor(G, n, damping=0.0)
    assert gf.kind == "cholesky" and gf.nbytes == n * n * 8
    other = gf.with_damping(0.2)
    fresh = GramFactor(G, n, damping=0.2)
    X = np.random.default_rng(3).standard_normal((4, n))
    np.testing.assert_allclose(
        np.ldexp(other.rmul(X), other.log2_scale), np.ldexp(fresh.rmul(X), fresh.log2_scale), rtol=1e-12
    )
    a = approximate(W, method="block", n_blocks=2, rank=2, input_gram=gf, gram_damping=0.2)
    b = approximate(W, method="block", n_blocks=2, rank=2, input_gram=G, gram_damping=0.2)
    np.testing.assert_allclose(a.reconstruction, b.reconstruction, atol=1e-10 * np.linalg.norm(W))


def test_statistics_stored_in_float32_need_their_rounding_allowance():
    """Claim: a singular second moment rounded to float32 and read back as float64 has negative
    eigenvalues at float32's rounding: refused at float64's allowance, accepted with ``psd_tol`` at
    float32's, and a clearly indefinite matrix is refused at any rounding-level tolerance."""
    X = np.random.default_rng(8).standard_normal((5, 40))
    G = (X.T @ X / 5).astype(np.float32).astype(np.float64)
    lmin = np.linalg.eigvalsh(G)[0]
    assert lmin < -32 * np.finfo(np.float64).eps * np.trace(G)  # the premise: beyond float64 rounding
    with pytest.raises(ValueError, match="not positive semi-definite"):
        GramFactor(G, 40, damping=0.0)
    gf = GramFactor(G, 40, damping=0.0, psd_tol=1e-6)
    assert gf.kind == "eigen" and gf.rank == 5
    bad = G - 1e-3 * np.trace(G) / 40 * np.eye(40)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        GramFactor(bad, 40, damping=0.0, psd_tol=1e-6)


def test_a_permuted_layout_is_fitted_in_its_own_coordinates():
    """Claim: fit_layout with a permuted diagonal layout in a metric equals the independent closed
    form of the permuted problem (W[rows][:, cols], G[cols][:, cols]), put back in place."""
    W, _, G, _ = problem(52)
    rng = np.random.default_rng(4)
    rp, cp = rng.permutation(W.shape[0]), rng.permutation(W.shape[1])
    lay = BlockLayout.diagonal(W.shape, 2, rank=2).with_permutation(rp, cp)
    res = fit_layout(W, lay, input_gram=G, gram_damping=0.0)
    rc, cc = ref.cuts(W.shape[0], 2), ref.cuts(W.shape[1], 2)
    Mp = diagonal_closed_form(W[rp][:, cp], G[np.ix_(cp, cp)], rc, cc, [2, 2])
    M = np.empty_like(Mp)
    M[np.ix_(rp, cp)] = Mp
    np.testing.assert_allclose(res.reconstruction, M, atol=1e-8 * np.linalg.norm(W))


# ---------------------------------------------------------------------------- estimators
@pytest.mark.parametrize("name", NAMES)
def test_estimators_fit_in_the_metric_and_report_output_error(name):
    """Claim: every structure's estimator fits in the metric like approximate (error_, output_error_,
    the reconstruction; fit_transform's codes decode to it), keeps no Gram, and a refit without one
    is the plain fit again (output_error_ = error_, no objective_ left over)."""
    W, _, G, _ = problem(60)
    s = get_structure(name)
    cfg = config(name)
    res = approximate(W, method=name, input_gram=G, gram_damping=0.05, **cfg)
    params = {k: v for k, v in cfg.items() if k in s.estimator().get_params()}
    est = s.estimator(**params, gram_damping=0.05)
    Z = est.fit_transform(W, input_gram=G)
    np.testing.assert_allclose(est.inverse_transform(Z), res.reconstruction, atol=1e-9 * np.linalg.norm(W))
    assert est.output_error_ == pytest.approx(res.output_error, rel=1e-9)
    assert est.error_ == pytest.approx(res.error, rel=1e-9)
    assert est.objective_ == pytest.approx(res.objective, rel=1e-9)
    held = [v for v in vars(est).values() if isinstance(v, (np.ndarray, GramFactor)) and np.shape(v) == G.shape]
    assert not any(np.array_equal(v, G) for v in held if isinstance(v, np.ndarray)) and not any(
        isinstance(v, GramFactor) for v in held
    )
    est.fit(W)
    assert est.output_error_ == est.error_ and not hasattr(est, "objective_")


def test_metadata_routing_in_a_pipeline_and_grid_search_over_gram_damping():
    """Claim: with scikit-learn's metadata routing, a Pipeline routes input_gram to the estimator's
    fit (the same fit as a direct call), and GridSearchCV tunes gram_damping with the Gram routed:
    every candidate is fitted in the metric with its own damping."""
    W, _, G, _ = problem(61)
    with sklearn.config_context(enable_metadata_routing=True):
        pipe = Pipeline([("fit", GlobalLowRank(rank=2).set_fit_request(input_gram=True))]).fit(W, input_gram=G)
        direct = GlobalLowRank(rank=2).fit(W, input_gram=G)
        assert pipe[-1].output_error_ == pytest.approx(direct.output_error_, rel=1e-12)
        est = get_structure("block").estimator(n_blocks=2, rank=1).set_fit_request(input_gram=True)
        search = GridSearchCV(est, {"gram_damping": [0.0, 0.01, 1.0]}, cv=single_fit_cv(len(W)))
        search.fit(W, input_gram=G)
    best = search.best_estimator_
    assert best.gram_damping in (0.0, 0.01, 1.0)
    ref_fit = approximate(W, method="block", n_blocks=2, rank=1, input_gram=G, gram_damping=best.gram_damping)
    assert best.output_error_ == pytest.approx(ref_fit.output_error, rel=1e-9)
    assert len(search.cv_results_["params"]) == 3


# ---------------------------------------------------------------------------- hostile Grams
def _entry_points(W):
    """Every public way a Gram reaches a fit: ``call(input_gram, output_gram)``."""
    m, n = W.shape
    calls = {
        f"approximate[{name}]": (
            lambda name: (
                lambda g, h: approximate(
                    W, method=name, input_gram=g, output_gram=h, **config(name, W.shape, 3 * (m + n))
                )
            )
        )(name)
        for name in NAMES
    }
    calls.update(
        fit_layout=lambda g, h: fit_layout(W, BlockLayout.block(W.shape, 2, rank=1), input_gram=g, output_gram=h),
        block_spectra=lambda g, h: block_spectra(W, BlockLayout.diagonal(W.shape, 2), input_gram=g, output_gram=h),
        compare_at_budget=lambda g, h: compare_at_budget(W, 3 * (m + n), n_blocks=[2], input_gram=g, output_gram=h),
        output_error=lambda g, h: output_error(W, W, g, h),
    )
    return calls


@pytest.mark.parametrize("case", list(ref.hostile_grams(10)))
@pytest.mark.parametrize("side", ["input_gram", "output_gram"])
def test_hostile_grams_are_refused_everywhere_in_one_line(case, side):
    """Claim: a Gram that is not a real, dense, finite, symmetric PSD matrix of the layer's side is
    refused with one clear error naming input_gram / output_gram at every entry point (approximate
    for every structure, fit_layout, block_spectra, compare_at_budget, output_error, the
    estimators), and an estimator whose fit was refused is not fitted."""
    W = np.random.default_rng(0).standard_normal((10, 10))
    bad = ref.hostile_grams(10)[case]
    args = (bad, None) if side == "input_gram" else (np.eye(10) + 0.1, bad)
    for where, call in _entry_points(W).items():
        with pytest.raises((ValueError, TypeError), match=side) as err:
            call(*args)
        assert "\n" not in str(err.value), where
    for name in NAMES:
        est = get_structure(name).estimator()
        with pytest.raises((ValueError, TypeError), match=side):
            est.fit(W, **dict(zip(("input_gram", "output_gram"), args)))
        with pytest.raises(NotFittedError):
            check_is_fitted(est)

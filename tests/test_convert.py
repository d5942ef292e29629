"""Converters (GraLoRA tensors, MELoRA lists, dense, global refit), rank report, .npz files."""

import numpy as np
import pytest
from scipy.linalg import block_diag

from blocklowrank import (
    BlockLayout,
    BlockLowRank,
    DiagonalBlockLowRank,
    GlobalLowRank,
    HybridLowRank,
    SharedBasisLowRank,
    approximate,
    fit_hybrid,
    fit_shared_basis,
)
from blocklowrank.convert import (
    as_factors,
    from_gralora,
    from_melora,
    gralora_delta_weight,
    rank_report,
    refit_global,
    save_factors,
    to_dense,
    to_gralora,
    to_melora,
)
from blocklowrank.factors import FORMAT_VERSION, FactorsFileError, StructuredFactors, load_factors


# ---------------------------------------------------------------------------- PEFT reference
def peft_forward(x, gA, gB, gA_gen=None, gB_gen=None, scaling=1.0):
    """NumPy transcription of PEFT 0.21.2 ``gralora.layer.Linear.forward`` (adapter part).

    x: [B, L, in]; gralora_A: [N, in/N, r]; gralora_B: [N, r, out/N];
    hybrid ``nn.Linear`` weights gA_gen: [hybrid_r, in], gB_gen: [out, hybrid_r].
    """
    B, L, in_features = x.shape
    N = gA.shape[0]
    sub = gA.shape[2] // N
    h = np.einsum("blni,nir->blnr", x.reshape(B, L, N, in_features // N), gA)
    h = h.reshape(B, L, N, N, sub).transpose(0, 1, 3, 2, 4).reshape(B, L, N, N * sub)
    out = np.einsum("bljr,jro->bljo", h, gB).reshape(B, L, -1)
    result = scaling * out
    if gA_gen is not None:
        result = result + scaling * ((x @ gA_gen.T) @ gB_gen.T)
    return result


def peft_delta_weight_from_forward(gA, gB, gA_gen=None, gB_gen=None, scaling=1.0):
    """Delta W (out x in) from the forward pass: y = x @ Delta W.T, so feed the identity."""
    in_features = gA.shape[0] * gA.shape[1]
    eye = np.eye(in_features)[:, None, :]  # [in, 1, in]
    y = peft_forward(eye, gA, gB, gA_gen, gB_gen, scaling)[:, 0, :]  # [in, out] = Delta W.T
    return y.T


def peft_get_delta_weight(gA, gB, scaling=1.0):
    """NumPy transcription of PEFT 0.21.2 ``get_delta_weight`` (scatter form, no hybrid)."""
    N, in_sub, r = gA.shape
    in_features = N * in_sub
    out_features = N * gB.shape[2]
    sub = r // N
    idx = np.arange(in_features)
    n_idx = idx // in_sub
    i_idx = idx % in_sub
    scattered = np.zeros((in_features, N, r))
    scattered[idx, n_idx, :] = gA[n_idx, i_idx, :]
    dw = (
        np.einsum(
            "ikr,kro->iko",
            scattered.reshape(in_features, N, N, sub).transpose(0, 2, 1, 3).reshape(in_features, N, r),
            gB,
        )
        .reshape(in_features, out_features)
        .T
    )
    return dw * scaling


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------------------- GraLoRA
@pytest.mark.parametrize("N, rb, out_f, in_f", [(2, 1, 8, 6), (2, 2, 28, 28), (4, 1, 16, 12), (3, 2, 9, 12)])
def test_gralora_tensors_assemble_like_peft(rng, N, rb, out_f, in_f):
    r = N * rb
    gA = rng.standard_normal((N, in_f // N, r))
    gB = rng.standard_normal((N, r, out_f // N))
    ref = peft_delta_weight_from_forward(gA, gB, scaling=0.7)
    np.testing.assert_allclose(peft_get_delta_weight(gA, gB, 0.7), ref, atol=1e-12)
    sf = from_gralora(gA, gB, scaling=0.7)
    assert sf.layout.shape == (out_f, in_f) and sf.layout.n_blocks == (N, N)
    assert sf.layout.uniform_rank == rb
    np.testing.assert_allclose(sf.to_dense(), ref, atol=1e-12)
    np.testing.assert_allclose(gralora_delta_weight(gA, gB, scaling=0.7), ref, atol=1e-12)
    # and back: the same tensors
    t = to_gralora(sf, scaling=0.7)
    np.testing.assert_allclose(t["gralora_A"], gA, atol=1e-12)
    np.testing.assert_allclose(t["gralora_B"], gB, atol=1e-12)
    assert (t["r"], t["gralora_k"], t["hybrid_r"]) == (r, N, 0)


def test_hybrid_gralora_assembles_like_peft(rng):
    N, r, hr, out_f, in_f = 2, 4, 3, 10, 8
    gA = rng.standard_normal((N, in_f // N, r))
    gB = rng.standard_normal((N, r, out_f // N))
    gAg = rng.standard_normal((hr, in_f))
    gBg = rng.standard_normal((out_f, hr))
    scaling = 16 / (r + hr)
    ref = peft_delta_weight_from_forward(gA, gB, gAg, gBg, scaling)
    sf = from_gralora(gA, gB, gralora_A_general=gAg, gralora_B_general=gBg, scaling=scaling)
    assert sf.kind == "hybrid" and sf.global_rank == hr
    np.testing.assert_allclose(sf.to_dense(), ref, atol=1e-12)
    t = to_gralora(sf, scaling=scaling)
    for key, want in [("gralora_A", gA), ("gralora_B", gB), ("gralora_A_general", gAg), ("gralora_B_general", gBg)]:
        np.testing.assert_allclose(t[key], want, atol=1e-12)
    assert t["hybrid_r"] == hr


@pytest.mark.parametrize("scaling", [1.0, 0.25])
def test_fitted_localized_to_gralora(rng, scaling):
    X = rng.standard_normal((12, 8))
    est = BlockLowRank(n_blocks=2, rank=2).fit(X)
    t = to_gralora(est, scaling=scaling)
    assert t["gralora_A"].shape == (2, 4, 4) and t["gralora_B"].shape == (2, 4, 6)
    ref = peft_delta_weight_from_forward(t["gralora_A"], t["gralora_B"], scaling=scaling)
    np.testing.assert_allclose(ref, est.reconstruct(), atol=1e-12)
    back = from_gralora(t["gralora_A"], t["gralora_B"], scaling=scaling)
    assert back.layout == est.layout_
    for key, (B, A) in est.factors_.items():
        np.testing.assert_allclose(back.factors[key][0], B, atol=1e-12)
        np.testing.assert_allclose(back.factors[key][1], A, atol=1e-12)


def test_fitted_hybrid_to_gralora(rng):
    X = rng.standard_normal((12, 8))
    est = HybridLowRank(n_blocks=2, rank=1, global_rank=2).fit(X)
    t = to_gralora(est, scaling=2.0)
    assert t["hybrid_r"] == 2 and t["gralora_A_general"].shape == (2, 8)
    ref = peft_delta_weight_from_forward(
        t["gralora_A"], t["gralora_B"], t["gralora_A_general"], t["gralora_B_general"], 2.0
    )
    np.testing.assert_allclose(ref, est.reconstruct(), atol=1e-12)


def test_shared_basis_to_gralora(rng):
    X = rng.standard_normal((12, 8))
    est = SharedBasisLowRank(n_blocks=2, rank=2).fit(X)
    t = to_gralora(est)
    ref = peft_delta_weight_from_forward(t["gralora_A"], t["gralora_B"])
    np.testing.assert_allclose(ref, est.reconstruct(), atol=1e-12)


@pytest.mark.parametrize(
    "obj, match",
    [
        (lambda X: approximate(X, method="diagonal", n_blocks=2, rank=1), "full K x K grid"),
        (lambda X: approximate(X[:11], method="block", n_blocks=2, rank=1), "equal blocks"),
        (lambda X: approximate(X, method="block", n_blocks=(2, 4), rank=1), "full K x K grid"),
        (lambda X: approximate(X, BlockLayout.block((12, 8), 2, rank=[[1, 2], [1, 1]])), "same rank"),
    ],
)
def test_to_gralora_refuses_other_structures(rng, obj, match):
    X = rng.standard_normal((12, 8))
    with pytest.raises(ValueError, match=match):
        to_gralora(obj(X))


def test_from_gralora_shape_errors(rng):
    with pytest.raises(ValueError, match="divisible"):
        from_gralora(np.zeros((2, 3, 3)), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="gralora_B must have shape"):
        from_gralora(np.zeros((2, 3, 4)), np.zeros((2, 2, 4)))
    with pytest.raises(ValueError, match="both"):
        from_gralora(np.zeros((2, 3, 4)), np.zeros((2, 4, 4)), gralora_A_general=np.zeros((1, 6)))


# ---------------------------------------------------------------------------- MELoRA, dense
def test_melora_round_trip(rng):
    X = rng.standard_normal((11, 9))
    est = DiagonalBlockLowRank(n_blocks=3, rank=2).fit(X)
    pairs = to_melora(est)
    assert len(pairs) == 3 and [B.shape for B, _ in pairs] == [(4, 2), (4, 2), (3, 2)]
    np.testing.assert_allclose(block_diag(*[B @ A for B, A in pairs]), est.reconstruct(), atol=1e-12)
    sf = from_melora(pairs)
    assert sf.layout == est.layout_
    np.testing.assert_allclose(sf.to_dense(), est.reconstruct(), atol=1e-12)
    again = to_melora(sf)
    for (B1, A1), (B2, A2) in zip(pairs, again):
        np.testing.assert_array_equal(B1, B2)
        np.testing.assert_array_equal(A1, A2)


def test_from_melora_mixed_ranks_and_sizes(rng):
    pairs = [
        (rng.standard_normal((3, 1)), rng.standard_normal((1, 5))),
        (rng.standard_normal((6, 2)), rng.standard_normal((2, 2))),
    ]
    sf = from_melora(pairs)
    assert sf.layout.shape == (9, 7) and sf.layout.ranks.tolist() == [[1, 0], [0, 2]]
    np.testing.assert_allclose(sf.to_dense(), block_diag(*[B @ A for B, A in pairs]))
    with pytest.raises(ValueError, match="pair 0"):
        from_melora([(np.zeros((3, 2)), np.zeros((1, 5)))])
    with pytest.raises(ValueError, match="diagonal layout"):
        to_melora(approximate(rng.standard_normal((6, 6)), method="block", n_blocks=2, rank=1))


def test_to_dense_every_kind(rng):
    X = rng.standard_normal((12, 10))
    objs = [
        approximate(X, method="block", n_blocks=2, rank=1),
        GlobalLowRank(rank=2).fit(X),
        DiagonalBlockLowRank(n_blocks=2, rank=2).fit(X),
        HybridLowRank(n_blocks=2, rank=1, global_rank=1).fit(X),
        SharedBasisLowRank(n_blocks=2, rank=2).fit(X),
    ]
    for obj in objs:
        want = obj.reconstruction if hasattr(obj, "reconstruction") else obj.reconstruct()
        np.testing.assert_allclose(to_dense(obj), want, atol=1e-12)
    lay = BlockLayout.block((4, 4), 2, rank=1)
    f = {k: (np.ones((2, 1)), np.ones((1, 2))) for k in [(0, 0), (0, 1), (1, 0), (1, 1)]}
    np.testing.assert_array_equal(to_dense((lay, f)), np.ones((4, 4)))
    with pytest.raises(ValueError, match="missing active block"):
        as_factors((lay, {(0, 0): f[(0, 0)]}))
    with pytest.raises(TypeError, match="expected StructuredFactors"):
        as_factors(np.ones((3, 3)))


def _random_factors(lay, rng, stack=()):
    """Gaussian factors for every active block of ``lay`` (and a stack shape)."""
    return {
        (i, j): (
            rng.standard_normal(stack + (lay.block_shape(i, j)[0], int(lay.ranks[i, j]))),
            rng.standard_normal(stack + (int(lay.ranks[i, j]), lay.block_shape(i, j)[1])),
        )
        for i, j in zip(*np.nonzero(lay.active))
    }


@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
def test_transpose_is_the_transposed_matrix():
    """Claim: for any layout (uneven cuts, any pattern, row/column permutations), any factors, a global term or
    not, and shared bases, ``f.transpose()`` holds the transpose of ``f``'s matrix with the same parameter count;
    transposing twice gives the same matrix. The reference is NumPy's ``.T`` of the dense matrix."""
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from blocklowrank.testing.strategies import layouts

    @settings(max_examples=40, derandomize=True, database=None, deadline=None)
    @given(lay=layouts(max_side=9, cuts="random"), seed=st.integers(0, 2**16), extra=st.integers(0, 2))
    def check(lay, seed, extra):
        rng = np.random.default_rng(seed)
        m, n = lay.shape
        if seed % 2:
            lay = lay.with_permutation(rng.permutation(m), rng.permutation(n))
        r_g = min(extra, m, n)
        gf = (rng.standard_normal((m, r_g)), rng.standard_normal((r_g, n))) if r_g else None
        f = StructuredFactors(lay, _random_factors(lay, rng), global_factors=gf)
        t = f.transpose()
        np.testing.assert_allclose(t.to_dense(), f.to_dense().T, atol=1e-12)
        assert t.shape == (n, m) and t.n_params == f.n_params
        np.testing.assert_allclose(t.transpose().to_dense(), f.to_dense(), atol=1e-12)

    check()
    rng = np.random.default_rng(0)
    for fit in (SharedBasisLowRank(n_blocks=2, rank=2).fit(rng.standard_normal((12, 10))),):
        f = as_factors(fit)
        np.testing.assert_allclose(f.transpose().to_dense(), f.to_dense().T, atol=1e-12)
        assert f.transpose().n_params == f.n_params
    stack = StructuredFactors(lay := BlockLayout.block((6, 4), 2, rank=1), _random_factors(lay, rng, (3,)))
    np.testing.assert_allclose(stack.transpose().to_dense(), np.swapaxes(stack.to_dense(), -1, -2), atol=1e-12)


def test_refit_global(rng):
    X = rng.standard_normal((16, 16))
    a = approximate(X, method="block", n_blocks=2, rank=2)
    g = refit_global(a, 4)
    assert g.layout.shape == (16, 16) and g.ranks.tolist() == [[4]]
    s = np.linalg.svd(a.reconstruction, compute_uv=False)
    assert g.error == pytest.approx(np.sqrt((s[4:] ** 2).sum() / (s**2).sum()), rel=1e-10)
    # a global structure of rank r refits exactly at rank r
    assert refit_global(approximate(X, method="global", rank=3), 3).error < 1e-12


# ---------------------------------------------------------------------------- rank report
def test_rank_report_nominal_vs_numerical(rng):
    X = rng.standard_normal((28, 28))
    rep = rank_report(approximate(X, method="block", n_blocks=2, rank=2))
    assert rep["nominal_ranks"] == [[2, 2], [2, 2]]
    assert rep["total_nominal_rank"] == 8 and rep["numerical_rank"] == 8 and rep["rank_bound"] == 8
    assert rep["n_params"] == 224
    rep = rank_report(approximate(X, method="global", rank=4))
    assert rep["total_nominal_rank"] == rep["numerical_rank"] == 4
    rep = rank_report(approximate(X, method="diagonal", n_blocks=4, rank=4))
    assert rep["numerical_rank"] == 16 and rep["n_params"] == 224
    rep = rank_report(HybridLowRank(n_blocks=2, rank=1, global_rank=2).fit(X))
    assert rep["kind"] == "hybrid" and rep["global_rank"] == 2
    assert rep["total_nominal_rank"] == 6 and rep["numerical_rank"] == 6
    rep = rank_report(SharedBasisLowRank(n_blocks=2, rank=3).fit(X))
    assert rep["kind"] == "shared_basis"
    assert rep["total_nominal_rank"] == 12 and rep["rank_bound"] == 6 and rep["numerical_rank"] == 6
    # 16 rank-1 blocks of a 4x4 grid on an 8x8 matrix: the rank is capped by min(m, n)
    rep = rank_report(approximate(rng.standard_normal((8, 8)), method="block", n_blocks=4, rank=1))
    assert rep["total_nominal_rank"] == 16 and rep["rank_bound"] == 8 and rep["numerical_rank"] == 8


def test_rank_report_sees_rank_deficiency(rng):
    # a planted rank-1 matrix fitted by 2x2 blocks of rank 1: nominal total 4, true rank 1
    X = np.outer(rng.standard_normal(10), rng.standard_normal(10))
    rep = rank_report(approximate(X, method="block", n_blocks=2, rank=1))
    assert rep["total_nominal_rank"] == 4 and rep["numerical_rank"] == 1


# ---------------------------------------------------------------------------- files
def _fitted_objects():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((12, 10))
    X32 = X.astype(np.float32)
    return {
        "approximation": approximate(X, method="block", n_blocks=(3, 2), rank=1),
        "global": GlobalLowRank(rank=2).fit(X),
        "diagonal": DiagonalBlockLowRank(n_blocks=2, rank=2).fit(X),
        "block32": BlockLowRank(n_blocks=2, rank=2).fit(X32),
        "hybrid": HybridLowRank(n_blocks=2, rank=1, global_rank=2).fit(X),
        "hybrid_fit": fit_hybrid(X, BlockLayout.diagonal((12, 10), 2, rank=2), 1),
        "shared": SharedBasisLowRank(n_blocks=(2, 2), rank=2).fit(X),
        "shared_fit": fit_shared_basis(X32, 2, 2),
        "gralora": from_gralora(rng.standard_normal((2, 5, 2)), rng.standard_normal((2, 2, 6))),
    }


@pytest.mark.parametrize("name", list(_fitted_objects()))
def test_save_load_round_trip(tmp_path, name):
    obj = _fitted_objects()[name]
    sf = as_factors(obj)
    path = tmp_path / f"{name}.npz"
    save_factors(path, obj)
    back = load_factors(path)
    assert isinstance(back, StructuredFactors)
    assert back.kind == sf.kind and back.layout == sf.layout
    assert back.n_params == sf.n_params and back.global_rank == sf.global_rank
    assert back.dtype == sf.dtype
    np.testing.assert_array_equal(back.to_dense(), sf.to_dense())
    assert back.meta["library_version"]
    if "error" in sf.meta:
        assert back.meta["error"] == pytest.approx(sf.meta["error"])


def _rewrite(src, dst, **changes):
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for k, v in changes.items():
        if v is None:
            del arrays[k]
        else:
            arrays[k] = np.array(v)
    np.savez(dst, **arrays)


def test_load_refuses_incompatible_files(tmp_path):
    X = np.random.default_rng(2).standard_normal((6, 6))
    good = tmp_path / "good.npz"
    save_factors(good, approximate(X, method="block", n_blocks=2, rank=1))
    bad = tmp_path / "bad.npz"
    _rewrite(good, bad, format_version=FORMAT_VERSION + 1)
    with pytest.raises(FactorsFileError, match="format version 2"):
        load_factors(bad)
    _rewrite(good, bad, library_version="7.0.0")
    with pytest.raises(FactorsFileError, match="major version"):
        load_factors(bad)
    _rewrite(good, bad, layout=None)
    with pytest.raises(FactorsFileError, match="missing \\['layout'\\]"):
        load_factors(bad)
    _rewrite(good, bad, format=None)
    with pytest.raises(FactorsFileError, match="not a blocklowrank factors file"):
        load_factors(bad)
    np.savez(bad, x=np.ones(3))
    with pytest.raises(ValueError, match="not a blocklowrank factors file"):
        load_factors(bad)
    # no pickle: object arrays are refused by numpy itself
    np.savez(bad, format=np.array(["blocklowrank-factors", None], dtype=object))
    with pytest.raises(ValueError):
        load_factors(bad)

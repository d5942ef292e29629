"""Hostile-input pass, part 1 (issue 12): conversions, files, public kernels.

Every test asserts the RIGHT behaviour ("right answer or a clear error, never a
wrong one"); each failed on the code before the fix (they were committed first as
strict xfails, see the history). Reference values come from dense NumPy algebra in the test, never from
the code under test. Classes 5-8 and the friction items are in
``test_hostile_more.py``.
"""

import numpy as np
import pytest

pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import blocklowrank._engine as engine  # noqa: E402  (block_spectra)
from blocklowrank import (  # noqa: E402  # noqa: E402
    BlockLayout,
    BlockLowRank,
    DiagonalBlockLowRank,
    FactorsFileError,
    allocate_ranks,
    approximate,
    batched_svd,
    budget_sweep_points,
    convert,
    fit_hybrid,
    fit_shared_basis,
    hybrid_params,
    load_factors,
    permutations,
    rank_report,
    save_factors,
    shared_basis_params,
    split_sizes,
)
from blocklowrank._svd import svd_flip_v  # noqa: E402
from blocklowrank.testing import generators  # noqa: E402

FileError = FactorsFileError
CLEAR = (ValueError, TypeError)
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None)


def _X(m=8, n=8, seed=0):
    return np.random.default_rng(seed).standard_normal((m, n))


def _perm(n, seed=1):
    return np.random.default_rng(seed).permutation(n)


def _npz_arrays(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# =============================================================================
# Class 1: conversions lose information (permutations, dtypes, dropped blocks)
# =============================================================================
def test_to_dense_estimator_row_perm():
    est = BlockLowRank(n_blocks=2, rank=1, row_perm="strided").fit(_X())
    np.testing.assert_allclose(convert.to_dense(est), est.reconstruct(), atol=1e-12)


def test_to_dense_permuted_layout():
    lay = BlockLayout.block((8, 8), 2).with_permutation(_perm(8), _perm(8, 2))
    a = approximate(_X(), lay, rank=1)
    np.testing.assert_allclose(convert.to_dense(a), a.reconstruction, atol=1e-12)


def test_refit_global_full_rank_reproduces_permuted_update():
    est = BlockLowRank(n_blocks=2, rank=1, col_perm="strided").fit(_X())
    np.testing.assert_allclose(convert.refit_global(est, 8).reconstruction, est.reconstruct(), atol=1e-10)


def test_to_gralora_permuted_round_trips_or_refuses():
    lay = BlockLayout.block((8, 8), 2).with_permutation(row_perm=_perm(8))
    a = approximate(_X(), lay, rank=1)
    try:
        t = convert.to_gralora(a)
    except ValueError as exc:
        assert "permut" in str(exc)
        return
    np.testing.assert_allclose(
        convert.gralora_delta_weight(t["gralora_A"], t["gralora_B"]), a.reconstruction, atol=1e-12
    )


def test_to_melora_permuted_round_trips_or_refuses():
    est = DiagonalBlockLowRank(n_blocks=2, rank=1, row_perm="strided").fit(_X())
    try:
        pairs = convert.to_melora(est)
    except ValueError as exc:
        assert "permut" in str(exc)
        return
    D = np.zeros((8, 8))
    D[:4, :4] = pairs[0][0] @ pairs[0][1]
    D[4:, 4:] = pairs[1][0] @ pairs[1][1]
    np.testing.assert_allclose(D, est.reconstruct(), atol=1e-12)


def test_save_load_permuted_round_trip(tmp_path):
    est = BlockLowRank(n_blocks=2, rank=1, row_perm="strided", col_perm="strided").fit(_X())
    save_factors(tmp_path / "f.npz", est)
    np.testing.assert_allclose(load_factors(tmp_path / "f.npz").to_dense(), est.reconstruct(), atol=1e-12)


def test_to_dense_integer_factor_keeps_fraction():
    lay = BlockLayout.global_((1, 1), rank=1)
    D = convert.to_dense((lay, {(0, 0): (np.array([[1]]), np.array([[0.5]]))}))
    assert D[0, 0] == 0.5


def test_to_gralora_integer_factor_keeps_fraction():
    lay = BlockLayout.block((2, 2), 2, rank=1)
    f = {(i, j): (np.array([[1]]), np.array([[0.5]])) for i in range(2) for j in range(2)}
    t = convert.to_gralora((lay, f))
    np.testing.assert_allclose(convert.gralora_delta_weight(t["gralora_A"], t["gralora_B"]), np.full((2, 2), 0.5))


def test_from_melora_integer_factor_keeps_fraction():
    sf = convert.from_melora([(np.ones((2, 1), int), np.full((1, 2), 0.5))])
    np.testing.assert_allclose(sf.to_dense(), np.full((2, 2), 0.5))


def test_factors_for_inactive_block_refused():
    lay = BlockLayout.diagonal((2, 2), 2, rank=1)
    one = (np.ones((1, 1)), np.ones((1, 1)))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        convert.to_dense((lay, {(0, 0): one, (1, 1): one, (0, 1): one}))


def test_to_dense_non_numeric_dtype_refused():
    with pytest.raises(CLEAR, match="dtype"):
        convert.to_dense(approximate(_X(), rank=1), dtype=str)


@pytest.mark.parametrize("scaling", [np.nan, np.inf])
def test_to_gralora_bad_scaling(scaling):
    a = approximate(_X(), method="block", n_blocks=2, rank=1)
    with pytest.raises(ValueError, match="scaling"):
        convert.to_gralora(a, scaling=scaling)


@pytest.mark.parametrize("scaling", [0.0, np.nan])
def test_from_gralora_bad_scaling(scaling):
    with pytest.raises(ValueError, match="scaling"):
        convert.from_gralora(np.ones((2, 2, 2)), np.ones((2, 2, 2)), scaling=scaling)


def test_from_gralora_1d_hybrid_weights():
    with pytest.raises(ValueError, match="hybrid"):
        convert.from_gralora(
            np.ones((2, 2, 2)), np.ones((2, 2, 2)), gralora_A_general=np.ones(4), gralora_B_general=np.ones(4)
        )


@FUZZ
@given(seed=st.integers(0, 10**6), kind=st.sampled_from(["dense", "file", "gralora", "refit"]))
def test_fuzz_conversions_round_trip_or_refuse(tmp_path_factory, seed, kind):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((6, 8))
    lay = BlockLayout.block((6, 8), 2).with_permutation(rng.permutation(6), rng.permutation(8))
    a = approximate(X, lay, rank=1)
    try:
        if kind == "dense":
            D = convert.to_dense(a)
        elif kind == "file":
            p = tmp_path_factory.mktemp("f") / "a.npz"
            save_factors(p, a)
            D = load_factors(p).to_dense()
        elif kind == "gralora":
            t = convert.to_gralora(a)
            D = convert.gralora_delta_weight(t["gralora_A"], t["gralora_B"])
        else:
            D = convert.refit_global(a, 6).reconstruction
    except ValueError:
        return  # refusing is fine
    np.testing.assert_allclose(D, a.reconstruction, atol=1e-10)


# =============================================================================
# Class 2: files are trusted
# =============================================================================
@pytest.fixture
def saved(tmp_path):
    a = approximate(_X(), method="block", n_blocks=2, rank=1)
    p = tmp_path / "f.npz"
    save_factors(p, a)
    return p, a


def _rewrite(path, name, **changes):
    arrs = _npz_arrays(path)
    for k, v in changes.items():
        if v is None:
            arrs.pop(k)
        else:
            arrs[k] = v
    out = path.with_name(name)
    np.savez(out, **arrs)
    return out


def _refused(path, match):
    with pytest.raises(FileError, match=match) as info:
        load_factors(path)
    assert path.name in str(info.value)


def test_save_load_without_suffix(tmp_path):
    a = approximate(_X(), rank=1)
    save_factors(str(tmp_path / "model"), a)
    np.testing.assert_allclose(load_factors(str(tmp_path / "model")).to_dense(), a.reconstruction)


def test_truncated_file(saved, tmp_path):
    p, _ = saved
    q = tmp_path / "half.npz"
    raw = p.read_bytes()
    q.write_bytes(raw[: len(raw) // 2])
    _refused(q, "")


def test_empty_file(tmp_path):
    q = tmp_path / "empty.npz"
    q.write_bytes(b"")
    _refused(q, "")


def test_text_file(tmp_path):
    q = tmp_path / "text.npz"
    q.write_bytes(b"hello world")
    with pytest.raises(FileError, match="text.npz") as info:
        load_factors(q)
    assert "pickle" not in str(info.value)


def test_missing_block_key(saved):
    _refused(_rewrite(saved[0], "m.npz", B_0_0=None), "B_0_0")


@pytest.mark.parametrize("key", ["layout", "meta"])
def test_broken_json(saved, key):
    _refused(_rewrite(saved[0], "m.npz", **{key: np.array("{bad")}), key)


def test_layout_missing_fields(saved):
    _refused(_rewrite(saved[0], "m.npz", layout=np.array("{}")), "layout")


def test_bad_format_version(saved):
    _refused(_rewrite(saved[0], "m.npz", format_version=np.array("x")), "format_version|version")


def test_bad_library_version_message(saved):
    with pytest.raises(FileError) as info:
        load_factors(_rewrite(saved[0], "m.npz", library_version=np.array("abc")))
    assert "None" not in str(info.value)


def test_factor_dtype_mismatch(saved):
    _refused(_rewrite(saved[0], "m.npz", B_0_0=np.ones((4, 1), dtype=np.int64)), "dtype|B_0_0")


@pytest.mark.parametrize("bad", [np.array([["a"]] * 4), np.ones((4, 1), dtype=complex)], ids=["str", "complex"])
def test_factor_non_real(saved, bad):
    _refused(_rewrite(saved[0], "m.npz", B_0_0=bad), "dtype|B_0_0")


def test_extra_key(saved):
    _refused(_rewrite(saved[0], "m.npz", B_5_5=np.ones((3, 1))), "B_5_5")


@pytest.fixture
def hybrid_file(tmp_path):
    h = fit_hybrid(_X(), BlockLayout.block((8, 8), 2, rank=1), 1, max_iter=3)
    p = tmp_path / "h.npz"
    save_factors(p, h)
    return p


def test_hybrid_global_factor_wrong_shape(hybrid_file):
    _refused(_rewrite(hybrid_file, "h2.npz", global_B=_npz_arrays(hybrid_file)["global_B"][:1]), "global_B")


def test_hybrid_missing_global(hybrid_file):
    _refused(_rewrite(hybrid_file, "h3.npz", global_A=None), "global_A")


@pytest.fixture
def shared_file(tmp_path):
    s = fit_shared_basis(_X(), 2, 2, max_iter=3)
    p = tmp_path / "s.npz"
    save_factors(p, s)
    return p


def test_shared_wrong_rank(shared_file):
    _refused(_rewrite(shared_file, "s2.npz", S=_npz_arrays(shared_file)["S"][..., :1]), "S")


def test_shared_basis_wrong_width(shared_file):
    _refused(_rewrite(shared_file, "s3.npz", U_0=_npz_arrays(shared_file)["U_0"][:, :1]), "U_0")


def test_shared_wrong_grid(shared_file):
    _refused(_rewrite(shared_file, "s4.npz", S=_npz_arrays(shared_file)["S"][:1]), "S")


def test_shared_missing_key(shared_file):
    _refused(_rewrite(shared_file, "s5.npz", U_1=None), "U_1")


def test_save_is_atomic(saved, monkeypatch):
    p, a = saved
    before = p.read_bytes()
    real = np.lib.format.write_array
    calls = []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) > 2:
            raise OSError("disk full")
        return real(*args, **kw)

    monkeypatch.setattr(np.lib.format, "write_array", failing)
    with pytest.raises(OSError):
        save_factors(p, approximate(_X(seed=5), method="block", n_blocks=2, rank=1))
    monkeypatch.undo()
    assert p.read_bytes() == before


@FUZZ
@given(data=st.data())
def test_fuzz_damaged_files(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("z")
    a = approximate(_X(), method="block", n_blocks=2, rank=1)
    p = d / "f.npz"
    save_factors(p, a)
    how = data.draw(st.sampled_from(["truncate", "flip", "drop", "reshape"]))
    if how in ("truncate", "flip"):
        raw = bytearray(p.read_bytes())
        i = data.draw(st.integers(0, len(raw) - 1))
        if how == "truncate":
            raw = raw[:i]
        else:
            raw[i] ^= 0xFF
        p.write_bytes(bytes(raw))
    else:
        arrs = _npz_arrays(p)
        key = data.draw(st.sampled_from(sorted(arrs)))
        if how == "drop":
            arrs.pop(key)
        else:
            arrs[key] = np.ones(data.draw(st.sampled_from([(1,), (1, 1), (3, 2), (4, 2)])))
        np.savez(p, **arrs)
    try:
        sf = load_factors(p)
        D = sf.to_dense()
    except FileError as exc:
        assert "f.npz" in str(exc)
        return
    np.testing.assert_allclose(D, a.reconstruction)  # loaded: must be the saved matrix


# =============================================================================
# Class 3: public kernels skip validation
# =============================================================================
_G = [np.array([[4.0, 1.0]]), np.array([[3.0, 2.0]])]
_Y = np.random.default_rng(3).standard_normal((40, 40))

KERNEL_CASES = {
    "batched_svd k=-1": (lambda: batched_svd(_X(), k=-1), "k"),
    "batched_svd k=2.7": (lambda: batched_svd(_X(), k=2.7), "k"),
    "batched_svd k=True": (lambda: batched_svd(_X(), k=True), "k"),
    "batched_svd k='3'": (lambda: batched_svd(_X(), k="3"), "k"),
    "batched_svd k>min(m,n)": (lambda: batched_svd(_X(), k=100), "k"),
    "batched_svd n_oversamples=-5": (
        lambda: batched_svd(_Y, k=2, svd_solver="randomized", n_oversamples=-5),
        "n_oversamples",
    ),
    "batched_svd n_oversamples=2.5": (
        lambda: batched_svd(_Y, k=2, svd_solver="randomized", n_oversamples=2.5),
        "n_oversamples",
    ),
    "batched_svd iterated_power=-1": (
        lambda: batched_svd(_Y, k=2, svd_solver="randomized", iterated_power=-1),
        "iterated_power",
    ),
    "batched_svd iterated_power=1.5": (
        lambda: batched_svd(_Y, k=2, svd_solver="randomized", iterated_power=1.5),
        "iterated_power",
    ),
    "batched_svd n_iter='x'": (
        lambda: batched_svd(_Y, k=2, svd_solver="randomized", iterated_power="x"),
        "iterated_power",
    ),
    "approximate n_oversamples=-5": (
        lambda: approximate(_Y, rank=1, svd_solver="randomized", n_oversamples=-5),
        "n_oversamples",
    ),
    "approximate iterated_power=-1": (
        lambda: approximate(_Y, rank=1, svd_solver="randomized", iterated_power=-1),
        "iterated_power",
    ),
    "approximate iterated_power=1.5": (
        lambda: approximate(_Y, rank=1, svd_solver="randomized", iterated_power=1.5),
        "iterated_power",
    ),
    "approximate cap_rank='no'": (lambda: approximate(_X(), rank=100, cap_rank="no"), "cap_rank"),
    "approximate layout + other method": (
        lambda: approximate(_X(), BlockLayout.block((8, 8), 2), method="diagonal", rank=1),
        "method|layout",
    ),
    "approximate layout + other n_blocks": (
        lambda: approximate(_X(), BlockLayout.block((8, 8), 2), n_blocks=4, rank=1),
        "n_blocks|layout",
    ),
    "allocate_ranks budget=-1": (lambda: allocate_ranks(_G, [2, 2], [2, 2], budget=-1), "budget"),
    "allocate_ranks budget=2.5": (lambda: allocate_ranks(_G, [2, 2], [2, 2], budget=2.5), "budget"),
    "allocate_ranks budget and tol": (
        lambda: allocate_ranks(_G, [2, 2], [2, 2], budget=4, max_error=0.1),
        "budget|max_error",
    ),
    "allocate_ranks neither": (lambda: allocate_ranks(_G, [2, 2], [2, 2]), "budget|tol"),
    "allocate_ranks cost 0": (lambda: allocate_ranks(_G, [0, 2], [2, 2], budget=4), "cost"),
    "allocate_ranks cost < 0": (lambda: allocate_ranks(_G, [-2, 2], [2, 2], budget=4), "cost"),
    "allocate_ranks lengths differ": (lambda: allocate_ranks(_G, [2], [2, 2], budget=4), "cost|length"),
    "allocate_ranks NaN gains": (
        lambda: allocate_ranks([np.array([[np.nan, 1.0]]), _G[1]], [2, 2], [2, 2], budget=4),
        "gain|NaN|finite",
    ),
    "allocate_ranks unsorted gains": (
        lambda: allocate_ranks([np.array([[1.0, 4.0]]), _G[1]], [2, 2], [2, 2], budget=2),
        "gain|decreasing|sorted",
    ),
    "allocate_ranks max_ranks<0": (lambda: allocate_ranks(_G, [2, 2], [-1, 2], budget=4), "max_ranks|rank"),
    "allocate_ranks empty": (lambda: allocate_ranks([], [], [], budget=4), "gain|empty|block"),
    "allocate_ranks tol=-1": (
        lambda: allocate_ranks(_G, [2, 2], [2, 2], max_error=-1, fixed_loss=np.zeros(1), total=np.array([30.0])),
        "max_error",
    ),
    "allocate_ranks tol without total": (lambda: allocate_ranks(_G, [2, 2], [2, 2], max_error=0.1), "total|fixed_loss"),
    "allocate_ranks 1-D gains": (lambda: allocate_ranks([np.array([4.0, 1.0])], [2], [2], budget=4), "gain|2-D|shape"),
    "svd_flip_v 1-D": (lambda: svd_flip_v(np.ones(3), np.ones(3)), "2-D|shape|dim"),
    "svd_flip_v shapes disagree": (lambda: svd_flip_v(np.ones((3, 2)), np.ones((3, 3))), "Vt"),
    "svd_flip_v lists": (lambda: svd_flip_v([[1.0, 2.0]], [[-1.0], [2.0]]), "array|U|Vt"),
    "BlockSpectra.error rank 2.5": (
        lambda: engine.block_spectra(_X(), BlockLayout.block(np.shape(_X())[-2:], 2)).error(2.5),
        "rank",
    ),
    "BlockLayout rank 2**70": (lambda: BlockLayout.block((8, 8), 2, rank=2**70), "rank"),
    "BlockLayout shape 8.7": (
        lambda: BlockLayout((8.7, 8), (4, 4), (4, 4), np.ones((2, 2), bool), np.ones((2, 2), int)),
        "shape",
    ),
    "BlockLayout.from_dict missing keys": (lambda: BlockLayout.from_dict({"shape": [4, 4]}), "row_sizes|layout"),
    "BlockLayout.from_dict not a dict": (lambda: BlockLayout.from_dict("x"), "dict|mapping|layout"),
    "split_sizes length 8.5": (lambda: split_sizes(8.5, 2), "length"),
    "split_sizes length -1": (lambda: split_sizes(-1, 1), "length"),
    "rank_report rtol=-1": (lambda: rank_report(approximate(_X(), rank=1), rtol=-1), "rtol"),
    "rank_report rtol=nan": (lambda: rank_report(approximate(_X(), rank=1), rtol=np.nan), "rtol"),
    "rank_report rtol='x'": (lambda: rank_report(approximate(_X(), rank=1), rtol="x"), "rtol"),
    "image_patch_permutation 3-tuple tile": (lambda: permutations.image_patch_permutation(4, 4, (1, 2, 3)), "tile"),
    "cluster_permutation n_components=0": (
        lambda: permutations.cluster_permutation(_X(), 2, n_components=0),
        "n_components",
    ),
    "cluster_permutation n_components=-1": (
        lambda: permutations.cluster_permutation(_X(), 2, n_components=-1),
        "n_components",
    ),
    "resolve_permutation non-permutation": (
        lambda: permutations.resolve_permutation([0] * 8, _X(), 2, 0),
        "permutation",
    ),
    "resolve_permutation axis=5": (lambda: permutations.resolve_permutation("strided", _X(), 2, 5), "axis"),
    "planted_matrix rank=0": (lambda: generators.planted_matrix((8, 8), rank=0), "rank"),
    "random_layout max_blocks=0": (lambda: generators.random_layout((8, 8), max_blocks=0), "max_blocks"),
    "random_layout min_rank > max_rank": (lambda: generators.random_layout((8, 8), min_rank=3, max_rank=1), "rank"),
    "random_layout max_rank=0 with ranks": (lambda: generators.random_layout((8, 8), max_rank=0), "rank"),
    "shared_basis_params rank=0": (lambda: shared_basis_params((8, 8), n_blocks=2, rank=0), "rank"),
    "shared_basis_params rank > block side": (lambda: shared_basis_params((8, 8), n_blocks=2, rank=100), "rank"),
    "hybrid_params global_rank > min(m, n)": (
        lambda: hybrid_params((8, 8), n_blocks=2, rank=1, global_rank=100),
        "global_rank",
    ),
    "budget_sweep_points min_budget > max_budget": (
        lambda: budget_sweep_points((8, 8), min_budget=100, max_budget=10),
        "min_budget|max_budget",
    ),
    "approximate rank array of the wrong shape": (
        lambda: approximate(_X(), method="block", n_blocks=2, rank=[1, 2, 3]),
        "rank",
    ),
    "BlockLowRank rank array of the wrong shape": (
        lambda: BlockLowRank(n_blocks=2, rank=[[1, 1, 1]]).fit(_X()),
        "rank",
    ),
}


@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_kernel_validates(case):
    fn, match = KERNEL_CASES[case]
    with pytest.raises(CLEAR, match=match):
        fn()


def test_block_spectra_negative_rank():
    sp = engine.block_spectra(_X(), BlockLayout.block(np.shape(_X())[-2:], 2))
    try:
        e = sp.error(-1)
    except ValueError:
        return
    assert float(e) == pytest.approx(1.0)  # rank 0 at worst: nothing kept


@FUZZ
@given(
    k=st.one_of(st.integers(-3, 12), st.floats(-2, 12), st.booleans(), st.sampled_from(["2", None])),
    solver=st.sampled_from(["full", "randomized"]),
    n_oversamples=st.one_of(st.integers(-3, 5), st.floats(0, 5)),
    n_iter=st.one_of(st.integers(-2, 3), st.floats(0, 3), st.just("auto")),
)
def test_fuzz_batched_svd_arguments(k, solver, n_oversamples, n_iter):
    A = np.random.default_rng(0).standard_normal((2, 8, 8))
    if type(k) is int and k == 0:
        return  # rank 0: either answer is defensible
    valid_k = k is None or (type(k) is int and 1 <= k <= 8)
    params_ok = (type(n_oversamples) is int and n_oversamples >= 0) and (
        n_iter == "auto" or (type(n_iter) is int and n_iter >= 0)
    )
    try:
        U, s, Vt = batched_svd(
            A, k, svd_solver=solver, n_oversamples=n_oversamples, iterated_power=n_iter, random_state=0
        )
    except CLEAR:
        assert not (valid_k and params_ok), "valid arguments refused"
        return
    assert valid_k and (solver == "full" or params_ok), "nonsense argument accepted"
    assert s.shape[-1] == (8 if k is None else k)

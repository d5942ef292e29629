"""Every bad input gives a clear ValueError/TypeError naming the parameter or problem,
for the functional entry point and for the estimators; and no public call ever
modifies the caller's array."""

import numpy as np
import pytest
import scipy.sparse as sp

from blocklowrank import BlockLayout, BlockLowRank, DiagonalBlockLowRank, GlobalLowRank, approximate, batched_svd

RNG = np.random.default_rng(0)
X = RNG.standard_normal((6, 5))


def _approx(A, **kw):
    kw.setdefault("rank", 1)
    return approximate(A, method="block", n_blocks=kw.pop("n_blocks", 1), **kw)


def _global(A, **kw):
    kw.setdefault("rank", 1)
    return GlobalLowRank(**kw).fit(A)


def _block(A, **kw):
    kw.setdefault("rank", 1)
    kw.setdefault("n_blocks", 1)
    return BlockLowRank(**kw).fit(A)


def _diagonal(A, **kw):
    kw.setdefault("rank", 1)
    kw.setdefault("n_blocks", 1)
    return DiagonalBlockLowRank(**kw).fit(A)


def _block_fit_transform(A, **kw):
    kw.setdefault("rank", 1)
    kw.setdefault("n_blocks", 1)
    return BlockLowRank(**kw).fit_transform(A)


ALL = [_approx, _global, _block, _diagonal, _block_fit_transform]
ESTIMATOR_FITS = [_global, _block, _diagonal, _block_fit_transform]
GRIDDED = [_approx, _block, _diagonal, _block_fit_transform]  # take n_blocks


def _ids(fns):
    return [f.__name__.strip("_") for f in fns]


# ---------------------------------------------------------------------------- the data
@pytest.mark.parametrize("fit", ALL, ids=_ids(ALL))
@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (np.ones(5), ValueError, r"2-D|2D"),
        (np.float64(3.0), ValueError, r"2-D|2D"),
        (np.zeros((0, 5)), ValueError, r"empty|0 sample"),
        (np.zeros((5, 0)), ValueError, r"empty|0 feature"),
        (np.where(np.eye(6, 5) > 0, np.nan, 1.0), ValueError, "NaN"),
        (np.where(np.eye(6, 5) > 0, np.nan, 1.0).astype(np.float32), ValueError, "NaN"),
        (np.where(np.eye(6, 5) > 0, np.inf, 1.0), ValueError, r"inf"),
        (np.where(np.eye(6, 5) > 0, -np.inf, 1.0), ValueError, r"inf"),
        (X + 1j, (TypeError, ValueError), r"[Cc]omplex"),
        (X.astype(np.complex128), (TypeError, ValueError), r"[Cc]omplex"),
        (np.array([["a", "b"], ["c", "d"]]), (TypeError, ValueError), r"numeric|string"),
        (np.array([[{}, None], [1, 2]], dtype=object), TypeError, r"numeric|number"),
    ],
    ids=[
        "1-D",
        "0-D",
        "no-rows",
        "no-columns",
        "nan",
        "nan-float32",
        "inf",
        "-inf",
        "complex",
        "complex-zero-imag",
        "strings",
        "objects",
    ],
)
def test_bad_data(fit, bad, exc, match):
    with pytest.raises(exc, match=match):
        fit(bad)


@pytest.mark.parametrize("fit", ALL, ids=_ids(ALL))
def test_strings_of_numbers_are_not_numbers(fit):
    """String arrays are rejected even when the strings spell numbers (scikit-learn's
    rule for dtype="numeric" since 1.1): silent parsing hides a loading mistake."""
    with pytest.raises((TypeError, ValueError), match=r"numeric|string"):
        fit(np.array([["1.5", "2"], ["3", "4"]]))


@pytest.mark.parametrize("fit", ESTIMATOR_FITS, ids=_ids(ESTIMATOR_FITS))
def test_estimators_need_2d(fit):
    with pytest.raises(ValueError, match=r"dim 3|2D|2-D"):
        fit(np.ones((2, 3, 3)))


def test_approximate_stacks_still_checked():
    """approximate accepts stacks (..., m, n), and checks them as thoroughly."""
    S = RNG.standard_normal((2, 3, 4))
    assert approximate(S, rank=1).reconstruction.shape == S.shape
    S[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        approximate(S, rank=1)
    with pytest.raises(ValueError, match="empty"):
        approximate(np.zeros((0, 3, 3)), rank=1)


@pytest.mark.parametrize("fit", ALL, ids=_ids(ALL))
@pytest.mark.parametrize("fmt", ["csr_matrix", "csc_matrix", "coo_matrix", "csr_array"])
def test_sparse_is_rejected(fit, fmt):
    S = getattr(sp, fmt)(X)
    with pytest.raises((TypeError, ValueError), match="(?i)sparse"):
        fit(S)


def test_sparse_after_fit_is_rejected():
    est = BlockLowRank(n_blocks=2, rank=1).fit(X)
    with pytest.raises((TypeError, ValueError), match="(?i)sparse"):
        est.transform(sp.csr_matrix(X))
    with pytest.raises((TypeError, ValueError), match="(?i)sparse"):
        est.inverse_transform(sp.csr_matrix(est.transform(X)))


# ---------------------------------------------------------------------------- rank
@pytest.mark.parametrize("fit", ALL, ids=_ids(ALL))
@pytest.mark.parametrize(
    "rank, exc",
    [
        (0, ValueError),
        (-1, ValueError),
        (2.5, (TypeError, ValueError)),
        (2.0, (TypeError, ValueError)),
        (np.float64(2.0), (TypeError, ValueError)),
        ("2", (TypeError, ValueError)),
        (True, (TypeError, ValueError)),
    ],
    ids=["0", "-1", "2.5", "2.0", "np.float64(2.0)", "str", "bool"],
)
def test_bad_rank(fit, rank, exc):
    with pytest.raises(exc, match="rank"):
        fit(X, rank=rank)


@pytest.mark.parametrize("fit", GRIDDED, ids=_ids(GRIDDED))
def test_float_per_block_ranks_rejected(fit):
    with pytest.raises((TypeError, ValueError), match="rank"):
        fit(X, n_blocks=2, rank=np.array([[1.0, 2.0], [1.0, 1.0]]))


@pytest.mark.parametrize("fit", ALL, ids=_ids(ALL))
def test_rank_above_a_blocks_smaller_side(fit):
    """6 x 5 cut 2 x 2 gives blocks 3x3, 3x2, 3x3, 3x2: rank 3 is too big for two of
    them. The error names the block and suggests cap_rank; cap_rank=True caps."""
    nb = {} if fit is _global else {"n_blocks": 2}
    rank = 6 if fit is _global else 3
    with pytest.raises(ValueError, match=r"rank .* exceeds .*cap_rank"):
        fit(X, rank=rank, **nb)
    out = fit(X, rank=rank, cap_rank=True, **nb)
    ranks = getattr(out, "ranks_", getattr(out, "ranks", None))
    if ranks is None:  # fit_transform returns the codes
        return
    if fit is _global:
        assert ranks.tolist() == [[5]]
    elif fit is _diagonal:
        assert ranks.tolist() == [[3, 0], [0, 2]]
    else:
        assert ranks.tolist() == [[3, 2], [3, 2]]


# ---------------------------------------------------------------------------- n_blocks
@pytest.mark.parametrize("fit", GRIDDED, ids=_ids(GRIDDED))
@pytest.mark.parametrize(
    "n_blocks, match",
    [
        (7, "rows|block-rows"),
        ((7, 1), "rows|block-rows|square"),
        (6, "columns|block-columns"),
        ((1, 6), "columns|block-columns|square"),
    ],
)
def test_more_blocks_than_rows_or_columns(fit, n_blocks, match):
    with pytest.raises(ValueError, match=match):
        fit(X, n_blocks=n_blocks)


@pytest.mark.parametrize("fit", GRIDDED, ids=_ids(GRIDDED))
@pytest.mark.parametrize("n_blocks", [0, -1, (0, 1), (2, 0)])
def test_n_blocks_below_one(fit, n_blocks):
    with pytest.raises(ValueError, match="n_blocks"):
        fit(X, n_blocks=n_blocks)


@pytest.mark.parametrize("fit", GRIDDED, ids=_ids(GRIDDED))
@pytest.mark.parametrize("n_blocks", [2.0, "2", (2, 2, 2)])
def test_n_blocks_not_an_int_or_pair(fit, n_blocks):
    with pytest.raises((TypeError, ValueError), match="n_blocks"):
        fit(X, n_blocks=n_blocks)


def test_diagonal_needs_a_square_grid():
    with pytest.raises(ValueError, match="square|diagonal"):
        DiagonalBlockLowRank(n_blocks=(2, 3), rank=1).fit(X)
    with pytest.raises(ValueError, match="diagonal"):
        approximate(X, method="diagonal", n_blocks=(2, 3), rank=1)


# ---------------------------------------------------------------------------- budget
@pytest.mark.parametrize("fit", ALL, ids=_ids(ALL))
def test_budget_below_the_cheapest_configuration(fit):
    """The cheapest configuration is one rank-1 block: 6 + 5 = 11 parameters globally,
    3 + 2 = 5 for the smallest block of the 2 x 2 grid of a 6 x 5 matrix."""
    nb = {} if fit is _global else {"n_blocks": 2}
    cheapest = 11 if fit is _global else 5
    with pytest.raises(ValueError, match=rf"budget.*cheapest.*{cheapest}"):
        fit(X, rank=None, budget=cheapest - 1, **nb)
    fit(X, rank=None, budget=cheapest, **nb)


@pytest.mark.parametrize("fit", ALL, ids=_ids(ALL))
@pytest.mark.parametrize("budget", [0, -3, 2.5, 20.0, "20"])
def test_bad_budget(fit, budget):
    """Budgets are counts of parameters: integers >= 1 (20.0 is rejected, as the
    estimators' parameter validation does and as approximate does for rank)."""
    with pytest.raises((TypeError, ValueError), match="budget"):
        fit(X, rank=None, budget=budget)


# ---------------------------------------------------------------------------- tol
@pytest.mark.parametrize("fit", ALL, ids=_ids(ALL))
@pytest.mark.parametrize("tol", [0, 1, -0.1, 1.5, 0.0, 1.0, np.nan, "0.5"])
def test_tol_outside_open_unit_interval(fit, tol):
    with pytest.raises((TypeError, ValueError), match="max_error"):
        fit(X, rank=None, max_error=tol)


def test_tol_needs_the_exact_solver():
    with pytest.raises(ValueError, match="max_error"):
        approximate(RNG.standard_normal((40, 40)), max_error=0.5, svd_solver="randomized")


def test_tol_out_of_reach_of_the_structure():
    """The off-diagonal blocks alone leave error 1 on an anti-diagonal matrix."""
    A = np.fliplr(np.eye(6))
    with pytest.raises(ValueError, match="max_error"):
        approximate(A, method="diagonal", n_blocks=2, max_error=0.5)
    with pytest.raises(ValueError, match="max_error"):
        DiagonalBlockLowRank(n_blocks=2, max_error=0.5).fit(A)


# ---------------------------------------------------------------------------- combinations
@pytest.mark.parametrize("fit", ALL, ids=_ids(ALL))
@pytest.mark.parametrize(
    "kw", [dict(rank=1, budget=20), dict(rank=1, max_error=0.5), dict(rank=None, budget=20, max_error=0.5)]
)
def test_only_one_of_rank_budget_tol(fit, kw):
    with pytest.raises(ValueError, match=r"only one of rank, budget and max_error"):
        fit(X, **kw)


def test_approximate_needs_a_rank_rule():
    with pytest.raises(ValueError, match="rank, budget or max_error"):
        approximate(X)


def test_other_bad_parameters():
    with pytest.raises(ValueError, match="svd_solver"):
        approximate(X, rank=1, svd_solver="arpack")
    with pytest.raises((TypeError, ValueError), match="svd_solver"):
        GlobalLowRank(rank=1, svd_solver="arpack").fit(X)
    with pytest.raises(ValueError, match="method"):
        approximate(X, method="banded", rank=1)
    with pytest.raises(ValueError, match="shape"):
        approximate(X, BlockLayout.block((5, 6), 2, rank=1))
    with pytest.raises(TypeError, match="layout"):
        approximate(X, layout="block", rank=1)


# ---------------------------------------------------------------------------- after fit
@pytest.mark.parametrize("cls", [BlockLowRank, DiagonalBlockLowRank])
def test_wrong_number_of_rows_with_several_block_rows(cls):
    est = cls(n_blocks=2, rank=1).fit(X)
    with pytest.raises(ValueError, match="rows"):
        est.transform(X[:4])
    with pytest.raises(ValueError, match="rows"):
        est.inverse_transform(np.ones((4, est.n_codes_)))
    with pytest.raises(ValueError, match="rows"):
        est.reconstruct(np.ones((7, est.n_codes_)))
    with pytest.raises(ValueError, match="rows"):
        est.score(X[:3])


def test_one_block_row_accepts_new_rows():
    est = BlockLowRank(n_blocks=(1, 2), rank=1).fit(X)
    assert est.transform(X[:4]).shape == (4, est.n_codes_)
    assert GlobalLowRank(rank=1).fit(X).transform(X[:2]).shape == (2, 1)


@pytest.mark.parametrize("cls", [GlobalLowRank, BlockLowRank])
def test_wrong_columns_after_fit(cls):
    est = cls(rank=1).fit(X)
    with pytest.raises(ValueError, match="features"):
        est.transform(X[:, :4])
    with pytest.raises(ValueError, match="n_codes_|columns"):
        est.inverse_transform(np.ones((6, est.n_codes_ + 1)))
    with pytest.raises(ValueError, match="NaN"):
        est.transform(np.where(np.eye(6, 5) > 0, np.nan, 1.0))


def test_not_fitted():
    from sklearn.exceptions import NotFittedError

    for method in ("transform", "inverse_transform"):
        with pytest.raises(NotFittedError):
            getattr(BlockLowRank(), method)(X)
    with pytest.raises(NotFittedError):
        BlockLowRank().reconstruct()


# ---------------------------------------------------------------------------- never modified
def _variants():
    base = RNG.standard_normal((8, 6))
    return {
        "float64-C": base.copy(),
        "float64-F": np.asfortranarray(base),
        "float32-C": base.astype(np.float32),
        "float32-F": np.asfortranarray(base.astype(np.float32)),
        "int64": (base * 10).astype(np.int64),
        "noncontiguous": np.repeat(base, 2, axis=1)[:, ::2],
    }


def _outputs(obj):
    """Arrays reachable from a result (to check none aliases the input)."""
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, tuple):
        return [a for o in obj for a in _outputs(o)]
    out = []
    for name in ("reconstruction",):
        if hasattr(obj, name):
            out.append(getattr(obj, name))
    if hasattr(obj, "factors"):
        out += [a for pair in obj.factors.values() for a in pair]
    return out


def _calls():
    """Every public call that takes the user's matrix, as (name, fn(A) -> result)."""

    def est_calls(name, make):
        def fit(A):
            return make().fit(A)

        def fit_transform(A):
            return make().fit_transform(A)

        def transform(A):
            e = make().fit(A)
            return e.transform(A)

        def inverse(A):
            e = make().fit(A)
            Z = e.transform(A)
            Z0 = Z.copy()
            out = e.inverse_transform(Z)
            np.testing.assert_array_equal(Z, Z0)  # the codes are not modified either
            assert not np.shares_memory(out, Z)
            out2 = e.reconstruct(Z)
            np.testing.assert_array_equal(Z, Z0)
            return out, out2, e.reconstruct()

        def score(A):
            make().fit(A).score(A)
            return ()

        return [
            (f"{name}.fit", fit),
            (f"{name}.fit_transform", fit_transform),
            (f"{name}.transform", transform),
            (f"{name}.inverse_transform", inverse),
            (f"{name}.score", score),
        ]

    calls = [
        ("approximate-rank", lambda A: approximate(A, method="block", n_blocks=2, rank=2)),
        ("approximate-budget", lambda A: approximate(A, method="block", n_blocks=(2, 3), budget=30)),
        ("approximate-tol", lambda A: approximate(A, method="diagonal", n_blocks=2, max_error=0.9)),
        (
            "approximate-randomized",
            lambda A: approximate(A, rank=1, svd_solver="randomized", n_oversamples=1, random_state=0),
        ),
        ("approximate-stack", lambda A: approximate(np.stack([A, A]), n_blocks=2, rank=1)),
        ("batched_svd", lambda A: batched_svd(A, 2)),
        (
            "batched_svd-randomized",
            lambda A: batched_svd(np.asarray(A, float), 1, svd_solver="randomized", random_state=0, n_oversamples=1),
        ),
    ]
    calls += est_calls("GlobalLowRank", lambda: GlobalLowRank(rank=2))
    calls += est_calls("BlockLowRank", lambda: BlockLowRank(n_blocks=2, rank=1))
    calls += est_calls("BlockLowRank-budget", lambda: BlockLowRank(n_blocks=(2, 3), budget=30))
    calls += est_calls("DiagonalBlockLowRank", lambda: DiagonalBlockLowRank(n_blocks=2, max_error=0.9))
    return calls


CALLS = _calls()


@pytest.mark.parametrize("variant", list(_variants()))
@pytest.mark.parametrize("name, call", CALLS, ids=[c[0] for c in CALLS])
def test_input_never_modified(name, call, variant):
    """Claim: no public call modifies the caller's array (C/Fortran order, float32,
    ints, non-contiguous views) and no returned array shares its memory, so writing
    into a result cannot modify the input either."""
    A = _variants()[variant]
    if name.startswith("batched_svd") and A.dtype.kind == "i":
        A = A.astype(np.float64)  # batched_svd is the low-level kernel: floats only
    A0 = A.copy(order="K")
    flags = (A.flags.c_contiguous, A.flags.f_contiguous, A.flags.writeable)
    result = call(A)
    np.testing.assert_array_equal(A, A0)
    assert A.dtype == A0.dtype
    assert (A.flags.c_contiguous, A.flags.f_contiguous, A.flags.writeable) == flags
    for out in _outputs(result):
        assert not np.shares_memory(out, A), name
        out[...] = 0  # writing into a result leaves the input alone
    np.testing.assert_array_equal(A, A0)


# --- the structures beyond the paper share the estimators' input check -------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda: __import__("blocklowrank").HybridLowRank(n_blocks=2, rank=1, global_rank=1),
        lambda: __import__("blocklowrank").SharedBasisLowRank(n_blocks=2, rank=1),
    ],
    ids=["hybrid", "shared_basis"],
)
def test_hybrid_and_shared_basis_reject_garbage(make):
    """Strings, NaN, 1-D, empty, complex and sparse input give a clear error, in fit and transform."""
    import scipy.sparse as sparse

    garbage = {
        "strings": (TypeError, "strings"),
        "nan": (ValueError, "NaN"),
        "1d": (ValueError, "2D"),
        "empty": (ValueError, "0 sample"),
        "complex": (ValueError, "[Cc]omplex"),
        "sparse": (TypeError, "[Ss]parse"),
    }
    inputs = {
        "strings": np.array([["1", "2"], ["3", "4"]]),
        "nan": np.array([[np.nan, 1.0], [1.0, 1.0]]),
        "1d": np.ones(4),
        "empty": np.zeros((0, 3)),
        "complex": np.ones((3, 3)) + 1j,
        "sparse": sparse.eye(4).tocsr(),
    }
    for key, (exc, msg) in garbage.items():
        with pytest.raises(exc, match=msg):
            make().fit(inputs[key])
    est = make().fit(np.random.default_rng(0).standard_normal((6, 6)))
    with pytest.raises(TypeError, match="strings"):
        est.transform(np.full((6, 6), "1"))

"""Tests for blocklowrank.budget: counts, budget matching, comparisons at a budget.

Block sizes and counts are computed independently here with ``np.array_split``
and the formula ``sum over active blocks r_ij (m_i + n_j)``; errors with
``np.linalg.svd`` per block. Nothing in the reference computations goes
through the library.
"""

import itertools

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import blocklowrank._allocation as allocation
import blocklowrank._engine as engine
from blocklowrank.budget import MATCH_COLUMNS, RecordList, budget_sweep_points, count_params, match_budget
from blocklowrank.compare import COMPARE_COLUMNS, compare_at_budget
from blocklowrank.layout import BlockLayout
from blocklowrank.testing.strategies import layouts

# Deterministic, modest hypothesis settings (set here, not in conftest).
PROFILE = settings(derandomize=True, deadline=None, max_examples=50, database=None)
SMALL = settings(derandomize=True, deadline=None, max_examples=25, database=None)

METHODS = ("global", "diagonal", "block")


# ---------------------------------------------------------------------------- references
def sizes(length, k):
    return [len(a) for a in np.array_split(np.arange(length), k)]


def active_mask(method, k):
    if method == "global":
        return np.ones((1, 1), bool)
    return np.eye(k, dtype=bool) if method == "diagonal" else np.ones((k, k), bool)


def ref_count(method, shape, k, rank):
    """sum over active blocks r_ij (m_i + n_j), block sizes from np.array_split."""
    m, n = shape
    k = 1 if method == "global" else k
    rs, cs = sizes(m, k), sizes(n, k)
    act = active_mask(method, k)
    R = np.where(act, rank, 0) if np.ndim(rank) == 0 else np.asarray(rank)
    return int(sum(R[i, j] * (rs[i] + cs[j]) for i in range(k) for j in range(k) if act[i, j]))


def ref_min_side(method, shape, k):
    m, n = shape
    k = 1 if method == "global" else k
    rs, cs = sizes(m, k), sizes(n, k)
    act = active_mask(method, k)
    return min(min(rs[i], cs[j]) for i in range(k) for j in range(k) if act[i, j])


def ref_blocks(X, method, k):
    """[(i, j, block)] for every active block of X."""
    k = 1 if method == "global" else k
    re = np.cumsum([0] + sizes(X.shape[0], k))
    ce = np.cumsum([0] + sizes(X.shape[1], k))
    act = active_mask(method, k)
    return [(i, j, X[re[i] : re[i + 1], ce[j] : ce[j + 1]]) for i in range(k) for j in range(k) if act[i, j]]


def ref_error(X, method, k, ranks):
    """Relative Frobenius error of per-block truncated SVDs (np.linalg.svd), ranks (k, k)."""
    k_eff = 1 if method == "global" else k
    R = np.full((k_eff, k_eff), ranks) if np.ndim(ranks) == 0 else np.asarray(ranks)
    approx = np.zeros_like(X)
    re = np.cumsum([0] + sizes(X.shape[0], k_eff))
    ce = np.cumsum([0] + sizes(X.shape[1], k_eff))
    for i, j, B in ref_blocks(X, method, k):
        U, s, Vt = np.linalg.svd(B, full_matrices=False)
        r = int(R[i, j])
        approx[re[i] : re[i + 1], ce[j] : ce[j + 1]] = (U[:, :r] * s[:r]) @ Vt[:r]
    return np.linalg.norm(X - approx) / np.linalg.norm(X)


def ref_best_allocation(X, method, k, budget):
    """Brute force: the smallest error over every per-block rank choice within the budget."""
    blocks = ref_blocks(X, method, k)
    spectra = [np.linalg.svd(B, compute_uv=False) for _, _, B in blocks]
    costs = [B.shape[0] + B.shape[1] for _, _, B in blocks]
    total = np.linalg.norm(X) ** 2
    inactive = total - sum(np.linalg.norm(B) ** 2 for _, _, B in blocks)
    best = np.inf
    for combo in itertools.product(*[range(len(s) + 1) for s in spectra]):
        if sum(r * c for r, c in zip(combo, costs)) > budget:
            continue
        lost = inactive + sum(float(np.sum(s[r:] ** 2)) for r, s in zip(combo, spectra))
        best = min(best, np.sqrt(max(lost, 0.0) / total))
    return best


@st.composite
def configs(draw, max_side=40):
    """(method, shape, k, rank) with 1 <= rank <= every active block's smaller side."""
    method = draw(st.sampled_from(METHODS))
    m = draw(st.integers(1, max_side))
    n = draw(st.integers(1, max_side))
    k = 1 if method == "global" else draw(st.integers(1, min(m, n)))
    rank = draw(st.integers(1, ref_min_side(method, (m, n), k)))
    return method, (m, n), k, rank


# ---------------------------------------------------------------------------- count_params
class TestCountParams:
    def test_paper_example_d256(self):
        # paper: d=256, r=16, N=4 -> LoRA 8192, MELoRA (r_diag=4) 2048, Localized (K=2, r_block=2) 2048
        assert count_params("global", (256, 256), rank=16) == 8192
        assert count_params("diagonal", (256, 256), n_blocks=4, rank=4) == 2048
        assert count_params("block", (256, 256), n_blocks=2, rank=2) == 2048

    def test_paper_table1_budget(self):
        # Table I: d=28, budget 2rd = 224 for all three
        assert count_params("global", (28, 28), rank=4) == 224
        assert count_params("diagonal", (28, 28), n_blocks=4, rank=4) == 224
        assert count_params("block", (28, 28), n_blocks=2, rank=2) == 224

    @pytest.mark.parametrize("d", [12, 28, 64, 256])
    def test_paper_closed_forms(self, d):
        """LoRA 2dr, MELoRA 2d r_diag, Localized 2d r_block K (K divides d)."""
        for K in [k for k in (1, 2, 4) if d % k == 0]:
            side = d // K
            for r in (1, side - 1):
                assert count_params("global", (d, d), rank=r) == 2 * d * r
                assert count_params("diagonal", (d, d), n_blocks=K, rank=r) == 2 * d * r
                assert count_params("block", (d, d), n_blocks=K, rank=r) == 2 * d * r * K

    def test_uneven_split(self):
        # rows 4,3,3 and columns 3,2,2
        assert count_params("block", (10, 7), n_blocks=3, rank=1) == 3 * 10 + 3 * 7
        assert count_params("diagonal", (10, 7), n_blocks=3, rank=1) == (4 + 3) + (3 + 2) + (3 + 2)
        assert count_params("block", (10, 7), n_blocks=3, rank=2) == ref_count("block", (10, 7), 3, 2)

    def test_rectangular_grid_for_block(self):
        # 2 block-rows (5, 5) x 3 block-columns (3, 2, 2): sum r (m_i + n_j) = 3*10 + 2*7
        assert count_params("block", (10, 7), n_blocks=(2, 3), rank=1) == 3 * 10 + 2 * 7

    def test_per_block_ranks(self):
        assert count_params("diagonal", (10, 7), n_blocks=3, rank=[2, 1, 1]) == 2 * 7 + 5 + 5
        R = np.array([[2, 0, 0], [0, 1, 0], [0, 0, 1]])
        assert count_params("diagonal", (10, 7), n_blocks=3, rank=R) == 2 * 7 + 5 + 5
        B = np.array([[3, 0], [1, 2]])
        assert count_params("block", (28, 28), n_blocks=2, rank=B) == 6 * 28
        assert count_params("global", (28, 28), rank=[5]) == 5 * 56
        assert count_params("global", (28, 28), rank=[[5]]) == 5 * 56

    def test_layout_is_counted_as_is(self):
        lay = BlockLayout.block((28, 28), 2, rank=2)
        assert count_params(lay) == lay.n_params == 224
        # rank replaces the layout's ranks
        assert count_params(lay, rank=1) == 112
        assert count_params(lay, rank=[[3, 0], [0, 1]]) == 112
        # a custom active pattern (anti-diagonal, uneven)
        act = np.array([[False, True], [True, False]])
        custom = BlockLayout((9, 5), (5, 4), (3, 2), act, np.array([[0, 2], [1, 0]]))
        assert count_params(custom) == 2 * (5 + 2) + 1 * (4 + 3)

    @pytest.mark.parametrize(
        "kwargs, exc, match",
        [
            (dict(method="lora", shape=(8, 8), rank=1), ValueError, "method"),
            (dict(method=3, shape=(8, 8), rank=1), TypeError, "method"),
            (dict(method="global", shape=(8, 8), rank=0), ValueError, "rank"),
            (dict(method="global", shape=(8, 8), rank=-2), ValueError, "rank"),
            (dict(method="global", shape=(8, 8), rank=2.0), TypeError, "rank"),
            (dict(method="global", shape=(8, 8), rank=2.5), TypeError, "rank"),
            (dict(method="global", shape=(8, 8), rank=True), TypeError, "rank"),
            (dict(method="global", shape=(8, 8), rank=9), ValueError, "rank 9 exceeds the smaller side"),
            (dict(method="block", shape=(8, 8), rank=5, n_blocks=2), ValueError, "smaller side"),
            (dict(method="diagonal", shape=(10, 7), rank=3, n_blocks=3), ValueError, r"3x2"),
            (dict(method="block", shape=(8, 8), rank=1, n_blocks=0), ValueError, "n_blocks"),
            (dict(method="block", shape=(8, 8), rank=1, n_blocks=-1), ValueError, "n_blocks"),
            (dict(method="block", shape=(8, 8), rank=1, n_blocks=2.0), TypeError, "n_blocks"),
            (dict(method="block", shape=(8, 5), rank=1, n_blocks=6), ValueError, "n_blocks=6 is more blocks"),
            (dict(method="diagonal", shape=(3, 9), rank=1, n_blocks=4), ValueError, "n_blocks"),
            (dict(method="global", shape=(8, 8), rank=1, n_blocks=2), ValueError, "n_blocks must be 1"),
            (dict(method="diagonal", shape=(8, 8), rank=1, n_blocks=(2, 3)), ValueError, "diagonal"),
            (dict(method="global", shape=(8, 8)), TypeError, "rank"),
            (dict(method="global", rank=1), TypeError, "shape"),
            (dict(method="global", shape=(8,), rank=1), ValueError, "shape"),
            (dict(method="global", shape=(0, 8), rank=1), ValueError, "shape"),
            (dict(method="block", shape=(8, 8), rank=[1, 1], n_blocks=2), ValueError, "shape"),
            (dict(method="block", shape=(8, 8), rank=[[1, -1], [1, 1]], n_blocks=2), ValueError, ">= 0"),
            (dict(method="block", shape=(8, 8), rank=[[1.0, 1], [1, 1]], n_blocks=2), TypeError, "rank"),
            (dict(method="diagonal", shape=(8, 8), rank=[[1, 1], [0, 1]], n_blocks=2), ValueError, "not active"),
        ],
    )
    def test_bad_input(self, kwargs, exc, match):
        with pytest.raises(exc, match=match):
            count_params(**kwargs)

    def test_layout_form_rejects_shape_and_n_blocks(self):
        lay = BlockLayout.global_((8, 8), rank=1)
        with pytest.raises(TypeError, match="shape"):
            count_params(lay, (8, 8))
        with pytest.raises(TypeError, match="n_blocks"):
            count_params(lay, n_blocks=2)
        with pytest.raises(ValueError, match="smaller side"):
            count_params(lay, rank=9)

    @PROFILE
    @given(configs())
    def test_uniform_count_matches_formula(self, cfg):
        """For random (uneven) shapes, K and rank: the count equals sum over active blocks
        r (m_i + n_j), with block sizes from np.array_split computed in the test."""
        method, shape, k, rank = cfg
        assert count_params(method, shape, n_blocks=k, rank=rank) == ref_count(method, shape, k, rank)

    @PROFILE
    @given(layouts(max_side=30, max_blocks=6, cuts="array_split", square_grid=True, min_rank=0))
    def test_per_block_count_matches_formula(self, lay):
        """Random per-block ranks (each 0..its block's smaller side) on a K x K grid: the count
        equals sum over active blocks r_ij (m_i + n_j), block sizes computed in the test."""
        method = "diagonal" if lay.pattern == "diagonal" else "block"
        (m, n), k, R = lay.shape, lay.n_blocks[0], lay.ranks
        assert count_params(method, (m, n), n_blocks=k, rank=R) == ref_count(method, (m, n), k, R)
        assert count_params(lay.with_ranks(0), rank=R) == ref_count(method, (m, n), k, R)


# ---------------------------------------------------------------------------- match_budget
def as_tuples(records):
    return [(r["method"], r["n_blocks"], r["rank"], r["n_params"]) for r in records]


class TestMatchBudget:
    def test_paper_table1(self):
        recs = match_budget((28, 28), 224)
        tup = as_tuples(recs)
        for want in [("global", 1, 4, 224), ("diagonal", 4, 4, 224), ("block", 2, 2, 224)]:
            assert want in tup
        assert tup == [
            ("global", 1, 4, 224),
            ("diagonal", 2, 4, 224),
            ("diagonal", 3, 4, 224),
            ("diagonal", 4, 4, 224),
            ("diagonal", 5, 4, 224),
            ("block", 2, 2, 224),
            ("block", 3, 1, 168),
            ("block", 4, 1, 224),
        ]
        assert [r["exact"] for r in recs] == [True] * 6 + [False, True]
        assert all(r["budget"] == 224 for r in recs)

    def test_paper_d256(self):
        recs = match_budget((256, 256), 2048, n_blocks=[2, 4], exact=True)
        tup = as_tuples(recs)
        assert ("diagonal", 4, 4, 2048) in tup and ("block", 2, 2, 2048) in tup
        assert ("global", 1, 4, 2048) in tup

    def test_order_is_method_then_k_then_rank(self):
        recs = match_budget((30, 20), 600)
        keys = [(METHODS.index(r["method"]), r["n_blocks"], r["rank"]) for r in recs]
        assert keys == sorted(keys)

    def test_exact_only(self):
        recs = match_budget((28, 28), 224, exact=True)
        assert all(r["exact"] for r in recs)
        assert ("block", 3, 1, 168) not in as_tuples(recs)
        # a budget no configuration hits exactly: empty, with columns
        empty = match_budget((28, 28), 225, exact=True)
        assert len(empty) == 0
        assert list(empty.to_frame().columns) == list(MATCH_COLUMNS)

    def test_nearest_below_is_flagged(self):
        recs = match_budget((28, 28), 250)
        assert all(not r["exact"] and r["n_params"] <= 250 for r in recs)
        g = [r for r in recs if r["method"] == "global"][0]
        assert (g["rank"], g["n_params"]) == (4, 224)

    def test_over_parameterised_skipped(self):
        # diagonal with N >= 6 on 28x28 has a block side <= 4: rank 4 would be full rank
        recs = match_budget((28, 28), 224, methods=["diagonal"], n_blocks=range(2, 15))
        assert sorted(r["n_blocks"] for r in recs) == [2, 3, 4, 5]
        for r in recs:
            assert r["rank"] < ref_min_side("diagonal", (28, 28), r["n_blocks"])

    def test_default_k_range(self):
        # K = 1 is the global layout: listed under global when global is among the methods
        recs = match_budget((28, 28), 56)
        assert as_tuples(recs) == [
            ("global", 1, 1, 56),
            ("diagonal", 2, 1, 56),
            ("diagonal", 3, 1, 56),
            ("diagonal", 4, 1, 56),
            ("diagonal", 5, 1, 56),
            ("diagonal", 6, 1, 56),
            ("diagonal", 7, 1, 56),
            ("diagonal", 8, 1, 56),
            ("diagonal", 9, 1, 56),
            ("diagonal", 10, 1, 56),
            ("diagonal", 11, 1, 56),
            ("diagonal", 12, 1, 56),
            ("diagonal", 13, 1, 56),
            ("diagonal", 14, 1, 56),
        ]
        # ... and under the method itself otherwise
        assert as_tuples(match_budget((28, 28), 56, methods=["block"])) == [("block", 1, 1, 56)]

    def test_global_always_single_block(self):
        recs = match_budget((28, 28), 224, methods=["global", "block"], n_blocks=[2])
        assert as_tuples(recs) == [("global", 1, 4, 224), ("block", 2, 2, 224)]

    def test_ranks_restriction_nearest_below(self):
        recs = match_budget((28, 28), 224, methods=["global"], ranks=[1, 3])
        assert as_tuples(recs) == [("global", 1, 3, 168)]
        assert not recs[0]["exact"]
        recs = match_budget((28, 28), 224, methods=["block"], ranks=2, n_blocks=[2, 3, 4])
        assert as_tuples(recs) == [("block", 2, 2, 224)]

    def test_single_method_name(self):
        assert as_tuples(match_budget((28, 28), 224, methods="global")) == [("global", 1, 4, 224)]

    def test_uneven_shape_counts(self):
        recs = match_budget((10, 7), 51, methods=["block"], n_blocks=[3])
        assert as_tuples(recs) == [("block", 3, 1, 51)] and recs[0]["exact"]

    def test_dataframe(self):
        recs = match_budget((28, 28), 224)
        assert isinstance(recs, list) and isinstance(recs, RecordList)
        df = pd.DataFrame(recs)
        assert list(df.columns) == list(MATCH_COLUMNS)
        assert len(df) == len(recs)
        pd.testing.assert_frame_equal(df, recs.to_frame())
        assert df["n_params"].dtype.kind == "i" and df["exact"].dtype == bool

    def test_budget_below_cheapest(self):
        with pytest.raises(ValueError, match="below the cheapest configuration.*56 parameters"):
            match_budget((28, 28), 55)
        with pytest.raises(ValueError, match="block with n_blocks=2 and rank 1 costs 112"):
            match_budget((28, 28), 111, methods=["block"], n_blocks=[2, 4])
        with pytest.raises(ValueError, match="rank 3 costs 168"):
            match_budget((28, 28), 100, methods=["global"], ranks=[3, 4])

    def test_budget_too_large(self):
        with pytest.raises(ValueError, match="too large.*global with n_blocks=1, 1512 parameters"):
            match_budget((28, 28), 1600)
        # a partition that does not fit at all is not offered as the largest one
        with pytest.raises(ValueError, match="too large.*block with n_blocks=2, 1456 parameters"):
            match_budget((28, 28), 1600, methods=["block"], n_blocks=[2, 20])

    def test_no_configuration_below_full_rank(self):
        with pytest.raises(ValueError, match="no configuration below full rank"):
            match_budget((1, 5), 10)
        with pytest.raises(ValueError, match="no configuration below full rank"):
            match_budget((28, 28), 224, methods=["block"], n_blocks=[14], ranks=[2])

    @pytest.mark.parametrize(
        "kwargs, exc, match",
        [
            (dict(budget=0), ValueError, "budget"),
            (dict(budget=-5), ValueError, "budget"),
            (dict(budget=22.5), TypeError, "budget"),
            (dict(budget="224"), TypeError, "budget"),
            (dict(budget=224, methods=["lora"]), ValueError, "methods"),
            (dict(budget=224, methods=[]), ValueError, "methods"),
            (dict(budget=224, methods=5), TypeError, "methods"),
            (dict(budget=224, n_blocks=0), ValueError, "n_blocks"),
            (dict(budget=224, n_blocks=[2, 0]), ValueError, "n_blocks"),
            (dict(budget=224, n_blocks=[2.5]), TypeError, "n_blocks"),
            (dict(budget=224, n_blocks=29), ValueError, "n_blocks=29 is more blocks"),
            (dict(budget=224, n_blocks=[]), ValueError, "n_blocks"),
            (dict(budget=224, ranks=0), ValueError, "ranks"),
            (dict(budget=224, ranks=[1.5]), TypeError, "ranks"),
            (dict(budget=224, exact="yes"), TypeError, "exact"),
        ],
    )
    def test_bad_input(self, kwargs, exc, match):
        with pytest.raises(exc, match=match):
            match_budget((28, 28), **kwargs)

    def test_bad_shape(self):
        with pytest.raises(ValueError, match="shape"):
            match_budget((28,), 224)
        with pytest.raises(TypeError, match=r"shape\[0\]"):
            match_budget((2.5, 4), 224)

    def test_float_budget_rejected(self):
        """A budget counts parameters: floats (even 224.0) are rejected everywhere, as the
        estimators' scikit-learn parameter validation does."""
        with pytest.raises(TypeError, match="budget"):
            match_budget((28, 28), 224.0, methods="global")

    @PROFILE
    @given(st.integers(2, 24), st.integers(2, 24), st.integers(1, 600), st.booleans())
    def test_records_are_correct_and_complete(self, m, n, budget, exact):
        """Every record has n_params <= budget, equal to the independently computed count;
        exact is n_params == budget; its rank is below every active block's smaller side
        (not over-parameterised) and is the largest such rank within the budget (nearest
        below); and every (method, K, rank) whose independent count equals the budget and
        that is not over-parameterised appears."""
        try:
            recs = match_budget((m, n), budget, exact=exact)
        except ValueError as exc:
            # only when no configuration fits: check the claim independently
            fits = [
                (mth, k, r)
                for mth in METHODS
                for k in ([1] if mth == "global" else range(2, min(m, n) + 1))
                for r in range(1, ref_min_side(mth, (m, n), k))
                if ref_count(mth, (m, n), k, r) <= budget
                and budget // ref_count(mth, (m, n), k, 1) < ref_min_side(mth, (m, n), k)
            ]
            assert not fits, (str(exc), fits)
            return
        seen = set()
        for r in recs:
            mth, k, rank = r["method"], r["n_blocks"], r["rank"]
            count = ref_count(mth, (m, n), k, rank)
            assert r["n_params"] == count <= budget
            assert r["exact"] == (count == budget)
            assert rank < ref_min_side(mth, (m, n), k)
            assert ref_count(mth, (m, n), k, rank + 1) > budget
            if exact:
                assert r["exact"]
            seen.add((mth, k, rank))
        for mth in METHODS:
            for k in [1] if mth == "global" else range(2, min(m, n) + 1):
                for rank in range(1, ref_min_side(mth, (m, n), k)):
                    if ref_count(mth, (m, n), k, rank) == budget:
                        assert (mth, k, rank) in seen


# ---------------------------------------------------------------------------- sweep points
def matchable(shape, budget, methods=METHODS, **kw):
    try:
        recs = match_budget(shape, budget, methods=methods, exact=True, **kw)
    except ValueError:
        return False
    return {r["method"] for r in recs} == set(methods)


class TestBudgetSweepPoints:
    def test_28x28(self):
        pts = budget_sweep_points((28, 28))
        assert pts.dtype == np.int64
        np.testing.assert_array_equal(pts, 56 * np.arange(2, 14))
        assert 224 in pts

    def test_filters(self):
        np.testing.assert_array_equal(
            budget_sweep_points((28, 28), n_blocks=[2, 4], min_budget=200, max_budget=500), [224, 336, 448]
        )
        np.testing.assert_array_equal(budget_sweep_points((28, 28), methods=["global"], ranks=[2, 5]), [112, 280])
        assert budget_sweep_points((28, 28), min_budget=2000).size == 0

    def test_bad_input(self):
        with pytest.raises(ValueError, match="min_budget"):
            budget_sweep_points((28, 28), min_budget=0)
        with pytest.raises(TypeError, match="max_budget"):
            budget_sweep_points((28, 28), max_budget=1.5)
        with pytest.raises(ValueError, match="methods"):
            budget_sweep_points((28, 28), methods=["melora"])

    @pytest.mark.parametrize(
        "shape, kw",
        [
            ((16, 16), {}),
            ((9, 6), {}),
            ((12, 12), dict(methods=("diagonal", "block"))),
            ((10, 7), dict(n_blocks=[2, 3])),
        ],
    )
    def test_exactly_the_budgets_where_every_method_matches(self, shape, kw):
        """A budget is listed iff match_budget(..., exact=True) has every method at it."""
        pts = set(budget_sweep_points(shape, **kw).tolist())
        limit = 2 * shape[0] * shape[1] + 10
        brute = {b for b in range(1, limit) if matchable(shape, b, **kw)}
        assert pts == brute


# ---------------------------------------------------------------------------- compare_at_budget
def tiny_matrix(seed=0, shape=(7, 6)):
    rng = np.random.default_rng(seed)
    # decaying spectrum so that allocations differ from uniform ranks
    return rng.standard_normal(shape) * np.linspace(3, 0.2, shape[1])


class TestCompareAtBudget:
    @pytest.mark.parametrize("shape, budget", [((7, 6), 26), ((9, 7), 70), ((8, 8), 50)])
    def test_brute_force_tiny(self, shape, budget):
        """Every row's error equals the error computed here with np.linalg.svd per block;
        every provably optimal allocation equals the brute-force best allocation."""
        X = tiny_matrix(shape=shape)
        res = compare_at_budget(X, budget, svd_solver="full")
        assert len(res) >= 6
        for r in res:
            mth, k = r["method"], r["n_blocks"]
            assert r["n_params"] <= budget
            assert r["n_params"] == ref_count(mth, X.shape, k, r["block_ranks"])
            if r["allocation"] == "uniform":
                assert r["rank"] == int(r["block_ranks"].max())
                want = ref_error(X, mth, k, r["rank"])
            else:
                assert r["rank"] is None
                want = ref_error(X, mth, k, r["block_ranks"])
                best = ref_best_allocation(X, mth, k, budget)
                if r["proven_optimal"]:
                    assert r["error"] == pytest.approx(best, rel=1e-9, abs=1e-12)
                else:
                    assert r["error"] >= best - 1e-12
            assert r["error"] == pytest.approx(want, rel=1e-9, abs=1e-12)
            assert r["errors"] == r["error"]

    def test_paper_configurations_present_and_sorted(self):
        X = np.random.default_rng(3).standard_normal((28, 28))
        res = compare_at_budget(X, 224, n_blocks=[2, 4])
        errs = [r["error"] for r in res]
        assert errs == sorted(errs)
        keys = {(r["method"], r["n_blocks"], r["rank"]) for r in res}
        assert {("global", 1, 4), ("diagonal", 4, 4), ("block", 2, 2)} <= keys
        # one optimal row per partition
        opt = [(r["method"], r["n_blocks"]) for r in res if r["allocation"] == "optimal"]
        assert sorted(opt) == sorted({(r["method"], r["n_blocks"]) for r in res})
        assert len(opt) == len(set(opt))

    def test_include_optimal_false_and_exact(self):
        X = np.random.default_rng(4).standard_normal((28, 28))
        res = compare_at_budget(X, 224, include_optimal=False)
        assert {r["allocation"] for r in res} == {"uniform"}
        assert len(res) == len(match_budget((28, 28), 224))
        res = compare_at_budget(X, 224, exact=True, n_blocks=[2, 3])
        assert all(r["exact"] for r in res if r["allocation"] == "uniform")
        assert ("block", 3) not in {(r["method"], r["n_blocks"]) for r in res}

    def test_empty_when_nothing_exact(self):
        X = np.random.default_rng(4).standard_normal((28, 28))
        res = compare_at_budget(X, 225, exact=True)
        assert len(res) == 0
        assert list(res.to_frame().columns) == list(COMPARE_COLUMNS)

    def test_dataframe(self):
        X = np.random.default_rng(5).standard_normal((3, 12, 12))
        res = compare_at_budget(X, 96)
        df = pd.DataFrame(res)
        assert list(df.columns) == list(COMPARE_COLUMNS)
        assert len(df) == len(res)
        assert df["error"].is_monotonic_increasing
        assert set(df["allocation"]) == {"uniform", "optimal"}
        assert list(res.to_frame().columns) == list(COMPARE_COLUMNS)

    def test_stack_matches_per_matrix(self):
        """On a stack, each per-matrix error equals the single-matrix result, error is their
        mean, and allocation rows carry per-matrix ranks and counts."""
        S = np.stack([tiny_matrix(s, (10, 8)) for s in range(4)])
        budget = 54
        res = compare_at_budget(S, budget)
        singles = [
            {(r["method"], r["n_blocks"], r["allocation"]): r for r in compare_at_budget(S[t], budget)}
            for t in range(len(S))
        ]
        for r in res:
            key = (r["method"], r["n_blocks"], r["allocation"])
            assert r["errors"].shape == (4,)
            assert r["error"] == pytest.approx(r["errors"].mean())
            np.testing.assert_allclose(r["errors"], [s[key]["error"] for s in singles], rtol=1e-10, atol=1e-13)
            np.testing.assert_array_equal(r["n_params_each"], [s[key]["n_params"] for s in singles])
            assert r["n_params"] == int(np.max(r["n_params_each"])) <= budget
            assert r["exact"] == bool(np.all(r["n_params_each"] == budget))
            if r["allocation"] == "optimal":
                k = 1 if r["method"] == "global" else r["n_blocks"]
                assert r["block_ranks"].shape == (4, k, k)
                for t in range(4):
                    assert (
                        ref_count(r["method"], S.shape[1:], r["n_blocks"], r["block_ranks"][t]) == r["n_params_each"][t]
                    )

    def test_one_batched_spectrum_per_partition(self, monkeypatch):
        """No loop over matrices: with the exact solver, one batched spectrum per partition
        (method, K) on the whole stack serves all its rows."""
        calls = []
        real = engine.block_spectra

        def spy(X, *args, **kwargs):
            calls.append(np.shape(X))
            return real(X, *args, **kwargs)

        monkeypatch.setattr("blocklowrank.compare.block_spectra", spy)
        S = np.random.default_rng(0).standard_normal((50, 28, 28))
        res = compare_at_budget(S, 224)
        assert len(calls) == len({(r["method"], r["n_blocks"]) for r in res})
        assert all(c == (50, 28, 28) for c in calls)

    def test_one_batched_engine_call_per_configuration_randomized(self, monkeypatch):
        """With the randomized solver, approximate is called once per row, on the whole stack."""
        calls = []
        real = engine.fit_layout

        def spy(X, *args, **kwargs):
            calls.append(np.shape(X))
            return real(X, *args, **kwargs)

        monkeypatch.setattr("blocklowrank.compare.fit_layout", spy)
        S = np.random.default_rng(0).standard_normal((20, 28, 28))
        res = compare_at_budget(S, 224, svd_solver="randomized", random_state=0)
        assert len(calls) == len(res)
        assert all(c == (20, 28, 28) for c in calls)

    def test_float32_and_higher_dims(self):
        S = np.random.default_rng(6).standard_normal((2, 3, 12, 10)).astype(np.float32)
        res = compare_at_budget(S, 88, methods=["global", "block"])
        for r in res:
            assert r["errors"].shape == (2, 3)
        ref = compare_at_budget(S.astype(np.float64), 88, methods=["global", "block"])
        got = {(r["method"], r["n_blocks"], r["rank"]): r["error"] for r in res}
        for r in ref:
            assert got[(r["method"], r["n_blocks"], r["rank"])] == pytest.approx(r["error"], rel=1e-4)

    def test_solver_options_are_passed(self):
        X = np.random.default_rng(7).standard_normal((40, 40))
        full = compare_at_budget(X, 320, methods=["global"], svd_solver="full")
        rnd = compare_at_budget(X, 320, methods=["global"], svd_solver="randomized", random_state=0, iterated_power=7)
        assert rnd[0]["error"] == pytest.approx(full[0]["error"], rel=0.05)
        with pytest.raises(ValueError, match="svd_solver"):
            compare_at_budget(X, 320, svd_solver="arpack")

    def test_bad_input(self):
        X = np.random.default_rng(8).standard_normal((28, 28))
        with pytest.raises(ValueError, match="below the cheapest"):
            compare_at_budget(X, 10)
        with pytest.raises(ValueError, match="NaN"):
            compare_at_budget(np.full((4, 4), np.nan), 10)
        with pytest.raises(ValueError, match="2-D"):
            compare_at_budget(np.ones(5), 10)
        with pytest.raises(TypeError, match="include_optimal"):
            compare_at_budget(X, 224, include_optimal="yes")
        with pytest.raises(ValueError, match="methods"):
            compare_at_budget(X, 224, methods=["lora"])

    def test_greedy_allocation_never_worse_than_uniform(self, monkeypatch):
        """When the engine falls back to a greedy allocation (uneven blocks, large problem;
        forced here by lowering its DP limit), the optimal row is still no worse than the
        uniform row of the same partition, matrix by matrix."""
        monkeypatch.setattr(allocation, "_DP_LIMIT", 0)
        rng = np.random.default_rng(11)
        S = rng.standard_normal((30, 28, 28)) * rng.uniform(0.1, 3, size=28)
        res = compare_at_budget(S, 224, n_blocks=[3, 5])
        opt = {(r["method"], r["n_blocks"]): r for r in res if r["allocation"] == "optimal"}
        assert opt[("block", 3)]["proven_optimal"] is False
        assert opt[("diagonal", 3)]["proven_optimal"] is False
        for r in res:
            assert np.all(r["n_params_each"] <= 224)
            if r["allocation"] == "uniform":
                assert np.all(opt[(r["method"], r["n_blocks"])]["errors"] <= r["errors"] + 1e-12)

    @SMALL
    @given(st.integers(4, 14), st.integers(4, 14), st.integers(0, 10**6), st.integers(1, 4), st.floats(0.05, 0.9))
    def test_optimal_never_worse_than_uniform(self, m, n, seed, batch, frac):
        """compare_at_budget's optimal allocation row is never worse than any uniform row of
        the same partition at the same or lower count (per matrix of a stack), every row is
        within the budget, and rows are sorted by mean error."""
        rng = np.random.default_rng(seed)
        S = rng.standard_normal((batch, m, n)) * rng.uniform(0.1, 3, size=n)
        budget = max(m + n, int(frac * m * n))
        try:
            res = compare_at_budget(S, budget)
        except ValueError:
            return  # budget too large for every partition: nothing to compare
        errs = [r["error"] for r in res]
        assert errs == sorted(errs)
        opt = {(r["method"], r["n_blocks"]): r for r in res if r["allocation"] == "optimal"}
        for r in res:
            assert np.all(np.asarray(r["n_params_each"]) <= budget)
            if r["allocation"] == "uniform":
                o = opt[(r["method"], r["n_blocks"])]
                assert np.all(o["errors"] <= r["errors"] + 1e-12)


# ---------------------------------------------------------------------------- beyond the paper
from blocklowrank import fit_hybrid, fit_shared_basis, structure_names  # noqa: E402

ALL_METHODS = structure_names()


def ref_shared_count(shape, k, r):
    """BLAST: bases U_i (m_i x r) and V_j (n_j x r), r couplings per block."""
    m, n = shape
    return sum(h * r for h in sizes(m, k)) + sum(w * r for w in sizes(n, k)) + r * k * k


def ref_hybrid_count(shape, k, r_b, r_g):
    m, n = shape
    return ref_count("block", shape, k, r_b) + r_g * m + r_g * n


def ref_min_side_full(shape, k):
    return min(min(sizes(shape[0], k)), min(sizes(shape[1], k)))


class TestBeyondThePaper:
    def test_all_methods(self):
        assert ALL_METHODS == ("global", "diagonal", "block", "hybrid", "shared_basis")

    def test_counts_at_the_paper_budget(self):
        assert count_params("hybrid", (28, 28), n_blocks=2, rank=1, global_rank=2) == 224
        assert count_params("hybrid", (28, 28), n_blocks=3, rank=1, global_rank=1) == 224
        assert count_params("hybrid", (28, 28), n_blocks=2, rank=1, global_rank=0) == 112
        assert count_params("shared_basis", (28, 28), n_blocks=2, rank=3) == 3 * 56 + 3 * 4 == 180
        assert count_params("shared_basis", (28, 28), n_blocks=4, rank=3) == 3 * 56 + 3 * 16 == 216
        assert count_params("shared_basis", (10, 7), n_blocks=(3, 2), rank=2) == 2 * 17 + 2 * 6
        assert count_params("hybrid", (10, 7), n_blocks=(2, 3), rank=1, global_rank=1) == 3 * 10 + 2 * 7 + 17

    @PROFILE
    @given(st.integers(1, 30), st.integers(1, 30), st.data())
    def test_counts_match_independent_formulas(self, m, n, data):
        k = data.draw(st.integers(1, min(m, n, 8)))
        side = ref_min_side_full((m, n), k)
        r = data.draw(st.integers(1, side))
        assert count_params("shared_basis", (m, n), n_blocks=k, rank=r) == ref_shared_count((m, n), k, r)
        r_g = data.draw(st.integers(0, min(m, n)))
        assert count_params("hybrid", (m, n), n_blocks=k, rank=r, global_rank=r_g) == ref_hybrid_count(
            (m, n), k, r, r_g
        )

    @pytest.mark.parametrize(
        "kwargs, exc, match",
        [
            (dict(method="hybrid", shape=(8, 8), rank=1, n_blocks=2), TypeError, "global_rank"),
            (dict(method="block", shape=(8, 8), rank=1, n_blocks=2, global_rank=1), TypeError, "hybrid"),
            (dict(method="hybrid", shape=(8, 8), rank=1, n_blocks=2, global_rank=9), ValueError, "exceeds"),
            (dict(method="hybrid", shape=(8, 8), rank=1, n_blocks=2, global_rank=-1), ValueError, "global_rank"),
            (dict(method="hybrid", shape=(8, 8), rank=5, n_blocks=2, global_rank=1), ValueError, "smaller side"),
            (dict(method="shared_basis", shape=(8, 8), rank=5, n_blocks=2), ValueError, "smallest block"),
            (dict(method="shared_basis", shape=(8, 8), rank=[1, 2], n_blocks=2), TypeError, "rank"),
            (dict(method="shared_basis", shape=(8, 8), rank=0, n_blocks=2), ValueError, "rank"),
            (dict(method="shared_basis", shape=(8, 8), rank=1, n_blocks=9), ValueError, "n_blocks"),
        ],
    )
    def test_bad_input(self, kwargs, exc, match):
        with pytest.raises(exc, match=match):
            count_params(**kwargs)

    def test_match_at_the_paper_budget(self):
        recs = match_budget((28, 28), 224, methods=["shared_basis", "hybrid"])
        assert recs.columns == MATCH_COLUMNS + ("global_rank",)
        hyb = [(r["n_blocks"], r["rank"], r["global_rank"], r["n_params"]) for r in recs if r["method"] == "hybrid"]
        assert hyb == [(2, 1, 2, 224), (3, 1, 1, 224)]
        sb = {r["n_blocks"]: (r["rank"], r["n_params"], r["exact"]) for r in recs if r["method"] == "shared_basis"}
        assert sb[2] == (3, 180, False) and sb[4] == (3, 216, False) and sb[7] == (2, 210, False)
        # K = 12: rank 1 costs 56 + 144 = 200; K = 13: 56 + 169 = 225 > 224
        assert max(sb) == 12 and sb[12] == (1, 200, False)
        # default methods unchanged: no global_rank column, the paper's three only
        assert match_budget((28, 28), 224).columns == MATCH_COLUMNS

    @PROFILE
    @given(st.integers(2, 20), st.integers(2, 20), st.integers(1, 700), st.booleans())
    def test_records_are_correct_and_complete(self, m, n, budget, exact):
        """BLAST and hybrid records: count equal to the independent formula and within the
        budget, ranks below every block side (and r_g below min(m, n)), the largest rank that
        fits (nearest below), exact flag right; every valid configuration whose count equals
        the budget is listed."""
        L = min(m, n)
        try:
            recs = match_budget((m, n), budget, methods=["hybrid", "shared_basis"], exact=exact)
        except ValueError:
            recs = []
        seen = set()
        for r in recs:
            k, rank = r["n_blocks"], r["rank"]
            side = ref_min_side_full((m, n), k)
            assert k >= 2 and 1 <= rank < side
            if r["method"] == "shared_basis":
                count = ref_shared_count((m, n), k, rank)
                assert r["global_rank"] is None
                assert ref_shared_count((m, n), k, rank + 1) > budget
                seen.add(("shared_basis", k, rank, None))
            else:
                r_g = r["global_rank"]
                assert 1 <= r_g < L
                count = ref_hybrid_count((m, n), k, rank, r_g)
                assert ref_hybrid_count((m, n), k, rank, r_g + 1) > budget
                seen.add(("hybrid", k, rank, r_g))
            assert r["n_params"] == count <= budget and r["exact"] == (count == budget)
            if exact:
                assert r["exact"]
        for k in range(2, L + 1):
            side = ref_min_side_full((m, n), k)
            for rank in range(1, side):
                if ref_shared_count((m, n), k, rank) == budget:
                    assert ("shared_basis", k, rank, None) in seen
                for r_g in range(1, L):
                    if ref_hybrid_count((m, n), k, rank, r_g) == budget:
                        assert ("hybrid", k, rank, r_g) in seen

    def test_sweep_points_for_every_registered_structure(self):
        """Every structure's budget rule lists its reachable counts: the hybrid's include 224."""
        pts = budget_sweep_points((28, 28), methods=["hybrid", "global"], n_blocks=[2])
        assert 224 in pts and all(p % 56 == 0 for p in pts)

    def test_compare_equals_direct_fits_on_a_stack(self):
        """compare_at_budget's errors for hybrid and BLAST rows are those of fit_hybrid and
        fit_shared_basis on the same stack, matrix by matrix."""
        S = np.stack([tiny_matrix(s, (12, 12)) for s in range(5)])
        res = compare_at_budget(S, 96, methods=ALL_METHODS, n_blocks=[2, 3], fit_options={"max_iter": 30})
        assert res.columns == COMPARE_COLUMNS + ("global_rank",)
        kinds = {r["method"] for r in res}
        assert kinds == set(ALL_METHODS)
        for r in res:
            k = r["n_blocks"]
            if r["method"] == "shared_basis":
                want = fit_shared_basis(S, k, r["rank"], max_iter=30).error
                assert r["n_params"] == ref_shared_count((12, 12), k, r["rank"])
                assert r["global_rank"] is None and np.all(r["block_ranks"] == r["rank"])
            elif r["method"] == "hybrid":
                want = fit_hybrid(
                    S, BlockLayout.block((12, 12), k, rank=r["rank"]), r["global_rank"], max_iter=30
                ).error
                assert r["n_params"] == ref_hybrid_count((12, 12), k, r["rank"], r["global_rank"])
                for t in range(len(S)):  # and the single-matrix fit
                    one = fit_hybrid(
                        S[t], BlockLayout.block((12, 12), k, rank=r["rank"]), r["global_rank"], max_iter=30
                    )
                    assert r["errors"][t] == pytest.approx(one.error, rel=1e-10)
            else:
                assert r["global_rank"] is None
                continue
            np.testing.assert_allclose(r["errors"], want, rtol=1e-12)
            assert r["error"] == pytest.approx(np.mean(want))
            assert r["allocation"] == "uniform" and r["proven_optimal"] is None
            assert np.all(r["n_params_each"] == r["n_params"]) and r["n_params"] <= 96
        errs = [r["error"] for r in res]
        assert errs == sorted(errs)

    def test_compare_single_matrix_and_options(self):
        X = tiny_matrix(3, (12, 10))
        res = compare_at_budget(X, 88, methods=["shared_basis"], n_blocks=[2])
        (row,) = res
        assert isinstance(row["error"], float) and row["errors"] == row["error"]
        assert row["error"] == pytest.approx(fit_shared_basis(X, 2, row["rank"]).error, rel=1e-12)
        assert res.columns == COMPARE_COLUMNS
        with pytest.raises(ValueError, match="fit_options"):
            compare_at_budget(X, 88, methods=["hybrid"], fit_options={"init": "blocks"})


def test_compare_computes_each_spectrum_once_and_takes_given_ones(monkeypatch):
    """Claim: a partition's spectrum depends on its layout alone, so global and a
    1 x 1 block grid share one, spectra passed in are used instead of computed,
    and the records are the same either way."""
    import blocklowrank.compare as compare_mod
    from blocklowrank import BlockLayout

    X = np.random.default_rng(4).standard_normal((24, 20))
    plain = compare_at_budget(X, 88, methods=["global", "block"], n_blocks=[1, 2])
    calls = []
    real = compare_mod.block_spectra
    monkeypatch.setattr(compare_mod, "block_spectra", lambda X, lay, **kw: calls.append(lay) or real(X, lay, **kw))
    again = compare_at_budget(X, 88, methods=["global", "block"], n_blocks=[1, 2])
    assert len(calls) == 2  # (global, 1) = (block, 1), and (block, 2)
    calls.clear()
    given_spectra = [real(X, BlockLayout.block(X.shape, K)) for K in (1, 2)]
    seeded = compare_at_budget(X, 88, methods=["global", "block"], n_blocks=[1, 2], spectra=given_spectra)
    assert calls == []
    for a, b, c in zip(plain, again, seeded):
        assert (
            (a["method"], a["n_blocks"], a["rank"], a["error"])
            == (b["method"], b["n_blocks"], b["rank"], b["error"])
            == (c["method"], c["n_blocks"], c["rank"], c["error"])
        )
    with pytest.raises(ValueError, match="spectra must hold BlockSpectra"):
        compare_at_budget(X, 88, spectra=[real(X.T, BlockLayout.block(X.T.shape, 1))])
    with pytest.raises(ValueError, match="spectra must hold BlockSpectra"):
        compare_at_budget(X, 88, spectra=["nope"])
    with pytest.raises(TypeError, match="iterable of BlockSpectra"):
        compare_at_budget(X, 88, spectra=5)
    other = real(X[::-1] * 1.5, BlockLayout.block(X.shape, 2))  # same shape, another matrix
    with pytest.raises(ValueError, match="those of X"):
        compare_at_budget(X, 88, methods=["block"], n_blocks=[2], spectra=[other])

"""Tests of ``blocklowrank.testing``: the generators plant what they say they plant."""

import importlib
import sys

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from _reference import cuts, cuts_from_sizes  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from blocklowrank import BlockLayout, BlockLowRank  # noqa: E402
from blocklowrank._extras import MissingExtraError  # noqa: E402
from blocklowrank.structures import layout_structure, registered  # noqa: E402
from blocklowrank.testing.generators import PlantedInfo, planted_matrix, planted_structures, random_layout  # noqa: E402
from blocklowrank.testing.strategies import layouts, matrices, planted_matrices  # noqa: E402


def block_ranks(M, rcuts, ccuts):
    """np.linalg.matrix_rank of every block (computed here, not by the library)."""
    return np.array([[np.linalg.matrix_rank(M[rs, cs]) for cs in ccuts] for rs in rcuts], dtype=int)


# ---------------------------------------------------------------------------- planted_matrix
@pytest.mark.parametrize("seed", range(4))
def test_planted_block_has_the_stated_ranks_per_block(seed):
    """Claim: "block" plants an independent matrix of exactly rank r_ij in block (i, j)."""
    ranks = np.array([[1, 2, 3], [3, 0, 2]])
    X, info = planted_matrix((11, 13), structure="block", n_blocks=(2, 3), rank=ranks, random_state=seed)
    rc, cc = cuts(11, 2), cuts(13, 3)
    np.testing.assert_array_equal(block_ranks(X, rc, cc), ranks)
    np.testing.assert_array_equal(info.layout.ranks, ranks)
    np.testing.assert_array_equal(X, info.clean)


def test_planted_global_rank():
    """Claim: "global" plants a matrix of rank r."""
    X, info = planted_matrix((9, 14), structure="global", rank=3, random_state=0)
    assert np.linalg.matrix_rank(X) == 3
    assert info.layout.n_blocks == (1, 1) and info.layout.ranks.tolist() == [[3]]
    assert info.structure == "global"


def test_planted_diagonal_blocks_and_zero_off_diagonal():
    """Claim: "diagonal" plants rank-r diagonal blocks (uneven cuts) and zeros elsewhere."""
    X, info = planted_matrix((10, 7), structure="diagonal", n_blocks=3, rank=2, random_state=3)
    rc, cc = cuts(10, 3), cuts(7, 3)
    expected = np.diag([2, 2, 2])
    np.testing.assert_array_equal(block_ranks(X, rc, cc), expected)
    for i in range(3):
        for j in range(3):
            if i != j:
                assert np.all(X[rc[i], cc[j]] == 0)
    assert info.layout.pattern == "diagonal"


def test_planted_shared_bases():
    """Claim: "shared_basis" blocks are U_i diag(s_ij) V_j^T: rank r per block, and a whole
    block-row (block-column) still has rank r because U_i (V_j) is shared along it."""
    r = 2
    X, info = planted_matrix((12, 15), structure="shared_basis", n_blocks=(3, 3), rank=r, random_state=5)
    rc, cc = cuts(12, 3), cuts(15, 3)
    np.testing.assert_array_equal(block_ranks(X, rc, cc), np.full((3, 3), r))
    for rs in rc:
        assert np.linalg.matrix_rank(X[rs, :]) == r
    for cs in cc:
        assert np.linalg.matrix_rank(X[:, cs]) == r
    assert np.linalg.matrix_rank(X) <= 3 * r
    # the factors share A along columns and the column space of B along rows
    for (i, j), (B, A) in info.factors.items():
        np.testing.assert_allclose(B @ A, info.clean[rc[i], cc[j]], atol=1e-12)
        np.testing.assert_array_equal(A, info.factors[(0, j)][1])
        Bi0 = info.factors[(i, 0)][0]
        assert np.linalg.matrix_rank(np.hstack([B, Bi0])) == r


def test_planted_independent_blocks_do_not_share():
    """Claim: "block" blocks are independent: a block-row has rank sum_j r_ij (generic)."""
    X, _ = planted_matrix((12, 15), structure="block", n_blocks=3, rank=1, random_state=5)
    for rs in cuts(12, 3):
        assert np.linalg.matrix_rank(X[rs, :]) == 3


@pytest.mark.parametrize("noise", [0.0, 0.01, 0.3, 2.0])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_planted_noise_level_and_dtype(noise, dtype):
    """Claim: ||X - clean||_F = noise * ||clean||_F; X has the requested dtype."""
    X, info = planted_matrix((20, 16), structure="block", n_blocks=2, rank=2, noise=noise, random_state=1, dtype=dtype)
    assert X.dtype == dtype and X.flags.c_contiguous
    assert info.clean.dtype == np.float64
    rel = np.linalg.norm(X.astype(np.float64) - info.clean) / np.linalg.norm(info.clean)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    assert abs(rel - noise) <= tol * max(1, noise)
    assert info.noise == noise


def test_planted_singular_values_in_range():
    """Claim: planted singular values lie in [1, 2] (a wide gap to zero)."""
    X, info = planted_matrix((16, 16), structure="block", n_blocks=2, rank=3, random_state=2)
    for rs in cuts(16, 2):
        for cs in cuts(16, 2):
            s = np.linalg.svd(X[rs, cs], compute_uv=False)
            assert np.all((s[:3] >= 1 - 1e-12) & (s[:3] <= 2 + 1e-12))
            assert np.all(s[3:] < 1e-12)


def test_planted_is_deterministic_for_a_seed():
    """Claim: the same seed gives the same matrix; another seed another matrix."""
    kw = dict(structure="shared_basis", n_blocks=2, rank=2, noise=0.1)
    X1, i1 = planted_matrix((10, 10), random_state=7, **kw)
    X2, i2 = planted_matrix((10, 10), random_state=7, **kw)
    X3, _ = planted_matrix((10, 10), random_state=8, **kw)
    np.testing.assert_array_equal(X1, X2)
    np.testing.assert_array_equal(i1.clean, i2.clean)
    assert i1.layout == i2.layout
    assert not np.array_equal(X1, X3)
    # a Generator and a RandomState are accepted too
    X4, _ = planted_matrix((10, 10), random_state=np.random.default_rng(7), **kw)
    np.testing.assert_array_equal(X1, X4)
    planted_matrix((10, 10), random_state=np.random.RandomState(0), **kw)


def test_planted_from_a_layout_with_explicit_cuts():
    """Claim: with ``layout=``, exactly that layout's blocks and ranks are planted."""
    lay = BlockLayout.from_blocks((9, 8), row_sizes=(2, 7), col_sizes=(5, 1, 2), rank=np.array([[1, 1, 2], [0, 1, 2]]))
    X, info = planted_matrix(layout=lay, random_state=0)
    rc, cc = cuts_from_sizes((2, 7)), cuts_from_sizes((5, 1, 2))
    np.testing.assert_array_equal(block_ranks(X, rc, cc), [[1, 1, 2], [0, 1, 2]])
    assert info.layout is lay and isinstance(info, PlantedInfo)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(structure="banded"), ValueError, "structure"),
        (dict(structure="block", rank=7), ValueError, "exceeds"),
        (dict(structure="global", n_blocks=2), ValueError, "1 block"),
        (dict(structure="hybrid"), ValueError, "planted_structures"),
        (dict(structure="block", noise=-0.1), ValueError, "noise"),
        (dict(structure="block", noise="x"), TypeError, "noise"),
        (dict(structure="block", dtype=np.int64), ValueError, "dtype"),
        (dict(structure="shared_basis", rank=np.array([[1, 2], [2, 2]])), ValueError, "shared_basis"),
        (dict(structure="diagonal", n_blocks=(2, 3)), ValueError, "diagonal"),
        (dict(structure="block", random_state="seed"), TypeError, "random_state"),
    ],
)
def test_planted_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        planted_matrix((10, 12), **kwargs)


def test_planted_layout_structure_mismatch():
    with pytest.raises(ValueError, match="diagonal"):
        planted_matrix(layout=BlockLayout.block((6, 6), 2, rank=1), structure="diagonal")
    with pytest.raises(ValueError, match="1 block"):
        planted_matrix(layout=BlockLayout.block((6, 6), 2, rank=1), structure="global")
    with pytest.raises(ValueError, match="shape"):
        planted_matrix((5, 6), layout=BlockLayout.block((6, 6), 2, rank=1))
    with pytest.raises(ValueError, match="shape"):
        planted_matrix(structure="block")


# ---------------------------------------------------------------------------- random_layout
def _assert_valid_layout(lay, shape=None, *, ranked=True):
    m, n = lay.shape
    if shape is not None:
        assert (m, n) == tuple(shape)
    assert sum(lay.row_sizes) == m and sum(lay.col_sizes) == n
    assert min(lay.row_sizes) >= 1 and min(lay.col_sizes) >= 1
    kr, kc = lay.n_blocks
    assert lay.active.shape == lay.ranks.shape == (kr, kc)
    sides = np.minimum.outer(np.array(lay.row_sizes), np.array(lay.col_sizes))
    assert np.all(lay.ranks[~lay.active] == 0)
    assert np.all(lay.ranks <= sides)
    if ranked:
        assert np.all(lay.ranks[lay.active] >= 1)
    else:
        assert np.all(lay.ranks == 0)
    if not lay.active.all():
        assert kr == kc and np.array_equal(lay.active, np.eye(kr, dtype=bool))
    # the layout can be rebuilt from its own description (BlockLayout validates it)
    assert BlockLayout.from_dict(lay.to_dict()) == lay


@pytest.mark.parametrize("seed", range(30))
def test_random_layout_is_valid(seed):
    lay = random_layout(random_state=seed, max_side=9)
    _assert_valid_layout(lay)


def test_random_layout_options():
    lay = random_layout((12, 5), patterns=("diagonal",), cuts="array_split", random_state=1)
    kr, kc = lay.n_blocks
    assert kr == kc <= 4
    assert [s.stop - s.start for s in cuts(12, kr)] == list(lay.row_sizes)
    lay = random_layout((12, 5), with_ranks=False, random_state=2)
    _assert_valid_layout(lay, (12, 5), ranked=False)
    for seed in range(10):
        lay = random_layout((30, 30), max_rank=2, max_blocks=2, random_state=seed)
        assert lay.ranks.max() <= 2 and max(lay.n_blocks) <= 2
    with pytest.raises(ValueError, match="patterns"):
        random_layout((5, 5), patterns=("banded",))
    with pytest.raises(ValueError, match="cuts"):
        random_layout((5, 5), cuts="even")


def test_random_layout_is_deterministic():
    assert random_layout(random_state=3) == random_layout(random_state=3)
    draws = {repr(random_layout(random_state=s)) for s in range(20)}
    assert len(draws) > 10


# ---------------------------------------------------------------------------- strategies
@given(matrices(min_side=2, max_side=7, dtype=np.float32))
def test_matrices_strategy_float32(X):
    assert X.dtype == np.float32 and X.ndim == 2
    assert 2 <= min(X.shape) and max(X.shape) <= 7
    assert np.all(np.isfinite(X)) and np.all(np.abs(X) <= 100)
    nz = np.abs(X[X != 0])
    assert np.all(nz >= np.float32(0.1))


@given(matrices(shape=(3, 4), batch_shape=(2, 5), elements="gaussian"))
def test_matrices_strategy_stacks(X):
    assert X.shape == (2, 5, 3, 4) and X.dtype == np.float64
    assert np.all(X != 0)


@given(matrices(shape=st.tuples(st.integers(1, 3), st.just(2)), elements=st.just(1.5)))
def test_matrices_strategy_custom(X):
    assert X.shape[1] == 2 and 1 <= X.shape[0] <= 3 and np.all(X == 1.5)


@given(layouts(max_side=10))
def test_layouts_strategy_valid(lay):
    _assert_valid_layout(lay)


@given(layouts(shape=(8, 5), patterns=("full",), cuts="array_split", with_ranks=False))
def test_layouts_strategy_fixed_shape(lay):
    _assert_valid_layout(lay, (8, 5), ranked=False)
    assert lay.active.all()
    kr, kc = lay.n_blocks
    assert [s.stop - s.start for s in cuts(8, kr)] == list(lay.row_sizes)
    assert [s.stop - s.start for s in cuts(5, kc)] == list(lay.col_sizes)


@given(planted_matrices(max_side=12))
def test_planted_matrices_strategy_ranks(planted):
    """Claim: every drawn planted matrix has the stated rank in every block."""
    X, info = planted
    lay = info.layout
    assert info.structure in planted_structures()
    rc, cc = cuts_from_sizes(lay.row_sizes), cuts_from_sizes(lay.col_sizes)
    if lay.active.all() or lay.n_blocks == (1, 1):
        # array_split cuts for the drawn grid
        assert rc == cuts(X.shape[0], len(rc)) and cc == cuts(X.shape[1], len(cc))
    np.testing.assert_array_equal(block_ranks(X, rc, cc), lay.ranks)
    if info.structure == "global":
        assert lay.n_blocks == (1, 1)
    if info.structure == "diagonal":
        assert np.array_equal(lay.active, np.eye(lay.n_blocks[0], dtype=bool))
    if info.structure == "shared_basis":
        r = lay.uniform_rank
        for rs in rc:
            assert np.linalg.matrix_rank(X[rs]) == r


@given(planted_matrices(structures=("block", "shared_basis"), noise=st.floats(0.0, 0.2), dtype=np.float32, max_side=10))
def test_planted_matrices_strategy_noise(planted):
    X, info = planted
    assert X.dtype == np.float32
    rel = np.linalg.norm(X.astype(np.float64) - info.clean) / np.linalg.norm(info.clean)
    assert abs(rel - info.noise) <= 1e-5


def test_strategy_argument_errors():
    with pytest.raises(ValueError, match="structures"):
        planted_matrices(structures=("nope",))
    with pytest.raises(ValueError, match="dtype"):
        matrices(dtype=np.complex128)
    with pytest.raises(ValueError, match="min_side"):
        matrices(min_side=5, max_side=2)


# ---------------------------------------------------------------------------- the example property
@given(planted_matrices(structures=("block", "shared_basis"), noise=st.floats(0.0, 0.1), max_side=16))
def test_block_low_rank_recovers_planted_blocks(planted):
    """Claim (the module's example property): on a planted K x K block-low-rank matrix,
    BlockLowRank at the planted ranks is never farther from X than the planted
    matrix (Eckart-Young per block), hence within twice the noise of the clean one."""
    X, info = planted
    est = BlockLowRank(n_blocks=info.layout.n_blocks, rank=info.layout.ranks, svd_solver="full").fit(X)
    scale = np.linalg.norm(info.clean)
    X_hat = est.reconstruct()
    assert np.linalg.norm(X - X_hat) <= info.noise * scale * (1 + 1e-9) + 1e-12 * scale
    assert np.linalg.norm(X_hat - info.clean) <= 2 * info.noise * scale * (1 + 1e-9) + 1e-12 * scale


# ---------------------------------------------------------------------------- no hypothesis
def test_only_the_strategies_need_hypothesis(monkeypatch):
    """Claim: the generators and the conformance checks import without hypothesis; the
    strategies module then raises one clear error naming the extra that installs it."""
    import blocklowrank

    monkeypatch.setattr(blocklowrank, "testing", sys.modules["blocklowrank.testing"])  # restored afterwards
    for name in [m for m in sys.modules if m == "hypothesis" or m.startswith(("hypothesis.", "blocklowrank.testing"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    generators = importlib.import_module("blocklowrank.testing.generators")
    importlib.import_module("blocklowrank.testing.conformance")
    X, _ = generators.planted_matrix((4, 4), rank=1, random_state=0)
    assert X.shape == (4, 4) and generators.random_layout((4, 4), random_state=0).shape == (4, 4)
    with pytest.raises(MissingExtraError, match=r"hypothesis.*pip install 'blocklowrank\[test\]'"):
        importlib.import_module("blocklowrank.testing.strategies")


# ---------------------------------------------------------------------------- the registry decides
def test_a_registered_layout_structure_is_planted_block_by_block():
    """Claim: a pure layout structure registered by a user is plantable with no change here:
    its active blocks (upper triangle) get exactly their planted ranks, the others are zero."""
    staircase = layout_structure(
        "staircase", "Staircase", "blocks on and above the diagonal", lambda kr, kc: np.triu(np.ones((kr, kc), bool))
    )
    with registered(staircase):
        assert "staircase" in planted_structures()
        X, info = planted_matrix((9, 10), structure="staircase", n_blocks=3, rank=2, random_state=0)
        np.testing.assert_array_equal(block_ranks(X, cuts(9, 3), cuts(10, 3)), 2 * np.triu(np.ones((3, 3), int)))
        with pytest.raises(ValueError, match="staircase structure has no block"):
            planted_matrix(layout=BlockLayout.block((9, 10), 3, rank=1), structure="staircase")
    assert "staircase" not in planted_structures()

"""Generators and hypothesis strategies for property tests of structured low rank.

(Over 600 lines on purpose: this is the user-facing test kit -- generators,
strategies and the structure checks -- in one importable module, like
``sklearn.utils.estimator_checks``.)

Two kinds of helpers live here:

- **Seeded generators** (plain NumPy, no extra dependency):
  :func:`planted_matrix` builds a matrix with a *planted* global,
  diagonal-block, full-block or shared-basis low-rank structure plus noise of
  a chosen relative size, and :func:`random_layout` draws a random valid
  :class:`~blocklowrank.BlockLayout`.
- **Hypothesis strategies** (need ``hypothesis``, imported only when a
  strategy is built): :func:`matrices`, :func:`layouts` and
  :func:`planted_matrices`.

``import blocklowrank.testing`` works without hypothesis; calling a
strategy without it raises an ImportError that says what to install.

Planted structures
------------------
For a layout with row blocks ``m_i`` and column blocks ``n_j``:

- ``"global"``: ``X = U diag(s) V^T``, rank ``r``;
- ``"diagonal"``: ``N`` diagonal blocks, each ``U_i diag(s_i) V_i^T`` of
  rank ``r_i``; off-diagonal blocks are zero;
- ``"block"``: every block ``(i, j)`` is an independent rank-``r_ij``
  matrix ``U_ij diag(s_ij) V_ij^T``;
- ``"shared_basis"``: block ``(i, j)`` is ``U_i diag(s_ij) V_j^T`` with ``U_i``
  shared along block-row ``i`` and ``V_j`` along block-column ``j`` (the
  GraLoRA / Localized-LoRA picture of a weight update whose blocks share
  subspaces). Every block has rank ``r``; the whole matrix has rank at most
  ``r * min(K_rows, K_cols)``.

``U`` and ``V`` have orthonormal columns and the planted singular values are
drawn uniformly in ``[1, 2]``, so each block has exactly its planted rank
with a wide gap to zero. Noise is Gaussian, scaled so that
``||X - clean||_F = noise * ||clean||_F`` exactly.

Since ``clean`` is one of the candidates of the structured problem at the
planted ranks, and the truncated SVD of each block is optimal for its block
(Eckart-Young), any correct solver must satisfy
``||X - X_hat||_F <= ||X - clean||_F``: that is the property of the example
below.

Examples
--------
A seeded planted matrix, its structure checked block by block:

>>> import numpy as np
>>> from blocklowrank.testing import planted_matrix
>>> X, info = planted_matrix((12, 10), structure="block", n_blocks=2, rank=2,
...                          noise=0.0, random_state=0)
>>> X.shape, info.layout.ranks.tolist()
((12, 10), [[2, 2], [2, 2]])
>>> rows, cols = info.layout.block_slice(0, 1)
>>> int(np.linalg.matrix_rank(X[rows, cols]))
2

A property test (this is how the strategies are meant to be used): on a
planted K x K block-low-rank matrix, :class:`~blocklowrank.BlockLowRank` at
the planted ranks recovers it to noise level.

>>> from hypothesis import given, settings
>>> from blocklowrank import BlockLowRank
>>> from blocklowrank.testing import planted_matrices
>>> @settings(max_examples=15, deadline=None, derandomize=True, database=None)
... @given(planted_matrices(structures=("block", "shared_basis"), noise=0.05))
... def test_recovers_planted_blocks(planted):
...     X, info = planted
...     est = BlockLowRank(n_blocks=info.layout.n_blocks, rank=info.layout.ranks,
...                        svd_solver="full").fit(X)
...     scale = np.linalg.norm(info.clean)
...     # never farther from X than the planted matrix is (Eckart-Young per block)
...     assert np.linalg.norm(X - est.reconstruct()) <= info.noise * scale * (1 + 1e-6)
...     # hence within twice the noise of the clean matrix
...     assert np.linalg.norm(est.reconstruct() - info.clean) <= 2.001 * info.noise * scale
>>> test_recovers_planted_blocks()
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np

from ._validation import check_int as _check_int
from .layout import PATTERNS, BlockLayout

__all__ = ["STRUCTURES", "PlantedInfo", "planted_matrix", "random_layout", "matrices", "layouts", "planted_matrices"]

#: Names of the planted structures accepted by :func:`planted_matrix`.
STRUCTURES = ("global", "diagonal", "block", "shared_basis")

_CUTS = ("array_split", "random", "any")


# ---------------------------------------------------------------------------- helpers
def _require_hypothesis():
    try:
        import hypothesis  # noqa: F401
        from hypothesis import strategies as st
    except ImportError as exc:  # pragma: no cover - exercised only without hypothesis
        raise ImportError(
            "the strategies of blocklowrank.testing need the 'hypothesis' package; "
            "install it with `pip install hypothesis` (or the 'test' extra: "
            "`pip install blocklowrank[test]`)"
        ) from exc
    return st


def _rng(random_state):
    """A ``numpy.random.Generator`` from None, an int, a Generator or a RandomState."""
    if isinstance(random_state, np.random.Generator):
        return random_state
    if isinstance(random_state, np.random.RandomState):
        return np.random.default_rng(random_state.randint(0, 2**31 - 1))
    if random_state is None or isinstance(random_state, (numbers.Integral, np.random.SeedSequence)):
        return np.random.default_rng(random_state)
    raise TypeError(f"random_state must be None, an int, a numpy Generator or RandomState, got {random_state!r}")


def _check_dtype(dtype):
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _orthonormal(rng, n, r):
    """``n x r`` matrix with orthonormal columns (Haar-distributed up to signs)."""
    if r == 0:
        return np.zeros((n, 0))
    q, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return q


def _spectrum(rng, r):
    """``r`` planted singular values in [1, 2], descending."""
    return np.sort(rng.uniform(1.0, 2.0, size=r))[::-1]


def _composition(choose, total, parts):
    """Random sizes of ``parts`` positive pieces summing to ``total``."""
    sizes = [1] * parts
    for _ in range(total - parts):
        sizes[choose(0, parts - 1)] += 1
    return tuple(sizes)


# ---------------------------------------------------------------------------- planted matrices
@dataclass(frozen=True, eq=False)
class PlantedInfo:
    """What :func:`planted_matrix` planted.

    Attributes
    ----------
    clean : ndarray of shape (m, n), float64
        The structured matrix before noise.
    layout : BlockLayout
        The planted layout; its ``ranks`` are the exact rank of each block of
        ``clean`` (0 for blocks that are zero, e.g. off-diagonal blocks of
        the diagonal structure).
    structure : str
        One of :data:`STRUCTURES`.
    noise : float
        Relative noise level: ``||X - clean||_F = noise * ||clean||_F``
        (up to the rounding of ``X`` to its dtype).
    factors : dict
        ``{(i, j): (B_ij, A_ij)}`` (float64) with ``B_ij @ A_ij`` equal to
        block ``(i, j)`` of ``clean``; for ``"shared_basis"``, ``B_ij = U_i
        diag(s_ij)`` and ``A_ij = V_j^T``.
    """

    clean: np.ndarray = field(repr=False)
    layout: BlockLayout
    structure: str
    noise: float
    factors: dict = field(repr=False)


def planted_matrix(
    shape=None, *, structure="block", n_blocks=None, rank=1, noise=0.0, layout=None, random_state=None, dtype=np.float64
):
    """A matrix with a planted structured low-rank part plus Gaussian noise.

    Parameters
    ----------
    shape : (int, int), optional
        Shape ``(m, n)``. Needed unless ``layout`` is given.
    structure : {"global", "diagonal", "block", "shared_basis"}, default="block"
        The planted structure (see the module docstring).
    n_blocks : int or (int, int), optional
        Grid of the layout (``np.array_split`` cuts). Defaults to 1 for
        ``"global"`` (which accepts nothing else) and 2 otherwise;
        ``"diagonal"`` needs a square grid.
    rank : int or array-like of shape (K_rows, K_cols), default=1
        Rank of every active block, or one rank per block (``"shared_basis"``
        needs a single int). A rank above a block's smaller side raises
        ValueError.
    noise : float, default=0.0
        Relative Frobenius size of the noise, ``>= 0``.
    layout : BlockLayout, optional
        Plant exactly this layout's active blocks and ranks (any cuts, any
        active pattern with "block"). Replaces ``n_blocks`` and ``rank``;
        "global" then needs a 1 x 1 layout, "diagonal" a diagonal one and
        "shared_basis" one rank for every active block.
    random_state : int, Generator, RandomState or None, default=None
        Seed; the same seed gives the same matrix.
    dtype : {np.float64, np.float32}, default=np.float64
        dtype of ``X`` (``info.clean`` stays float64).

    Returns
    -------
    X : ndarray of shape (m, n)
        ``clean + noise``, C-contiguous, of the requested dtype.
    info : PlantedInfo
        The clean matrix, the planted layout, the factors and the noise level.

    Examples
    --------
    >>> X, info = planted_matrix((8, 8), structure="diagonal", n_blocks=4, rank=1,
    ...                          random_state=0)
    >>> info.layout.pattern, info.layout.n_params
    ('diagonal', 16)
    >>> bool(np.all(X[:2, 2:] == 0))  # off-diagonal blocks are empty without noise
    True
    >>> X32, info = planted_matrix((6, 9), structure="shared_basis", n_blocks=(2, 3), rank=2,
    ...                            noise=0.1, random_state=1, dtype=np.float32)
    >>> X32.dtype, info.layout.ranks.tolist()
    (dtype('float32'), [[2, 2, 2], [2, 2, 2]])
    >>> rel = np.linalg.norm(X32 - info.clean) / np.linalg.norm(info.clean)
    >>> bool(abs(rel - 0.1) < 1e-5)
    True
    """
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    if isinstance(noise, (bool, np.bool_)) or not isinstance(noise, numbers.Real):
        raise TypeError(f"noise must be a non-negative float, got {noise!r}")
    noise = float(noise)
    if not (np.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise}")
    dt = _check_dtype(dtype)
    rng = _rng(random_state)

    if layout is not None:
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        if structure == "global" and layout.n_blocks != (1, 1):
            raise ValueError(f"the global structure needs a 1x1 layout, got {layout.n_blocks}")
        kr, kc = layout.n_blocks
        if structure == "diagonal" and (kr != kc or not np.array_equal(layout.active, np.eye(kr, dtype=bool))):
            raise ValueError(f"the diagonal structure needs a diagonal layout, got {layout.pattern!r}")
        if shape is not None and tuple(shape) != layout.shape:
            raise ValueError(f"shape {tuple(shape)} does not match the layout's {layout.shape}")
        lay = layout
    else:
        if shape is None:
            raise ValueError("give the shape (or a layout)")
        if np.ndim(rank) == 0:
            _check_int(rank, "rank", minimum=1)
        if structure == "global":
            if n_blocks not in (None, 1, (1, 1)):
                raise ValueError(f"the global structure has one block, got n_blocks={n_blocks!r}")
            lay = BlockLayout.global_(shape, rank=rank)
        else:
            nb = 2 if n_blocks is None else n_blocks
            pattern = "diagonal" if structure == "diagonal" else "full"
            lay = BlockLayout.from_blocks(shape, nb, rank=rank, pattern=pattern)

    m, n = lay.shape
    clean = np.zeros((m, n))
    factors = {}
    if structure == "shared_basis":
        r = lay.uniform_rank
        if r is None:
            raise ValueError(
                "the shared_basis structure needs one rank for every active block, got "
                f"{lay.ranks[lay.active].tolist()}"
            )
        kr, kc = lay.n_blocks
        U = [_orthonormal(rng, lay.row_sizes[i], r) for i in range(kr)]
        V = [_orthonormal(rng, lay.col_sizes[j], r) for j in range(kc)]
        for i, j in zip(*np.nonzero(lay.active)):
            i, j = int(i), int(j)
            s = _spectrum(rng, r)
            factors[(i, j)] = (U[i] * s, V[j].T.copy())
    else:
        for i, j in zip(*np.nonzero(lay.active)):
            i, j = int(i), int(j)
            r = int(lay.ranks[i, j])
            h, w = lay.block_shape(i, j)
            s = _spectrum(rng, r)
            factors[(i, j)] = (_orthonormal(rng, h, r) * s, _orthonormal(rng, w, r).T.copy())
    for (i, j), (B, A) in factors.items():
        rs, cs = lay.block_slice(i, j)
        clean[rs, cs] = B @ A

    X = clean.copy()
    if noise > 0:
        E = rng.standard_normal((m, n))
        X += E * (noise * np.linalg.norm(clean) / np.linalg.norm(E))
    clean.setflags(write=False)
    info = PlantedInfo(clean=clean, layout=lay, structure=structure, noise=noise, factors=factors)
    return np.ascontiguousarray(X, dtype=dt), info


# ---------------------------------------------------------------------------- random layouts
def _draw_layout(choose, shape, patterns, max_blocks, cuts, with_ranks, min_rank, max_rank):
    """One layout from integer choices ``choose(lo, hi)`` (shared by rng and hypothesis)."""
    m, n = shape
    patterns = tuple(patterns)
    if not patterns or any(p not in PATTERNS for p in patterns):
        raise ValueError(f"patterns must be a non-empty subset of {PATTERNS}, got {patterns!r}")
    if cuts not in _CUTS:
        raise ValueError(f"cuts must be one of {_CUTS}, got {cuts!r}")
    max_blocks = _check_int(max_blocks, "max_blocks", minimum=1)
    if with_ranks:
        min_rank = _check_int(min_rank, "min_rank", minimum=0)
        if max_rank is not None and _check_int(max_rank, "max_rank", minimum=1) < min_rank:
            raise ValueError(f"max_rank={max_rank} is below min_rank={min_rank}")
    pattern = patterns[choose(0, len(patterns) - 1)]
    if pattern == "diagonal":
        k = choose(1, min(m, n, max_blocks))
        kr = kc = k
    else:
        kr = choose(1, min(m, max_blocks))
        kc = choose(1, min(n, max_blocks))
    how = cuts if cuts != "any" else ("array_split", "random")[choose(0, 1)]
    if how == "random":
        rs, cs = _composition(choose, m, kr), _composition(choose, n, kc)
    else:
        rs = cs = None
    lay = BlockLayout.from_blocks((m, n), (kr, kc), pattern=pattern, row_sizes=rs, col_sizes=cs)
    if not with_ranks:
        return lay
    ranks = np.zeros(lay.n_blocks, dtype=np.int64)
    for i, j in zip(*np.nonzero(lay.active)):
        hi = int(lay.max_ranks[i, j])
        if max_rank is not None:
            hi = min(hi, max_rank)
        lo = min(min_rank, hi)
        ranks[i, j] = choose(lo, hi)
    return lay.with_ranks(ranks)


def _check_side_bounds(min_side, max_side):
    if not (isinstance(min_side, numbers.Integral) and isinstance(max_side, numbers.Integral)):
        raise TypeError("min_side and max_side must be integers")
    if not 1 <= min_side <= max_side:
        raise ValueError(f"need 1 <= min_side <= max_side, got {min_side}, {max_side}")


def random_layout(
    shape=None,
    *,
    patterns=PATTERNS,
    max_blocks=4,
    cuts="any",
    with_ranks=True,
    min_rank=1,
    max_rank=None,
    min_side=1,
    max_side=12,
    random_state=None,
):
    """A random valid :class:`~blocklowrank.BlockLayout` (seeded).

    Parameters
    ----------
    shape : (int, int), optional
        Matrix shape; drawn with sides in ``[min_side, max_side]`` if None.
    patterns : tuple of {"full", "diagonal"}, default=("full", "diagonal")
        Active-block patterns to choose from.
    max_blocks : int, default=4
        Largest number of block-rows / block-columns (also capped by the sides).
    cuts : {"array_split", "random", "any"}, default="any"
        ``np.array_split`` cuts, random positive sizes, or either.
    with_ranks : bool, default=True
        Draw a rank in ``[min_rank, min(max_rank, min(m_i, n_j))]`` for every
        active block; if False the ranks are all 0.
    min_rank : int, default=1
    max_rank : int, optional
    min_side, max_side : int, default=1, 12
        Bounds of the drawn shape when ``shape`` is None.
    random_state : int, Generator, RandomState or None

    Returns
    -------
    BlockLayout

    Examples
    --------
    >>> lay = random_layout((10, 7), random_state=0)
    >>> lay.shape, sum(lay.row_sizes), sum(lay.col_sizes)
    ((10, 7), 10, 7)
    >>> bool(np.all(lay.ranks[lay.active] >= 1))
    True
    >>> random_layout((10, 7), random_state=0) == lay
    True
    """
    rng = _rng(random_state)

    def choose(lo, hi):
        return int(rng.integers(lo, hi + 1))

    if shape is None:
        _check_side_bounds(min_side, max_side)
        shape = (choose(min_side, max_side), choose(min_side, max_side))
    return _draw_layout(choose, tuple(shape), patterns, max_blocks, cuts, with_ranks, min_rank, max_rank)


# ---------------------------------------------------------------------------- strategies
def _shapes(st, shape, min_side, max_side):
    if shape is None:
        _check_side_bounds(min_side, max_side)
        side = st.integers(min_side, max_side)
        return st.tuples(side, side)
    if isinstance(shape, tuple):
        return st.just(tuple(int(s) for s in shape))
    return shape  # a strategy


def _element_strategy(st, dtype, max_abs):
    """Zero, or a value with magnitude in [max_abs * 1e-3, max_abs] of either sign."""
    width = 32 if dtype == np.float32 else 64
    lo, hi = (float(np.dtype(dtype).type(v)) for v in (max_abs * 1e-3, max_abs))
    mag = st.floats(lo, hi, width=width, allow_subnormal=False)
    return st.one_of(st.just(0.0), mag, mag.map(lambda v: -v))


def matrices(
    shape=None, *, min_side=1, max_side=12, dtype=np.float64, elements="floats", max_abs=100.0, batch_shape=()
):
    """Hypothesis strategy for finite real matrices (or stacks of them).

    Parameters
    ----------
    shape : (int, int) or strategy, optional
        Matrix shape; drawn with sides in ``[min_side, max_side]`` if None.
    min_side, max_side : int, default=1, 12
    dtype : {np.float64, np.float32}, default=np.float64
    elements : {"floats", "gaussian"} or strategy, default="floats"
        ``"floats"``: entry by entry, each zero or of magnitude in
        ``[max_abs / 1000, max_abs]`` (so shrinking finds zero rows, repeated
        entries and tied singular values, without under/overflow);
        ``"gaussian"``: a drawn seed fills the matrix with standard normal
        entries times ``max_abs`` (distinct singular values almost surely;
        use it when a property needs a unique truncated SVD); or any
        hypothesis strategy of floats.
    max_abs : float, default=100.0
    batch_shape : tuple or strategy, default=()
        Leading stack dimensions, e.g. ``(3,)`` for a stack of 3 matrices.

    Returns
    -------
    strategy of ndarray of shape batch_shape + (m, n)

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, derandomize=True, database=None)
    ... @given(matrices(max_side=5, dtype=np.float32))
    ... def check(X):
    ...     assert X.dtype == np.float32 and X.ndim == 2 and np.isfinite(X).all()
    >>> check()
    """
    st = _require_hypothesis()
    from hypothesis.extra import numpy as hnp

    dt = _check_dtype(dtype)
    shapes = _shapes(st, shape, min_side, max_side)
    batches = st.just(tuple(batch_shape)) if isinstance(batch_shape, tuple) else batch_shape

    @st.composite
    def _matrices(draw):
        full = tuple(draw(batches)) + tuple(draw(shapes))
        if isinstance(elements, str) and elements == "gaussian":
            seed = draw(st.integers(0, 2**32 - 1))
            X = np.random.default_rng(seed).standard_normal(full) * max_abs
            return X.astype(dt)
        if isinstance(elements, str):
            if elements != "floats":
                raise ValueError(f"elements must be 'floats', 'gaussian' or a strategy, got {elements!r}")
            el = _element_strategy(st, dt, float(max_abs))
        else:
            el = elements
        return draw(hnp.arrays(dt, full, elements=el))

    return _matrices()


def layouts(
    shape=None,
    *,
    patterns=PATTERNS,
    max_blocks=4,
    cuts="any",
    with_ranks=True,
    min_rank=1,
    max_rank=None,
    min_side=1,
    max_side=12,
):
    """Hypothesis strategy for valid :class:`~blocklowrank.BlockLayout` objects.

    Same parameters as :func:`random_layout`; ``shape`` may also be a
    strategy of ``(m, n)`` pairs.

    Returns
    -------
    strategy of BlockLayout

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=10, derandomize=True, database=None)
    ... @given(layouts(shape=(9, 6), patterns=("diagonal",), cuts="random"))
    ... def check(lay):
    ...     assert lay.pattern in ("diagonal", "full")  # a 1 x 1 grid is both
    ...     assert lay.n_active == lay.n_blocks[0] and sum(lay.row_sizes) == 9
    ...     assert (lay.ranks[lay.active] >= 1).all()
    >>> check()
    """
    st = _require_hypothesis()
    shapes = _shapes(st, shape, min_side, max_side)

    @st.composite
    def _layouts(draw):
        shp = tuple(draw(shapes))

        def choose(lo, hi):
            return draw(st.integers(lo, hi))

        return _draw_layout(choose, shp, patterns, max_blocks, cuts, with_ranks, min_rank, max_rank)

    return _layouts()


def planted_matrices(
    shape=None, *, structures=STRUCTURES, max_blocks=3, max_rank=3, noise=0.0, min_side=2, max_side=16, dtype=np.float64
):
    """Hypothesis strategy for ``(X, info)`` pairs from :func:`planted_matrix`.

    Structure, grid, per-block ranks (uniform for "global" and "shared_basis") and
    the seed are drawn; the numbers come from :func:`planted_matrix`.

    Parameters
    ----------
    shape : (int, int) or strategy, optional
        Drawn with sides in ``[min_side, max_side]`` if None.
    structures : tuple of str, default=STRUCTURES
    max_blocks : int, default=3
        Largest number of block-rows / block-columns.
    max_rank : int, default=3
        Largest planted rank of a block (also capped by the block's sides).
    noise : float or strategy of floats, default=0.0
        Relative noise level.
    min_side, max_side : int, default=2, 16
    dtype : {np.float64, np.float32}, default=np.float64

    Returns
    -------
    strategy of (ndarray, PlantedInfo)
    """
    st = _require_hypothesis()
    _check_dtype(dtype)
    structures = tuple(structures)
    if not structures or any(s not in STRUCTURES for s in structures):
        raise ValueError(f"structures must be a non-empty subset of {STRUCTURES}, got {structures!r}")
    shapes = _shapes(st, shape, min_side, max_side)
    noises = noise if not isinstance(noise, numbers.Real) else st.just(float(noise))

    @st.composite
    def _planted(draw):
        m, n = draw(shapes)
        structure = draw(st.sampled_from(structures))
        if structure == "global":
            kr = kc = 1
        elif structure == "diagonal":
            kr = kc = draw(st.integers(1, min(m, n, max_blocks)))
        else:
            kr = draw(st.integers(1, min(m, max_blocks)))
            kc = draw(st.integers(1, min(n, max_blocks)))
        pattern = "diagonal" if structure == "diagonal" else "full"
        lay = BlockLayout.from_blocks((m, n), (kr, kc), pattern=pattern)
        cap = np.minimum(lay.max_ranks, max_rank)
        if structure in ("global", "shared_basis"):
            r = draw(st.integers(1, int(cap[lay.active].min())))
            ranks = np.where(lay.active, r, 0)
        else:
            ranks = np.zeros(lay.n_blocks, dtype=np.int64)
            for i, j in zip(*np.nonzero(lay.active)):
                ranks[i, j] = draw(st.integers(1, int(cap[i, j])))
        lay = lay.with_ranks(ranks)
        seed = draw(st.integers(0, 2**32 - 1))
        return planted_matrix(layout=lay, structure=structure, noise=draw(noises), random_state=seed, dtype=dtype)

    return _planted()


# ---------------------------------------------------------------------------- structure checks
_ROW_POSITION = (
    "with several block-rows a row's block-row is fixed by its position, so transform "
    "needs all fitted rows in their fitted order"
)


def expected_failed_checks(estimator):
    """scikit-learn checks that cannot apply to ``estimator``, each with its reason.

    With several block-rows a row's codes depend on its position, so the
    checks that transform held-out or reordered rows cannot pass; everything
    else must.
    """
    nb = getattr(estimator, "n_blocks", 1)
    kr = nb[0] if isinstance(nb, (tuple, list)) else nb
    if kr > 1:
        return {
            "check_methods_subset_invariance": _ROW_POSITION,
            "check_methods_sample_order_invariance": _ROW_POSITION,
            "check_fit_idempotent": _ROW_POSITION + " (it transforms held-out rows)",
        }
    return {}


def structure_estimators(structure):
    """Estimators of a structure for the shared checks: its defaults, a 2 x 2 and a 1 x 2 grid."""
    from .structures import get_structure

    s = get_structure(structure)
    out = [s.estimator()]
    if "n_blocks" in s.estimator().get_params() and s.fixed_blocks is None:
        out.append(s.estimator(n_blocks=2))
        try:
            s.layout((4, 4), (1, 2))
            out.append(s.estimator(n_blocks=(1, 2)))
        except ValueError:  # square grids only (e.g. diagonal blocks)
            pass
    return out


def check_structure(structure, *, shape=(12, 10), random_state=0, sklearn=True):
    """The checks every registered structure passes (raises AssertionError on the first failure).

    1. scikit-learn compliance of its estimator (``check_estimator``, with
       :func:`expected_failed_checks`), on its defaults and on small grids;
    2. budget: every configuration :func:`~blocklowrank.budget.match_budget`
       lists for it is counted by its ``count`` as the record says, within the
       budget, and fitting it gives factors holding exactly that many numbers'
       worth of parameters (``factors.n_params``);
    3. round trip: the fit's dense matrix survives save/load exactly, the
       estimator's ``inverse_transform(fit_transform(X))`` equals its
       reconstruction, and the fitted error is the error of that reconstruction.

    Parameters
    ----------
    structure : str or Structure
    shape : (int, int), default=(12, 10)
        Shape of the random test matrix (uneven splits on purpose).
    random_state : int, default=0
    sklearn : bool, default=True
        Run the scikit-learn checks (the slow part).
    """
    import tempfile
    from pathlib import Path

    from .budget import count_params, match_budget
    from .factors import load_factors
    from .structures import get_structure

    s = get_structure(structure)
    X = _rng(random_state).standard_normal(shape)
    if sklearn:
        from sklearn.utils.estimator_checks import check_estimator

        for est in structure_estimators(s):
            check_estimator(est, expected_failed_checks=expected_failed_checks(est))
    cheapest = s.budget_rule.cheapest(shape, [s.fixed_blocks or 2], None)
    assert cheapest is not None, f"{s.name}: no configuration below full rank on {shape}"
    recs = match_budget(shape, 2 * cheapest[0], methods=[s.name], n_blocks=[s.fixed_blocks or 2])
    assert recs, f"{s.name}: match_budget found no configuration at twice its cheapest count"
    for rec in recs:
        config = {k: rec[k] for k in ("n_blocks", "rank", *s.extra)}
        assert count_params(s.name, shape, **config) == rec["n_params"] <= rec["budget"]
        res = s.fit(X, **config)
        f = res.factors
        assert f.n_params == rec["n_params"], (s.name, f.n_params, rec)
        dense = f.to_dense()
        err = np.linalg.norm(X - dense) / np.linalg.norm(X)
        assert abs(err - res.error) <= 1e-8 * max(1.0, err), (s.name, err, res.error)
        with tempfile.TemporaryDirectory() as tmp:
            back = load_factors(f.save(Path(tmp) / "f"))
        assert back.n_params == f.n_params and np.array_equal(back.to_dense(), dense)
        params = set(s.estimator().get_params())
        est = s.estimator(**{k: v for k, v in config.items() if k in params})
        Z = est.fit_transform(X)
        np.testing.assert_allclose(est.inverse_transform(Z), est.reconstruct(), atol=1e-10)
        assert est.n_params_ == est.factors_.n_params

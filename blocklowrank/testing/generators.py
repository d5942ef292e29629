"""Seeded generators of matrices with a known structure, and of random layouts (plain NumPy).

- :func:`planted_matrix` builds a matrix with a *planted* structure of the
  registry (see :func:`planted_structures`) plus noise of a chosen relative
  size; :class:`PlantedInfo` says what was planted.
- :func:`random_layout` draws a random valid :class:`~blocklowrank.BlockLayout`.

Planted structures
------------------
For a layout with row blocks ``m_i`` and column blocks ``n_j``, every pure
layout structure of the registry (``"global"``: one block; ``"diagonal"``: the
diagonal blocks, off-diagonal blocks zero; ``"block"``: every block of the
grid; any structure registered with :func:`~blocklowrank.structures.layout_structure`)
plants an independent matrix ``U_ij diag(s_ij) V_ij^T`` of rank ``r_ij`` in each
active block. ``"shared_basis"`` plants ``U_i diag(s_ij) V_j^T`` with ``U_i``
shared along block-row ``i`` and ``V_j`` along block-column ``j`` (the BLAST
picture of blocks that share subspaces): every block has rank ``r``, the whole
matrix rank at most ``r * min(K_rows, K_cols)``. How each structure's factors
are drawn is one entry of a table, not a branch on its name.

``U`` and ``V`` have orthonormal columns and the planted singular values are
drawn uniformly in ``[1, 2]``, so each block has exactly its planted rank with
a wide gap to zero. Noise is Gaussian, scaled so that
``||X - clean||_F = noise * ||clean||_F`` exactly. Since ``clean`` is one of the
candidates of the structured problem at the planted ranks, any correct solver
satisfies ``||X - X_hat||_F <= ||X - clean||_F``.

Examples
--------
>>> import numpy as np
>>> from blocklowrank.testing.generators import planted_matrix
>>> X, info = planted_matrix((12, 10), structure="block", n_blocks=2, rank=2, noise=0.0, random_state=0)
>>> X.shape, info.layout.ranks.tolist()
((12, 10), [[2, 2], [2, 2]])
>>> rows, cols = info.layout.block_slice(0, 1)
>>> int(np.linalg.matrix_rank(X[rows, cols]))
2
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .._params import PATTERNS, Int
from .._params import check as _check
from ..layout import BlockLayout
from ..structures import get_structure, structure_names

__all__ = ["PlantedInfo", "planted_matrix", "planted_structures", "random_layout"]

_CUTS = ("array_split", "random", "any")


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


def _check_noise(noise):
    if isinstance(noise, (bool, np.bool_)) or not isinstance(noise, numbers.Real):
        raise TypeError(f"noise must be a non-negative float, got {noise!r}")
    if not (np.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise}")
    return float(noise)


def _check_side_bounds(min_side, max_side):
    if not (isinstance(min_side, numbers.Integral) and isinstance(max_side, numbers.Integral)):
        raise TypeError("min_side and max_side must be integers")
    if not 1 <= min_side <= max_side:
        raise ValueError(f"need 1 <= min_side <= max_side, got {min_side}, {max_side}")


def _orthonormal(rng, n, r):
    """``n x r`` matrix with orthonormal columns (Haar-distributed up to signs)."""
    return np.linalg.qr(rng.standard_normal((n, r)))[0] if r else np.zeros((n, 0))


def _spectrum(rng, r):
    """``r`` planted singular values in [1, 2], descending."""
    return np.sort(rng.uniform(1.0, 2.0, size=r))[::-1]


# ---------------------------------------------------------------------------- planted matrices
def _independent_factors(rng, lay):
    """Every active block its own ``U diag(s) V^T`` of the block's rank (any pure layout structure)."""
    factors = {}
    for i, j in zip(*np.nonzero(lay.active)):
        (h, w), r = lay.block_shape(i, j), int(lay.ranks[i, j])
        s = _spectrum(rng, r)
        factors[(int(i), int(j))] = (_orthonormal(rng, h, r) * s, _orthonormal(rng, w, r).T.copy())
    return factors


def _shared_basis_factors(rng, lay):
    """Block ``(i, j)`` is ``U_i diag(s_ij) V_j^T``: bases shared along block-rows and block-columns."""
    r = lay.uniform_rank
    if r is None:
        raise ValueError(
            f"the shared_basis structure needs one rank for every active block, got {lay.ranks[lay.active].tolist()}"
        )
    U = [_orthonormal(rng, h, r) for h in lay.row_sizes]
    V = [_orthonormal(rng, w, r) for w in lay.col_sizes]
    return {(int(i), int(j)): (U[i] * _spectrum(rng, r), V[j].T.copy()) for i, j in zip(*np.nonzero(lay.active))}


@dataclass(frozen=True)
class _Planter:
    """How a structure's factors are drawn: ``factors(rng, layout) -> {(i, j): (B, A)}``."""

    factors: Callable
    uniform_rank: bool = False  # one rank for every active block


# The structures whose factors are not independent per block; every pure layout
# structure of the registry (``spectral``) is planted block by block.
_PLANTERS = {"shared_basis": _Planter(_shared_basis_factors, uniform_rank=True)}
_PER_BLOCK = _Planter(_independent_factors)


def planted_structures():
    """The registered structures :func:`planted_matrix` can plant, in registration order."""
    return tuple(n for n in structure_names() if n in _PLANTERS or get_structure(n).spectral)


def _planter(structure):
    """``(Structure, _Planter)`` of a registered structure that can be planted."""
    s = get_structure(structure)
    planter = _PLANTERS.get(s.name, _PER_BLOCK if s.spectral else None)
    if planter is None:
        raise ValueError(f"structure must be one of planted_structures() {planted_structures()}, got {s.name!r}")
    return s, planter


def _planted_layout(s, shape, n_blocks, rank, layout):
    """The layout to plant: the structure's own on ``shape``, or ``layout`` checked against it."""
    if layout is None:
        if shape is None:
            raise ValueError("give the shape (or a layout)")
        if np.ndim(rank) == 0:
            _check(rank, "rank", [Int(1)])
        return s.layout(shape, n_blocks if n_blocks is not None else s.fixed_blocks or 2).with_ranks(rank)
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if shape is not None and tuple(shape) != layout.shape:
        raise ValueError(f"shape {tuple(shape)} does not match the layout's {layout.shape}")
    kr, kc = layout.n_blocks
    try:
        allowed = s.layout(layout.shape, kr if kr == kc else (kr, kc)).active
    except ValueError as exc:
        raise ValueError(f"a {kr} x {kc} layout cannot hold the {s.name} structure: {exc}") from None
    if np.any(layout.active & ~allowed):
        raise ValueError(f"the {s.name} structure has no block where this {layout.pattern!r} layout has one")
    return layout


@dataclass(frozen=True, eq=False)
class PlantedInfo:
    """What :func:`planted_matrix` planted.

    Attributes
    ----------
    clean : ndarray of shape (m, n), float64
        The structured matrix before noise (read-only).
    layout : BlockLayout
        The planted layout; its ``ranks`` are the exact rank of each block of
        ``clean`` (0 for blocks that are zero).
    structure : str
        The registered structure planted (one of :func:`planted_structures`).
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
    structure : str, default="block"
        A registered structure that can be planted (:func:`planted_structures`:
        every pure layout structure, and ``"shared_basis"``).
    n_blocks : int or (int, int), optional
        Grid of the structure's layout on ``shape`` (``np.array_split`` cuts).
        Defaults to the structure's one grid size if it has one (1 for
        ``"global"``, which accepts nothing else) and 2 otherwise; ``"diagonal"``
        needs a square grid.
    rank : int or array-like of shape (K_rows, K_cols), default=1
        Rank of every active block, or one rank per block (``"shared_basis"``
        needs a single int). A rank above a block's smaller side raises
        ValueError.
    noise : float, default=0.0
        Relative Frobenius size of the noise, ``>= 0``.
    layout : BlockLayout, optional
        Plant exactly this layout's active blocks and ranks (any cuts); its
        active blocks must be blocks of the structure on that grid (any
        pattern for ``"block"``, diagonal ones for ``"diagonal"``, one block
        for ``"global"``). Replaces ``n_blocks`` and ``rank``.
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
    >>> X, info = planted_matrix((8, 8), structure="diagonal", n_blocks=4, rank=1, random_state=0)
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
    s, planter = _planter(structure)
    noise, dt, rng = _check_noise(noise), _check_dtype(dtype), _rng(random_state)
    lay = _planted_layout(s, shape, n_blocks, rank, layout)
    factors = planter.factors(rng, lay)
    clean = np.zeros(lay.shape)
    for (i, j), (B, A) in factors.items():
        clean[lay.block_slice(i, j)] = B @ A
    X = clean.copy()
    if noise > 0:
        E = rng.standard_normal(lay.shape)
        X += E * (noise * np.linalg.norm(clean) / np.linalg.norm(E))
    clean.setflags(write=False)
    info = PlantedInfo(clean=clean, layout=lay, structure=s.name, noise=noise, factors=factors)
    return np.ascontiguousarray(X, dtype=dt), info


# ---------------------------------------------------------------------------- random layouts
def _composition(choose, total, parts):
    """Random sizes of ``parts`` positive pieces summing to ``total``."""
    sizes = [1] * parts
    for _ in range(total - parts):
        sizes[choose(0, parts - 1)] += 1
    return tuple(sizes)


@dataclass(frozen=True)
class _LayoutOptions:
    """The options of :func:`random_layout` and the ``layouts`` strategy (documented in the former), checked once."""

    patterns: tuple = PATTERNS
    max_blocks: int = 4
    cuts: str = "any"
    with_ranks: bool = True
    min_rank: int = 1
    max_rank: int | None = None
    square_grid: bool = False
    uniform_rank: bool = False

    def __post_init__(self):
        object.__setattr__(self, "patterns", tuple(self.patterns))
        if not self.patterns or any(p not in PATTERNS for p in self.patterns):
            raise ValueError(f"patterns must be a non-empty subset of {PATTERNS}, got {self.patterns!r}")
        if self.cuts not in _CUTS:
            raise ValueError(f"cuts must be one of {_CUTS}, got {self.cuts!r}")
        _check(self.max_blocks, "max_blocks", [Int(1)])
        if self.with_ranks:
            _check(self.min_rank, "min_rank", [Int(0)])
            if self.max_rank is not None and _check(self.max_rank, "max_rank", [Int(1)]) < self.min_rank:
                raise ValueError(f"max_rank={self.max_rank} is below min_rank={self.min_rank}")


def _draw_layout(choose, shape, o):
    """One layout from integer choices ``choose(lo, hi)`` and :class:`_LayoutOptions` ``o``
    (shared by :func:`random_layout` and the ``layouts`` strategy)."""
    m, n = shape
    pattern = o.patterns[choose(0, len(o.patterns) - 1)]
    square = o.square_grid or pattern == "diagonal"
    kr = choose(1, min(m, n, o.max_blocks) if square else min(m, o.max_blocks))
    kc = kr if square else choose(1, min(n, o.max_blocks))
    how = o.cuts if o.cuts != "any" else ("array_split", "random")[choose(0, 1)]
    rs, cs = (_composition(choose, m, kr), _composition(choose, n, kc)) if how == "random" else (None, None)
    lay = BlockLayout.from_blocks((m, n), (kr, kc), pattern=pattern, row_sizes=rs, col_sizes=cs)
    if not o.with_ranks:
        return lay
    top = lay.max_ranks if o.max_rank is None else np.minimum(lay.max_ranks, o.max_rank)
    if o.uniform_rank:
        hi = int(top[lay.active].min())
        return lay.with_ranks(choose(min(o.min_rank, hi), hi))
    ranks = np.zeros(lay.n_blocks, dtype=np.int64)
    for i, j in zip(*np.nonzero(lay.active)):
        ranks[i, j] = choose(min(o.min_rank, int(top[i, j])), int(top[i, j]))
    return lay.with_ranks(ranks)


def random_layout(shape=None, *, min_side=1, max_side=12, random_state=None, **options):
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
    square_grid : bool, default=False
        As many block-rows as block-columns (always so for "diagonal").
    uniform_rank : bool, default=False
        One rank for every active block, at most the smallest block's side.
    min_side, max_side : int, default=1, 12
        Bounds of the drawn shape when ``shape`` is None.
    random_state : int, Generator, RandomState or None

    Returns
    -------
    BlockLayout

    Notes
    -----
    ``patterns`` to ``uniform_rank`` are keyword arguments (``**options``),
    checked before anything is drawn; the ``layouts`` strategy takes the same.

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

    options = _LayoutOptions(**options)
    if shape is None:
        _check_side_bounds(min_side, max_side)
        shape = (choose(min_side, max_side), choose(min_side, max_side))
    return _draw_layout(choose, tuple(shape), options)

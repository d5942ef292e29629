"""The block layout: one description for every structure in the library.

A layout cuts an ``m x n`` matrix into a grid of ``K_rows x K_cols`` blocks,
marks some blocks *active* and gives every active block a rank ``r_ij``.
Each active block carries low-rank factors ``B_ij (m_i x r_ij)`` and
``A_ij (r_ij x n_j)``; inactive blocks are zero.

- global LoRA: a 1 x 1 grid;
- MELoRA (diagonal-block): an N x N grid, only the diagonal active;
- Localized LoRA / GraLoRA (full block): a K x K grid, every block active.

The exact parameter count is ``sum over active (i, j) of r_ij * (m_i + n_j)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._params import check, validate_params

__all__ = ["BlockLayout", "split_sizes"]


@validate_params("length", "n_parts")
def split_sizes(length, n_parts, *, name="n_blocks", axis="rows"):
    """Sizes of ``n_parts`` contiguous pieces of ``length`` with ``np.array_split`` semantics.

    The first ``length % n_parts`` pieces have one element more than the rest.

    Parameters
    ----------
    length : int
        Number of rows (or columns) to split.
    n_parts : int
        Number of pieces; ``1 <= n_parts <= length``.
    name, axis : str
        Used in error messages only.

    Returns
    -------
    sizes : tuple of int

    Examples
    --------
    >>> split_sizes(28, 3)
    (10, 9, 9)
    >>> split_sizes(64, 4)
    (16, 16, 16, 16)
    """
    if n_parts > length:
        raise ValueError(
            f"{name}={n_parts} is more blocks than the {length} {axis} of the matrix; "
            f"use at most {length} blocks along the {axis}"
        )
    q, r = divmod(length, n_parts)
    return tuple([q + 1] * r + [q] * (n_parts - r))


def _normalize_sizes(sizes, length, name):
    try:
        arr = np.asarray(sizes)
    except Exception as exc:  # pragma: no cover - defensive
        raise TypeError(f"{name} must be a sequence of positive integers") from exc
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be a non-empty sequence of positive integers, got {sizes!r}")
    if np.any(arr < 1):
        raise ValueError(f"{name} must contain positive sizes, got {list(map(int, arr))}")
    if int(arr.sum()) != length:
        raise ValueError(f"{name} must sum to {length} (the matrix side), got sum {int(arr.sum())}")
    return tuple(int(s) for s in arr)


def _normalize_n_blocks(n_blocks):
    """Return (K_rows, K_cols) from an int or a pair (checked)."""
    k = check(n_blocks, "n_blocks")
    return k if isinstance(k, tuple) else (k, k)


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """A matrix cut into a grid of blocks, some active, each active block with a rank.

    Prefer the constructors :meth:`from_blocks`, :meth:`global_`,
    :meth:`diagonal` and :meth:`block`; the raw constructor validates
    everything too.

    Parameters
    ----------
    shape : (int, int)
        Shape ``(m, n)`` of the matrix.
    row_sizes, col_sizes : tuple of int
        Heights of the block-rows and widths of the block-columns.
    active : ndarray of bool, shape (K_rows, K_cols)
        Which blocks carry factors.
    ranks : ndarray of int, shape (K_rows, K_cols)
        Rank of each block; 0 where inactive. An active block may have rank
        0 only when ranks were chosen by an allocation (budget or tol).

    Attributes
    ----------
    n_blocks : (int, int)
    row_edges, col_edges : ndarray
        Cut points, ``[0, ..., m]`` and ``[0, ..., n]``.
    n_params : int
        Exact parameter count ``sum r_ij (m_i + n_j)``.
    max_ranks : ndarray of int
        ``min(m_i, n_j)`` on active blocks, 0 elsewhere.

    Examples
    --------
    >>> lay = BlockLayout.block((28, 28), 2, rank=2)
    >>> lay.n_params
    224
    >>> BlockLayout.diagonal((28, 28), 4, rank=4).n_params
    224
    >>> BlockLayout.global_((28, 28), rank=4).n_params
    224
    >>> BlockLayout.block((10, 7), (3, 2), rank=1).row_sizes
    (4, 3, 3)
    """

    shape: tuple
    row_sizes: tuple
    col_sizes: tuple
    active: np.ndarray = field(repr=False)
    ranks: np.ndarray = field(repr=False)
    row_perm: object = field(default=None, repr=False)
    col_perm: object = field(default=None, repr=False)

    def __post_init__(self):
        m, n = check(self.shape, "shape", caller="BlockLayout")
        object.__setattr__(self, "shape", (m, n))
        rs = _normalize_sizes(self.row_sizes, m, "row_sizes")
        cs = _normalize_sizes(self.col_sizes, n, "col_sizes")
        object.__setattr__(self, "row_sizes", rs)
        object.__setattr__(self, "col_sizes", cs)
        active = np.asarray(self.active, dtype=bool)
        if active.shape != (len(rs), len(cs)):
            raise ValueError(f"active mask has shape {active.shape}, expected {(len(rs), len(cs))}")
        ranks = np.asarray(self.ranks)
        if ranks.shape != active.shape:
            raise ValueError(f"ranks has shape {ranks.shape}, expected {active.shape}")
        if not np.issubdtype(ranks.dtype, np.integer):
            raise TypeError("ranks must be integers")
        ranks = ranks.astype(np.int64)
        if np.any(ranks < 0):
            raise ValueError("ranks must be >= 0")
        if np.any(ranks[~active] != 0):
            raise ValueError("inactive blocks must have rank 0")
        over = ranks > self._max_ranks(rs, cs, active)
        if np.any(over):
            i, j = (int(v) for v in np.argwhere(over)[0])
            raise ValueError(
                f"rank {int(ranks[i, j])} of block ({i}, {j}) exceeds the block's smaller side "
                f"min({rs[i]}, {cs[j]}) = {min(rs[i], cs[j])}"
            )
        active.setflags(write=False)
        ranks.setflags(write=False)
        object.__setattr__(self, "active", active)
        object.__setattr__(self, "ranks", ranks)
        object.__setattr__(self, "row_perm", _check_perm(self.row_perm, m, "row_perm"))
        object.__setattr__(self, "col_perm", _check_perm(self.col_perm, n, "col_perm"))

    # ------------------------------------------------------------------ constructors
    @classmethod
    @validate_params("shape", "n_blocks", "pattern", "cap_rank", rank="layout_rank")
    def from_blocks(
        cls, shape, n_blocks=1, *, rank=0, pattern="full", row_sizes=None, col_sizes=None, cap_rank=False,
        row_perm=None, col_perm=None,
    ):  # fmt: skip
        """Build a layout from block counts (``np.array_split`` cuts) or explicit sizes.

        Parameters
        ----------
        shape : (int, int)
            Matrix shape ``(m, n)``.
        n_blocks : int or (int, int), default=1
            Number of block-rows and block-columns. Ignored along an axis for
            which explicit sizes are given.
        rank : int or array-like of shape (K_rows, K_cols), default=0
            Uniform rank for every active block, or one rank per block
            (entries of inactive blocks are ignored). ``0`` builds a layout
            without ranks (useful before an allocation).
        pattern : {"full", "diagonal"}, default="full"
            Which blocks are active. "diagonal" needs as many block-rows as
            block-columns.
        row_sizes, col_sizes : sequence of int, optional
            Explicit block heights / widths.
        cap_rank : bool, default=False
            If True, a rank above a block's smaller side is lowered to it;
            if False (default) such a rank raises ValueError.
        row_perm, col_perm : array-like of int, optional
            Cut ``X[row_perm][:, col_perm]`` instead of ``X`` (see
            :meth:`with_permutation`).
        """
        m, n = shape
        kr, kc = (n_blocks, n_blocks) if isinstance(n_blocks, int) else n_blocks
        rs = split_sizes(m, kr, name="n_blocks", axis="rows") if row_sizes is None else row_sizes
        cs = split_sizes(n, kc, name="n_blocks", axis="columns") if col_sizes is None else col_sizes
        rs = _normalize_sizes(rs, m, "row_sizes")
        cs = _normalize_sizes(cs, n, "col_sizes")
        if pattern == "full":
            active = np.ones((len(rs), len(cs)), dtype=bool)
        else:
            if len(rs) != len(cs):
                raise ValueError(
                    f"the diagonal pattern needs as many block-rows as block-columns, got {len(rs)} x {len(cs)}"
                )
            active = np.eye(len(rs), dtype=bool)
        ranks = _expand_rank(rank, active)
        maxr = cls._max_ranks(rs, cs, active)
        if cap_rank:
            ranks = np.minimum(ranks, maxr)
        return cls((m, n), rs, cs, active, ranks, row_perm, col_perm)

    @classmethod
    @validate_params()
    def global_(cls, shape, rank=0, *, cap_rank=False):
        """Global low rank (LoRA): a single block of rank ``rank``."""
        return cls.from_blocks(shape, 1, rank=rank, cap_rank=cap_rank)

    @classmethod
    @validate_params()
    def diagonal(cls, shape, n_blocks, rank=0, *, cap_rank=False):
        """Diagonal-block low rank (MELoRA): ``n_blocks`` diagonal blocks of rank ``rank``."""
        return cls.from_blocks(shape, n_blocks, rank=rank, pattern="diagonal", cap_rank=cap_rank)

    @classmethod
    @validate_params()
    def block(cls, shape, n_blocks, rank=0, *, cap_rank=False):
        """Full block low rank (Localized LoRA / GraLoRA): every block of the grid active."""
        return cls.from_blocks(shape, n_blocks, rank=rank, pattern="full", cap_rank=cap_rank)

    @validate_params("cap_rank", ranks="layout_rank")
    def with_ranks(self, ranks, *, cap_rank=False):
        """Same cuts and active blocks, new ranks (uniform int or per-block array)."""
        r = _expand_rank(ranks, self.active)
        if cap_rank:
            r = np.minimum(r, self.max_ranks)
        return BlockLayout(self.shape, self.row_sizes, self.col_sizes, self.active, r, self.row_perm, self.col_perm)

    def with_permutation(self, row_perm=None, col_perm=None):
        """Same blocks and ranks, cutting ``X[row_perm][:, col_perm]`` instead of ``X``.

        A permutation lists, in order, the original indices that make up the
        permuted matrix: block-row 0 holds original rows ``row_perm[:m_0]``,
        and so on. None keeps the natural order. See
        :func:`blocklowrank.permutations.strided_permutation` and friends.
        """
        return BlockLayout(self.shape, self.row_sizes, self.col_sizes, self.active, self.ranks, row_perm, col_perm)

    def without_permutation(self):
        """The same layout in its own (permuted) coordinates."""
        return BlockLayout(self.shape, self.row_sizes, self.col_sizes, self.active, self.ranks)

    def transpose(self):
        """The layout of the transposed matrix: block ``(i, j)`` becomes ``(j, i)``, rows and columns swap."""
        m, n = self.shape
        return BlockLayout(
            (n, m), self.col_sizes, self.row_sizes, self.active.T, self.ranks.T, self.col_perm, self.row_perm
        )

    @property
    def permuted(self):
        return self.row_perm is not None or self.col_perm is not None

    def permute(self, X):
        """``X[..., row_perm, :][..., :, col_perm]`` (a view-free copy only when permuted)."""
        if self.row_perm is not None:
            X = X[..., self.row_perm, :]
        if self.col_perm is not None:
            X = X[..., :, self.col_perm]
        return X

    def unpermute(self, Xp):
        """Inverse of :meth:`permute`: back to the original row and column order."""
        if self.row_perm is not None:
            Xp = Xp[..., np.argsort(self.row_perm), :]
        if self.col_perm is not None:
            Xp = Xp[..., :, np.argsort(self.col_perm)]
        return Xp

    # ------------------------------------------------------------------ properties
    @staticmethod
    def _max_ranks(rs, cs, active):
        return np.where(active, np.minimum.outer(np.asarray(rs), np.asarray(cs)), 0).astype(np.int64)

    @property
    def n_blocks(self):
        return (len(self.row_sizes), len(self.col_sizes))

    @property
    def n_active(self):
        return int(self.active.sum())

    @property
    def pattern(self):
        """ "full", "diagonal" or "custom" (the name of the active-block pattern)."""
        kr, kc = self.n_blocks
        if self.active.all():
            return "full"
        if kr == kc and np.array_equal(self.active, np.eye(kr, dtype=bool)):
            return "diagonal"
        return "custom"

    @property
    def row_edges(self):
        return np.concatenate([[0], np.cumsum(self.row_sizes)])

    @property
    def col_edges(self):
        return np.concatenate([[0], np.cumsum(self.col_sizes)])

    @property
    def max_ranks(self):
        return self._max_ranks(self.row_sizes, self.col_sizes, self.active)

    @property
    def block_costs(self):
        """Parameters per unit of rank of each block, ``m_i + n_j`` (0 where inactive)."""
        rs = np.asarray(self.row_sizes)
        cs = np.asarray(self.col_sizes)
        return np.where(self.active, rs[:, None] + cs[None, :], 0).astype(np.int64)

    @property
    def n_params(self):
        return int((self.ranks * self.block_costs).sum())

    @property
    def full_rank_params(self):
        """Parameters when every active block has its full rank ``min(m_i, n_j)``."""
        return int((self.max_ranks * self.block_costs).sum())

    @property
    def uniform_rank(self):
        """The common rank of the active blocks, or None if they differ."""
        r = np.unique(self.ranks[self.active])
        return int(r[0]) if r.size == 1 else None

    def block_slice(self, i, j):
        """``(row_slice, col_slice)`` of block ``(i, j)``."""
        re, ce = self.row_edges, self.col_edges
        return slice(int(re[i]), int(re[i + 1])), slice(int(ce[j]), int(ce[j + 1]))

    def block_shape(self, i, j):
        return (self.row_sizes[i], self.col_sizes[j])

    def regions(self):
        """Rectangular regions of equal-shaped blocks, for loop-free block access.

        Consecutive block-rows of equal height form a row run, likewise for
        columns; every (row run, column run) pair is a rectangle that reshapes
        to a ``(k_r, k_c, m_i, n_j)`` stack of blocks. With ``np.array_split``
        cuts there are at most two runs per axis, hence at most four regions.

        Returns
        -------
        list of tuple
            ``(row_start, row_stop, col_start, col_stop, block_row_offset,
            block_col_offset, k_r, k_c, (m_i, n_j))``.
        """
        out = []
        for r0, r1, bi0, kr, h in _runs(self.row_sizes):
            for c0, c1, bj0, kc, w in _runs(self.col_sizes):
                out.append((r0, r1, c0, c1, bi0, bj0, kr, kc, (h, w)))
        return out

    def groups(self):
        """Active blocks grouped by shape: ``{(m_i, n_j): (rows, cols)}`` index arrays.

        Blocks are ordered by region, then row-major inside the region; the
        engine runs one batched SVD per group.
        """
        groups = {}
        for _, _, _, _, bi0, bj0, kr, kc, shp in self.regions():
            ii, jj = np.nonzero(self.active[bi0 : bi0 + kr, bj0 : bj0 + kc])
            if ii.size == 0:
                continue
            g = groups.setdefault(shp, ([], []))
            g[0].append(ii + bi0)
            g[1].append(jj + bj0)
        return {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in groups.items()}

    def describe(self, *, params=True):
        """A one-line human description (``params=False``: without the parameter count)."""
        kr, kc = self.n_blocks
        ur = self.uniform_rank
        rank = f"rank {ur}" if ur is not None else "ranks " + str(self.ranks[self.active].tolist())
        return f"{self.pattern} {kr}x{kc} layout of a {self.shape[0]}x{self.shape[1]} matrix, {rank}" + (
            f", {self.n_params} parameters" if params else ""
        )

    def __repr__(self):
        perm = ", permuted" if self.permuted else ""
        return (
            f"BlockLayout(shape={self.shape}, n_blocks={self.n_blocks}, pattern={self.pattern!r}, "
            f"ranks={self.ranks.tolist()}, n_params={self.n_params}{perm})"
        )

    def __eq__(self, other):
        if not isinstance(other, BlockLayout):
            return NotImplemented
        return (
            self.shape == other.shape
            and self.row_sizes == other.row_sizes
            and self.col_sizes == other.col_sizes
            and np.array_equal(self.active, other.active)
            and np.array_equal(self.ranks, other.ranks)
            and _perm_eq(self.row_perm, other.row_perm)
            and _perm_eq(self.col_perm, other.col_perm)
        )

    __hash__ = None

    def to_dict(self):
        """Plain-Python description (JSON-serialisable)."""
        return {
            "shape": list(self.shape),
            "row_sizes": list(self.row_sizes),
            "col_sizes": list(self.col_sizes),
            "active": self.active.astype(int).tolist(),
            "ranks": self.ranks.tolist(),
            "row_perm": None if self.row_perm is None else self.row_perm.tolist(),
            "col_perm": None if self.col_perm is None else self.col_perm.tolist(),
        }

    @classmethod
    def from_dict(cls, d):
        """The layout of :meth:`to_dict` (a ValueError naming what is missing otherwise)."""
        if not isinstance(d, dict):
            raise ValueError(f"a layout description must be a dict, got {type(d).__name__}")
        missing = {"shape", "row_sizes", "col_sizes", "active", "ranks"} - set(d)
        if missing:
            raise ValueError(f"the layout description misses {sorted(missing)}")
        return cls(
            tuple(d["shape"]),
            tuple(d["row_sizes"]),
            tuple(d["col_sizes"]),
            np.asarray(d["active"], dtype=bool),
            np.asarray(d["ranks"], dtype=np.int64),
            d.get("row_perm"),
            d.get("col_perm"),
        )


def _expand_rank(rank, active):
    """Uniform int or per-block array -> int64 array with zeros off the active set."""
    if np.ndim(rank) == 0:  # checked by the callers' decorators
        return np.where(active, rank, 0).astype(np.int64)
    arr = np.asarray(rank)
    if arr.shape != active.shape:
        raise ValueError(f"per-block rank must have shape {active.shape}, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            raise TypeError("per-block ranks must be an integer array, got floats")
        raise TypeError(f"per-block ranks must be integers, got dtype {arr.dtype}")
    if np.any(arr[active] < 0):
        raise ValueError("per-block ranks must be >= 0")
    return np.where(active, arr, 0).astype(np.int64)


def _check_perm(perm, length, name):
    if perm is None:
        return None
    arr = np.asarray(perm)
    if arr.ndim != 1 or arr.shape[0] != length or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a permutation of range({length}) (1-D integers)")
    if not np.array_equal(np.sort(arr), np.arange(length)):
        raise ValueError(f"{name} must be a permutation: each index 0..{length - 1} exactly once")
    if np.array_equal(arr, np.arange(length)):
        return None  # the identity is no permutation
    arr = arr.astype(np.intp)
    arr.setflags(write=False)
    return arr


def _perm_eq(a, b):
    if a is None or b is None:
        return a is None and b is None
    return np.array_equal(a, b)


def _runs(sizes):
    """Runs of equal consecutive sizes: (start, stop, first_block, count, size)."""
    out = []
    start = 0
    b = 0
    k = len(sizes)
    while b < k:
        e = b
        while e + 1 < k and sizes[e + 1] == sizes[b]:
            e += 1
        cnt = e - b + 1
        out.append((start, start + cnt * sizes[b], b, cnt, sizes[b]))
        start += cnt * sizes[b]
        b = e + 1
    return out

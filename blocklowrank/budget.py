"""Parameter counts, budget matching and comparisons at a parameter budget.

The three structures of the paper are layouts of one kind (see
:class:`~blocklowrank.layout.BlockLayout`):

- ``"global"`` (LoRA): one block of rank ``r``;
- ``"diagonal"`` (MELoRA): an ``N x N`` grid, only the diagonal active;
- ``"block"`` (Localized LoRA / GraLoRA): a ``K x K`` grid, every block active.

Two structures beyond the paper are accepted by name (opt-in; the defaults stay
the paper's three, :data:`METHODS`; :data:`ALL_METHODS` lists all five):

- ``"hybrid"``: a full ``K x K`` grid of rank-``r_block`` blocks plus a global
  rank-``r_g`` term (:mod:`blocklowrank.hybrid`), ``r_block K (m + n) + r_g (m + n)``
  parameters for ``np.array_split`` cuts;
- ``"shared_basis"`` (BLAST): ``K x K`` blocks ``U_i diag(s_ij) V_j^T`` with bases
  shared along block-rows and block-columns (:mod:`blocklowrank.shared_basis`),
  ``r (m + n) + r K^2`` parameters.

A layout with ranks ``r_ij`` stores ``sum over active (i, j) of r_ij (m_i + n_j)``
parameters, where ``m_i`` and ``n_j`` are the block sizes (``np.array_split``
cuts). This module counts them (:func:`count_params`), lists the
configurations that spend a given budget (:func:`match_budget`), fits them
all on a matrix or a stack of matrices and ranks them by error
(:func:`compare_at_budget`), and lists the budgets at which every method can be
matched exactly (:func:`budget_sweep_points`).

Every count of the paper's structures is taken from :attr:`BlockLayout.n_params`,
the single source of truth for parameter counts; hybrid counts add ``r_g (m + n)``
to it (:func:`~blocklowrank.hybrid.hybrid_params`) and BLAST counts come from
:func:`~blocklowrank.shared_basis.shared_basis_params`.
"""

from __future__ import annotations

import numbers

import numpy as np

from ._engine import METHODS, _check_budget, approximate, block_spectra, validate_matrix
from .hybrid import fit_hybrid, hybrid_params
from .layout import BlockLayout, _check_int, _check_shape, _normalize_n_blocks, split_sizes
from .shared_basis import fit_shared_basis, shared_basis_params

__all__ = [
    "count_params",
    "match_budget",
    "compare_at_budget",
    "budget_sweep_points",
    "RecordList",
    "METHODS",
    "ALL_METHODS",
]

#: The paper's structures and the two beyond it (hybrid, shared bases / BLAST).
ALL_METHODS = METHODS + ("hybrid", "shared_basis")

#: Structures fitted by an iterative algorithm (their own fit functions, not the SVD engine).
ITERATIVE = ("hybrid", "shared_basis")

_PATTERN = {"global": "full", "diagonal": "diagonal", "block": "full"}

#: Columns of the records returned by :func:`match_budget`.
MATCH_COLUMNS = ("method", "n_blocks", "rank", "n_params", "budget", "exact")

#: Extra column when "hybrid" is among the methods: the rank of the global term
#: (None on the other rows).
HYBRID_COLUMN = "global_rank"

#: Columns of the records returned by :func:`compare_at_budget`.
COMPARE_COLUMNS = (
    "method",
    "n_blocks",
    "rank",
    "allocation",
    "n_params",
    "budget",
    "exact",
    "error",
    "errors",
    "n_params_each",
    "block_ranks",
    "proven_optimal",
)


class RecordList(list):
    """A list of ``dict`` records that also knows its columns.

    It is a plain :class:`list` of dicts, so ``pandas.DataFrame(records)``
    works directly; :meth:`to_frame` does the same and keeps the columns (in
    order) even when the list is empty.

    Examples
    --------
    >>> recs = RecordList([{"a": 1, "b": 2}], columns=("a", "b"))
    >>> recs[0]["b"], recs.columns
    (2, ('a', 'b'))
    >>> list(RecordList([], columns=("a", "b")).to_frame().columns)
    ['a', 'b']
    """

    def __init__(self, records=(), columns=()):
        super().__init__(records)
        self.columns = tuple(columns)

    def to_frame(self):
        """The records as a :class:`pandas.DataFrame` (pandas is imported lazily)."""
        import pandas as pd

        return pd.DataFrame(list(self), columns=list(self.columns) or None)


# ---------------------------------------------------------------------------- validation
def _check_method(method, name="method", allowed=ALL_METHODS):
    if not isinstance(method, str):
        raise TypeError(f"{name} must be one of {allowed} (a str), got {method!r}")
    if method not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {method!r}")
    return method


def _check_methods(methods, allowed=ALL_METHODS):
    if isinstance(methods, str):
        methods = (methods,)
    try:
        methods = tuple(methods)
    except TypeError:
        raise TypeError(f"methods must be a sequence of names from {allowed}, got {methods!r}") from None
    if not methods:
        raise ValueError(f"methods must name at least one of {allowed}")
    for mth in methods:
        _check_method(mth, "methods entry", allowed)
    return tuple(mth for mth in allowed if mth in methods)  # canonical order, no duplicates


def _check_int_list(values, name, *, minimum=1):
    """An int or an iterable of ints -> sorted list of unique Python ints (None stays None)."""
    if values is None:
        return None
    if np.ndim(values) == 0:
        return [_check_int(values, name, minimum=minimum)]
    try:
        items = list(values)
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of ints, got {values!r}") from None
    out = sorted({_check_int(v, f"{name} entry", minimum=minimum) for v in items})
    if not out:
        raise ValueError(f"{name} must contain at least one value")
    return out


def _rank_matrix(base, method, rank):
    """Per-block rank array (K_rows, K_cols) for ``base`` from a user's ``rank``."""
    active = base.active
    if np.ndim(rank) == 0:
        r = _check_int(rank, "rank", minimum=1)
        R = np.where(active, r, 0).astype(np.int64)
    else:
        arr = np.asarray(rank)
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_
        ):
            raise TypeError(f"rank must be an int or an array of ints, got dtype {arr.dtype}")
        if method == "diagonal" and arr.shape == (active.shape[0],):
            R = np.diag(arr).astype(np.int64)
        elif method == "global" and arr.size == 1:
            R = arr.reshape(1, 1).astype(np.int64)
        elif arr.shape == active.shape:
            R = arr.astype(np.int64)
        else:
            want = f"{active.shape}" + (
                f" or ({active.shape[0]},) (one rank per diagonal block)" if method == "diagonal" else ""
            )
            raise ValueError(f"per-block rank must have shape {want}, got {arr.shape}")
        if np.any(R < 0):
            raise ValueError(f"per-block rank entries must be >= 0, got {R.tolist()}")
        off = np.argwhere((R != 0) & ~active)
        if off.size:
            i, j = (int(v) for v in off[0])
            only = " (only diagonal blocks are)" if method == "diagonal" else ""
            raise ValueError(
                f"rank gives rank {int(R[i, j])} to block ({i}, {j}), which is not active in the "
                f"{method} layout{only}"
            )
    over = np.argwhere(R > base.max_ranks)
    if over.size:
        i, j = (int(v) for v in over[0])
        raise ValueError(
            f"rank {int(R[i, j])} exceeds the smaller side of block ({i}, {j}), which is "
            f"{base.row_sizes[i]}x{base.col_sizes[j]} (max rank {int(base.max_ranks[i, j])}); "
            "lower rank or use fewer blocks"
        )
    return R


def _layout_for(method, shape, n_blocks=1, rank=None):
    """The BlockLayout of ``method`` on ``shape`` (``rank=None``: no ranks yet)."""
    method = _check_method(method, allowed=METHODS)
    shape = _check_shape(shape)
    if method == "global":
        if not (np.ndim(n_blocks) == 0 and _check_int(n_blocks, "n_blocks") == 1):
            raise ValueError(f"the global method has a single block: n_blocks must be 1, got {n_blocks!r}")
    base = BlockLayout.from_blocks(shape, n_blocks, pattern=_PATTERN[method])
    if rank is None:
        return base
    return base.with_ranks(_rank_matrix(base, method, rank))


# ---------------------------------------------------------------------------- counting
def count_params(method, shape=None, *, rank=None, n_blocks=1, global_rank=None):
    """Exact number of parameters of a structured low-rank configuration.

    A layout whose active block ``(i, j)`` (of size ``m_i x n_j``) has rank
    ``r_ij`` stores ``B_ij`` (``m_i x r_ij``) and ``A_ij`` (``r_ij x n_j``), so
    it has ``sum over active (i, j) of r_ij (m_i + n_j)`` parameters. Block
    sizes follow ``np.array_split``: uneven splits are counted exactly. The
    count is :attr:`BlockLayout.n_params` of the corresponding layout.

    Two structures beyond the paper: ``"hybrid"`` counts the full ``K x K``
    grid with ``rank`` on every block plus a global term of rank
    ``global_rank``, ``sum_ij r_ij (m_i + n_j) + r_g (m + n)``
    (:func:`~blocklowrank.hybrid.hybrid_params`); ``"shared_basis"`` (BLAST)
    counts ``r (m + n) + r K_rows K_cols`` (bases ``U_i``, ``V_j`` of rank
    ``r`` and ``r`` couplings per block,
    :func:`~blocklowrank.shared_basis.shared_basis_params`).

    Parameters
    ----------
    method : {"global", "diagonal", "block", "hybrid", "shared_basis"} or BlockLayout
        Global low rank (LoRA), diagonal blocks (MELoRA), the full ``K x K``
        grid of blocks (Localized LoRA), blocks plus a global term, or blocks
        with shared bases (BLAST). A :class:`BlockLayout` is counted as it is
        (any grid, any active pattern); then ``shape`` must be omitted and
        ``rank``, if given, replaces the layout's ranks.
    shape : (int, int)
        Matrix shape ``(m, n)``. Required with a method name.
    rank : int or array-like of int
        Rank of every active block (an int ``>= 1``), or one rank per block:
        an array of shape ``(K_rows, K_cols)``, or for ``"diagonal"`` also a
        vector of ``N`` diagonal ranks. Per-block entries may be 0 (a block
        without factors, as an allocation may leave) but not negative. No rank
        may exceed its block's smaller side ``min(m_i, n_j)``. For
        ``"shared_basis"`` one int (the shared rank), at most the smallest
        block side.
    n_blocks : int or (int, int), default=1
        Blocks per side (``N`` or ``K``), or ``(block-rows, block-columns)``
        for ``"block"``, ``"hybrid"`` and ``"shared_basis"``. Must be 1 for
        ``"global"``, and at most the number of rows and of columns.
    global_rank : int, optional
        ``"hybrid"`` only (required there): rank ``r_g >= 0`` of the global
        term, at most ``min(m, n)``.

    Returns
    -------
    n_params : int

    Raises
    ------
    TypeError
        Non-integer ``rank`` or ``n_blocks``, a method that is not a string
        or layout, a missing ``rank`` or ``shape``, or ``shape`` given with a
        layout.
    ValueError
        Unknown method, ``rank < 1``, a rank above a block's smaller side,
        ``n_blocks < 1``, more blocks than rows or columns, a per-block rank
        of the wrong shape or on an inactive block.

    See Also
    --------
    BlockLayout.n_params : the count this function returns.
    match_budget : configurations whose count equals a budget.

    Notes
    -----
    The paper's closed forms for a ``d x d`` matrix are special cases:
    LoRA ``2 d r``; MELoRA ``2 d r_diag`` (``N`` diagonal blocks of side
    ``d / N``, whatever ``N``); Localized LoRA ``2 d r_block K`` (``K^2``
    blocks of side ``d / K``).

    Examples
    --------
    The paper's example (``d = 256``): LoRA ``r = 16``, MELoRA ``N = 4`` with
    ``r_diag = 4`` and Localized LoRA ``K = 2`` with ``r_block = 2``:

    >>> count_params("global", (256, 256), rank=16)
    8192
    >>> count_params("diagonal", (256, 256), n_blocks=4, rank=4)
    2048
    >>> count_params("block", (256, 256), n_blocks=2, rank=2)
    2048

    Uneven splits (rows 4, 3, 3 and columns 3, 2, 2) and per-block ranks:

    >>> count_params("block", (10, 7), n_blocks=3, rank=1)
    51
    >>> count_params("diagonal", (10, 7), n_blocks=3, rank=[2, 1, 1])
    24

    Beyond the paper: 2 x 2 blocks of rank 1 plus a global rank-2 term, and
    BLAST with 2 x 2 blocks and shared rank 3:

    >>> count_params("hybrid", (28, 28), n_blocks=2, rank=1, global_rank=2)
    224
    >>> count_params("shared_basis", (28, 28), n_blocks=2, rank=3)
    180

    Any layout:

    >>> from blocklowrank.layout import BlockLayout
    >>> count_params(BlockLayout.block((28, 28), 2, rank=2))
    224
    >>> count_params(BlockLayout.block((28, 28), 2), rank=[[3, 0], [0, 1]])
    112
    """
    if isinstance(method, BlockLayout):
        if shape is not None:
            raise TypeError("count_params(layout) takes no shape: the layout has its own")
        if not (np.ndim(n_blocks) == 0 and not isinstance(n_blocks, (bool, np.bool_)) and n_blocks == 1):
            raise TypeError("count_params(layout) takes no n_blocks: the layout has its own grid")
        if global_rank is not None:
            raise TypeError("count_params(layout) takes no global_rank (use method='hybrid')")
        layout = method
        if rank is not None:
            layout = layout.with_ranks(_rank_matrix(layout, layout.pattern, rank))
        return layout.n_params
    _check_method(method)
    if shape is None:
        raise TypeError("count_params() needs shape=(m, n) with a method name")
    if rank is None:
        raise TypeError("count_params() needs rank (an int >= 1 or one rank per block)")
    if method != "hybrid" and global_rank is not None:
        raise TypeError(f"global_rank is for method='hybrid' only, not {method!r}")
    if method == "hybrid":
        if global_rank is None:
            raise TypeError("count_params('hybrid', ...) needs global_rank (an int >= 0)")
        shape = _check_shape(shape)
        r_g = _check_int(global_rank, "global_rank", minimum=0)
        if r_g > min(shape):
            raise ValueError(f"global_rank={r_g} exceeds min(m, n) = {min(shape)} for shape {shape}")
        lay = _layout_for("block", shape, n_blocks, rank)
        return int(lay.n_params + r_g * (shape[0] + shape[1]))
    if method == "shared_basis":
        shape = _check_shape(shape)
        r = _check_int(rank, "rank", minimum=1)
        lay = BlockLayout.from_blocks(shape, _normalize_n_blocks(n_blocks))
        side = min(min(lay.row_sizes), min(lay.col_sizes))
        if r > side:
            raise ValueError(
                f"rank {r} exceeds the smaller side of the smallest block ({side}) of the "
                f"{lay.n_blocks[0]}x{lay.n_blocks[1]} grid; lower rank or use fewer blocks"
            )
        return shared_basis_params(shape, lay.n_blocks, r)
    return _layout_for(method, shape, n_blocks, rank).n_params


# ---------------------------------------------------------------------------- matching
def _partitions(shape, methods, n_blocks):
    """``(method, K, unit_cost, max_rank)`` for every candidate partition.

    ``unit_cost`` is the count at uniform rank 1 and ``max_rank`` the largest
    rank that is not over-parameterised (``min`` block side minus one). Both
    are read from ``split_sizes`` (the layout's cut rule) without building
    ``K x K`` arrays, so the default range stays cheap for large matrices; the
    counts reported in records come from :class:`BlockLayout`.
    """
    m, n = shape
    L = min(m, n)
    if n_blocks is None:
        k_range = range(2 if "global" in methods else 1, L + 1)
    else:
        k_range = n_blocks
        for K in k_range:
            if K > m or K > n:
                axis, side = ("rows", m) if K > m else ("columns", n)
                raise ValueError(
                    f"n_blocks={K} is more blocks than the {side} {axis} of the matrix; "
                    f"use at most {L} blocks"
                )
    out = []
    for method in methods:
        for K in [1] if method == "global" else k_range:
            rs, cs = split_sizes(m, K), split_sizes(n, K, axis="columns")
            # with np.array_split cuts the smallest pieces come last, on both axes
            min_side = min(rs[-1], cs[-1])
            unit = K * (m + n) if method == "block" else m + n
            out.append((method, K, unit, min_side - 1))
    return out


def _spend(unit, budget, ranks):
    """Largest allowed uniform rank whose count ``rank * unit`` fits in ``budget`` (0 if none)."""
    if ranks is None:
        return budget // unit
    fit = [r for r in ranks if r * unit <= budget]
    return max(fit) if fit else 0


def match_budget(
    shape,
    budget,
    *,
    methods=METHODS,
    n_blocks=None,
    ranks=None,
    exact=False,
):
    """Uniform-rank configurations of each method that spend a parameter budget.

    For every partition (method and number of blocks ``K``) the uniform rank
    ``r`` with the largest count ``<= budget`` is found. If that count equals
    the budget the record is exact; otherwise it is the nearest configuration
    below the budget, flagged ``exact=False`` (dropped when ``exact=True``).
    Because a uniform-rank count is linear in ``r``, a partition has at most
    one configuration at any given count.

    **Over-parameterised configurations are skipped**: if that rank ``r``
    satisfies ``r >= min(m_i, n_j)`` for some active block, the partition is
    left out, since such a block could be stored densely for no more
    parameters (``r (m_i + n_j) >= m_i n_j``).

    Beyond the paper (opt-in by name; see :data:`ALL_METHODS`):

    - ``"shared_basis"`` (BLAST, ``K x K`` grid): for every ``K`` the largest
      shared rank ``r`` with ``r (m + n) + r K^2 <= budget``, one record per
      ``K``, exact or nearest below. Skipped when ``r >=`` the smallest block
      side (the same rule as above: a basis as wide as its block side spans
      the whole side, no compression).
    - ``"hybrid"`` (``K x K`` blocks of uniform rank ``r_block`` plus a global
      term of rank ``r_g``): for every ``K`` and every ``r_block >= 1`` below
      the smallest block side, the largest ``r_g >= 1`` with
      ``r_block K (m + n) + r_g (m + n) <= budget`` (exact or nearest below,
      flagged); both parts are non-empty (``r_g = 0`` is the block
      structure, ``r_block = 0`` the global one). Skipped when ``r_g >=
      min(m, n)``. Records carry an extra key ``global_rank`` (None on the
      rows of the other methods), ``rank`` is ``r_block``.

    Both use ``K >= 2`` by default (``K = 1`` repeats the global structure).

    Parameters
    ----------
    shape : (int, int)
        Matrix shape ``(m, n)``.
    budget : int
        Number of parameters, ``>= 1``.
    methods : sequence of str, default=METHODS
        Which structures to consider (a single name is accepted): any of
        ``ALL_METHODS = ("global", "diagonal", "block", "hybrid",
        "shared_basis")``; by default the paper's three.
    n_blocks : int or sequence of int, optional
        Values of ``N`` (diagonal) or ``K`` (block) to consider; square
        grids ``K x K`` with ``np.array_split`` cuts. By default every ``K``
        from 2 to ``min(m, n)``, plus ``K = 1`` when ``"global"`` is not among
        ``methods`` (``K = 1`` *is* the global layout, so it is listed once,
        under ``"global"``). The global method always has ``K = 1``. Partitions
        whose rank-1 configuration exceeds the budget, and over-parameterised
        ones, produce no record.
    ranks : int or sequence of int, optional
        Uniform ranks allowed (default: every rank from 1 up); for the
        hybrid, the block rank (the global rank is free).
    exact : bool, default=False
        Keep only the configurations whose count equals the budget (the
        result may then be empty).

    Returns
    -------
    records : RecordList of dict
        One dict per configuration with keys ``method`` (str), ``n_blocks``
        (int), ``rank`` (int), ``n_params`` (int, the exact count, ``<=
        budget``), ``budget`` (int) and ``exact`` (bool), and ``global_rank``
        when ``"hybrid"`` is among the methods; ordered by method (as in
        ``ALL_METHODS``), then ``n_blocks``, then ``rank``.
        ``pandas.DataFrame(records)`` has exactly these columns.

    Raises
    ------
    ValueError
        If the budget is below the cheapest configuration (the message names
        it), if every partition that fits is over-parameterised (budget too
        large), if no configuration below full rank exists at all, or for
        invalid ``methods``, ``n_blocks`` or ``ranks``.
    TypeError
        For a non-integer budget, ``n_blocks`` or ``ranks``.

    See Also
    --------
    count_params : the count of one configuration.
    compare_at_budget : fit the matched configurations and rank them.
    budget_sweep_points : budgets at which every method matches exactly.

    Examples
    --------
    The budget of the paper's Table I (``2 r d = 224`` for ``d = 28``,
    ``r = 4``):

    >>> for rec in match_budget((28, 28), 224):
    ...     print(rec["method"], rec["n_blocks"], rec["rank"], rec["n_params"], rec["exact"])
    global 1 4 224 True
    diagonal 2 4 224 True
    diagonal 3 4 224 True
    diagonal 4 4 224 True
    diagonal 5 4 224 True
    block 2 2 224 True
    block 3 1 168 False
    block 4 1 224 True

    (Diagonal with ``N >= 6`` would need rank 4 on blocks of side 4 or less,
    which is over-parameterised.) Restrict the search:

    >>> recs = match_budget((28, 28), 224, methods=["block"], n_blocks=[2, 3], exact=True)
    >>> [(r["n_blocks"], r["rank"]) for r in recs]
    [(2, 2)]

    Beyond the paper: BLAST lands below the budget (its ``r K^2`` couplings),
    the hybrid splits it between blocks and the global term:

    >>> for rec in match_budget((28, 28), 224, methods=["shared_basis", "hybrid"], n_blocks=[2, 3, 4]):
    ...     print(rec["method"], rec["n_blocks"], rec["rank"], rec["global_rank"], rec["n_params"])
    hybrid 2 1 2 224
    hybrid 3 1 1 224
    shared_basis 2 3 None 180
    shared_basis 3 3 None 195
    shared_basis 4 3 None 216
    """
    m, n = _check_shape(shape)
    budget = _check_budget(budget)
    methods = _check_methods(methods)
    n_blocks = _check_int_list(n_blocks, "n_blocks", minimum=1)
    ranks = _check_int_list(ranks, "ranks", minimum=1)
    if not isinstance(exact, (bool, np.bool_)):
        raise TypeError(f"exact must be a bool, got {exact!r}")

    paper = tuple(mth for mth in methods if mth in METHODS)
    beyond = tuple(mth for mth in methods if mth in ITERATIVE)
    if n_blocks is not None:
        _check_k_list((m, n), n_blocks)
    parts = _partitions((m, n), paper, n_blocks) if paper else []
    parts += _partitions_beyond((m, n), beyond, n_blocks)
    lo = min(ranks) if ranks is not None else 1
    L = min(m, n)

    def cheapest(method, unit, rmax):
        """Count of the cheapest valid configuration of a partition (None if it has none)."""
        if lo > rmax or (method == "hybrid" and L - 1 < 1):
            return None
        return lo * unit + ((m + n) if method == "hybrid" else 0)

    feasible = [(mth, K, cheapest(mth, unit, rmax)) for mth, K, unit, rmax in parts]
    feasible = [f for f in feasible if f[2] is not None]
    if not feasible:
        raise ValueError(
            f"no configuration below full rank exists for shape {(m, n)} with methods={methods}, "
            f"n_blocks={n_blocks}, ranks={ranks}: every candidate block would have rank >= its "
            "smaller side"
        )
    cheap = min(feasible, key=lambda t: t[2])
    if budget < cheap[2]:
        extra = " plus a rank-1 global term" if cheap[0] == "hybrid" else ""
        raise ValueError(
            f"budget={budget} is below the cheapest configuration: {cheap[0]} with "
            f"n_blocks={cheap[1]} and rank {lo}{extra} costs {cheap[2]} parameters"
        )
    records = []
    for method, K, unit, rmax in parts:
        if method == "hybrid":
            records += _hybrid_records((m, n), K, unit, rmax, budget, ranks)
            continue
        r = _spend(unit, budget, ranks)
        if r < 1 or r > rmax:
            continue
        n_params = count_params(method, (m, n), n_blocks=K, rank=r)
        records.append(
            {
                "method": method,
                "n_blocks": K,
                "rank": r,
                "n_params": n_params,
                "budget": budget,
                "exact": n_params == budget,
            }
        )
    if not records:
        # largest configuration within the budget that is not over-parameterised (one exists:
        # some partition fits the budget, and its largest valid rank is below its budget rank)
        sizes = [(mth, K, _largest_valid((m, n), mth, unit, rmax, budget, ranks)) for mth, K, unit, rmax in parts]
        best = max(sizes, key=lambda t: t[2])
        raise ValueError(
            f"budget={budget} is too large for shape {(m, n)}: every configuration that spends it "
            "has a rank >= some block's smaller side (such blocks are cheaper stored densely); "
            f"the largest configuration below full rank is {best[0]} with n_blocks={best[1]}, "
            f"{best[2]} parameters"
        )
    if exact:
        records = [r for r in records if r["exact"]]
    columns = MATCH_COLUMNS
    if "hybrid" in methods:
        columns = MATCH_COLUMNS + (HYBRID_COLUMN,)
        for rec in records:
            rec.setdefault(HYBRID_COLUMN, None)
    records.sort(key=lambda d: (ALL_METHODS.index(d["method"]), d["n_blocks"], d["rank"], d.get(HYBRID_COLUMN) or 0))
    return RecordList(records, columns=columns)


def _check_k_list(shape, n_blocks):
    m, n = shape
    for K in n_blocks:
        if K > m or K > n:
            axis, side = ("rows", m) if K > m else ("columns", n)
            raise ValueError(
                f"n_blocks={K} is more blocks than the {side} {axis} of the matrix; "
                f"use at most {min(m, n)} blocks"
            )


def _partitions_beyond(shape, methods, n_blocks):
    """``(method, K, unit, max_rank)`` for the hybrid and shared-basis partitions.

    ``unit`` is the count of rank 1 on every block (hybrid: of the block part only;
    shared basis: ``m + n + K^2``), ``max_rank`` the largest rank below the smallest
    block side. Default ``K``: 2 to ``min(m, n)`` (``K = 1`` would repeat the global
    structure: blocks of one block plus a global term, or one shared basis).
    """
    m, n = shape
    ks = range(2, min(m, n) + 1) if n_blocks is None else n_blocks
    out = []
    for method in methods:
        for K in ks:
            rs, cs = split_sizes(m, K), split_sizes(n, K, axis="columns")
            min_side = min(rs[-1], cs[-1])
            unit = m + n + K * K if method == "shared_basis" else K * (m + n)
            out.append((method, K, unit, min_side - 1))
    return out


def _hybrid_records(shape, K, unit, rmax, budget, ranks):
    """Hybrid configurations of one partition: every allowed block rank r_b >= 1 with the
    largest global rank r_g >= 1 that fits (records with r_g >= min(m, n) are skipped)."""
    m, n = shape
    L = min(m, n)
    rbs = range(1, rmax + 1) if ranks is None else [r for r in ranks if r <= rmax]
    out = []
    for r_b in rbs:
        rem = budget - r_b * unit
        r_g = rem // (m + n)
        if r_g < 1:
            break
        if r_g > L - 1:
            continue
        n_params = count_params("hybrid", shape, n_blocks=K, rank=r_b, global_rank=r_g)
        out.append(
            {
                "method": "hybrid",
                "n_blocks": K,
                "rank": r_b,
                "n_params": n_params,
                "budget": budget,
                "exact": n_params == budget,
                HYBRID_COLUMN: r_g,
            }
        )
    return out


def _largest_valid(shape, method, unit, rmax, budget, ranks):
    """Largest count within the budget of a partition's configurations below full rank."""
    m, n = shape
    if method != "hybrid":
        return min(_spend(unit, budget, ranks), _ranks_le(ranks, rmax)) * unit
    rbs = range(1, rmax + 1) if ranks is None else [r for r in ranks if r <= rmax]
    best = 0
    for r_b in rbs:
        r_g = min((budget - r_b * unit) // (m + n), min(m, n) - 1)
        if r_g >= 1:
            best = max(best, r_b * unit + r_g * (m + n))
    return best


def _ranks_le(ranks, rmax):
    """Largest allowed rank ``<= rmax`` (0 if none)."""
    if ranks is None:
        return max(rmax, 0)
    fit = [r for r in ranks if r <= rmax]
    return max(fit) if fit else 0


def budget_sweep_points(
    shape,
    *,
    methods=METHODS,
    n_blocks=None,
    ranks=None,
    min_budget=None,
    max_budget=None,
):
    """Budgets at which every method can be matched exactly.

    A budget is listed when each method in ``methods`` has at least one
    configuration (some ``n_blocks``, uniform rank) whose count equals it,
    under the same rules as :func:`match_budget` (same default ``n_blocks``
    range, over-parameterised configurations excluded). These are the points
    of an error-vs-budget curve at which the methods compare at *equal*
    parameter counts: from the smallest budget every method can reach, up to
    the largest one every method can reach below full rank.

    Parameters
    ----------
    shape : (int, int)
        Matrix shape ``(m, n)``.
    methods, n_blocks, ranks
        As in :func:`match_budget`, for the paper's three structures only
        (``METHODS``).
    min_budget, max_budget : int, optional
        Keep only budgets in ``[min_budget, max_budget]``.

    Returns
    -------
    budgets : ndarray of int64
        Sorted, without duplicates (may be empty).

    See Also
    --------
    match_budget : the configurations at one budget.

    Examples
    --------
    For a ``28 x 28`` matrix every uniform count is a multiple of
    ``m + n = 56``; Localized LoRA needs ``K >= 2`` (``K = 1`` is global), so
    the common budgets start at 112, and MELoRA stops at rank 13 (``N = 2``):

    >>> budget_sweep_points((28, 28))
    array([112, 168, 224, 280, 336, 392, 448, 504, 560, 616, 672, 728])
    >>> budget_sweep_points((28, 28), n_blocks=[2, 4], max_budget=500)
    array([112, 224, 336, 448])
    """
    m, n = _check_shape(shape)
    methods = _check_methods(methods, allowed=METHODS)
    n_blocks = _check_int_list(n_blocks, "n_blocks", minimum=1)
    ranks = _check_int_list(ranks, "ranks", minimum=1)
    lo = 1 if min_budget is None else _check_int(min_budget, "min_budget", minimum=1)
    hi = None if max_budget is None else _check_int(max_budget, "max_budget", minimum=1)
    reach = {mth: set() for mth in methods}
    for method, K, unit, rmax in _partitions((m, n), methods, n_blocks):
        rr = range(1, rmax + 1) if ranks is None else [r for r in ranks if r <= rmax]
        reach[method].update(r * unit for r in rr)
    common = set.intersection(*reach.values())
    out = np.array(sorted(b for b in common if b >= lo and (hi is None or b <= hi)), dtype=np.int64)
    return out


# ---------------------------------------------------------------------------- comparing
_METHOD_ORDER = {mth: t for t, mth in enumerate(ALL_METHODS)}

#: Options of the iterative fits that compare_at_budget passes on (fit_options).
_FIT_OPTIONS = ("max_iter", "tol")


def compare_at_budget(
    X,
    budget,
    *,
    methods=METHODS,
    n_blocks=None,
    ranks=None,
    exact=False,
    include_optimal=True,
    svd_solver="auto",
    n_oversamples=10,
    n_iter="auto",
    random_state=None,
    n_jobs=None,
    fit_options=None,
):
    """Fit every configuration at a parameter budget and rank them by error.

    The configurations are those of :func:`match_budget` (uniform ranks,
    exact or nearest below the budget). With ``include_optimal``, each of
    their partitions (each method and ``n_blocks``, including global) is also
    fitted with the budget-optimal per-block ranks
    (``approximate(X, layout, budget=budget)``, see
    :func:`~blocklowrank.allocate_ranks`). Each configuration is one
    :func:`~blocklowrank.approximate` call over the whole of ``X``, so a stack
    of matrices is processed in batch.

    The structures beyond the paper (``"hybrid"``, ``"shared_basis"``; opt-in
    by name) are iterative: each of their configurations is fitted with its
    own function on the whole stack at once
    (:func:`~blocklowrank.hybrid.fit_hybrid`,
    :func:`~blocklowrank.shared_basis.fit_shared_basis`; both vectorised over
    the stack, each matrix fitted as if alone). They have no allocation row.

    Parameters
    ----------
    X : array-like of shape (m, n) or (..., m, n)
        A matrix or a stack of matrices (all fitted with the same
        configurations).
    budget : int
        Number of parameters (per matrix).
    methods, n_blocks, ranks, exact
        Select configurations, as in :func:`match_budget`.
    include_optimal : bool, default=True
        Also fit the budget-optimal allocation of every partition.
    svd_solver, n_oversamples, n_iter, random_state, n_jobs
        Passed to :func:`~blocklowrank.approximate` (and the SVD options to
        :func:`~blocklowrank.hybrid.fit_hybrid`, ``n_jobs`` to
        :func:`~blocklowrank.shared_basis.fit_shared_basis`).
    fit_options : dict, optional
        ``max_iter`` and/or ``tol`` for the iterative fits (hybrid, shared
        basis); their defaults otherwise (100 passes, ``tol=1e-6``).

    Returns
    -------
    records : RecordList of dict
        Sorted by ``error`` (ascending; ties by ``n_params``, method,
        ``n_blocks``, uniform before optimal). ``pandas.DataFrame(records)``
        works. Keys:

        - ``method``, ``n_blocks``: the partition;
        - ``rank``: the uniform rank (int), or ``"optimal"`` for an
          allocation row;
        - ``allocation``: ``"uniform"`` or ``"optimal"``;
        - ``n_params``: the count (int); for an allocation row on a stack,
          the largest over the stack (every matrix is within the budget);
        - ``budget``;
        - ``exact``: whether ``n_params`` equals the budget (for every matrix
          of a stack);
        - ``error``: relative Frobenius error ``||X - X_hat||_F / ||X||_F``;
          for a stack, the mean over the matrices (used for ranking);
        - ``errors``: per-matrix errors, ndarray of shape ``X.shape[:-2]``
          (a float equal to ``error`` for a single matrix);
        - ``n_params_each``: per-matrix counts (same shape convention);
        - ``block_ranks``: the per-block ranks, shape ``(K, K)``, or
          ``(..., K, K)`` for an allocation row on a stack;
        - ``proven_optimal``: for allocation rows, whether the allocation is
          provably optimal (see :func:`~blocklowrank.allocate_ranks`); None
          for uniform rows.
        - ``global_rank``: only when ``"hybrid"`` is among the methods, the
          rank of its global term (None on other rows).

        Shared-basis rows have ``block_ranks`` equal to the shared rank on
        every block (a nominal rank: the blocks share their bases); hybrid
        rows the block ranks of the block part.

    Raises
    ------
    ValueError, TypeError
        As :func:`match_budget` for the budget and the selection, and as
        :func:`~blocklowrank.approximate` for ``X`` and the solver options.

    See Also
    --------
    match_budget : the configurations that are fitted.
    approximate : the engine behind every fit.

    Notes
    -----
    With the exact solver, an allocation row is never worse than a uniform
    row of the same partition: the uniform ranks are one of the allocations
    the optimiser considers. With uneven block sizes and a large problem the allocation is
    greedy (``proven_optimal=False``) but is still compared against the
    uniform allocation at the budget and replaced by it where that is better.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> res = compare_at_budget(X, 224, n_blocks=[2, 4])
    >>> for r in res:
    ...     print(r["method"], r["n_blocks"], r["rank"], r["n_params"], f"{r['error']:.3f}")
    block 4 optimal 224 0.754
    block 4 1 224 0.766
    global 1 4 224 0.767
    global 1 optimal 224 0.767
    block 2 optimal 224 0.773
    block 2 2 224 0.776
    diagonal 2 4 224 0.834
    diagonal 2 optimal 224 0.834
    diagonal 4 4 224 0.903
    diagonal 4 optimal 224 0.903

    On a stack, errors are per matrix and the mean ranks the rows:

    >>> S = np.random.default_rng(1).standard_normal((5, 28, 28))
    >>> res = compare_at_budget(S, 224, methods=["global"])
    >>> res[0]["errors"].shape, bool(np.isclose(res[0]["error"], res[0]["errors"].mean()))
    ((5,), True)

    The structures beyond the paper, by name:

    >>> res = compare_at_budget(S, 224, methods=["global", "hybrid", "shared_basis"], n_blocks=[2])
    >>> [(r["method"], r["rank"], r["global_rank"], r["n_params"]) for r in res]  # doctest: +NORMALIZE_WHITESPACE
    [('hybrid', 1, 2, 224), ('global', 4, None, 224), ('global', 'optimal', None, 224),
     ('shared_basis', 3, None, 180)]
    """
    X = validate_matrix(X)
    batch = X.shape[:-2]
    shape = X.shape[-2:]
    if not isinstance(include_optimal, (bool, np.bool_)):
        raise TypeError(f"include_optimal must be a bool, got {include_optimal!r}")
    if fit_options is None:
        fit_options = {}
    if not isinstance(fit_options, dict) or set(fit_options) - set(_FIT_OPTIONS):
        raise ValueError(f"fit_options must be a dict with keys among {_FIT_OPTIONS}, got {fit_options!r}")
    matched = match_budget(shape, budget, methods=methods, n_blocks=n_blocks, ranks=ranks, exact=exact)
    hybrid_rows = HYBRID_COLUMN in matched.columns
    budget = matched[0]["budget"] if matched else _check_budget(budget)
    opts = dict(
        svd_solver=svd_solver,
        n_oversamples=n_oversamples,
        n_iter=n_iter,
        random_state=random_state,
        n_jobs=n_jobs,
    )

    def row(method, K, rank, allocation, n_each, err_each, block_ranks, proven, global_rank=None):
        if not batch:
            n_each, err_each = int(n_each), float(err_each)
        extra = {HYBRID_COLUMN: global_rank} if hybrid_rows else {}
        return {
            "method": method,
            "n_blocks": K,
            "rank": rank,
            "allocation": allocation,
            "n_params": int(np.max(n_each)),
            "budget": budget,
            "exact": bool(np.all(np.asarray(n_each) == budget)),
            "error": float(np.mean(err_each)),
            "errors": err_each,
            "n_params_each": n_each,
            "block_ranks": block_ranks,
            "proven_optimal": proven,
            **extra,
        }

    # With the exact solver, errors need only singular values (Eckart-Young): one spectrum
    # per partition serves its uniform rows and its optimal allocation.
    spectral = svd_solver in ("auto", "full")
    cache = {}

    def spectra(method, K):
        if (method, K) not in cache:
            cache[(method, K)] = block_spectra(X, _layout_for(method, shape, K), n_jobs=n_jobs)
        return cache[(method, K)]

    rows = []
    partitions = []
    def each(value):
        return np.broadcast_to(value, batch).copy() if batch else value

    for rec in matched:
        method, K, r = rec["method"], rec["n_blocks"], rec["rank"]
        if method == "shared_basis":
            res = fit_shared_basis(X, K, r, n_jobs=n_jobs, **fit_options)
            rows.append(row(method, K, r, "uniform", each(res.n_params), res.error,
                            np.full((K, K), r, dtype=np.int64), None))
            continue
        if method == "hybrid":
            lay = BlockLayout.block(shape, K, rank=r)
            r_g = rec[HYBRID_COLUMN]
            res = fit_hybrid(X, lay, r_g, svd_solver=svd_solver, n_oversamples=n_oversamples,
                             n_iter=n_iter, random_state=random_state, **fit_options)
            rows.append(row(method, K, r, "uniform", each(res.n_params), res.error, np.array(lay.ranks),
                            None, r_g))
            continue
        lay = _layout_for(method, shape, K, r)
        if spectral:
            sp = spectra(method, K)
            n_each = each(lay.n_params)
            rows.append(row(method, K, r, "uniform", n_each, sp.error(lay.ranks), np.array(lay.ranks), None))
        else:
            res = approximate(X, lay, **opts)
            rows.append(row(method, K, r, "uniform", res.n_params, res.error, np.array(lay.ranks), None))
        if (method, K) not in partitions:
            partitions.append((method, K))
    if include_optimal:
        for method, K in partitions:
            if spectral:
                sp = spectra(method, K)
                R, proven = sp.allocate(budget)
                rows.append(row(method, K, "optimal", "optimal", sp.n_params(R), sp.error(R), R, bool(proven)))
            else:
                lay = _layout_for(method, shape, K)
                res = approximate(X, lay, budget=budget, **opts)
                rows.append(row(method, K, "optimal", "optimal", res.n_params, res.error, res.ranks,
                                bool(res.exact_allocation)))
    rows.sort(
        key=lambda d: (
            d["error"],
            d["n_params"],
            _METHOD_ORDER[d["method"]],
            d["n_blocks"],
            d["allocation"] == "optimal",
        )
    )
    columns = COMPARE_COLUMNS + ((HYBRID_COLUMN,) if hybrid_rows else ())
    return RecordList(rows, columns=columns)

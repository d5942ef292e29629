"""Parameter counts, budget matching and comparisons at a parameter budget.

The three structures of the paper are layouts of one kind (see
:class:`~blocklowrank.layout.BlockLayout`):

- ``"global"`` (LoRA): one block of rank ``r``;
- ``"diagonal"`` (MELoRA): an ``N x N`` grid, only the diagonal active;
- ``"block"`` (Localized LoRA / GraLoRA): a ``K x K`` grid, every block active.

A layout with ranks ``r_ij`` stores ``sum over active (i, j) of r_ij (m_i + n_j)``
parameters, where ``m_i`` and ``n_j`` are the block sizes (``np.array_split``
cuts). This module counts them (:func:`count_params`), lists the
configurations that spend a given budget (:func:`match_budget`), fits them
all on a matrix or a stack of matrices and ranks them by error
(:func:`compare_at_budget`), and lists the budgets at which every method can be
matched exactly (:func:`budget_sweep_points`).

Every count is taken from :attr:`BlockLayout.n_params`, the single source of
truth for parameter counts.
"""

from __future__ import annotations

import numbers

import numpy as np

from ._engine import METHODS, _check_budget, approximate, block_spectra, validate_matrix
from .layout import BlockLayout, _check_int, _check_shape, split_sizes

__all__ = [
    "count_params",
    "match_budget",
    "compare_at_budget",
    "budget_sweep_points",
    "RecordList",
    "METHODS",
]

_PATTERN = {"global": "full", "diagonal": "diagonal", "block": "full"}

#: Columns of the records returned by :func:`match_budget`.
MATCH_COLUMNS = ("method", "n_blocks", "rank", "n_params", "budget", "exact")

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
def _check_method(method, name="method"):
    if not isinstance(method, str):
        raise TypeError(f"{name} must be one of {METHODS} (a str), got {method!r}")
    if method not in METHODS:
        raise ValueError(f"{name} must be one of {METHODS}, got {method!r}")
    return method


def _check_methods(methods):
    if isinstance(methods, str):
        methods = (methods,)
    try:
        methods = tuple(methods)
    except TypeError:
        raise TypeError(f"methods must be a sequence of names from {METHODS}, got {methods!r}") from None
    if not methods:
        raise ValueError(f"methods must name at least one of {METHODS}")
    for mth in methods:
        _check_method(mth, "methods entry")
    return tuple(mth for mth in METHODS if mth in methods)  # canonical order, no duplicates


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
    method = _check_method(method)
    shape = _check_shape(shape)
    if method == "global":
        if not (np.ndim(n_blocks) == 0 and _check_int(n_blocks, "n_blocks") == 1):
            raise ValueError(f"the global method has a single block: n_blocks must be 1, got {n_blocks!r}")
    base = BlockLayout.from_blocks(shape, n_blocks, pattern=_PATTERN[method])
    if rank is None:
        return base
    return base.with_ranks(_rank_matrix(base, method, rank))


# ---------------------------------------------------------------------------- counting
def count_params(method, shape=None, *, rank=None, n_blocks=1):
    """Exact number of parameters of a structured low-rank configuration.

    A layout whose active block ``(i, j)`` (of size ``m_i x n_j``) has rank
    ``r_ij`` stores ``B_ij`` (``m_i x r_ij``) and ``A_ij`` (``r_ij x n_j``), so
    it has ``sum over active (i, j) of r_ij (m_i + n_j)`` parameters. Block
    sizes follow ``np.array_split``: uneven splits are counted exactly. The
    count is :attr:`BlockLayout.n_params` of the corresponding layout.

    Parameters
    ----------
    method : {"global", "diagonal", "block"} or BlockLayout
        Global low rank (LoRA), diagonal blocks (MELoRA) or the full ``K x K``
        grid of blocks (Localized LoRA). A :class:`BlockLayout` is counted as
        it is (any grid, any active pattern); then ``shape`` must be omitted
        and ``rank``, if given, replaces the layout's ranks.
    shape : (int, int)
        Matrix shape ``(m, n)``. Required with a method name.
    rank : int or array-like of int
        Rank of every active block (an int ``>= 1``), or one rank per block:
        an array of shape ``(K_rows, K_cols)``, or for ``"diagonal"`` also a
        vector of ``N`` diagonal ranks. Per-block entries may be 0 (a block
        without factors, as an allocation may leave) but not negative. No rank
        may exceed its block's smaller side ``min(m_i, n_j)``.
    n_blocks : int or (int, int), default=1
        Blocks per side (``N`` or ``K``), or ``(block-rows, block-columns)``
        for ``"block"``. Must be 1 for ``"global"``, and at most the number of
        rows and of columns.

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
        layout = method
        if rank is not None:
            layout = layout.with_ranks(_rank_matrix(layout, layout.pattern, rank))
        return layout.n_params
    _check_method(method)
    if shape is None:
        raise TypeError("count_params() needs shape=(m, n) with a method name")
    if rank is None:
        raise TypeError("count_params() needs rank (an int >= 1 or one rank per block)")
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

    Parameters
    ----------
    shape : (int, int)
        Matrix shape ``(m, n)``.
    budget : int
        Number of parameters, ``>= 1``.
    methods : sequence of {"global", "diagonal", "block"}, default=all three
        Which structures to consider (a single name is accepted).
    n_blocks : int or sequence of int, optional
        Values of ``N`` (diagonal) or ``K`` (block) to consider; square
        grids ``K x K`` with ``np.array_split`` cuts. By default every ``K``
        from 2 to ``min(m, n)``, plus ``K = 1`` when ``"global"`` is not among
        ``methods`` (``K = 1`` *is* the global layout, so it is listed once,
        under ``"global"``). The global method always has ``K = 1``. Partitions
        whose rank-1 configuration exceeds the budget, and over-parameterised
        ones, produce no record.
    ranks : int or sequence of int, optional
        Uniform ranks allowed (default: every rank from 1 up).
    exact : bool, default=False
        Keep only the configurations whose count equals the budget (the
        result may then be empty).

    Returns
    -------
    records : RecordList of dict
        One dict per configuration with keys ``method`` (str), ``n_blocks``
        (int), ``rank`` (int), ``n_params`` (int, the exact count, ``<=
        budget``), ``budget`` (int) and ``exact`` (bool), ordered by method
        (global, diagonal, block), then ``n_blocks``, then ``rank``.
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
    """
    m, n = _check_shape(shape)
    budget = _check_budget(budget)
    methods = _check_methods(methods)
    n_blocks = _check_int_list(n_blocks, "n_blocks", minimum=1)
    ranks = _check_int_list(ranks, "ranks", minimum=1)
    if not isinstance(exact, (bool, np.bool_)):
        raise TypeError(f"exact must be a bool, got {exact!r}")

    parts = _partitions((m, n), methods, n_blocks)
    lo = min(ranks) if ranks is not None else 1
    feasible = [(mth, K, unit) for mth, K, unit, rmax in parts if lo <= rmax]
    if not feasible:
        raise ValueError(
            f"no configuration below full rank exists for shape {(m, n)} with methods={methods}, "
            f"n_blocks={n_blocks}, ranks={ranks}: every candidate block would have rank >= its "
            "smaller side"
        )
    cheap = min(feasible, key=lambda t: t[2])
    if budget < lo * cheap[2]:
        raise ValueError(
            f"budget={budget} is below the cheapest configuration: {cheap[0]} with "
            f"n_blocks={cheap[1]} and rank {lo} costs {lo * cheap[2]} parameters"
        )
    records = []
    for method, K, unit, rmax in parts:
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
        sizes = [
            (mth, K, min(_spend(unit, budget, ranks), _ranks_le(ranks, rmax)) * unit)
            for mth, K, unit, rmax in parts
        ]
        best = max(sizes, key=lambda t: t[2])
        raise ValueError(
            f"budget={budget} is too large for shape {(m, n)}: every configuration that spends it "
            "has a rank >= some block's smaller side (such blocks are cheaper stored densely); "
            f"the largest configuration below full rank is {best[0]} with n_blocks={best[1]}, "
            f"{best[2]} parameters"
        )
    if exact:
        records = [r for r in records if r["exact"]]
    return RecordList(records, columns=MATCH_COLUMNS)


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
        As in :func:`match_budget`.
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
    methods = _check_methods(methods)
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
_METHOD_ORDER = {mth: t for t, mth in enumerate(METHODS)}


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
        Passed to :func:`~blocklowrank.approximate`.

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
    """
    X = validate_matrix(X)
    batch = X.shape[:-2]
    shape = X.shape[-2:]
    if not isinstance(include_optimal, (bool, np.bool_)):
        raise TypeError(f"include_optimal must be a bool, got {include_optimal!r}")
    matched = match_budget(shape, budget, methods=methods, n_blocks=n_blocks, ranks=ranks, exact=exact)
    budget = matched[0]["budget"] if matched else _check_budget(budget)
    opts = dict(
        svd_solver=svd_solver,
        n_oversamples=n_oversamples,
        n_iter=n_iter,
        random_state=random_state,
        n_jobs=n_jobs,
    )

    def row(method, K, rank, allocation, n_each, err_each, block_ranks, proven):
        if not batch:
            n_each, err_each = int(n_each), float(err_each)
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
    for rec in matched:
        method, K, r = rec["method"], rec["n_blocks"], rec["rank"]
        lay = _layout_for(method, shape, K, r)
        if spectral:
            sp = spectra(method, K)
            n_each = np.broadcast_to(lay.n_params, batch).copy() if batch else lay.n_params
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
    return RecordList(rows, columns=COMPARE_COLUMNS)

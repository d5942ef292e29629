"""Parameter counts and budget matching, for every registered structure.

A layout with ranks ``r_ij`` stores ``sum over active (i, j) of r_ij (m_i + n_j)``
parameters, where ``m_i`` and ``n_j`` are the block sizes (``np.array_split``
cuts); the hybrid adds ``r_g (m + n)`` for its global term and the shared basis
(BLAST) counts ``r (m + n) + r K_rows K_cols``. Each structure declares its count
and its budget rule in the registry (:mod:`blocklowrank.structures`); this
module asks them: :func:`count_params` counts one configuration,
:func:`match_budget` lists the configurations that spend a budget, and
:func:`budget_sweep_points` the budgets at which structures compare at equal
counts. :func:`blocklowrank.compare.compare_at_budget` fits them.
"""

from __future__ import annotations

import numpy as np

from ._params import validate_params
from .layout import BlockLayout
from .structures import get_structure, structure_names, structures
from .structures._grid import _rank_matrix

__all__ = ["count_params", "match_budget", "over_parameterised", "budget_sweep_points", "RecordList", "check_methods"]

#: Columns of the records returned by :func:`match_budget` (plus the structures' extra keys).
MATCH_COLUMNS = ("method", "n_blocks", "rank", "n_params", "budget", "exact")


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


def check_methods(methods):
    """Structure names (one or a sequence; None: the paper's three) in registry order, no duplicates."""
    allowed = structure_names()
    if methods is None:
        return structure_names(paper=True)
    if isinstance(methods, str):
        methods = (methods,)
    try:
        methods = tuple(methods)
    except TypeError:
        raise TypeError(f"methods must be a sequence of names from {allowed}, got {methods!r}") from None
    if not methods:
        raise ValueError(f"methods must name at least one of {allowed}")
    for mth in methods:
        if not isinstance(mth, str) or mth not in allowed:
            raise ValueError(f"methods entry must be one of {allowed}, got {mth!r}")
    return tuple(mth for mth in allowed if mth in methods)


def _int_list(values):
    """A checked int or sequence of ints -> sorted list of unique ints (None stays None)."""
    if values is None:
        return None
    return [values] if isinstance(values, int) else sorted(set(values))


@validate_params("shape", "n_blocks", "rank")
def count_params(method, shape=None, *, rank=None, n_blocks=1, **extra):
    """Exact number of parameters of a structured low-rank configuration.

    Parameters
    ----------
    method : str or BlockLayout
        A registered structure (``"global"``, ``"diagonal"``, ``"block"``,
        ``"hybrid"``, ``"shared_basis"``, ...). A :class:`BlockLayout` is
        counted as it is (any grid, any active pattern); then ``shape`` must be
        omitted and ``rank``, if given, replaces the layout's ranks.
    shape : (int, int)
        Matrix shape ``(m, n)``. Required with a structure name.
    rank : int or array-like of int
        Rank of every active block (an int ``>= 1``), or one rank per block
        (``(K_rows, K_cols)``, or for ``"diagonal"`` a vector of ``N``
        diagonal ranks; entries may be 0). No rank may exceed its block's
        smaller side. For ``"shared_basis"`` the shared rank.
    n_blocks : int or (int, int), default=1
        Blocks per side; must be 1 for ``"global"``.
    **extra
        The structure's other keys, e.g. ``global_rank`` for ``"hybrid"``.

    Returns
    -------
    n_params : int

    Notes
    -----
    The paper's closed forms for a ``d x d`` matrix are special cases:
    LoRA ``2 d r``; MELoRA ``2 d r_diag``; Localized LoRA ``2 d r_block K``.

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

    Beyond the paper:

    >>> count_params("hybrid", (28, 28), n_blocks=2, rank=1, global_rank=2)
    224
    >>> count_params("shared_basis", (28, 28), n_blocks=2, rank=3)
    180
    >>> count_params(BlockLayout.block((28, 28), 2), rank=[[3, 0], [0, 1]])
    112
    """
    if isinstance(method, BlockLayout):
        if shape is not None or extra or n_blocks != 1:
            raise TypeError(
                "count_params(layout) takes no shape, n_blocks or other keys, only rank: "
                "the layout has its own shape and grid"
            )
        return method.n_params if rank is None else method.with_ranks(_rank_matrix(method, "given", rank)).n_params
    if not isinstance(method, str):
        raise TypeError(f"method must be a structure name or a BlockLayout, got {method!r}")
    s = get_structure(method)
    if shape is None:
        raise TypeError("count_params() needs shape=(m, n) with a structure name")
    if rank is None:
        raise TypeError("count_params() needs rank (an int >= 1 or one rank per block)")
    unknown = set(extra) - set(s.extra)
    if unknown:
        owners = [t.name for t in structures() if set(unknown) & set(t.extra)]
        raise TypeError(
            f"count_params({method!r}) got unexpected keyword(s) {sorted(unknown)}"
            + (f" (a key of {', '.join(owners)})" if owners else "")
        )
    missing = set(s.extra) - set(extra)
    if missing:
        raise TypeError(f"count_params({method!r}) needs {sorted(missing)}")
    return int(s.count(shape, n_blocks=n_blocks, rank=rank, **extra))


def _ks(s, shape, n_blocks, methods):
    """Grid sizes tried for structure ``s``."""
    if s.fixed_blocks is not None:
        return [s.fixed_blocks]
    L = min(shape)
    if n_blocks is not None:
        return n_blocks
    # K = 1 repeats a single-block structure when one is selected (it is listed once, there)
    single = any(get_structure(mth).fixed_blocks == 1 for mth in methods)
    return range(max(s.min_default_blocks, 2 if single else 1), L + 1)


def _check_k_list(shape, n_blocks):
    m, n = shape
    for K in n_blocks or ():
        if K > m or K > n:
            axis, side = ("rows", m) if K > m else ("columns", n)
            raise ValueError(
                f"n_blocks={K} is more blocks than the {side} {axis} of the matrix; use at most {min(m, n)} blocks"
            )


@validate_params("shape", "budget", "exact", n_blocks="grid_sizes", ranks="ranks")
def match_budget(shape, budget, *, methods=None, n_blocks=None, ranks=None, exact=False):
    """Uniform-rank configurations of each structure that spend a parameter budget.

    For every partition (structure and grid size ``K``) each structure's
    budget rule gives the configuration with the largest count ``<= budget``:
    exact when it equals the budget, else the nearest below (``exact=False``;
    dropped with ``exact=True``). **Over-parameterised configurations are
    skipped**: a rank at or above an active block's smaller side (such a
    block is cheaper stored densely). The hybrid lists, for every block
    rank, the largest global rank that fits (both parts non-empty).

    Parameters
    ----------
    shape : (int, int)
    budget : int
        Number of parameters, ``>= 1``.
    methods : str or sequence of str, optional
        Registered structures to consider; by default the paper's three
        (``structure_names(paper=True)``).
    n_blocks : int or sequence of int, optional
        Grid sizes ``K`` (square ``K x K`` grids) to consider. By default
        every ``K`` from 2 to ``min(m, n)`` (also ``K = 1`` when no
        single-block structure is selected, which ``K = 1`` would repeat).
    ranks : int or sequence of int, optional
        Uniform ranks allowed (default: every rank from 1 up); for the
        hybrid, the block rank.
    exact : bool, default=False
        Keep only the configurations whose count equals the budget.

    Returns
    -------
    records : RecordList of dict
        ``method``, ``n_blocks``, ``rank``, ``n_params``, ``budget``,
        ``exact``, plus the structures' extra keys (``global_rank``, None on
        other rows); ordered by structure (registry order), ``n_blocks``,
        ``rank``.

    Raises
    ------
    ValueError
        If the budget is below the cheapest configuration (named), if every
        configuration that fits is over-parameterised (budget too large; the
        largest valid one is named), or for invalid selections.

    Examples
    --------
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
    >>> for rec in match_budget((28, 28), 224, methods=["hybrid", "shared_basis"], n_blocks=[2, 3, 4]):
    ...     print(rec["method"], rec["n_blocks"], rec["rank"], rec["global_rank"], rec["n_params"])
    hybrid 2 1 2 224
    hybrid 3 1 1 224
    shared_basis 2 3 None 180
    shared_basis 3 3 None 195
    shared_basis 4 3 None 216
    """
    methods = check_methods(methods)
    n_blocks, ranks = _int_list(n_blocks), _int_list(ranks)
    _check_k_list(shape, n_blocks)
    plans = [(get_structure(mth), _ks(get_structure(mth), shape, n_blocks, methods)) for mth in methods]
    cheap = [(c[0], s.name, c[1], c[2]) for s, ks in plans if (c := s.budget_rule.cheapest(shape, ks, ranks))]
    if not cheap:
        raise ValueError(
            f"no configuration below full rank exists for shape {shape} with methods={methods}, "
            f"n_blocks={n_blocks}, ranks={ranks}: every candidate block would have rank >= its "
            "smaller side"
        )
    count, name, K, r = min(cheap)
    if budget < count:
        extra = " plus a rank-1 global term" if get_structure(name).extra else ""
        raise ValueError(
            f"budget={budget} is below the cheapest configuration: {name} with n_blocks={K} "
            f"and rank {r}{extra} costs {count} parameters"
        )
    records = [rec for s, ks in plans for rec in s.budget_rule.records(s.name, shape, budget, ks, ranks)]
    if not records:
        best = max(((*s.budget_rule.largest(shape, ks, ranks, budget), s.name) for s, ks in plans), key=lambda t: t[0])
        raise ValueError(
            f"budget={budget} is too large for shape {shape}: every configuration that spends it "
            "has a rank >= some block's smaller side (such blocks are cheaper stored densely); "
            f"the largest configuration below full rank is {best[2]} with n_blocks={best[1]}, "
            f"{best[0]} parameters"
        )
    if exact:
        records = [r for r in records if r["exact"]]
    extra = tuple(dict.fromkeys(k for s, _ in plans for k in s.extra))
    order = {mth: t for t, mth in enumerate(methods)}
    for rec in records:
        for k in extra:
            rec.setdefault(k, None)
    records.sort(key=lambda d: (order[d["method"]], d["n_blocks"], d["rank"], *[d[k] or 0 for k in extra]))
    return RecordList(records, columns=MATCH_COLUMNS + extra)


def over_parameterised(shape, budget, *, methods=None, n_blocks=None, ranks=None):
    """The configurations :func:`match_budget` leaves out as over-parameterised, flagged ``over``.

    For the structures whose count is linear in one rank (the layout
    structures): a configuration spending the budget with a rank equal to an
    active block's smallest side is valid, but that block is cheaper stored
    densely, so :func:`match_budget` skips it. Uneven grids are where this
    happens first (the diagonal ``N = 6`` and ``N = 7`` of a 28 x 28 matrix at
    224 parameters: blocks of side 4 at rank 4). Arguments as in
    :func:`match_budget`; other structures give no record.

    Examples
    --------
    >>> [(r["method"], r["n_blocks"], r["rank"], r["n_params"]) for r in over_parameterised((28, 28), 224)]
    [('diagonal', 6, 4, 224), ('diagonal', 7, 4, 224)]
    """
    methods = check_methods(methods)
    n_blocks, ranks = _int_list(n_blocks), _int_list(ranks)
    _check_k_list(shape, n_blocks)
    out = []
    for mth in methods:
        s = get_structure(mth)
        if hasattr(s.budget_rule, "over"):
            out += s.budget_rule.over(s.name, tuple(shape), int(budget), _ks(s, shape, n_blocks, methods), ranks)
    return RecordList(out, columns=MATCH_COLUMNS + ("over",))


@validate_params("shape", "min_budget", "max_budget", n_blocks="grid_sizes", ranks="ranks")
def budget_sweep_points(shape, *, methods=None, n_blocks=None, ranks=None, min_budget=None, max_budget=None):
    """Budgets at which every structure can be matched exactly.

    A budget is listed when each structure in ``methods`` has at least one
    configuration whose count equals it, under the rules of
    :func:`match_budget` (same default grid sizes, over-parameterised
    configurations excluded): the points of an error-vs-budget curve at which
    the structures compare at *equal* parameter counts.

    Parameters
    ----------
    shape : (int, int)
    methods, n_blocks, ranks
        As in :func:`match_budget`.
    min_budget, max_budget : int, optional
        Keep only budgets in ``[min_budget, max_budget]``.

    Returns
    -------
    budgets : ndarray of int64
        Sorted, without duplicates (may be empty).

    Examples
    --------
    >>> budget_sweep_points((28, 28))
    array([112, 168, 224, 280, 336, 392, 448, 504, 560, 616, 672, 728])
    >>> budget_sweep_points((28, 28), n_blocks=[2, 4], max_budget=500)
    array([112, 224, 336, 448])
    """
    methods = check_methods(methods)
    n_blocks, ranks = _int_list(n_blocks), _int_list(ranks)
    lo, hi = (1 if min_budget is None else min_budget), max_budget
    if hi is not None and hi < lo:
        raise ValueError(f"min_budget={lo} is above max_budget={hi}")
    _check_k_list(shape, n_blocks)
    reach = [
        get_structure(mth).budget_rule.reachable(shape, _ks(get_structure(mth), shape, n_blocks, methods), ranks)
        for mth in methods
    ]
    common = set.intersection(*reach)
    return np.array(sorted(b for b in common if b >= lo and (hi is None or b <= hi)), dtype=np.int64)

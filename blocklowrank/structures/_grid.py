"""Layout structures: independent truncated SVDs on the active blocks of a grid.

Global low rank (LoRA) is a 1 x 1 grid, MELoRA an N x N grid with the diagonal
active, Localized LoRA (GraLoRA's structure) a K x K grid with every block
active. :func:`layout_structure` declares such a structure from its active
pattern alone: count, budget rule, fit and estimator come with it, so a new
pattern (upper-triangular blocks, a band, ...) is one call and one
:func:`~blocklowrank.structures.register`.
"""

from __future__ import annotations

import numpy as np

from .._engine import fit_layout
from .._metric import BCD_TOL
from .._params import SVD_OPTIONS, check
from .._validation import validate_matrix
from ..estimators import StructuredEstimator, _set_params
from ..layout import BlockLayout, _normalize_n_blocks, split_sizes
from ..permutations import resolve_permutation
from ._registry import Structure, get_structure, register
from ._rules import LinearBudget

__all__ = ["layout_structure", "GlobalLowRank", "DiagonalBlockLowRank", "BlockLowRank", "GridLowRank"]


def _rank_matrix(layout, name, rank):
    """Per-block rank array (K_rows, K_cols) from an int, a (K_rows, K_cols) array or,
    for a diagonal pattern, a vector of diagonal ranks."""
    active = layout.active
    if np.ndim(rank) == 0:
        R = np.where(active, check(rank, "rank"), 0).astype(np.int64)
    else:
        arr = np.asarray(rank)
        if arr.dtype == object or arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"rank must be an int or an array of ints, got dtype {arr.dtype}")
        if layout.pattern == "diagonal" and arr.shape == (active.shape[0],):
            R = np.diag(arr).astype(np.int64)
        elif arr.size == 1 and active.size == 1:
            R = arr.reshape(1, 1).astype(np.int64)
        elif arr.shape == active.shape:
            R = arr.astype(np.int64)
        else:
            raise ValueError(f"per-block rank must have shape {active.shape}, got {arr.shape}")
        if np.any(R < 0):
            raise ValueError(f"per-block rank entries must be >= 0, got {R.tolist()}")
        off = np.argwhere((R != 0) & ~active)
        if off.size:
            i, j = (int(v) for v in off[0])
            raise ValueError(
                f"rank gives rank {int(R[i, j])} to block ({i}, {j}), which is not active in the {name} layout"
            )
    over = np.argwhere(R > layout.max_ranks)
    if over.size:
        i, j = (int(v) for v in over[0])
        raise ValueError(
            f"rank {int(R[i, j])} exceeds the smaller side of block ({i}, {j}), which is "
            f"{layout.row_sizes[i]}x{layout.col_sizes[j]} (max rank {int(layout.max_ranks[i, j])}); "
            "lower rank or use fewer blocks"
        )
    return R


def layout_structure(
    name, label, summary, pattern, *,
    estimator=None, unit=None, rmax=None, fixed_blocks=None, paper=False, peft=None, min_default_blocks=1,
):  # fmt: skip
    """Declare a layout structure from its active pattern.

    Parameters
    ----------
    name, label, summary : str
        See :class:`~blocklowrank.structures.Structure`.
    pattern : callable
        ``pattern(K_rows, K_cols) -> bool array``: which blocks are active.
    estimator : type, optional
        Its estimator; by default a :class:`GridLowRank` subclass named after
        the structure.
    unit, rmax : callable, optional
        ``unit(shape, K)``: parameters at rank 1 on every active block of a
        K x K grid; ``rmax(shape, K)``: the largest rank below the smallest
        active block's side. Closed forms keep the budget tools fast on large
        shapes; by default they are read from the layout.
    fixed_blocks : int, optional
        The one grid size the structure allows (1 for global LoRA).

    Returns
    -------
    Structure
        Not yet registered (pass it to :func:`~blocklowrank.structures.register`).
    """

    def layout(shape, n_blocks=1):
        shape = check(shape, "shape")
        kr, kc = _normalize_n_blocks(n_blocks)
        if fixed_blocks is not None and (kr, kc) != (fixed_blocks, fixed_blocks):
            raise ValueError(
                f"the {name} structure has {fixed_blocks} block(s): n_blocks must be {fixed_blocks}, got {n_blocks!r}"
            )
        rs = split_sizes(shape[0], kr, axis="rows")
        cs = split_sizes(shape[1], kc, axis="columns")
        active = np.asarray(pattern(kr, kc), dtype=bool)
        return BlockLayout(shape, rs, cs, active, np.zeros((kr, kc), dtype=np.int64))

    def count(shape, *, n_blocks=1, rank):
        lay = layout(shape, n_blocks)
        return lay.with_ranks(_rank_matrix(lay, name, rank)).n_params

    def fit(X, *, n_blocks=1, row_perm=None, col_perm=None, **options):
        X = validate_matrix(X)
        lay = layout(X.shape[-2:], n_blocks)
        if row_perm is not None or col_perm is not None:
            lay = lay.with_permutation(row_perm, col_perm)
        return fit_layout(X, lay, structure=name, **options)

    def default_unit(shape, K):
        return int(layout(shape, K).block_costs.sum())

    def default_rmax(shape, K):
        lay = layout(shape, K)
        return int(lay.max_ranks[lay.active].min()) - 1

    if estimator is None:  # a GridLowRank subclass, importable from this module (so it pickles)
        estimator = type(
            f"{name.title().replace('_', '')}LowRank",
            (GridLowRank,),
            {"_structure": name, "__doc__": f"{label}: {summary} (see :class:`GridLowRank`)."},
        )
        globals()[estimator.__name__] = estimator
    return Structure(
        name=name, label=label, summary=summary, layout=layout, count=count,
        budget_rule=LinearBudget(unit or default_unit, rmax or default_rmax), fit=fit, estimator=estimator,
        spectral=True, paper=paper, fixed_blocks=fixed_blocks, min_default_blocks=min_default_blocks, peft=peft,
        options=("max_iter", "tol"), metric=True,
    )  # fmt: skip


# ---------------------------------------------------------------------------- estimators
_PARAMS_DOC = """
    rank : int or array-like of shape (K_rows, K_cols), default=None
        Rank of every active block, or one rank per block. If ``rank``,
        ``budget`` and ``max_error`` are all None, 1.
    budget : int, default=None
        Parameter budget: the per-block ranks that minimise the error under it
        (see :func:`blocklowrank.allocate_ranks`).
    max_error : float in (0, 1), default=None
        Fewest parameters whose relative error is ``<= max_error``: exactly
        the fewest when ``exact_allocation_`` is True (always for equal blocks;
        for uneven blocks while the exact programme is small), else within
        ``max_error`` with possibly more parameters.
    svd_solver : {"auto", "full", "randomized"}, default="auto"
        "full" is the exact LAPACK SVD; "randomized" a batched randomized SVD
        (knobs as in :func:`sklearn.utils.extmath.randomized_svd`);
        "auto" is certified: for blocks of side >= 256 it sketches, bounds the
        energy the sketch misses from a computed a-posteriori bound, keeps the
        randomized factors only when the error is within a factor
        sqrt(1 + 1e-6) of the exact optimum, and falls back to the exact SVD
        otherwise (exact always for ``budget`` and ``max_error``);
        ``report.svd_solver`` says which ran.
    n_oversamples : int, default=10
        Extra sketch columns for the randomized solver.
    iterated_power : int or "auto", default="auto"
        Power iterations for the randomized solver.
    random_state : int, RandomState instance or None, default=None
        Seeds the randomized solver.
    cap_rank : bool, default=False
        Lower a rank above a block's smaller side to that side instead of
        raising ValueError.
    n_jobs : int, default=None
        Worker threads over each stack of equal-shaped blocks.
    gram_damping : float, default=None
        Damping of a fit in a data metric (``fit(X, input_gram=G)``):
        ``G + gram_damping * mean(diag G) * I`` (``H`` likewise); None:
        :data:`blocklowrank.GRAM_DAMPING` (0.01, measured), or the damping a
        :class:`~blocklowrank.GramFactor` was built with.
"""

_BCD_DOC = """
    max_iter : int, default=100
        In a data metric whose blocks do not decouple: passes of the
        block-coordinate descent, the start included.
    tol : float, default=5e-3
        Stop the block-coordinate descent when a sweep improves the relative
        (damped) output error by a fraction ``<= tol``.
"""

_GRID_DOC = """
    n_blocks : int or (int, int), default=1
        ``K`` (a K x K grid) or ``(K_rows, K_cols)``; ``np.array_split`` cuts.
        The default, one block, is global low rank, as in
        :func:`blocklowrank.approximate`.
    row_perm, col_perm : None, array-like of int, "strided" or "cluster", default=None
        Cut ``X[row_perm][:, col_perm]`` into blocks instead of ``X``; applied
        transparently in fit, transform and reconstruct (codes and
        reconstructions are in the original order). "strided" groups index
        ``t`` with ``t mod K`` (Monarch-style blocks); "cluster" orders by a
        k-means clustering of the fitted X
        (:func:`blocklowrank.permutations.cluster_permutation`).
"""

_ATTRS_DOC = """
    Attributes
    ----------
    factors_ : StructuredFactors
        The fitted factors: ``factors_[(i, j)]`` is ``(B_ij, A_ij)`` with
        ``B = U_r S_r`` and ``A = V_r^T``; ``factors_.to_dense()`` the approximation.
    n_params_ : int
        Exact number of parameters, ``factors_.n_params`` (= ``layout_.n_params``).
    error_ : float
        Relative Frobenius error ``||X - X_hat||_F / ||X||_F`` on the fitted X.
    output_error_ : float
        Relative output error in the data metric of the fit
        (``sqrt(f(X_hat) / f(0))``, undamped; see :func:`blocklowrank.approximate`);
        equal to ``error_`` when no Gram was given.
    objective_ : float
        Only with a Gram: the damped objective the fit minimised.
    n_iter_ : int
        Grid estimators (those with ``max_iter``): passes of the
        block-coordinate descent in a data metric (the start counted); 1 for
        a fit in one step.
    error_trace_, stop_reason_
        Only for a block-coordinate descent in a data metric (blocks that do not
        decouple): the damped relative output error after each accepted
        sweep and why it stopped.
    ranks_ : ndarray of int, shape (K_rows, K_cols)
        Per-block ranks (0 where a block is inactive).
    singular_values_ : dict
        ``{(i, j): sigma}``, the singular values computed for each block.
    exact_allocation_ : bool
        Only with ``budget`` or ``max_error``: whether the ranks are provably optimal.
    layout_ : BlockLayout
        Block cuts, active blocks, ranks and permutations.
    n_codes_ : int
        Number of code columns produced by :meth:`transform`.
    n_samples_fit_ : int
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Defined only when X has feature names that are all strings.
"""


class _LayoutEstimator(StructuredEstimator):
    """Fits its registered layout structure with :func:`~blocklowrank.fit_layout`."""

    _structure = None
    _orthonormal_codes = True

    def _rank_arguments(self):
        """The rank rule for :func:`fit_layout` (which refuses more than one); rank 1 when none is given."""
        rule = {k: getattr(self, k) for k in ("rank", "budget", "max_error")}
        return rule if any(v is not None for v in rule.values()) else {"rank": 1}

    def _fit_structure(self, X, **metric):
        s = get_structure(self._structure)
        layout = s.layout(X.shape, getattr(self, "n_blocks", 1))
        rps, cps = getattr(self, "row_perm", None), getattr(self, "col_perm", None)
        diag = layout.pattern == "diagonal"
        rp = resolve_permutation(rps, X, layout.n_blocks[0], 0, other=cps, diagonal=diag)
        cp = resolve_permutation(cps, X, layout.n_blocks[1], 1, other=rps, diagonal=diag)
        if rp is not None or cp is not None:
            layout = layout.with_permutation(rp, cp)
        options = {k: getattr(self, k) for k in ("cap_rank", *SVD_OPTIONS)}
        options.update({k: getattr(self, k) for k in ("max_iter", "tol") if hasattr(self, k)})  # grid estimators
        return fit_layout(X, layout, structure=self._structure, **options, **metric, **self._rank_arguments())


class GlobalLowRank(_LayoutEstimator):
    __doc__ = (
        """Global low-rank approximation (LoRA structure): ``X ~ B A`` of rank ``r``.

    ``r (m + n)`` parameters. This is the uncentred truncated SVD: with the
    exact solver, :meth:`transform` equals
    ``sklearn.decomposition.TruncatedSVD(algorithm="arpack")``.

    Parameters
    ----------"""
        + _PARAMS_DOC
        + _ATTRS_DOC
        + """    components_ : ndarray of shape (rank, n_features)
        ``A``, the right singular vectors (as in TruncatedSVD); in a data
        metric ``A = V_r^T L^{-1}`` (rows orthonormal in ``G_delta``).

    See Also
    --------
    BlockLowRank : Localized LoRA (full K x K block) structure.
    sklearn.decomposition.TruncatedSVD : the same model.

    References
    ----------
    .. [1] Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.

    Examples
    --------
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> est = GlobalLowRank(rank=4).fit(X)
    >>> est.n_params_, est.transform(X).shape
    (224, (28, 4))
    """
    )

    _structure = "global"

    def __init__(
        self, *, rank=None, budget=None, max_error=None,
        svd_solver="auto", n_oversamples=10, iterated_power="auto", random_state=None, cap_rank=False, n_jobs=None,
        gram_damping=None,
    ):  # fmt: skip
        _set_params(self, locals())

    def _store(self, res, dtype, metric=False):
        super()._store(res, dtype, metric)
        self.components_ = self.factors_[(0, 0)][1]


class GridLowRank(_LayoutEstimator):
    __doc__ = (
        """Independent low-rank factors on the active blocks of a grid (base of the grid estimators).

    Parameters
    ----------"""
        + _GRID_DOC
        + _PARAMS_DOC
        + _BCD_DOC
        + _ATTRS_DOC
        + """
    Notes
    -----
    With several block-rows, a row's codes depend on which block-row it is
    in, so :meth:`transform` needs exactly the fitted number of rows; to tune
    a structure for one matrix with ``GridSearchCV`` use
    :func:`blocklowrank.estimators.single_fit_cv`.
    """
    )

    def __init__(
        self, *, n_blocks=1, rank=None, budget=None, max_error=None,
        svd_solver="auto", n_oversamples=10, iterated_power="auto", random_state=None, cap_rank=False, n_jobs=None,
        row_perm=None, col_perm=None, gram_damping=None, max_iter=100, tol=BCD_TOL,
    ):  # fmt: skip
        _set_params(self, locals())

    def _grid(self):
        return _normalize_n_blocks(self.n_blocks)


class DiagonalBlockLowRank(GridLowRank):
    __doc__ = """Diagonal-block low-rank approximation (MELoRA structure).

    An ``N x N`` grid whose ``N`` diagonal blocks each get a rank-``r``
    truncated SVD; the off-diagonal blocks are zero. ``sum_i r (m_i + n_i)``
    parameters (``2 d r`` for a d x d matrix, whatever N). Parameters and
    attributes as :class:`GridLowRank` (``n_blocks`` must be square).

    References
    ----------
    .. [1] Ren et al., "MELoRA: Mini-Ensemble Low-Rank Adapters for
       Parameter-Efficient Fine-Tuning", ACL 2024.

    Examples
    --------
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> est = DiagonalBlockLowRank(n_blocks=4, rank=4).fit(X)
    >>> est.n_params_, est.ranks_.diagonal().tolist()
    (224, [4, 4, 4, 4])
    """

    _structure = "diagonal"


class BlockLowRank(GridLowRank):
    __doc__ = """Full block low-rank approximation (Localized LoRA / GraLoRA structure).

    A ``K_rows x K_cols`` grid whose every block ``(i, j)`` gets its own
    rank-``r`` truncated SVD ``B_ij A_ij`` (optimal per block by
    Eckart-Young). ``sum_ij r (m_i + n_j)`` parameters (``2 d r K`` for a
    d x d matrix and a K x K grid). Parameters and attributes as :class:`GridLowRank`.

    References
    ----------
    .. [1] Barazandeh et al., "Localized LoRA: A Structured Low-Rank
       Approximation for Efficient Fine-Tuning", arXiv:2506.00236, 2025.
    .. [2] Jung et al., "GraLoRA: Granular Low-Rank Adaptation for
       Parameter-Efficient Fine-Tuning", arXiv:2505.20355, 2025.

    Examples
    --------
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> est = BlockLowRank(n_blocks=2, rank=2).fit(X)
    >>> est.n_params_, est.ranks_.tolist()
    (224, [[2, 2], [2, 2]])
    >>> opt = BlockLowRank(n_blocks=2, budget=224).fit(X)
    >>> bool(opt.error_ <= est.error_)
    True
    """

    _structure = "block"


# ---------------------------------------------------------------------------- the three
def _min_side(shape, K):
    return min(shape[0] // K, shape[1] // K)  # np.array_split: the smallest pieces


def _every(kr, kc):
    return np.ones((kr, kc), dtype=bool)


def _diagonal(kr, kc):
    return np.eye(kr, kc, dtype=bool) if kr == kc else _square(kr, kc)


def _two_sides(shape, K):  # one rank-1 factorisation spans the rows and the columns once (LoRA, MELoRA)
    return shape[0] + shape[1]


register(
    layout_structure(
        "global", "LoRA", "X ~ B A, one rank-r factorisation of the whole matrix", _every,
        estimator=GlobalLowRank, fixed_blocks=1, paper=True, peft="LORA",
        unit=_two_sides, rmax=lambda shape, K: min(shape) - 1,
    )
)  # fmt: skip
register(
    layout_structure(
        "diagonal", "MELoRA", "N diagonal blocks B_i A_i of rank r, off-diagonal blocks zero", _diagonal,
        estimator=DiagonalBlockLowRank, paper=True, peft="LORA",
        unit=_two_sides, rmax=lambda shape, K: _min_side(shape, K) - 1,
    )
)  # fmt: skip
register(
    layout_structure(
        "block", "Localized LoRA", "every block of a K x K grid B_ij A_ij of rank r", _every,
        estimator=BlockLowRank, paper=True, peft="GRALORA",
        unit=lambda shape, K: K * (shape[0] + shape[1]), rmax=lambda shape, K: _min_side(shape, K) - 1,
    )
)  # fmt: skip


def _square(kr, kc):
    raise ValueError(f"the diagonal pattern needs as many block-rows as block-columns, got {kr} x {kc}")

"""Block low rank with shared bases (BLAST; Lee et al., NeurIPS 2024).

The matrix is cut into a ``K_rows x K_cols`` grid and block ``(i, j)`` is
``U_i diag(s_ij) V_j^T``: the left basis ``U_i`` (``m_i x r``) is shared by
every block of block-row ``i``, the right basis ``V_j`` (``n_j x r``) by
every block of block-column ``j``, and only the ``r`` diagonal couplings
``s_ij`` are specific to a block. Parameters: ``r (m + n) + r K_rows K_cols``.
"""

from __future__ import annotations

import numpy as np
from sklearn.utils import check_random_state

from .._descent import Trace
from .._parallel import resolve_n_jobs, run_chunked
from .._params import INITS, StrOptions, validate_params
from .._validation import validate_matrix
from ..estimators import StructuredEstimator, _set_params
from ..layout import BlockLayout, _normalize_n_blocks
from ._als import _normalise, als
from ._in_metric import shared_basis_in_metric
from ._iterative import damping_doc, iterative_result, prepare
from ._registry import Structure, register
from ._rules import LinearBudget

__all__ = ["fit_shared_basis", "SharedBasisLowRank", "shared_basis_params"]


def _grid(shape, n_blocks=1, row_sizes=None, col_sizes=None):
    return BlockLayout.from_blocks(shape, n_blocks, row_sizes=row_sizes, col_sizes=col_sizes)


@validate_params("shape", "n_blocks", rank="shared_rank")
def shared_basis_params(shape, *, n_blocks=1, rank):
    """Exact parameter count ``r (m + n) + r K_rows K_cols`` of the shared-basis structure.

    ``rank`` must be at most the smallest block side.

    Examples
    --------
    >>> shared_basis_params((28, 28), n_blocks=2, rank=3)
    180
    >>> shared_basis_params((256, 256), n_blocks=4, rank=15)
    7920
    """
    lay = _grid(shape, n_blocks)
    r = _check_rank(lay, rank)
    (m, n), (kr, kc) = lay.shape, lay.n_blocks
    return int(r * (m + n) + r * kr * kc)


def _check_rank(lay, rank):
    """``rank`` (an int >= 1, checked by the callers' decorators) against the smallest block."""
    side = int(min(min(lay.row_sizes), min(lay.col_sizes)))
    if rank > side:
        raise ValueError(
            f"rank {rank} exceeds the smaller side of the smallest block ({side}) of the "
            f"{lay.n_blocks[0]}x{lay.n_blocks[1]} grid; lower rank or use fewer blocks"
        )
    return rank


@validate_params(
    "n_blocks",
    "max_iter",
    "tol",
    "random_state",
    "n_jobs",
    "gram_damping",
    rank="shared_rank",
    init=[StrOptions(set(INITS)), tuple, list],
)
def fit_shared_basis(
    X, n_blocks, rank, *, max_iter=100, tol=1e-6, init="svd", random_state=None,
    row_sizes=None, col_sizes=None, n_jobs=None, input_gram=None, output_gram=None, gram_damping=None,
):  # fmt: skip
    """Fit ``X_ij ~ U_i diag(s_ij) V_j^T`` by exact alternating least squares.

    ``X`` may be one matrix or a stack ``(..., m, n)``; a stack is fitted in
    one vectorised ALS (every step a few stacked matmuls and one vectorised
    solve over all matrices) and each matrix keeps its own stopping rule,
    trace and monotone guarantee: the result for a matrix of the stack is
    the result of fitting it alone (to rounding).

    Initialisation (``init="svd"``): ``U_i`` = top-``r`` left singular
    vectors of block-row ``i`` (``m_i x n``), ``V_j`` = top-``r`` right
    singular vectors of block-column ``j`` (``m x n_j``), then the exact
    ``s`` step. ``init="random"``: Gaussian ``U_i``, ``V_j`` (seeded by
    ``random_state``; for a stack, drawn matrix after matrix from one
    generator), then the exact ``s`` step. ``init=(U, V, S)`` (e.g. a fit's
    ``factors.shared``): a warm start from those bases (the exact ``s`` and
    ``U`` steps then recompute the couplings and left bases, so the first
    pass is no worse than the fit given).

    One sweep = three exact block-coordinate steps:

    - ``V`` step: each ``V_j`` solves the linear least-squares problem
      ``X_{:,j}^T ~ V_j [diag(s_1j) U_1^T, ..., diag(s_Kj) U_K^T]``
      (normal equations with Gram ``sum_i (s_ij s_ij^T) o (U_i^T U_i)``);
    - ``s`` step: each ``s_ij`` solves ``((U_i^T U_i) o (V_j^T V_j)) s_ij =
      diag(U_i^T X_ij V_j)`` (``o`` is the Hadamard product);
    - ``U`` step: each ``U_i`` solves ``X_i ~ U_i W_i`` with ``W_i =
      [diag(s_i1) V_1^T, ..., diag(s_iK) V_K^T]``.

    Between steps the columns of ``U`` (before the ``V`` step) and of ``V``
    (before the ``U`` step) are scaled to unit norm, the scale moving into
    ``s``; this leaves the approximation unchanged and keeps the Gram
    matrices well conditioned. The ``U`` step comes last, so ``U_i`` are the
    least-squares codes of the rows of block-row ``i`` for the decoder
    ``W_i``: :meth:`SharedBasisLowRank.transform` of the fitted X gives them
    back.

    Normal equations are solved with ``spd_solve``:
    a Cholesky solve vectorised over the stack, and for a numerically
    singular Gram (e.g. a coupling ``s_ij = 0``, a block of zeros, or a rank
    above what the data supports) ``psd_solve``
    (pseudo-inverse through an eigendecomposition, eigenvalues below
    ``1e-12`` of the largest treated as zero), the minimum-norm exact
    minimiser. No ridge is added, because a ridge would make a step inexact
    and break the monotone decrease.

    **The error trace never increases**: every step is an exact
    minimisation over its variables with the others fixed (block-coordinate
    descent), so in exact arithmetic the error cannot go up. A sweep that
    raises a matrix's relative error by more than ``1e-12`` (rounding;
    ``STEP_TOL``) is discarded and that matrix stops with
    ``stop_reason="increase"``. The error after a sweep is computed from
    Gram matrices without forming the approximation (``||X||^2 - 2 <X,
    X_hat> + ||X_hat||^2``), and from the dense residual where the relative
    error is below ``1e-2`` (where that expansion would lose accuracy); the
    reported ``error`` is always computed from the dense residual of the
    returned factors.

    Parameters
    ----------
    X : array-like of shape (m, n) or (..., m, n)
    n_blocks : int or (int, int)
        ``K`` or ``(K_rows, K_cols)``; ``np.array_split`` cuts.
    rank : int
        ``r``, at most the smallest block side.
    max_iter : int, default=100
        Largest number of passes, the initialisation counted as the first
        (so ``max_iter - 1`` sweeps at most).
    tol : float, default=1e-6
        Stop when a sweep improves the relative error by a fraction
        ``<= tol`` of its value.
    init : {"svd", "random"} or (U, V, S), default="svd"
    random_state : int, RandomState instance or None, default=None
        Used by ``init="random"`` only.
    row_sizes, col_sizes : sequence of int, optional
        Explicit block heights / widths.
    n_jobs : int, optional
        For a stack: worker threads over chunks of the stack (BLAS held to one
        thread each), as in :func:`~blocklowrank.approximate`; -1 uses every
        core. Each matrix's result does not depend on the chunking (to
        rounding).

    input_gram, output_gram, gram_damping : optional
        Fit in a data metric (see :func:`blocklowrank.approximate`): by
        majorisation-minimisation. With ``c >= lambda_max(H_d) lambda_max(G_d)``,
        ``f(M) <= f(M_t) - 2 <H_d (W - M_t) G_d, M - M_t> + c ||M - M_t||^2`` (equality
        at ``M_t``), so any fit of the target ``Z_t = M_t + H_d (W - M_t) G_d / c``
        that is no worse than ``M_t`` in the Frobenius norm lowers ``f``: each
        step is one warm-started ALS pass and sweep on ``Z_t``. It starts from
        the plain fit (so ends no worse than it in the metric), the objective
        never increases (``c`` doubles, up to a guaranteed bound, when a step
        would raise it), ``error_trace`` holds the damped relative output error
        and ``max_iter``/``tol`` bound the majorisation's passes. Its rate is
        about ``1 - lambda_min / lambda_max`` of the damped metric: slow for
        raw activation Grams (damping bounds it). A multiple of the identity
        is the plain fit.

    Returns
    -------
    SharedBasisFit
        For a stack, with arrays over the leading dimensions.

    Examples
    --------
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> res = fit_shared_basis(X, 2, 3)
    >>> res.n_params, bool(np.all(np.diff(res.error_trace) <= 1e-12))
    (180, True)
    >>> S = np.random.default_rng(1).standard_normal((50, 28, 28))
    >>> batch = fit_shared_basis(S, 2, 3)
    >>> batch.error.shape, batch.shared[2].shape
    ((50,), (50, 2, 2, 3))
    >>> bool(np.isclose(batch.error[7], fit_shared_basis(S[7], 2, 3).error))
    True
    """
    X = validate_matrix(X)
    Xd, dtype, batch, scale = prepare(X)
    N, m, n = Xd.shape
    layout = _grid((m, n), n_blocks, row_sizes, col_sizes)
    r = _check_rank(layout, rank)
    layout = layout.with_ranks(r)
    U0, V0 = _initial_bases(init, layout, N, batch, random_state)
    kr, kc = layout.n_blocks

    def run(Xc, *init_arrays):
        return als(Xc, layout, r, max_iter, tol, *init_arrays)

    arrays = (Xd,) if U0 is None else (Xd, U0, V0)
    U, V, S, final, *trace = run_chunked(run, arrays, resolve_n_jobs(n_jobs))
    shared = (
        [U[:, i, : layout.row_sizes[i]] for i in range(kr)],
        [V[:, j, : layout.col_sizes[j]] for j in range(kc)],
        S,
    )
    solver = {}
    if init == "svd":  # the initial bases: exact SVDs of every block-row and block-column
        m, n = Xd.shape[-2:]
        solver = {**{(int(h), n): "full" for h in layout.row_sizes}, **{(m, int(w)): "full" for w in layout.col_sizes}}
    plain = iterative_result(
        layout, final, Trace.from_arrays(*trace), batch, dtype, scale, shared=shared, structure="shared_basis",
        solver=solver,
    )  # fmt: skip
    if input_gram is None and output_gram is None:
        return plain

    def warm(Z, state):  # one warm-started ALS pass and sweep: no worse than ``state`` on ||Z - M||
        return fit_shared_basis(
            Z, n_blocks, rank, init=state, max_iter=2, tol=0.0, row_sizes=row_sizes, col_sizes=col_sizes
        ).factors.shared

    metric = (input_gram, output_gram, gram_damping)
    return shared_basis_in_metric(X, layout, plain, warm, (max_iter, tol), metric)


def _initial_bases(init, layout, N, batch, random_state):
    """Padded starting bases ``(U0, V0)`` of shapes (N, K_rows, mb, r) and (N, K_cols, nb, r), unit
    columns; ``(None, None)`` for the SVD start (computed inside each chunk)."""
    (kr, kc), r = layout.n_blocks, layout.uniform_rank
    mb, nb = max(layout.row_sizes), max(layout.col_sizes)
    if isinstance(init, str) and init == "svd":
        return None, None
    U0, V0 = np.zeros((N, kr, mb, r)), np.zeros((N, kc, nb, r))
    if isinstance(init, str):  # "random"
        rng = check_random_state(random_state)
        for b in range(N):
            for i in range(kr):
                U0[b, i, : layout.row_sizes[i]] = rng.standard_normal((layout.row_sizes[i], r))
            for j in range(kc):
                V0[b, j, : layout.col_sizes[j]] = rng.standard_normal((layout.col_sizes[j], r))
    else:
        if len(init) != 3 or len(init[0]) != kr or len(init[1]) != kc:
            raise ValueError(f"init must be 'svd', 'random' or (U, V, S) with {kr} U and {kc} V matrices")
        for F, mats, sizes in ((U0, init[0], layout.row_sizes), (V0, init[1], layout.col_sizes)):
            for t, (a, h) in enumerate(zip(mats, sizes)):
                a = np.asarray(a, dtype=np.float64)
                if a.shape != batch + (h, r) or not np.all(np.isfinite(a)):
                    raise ValueError(f"init: basis {t} must be finite of shape {batch + (h, r)}, got {a.shape}")
                F[:, t, :h] = a.reshape((N, h, r))
    _normalise(U0, np.ones((N, kr, kc, r)), 0)
    _normalise(V0, np.ones((N, kr, kc, r)), 1)
    return U0, V0


class SharedBasisLowRank(StructuredEstimator):
    __doc__ = (
        """Block low rank with bases shared along block-rows and block-columns (BLAST).

    Block ``(i, j)`` of a ``K_rows x K_cols`` grid is ``U_i diag(s_ij)
    V_j^T``: ``U_i`` (``m_i x r``) is shared by block-row ``i``, ``V_j``
    (``n_j x r``) by block-column ``j``. ``r (m + n) + r K_rows K_cols``
    parameters, against ``r K (m + n)`` for independent rank-``r`` blocks.
    Fitted by exact alternating least squares from an SVD initialisation
    (:func:`fit_shared_basis`); the error never increases from one sweep to
    the next (``error_trace_``). A row in block-row ``i`` is coded by its row
    of ``U_i`` (``r`` numbers).

    Parameters
    ----------
    n_blocks : int or (int, int), default=1
        ``K`` (a K x K grid) or ``(K_rows, K_cols)``.
    rank : int, default=1
        Shared rank ``r`` (at most the smallest block side).
    max_iter : int, default=100
        Largest number of passes, the initialisation counted as the first.
    tol : float, default=1e-6
        Stopping tolerance: stop when a sweep improves the relative error by
        a fraction ``<= tol``.
    init : {"svd", "random"}, default="svd"
        Starting bases: the leading singular vectors of each block-row and
        block-column (exact SVD), or Gaussian ones.
    random_state : int, RandomState instance or None, default=None
        Seeds ``init="random"``.
    n_jobs : int, default=None
        Worker threads over chunks of a stack (see :func:`fit_shared_basis`)."""
        + damping_doc("fit_shared_basis")
        + """
    Attributes
    ----------
    factors_ : StructuredFactors
        ``factors_.shared`` is ``(U, V, S)``; ``factors_[(i, j)]`` is
        ``(U_i diag(s_ij), V_j^T)``.
    n_params_ : int
        ``r (m + n) + r K_rows K_cols`` = ``factors_.n_params``;
        ``layout_.n_params`` counts independent blocks of rank ``r`` instead.
    error_ : float
    output_error_ : float
        Relative output error in the data metric of the fit; ``error_`` without one.
    error_trace_ : ndarray
        Relative error after the initialisation and each sweep; non-increasing
        (in a data metric: the damped output error after the plain fit and
        each majorisation step).
    n_iter_ : int
        Passes run, the initialisation counted as the first.
    stop_reason_ : str
    ranks_ : ndarray of int, shape (K_rows, K_cols)
        Nominal rank ``r`` of every block.
    layout_ : BlockLayout
    n_codes_, n_samples_fit_, n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Defined only when X has feature names that are all strings.

    References
    ----------
    .. [1] Lee, Kwon, Kang, Wang and Lee, "BLAST: Block-Level Adaptive
       Structured Matrices for Efficient Deep Neural Network Inference",
       NeurIPS 2024, arXiv:2410.21262.

    Examples
    --------
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> est = SharedBasisLowRank(n_blocks=2, rank=3).fit(X)
    >>> est.n_params_, est.fit_transform(X).shape
    (180, (28, 3))
    """
    )

    _param_rules = {"rank": "shared_rank"}

    def __init__(
        self, *, n_blocks=1, rank=1, max_iter=100, tol=1e-6, init="svd", random_state=None, n_jobs=None,
        gram_damping=None,
    ):  # fmt: skip
        _set_params(self, locals())

    def _grid(self):
        return _normalize_n_blocks(self.n_blocks)

    def _fit_structure(self, X, **metric):
        return fit_shared_basis(X, self.n_blocks, self.rank, **{k: getattr(self, k) for k in _OPTIONS}, **metric)


_OPTIONS = ("max_iter", "tol", "init", "random_state", "n_jobs")


def _fit(X, *, n_blocks=1, rank, **options):
    return fit_shared_basis(X, n_blocks, rank, **options)


register(
    Structure(
        name="shared_basis", label="BLAST", summary="blocks U_i diag(s_ij) V_j^T with bases shared along rows/columns",
        layout=_grid, count=shared_basis_params, fit=_fit, estimator=SharedBasisLowRank,
        budget_rule=LinearBudget(
            unit=lambda shape, K: shape[0] + shape[1] + K * K,
            rmax=lambda shape, K: min(shape[0] // K, shape[1] // K) - 1,
        ),
        options=_OPTIONS, metric=True,
    )
)  # fmt: skip

"""Hybrid structure: a block layout (full K x K or diagonal) plus a global low-rank term.

``X ~ B_g A_g + P`` where ``B_g A_g`` has rank ``r_g`` over the whole matrix
and ``P`` carries a rank-``r_ij`` factorisation ``B_ij A_ij`` on every active
block of a :class:`~blocklowrank.layout.BlockLayout`. This is the structure
of GraLoRA's ``hybrid_r`` (a GraLoRA adapter plus a vanilla LoRA adapter).
Parameters: ``sum_ij r_ij (m_i + n_j) + r_g (m + n)``.
"""

from __future__ import annotations

import numpy as np
from sklearn.utils import check_random_state

from .._descent import Trace, descend
from .._engine import _fit_layout
from .._params import SVD_OPTIONS, validate_params
from .._validation import validate_matrix
from ..estimators import StructuredEstimator, _set_params
from ..factors import StructuredFactors
from ..layout import BlockLayout, _normalize_n_blocks
from ._in_metric import hybrid_in_metric
from ._iterative import damping_doc, iterative_result, prepare
from ._registry import Structure, register
from ._rules import allowed_ranks, record

__all__ = ["fit_hybrid", "HybridLowRank", "hybrid_params"]


# ---------------------------------------------------------------------------- counting
def _block_layout(shape, n_blocks, pattern="full"):
    return BlockLayout.from_blocks(shape, n_blocks, pattern=pattern)


@validate_params("shape", "n_blocks", "rank", "global_rank", "pattern")
def hybrid_params(shape, *, n_blocks=1, rank, global_rank, pattern="full"):
    """Exact parameter count ``sum_ij r_ij (m_i + n_j) + r_g (m + n)`` of a hybrid structure.

    Examples
    --------
    >>> hybrid_params((28, 28), n_blocks=2, rank=1, global_rank=2)
    224
    >>> hybrid_params((256, 256), n_blocks=4, rank=1, global_rank=0, pattern="diagonal")
    512
    """
    lay = _block_layout(shape, n_blocks, pattern)
    lay = lay.with_ranks(rank)
    m, n = lay.shape
    if global_rank > min(m, n):
        raise ValueError(f"global_rank={global_rank} exceeds min(m, n) = {min(m, n)} for shape {(m, n)}")
    return int(lay.n_params + global_rank * (m + n))


class HybridBudget:
    """Budget rule: every block rank ``r_b >= 1`` below the smallest block side, with the
    largest global rank ``1 <= r_g < min(m, n)`` that fits (both parts non-empty)."""

    @staticmethod
    def _configs(shape, ks, ranks, budget=None):
        m, n = shape
        L = min(m, n)
        for K in ks:
            unit, rmax = K * (m + n), min(m // K, n // K) - 1
            for r_b in allowed_ranks(ranks, rmax):
                r_g = L - 1 if budget is None else min((budget - r_b * unit) // (m + n), L - 1)
                if r_g >= 1:
                    yield K, r_b, r_g, r_b * unit + r_g * (m + n)

    def records(self, name, shape, budget, ks, ranks):
        m, n = shape
        out = []
        for K, r_b, r_g, count in self._configs(shape, ks, ranks, budget):
            if (budget - r_b * K * (m + n)) // (m + n) <= min(m, n) - 1:  # the largest r_g that fits
                out.append(record(name, K, r_b, count, budget, global_rank=r_g))
        return out

    def cheapest(self, shape, ks, ranks):
        m, n = shape
        opts = [(r_b * K * (m + n) + (m + n), K, r_b) for K, r_b, _, _ in self._configs(shape, ks, ranks)]
        return min(opts) if opts else None

    def largest(self, shape, ks, ranks, budget):
        best = max(((c, K) for K, _, _, c in self._configs(shape, ks, ranks, budget)), default=(0, None))
        return best

    def reachable(self, shape, ks, ranks):
        m, n = shape
        return {
            r_b * K * (m + n) + g * (m + n)
            for K, r_b, r_g, _ in self._configs(shape, ks, ranks)
            for g in range(1, r_g + 1)
        }


# ---------------------------------------------------------------------------- core
@validate_params("global_rank", "max_iter", "tol", "first_step", "gram_damping", *SVD_OPTIONS, layout=[BlockLayout])
def fit_hybrid(
    X, layout, global_rank, *, max_iter=100, tol=1e-6, first_step="global",
    svd_solver="auto", n_oversamples=10, iterated_power="auto", random_state=None, n_jobs=None,
    input_gram=None, output_gram=None, gram_damping=None,
):  # fmt: skip
    """Fit blocks plus a global low-rank term by alternating exact steps.

    Minimises ``||X - B_g A_g - P||_F`` over a rank-``r_g`` global term and
    a block term ``P`` with the ranks of ``layout``. Every step is an exact
    minimisation (block-coordinate descent):

    1. global step: ``B_g A_g`` = truncated SVD of ``X - P`` (Eckart-Young);
    2. block step: ``P`` = per-block truncated SVDs of ``X - B_g A_g`` (the
       blocks are disjoint, so this is the exact minimiser over ``P``);

    starting with ``first_step`` on ``X`` itself, alternating until an
    alternation improves the relative error by a fraction ``<= tol`` or
    ``max_iter`` alternations. A last step refits all left factors jointly
    given the right ones (per block-row, the least-squares problem
    ``X_i ~ Z_i D_i`` with the decoder stacking ``A_g`` and the ``A_ij``), so
    the returned codes are the least-squares codes.

    **The error trace never increases**: the previous iterate is feasible
    for every step. A step that would raise the relative error by more than
    ``1e-12`` (rounding; ``STEP_TOL``) is discarded and iteration stops with
    ``stop_reason="increase"`` (only possible with the randomized solver).

    Parameters
    ----------
    X : array-like of shape (m, n) or (..., m, n)
        A stack is fitted in one alternation; each matrix keeps its own trace,
        stopping rule and monotone guarantee (with the exact solver its result
        is that of fitting it alone, to rounding). float32 stays float32.
    layout : BlockLayout
        Block part with its ranks (may have no ranks if ``global_rank > 0``).
    global_rank : int
        ``r_g >= 0``; 0 gives the plain block structure (one step).
    max_iter : int, default=100
        Largest number of alternations, the initial pass included.
    tol : float, default=1e-6
        Stopping tolerance on the relative improvement of one alternation.
    first_step : {"global", "blocks"}, default="global"
        Which part is fitted first, on X itself: with "global" the result is
        never worse than global LoRA of rank ``r_g``, with "blocks" never
        worse than the block structure alone.
    svd_solver, n_oversamples, iterated_power, random_state, n_jobs
        For every truncated SVD, as in :func:`blocklowrank.approximate`.
    input_gram, output_gram, gram_damping : optional
        Fit in a data metric (see :func:`blocklowrank.approximate`) by exact
        alternating steps in the metric: the global step is the exact global
        fit of ``X - P`` in the metric (Eckart-Young on ``K^T (X - P) L``), the
        block step one sweep of exact block steps (each block the best given
        the others and the global term). It starts from the better, in the
        metric, of the plain fit above and the metric's own first pass
        (``first_step`` on ``X``), so it ends no worse than either (with
        "global": no worse than global LoRA in the metric), and the damped
        objective never increases (``error_trace``: the damped relative output
        error after the start and each accepted step). A multiple of the
        identity is the plain fit.

    Returns
    -------
    Approximation
        Its ``factors`` hold the blocks and the global term; its report the
        ``error_trace``, ``n_iter`` (alternations) and ``stop_reason``
        ("tol", "max_iter", "increase", or "exact" when one part is empty).

    Examples
    --------
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> res = fit_hybrid(X, BlockLayout.block((28, 28), 2, rank=1), global_rank=2)
    >>> res.n_params, bool(np.all(np.diff(res.error_trace) <= 1e-12))
    (224, True)
    >>> bool(np.isclose(res.error, np.linalg.norm(X - res.reconstruction) / np.linalg.norm(X)))
    True
    >>> S = np.random.default_rng(1).standard_normal((20, 28, 28))
    >>> batch = fit_hybrid(S, BlockLayout.block((28, 28), 2, rank=1), global_rank=2)
    >>> batch.error.shape, batch.global_factors[0].shape
    ((20,), (20, 28, 2))
    """
    X = validate_matrix(X)
    Xd, dtype, batch, scale = prepare(X)
    m, n = Xd.shape[-2:]
    if tuple(layout.shape) != (m, n):
        raise ValueError(f"layout is for shape {layout.shape} but X has shape {(m, n)}")
    if global_rank > min(m, n):
        raise ValueError(f"global_rank={global_rank} exceeds min(m, n) = {min(m, n)} for X of shape {(m, n)}")
    if global_rank == 0 and layout.n_params == 0:
        raise ValueError("both parts are empty: give global_rank >= 1 or a layout with ranks")
    svd = (svd_solver, n_oversamples, iterated_power)
    alt = _Alternation(Xd, layout, global_rank, svd, check_random_state(random_state), n_jobs)
    trace = _alternate(alt, max_iter, tol, first_step)
    f, err = alt.refit()
    trace.record(np.arange(len(err)), err)
    parts = {"blocks": dict(f.items()), "global_factors": f.global_factors}
    plain = iterative_result(layout, err, trace, batch, dtype, scale, **parts, structure="hybrid", solver=alt.solvers)
    if input_gram is None and output_gram is None:
        return plain
    metric = (input_gram, output_gram, gram_damping)
    return hybrid_in_metric(X, layout, global_rank, plain, svd, alt.rng, n_jobs, (max_iter, tol), first_step, metric)


def _alternate(alt, max_iter, tol, first_step):
    """The alternation of :func:`fit_hybrid`: an initial pass fitting each part once on every
    matrix, then passes of both steps (``descend``); the ``Trace``.

    With one part empty the initial pass is exact (``stop_reason="exact"``).
    """
    N = alt.Xd.shape[0]
    trace = Trace(N, 3 + 2 * max(max_iter - 1, 0))
    everyone = np.arange(N)
    has_blocks = alt.layout.n_params > 0
    if has_blocks and alt.r_g:
        order = ("global", "blocks") if first_step == "global" else ("blocks", "global")
    else:
        order = ("blocks",) if has_blocks else ("global",)
    for which in order:
        err, commit = alt.step(which)(everyone)
        commit(np.ones(N, dtype=bool))
        trace.record(everyone, err)
    if len(order) == 1:
        trace.stop[:] = "exact"
    else:
        descend(trace, [alt.step(which) for which in order], max_iter=max_iter, tol=tol)
    return trace


class _Alternation:
    """The two parts of a hybrid fit of a stack Xd (N, m, n): their dense sums and factors.

    Every step is one engine call on the matrices it is given (a batched SVD),
    so each matrix's result is that of fitting it alone.
    """

    def __init__(self, Xd, layout, r_g, svd, rng, n_jobs):
        N, m, n = Xd.shape
        self.Xd, self.layout, self.r_g, self.svd, self.rng, self.n_jobs = Xd, layout, r_g, svd, rng, n_jobs
        self.solvers = {}  # block shape -> the solver its steps ran (report.svd_solver)
        self.glob_layout = BlockLayout.global_((m, n), r_g) if r_g else None
        self.sq_x = np.einsum("nab,nab->n", Xd, Xd)
        self.G = np.zeros((N, m, n))  # the global term, dense
        self.P = np.zeros((N, m, n))  # the block term, dense
        self.gf = [np.zeros((N, m, r_g)), np.zeros((N, r_g, n))]
        self.bf = {
            (int(i), int(j)): [
                np.zeros((N, layout.row_sizes[i], int(layout.ranks[i, j]))),
                np.zeros((N, int(layout.ranks[i, j]), layout.col_sizes[j])),
            ]
            for i, j in zip(*np.nonzero(layout.active))
        }

    def rel_err(self, idx, G, P):
        R = self.Xd[idx] - G - P
        sq = np.einsum("nab,nab->n", R, R)
        tot = self.sq_x[idx]
        return np.where(tot > 0, np.sqrt(sq / np.where(tot > 0, tot, 1.0)), 0.0)

    def step(self, which):
        """The step fitting part ``which`` ("global" or "blocks") exactly given the other,
        as ``descend`` takes it."""

        def run(ids):
            if which == "global":
                a = _fit_layout(self.Xd[ids] - self.P[ids], self.glob_layout, "layout", None, *self._opts())
                dense, facs = a.reconstruction, {"g": a.factors[(0, 0)]}
                err = self.rel_err(ids, dense, self.P[ids])
            else:
                a = _fit_layout(self.Xd[ids] - self.G[ids], self.layout, "layout", None, *self._opts())
                dense, facs = a.reconstruction, a.factors
                err = self.rel_err(ids, self.G[ids], dense)
            for shape, used in a.report.svd_solver.items():  # "auto" may pick differently from step to step
                self.solvers[shape] = used if self.solvers.get(shape, used) == used else "full+randomized"
            return err, lambda sel: self._accept(which, ids, dense, facs, sel)

        return run

    def _opts(self):
        return self.svd, self.rng, self.n_jobs

    def _accept(self, which, idx, dense, facs, sel):
        """Store the candidate of step ``which`` for the matrices idx[sel]."""
        ids = idx[sel]
        if which == "global":
            self.G[ids] = dense[sel]
            B, A = facs["g"]
            self.gf[0][ids], self.gf[1][ids] = B[sel], A[sel]
            return
        self.P[ids] = dense[sel]
        for k, (B, A) in facs.items():
            if k in self.bf and self.bf[k][0].shape[-1]:
                r = self.bf[k][0].shape[-1]
                self.bf[k][0][ids] = B[sel][..., :r]
                self.bf[k][1][ids] = A[sel][..., :r, :]

    def refit(self):
        """The final exact step: least-squares refit of all left factors given the right ones
        (per block-row, ``X_i ~ Z_i D_i``); the factors and their relative errors."""
        Xd, layout = self.Xd, self.layout
        f0 = StructuredFactors(layout, {k: (B, A) for k, (B, A) in self.bf.items()}, global_factors=tuple(self.gf))
        E = np.linalg.pinv(f0.decoders())  # (N, kr, n, c)
        edges = layout.row_edges
        Z = np.empty(Xd.shape[:2] + (E.shape[-1],))
        for i in range(layout.n_blocks[0]):
            Z[:, edges[i] : edges[i + 1]] = Xd[:, edges[i] : edges[i + 1]] @ E[:, i]
        f = f0.with_codes(Z)
        return f, self.rel_err(np.arange(Xd.shape[0]), f.to_dense(), 0.0)


# ---------------------------------------------------------------------------- estimator
class HybridLowRank(StructuredEstimator):
    __doc__ = (
        """Block low-rank plus a global low-rank term (GraLoRA ``hybrid_r`` structure).

    ``X ~ B_g A_g + P``: a rank-``global_rank`` term over the whole matrix
    plus a rank-``rank`` factorisation on every active block of a
    ``K_rows x K_cols`` grid (``pattern="full"``: Localized LoRA / GraLoRA;
    ``"diagonal"``: MELoRA); ``sum_ij r (m_i + n_j) + r_g (m + n)``
    parameters. Fitted by alternating exact steps (:func:`fit_hybrid`); the
    error never increases from one step to the next (``error_trace_``).

    Codes: a row in block-row ``i`` has ``r_g`` global codes followed by the
    codes of each active block of its block-row (see
    :mod:`blocklowrank.estimators`).

    Parameters
    ----------
    n_blocks : int or (int, int), default=1
        ``K`` or ``(K_rows, K_cols)``; "diagonal" needs a square grid.
    rank : int or array-like of shape (K_rows, K_cols), default=1
        Rank of every active block, or per block.
    global_rank : int, default=1
        Rank ``r_g`` of the global term (0: the plain block structure).
    pattern : {"full", "diagonal"}, default="full"
    max_iter : int, default=100
        Largest number of alternations, the initial pass included.
    tol : float, default=1e-6
        Stopping tolerance: stop when an alternation improves the relative
        error by a fraction ``<= tol``.
    first_step : {"global", "blocks"}, default="global"
        Which part is fitted first, on X itself.
    svd_solver, n_oversamples, iterated_power, random_state, n_jobs
        For every truncated SVD (see :func:`blocklowrank.approximate`); the
        monotone-error guarantee needs the exact solver."""
        + damping_doc("fit_hybrid")
        + """
    Attributes
    ----------
    factors_ : StructuredFactors
        Blocks and global term (``factors_.global_factors`` is ``(B_g, A_g)``).
    n_params_ : int
        ``sum_ij r_ij (m_i + n_j) + r_g (m + n)`` = ``factors_.n_params``;
        ``layout_.n_params`` counts the block part only.
    error_ : float
    output_error_ : float
        Relative output error in the data metric of the fit; ``error_`` without one.
    error_trace_ : ndarray
        Relative error after each accepted step; non-increasing (in a data
        metric: the damped relative output error).
    n_iter_ : int
        Alternations run, the initial pass included.
    stop_reason_ : str
    ranks_ : ndarray of int, shape (K_rows, K_cols)
    layout_ : BlockLayout
        The block part.
    n_codes_, n_samples_fit_, n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Defined only when X has feature names that are all strings.

    See Also
    --------
    BlockLowRank : the block part alone (``global_rank=0``).

    References
    ----------
    .. [1] Jung et al., "GraLoRA: Granular Low-Rank Adaptation for
       Parameter-Efficient Fine-Tuning", arXiv:2505.20355, 2025.

    Examples
    --------
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> est = HybridLowRank(n_blocks=2, rank=1, global_rank=2).fit(X)
    >>> est.n_params_, est.fit_transform(X).shape
    (224, (28, 4))
    """
    )

    def __init__(
        self, *, n_blocks=1, rank=1, global_rank=1, pattern="full", max_iter=100, tol=1e-6, first_step="global",
        svd_solver="auto", n_oversamples=10, iterated_power="auto", random_state=None, n_jobs=None,
        gram_damping=None,
    ):  # fmt: skip
        _set_params(self, locals())

    def _grid(self):
        kr, kc = _normalize_n_blocks(self.n_blocks)
        if self.pattern == "diagonal" and kr != kc:
            raise ValueError(f"pattern='diagonal' needs a square grid, got n_blocks={self.n_blocks!r}")
        return kr, kc

    def _fit_structure(self, X, **metric):
        params = {k: getattr(self, k) for k in ("n_blocks", "rank", "global_rank", "pattern", *_OPTIONS)}
        return _fit(X, **params, **metric)


_OPTIONS = ("max_iter", "tol", "first_step", *SVD_OPTIONS)


@validate_params("n_blocks", "rank", "pattern")
def _fit(X, *, n_blocks=1, rank, global_rank, pattern="full", **options):
    X = validate_matrix(X)
    lay = _block_layout(X.shape[-2:], n_blocks, pattern)
    lay = lay.with_ranks(rank)
    return fit_hybrid(X, lay, global_rank, **options)


register(
    Structure(
        name="hybrid", label="Hybrid GraLoRA", summary="K x K blocks B_ij A_ij plus a global term B_g A_g",
        layout=lambda shape, n_blocks=1: _block_layout(shape, n_blocks), count=hybrid_params,
        budget_rule=HybridBudget(), fit=_fit, estimator=HybridLowRank,
        extra=("global_rank",), peft="GRALORA", options=_OPTIONS, metric=True,
    )
)  # fmt: skip

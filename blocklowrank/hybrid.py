"""Hybrid structure: a block layout (full K x K or diagonal) plus a global low-rank term.

``X ~ B_g A_g + P`` where ``B_g A_g`` has rank ``r_g`` over the whole matrix
and ``P`` carries a rank-``r_ij`` factorisation ``B_ij A_ij`` on every active
block of a :class:`~blocklowrank.layout.BlockLayout`. This is the structure
of GraLoRA's ``hybrid_r`` (a GraLoRA adapter plus a vanilla LoRA adapter).
Parameters: ``sum_ij r_ij (m_i + n_j) + r_g (m + n)``.

Functional core :func:`fit_hybrid`; estimator :class:`HybridLowRank`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import validate_data

from ._engine import approximate, validate_matrix
from ._factors import STEP_TOL, LinearCodesBase, assemble_block_factors
from .layout import BlockLayout, _check_int, _normalize_n_blocks

__all__ = [
    "fit_hybrid",
    "HybridFit",
    "HybridLowRank",
    "hybrid_params",
    "hybrid_ranks_for_budget",
]

INITS = ("global", "blocks")


# ---------------------------------------------------------------------------- counting
def hybrid_params(shape, n_blocks, rank, global_rank, *, pattern="full"):
    """Exact parameter count of a hybrid structure.

    ``sum over active blocks of r_ij (m_i + n_j)  +  r_g (m + n)``.

    Parameters
    ----------
    shape : (int, int)
    n_blocks : int or (int, int)
    rank : int or array-like of shape (K_rows, K_cols)
        Rank of every active block, or per block.
    global_rank : int
        Rank ``r_g >= 0`` of the global term.
    pattern : {"full", "diagonal"}, default="full"

    Returns
    -------
    n_params : int

    Examples
    --------
    >>> hybrid_params((28, 28), 2, rank=1, global_rank=2)
    224
    >>> hybrid_params((256, 256), 4, rank=1, global_rank=0, pattern="diagonal")
    512
    """
    lay = BlockLayout.from_blocks(shape, n_blocks, rank=rank, pattern=pattern)
    r_g = _check_int(global_rank, "global_rank", minimum=0)
    m, n = lay.shape
    return int(lay.n_params + r_g * (m + n))


def hybrid_ranks_for_budget(shape, n_blocks, budget, *, global_share=0.5, pattern="full"):
    """Uniform block rank and global rank whose hybrid fits in ``budget`` parameters.

    About ``global_share`` of the budget goes to the global term; the rest
    buys the largest uniform block rank (at least 1). The global rank is
    lowered until a block rank of 1 fits.

    Returns
    -------
    rank, global_rank : int, int

    Examples
    --------
    >>> hybrid_ranks_for_budget((28, 28), 2, 224)
    (1, 2)
    >>> r, rg = hybrid_ranks_for_budget((256, 256), 2, 8192)
    >>> hybrid_params((256, 256), 2, r, rg) <= 8192
    True
    """
    lay = BlockLayout.from_blocks(shape, n_blocks, pattern=pattern)
    m, n = lay.shape
    budget = _check_int(budget, "budget", minimum=1)
    if not (isinstance(global_share, numbers.Real) and 0 <= global_share <= 1):
        raise ValueError(f"global_share must be in [0, 1], got {global_share!r}")
    unit = int(lay.block_costs.sum())  # cost of rank 1 on every active block
    if budget < unit:
        raise ValueError(
            f"budget={budget} is below the cost of rank 1 on every active block ({unit})"
        )
    r_g = min(int(global_share * budget) // (m + n), min(m, n))
    while r_g > 0 and budget - r_g * (m + n) < unit:
        r_g -= 1
    rank = (budget - r_g * (m + n)) // unit
    rank = max(1, min(rank, int(lay.max_ranks[lay.active].min())))
    return int(rank), int(r_g)


# ---------------------------------------------------------------------------- result
@dataclass(eq=False)
class HybridFit:
    """Result of :func:`fit_hybrid`.

    Attributes
    ----------
    layout : BlockLayout
        The block part (cuts, active blocks, ranks).
    global_rank : int
    factors : dict
        ``{(i, j): (B_ij, A_ij)}`` of the block part.
    global_factors : (ndarray, ndarray)
        ``(B_g, A_g)``, shapes ``(m, r_g)`` and ``(r_g, n)``.
    error : float
        Relative Frobenius error of the returned factors.
    error_trace : ndarray
        Relative error after every accepted step (see :func:`fit_hybrid`).
    n_iter : int
        Alternations run (one global and one block step each), the initial
        pass included; 1 when one part is empty.
    stop_reason : str
        "tol", "max_iter", "increase" (a step would have increased the
        error beyond rounding and was discarded; only possible with the
        randomized solver) or "exact" (one part is empty, one step is the
        optimum).
    n_params : int
        Per matrix.
    batch_shape : tuple
        ``()`` for one matrix; for a stack ``X`` of shape ``(..., m, n)``,
        ``X.shape[:-2]``: every factor, ``error``, ``n_iter`` and
        ``stop_reason`` then carry these leading dimensions, and
        ``error_trace`` is ``(..., longest trace)``, NaN past each matrix's
        own last entry.
    """

    layout: BlockLayout
    global_rank: int
    factors: dict
    global_factors: tuple
    error: object
    error_trace: np.ndarray
    n_iter: object
    stop_reason: object
    n_params: int
    dtype: np.dtype
    batch_shape: tuple = ()
    _reconstruction: object = field(default=None, repr=False)

    @property
    def reconstruction(self):
        """Dense approximation ``B_g A_g + sum_blocks B_ij A_ij`` (cached)."""
        if self._reconstruction is None:
            P = assemble_block_factors(self.layout, self.factors, np.float64, batch=self.batch_shape)
            Bg, Ag = self.global_factors
            if Bg.shape[-1]:
                P += Bg.astype(np.float64) @ Ag.astype(np.float64)
            self._reconstruction = P.astype(self.dtype, copy=False)
        return self._reconstruction

    def decoders(self):
        """Per block-row decoders ``D_i``, stacked as ``(K_rows, n_codes, n)``.

        Rows ``0..r_g-1`` are ``A_g``; then, for each active block ``(i, j)``
        in column order, the rows of ``A_ij`` placed at block-column ``j``'s
        columns; zero rows pad block-rows with fewer codes.
        """
        return _decoders(self.layout, self.global_factors[1], self.factors, np.float64)


def _decoders(layout, A_g, factors, dtype):
    """Decoders (..., K_rows, n_codes, n) from A_g (..., r_g, n) and the block factors."""
    kr, _ = layout.n_blocks
    batch = A_g.shape[:-2]
    r_g = A_g.shape[-2]
    n = layout.shape[1]
    c = r_g + int(layout.ranks.sum(axis=1).max())
    D = np.zeros(batch + (kr, max(c, 1), n), dtype=dtype)
    D[..., :r_g, :] = A_g[..., None, :, :]
    for (i, j), (_, A) in factors.items():
        r = A.shape[-2]
        if r == 0:
            continue
        off = r_g + int(layout.ranks[i, :j].sum())
        D[..., i, off : off + r, layout.block_slice(i, j)[1]] = A
    return D


def _split_codes(layout, Z_rows, r_g):
    """Codes (..., m, c) -> (B_g, {(i, j): B_ij}) following the decoder order."""
    B_g = Z_rows[..., :r_g].copy()
    out = {}
    for i, j in zip(*np.nonzero(layout.active)):
        i, j = int(i), int(j)
        r = int(layout.ranks[i, j])
        off = r_g + int(layout.ranks[i, :j].sum())
        out[(i, j)] = Z_rows[..., layout.block_slice(i, j)[0], off : off + r].copy()
    return B_g, out


def _codes_from_factors(layout, B_g, factors, n_codes, dtype):
    m = layout.shape[0]
    r_g = B_g.shape[1]
    Z = np.zeros((m, n_codes), dtype=dtype)
    Z[:, :r_g] = B_g
    for (i, j), (B, _) in factors.items():
        r = B.shape[1]
        if r == 0:
            continue
        off = r_g + int(layout.ranks[i, :j].sum())
        Z[layout.block_slice(i, j)[0], off : off + r] = B
    return Z


# ---------------------------------------------------------------------------- core
def fit_hybrid(
    X,
    layout,
    global_rank,
    *,
    max_iter=100,
    tol=1e-6,
    init="global",
    svd_solver="auto",
    n_oversamples=10,
    n_iter="auto",
    random_state=None,
):
    """Fit blocks plus a global low-rank term by alternating exact steps.

    Minimises ``||X - B_g A_g - P||_F`` over a rank-``r_g`` global term and
    a block term ``P`` with the ranks of ``layout``.

    Algorithm (block-coordinate descent, every step an exact minimisation):

    1. global step: ``B_g A_g`` = truncated SVD of ``X - P`` (Eckart-Young);
    2. block step: ``P`` = per-block truncated SVDs of ``X - B_g A_g``
       (:func:`~blocklowrank.approximate` with ``layout``; the blocks are
       disjoint, so this is the exact minimiser over ``P``);

    starting with step 1 on ``X`` (``init="global"``) or step 2 on ``X``
    (``init="blocks"``), alternating until the relative improvement of one
    alternation is ``<= tol`` or ``max_iter`` alternations. A last step
    refits all left factors (``B_g`` and every ``B_ij``) jointly given the
    right factors: for each block-row ``i`` this is the least-squares problem
    ``X_i ~ Z_i D_i`` with the decoder ``D_i`` stacking ``A_g`` and the
    ``A_ij`` (solved with ``pinv(D_i)``), so the returned codes are the
    least-squares codes and :meth:`HybridLowRank.transform` of the fitted X
    reproduces them.

    **The error trace never increases.** Each step minimises the error
    exactly over its variables with the others fixed, and the previous
    iterate is feasible for that step, so the error cannot go up (in exact
    arithmetic). Numerically, a step may raise the relative error by at most
    ``1e-12`` (rounding; ``STEP_TOL``): a step that would raise it by more
    is discarded and iteration stops with ``stop_reason="increase"``. With
    the exact solver this does not happen (tested); with the randomized
    solver a step is not an exact minimisation and can be discarded.

    Parameters
    ----------
    X : array-like of shape (m, n) or (..., m, n)
        float32 stays float32 in the results (computation is in float64). A
        stack is fitted in one alternation: every step is one batched
        :func:`~blocklowrank.approximate` call on the matrices still running,
        and each matrix keeps its own trace, stopping rule and monotone
        guarantee, so with the exact solver its result is that of fitting it
        alone (to rounding; with the randomized solver the random draws
        depend on the stack).
    layout : BlockLayout
        Block part with its ranks (may have no ranks if ``global_rank > 0``).
    global_rank : int
        ``r_g >= 0``; 0 gives the plain block structure (one step).
    max_iter : int, default=100
        Largest number of alternations, the initial pass included.
    tol : float, default=1e-6
        Stop when an alternation improves the relative error by a fraction
        ``<= tol`` of its value (0 runs until no improvement or max_iter).
    init : {"global", "blocks"}, default="global"
        Which step runs first (on X itself). With "global" the first trace
        entry is the error of the global term alone, so the result is never
        worse than global LoRA of rank ``r_g``; with "blocks" never worse
        than the block structure alone.
    svd_solver, n_oversamples, n_iter, random_state
        Passed to :func:`~blocklowrank.approximate` for every step.

    Returns
    -------
    HybridFit
        For a stack, with arrays over the leading dimensions.

    Examples
    --------
    >>> import numpy as np
    >>> from blocklowrank import BlockLayout
    >>> from blocklowrank.hybrid import fit_hybrid
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> res = fit_hybrid(X, BlockLayout.block((28, 28), 2, rank=1), global_rank=2)
    >>> res.n_params
    224
    >>> bool(np.all(np.diff(res.error_trace) <= 1e-12))
    True
    >>> bool(np.isclose(res.error, np.linalg.norm(X - res.reconstruction) / np.linalg.norm(X)))
    True

    A stack, each matrix as if fitted alone:

    >>> S = np.random.default_rng(1).standard_normal((20, 28, 28))
    >>> lay = BlockLayout.block((28, 28), 2, rank=1)
    >>> batch = fit_hybrid(S, lay, global_rank=2)
    >>> batch.error.shape, batch.global_factors[0].shape
    ((20,), (20, 28, 2))
    >>> bool(np.isclose(batch.error[3], fit_hybrid(S[3], lay, 2).error))
    True
    """
    X = validate_matrix(X)
    dtype = X.dtype
    batch = X.shape[:-2]
    m, n = X.shape[-2:]
    Xd = np.asarray(X, dtype=np.float64).reshape((-1, m, n))
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if tuple(layout.shape) != (m, n):
        raise ValueError(f"layout is for shape {layout.shape} but X has shape {(m, n)}")
    r_g = _check_int(global_rank, "global_rank", minimum=0)
    if r_g > min(m, n):
        raise ValueError(
            f"global_rank={r_g} exceeds min(m, n) = {min(m, n)} for X of shape {(m, n)}"
        )
    has_blocks = layout.n_params > 0
    if r_g == 0 and not has_blocks:
        raise ValueError("both parts are empty: give global_rank >= 1 or a layout with ranks")
    max_iter = _check_int(max_iter, "max_iter", minimum=1)
    if not isinstance(tol, numbers.Real) or isinstance(tol, bool) or not tol >= 0:
        raise ValueError(f"tol must be a float >= 0, got {tol!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    from sklearn.utils import check_random_state

    rng = check_random_state(random_state)
    svd_kw = dict(svd_solver=svd_solver, n_oversamples=n_oversamples, n_iter=n_iter, random_state=rng)
    res = _hybrid_stack(Xd, layout, r_g, max_iter, tol, init, svd_kw)
    B_g, A_g, factors, approx, err, trace, n_done, stop = res

    cast = lambda a: np.ascontiguousarray(a, dtype=dtype)  # noqa: E731

    def shaped(a):
        return cast(a.reshape(batch + a.shape[1:]))

    width = int(np.sum(~np.isnan(trace), axis=1).max())
    if batch:
        error, n_iter_out, stop_out = err.reshape(batch), n_done.reshape(batch), stop.reshape(batch)
        error_trace = trace[:, :width].reshape(batch + (width,))
    else:
        error, n_iter_out, stop_out = float(err[0]), int(n_done[0]), str(stop[0])
        error_trace = trace[0, :width]
    return HybridFit(
        layout=layout,
        global_rank=r_g,
        factors={k: (shaped(B), shaped(A)) for k, (B, A) in factors.items()},
        global_factors=(shaped(B_g), shaped(A_g)),
        error=error,
        error_trace=error_trace,
        n_iter=n_iter_out,
        stop_reason=stop_out,
        n_params=int(layout.n_params + r_g * (m + n)),
        dtype=dtype,
        batch_shape=batch,
        _reconstruction=shaped(approx),
    )


def _hybrid_stack(Xd, layout, r_g, max_iter, tol, init, svd_kw):
    """The alternation of :func:`fit_hybrid` on a stack Xd (N, m, n), matrix by matrix.

    Every step is one :func:`~blocklowrank.approximate` call on the matrices still
    running (a batched SVD); each matrix keeps its own trace and stopping rule, so
    its result is that of fitting it alone. Returns ``(B_g, A_g, factors, approx,
    error, trace, n_done, stop)`` with a leading axis of length N.
    """
    N, m, n = Xd.shape
    has_blocks = layout.n_params > 0
    glob_layout = BlockLayout.global_((m, n), r_g) if r_g else None
    sq_x = np.einsum("nab,nab->n", Xd, Xd)

    def rel_err(idx, G, P):
        R = Xd[idx] - G - P
        sq = np.einsum("nab,nab->n", R, R)
        tot = sq_x[idx]
        return np.where(tot > 0, np.sqrt(sq / np.where(tot > 0, tot, 1.0)), 0.0)

    # state: dense parts and factors of every matrix
    G = np.zeros((N, m, n))
    P = np.zeros((N, m, n))
    gf = [np.zeros((N, m, r_g)), np.zeros((N, r_g, n))]
    bf = {
        (int(i), int(j)): [
            np.zeros((N, layout.row_sizes[i], int(layout.ranks[i, j]))),
            np.zeros((N, int(layout.ranks[i, j]), layout.col_sizes[j])),
        ]
        for i, j in zip(*np.nonzero(layout.active))
    }

    def step(which, idx):
        """Candidate (dense part, factors) of one step for the matrices idx."""
        if which == "global":
            a = approximate(Xd[idx] - P[idx], glob_layout, **svd_kw)
            return a.reconstruction, {"g": a.factors[(0, 0)]}
        a = approximate(Xd[idx] - G[idx], layout, **svd_kw)
        return a.reconstruction, a.factors

    def accept(which, idx, dense, facs, sel):
        """Store the candidate of step ``which`` for the matrices idx[sel]."""
        ids = idx[sel]
        if which == "global":
            G[ids] = dense[sel]
            B, A = facs["g"]
            gf[0][ids], gf[1][ids] = B[sel], A[sel]
        else:
            P[ids] = dense[sel]
            for k, (B, A) in facs.items():
                if k in bf and bf[k][0].shape[-1]:
                    r = bf[k][0].shape[-1]
                    bf[k][0][ids] = B[sel][..., :r]
                    bf[k][1][ids] = A[sel][..., :r, :]

    width = 3 + 2 * max(max_iter - 1, 0)
    trace = np.full((N, width), np.nan)
    tl = np.zeros(N, dtype=np.int64)  # trace length of every matrix
    n_done = np.ones(N, dtype=np.int64)
    stop = np.full(N, "max_iter", dtype="<U8")
    everyone = np.arange(N)
    allsel = np.ones(N, dtype=bool)

    def record(ids, e):
        trace[ids, tl[ids]] = e
        tl[ids] += 1

    if not has_blocks or r_g == 0:
        which = "blocks" if has_blocks else "global"
        dense, facs = step(which, everyone)
        accept(which, everyone, dense, facs, allsel)
        record(everyone, rel_err(everyone, G, P))
        stop[:] = "exact"
    else:
        order = ("global", "blocks") if init == "global" else ("blocks", "global")
        for which in order:  # initial pass: each part once, on every matrix
            dense, facs = step(which, everyone)
            accept(which, everyone, dense, facs, allsel)
            record(everyone, rel_err(everyone, G, P))
        active = everyone
        for _ in range(max_iter - 1):
            before = trace[active, tl[active] - 1]
            done = before <= STEP_TOL
            if done.any():
                stop[active[done]] = "tol"
                active, before = active[~done], before[~done]
            if active.size == 0:
                break
            increased = np.zeros(active.size, dtype=bool)
            for which in order:
                sub = active[~increased]
                if sub.size == 0:
                    break
                dense, facs = step(which, sub)
                if which == "global":
                    e = rel_err(sub, dense, P[sub])
                else:
                    e = rel_err(sub, G[sub], dense)
                up = e > trace[sub, tl[sub] - 1] + STEP_TOL
                accept(which, sub, dense, facs, ~up)
                record(sub[~up], e[~up])
                increased[np.flatnonzero(~increased)[up]] = True
            stop[active[increased]] = "increase"
            good, before = active[~increased], before[~increased]
            n_done[good] += 1
            conv = (before - trace[good, tl[good] - 1]) <= tol * before
            stop[good[conv]] = "tol"
            active = good[~conv]
            if active.size == 0:
                break

    # final exact step: least-squares refit of all left factors given the right ones
    A_g = gf[1]
    D = _decoders(layout, A_g, {k: (B, A) for k, (B, A) in bf.items()}, np.float64)  # (N, kr, c, n)
    E = np.linalg.pinv(D)  # (N, kr, n, c)
    edges = layout.row_edges
    Z = np.empty((N, m, D.shape[-2]))
    for i in range(layout.n_blocks[0]):
        Z[:, edges[i] : edges[i + 1]] = Xd[:, edges[i] : edges[i + 1]] @ E[:, i]
    B_g, Bs = _split_codes(layout, Z, r_g)
    factors = {k: (Bs[k], bf[k][1]) for k in bf}
    approx = assemble_block_factors(layout, factors, np.float64, batch=(N,))
    if r_g:
        approx += B_g @ A_g
    err = rel_err(everyone, approx, 0.0)
    record(everyone, err)
    return B_g, A_g, factors, approx, err, trace, n_done, stop


# ---------------------------------------------------------------------------- estimator
class HybridLowRank(LinearCodesBase):
    """Block low-rank plus a global low-rank term (GraLoRA ``hybrid_r`` structure).

    ``X ~ B_g A_g + P``: a rank-``global_rank`` term over the whole matrix
    plus a rank-``rank`` factorisation on every active block of a
    ``K_rows x K_cols`` grid (``pattern="full"``: Localized LoRA / GraLoRA;
    ``"diagonal"``: MELoRA). ``sum_ij r (m_i + n_j) + r_g (m + n)``
    parameters, counted exactly (:func:`hybrid_params`). Fitted by
    alternating exact steps (:func:`fit_hybrid`); the error never increases
    from one step to the next (``error_trace_``; up to 1e-12 of rounding).

    Codes. A row ``x`` in block-row ``i`` has the codes ``[z_g, z_i1, ...,
    z_iK]``: ``r_g`` global codes followed by the ``r_ij`` codes of each
    active block of its block-row (column order), zero-padded to
    ``n_codes_ = r_g + max_i sum_j r_ij``. Decoding is ``z_g A_g + sum_j
    z_ij A_ij`` (placed at block-column ``j``). :meth:`transform` returns
    the least-squares codes; for the fitted rows these are the rows of
    ``B_g`` and ``B_ij`` (the fit ends with that least-squares step), so
    ``reconstruct(fit_transform(X))`` is the fitted approximation.

    Parameters
    ----------
    n_blocks : int or (int, int), default=2
        ``K`` (a K x K grid) or ``(K_rows, K_cols)``; "diagonal" needs a
        square grid.
    rank : int or array-like of shape (K_rows, K_cols), default=1
        Rank of every active block, or per block.
    global_rank : int, default=1
        Rank ``r_g`` of the global term (0: the plain block structure).
    pattern : {"full", "diagonal"}, default="full"
    max_iter : int, default=100
        Largest number of alternations (one global + one block step), the
        initial pass included.
    tol : float, default=1e-6
        Stop when an alternation improves the relative error by a fraction
        ``<= tol`` (a convergence tolerance, not a target error).
    init : {"global", "blocks"}, default="global"
        Which part is fitted first, on X itself.
    svd_solver : {"auto", "full", "randomized"}, default="auto"
        Solver of every truncated SVD (see :func:`blocklowrank.approximate`).
        The monotone-error guarantee needs the exact solver ("full", or
        "auto" for blocks below 512 on their smaller side).
    n_oversamples : int, default=10
    n_iter : int or "auto", default="auto"
    random_state : int, RandomState instance or None, default=None
        Seeds the randomized solver.

    Attributes
    ----------
    n_params_ : int
        ``sum_ij r_ij (m_i + n_j) + r_g (m + n)``.
    error_ : float
        Relative Frobenius error on the fitted X.
    error_trace_ : ndarray
        Relative error after each accepted step; non-increasing.
    n_iter_ : int
        Alternations run, the initial pass included.
    stop_reason_ : str
        Why the alternation stopped (see :class:`HybridFit`).
    ranks_ : ndarray of int, shape (K_rows, K_cols)
        Block ranks (0 where inactive).
    global_rank_ : int
    factors_ : dict
        ``{(i, j): (B_ij, A_ij)}`` of the block part.
    global_factors_ : (ndarray, ndarray)
        ``(B_g, A_g)`` of shapes ``(m, r_g)`` and ``(r_g, n)``.
    layout_ : BlockLayout
        The block part (its ``n_params`` excludes the global term).
    n_codes_ : int
    n_samples_fit_ : int
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Defined only when X has feature names that are all strings.

    See Also
    --------
    BlockLowRank : the block part alone (``global_rank=0``).
    GlobalLowRank : the global part alone.
    SharedBasisLowRank : blocks with bases shared along block-rows/columns.

    Notes
    -----
    With several block-rows, a row's codes depend on which block-row it is
    in, so :meth:`transform` needs exactly the fitted number of rows.

    References
    ----------
    .. [1] Jung et al., "GraLoRA: Granular Low-Rank Adaptation for
       Parameter-Efficient Fine-Tuning", arXiv:2505.20355, 2025 (Hybrid
       GraLoRA).

    Examples
    --------
    >>> import numpy as np
    >>> from blocklowrank.hybrid import HybridLowRank
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> est = HybridLowRank(n_blocks=2, rank=1, global_rank=2).fit(X)
    >>> est.n_params_
    224
    >>> bool(np.all(np.diff(est.error_trace_) <= 1e-12))
    True
    >>> Z = est.fit_transform(X)
    >>> Z.shape
    (28, 4)
    >>> bool(np.allclose(est.reconstruct(Z), est.reconstruct()))
    True
    """

    _parameter_constraints: dict = {
        "n_blocks": [Interval(Integral, 1, None, closed="left"), "array-like"],
        "rank": [Interval(Integral, 1, None, closed="left"), "array-like"],
        "global_rank": [Interval(Integral, 0, None, closed="left")],
        "pattern": [StrOptions({"full", "diagonal"})],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "init": [StrOptions(set(INITS))],
        "svd_solver": [StrOptions({"auto", "full", "randomized"})],
        "n_oversamples": [Interval(Integral, 0, None, closed="left")],
        "n_iter": [Interval(Integral, 0, None, closed="left"), StrOptions({"auto"})],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        *,
        n_blocks=2,
        rank=1,
        global_rank=1,
        pattern="full",
        max_iter=100,
        tol=1e-6,
        init="global",
        svd_solver="auto",
        n_oversamples=10,
        n_iter="auto",
        random_state=None,
    ):
        self.n_blocks = n_blocks
        self.rank = rank
        self.global_rank = global_rank
        self.pattern = pattern
        self.max_iter = max_iter
        self.tol = tol
        self.init = init
        self.svd_solver = svd_solver
        self.n_oversamples = n_oversamples
        self.n_iter = n_iter
        self.random_state = random_state

    def _n_blocks_pair(self):
        kr, kc = _normalize_n_blocks(self.n_blocks)
        if self.pattern == "diagonal" and kr != kc:
            raise ValueError(f"pattern='diagonal' needs a square grid, got n_blocks={self.n_blocks!r}")
        return kr, kc

    def _fit(self, X):
        self._validate_params()
        X = self._validate_X(X, reset=True)
        self._check_grid(X.shape)
        layout = BlockLayout.from_blocks(
            X.shape, self._n_blocks_pair(), rank=self.rank, pattern=self.pattern
        )
        if self.global_rank > min(X.shape):
            raise ValueError(
                f"global_rank={self.global_rank} exceeds min(n_samples, n_features) = "
                f"{min(X.shape)} for X of shape {X.shape}"
            )
        res = fit_hybrid(
            X,
            layout,
            self.global_rank,
            max_iter=self.max_iter,
            tol=self.tol,
            init=self.init,
            svd_solver=self.svd_solver,
            n_oversamples=self.n_oversamples,
            n_iter=self.n_iter,
            random_state=self.random_state,
        )
        self.layout_ = res.layout
        self.ranks_ = res.layout.ranks.copy()
        self.global_rank_ = res.global_rank
        self.factors_ = res.factors
        self.global_factors_ = res.global_factors
        self.n_params_ = res.n_params
        self.error_ = res.error
        self.error_trace_ = res.error_trace
        self.n_iter_ = res.n_iter
        self.stop_reason_ = res.stop_reason
        self._result = res
        D = res.decoders()
        Z = _codes_from_factors(res.layout, res.global_factors[0], res.factors, D.shape[1], X.dtype)
        self._store_codes(np.linalg.pinv(D), D, Z, res.reconstruction, X.dtype)
        return self._fit_codes

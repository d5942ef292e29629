"""Block low rank with shared bases (BLAST; Lee et al., NeurIPS 2024).

The matrix is cut into a ``K_rows x K_cols`` grid and block ``(i, j)`` is
``U_i diag(s_ij) V_j^T``: the left basis ``U_i`` (``m_i x r``) is shared by
every block of block-row ``i``, the right basis ``V_j`` (``n_j x r``) by
every block of block-column ``j``, and only the ``r`` diagonal couplings
``s_ij`` are specific to a block. Parameters:
``r (m + n) + r K_rows K_cols``.

Functional core :func:`fit_shared_basis`; estimator :class:`SharedBasisLowRank`.

Implementation: blocks are handled as one zero-padded tensor of shape
``(K_rows, K_cols, max m_i, max n_j)`` so that every step is a handful of
einsums and batched ``r x r`` solves, without a Python loop over blocks.
Padded rows of ``U_i`` / ``V_j`` stay exactly zero (their rows of the data
are zero), so padding does not change the problem.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import validate_data

from ._engine import _resolve_n_jobs, _run_chunked, batched_svd, validate_matrix
from ._factors import STEP_TOL, LinearCodesBase, psd_solve, spd_solve  # noqa: F401
from .layout import BlockLayout, _check_int, _normalize_n_blocks

__all__ = [
    "fit_shared_basis",
    "SharedBasisFit",
    "SharedBasisLowRank",
    "shared_basis_params",
    "shared_basis_rank_for_budget",
]

INITS = ("svd", "random")


# ---------------------------------------------------------------------------- counting
def shared_basis_params(shape, n_blocks, rank):
    """Exact parameter count ``r (m + n) + r K_rows K_cols`` of the shared-basis structure.

    ``r (m + n)`` for the bases ``U_i``, ``V_j`` and ``r`` couplings per block.

    Examples
    --------
    >>> shared_basis_params((28, 28), 2, 3)
    180
    >>> shared_basis_params((256, 256), 4, 15)
    7920
    """
    m, n = _shape(shape)
    kr, kc = _normalize_n_blocks(n_blocks)
    r = _check_int(rank, "rank", minimum=0)
    return int(r * (m + n) + r * kr * kc)


def shared_basis_rank_for_budget(shape, n_blocks, budget):
    """Largest rank ``r`` with ``shared_basis_params(shape, n_blocks, r) <= budget``.

    Capped at the smallest block side (0 if even rank 1 does not fit).

    Examples
    --------
    >>> shared_basis_rank_for_budget((28, 28), 2, 224)
    3
    """
    m, n = _shape(shape)
    kr, kc = _normalize_n_blocks(n_blocks)
    budget = _check_int(budget, "budget", minimum=0)
    lay = BlockLayout.from_blocks((m, n), (kr, kc))
    cap = min(min(lay.row_sizes), min(lay.col_sizes))
    return int(min(budget // (m + n + kr * kc), cap))


def _shape(shape):
    try:
        m, n = shape
    except (TypeError, ValueError):
        raise ValueError(f"shape must be a pair (m, n), got {shape!r}") from None
    return _check_int(m, "shape[0]", minimum=1), _check_int(n, "shape[1]", minimum=1)


# ---------------------------------------------------------------------------- result
@dataclass(eq=False)
class SharedBasisFit:
    """Result of :func:`fit_shared_basis` (one matrix or a stack).

    For a stack ``X`` of shape ``(..., m, n)`` every array below gains the
    leading dimensions ``batch_shape = X.shape[:-2]``; each matrix of the
    stack has its own fit, its own stopping sweep and its own trace.

    Attributes
    ----------
    layout : BlockLayout
        The grid (full pattern, nominal rank ``r`` on every block). Its
        ``n_params`` counts independent per-block factors, *not* this
        structure; use :attr:`n_params`.
    rank : int
    U : list of ndarray
        ``U_i``, shape ``(..., m_i, r)``: the least-squares codes of the rows
        of block-row ``i`` (the last step of the fit).
    V : list of ndarray
        ``V_j``, shape ``(..., n_j, r)``, columns of unit norm.
    S : ndarray of shape (..., K_rows, K_cols, r)
        Couplings ``s_ij``.
    error : float or ndarray of shape (...)
    error_trace : ndarray of shape (n_passes,) or (..., max n_passes)
        Relative error after the initialisation and after every sweep; for a
        stack, entries past a matrix's own last pass are NaN.
    n_iter : int or ndarray of int
        Passes run, the initialisation counted as the first.
    stop_reason : str or ndarray of str
        "tol", "max_iter" or "increase" (a sweep would have raised the
        error beyond rounding; it is discarded).
    n_params : int
        Per matrix.
    batch_shape : tuple
        ``()`` for one matrix.
    """

    layout: BlockLayout
    rank: int
    U: list
    V: list
    S: np.ndarray
    error: object
    error_trace: np.ndarray
    n_iter: object
    stop_reason: object
    n_params: int
    dtype: np.dtype
    batch_shape: tuple = ()
    _reconstruction: object = field(default=None, repr=False)

    @property
    def factors(self):
        """``{(i, j): (B_ij, A_ij)}`` with ``B_ij = U_i diag(s_ij)`` and ``A_ij = V_j^T``."""
        return {
            (i, j): (
                self.U[i] * self.S[..., i, j, None, :],
                np.ascontiguousarray(np.swapaxes(self.V[j], -1, -2)),
            )
            for i in range(len(self.U))
            for j in range(len(self.V))
        }

    @property
    def reconstruction(self):
        """Dense approximation, shape ``(..., m, n)`` (cached)."""
        if self._reconstruction is None:
            self._reconstruction = _dense(self.layout, self.U, self.V, self.S, self.dtype)
        return self._reconstruction

    def decoders(self):
        """Per block-row decoders ``W_i = [diag(s_i1) V_1^T, ..., diag(s_iK) V_K^T]``,
        stacked as ``(..., K_rows, r, n)``; the codes of a row of block-row ``i`` are
        its row of ``U_i``."""
        kr = len(self.U)
        n = self.layout.shape[1]
        W = np.zeros(self.batch_shape + (kr, self.rank, n), dtype=np.float64)
        for j, V in enumerate(self.V):
            cs = self.layout.block_slice(0, j)[1]
            Vt = np.swapaxes(np.asarray(V, np.float64), -1, -2)  # (..., r, n_j)
            W[..., cs] = self.S[..., :, j, :, None] * Vt[..., None, :, :]
        return W

    def __repr__(self):
        err = f"{self.error:.6g}" if not self.batch_shape else f"array{self.batch_shape}"
        kr, kc = self.layout.n_blocks
        return f"SharedBasisFit({kr}x{kc} blocks, rank={self.rank}, n_params={self.n_params}, error={err})"


def _dense(layout, U, V, S, dtype):
    batch = S.shape[:-3]
    out = np.zeros(batch + layout.shape, dtype=np.float64)
    for i, Ui in enumerate(U):
        for j, Vj in enumerate(V):
            rs, cs = layout.block_slice(i, j)
            Bij = np.asarray(Ui, np.float64) * S[..., i, j, None, :]
            out[..., rs, cs] = Bij @ np.swapaxes(np.asarray(Vj, np.float64), -1, -2)
    return out.astype(dtype, copy=False)


# ---------------------------------------------------------------------------- padded tensors
# Every helper takes any number of leading (stack) dimensions: T is (..., K_rows, K_cols,
# mb, nb), U (..., K_rows, mb, r), V (..., K_cols, nb, r), S (..., K_rows, K_cols, r).
# Products of blocks are stacked matmuls (numpy runs them without a Python loop); the
# r x r normal equations go to spd_solve, vectorised over the whole stack.
def _pad(X, layout):
    """X (..., m, n) -> T of shape (..., K_rows, K_cols, mb, nb), zero-padded blocks."""
    kr, kc = layout.n_blocks
    mb, nb = max(layout.row_sizes), max(layout.col_sizes)
    batch = X.shape[:-2]
    T = np.zeros(batch + (kr, kc, mb, nb))
    for r0, r1, c0, c1, bi0, bj0, nr, nc, (h, w) in layout.regions():
        T[..., bi0 : bi0 + nr, bj0 : bj0 + nc, :h, :w] = (
            X[..., r0:r1, c0:c1].reshape(batch + (nr, h, nc, w)).swapaxes(-3, -2)
        )
    return T


def _ein(expr, *ops):
    """einsum, with a contraction path for big stacks (faster there, slower for one matrix)."""
    return np.einsum(expr, *ops, optimize=ops[0].size > 20000)


def _gram(F):
    """F^T F for every basis: (..., K, rows, r) -> (..., K, r, r)."""
    return np.swapaxes(F, -1, -2) @ F


def _residual_sq(T, U, V, S):
    """||T - X_hat||^2 per matrix, computed from the dense residual."""
    Xh = (U[..., :, None, :, :] * S[..., None, :]) @ np.swapaxes(V, -1, -2)[..., None, :, :, :]
    R = T - Xh
    return np.einsum("...ijab,...ijab->...", R, R)


def _inverse(G):
    """Inverse (pseudo-inverse where singular) of every PSD ``r x r`` Gram of a stack."""
    r = G.shape[-1]
    return spd_solve(G, np.broadcast_to(np.eye(r), G.shape))


def _normalise(F, S, axis):
    """Unit-norm columns of F (..., K, rows, r); the norms move into S along ``axis``."""
    nrm = np.linalg.norm(F, axis=-2)  # (..., K, r)
    nrm = np.where(nrm > 0, nrm, 1.0)
    F /= nrm[..., None, :]
    if axis == 0:
        S *= nrm[..., :, None, :]
    else:
        S *= nrm[..., None, :, :]


#: A basis column whose norm is at most this fraction of the largest column of the same
#: basis is rounding noise (e.g. a direction the data does not have): it is set to zero
#: rather than scaled up to unit norm, which would turn noise into a direction.
_NULL_COLUMN = 1e-12


def _unit_columns(F, FF):
    """(F with unit-norm columns, its Gram, the norms) from F and its Gram ``FF``.

    Columns below ``_NULL_COLUMN`` of the basis' largest are zeroed (norm reported as 1).
    """
    nrm = np.sqrt(np.maximum(np.diagonal(FF, axis1=-2, axis2=-1), 0.0))  # (..., K, r)
    null = nrm <= _NULL_COLUMN * np.max(nrm, axis=-1, keepdims=True)
    nrm = np.where(null, 1.0, nrm)
    scale = np.where(null, 0.0, 1.0 / nrm)
    return F * scale[..., None, :], FF * (scale[..., :, None] * scale[..., None, :]), nrm


def _s_solve(T, U, V, UU, VV):
    """s step given Grams: returns (S, TV) with TV = T_ij V_j."""
    M = UU[..., :, None, :, :] * VV[..., None, :, :, :]  # (..., kr, kc, r, r)
    TV = T @ V[..., None, :, :, :]  # (..., kr, kc, mb, r)
    rhs = _ein("...iar,...ijar->...ijr", U, TV)  # diag(U_i^T X_ij V_j)
    return spd_solve(M, rhs[..., None])[..., 0], TV


def _u_solve(TV, S, VV):
    """U step given VV: returns (U, G, rhs) with G = W_i W_i^T and rhs = X_i W_i^T."""
    G = np.einsum("...ijr,...ijs,...jrs->...irs", S, S, VV)
    rhs = _ein("...ijar,...ijr->...iar", TV, S)
    return rhs @ _inverse(G), G, rhs


def _v_solve(T, U, S, UU):
    """V step given UU (the transpose of the U step)."""
    G = np.einsum("...ijr,...ijs,...irs->...jrs", S, S, UU)
    UT = np.swapaxes(T, -1, -2) @ U[..., :, None, :, :]  # (..., kr, kc, nb, r)
    rhs = _ein("...ijbr,...ijr->...jbr", UT, S)
    return rhs @ _inverse(G)


def _s_step(T, U, V):
    """Exact least squares for every s_ij: ((U_i^T U_i) o (V_j^T V_j)) s = diag(U_i^T X_ij V_j)."""
    return _s_solve(T, U, V, _gram(U), _gram(V))


def _u_step(TV, V, S):
    """Exact least squares for every U_i given V and s: U_i W_i ~ X_i."""
    return _u_solve(TV, S, _gram(V))[0]


def _v_step(T, U, S):
    """Exact least squares for every V_j given U and s (the transpose of the U step)."""
    return _v_solve(T, U, S, _gram(U))


#: Below this relative error the residual is recomputed densely (the expansion in
#: ``_errors`` loses about ``1e-16 / (2 e)`` of absolute accuracy at error ``e``).
_FAST_RESIDUAL_MIN = 1e-2


def _errors(T, U, V, S, UU, G, rhs, total):
    """Relative errors of iterates that end with the U step, from the U step's quantities.

    ``||X - X_hat||^2 = ||X||^2 - 2 <X, X_hat> + ||X_hat||^2`` with, for every
    block-row, ``<X_i, U_i W_i> = <U_i, X_i W_i^T>`` and ``||U_i W_i||^2 =
    <U_i^T U_i, W_i W_i^T>`` (true for any ``U``, no optimality assumed). Where
    the relative error is below ``_FAST_RESIDUAL_MIN`` the dense residual is used
    instead (cancellation).
    """
    cross = np.einsum("...iar,...iar->...", U, rhs)
    quad = np.einsum("...irs,...irs->...", UU, G)
    sq = total - 2.0 * cross + quad
    safe = np.where(total > 0, total, 1.0)
    small = (sq < _FAST_RESIDUAL_MIN**2 * safe) & (total > 0)
    if small.any():
        sq[small] = _residual_sq(T[small], U[small], V[small], S[small])
    return np.where(total > 0, np.sqrt(np.maximum(sq, 0.0) / safe), 0.0)


def _sweep(T, U, UU, S, total):
    """One ALS sweep (V step, s step, U step) on a stack; returns (U, UU, V, S, errors)."""
    U1, UU1, nrm = _unit_columns(U, UU)
    S1 = S * nrm[..., :, None, :]  # same approximation, unit-norm U
    V1 = _v_solve(T, U1, S1, UU1)
    V1, VV1, _ = _unit_columns(V1, _gram(V1))  # the s step recomputes S: no need to rescale it
    S1, TV = _s_solve(T, U1, V1, UU1, VV1)
    U1, G, rhs = _u_solve(TV, S1, VV1)
    UU1 = _gram(U1)
    return U1, UU1, V1, S1, _errors(T, U1, V1, S1, UU1, G, rhs, total)


def _als(Xd, layout, r, max_iter, tol, U=None, V=None):
    """The ALS on a stack ``Xd`` (N, m, n) from the SVD init (U, V None) or given U, V.

    Returns ``(U, V, S, error, trace, n_done, stop)`` over the N matrices (padded
    ``U``/``V``; ``trace`` of width ``max_iter``, NaN past each matrix's last pass).
    Each matrix is iterated until its own stopping rule fires; the stack is
    compressed to the matrices still running whenever some stop.
    """
    N = Xd.shape[0]
    kr, kc = layout.n_blocks
    mb, nb = max(layout.row_sizes), max(layout.col_sizes)
    total = np.einsum("nab,nab->n", Xd, Xd)
    if U is None:
        U = np.zeros((N, kr, mb, r))
        V = np.zeros((N, kc, nb, r))
        re, ce = layout.row_edges, layout.col_edges
        for i in range(kr):
            Ui, _, _ = batched_svd(Xd[:, re[i] : re[i + 1]], r)
            U[:, i, : layout.row_sizes[i]] = Ui
        for j in range(kc):
            _, _, Vt = batched_svd(Xd[:, :, ce[j] : ce[j + 1]], r)
            V[:, j, : layout.col_sizes[j]] = np.swapaxes(Vt, -1, -2)
    else:
        U, V = U.copy(), V.copy()
    T = _pad(Xd, layout)
    VV = _gram(V)
    S, TV = _s_solve(T, U, V, _gram(U), VV)
    U, G, rhs = _u_solve(TV, S, VV)  # U always ends as the least-squares codes
    UU = _gram(U)
    err = _errors(T, U, V, S, UU, G, rhs, total)

    trace = np.full((N, max_iter), np.nan)
    trace[:, 0] = err
    n_done = np.ones(N, dtype=np.int64)  # the initialisation is the first pass
    stop = np.full(N, "max_iter", dtype="<U8")
    # the matrices still iterating, as compressed copies that shrink whenever some stop
    run = np.arange(N)
    Tr, Ur, UUr, Sr, er, tr = T, U, UU, S, err, total
    for sweep in range(1, max_iter):
        done = er <= STEP_TOL
        if done.any():
            stop[run[done]] = "tol"
            keep = ~done
            run, Tr, Ur, UUr, Sr, er, tr = (a[keep] for a in (run, Tr, Ur, UUr, Sr, er, tr))
        if run.size == 0:
            break
        before = er
        U1, UU1, V1, S1, e = _sweep(Tr, Ur, UUr, Sr, tr)
        ok = ~(e > before + STEP_TOL)  # a rise beyond rounding: discard the sweep, stop
        converged = ok & (before - e <= tol * before)
        keep = ok & ~converged
        if ok.all():
            idx = run
        else:
            idx = run[ok]
            stop[run[~ok]] = "increase"
            U1, UU1, V1, S1, e = (a[ok] for a in (U1, UU1, V1, S1, e))
        U[idx], V[idx], S[idx] = U1, V1, S1
        trace[idx, sweep] = e
        n_done[idx] += 1
        stop[run[converged]] = "tol"
        if keep.all():
            Ur, UUr, Sr, er = U1, UU1, S1, e
        else:
            k2 = keep[ok]
            run, Tr, tr = run[keep], Tr[keep], tr[keep]
            Ur, UUr, Sr, er = U1[k2], UU1[k2], S1[k2], e[k2]
        if run.size == 0:
            break

    # the reported error: from the dense residual of the returned factors
    safe = np.where(total > 0, total, 1.0)
    final = np.where(total > 0, np.sqrt(np.maximum(_residual_sq(T, U, V, S), 0.0) / safe), 0.0)
    trace[np.arange(N), n_done - 1] = final
    return U, V, S, final, trace, n_done, stop


# ---------------------------------------------------------------------------- core
def fit_shared_basis(
    X,
    n_blocks,
    rank,
    *,
    max_iter=100,
    tol=1e-6,
    init="svd",
    random_state=None,
    row_sizes=None,
    col_sizes=None,
    n_jobs=None,
):
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
    generator), then the exact ``s`` step.

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

    Normal equations are solved with :func:`~blocklowrank._factors.spd_solve`:
    a Cholesky solve vectorised over the stack, and for a numerically
    singular Gram (e.g. a coupling ``s_ij = 0``, a block of zeros, or a rank
    above what the data supports) :func:`~blocklowrank._factors.psd_solve`
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
    init : {"svd", "random"}, default="svd"
    random_state : int, RandomState instance or None, default=None
        Used by ``init="random"`` only.
    row_sizes, col_sizes : sequence of int, optional
        Explicit block heights / widths.
    n_jobs : int, optional
        For a stack: worker threads over chunks of the stack (BLAS held to one
        thread each), as in :func:`~blocklowrank.approximate`; -1 uses every
        core. Each matrix's result does not depend on the chunking (to
        rounding).

    Returns
    -------
    SharedBasisFit
        For a stack, with arrays over the leading dimensions.

    Examples
    --------
    >>> import numpy as np
    >>> from blocklowrank.shared_basis import fit_shared_basis
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> res = fit_shared_basis(X, 2, 3)
    >>> res.n_params
    180
    >>> bool(np.all(np.diff(res.error_trace) <= 1e-12))
    True

    A stack is fitted at once; each matrix as if alone:

    >>> S = np.random.default_rng(1).standard_normal((50, 28, 28))
    >>> batch = fit_shared_basis(S, 2, 3)
    >>> batch.error.shape, batch.S.shape
    ((50,), (50, 2, 2, 3))
    >>> bool(np.isclose(batch.error[7], fit_shared_basis(S[7], 2, 3).error))
    True
    """
    X = validate_matrix(X)
    dtype = X.dtype
    batch = X.shape[:-2]
    m, n = X.shape[-2:]
    Xd = np.asarray(X, dtype=np.float64).reshape((-1, m, n))
    N = Xd.shape[0]
    r = _check_int(rank, "rank", minimum=1)
    layout = BlockLayout.from_blocks(
        (m, n), n_blocks, rank=0, pattern="full", row_sizes=row_sizes, col_sizes=col_sizes
    )
    side = min(min(layout.row_sizes), min(layout.col_sizes))
    if r > side:
        raise ValueError(
            f"rank={r} exceeds the smallest block side ({side}) of the "
            f"{layout.n_blocks[0]}x{layout.n_blocks[1]} grid of a {m}x{n} matrix; lower the "
            "rank or use fewer blocks"
        )
    layout = layout.with_ranks(r)
    max_iter = _check_int(max_iter, "max_iter", minimum=1)
    if not isinstance(tol, numbers.Real) or isinstance(tol, bool) or not tol >= 0:
        raise ValueError(f"tol must be a float >= 0, got {tol!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    kr, kc = layout.n_blocks
    mb, nb = max(layout.row_sizes), max(layout.col_sizes)
    if init == "svd":
        U0 = V0 = None  # computed inside each chunk
    else:
        from sklearn.utils import check_random_state

        rng = check_random_state(random_state)
        U0 = np.zeros((N, kr, mb, r))
        V0 = np.zeros((N, kc, nb, r))
        for b in range(N):
            for i in range(kr):
                U0[b, i, : layout.row_sizes[i]] = rng.standard_normal((layout.row_sizes[i], r))
            for j in range(kc):
                V0[b, j, : layout.col_sizes[j]] = rng.standard_normal((layout.col_sizes[j], r))
        _normalise(U0, np.ones((N, kr, kc, r)), 0)
        _normalise(V0, np.ones((N, kr, kc, r)), 1)

    def run(Xc, *init_arrays):
        return _als(Xc, layout, r, max_iter, tol, *init_arrays)

    arrays = (Xd,) if U0 is None else (Xd, U0, V0)
    U, V, S, final, trace, n_done, stop = _run_chunked(run, arrays, _resolve_n_jobs(n_jobs))
    width = int(n_done.max())
    trace = trace[:, :width]

    cast = lambda a: np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    Ul = [cast(U[:, i, : layout.row_sizes[i]].reshape(batch + (layout.row_sizes[i], r))) for i in range(kr)]
    Vl = [cast(V[:, j, : layout.col_sizes[j]].reshape(batch + (layout.col_sizes[j], r))) for j in range(kc)]
    S = cast(S.reshape(batch + (kr, kc, r)))
    if batch:
        error = final.reshape(batch)
        error_trace = trace.reshape(batch + (width,))
        n_iter = n_done.reshape(batch)
        stop_reason = stop.astype(str).reshape(batch)
    else:
        error = float(final[0])
        error_trace = trace[0]
        n_iter = int(n_done[0])
        stop_reason = str(stop[0])
    return SharedBasisFit(
        layout=layout,
        rank=r,
        U=Ul,
        V=Vl,
        S=S,
        error=error,
        error_trace=error_trace,
        n_iter=n_iter,
        stop_reason=stop_reason,
        n_params=shared_basis_params((m, n), (kr, kc), r),
        dtype=dtype,
        batch_shape=batch,
    )


# ---------------------------------------------------------------------------- estimator
class SharedBasisLowRank(LinearCodesBase):
    """Block low rank with bases shared along block-rows and block-columns (BLAST).

    Block ``(i, j)`` of a ``K_rows x K_cols`` grid is ``U_i diag(s_ij)
    V_j^T``: ``U_i`` (``m_i x r``) is shared by block-row ``i``, ``V_j``
    (``n_j x r``) by block-column ``j``. ``r (m + n) + r K_rows K_cols``
    parameters (:func:`shared_basis_params`), against ``r K (m + n)`` for
    independent rank-``r`` blocks. Fitted by exact alternating least squares
    from an SVD initialisation (:func:`fit_shared_basis`); the error never
    increases from one sweep to the next (``error_trace_``).

    Codes. A row in block-row ``i`` is coded by its row of ``U_i`` (``r``
    numbers) and decoded by ``W_i = [diag(s_i1) V_1^T, ..., diag(s_iK)
    V_K^T]`` (``r x n``). :meth:`transform` returns the least-squares codes
    ``x @ pinv(W_i)``; the fit ends with the exact ``U`` step, so on the
    fitted rows these are the rows of ``U_i`` and
    ``reconstruct(fit_transform(X))`` is the fitted approximation.

    Parameters
    ----------
    n_blocks : int or (int, int), default=2
        ``K`` (a K x K grid) or ``(K_rows, K_cols)``.
    rank : int, default=1
        Shared rank ``r`` (at most the smallest block side).
    max_iter : int, default=100
        Largest number of passes, the initialisation counted as the first.
    tol : float, default=1e-6
        Stop when a sweep improves the relative error by a fraction
        ``<= tol`` (a convergence tolerance, not a target error).
    init : {"svd", "random"}, default="svd"
    random_state : int, RandomState instance or None, default=None
        Seeds ``init="random"``.

    Attributes
    ----------
    n_params_ : int
        ``r (m + n) + r K_rows K_cols``.
    error_ : float
    error_trace_ : ndarray
        Relative error after the initialisation and each sweep;
        non-increasing.
    n_iter_ : int
        Passes run, the initialisation counted as the first.
    stop_reason_ : str
    ranks_ : ndarray of int, shape (K_rows, K_cols)
        Nominal rank ``r`` of every block.
    factors_ : dict
        ``{(i, j): (B_ij, A_ij)}`` with ``B_ij = U_i diag(s_ij)``,
        ``A_ij = V_j^T`` (for interoperability with the other structures).
    U_ : list of ndarray
    V_ : list of ndarray
    S_ : ndarray of shape (K_rows, K_cols, r)
    layout_ : BlockLayout
        The grid; its ``n_params`` counts independent blocks, not this
        structure.
    n_codes_ : int
    n_samples_fit_ : int
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Defined only when X has feature names that are all strings.

    See Also
    --------
    BlockLowRank : independent factors per block.
    HybridLowRank : blocks plus a global term.

    Notes
    -----
    With several block-rows, a row's codes depend on which block-row it is
    in, so :meth:`transform` needs exactly the fitted number of rows.

    References
    ----------
    .. [1] Lee, Kwon, Kang, Wang and Lee, "BLAST: Block-Level Adaptive
       Structured Matrices for Efficient Deep Neural Network Inference",
       NeurIPS 2024, arXiv:2410.21262.

    Examples
    --------
    >>> import numpy as np
    >>> from blocklowrank.shared_basis import SharedBasisLowRank
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> est = SharedBasisLowRank(n_blocks=2, rank=3).fit(X)
    >>> est.n_params_
    180
    >>> Z = est.fit_transform(X)
    >>> Z.shape
    (28, 3)
    >>> bool(np.allclose(est.reconstruct(Z), est.reconstruct()))
    True
    """

    _parameter_constraints: dict = {
        "n_blocks": [Interval(Integral, 1, None, closed="left"), "array-like"],
        "rank": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "init": [StrOptions(set(INITS))],
        "random_state": ["random_state"],
    }

    def __init__(self, *, n_blocks=2, rank=1, max_iter=100, tol=1e-6, init="svd", random_state=None):
        self.n_blocks = n_blocks
        self.rank = rank
        self.max_iter = max_iter
        self.tol = tol
        self.init = init
        self.random_state = random_state

    def _n_blocks_pair(self):
        return _normalize_n_blocks(self.n_blocks)

    def _fit(self, X):
        self._validate_params()
        X = self._validate_X(X, reset=True)
        self._check_grid(X.shape)
        res = fit_shared_basis(
            X,
            self._n_blocks_pair(),
            self.rank,
            max_iter=self.max_iter,
            tol=self.tol,
            init=self.init,
            random_state=self.random_state,
        )
        self.layout_ = res.layout
        self.ranks_ = res.layout.ranks.copy()
        self.U_, self.V_, self.S_ = res.U, res.V, res.S
        self.factors_ = res.factors
        self.n_params_ = res.n_params
        self.error_ = res.error
        self.error_trace_ = res.error_trace
        self.n_iter_ = res.n_iter
        self.stop_reason_ = res.stop_reason
        self._result = res
        W = res.decoders()
        Z = np.concatenate(res.U, axis=0)
        self._store_codes(np.linalg.pinv(W), W, Z, res.reconstruction, X.dtype)
        return self._fit_codes

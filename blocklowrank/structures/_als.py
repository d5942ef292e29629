"""The alternating least squares of the shared-basis (BLAST) structure, on padded block tensors.

Blocks are handled as one zero-padded tensor of shape ``(..., K_rows, K_cols,
max m_i, max n_j)`` so that every step is a handful of einsums and batched
``r x r`` solves, without a Python loop over blocks. Padded rows of ``U_i`` /
``V_j`` stay exactly zero (their rows of the data are zero), so padding does
not change the problem.
"""

from __future__ import annotations

import numpy as np

from .._descent import Trace, descend
from .._linalg import spd_solve
from .._svd import _batched_svd

__all__ = ["als"]


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


def als(Xd, layout, r, max_iter, tol, U=None, V=None):
    """The ALS on a stack ``Xd`` (N, m, n) from the SVD init (U, V None) or given U, V.

    Returns ``(U, V, S, error, trace, n_done, stop)`` over the N matrices (padded
    ``U``/``V``; the arrays of a ``Trace`` of width ``max_iter``,
    NaN past each matrix's last pass). Each matrix is iterated until its own
    stopping rule fires (``descend``); the stack is compressed
    to the matrices still running whenever some stop.
    """
    N = Xd.shape[0]
    total = np.einsum("nab,nab->n", Xd, Xd)
    U, V = _svd_bases(Xd, layout, r) if U is None else (U.copy(), V.copy())
    T = _pad(Xd, layout)
    VV = _gram(V)
    S, TV = _s_solve(T, U, V, _gram(U), VV)
    U, G, rhs = _u_solve(TV, S, VV)  # U always ends as the least-squares codes
    UU = _gram(U)
    trace = Trace(N, max_iter)
    trace.record(np.arange(N), _errors(T, U, V, S, UU, G, rhs, total))  # the initialisation is the first pass
    descend(trace, [_Sweeps(T, U, V, S, UU, total)], max_iter=max_iter, tol=tol)
    # the reported error: from the dense residual of the returned factors
    safe = np.where(total > 0, total, 1.0)
    final = np.where(total > 0, np.sqrt(np.maximum(_residual_sq(T, U, V, S), 0.0) / safe), 0.0)
    trace.replace_last(final)
    return (U, V, S, final) + trace.arrays()


def _svd_bases(Xd, layout, r):
    """Padded ``U`` (N, K_rows, mb, r) and ``V`` (N, K_cols, nb, r): the top-``r`` singular
    vectors of every block-row and block-column."""
    N = Xd.shape[0]
    kr, kc = layout.n_blocks
    U = np.zeros((N, kr, max(layout.row_sizes), r))
    V = np.zeros((N, kc, max(layout.col_sizes), r))
    re, ce = layout.row_edges, layout.col_edges
    for i in range(kr):
        Ui, _, _ = _batched_svd(Xd[:, re[i] : re[i + 1]], r, "full", 0, 0, None, 1, False)
        U[:, i, : layout.row_sizes[i]] = Ui
    for j in range(kc):
        _, _, Vt = _batched_svd(Xd[:, :, ce[j] : ce[j + 1]], r, "full", 0, 0, None, 1, False)
        V[:, j, : layout.col_sizes[j]] = np.swapaxes(Vt, -1, -2)
    return U, V


class _Sweeps:
    """One ALS sweep as a step of ``descend``.

    It works on copies of the matrices still running, compressed only when some
    stop, and writes accepted sweeps into ``U``, ``V``, ``S`` (the whole stack).
    """

    def __init__(self, T, U, V, S, UU, total):
        self.U, self.V, self.S = U, V, S
        self.work = (np.arange(len(T)), T, total, U, UU, S)  # ids, then their T, ||X||^2, U, U^T U, S

    def __call__(self, ids):
        if ids.size != self.work[0].size:  # some stopped: drop them
            keep = np.isin(self.work[0], ids)
            self.work = tuple(a[keep] for a in self.work)
        run, T, total, U, UU, S = self.work
        U1, UU1, V1, S1, err = _sweep(T, U, UU, S, total)
        self.work = (run, T, total, U1, UU1, S1)

        def commit(accepted):
            idx = run[accepted]
            self.U[idx], self.V[idx], self.S[idx] = U1[accepted], V1[accepted], S1[accepted]

        return err, commit

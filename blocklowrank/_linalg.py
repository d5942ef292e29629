"""Small dense solvers for the exact least-squares steps of the iterative structures.

Pseudo-inverse solves of symmetric PSD normal equations, one matrix or large
stacks of small ones (a Cholesky vectorised over the stack), and the rounding
allowance of the monotone fits.
"""

from __future__ import annotations

import numpy as np

__all__ = ["psd_solve", "spd_solve", "STEP_TOL"]

#: Largest rise of the *relative* error ``||X - X_hat||_F / ||X||_F`` that a
#: fitting step may show and still count as "not increasing" (floating-point
#: rounding, i.e. ``1e-12 ||X||_F`` in the residual norm). A step that raises
#: the error by more is discarded and iteration stops
#: (``stop_reason="increase"``).
STEP_TOL = 1e-12


def psd_solve(G, rhs, rtol=1e-12):
    """Minimum-norm solution of ``G x = rhs`` for stacks of symmetric PSD ``G``.

    ``G`` is ``(..., r, r)``, ``rhs`` is ``(..., r, k)``. This is
    ``pinv(G) @ rhs`` through an eigendecomposition, with eigenvalues below
    ``rtol * max eigenvalue`` treated as zero. For the normal equations of a
    least-squares problem (``G = W W^T``, ``rhs = W y``, so ``rhs`` lies in
    the range of ``G``) this is an exact minimiser, also when ``W`` is rank
    deficient; when ``G`` is well conditioned it equals ``solve(G, rhs)``.
    No ridge is added, so the step stays an exact minimisation.
    """
    w, Q = np.linalg.eigh(G)
    wmax = np.max(w, axis=-1, keepdims=True)
    keep = w > rtol * np.where(wmax > 0, wmax, 1.0)
    inv = np.where(keep, 1.0 / np.where(keep, w, 1.0), 0.0)
    return Q @ (inv[..., :, None] * (Q.swapaxes(-1, -2) @ rhs))


#: :func:`spd_solve` hands a matrix to :func:`psd_solve` when a Cholesky pivot falls
#: below this fraction of its largest diagonal entry (numerically singular or close).
CHOL_RTOL = 1e-10

#: Stacks of at most this many matrices go straight to :func:`psd_solve`.
SMALL_STACK = 64


def spd_solve(G, rhs, rtol=CHOL_RTOL):
    """``G x = rhs`` for large stacks of small symmetric PSD ``G`` (fast path of :func:`psd_solve`).

    ``G`` is ``(..., r, r)`` and ``rhs`` ``(..., r, k)`` with the same leading
    dimensions. A Cholesky factorisation runs vectorised over the stack (a
    Python loop over the ``r`` columns only, each step one array operation on
    all matrices), then forward and back substitution. Every matrix with a
    pivot ``<= rtol * max(diag G)`` (singular or nearly so) is solved instead by
    :func:`psd_solve`, the minimum-norm pseudo-inverse solution. Coordinates
    with an (essentially) zero diagonal entry -- zero rows and columns, as a
    zero basis vector or a block of zeros gives -- are set to 0 first and
    removed from the system (``DEFLATE_RTOL``), which is the minimum-norm
    solution too, so most singular Grams need no eigendecomposition. So the result is ``solve(G, rhs)`` for
    well-conditioned matrices and :func:`psd_solve`'s for the others: an exact
    least-squares step either way, without a ridge. Stacks of at most
    ``SMALL_STACK`` matrices go to :func:`psd_solve` directly (fewer calls);
    both paths agree to rounding on well-conditioned matrices.

    Why: ``numpy.linalg.eigh`` (inside :func:`psd_solve`) costs a LAPACK call
    per matrix; the ALS of :func:`~blocklowrank.structures.fit_shared_basis`
    on 10,000 digits solves about 80,000 ``3 x 3`` systems per sweep. The
    computation of one matrix does not depend on the others in the stack, so
    stack of more than ``SMALL_STACK`` matrices gives the same per-matrix results
    whatever the other matrices are.
    """
    G = np.asarray(G, dtype=np.float64)
    rhs = np.asarray(rhs, dtype=np.float64)
    batch = G.shape[:-2]
    r = G.shape[-1]
    k = rhs.shape[-1]
    Gf = G.reshape((-1, r, r))
    bf = np.broadcast_to(rhs, batch + (r, k)).reshape((-1, r, k))
    Gf, bf = _deflate(Gf, bf)
    if Gf.shape[0] <= SMALL_STACK:  # a few matrices: LAPACK calls beat the vectorised loop
        out = _spd_solve_lapack(Gf, bf, rtol)
        if out is not None:
            return out.reshape(batch + (r, k))
    # batch last: every step below is one contiguous vector operation over the stack
    A = np.ascontiguousarray(np.moveaxis(Gf, 0, -1))  # (r, r, N)
    b = np.moveaxis(bf, 0, -1)  # (r, k, N)
    L, bad = _chol_columns(A, rtol)
    x = _chol_substitute(L, b)
    out = np.ascontiguousarray(np.moveaxis(x, -1, 0))  # (N, r, k)
    if bad.any():
        out[bad] = psd_solve(Gf[bad], bf[bad])
    return out.reshape(batch + (r, k))


#: Coordinates whose diagonal entry is at most this fraction of the largest (columns of the
#: least-squares design with at most 1e-12 of the largest norm: in practice exact zeros, e.g.
#: a basis vector set to zero or a block of zeros) are solved as 0 by :func:`spd_solve`.
DEFLATE_RTOL = 1e-24


def _deflate(Gf, bf):
    """Null coordinates (diagonal <= DEFLATE_RTOL * max diagonal) -> decoupled, with zero rhs.

    Their rows and columns of G become zero with the largest diagonal entry on the
    diagonal (1 if G = 0), their rhs rows zero, so their solution is exactly 0 and the
    rest is the solution of the reduced system: for exact zero rows and columns this is
    the minimum-norm solution, without an eigendecomposition.
    """
    diag = np.diagonal(Gf, axis1=-2, axis2=-1)
    scale = np.max(diag, axis=-1, keepdims=True)
    null = ~(diag > DEFLATE_RTOL * scale)
    if not null.any():
        return Gf, bf
    idx = np.nonzero(null.any(axis=-1))[0]
    nl = null[idx]
    G, b = Gf[idx], bf[idx]
    G[nl[:, :, None] | nl[:, None, :]] = 0.0
    r = Gf.shape[-1]
    fill = np.where(scale[idx] > 0, scale[idx], 1.0)
    G[:, np.arange(r), np.arange(r)] = np.where(nl, fill, np.diagonal(G, axis1=-2, axis2=-1))
    b[nl] = 0.0
    Gf, bf = Gf.copy(), bf.copy()
    Gf[idx], bf[idx] = G, b
    return Gf, bf


def _chol_columns(A, rtol):
    """Vectorised Cholesky of a stack stored batch-last, A (r, r, N) -> (L, bad).

    ``bad`` flags matrices with a pivot ``<= rtol * max diagonal`` (their L is
    finite but meaningless). Sums over previous columns are unrolled (plain
    multiply-adds on length-N vectors) for small r and einsum calls beyond.
    """
    r = A.shape[0]
    L = np.zeros_like(A)
    scale = np.max(np.diagonal(A, axis1=0, axis2=1), axis=-1)  # (N,)
    bad = ~(scale > 0)
    thresh = rtol * scale
    small = r <= _UNROLL
    for j in range(r):
        if small:
            d = A[j, j].copy()
            for p in range(j):
                d -= L[j, p] * L[j, p]
        else:
            d = A[j, j] - np.einsum("pn,pn->n", L[j, :j], L[j, :j])
        bad |= ~(d > thresh)
        ljj = np.sqrt(np.where(d > 0, d, 1.0))
        L[j, j] = ljj
        if j + 1 < r:
            if small:
                for i in range(j + 1, r):
                    v = A[i, j].copy()
                    for p in range(j):
                        v -= L[i, p] * L[j, p]
                    L[i, j] = v / ljj
            else:
                L[j + 1 :, j] = (A[j + 1 :, j] - np.einsum("ipn,pn->in", L[j + 1 :, :j], L[j, :j])) / ljj
    return L, bad


def _chol_substitute(L, b):
    """Solve L L^T x = b for a batch-last stack: L (r, r, N), b (r, k, N) -> x (r, k, N)."""
    r = L.shape[0]
    small = r <= _UNROLL
    y = np.empty(b.shape)
    for j in range(r):
        if small:
            v = b[j].copy()
            for p in range(j):
                v -= L[j, p] * y[p]
        else:
            v = b[j] - np.einsum("pn,pkn->kn", L[j, :j], y[:j])
        y[j] = v / L[j, j]
    x = np.empty(b.shape)
    for j in range(r - 1, -1, -1):
        if small:
            v = y[j].copy()
            for p in range(j + 1, r):
                v -= L[p, j] * x[p]
        else:
            v = y[j] - np.einsum("pn,pkn->kn", L[j + 1 :, j], x[j + 1 :])
        x[j] = v / L[j, j]
    return x


#: Up to this size the vectorised Cholesky unrolls its inner sums.
_UNROLL = 6


def _spd_solve_lapack(Gf, bf, rtol):
    """:func:`spd_solve` for a few matrices through LAPACK (same rule, same results to rounding).

    None when some matrix is not numerically positive definite for LAPACK's
    Cholesky (the caller then runs the vectorised path, which handles it).
    """
    try:
        L = np.linalg.cholesky(Gf)
    except np.linalg.LinAlgError:
        return None
    scale = np.max(np.diagonal(Gf, axis1=-2, axis2=-1), axis=-1)
    piv = np.diagonal(L, axis1=-2, axis2=-1) ** 2
    bad = ~(scale > 0) | np.any(~(piv > rtol * scale[:, None]), axis=-1)
    out = np.empty(bf.shape)
    good = ~bad
    if good.any():
        out[good] = np.linalg.solve(Gf[good], bf[good])
    if bad.any():
        out[bad] = psd_solve(Gf[bad], bf[bad])
    return out

"""SVD kernels: batched exact and randomized truncated SVD with one sign convention."""

from __future__ import annotations

import numpy as np

from ._parallel import resolve_n_jobs, run_chunked
from ._validation import check_choice, check_int, validate_matrix

__all__ = ["batched_svd", "svd_flip_v", "check_svd_options", "SVD_SOLVERS"]

SVD_SOLVERS = ("auto", "full", "randomized")


def check_svd_options(svd_solver, n_oversamples, iterated_power, *, solvers=SVD_SOLVERS):
    """Validate the randomized-SVD knobs once, at a public boundary."""
    check_choice(svd_solver, "svd_solver", solvers)
    n_oversamples = check_int(n_oversamples, "n_oversamples", minimum=0)
    if not (isinstance(iterated_power, str) and iterated_power == "auto"):
        if isinstance(iterated_power, str):
            raise ValueError(f"iterated_power must be an int >= 0 or 'auto', got {iterated_power!r}")
        iterated_power = check_int(iterated_power, "iterated_power", minimum=0)
    return svd_solver, n_oversamples, iterated_power


def svd_flip_v(U, Vt):
    """Deterministic signs: the largest-magnitude entry of every row of ``Vt`` is positive.

    This is the convention of ``sklearn.utils.extmath.svd_flip(...,
    u_based_decision=False)`` (used by ``TruncatedSVD`` and ``PCA``), applied
    to stacks: ``U`` is ``(..., m, k)`` and ``Vt`` is ``(..., k, n)`` float
    arrays. Works in place and returns ``(U, Vt)``.
    """
    if not all(isinstance(a, np.ndarray) and a.dtype.kind == "f" for a in (U, Vt)):
        raise TypeError("U and Vt must be float NumPy arrays (the flip works in place)")
    if U.ndim < 2 or Vt.ndim < 2 or U.shape[:-2] != Vt.shape[:-2] or U.shape[-1] != Vt.shape[-2]:
        raise ValueError(f"U (..., m, k) and Vt (..., k, n) must agree, got shapes {U.shape} and {Vt.shape}")
    return _flip(U, Vt)


def _flip(U, Vt):
    """:func:`svd_flip_v` on validated arrays."""
    if Vt.shape[-2] == 0:
        return U, Vt
    idx = np.argmax(np.abs(Vt), axis=-1)
    signs = np.sign(np.take_along_axis(Vt, idx[..., None], axis=-1))[..., 0]
    signs[signs == 0] = 1
    Vt *= signs[..., :, None]
    U *= signs[..., None, :]
    return U, Vt


def _auto_power(k, m, n):
    # same rule as sklearn.utils.extmath.randomized_svd
    return 7 if k < 0.1 * min(m, n) else 4


def _exact_svd(A):
    U, s, Vt = np.linalg.svd(A, full_matrices=False)
    return U, s, Vt


def _randomized_svd(A, k, n_oversamples, n_power, omega):
    """Batched randomized SVD (Halko et al.) of ``A`` (N, m, n) with QR normalisation.

    Subspace iteration on ``A A^T`` with one Householder QR per power
    iteration (``n_power + 1`` in all). sklearn normalises (LU) after every
    product; for a stack of small blocks the QR calls cost as much as the
    products, and halving them keeps the captured energy unchanged on flat
    and decaying spectra (benchmarks/bench_engine.py): only directions with
    ``sigma_i < sqrt(eps) sigma_1``, whose energy is below rounding, could be
    lost between two normalisations. numpy has no batched LU.
    """
    transpose = A.shape[-2] < A.shape[-1]
    if transpose:
        A = A.swapaxes(-1, -2)
    At = A.swapaxes(-1, -2)
    Y = A @ omega
    for _ in range(n_power):
        Q, _ = np.linalg.qr(Y)
        Y = A @ (At @ Q)
    Q, _ = np.linalg.qr(Y)
    Bm = Q.swapaxes(-1, -2) @ A
    Uh, s, Vt = np.linalg.svd(Bm, full_matrices=False)
    U = Q @ Uh
    U, s, Vt = U[..., :k], s[..., :k], Vt[..., :k, :]
    if transpose:
        U, Vt = Vt.swapaxes(-1, -2), U.swapaxes(-1, -2)
    return np.ascontiguousarray(U), s, np.ascontiguousarray(Vt)

def batched_svd(
    A,
    k=None,
    *,
    svd_solver="full",
    n_oversamples=10,
    iterated_power="auto",
    random_state=None,
    n_jobs=None,
    full_spectrum=False,
):
    """Truncated SVD of every matrix of a stack ``A`` of shape ``(..., m, n)``.

    Parameters
    ----------
    A : ndarray of shape (..., m, n)
        Float32 or float64 stack.
    k : int, optional
        Number of components, ``1 <= k <= min(m, n)``; all of them when None.
    svd_solver : {"auto", "full", "randomized"}, default="full"
        "auto" is "full" here. "full" is LAPACK ``gesdd`` through :func:`numpy.linalg.svd`;
        "randomized" is a batched version of
        :func:`sklearn.utils.extmath.randomized_svd` (same knobs).
    n_oversamples, iterated_power, random_state
        As in ``randomized_svd`` (whose ``n_iter`` is ``iterated_power``
        here, the name of :class:`sklearn.decomposition.PCA`); "auto" is 7 when
        ``k < 0.1 min(m, n)``, else 4.
    n_jobs : int, optional
        Worker threads over the stack (BLAS held to one thread each); -1
        means all CPUs. None (default): as many workers as the BLAS has
        threads when the stack holds two or more matrices and enough work
        to pay for the threads, else 1 (see :func:`~blocklowrank._parallel.resolve_n_jobs`). Every
        matrix goes through the same kernel whatever ``n_jobs``: results
        agree to rounding (bit for bit at equal BLAS thread counts).
    full_spectrum : bool, default=False
        With the exact solver, return all ``min(m, n)`` singular values in
        ``s`` (``U`` and ``Vt`` are still truncated to ``k``).

    Returns
    -------
    U : ndarray (..., m, k)
    s : ndarray (..., k)
    Vt : ndarray (..., k, n)
        With the sign convention of :func:`svd_flip_v`.
    """
    A = validate_matrix(A, name="A")
    svd_solver, n_oversamples, iterated_power = check_svd_options(svd_solver, n_oversamples, iterated_power)
    if not isinstance(full_spectrum, (bool, np.bool_)):
        raise TypeError(f"full_spectrum must be a bool, got {full_spectrum!r}")
    L = min(A.shape[-2:])
    k = L if k is None else check_int(k, "k", minimum=1, maximum=L)
    if svd_solver == "auto":
        svd_solver = "full"
    return _batched_svd(A, k, svd_solver, n_oversamples, iterated_power, random_state, n_jobs, full_spectrum)


def _batched_svd(A, k, svd_solver, n_oversamples, iterated_power, random_state, n_jobs, full_spectrum):
    """:func:`batched_svd` on validated input (the engine calls this directly)."""
    batch = A.shape[:-2]
    m, n = A.shape[-2:]
    L = min(m, n)
    flat = A.reshape((-1, m, n))
    N = flat.shape[0]
    if svd_solver == "randomized":
        from sklearn.utils import check_random_state

        ell = min(k + int(n_oversamples), L)
        if ell >= L:  # the sketch would be the whole space: exact is cheaper and exact
            svd_solver = "full"
        else:
            rng = check_random_state(random_state)
            it = _auto_power(k, m, n) if iterated_power == "auto" else int(iterated_power)
            inner = min(m, n)  # the sketch acts on the smaller side (after any transpose)
            # drawn for the whole stack before any split: the result does not depend on n_jobs
            omega = rng.standard_normal((N, inner, ell)).astype(flat.dtype, copy=False)
            work = N * (m * n * ell * (2 * it + 2) / 16 + 1e4 * (it + 1))
            jobs = resolve_n_jobs(n_jobs, N, work)
            U, s, Vt = run_chunked(
                lambda a, o: _randomized_svd(a, k, n_oversamples, it, o), (flat, omega), jobs
            )
    if svd_solver == "full":

        def exact_k(a):  # truncate inside the worker: only k vectors are copied and joined
            U, s, Vt = _exact_svd(a)
            return (
                np.ascontiguousarray(U[..., :k]),
                s if full_spectrum else np.ascontiguousarray(s[..., :k]),
                np.ascontiguousarray(Vt[..., :k, :]),
            )

        jobs = resolve_n_jobs(n_jobs, N, N * (float(m) * n * L + 1e4))
        U, s, Vt = run_chunked(exact_k, (flat,), jobs)
    _flip(U, Vt)
    return (
        U.reshape(batch + U.shape[-2:]),
        s.reshape(batch + s.shape[-1:]),
        Vt.reshape(batch + Vt.shape[-2:]),
    )



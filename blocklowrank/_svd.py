"""SVD kernels: batched exact and randomized truncated SVD with one sign convention."""

from __future__ import annotations

import numpy as np
import scipy.linalg  # noqa: F401  (loaded before the BLAS controller is made: both BLAS get limited)

from ._parallel import resolve_n_jobs, run_chunked
from ._params import SVD_OPTIONS, SVD_SOLVERS, validate_params
from ._validation import validate_matrix

__all__ = ["batched_svd", "svd_flip_v", "SVD_SOLVERS"]


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


# Exact kernel. For float32 matrices of side >= _GESDD_MIN_SIDE SciPy's ?gesdd
# (one call per matrix) runs 1.6-2.3x faster than np.linalg.svd's gufunc, with
# one BLAS thread or with all of them; for smaller blocks and for float64 the
# gufunc is as fast or faster and has no per-call overhead. But SciPy's LAPACK
# wrappers hold the GIL: two worker threads run two SciPy SVDs one after the
# other (1024 x 1024 float32 on one BLAS thread: 312 ms alone, 652 ms for two
# in two threads; NumPy's gufunc, which releases it: 515 and 512 ms). So a stack
# split over worker threads goes through the gufunc. Both are LAPACK gesdd:
# results agree to rounding (benchmarks/bench_exact.py measures the choice).
# From float32 blocks of side _GESDD_SEQUENTIAL_MIN_SIDE, SciPy's kernel with
# every BLAS thread, one block after the other, is as fast as or faster than the
# gufunc split over two worker threads (on 2 cores: 4 x 512: 139 ms against
# 178 ms; 2 x 1024: a tie; 2 x 2048: 2.7 s against 4.3 s; at 128 the split wins,
# 35 ms against 53 ms for 32 blocks). With more workers the split gains in
# proportion and BLAS's threads do not, so wider splits are kept.
_GESDD_MIN_SIDE = {np.dtype(np.float32): 128}
_GESDD_SEQUENTIAL_MIN_SIDE = 512


def _exact_svd(A, *, in_workers=False, compute_uv=True):
    """``U, s, Vt`` of every matrix of ``A`` (..., m, n) with ``full_matrices=False``
    (``(s,)`` alone without ``compute_uv``).

    Routed to the fastest exact LAPACK kernel in this process (see
    ``_GESDD_MIN_SIDE``); ``in_workers``: called from one of several worker
    threads, where only the gufunc runs in parallel. Input is validated
    upstream: no finiteness check.
    """
    m, n = A.shape[-2:]
    if in_workers or min(m, n) < _GESDD_MIN_SIDE.get(A.dtype, np.inf) or A.size == 0:
        out = np.linalg.svd(A, full_matrices=False, compute_uv=compute_uv)
        return out if compute_uv else (out,)
    out = [
        scipy.linalg.svd(a, full_matrices=False, compute_uv=compute_uv, check_finite=False, lapack_driver="gesdd")
        for a in A.reshape((-1, m, n))
    ]
    if not compute_uv:
        out = [(s,) for s in out]
    return tuple(np.stack(t).reshape(A.shape[:-2] + t[0].shape) for t in zip(*out))


def _exact_jobs(n_jobs, N, m, n, dtype):
    """Worker threads for the exact SVD of a stack of ``N`` matrices ``m x n`` (see above)."""
    jobs = resolve_n_jobs(n_jobs, N, N * (float(m) * n * min(m, n) + 1e4))
    if n_jobs is None and jobs == 2 and min(m, n) >= _GESDD_SEQUENTIAL_MIN_SIDE and dtype == np.float32:
        jobs = 1
    return jobs


# svd_solver="auto": relative excess of discarded energy the certificate must
# prove (error within 5e-7 relative of the optimum), and the probes of the
# residual's spectral norm (failure probability _PROBE_ALPHA ** -_PROBES).
_AUTO_TOL = 1e-6
_PROBES, _PROBE_POWER, _PROBE_ALPHA = 10, 4, 10.0
# power iterations before the first certificate (the rest only where it fails)
_FIRST_STAGE = 2
# "auto" tries the randomized solver only when its cost (products with the
# matrix, counted in columns) is below this fraction of min(m, n): smaller
# blocks go straight to the exact SVD, which is cheap there.
_AUTO_MAX_WORK = 1.0
_AUTO_MIN_SIDE = 256


def _auto_plan(k, m, n, n_oversamples, iterated_power):
    """``(ell, n_power)`` of the randomized trial of "auto", or None to go exact."""
    L = min(m, n)
    ell = k + max(int(n_oversamples), k, 1)
    it = _auto_power(k, m, n) if iterated_power == "auto" else int(iterated_power)
    work = ell * (2 * it + 3) + 2 * _PROBE_POWER * _PROBES
    if L < _AUTO_MIN_SIDE or ell >= L or work > _AUTO_MAX_WORK * L:
        return None
    return ell, it


def _residual_norm2(A, Q, probe):
    """Upper bound on ``||(I - Q Q^T) A||_2^2`` of every matrix of ``A`` (N, m, n).

    Halko, Martinsson & Tropp (2011), Lemma 4.1 (eq. 4.3), applied to
    ``T = (R^T R)^t`` with ``R = (I - Q Q^T) A``: for ``r`` Gaussian columns
    ``omega_i`` drawn independently of ``Q``, ``||T||_2 <= alpha sqrt(2/pi)
    max_i ||T omega_i||`` except with probability ``alpha^-r``; and
    ``||R||_2^2 = ||T||_2^(1/t)``. The ``t`` power steps make the bound tight
    to a factor ``(alpha sqrt(2/pi) sqrt(n))^(1/t)`` at worst (flat tails).
    Columns are rescaled every step (the scales are kept in logs).
    """
    At = A.swapaxes(-1, -2)
    W = probe
    log_c = np.zeros(A.shape[0])
    for _ in range(_PROBE_POWER):
        Y = A @ W
        Y -= Q @ (Q.swapaxes(-1, -2) @ Y)
        W = At @ Y
        c = np.linalg.norm(W, axis=-2).max(axis=-1).astype(np.float64)
        with np.errstate(divide="ignore"):
            log_c += np.log(c)
        W = W / np.where(c > 0, c, 1).astype(W.dtype)[:, None, None]
    return np.exp((np.log(_PROBE_ALPHA * np.sqrt(2 / np.pi)) + log_c) / _PROBE_POWER)


def _certified(A, Q, U, s, Vt, k, probe, total=None):
    """Whether the rank-``k`` truncation of a sketch provably keeps within ``_AUTO_TOL``
    of the optimal discarded energy, for every matrix of the stack ``A`` (N, m, n)
    (``total``: see :func:`_deficit_bound`)."""
    bound, discarded = _deficit_bound(A, Q, U, s, Vt, k, probe, total)
    return bound <= _AUTO_TOL / (1 + _AUTO_TOL) * discarded


def _deficit_bound(A, Q, U, s, Vt, k, probe, total=None):
    """Upper bound on the captured energy the sketch's rank-``k`` truncation misses,
    and its discarded energy, per matrix of ``A`` (N, m, n).

    ``A`` needs only products (``A @ X``, ``A.swapaxes(-1, -2) @ Y``): an operator
    that never forms the matrix works, with its energy ``||A||_F^2`` per matrix
    given as ``total`` (None: computed from ``A``). The fits in a data metric pass
    the operator ``K^T W L`` and the total they compute anyway.

    With ``B = Q^T A = U~ S V^T`` (``U = Q U~``) and ``R = (I - Q Q^T) A``,
    ``A^T A = B^T B + R^T R``. In the basis ``[V_c, V_perp]`` (``k <= c < ell``)
    it is ``[[M, G^T], [G, N]]`` with ``M = S_c^2 + F``, ``F = (R V_c)^T (R V_c)``,
    ``||G|| <= ||R V_c|| rho`` and ``lambda_max(N) <= s_{c+1}^2 + rho^2 = nu``,
    where ``rho >= ||R||_2`` (:func:`_residual_norm2`). When ``s_k^2 > nu``:

    * Ky Fan: the top ``k`` eigenvalues of ``M`` sum to at most
      ``sum_{j<=k} s_j^2 + (sum of the top k eigenvalues of F)``;
    * Li & Li (2005): each eigenvalue ``j <= k`` of ``A^T A`` exceeds that of
      ``M`` by at most ``2 g^2 / (eta_j + sqrt(eta_j^2 + 4 g^2))``,
      ``eta_j = s_j^2 - nu``, ``g = ||G||``.

    Their sum bounds the deficit ``sum_{j<=k} (sigma_j^2 - s_j^2)`` of captured
    energy; the best split ``c`` is taken. ``R V = A V - U S`` costs one
    product with ``ell`` columns. The truncation is accepted when the bound
    is at most ``tol / (1 + tol)`` of its discarded energy ``||A||^2 -
    sum_{j<=k} s_j^2``: then the discarded energy is within ``1 + tol`` of the
    optimum (Eckart-Young), and the error within ``sqrt(1 + tol)``.
    """
    ell = s.shape[-1]
    T = A @ Vt.swapaxes(-1, -2) - U * s[:, None, :]  # R V, (N, m, ell)
    F = np.matmul(T.swapaxes(-1, -2), T, dtype=np.float64)
    rho2 = _residual_norm2(A, Q, probe)
    s2 = s.astype(np.float64) ** 2
    best = np.full(A.shape[0], np.inf)
    for c in range(k, ell):
        lam = np.clip(np.linalg.eigvalsh(F[:, :c, :c]), 0, None)  # ascending
        kyfan = lam[:, -k:].sum(axis=-1)
        g2 = lam[:, -1] * rho2
        eta = s2[:, :k] - (s2[:, c] + rho2)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            quad = (2 * g2[:, None] / (eta + np.sqrt(eta * eta + 4 * g2[:, None]))).sum(axis=-1)
        bound = np.where(eta[:, -1] > 0, kyfan + np.nan_to_num(quad, nan=0.0), np.inf)
        best = np.minimum(best, bound)
    if total is None:
        total = np.einsum("bij,bij->b", A, A, dtype=np.float64)
    return best, np.asarray(total, dtype=np.float64) - s2[:, :k].sum(axis=-1)


def _randomized_svd(A, k, n_power, omega, probe=None):
    """Batched randomized SVD (Halko et al.) of ``A`` (N, m, n) with QR normalisation.

    Subspace iteration on ``A A^T`` with one Householder QR per power
    iteration (``n_power + 1`` in all). sklearn normalises (LU) after every
    product; for a stack of small blocks the QR calls cost as much as the
    products, and halving them keeps the captured energy unchanged on flat
    and decaying spectra (benchmarks/bench_engine.py): only directions with
    ``sigma_i < sqrt(eps) sigma_1``, whose energy is below rounding, could be
    lost between two normalisations. numpy has no batched LU.

    With ``probe`` (Gaussian, (N, min(m, n), r)) the iteration stops early:
    after ``_FIRST_STAGE`` power iterations every matrix whose truncation
    :func:`_certified` accepts is done; the others run on to ``n_power`` and
    are certified again. Returns ``(U, s, Vt, ok)`` then, ``ok`` the verdict
    per matrix (decided matrix by matrix: independent of how the stack is cut).
    """
    transpose = A.shape[-2] < A.shape[-1]
    if transpose:
        A = A.swapaxes(-1, -2)
    N, m, n = A.shape
    stages = [n_power] if probe is None else sorted({min(_FIRST_STAGE, n_power), n_power})
    U, s, Vt = np.empty((N, m, k), A.dtype), np.empty((N, k), A.dtype), np.empty((N, k, n), A.dtype)
    ok = np.zeros(N, dtype=bool)
    todo, done = np.arange(N), 0
    Y = A @ omega
    for stage in stages:
        a = A if len(todo) == N else A[todo]
        for _ in range(stage - done):
            Q, _ = np.linalg.qr(Y)
            Y = a @ (a.swapaxes(-1, -2) @ Q)
        done = stage
        Q, _ = np.linalg.qr(Y)
        Uh, sv, Vh = np.linalg.svd(Q.swapaxes(-1, -2) @ a, full_matrices=False)
        Uq = Q @ Uh
        passed = np.ones(len(todo), bool) if probe is None else _certified(a, Q, Uq, sv, Vh, k, probe[todo])
        last = stage == stages[-1]
        keep = passed | last
        U[todo[keep]], s[todo[keep]], Vt[todo[keep]] = Uq[keep, :, :k], sv[keep, :k], Vh[keep, :k]
        ok[todo[keep]] = passed[keep]
        todo, Y = todo[~keep], Y[~keep]
        if not todo.size:
            break
    if transpose:
        U, Vt = Vt.swapaxes(-1, -2), U.swapaxes(-1, -2)
    out = (np.ascontiguousarray(U), s, np.ascontiguousarray(Vt))
    return out if probe is None else out + (ok,)


@validate_params("k", "full_spectrum", *SVD_OPTIONS)
def batched_svd(
    A, k=None, *, svd_solver="full", n_oversamples=10, iterated_power="auto", random_state=None, n_jobs=None,
    full_spectrum=False,
):  # fmt: skip
    """Truncated SVD of every matrix of a stack ``A`` of shape ``(..., m, n)``.

    Parameters
    ----------
    A : ndarray of shape (..., m, n)
        Float32 or float64 stack.
    k : int, optional
        Number of components, ``1 <= k <= min(m, n)``; all of them when None.
    svd_solver : {"auto", "full", "randomized"}, default="full"
        "full" is LAPACK ``gesdd`` (NumPy's batched gufunc, or SciPy's per
        matrix for float32 blocks of side >= 128, where it is faster);
        "randomized" is a batched version of
        :func:`sklearn.utils.extmath.randomized_svd` (same knobs). "auto"
        tries the randomized solver (with ``max(n_oversamples, k)``
        oversamples) on stacks of large blocks and keeps it only when an
        a-posteriori certificate proves, for every matrix, a discarded energy
        within ``1 + 1e-6`` of the optimum (see Notes); otherwise, and on
        small blocks, it runs "full".
    n_oversamples, iterated_power, random_state
        As in ``randomized_svd`` (whose ``n_iter`` is ``iterated_power``
        here, the name of :class:`sklearn.decomposition.PCA`); "auto" is 7 when
        ``k < 0.1 min(m, n)``, else 4.
    n_jobs : int, optional
        Worker threads over the stack (BLAS held to one thread each); -1
        means all CPUs. None (default): as many workers as the BLAS has
        threads when the stack holds two or more matrices and enough work
        to pay for the threads, else 1. Every
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

    Notes
    -----
    "auto" on a group of blocks: blocks of side below 256, or where the sketch
    would cost more products than the exact SVD (``_auto_plan``), go to the
    exact SVD. Otherwise it sketches with ``ell = k + max(n_oversamples, k)``
    columns, and after 2 power iterations (then, where that fails, after
    ``iterated_power``) certifies every matrix (:func:`_deficit_bound`): a
    bound on the energy the sketch's rank-``k`` truncation misses against
    the exact one, from one more product with the sketch's right singular
    vectors (Ky Fan and the quadratic residual bound of Li & Li, 2005) and an
    upper bound on the spectral norm of the sketch's residual ``(I - Q Q^T) A``.
    The result is kept when every matrix of the group passes, and then the
    error of each is within ``sqrt(1 + 1e-6)`` of the optimum; else the whole
    group is recomputed exactly (``FitReport.svd_solver`` says which). The
    residual-norm bound is probabilistic (fresh Gaussian probes, Halko et al.
    2011, Lemma 4.1): it fails with probability at most ``1e-10`` per matrix
    and certification; everything else is deterministic. On flat spectra
    (Gaussian blocks) the certificate fails and "auto" falls back; on
    decaying spectra with a noise floor (fine-tuning updates) it passes.
    """
    A = validate_matrix(A, name="A")
    L = min(A.shape[-2:])
    if k is not None and k > L:
        raise ValueError(f"k={k} exceeds min(m, n) = {L}, the number of singular values")
    k = L if k is None else k
    return _batched_svd(A, k, svd_solver, n_oversamples, iterated_power, random_state, n_jobs, full_spectrum)


def _batched_svd(A, k, svd_solver, n_oversamples, iterated_power, random_state, n_jobs, full_spectrum):
    """:func:`batched_svd` on validated input."""
    return _solve(A, k, svd_solver, n_oversamples, iterated_power, random_state, n_jobs, full_spectrum)[:3]


def _solve(A, k, svd_solver, n_oversamples, iterated_power, random_state, n_jobs, full_spectrum):
    """``(U, s, Vt, solver)``: :func:`batched_svd` on validated input and the solver
    that produced the result ("full" or "randomized"; the engine calls this)."""
    from sklearn.utils import check_random_state

    batch = A.shape[:-2]
    m, n = A.shape[-2:]
    L = min(m, n)
    flat = A.reshape((-1, m, n))
    N = flat.shape[0]
    rng = check_random_state(random_state)
    trial = None
    if svd_solver == "auto":
        trial = _auto_plan(k, m, n, n_oversamples, iterated_power)
    elif svd_solver == "randomized" and k + int(n_oversamples) < L:  # else the sketch is the whole space
        it = _auto_power(k, m, n) if iterated_power == "auto" else int(iterated_power)
        trial = (k + int(n_oversamples), it)
    result = None
    if trial is not None:
        ell, it = trial
        # drawn for the whole stack before any split: the result does not depend on n_jobs
        omega = rng.standard_normal((N, L, ell)).astype(flat.dtype, copy=False)
        arrays = (flat, omega)
        if svd_solver == "auto":
            arrays += (rng.standard_normal((N, L, _PROBES)).astype(flat.dtype, copy=False),)
        work = N * (m * n * ell * (2 * it + 2) / 16 + 1e4 * (it + 1))
        out = run_chunked(lambda a, o, *p: _randomized_svd(a, k, it, o, *p), arrays, resolve_n_jobs(n_jobs, N, work))
        if svd_solver == "randomized" or bool(np.all(out[3])):
            result = out[:3] + ("randomized",)
    if result is None:
        jobs = _exact_jobs(n_jobs, N, m, n, flat.dtype)

        def exact_k(a):  # truncate inside the worker: only k vectors are copied and joined
            U, s, Vt = _exact_svd(a, in_workers=min(jobs, N) > 1)
            return (
                np.ascontiguousarray(U[..., :k]),
                s if full_spectrum else np.ascontiguousarray(s[..., :k]),
                np.ascontiguousarray(Vt[..., :k, :]),
            )

        result = run_chunked(exact_k, (flat,), jobs) + ("full",)
    U, s, Vt, solver = result
    _flip(U, Vt)
    return (U.reshape(batch + U.shape[-2:]), s.reshape(batch + s.shape[-1:]), Vt.reshape(batch + Vt.shape[-2:]), solver)

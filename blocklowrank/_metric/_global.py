"""The global (LoRA) fit in a data metric, exact on one side or two, by LAPACK or sketching.

One side (``H`` absent): the best rank-``r`` ``M`` minimising
``f(M) = tr((W - M) G (W - M)^T) = ||(W - M) L||_F^2`` (any ``L L^T = G``) is
``M = U_r U_r^T W`` with ``U_r`` the top ``r`` left singular vectors of
``W L``: for any ``M`` of rank ``r``, ``||(W - M) L|| >= ||W L - [W L]_r||``
(Eckart-Young, ``M L`` has rank ``<= r``), and ``U_r U_r^T W L = [W L]_r``
attains it. No inverse of ``G`` is needed, so a singular ``G`` needs no
damping here; ``M`` is an orthogonal projection of ``W``'s columns, so
``||M||_2 <= ||W||_2`` whatever ``G``.

Two sides (``H = K K^T``): ``f(M) = ||K^T (W - M) L||_F^2``, and ``K^T M L``
ranges over every matrix of rank ``<= r`` (K, L invertible), so the optimum
is ``K^T M L = [K^T W L]_r = U_r U_r^T K^T W L``, that is
``M = K^{-T} U_r U_r^T K^T W`` (an H-orthogonal projection of ``W``); for a
singular ``H`` (no damping) ``K^{+T}`` acts in ``H``'s range and ``M`` has no
component on the outputs ``H`` does not weigh.

In both cases the discarded energy is ``f(M_r) = sum_{k > r} s_k^2`` over the
singular values ``s`` of ``K^T W L``: the error of every rank at once.
Factors: ``B = K^{-T} U_r S_r`` (m x r) and ``A = S_r^{-1} U_r^T K^T W``
(= ``V_r^T L^{-1}``, rows orthonormal in ``G_delta``), the engine's
``B = U S``, ``A = V^T`` when ``G = H = I``; components with ``s_k = 0`` are
zero. Signs: the largest-magnitude entry of every row of ``A`` is positive.

Solvers. ``output_error`` needs the total ``f(0) = ||K^T W L||_F^2``, which
costs ``m n^2 / 2`` multiply-adds through the triangular factor whatever the
route (``m`` quadratic forms in ``n`` variables; no cheaper exact route for a
dense ``G``). Forming ``K^T W L`` costs the same, so by default it is formed
once (one layer-sized array) and the engine's solvers run on it unchanged
("full", "randomized", certified "auto"). ``sketch="operator"`` keeps to
products (:class:`MetricOperator`) for layers where that array does not fit.
"""

from __future__ import annotations

import numpy as np
from sklearn.utils import check_random_state

from .._params import SVD_OPTIONS, validate_params
from .._svd import _FIRST_STAGE, _PROBES, _auto_plan, _auto_power, _certified, _flip, _solve
from ._objective import _CHUNK_ELEMS, _DIRECT, _data_energy, finish, prepare, totals

__all__ = ["fit_global", "global_svd", "global_fit"]


@validate_params("gram_damping", "sketch", *SVD_OPTIONS, rank="shared_rank")
def fit_global(
    W,
    rank,
    input_gram,
    output_gram=None,
    *,
    gram_damping=None,
    svd_solver="full",
    n_oversamples=10,
    iterated_power="auto",
    random_state=None,
    n_jobs=None,
    sketch="formed",
):
    """The best rank-``rank`` approximation of ``W`` in the metric ``||H^{1/2} (W - M) G^{1/2}||_F``.

    Parameters
    ----------
    W : array-like of shape (m, n)
        float32 stays float32 (products and SVD in float32, energies in float64).
    rank : int
        ``r >= 1``; components beyond the metric's rank are zero.
    input_gram : array-like (n, n) or GramFactor
        ``G``, e.g. ``X^T X / n_samples`` of the layer's inputs (see
        :class:`GramFactor`; build one per input
        site and pass it to every layer reading that input).
    output_gram : array-like (m, m) or GramFactor, optional
        ``H``, an output-side weight; absent: ``H = I``.
    gram_damping : float, optional
        ``delta``: fit in ``G + delta mean(diag G) I`` (and ``H`` likewise);
        default :data:`GRAM_DAMPING` for an array, a GramFactor's own damping.
    svd_solver : {"full", "randomized", "auto"}, default="full"
        The engine's solvers (:func:`blocklowrank.batched_svd`) applied
        to ``K^T W L``: "full" (LAPACK), "randomized", or "auto" (the sketch
        where its a-posteriori certificate proves a discarded energy within
        ``1 + 1e-6`` of the optimum, else "full").
    n_oversamples, iterated_power, random_state, n_jobs
        As in :func:`blocklowrank.approximate`.
    sketch : {"formed", "operator"}, default="formed"
        How the randomized solvers see ``K^T W L``. "formed": built once by
        chunks (``m n^2 / 2`` multiply-adds through the triangular factor,
        plus ``m^2 n / 2`` with ``H``; one layer-sized array in W's dtype);
        its energy is the total ``f_delta(0)`` that ``output_error`` needs
        anyway, so the sketch then costs what the plain fit's does.
        "operator": products only, ``K^T W L`` never formed (``W (L Omega)``,
        power iterations through ``L^T (W^T (K Q))``, order
        ``(n^2 / 2 + m n + m^2 / 2) l`` per product); the total is then a
        separate ``m n^2 / 2`` pass by column chunks. For memory-bound
        layers; slower when ``n > m`` (see benchmarks/bench_metric.py).

    Returns
    -------
    MetricFit
        ``factors[(0, 0)] = (B, A)`` and ``singular_values[(0, 0)]`` (all of
        them with "full"; the sketch's with "randomized").
    """
    p = prepare(W, input_gram, output_gram, gram_damping)
    svd = (svd_solver, n_oversamples, iterated_power)
    return _fit_global(p, rank, svd, check_random_state(random_state), n_jobs, sketch)


def _fit_global(p, rank, svd, rng, n_jobs, sketch="formed"):
    """:func:`fit_global` on a prepared problem."""
    k = min(rank, p.H.rank, p.G.rank)
    return global_fit(p, rank, *global_svd(p, k, svd, rng, n_jobs, sketch))


def global_svd(p, k, svd, rng, n_jobs, sketch="formed"):
    """``(U, s, solver, totals)``: the leading ``k`` left singular vectors of ``K^T W L`` and its
    singular values (all of them with the exact solver), the solver used, ``(f(0), f_delta(0))``."""
    out = _operator_route(p, k, svd, rng) if sketch == "operator" and svd[0] != "full" else None
    if out is None:  # form K^T W L once: its energy is the total, and the engine's solvers apply as they are
        KWL = _form(p.W, p.G, p.H)
        f0 = float(np.einsum("ij,ij->", KWL, KWL, dtype=np.float64))
        U, s, _, used = _solve(KWL[None], k, svd[0], svd[1], svd[2], rng, n_jobs, True)
        del KWL
        out = (U[0], s[0], used, totals(p.W, p.G, p.H, f0))
    return out


def global_fit(p, rank, U, s, used, tots):
    """The rank-``rank`` global fit from :func:`global_svd`'s output: a :class:`MetricFit`."""
    k = min(rank, U.shape[1])
    B, A = _factors(p.W, p.G, p.H, U[:, :k], s[:k])
    s64 = s.astype(np.float64)
    if used == "full":  # every singular value: the tail, without cancellation
        f_delta = float(np.sum(s64[k:] ** 2))
    else:  # a projection: f = total - captured (Eckart-Young), from the residual where that cancels
        f_delta = max(tots[1] - float(np.sum(s64[:k] ** 2)), 0.0)
        if f_delta < _DIRECT * tots[1]:
            f_delta = _data_energy(np.asarray(p.W, np.float64) - B.astype(np.float64) @ A, p.G, p.H)[1]
    if k < rank:
        B = np.concatenate([B, np.zeros((B.shape[0], rank - k), B.dtype)], axis=1)
        A = np.concatenate([A, np.zeros((rank - k, A.shape[1]), A.dtype)], axis=0)
    err = np.sqrt(f_delta / tots[1]) if tots[1] > 0 else 0.0
    fac, spec = {(0, 0): (B, A)}, {(0, 0): s}
    return finish(p, fac, spec, f_delta, tots, [err], 1, "exact", used == "full", used)


def _form(W, G, H):
    """``K^T W L`` in W's dtype, by row chunks of ``W`` (``m n^2 / 2`` multiply-adds through the
    triangular factor) and column chunks for ``K^T`` (``m^2 n / 2``): one layer-sized result."""
    m, n = W.shape
    A = np.empty((m, G.rank), W.dtype)
    step = max(1, _CHUNK_ELEMS // max(n, 1))
    for r0 in range(0, m, step):
        A[r0 : r0 + step] = G.rmul_factor(W[r0 : r0 + step])
    if H.is_identity:
        return A
    out = np.empty((H.rank, G.rank), W.dtype)
    step = max(1, _CHUNK_ELEMS // max(m, 1))
    for j0 in range(0, G.rank, step):
        out[:, j0 : j0 + step] = H.rmul_factor(A[:, j0 : j0 + step].T).T
    return out


def _operator_route(p, k, svd, rng):
    """``(U, s, solver, totals)`` of the sketch through products only (:class:`MetricOperator`),
    or None where the plan (or the certificate of "auto") sends the fit to the exact route."""
    op = MetricOperator(p.W, p.G, p.H)
    solver, n_over, power = svd
    if solver == "auto":
        trial = _auto_plan(k, *op.shape[1:], n_over, power)
    elif k + n_over < min(op.shape[1:]):
        trial = (k + n_over, _auto_power(k, *op.shape[1:]) if power == "auto" else int(power))
    else:
        trial = None
    if trial is None:
        return None
    tots = totals(p.W, p.G, p.H)  # m n^2: the only pass over W L (by chunks)
    out = _sketch(op, k, *trial, rng, tots[1] if solver == "auto" else None)
    return None if out is None else out + ("randomized", tots)


def _factors(W, G, H, U, s):
    """``B = K^{-T} U S`` and ``A = S^{-1} U^T K^T W`` (zero where ``s`` is zero), signs fixed."""
    s = np.asarray(s, dtype=W.dtype)
    tiny = (s[0] if s.size else 0) * max(W.shape) * np.finfo(W.dtype).eps
    keep = s > tiny
    S = np.where(keep, s, 0)
    B = np.ascontiguousarray(H.rsolve_factor((U * S).T).T, dtype=W.dtype)
    KU = H.rmul_factor_t(np.ascontiguousarray(U.T, dtype=W.dtype))  # (k, m) = (K U)^T
    A = np.ascontiguousarray((KU @ W) / np.where(keep, s, 1)[:, None], dtype=W.dtype)
    A[~keep] = 0
    _flip(B, A)
    return B, A


# ---------------------------------------------------------------------------- the operator K^T W L
class MetricOperator:
    """``K^T W L`` (``p_H x p_G``) as products only: ``A @ X = K^T (W (L X))``,
    ``A^T @ Y = L^T (W^T (K Y))``; never formed.

    Works on matrices and on stacks of one, ``(1, p, k)`` (the shape the
    certificate's helpers use); ``swapaxes(-1, -2)`` is the adjoint.
    """

    def __init__(self, W, G, H, adjoint=False):
        self.W, self.G, self.H, self.adjoint = W, G, H, adjoint
        p = (H.rank, G.rank)
        self.shape = (1,) + (p[::-1] if adjoint else p)

    def swapaxes(self, a, b):
        return MetricOperator(self.W, self.G, self.H, not self.adjoint)

    def __matmul__(self, X):
        X = np.asarray(X)
        if X.ndim == 3:
            return (self @ X[0])[None]
        X = X.astype(self.W.dtype, copy=False)
        if self.adjoint:  # L^T (W^T (K Y))
            KY = self.H.rmul_factor_t(X.T)  # (k, m) = (K Y)^T
            return self.G.rmul_factor(KY @ self.W).T
        LX = self.G.rmul_factor_t(X.T)  # (k, n) = (L X)^T
        return self.H.rmul_factor(LX @ self.W.T).T


def _sketch(op, k, ell, n_power, rng, total):
    """``(U, s)`` of a randomized SVD of the operator (Halko et al., QR every power
    iteration, as :func:`~blocklowrank._svd._randomized_svd`), or None when ``total``
    is given (certified "auto") and the certificate fails after ``n_power`` iterations."""
    dtype = op.W.dtype
    p_H, p_G = op.shape[1:]
    Y = op @ rng.standard_normal((p_G, ell)).astype(dtype, copy=False)
    probe = None if total is None else rng.standard_normal((p_G, _PROBES)).astype(dtype, copy=False)
    stages = [n_power] if probe is None else sorted({min(_FIRST_STAGE, n_power), n_power})
    done = 0
    for stage in stages:
        for _ in range(stage - done):
            Q, _ = np.linalg.qr(Y)
            Y = op @ (op.swapaxes(-1, -2) @ Q)
        done = stage
        Q, _ = np.linalg.qr(Y)
        Uh, s, Vt = np.linalg.svd((op.swapaxes(-1, -2) @ Q).T, full_matrices=False)  # Q^T A
        U = Q @ Uh
        if probe is None or _certified(op, Q[None], U[None], s[None], Vt[None], k, probe[None], [total])[0]:
            return U[:, :k], s
    return None

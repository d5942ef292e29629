"""A fallback for any structure: majorisation-minimisation of the metric objective by plain fits.

For PSD ``H``, ``G`` and any ``Delta``, ``tr(H Delta G Delta^T) <= lambda_H lambda_G ||Delta||_F^2``
when ``lambda_H >= lambda_max(H)`` and ``lambda_G >= lambda_max(G)``. Writing ``M = M_t + Delta``
and ``D_t = W - M_t``,

``f(M) = f(M_t) - 2 <H D_t G, Delta> + tr(H Delta G Delta^T)
<= f(M_t) - 2 <H D_t G, Delta> + c ||Delta||^2 = c ||M - Z_t||^2 + const``

with ``c = lambda_H lambda_G`` and ``Z_t = M_t + H D_t G / c``; equality at
``M = M_t``. So any ``M`` of the structure with ``||Z_t - M|| <= ||Z_t - M_t||``
-- a plain (Frobenius) fit of ``Z_t`` by the structure's own fitter, warm-started
at ``M_t`` -- has ``f(M) <= f(M_t)``: the objective never increases, for hybrid,
BLAST or any structure with a Frobenius fitter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._linalg import STEP_TOL
from .._params import validate_params
from ._objective import (
    _DIRECT,
    MetricRun,
    _data_energy,
    _objective_lowrank,
    descend_one,
    metric_product,
    prepare,
    totals,
)

__all__ = ["fit_majorize", "MajorizeFit"]


@dataclass(frozen=True, eq=False)
class MajorizeFit(MetricRun):
    """The result of :func:`fit_majorize`.

    Attributes
    ----------
    approx : ndarray or (B, A)
        The last accepted fit as the callback returned it (left factor or
        dense matrix in the caller's scale of ``W``).
    state : object
        The callback's state for that fit (its factors, for a warm start).
    objective, total, output_error, error_trace, n_iter, stop_reason
        As in :class:`MetricFit`; ``stop_reason``
        is "tol", "max_iter", "increase" (a step raised ``f`` at the guaranteed
        bound ``c``: rounding) or "callback" (the plain fit was worse on
        ``||Z_t - M||`` than the current iterate).
    lipschitz : float
        The last ``c`` used (normalised units), after ``n_backtracks`` doublings.
    """

    approx: object
    state: object
    lipschitz: float
    n_backtracks: int


@validate_params("gram_damping", "max_iter", "tol")
def fit_majorize(W, input_gram, output_gram=None, *, plain_fit, init=None, gram_damping=None, max_iter=500, tol=1e-6):
    """Minimise ``||H^{1/2} (W - M) G^{1/2}||_F`` over a structure given only its plain fitter.

    Parameters
    ----------
    W : array-like of shape (m, n)
    input_gram, output_gram, gram_damping
        As in :func:`fit_global`.
    plain_fit : callable
        ``plain_fit(Z, state) -> (M, state)``: a Frobenius fit of the target
        ``Z`` (m x n, float64) by the structure, warm-started from ``state``
        (None on the first call); ``M`` is a dense (m, n) array or a pair
        ``(B, A)`` with ``M = B @ A`` (then every product with the Grams
        costs ``(m^2 + n^2 + m n) R`` instead of ``m n^2 + m^2 n``). It must be
        no worse on ``||Z - M||`` than the fit ``state`` describes (checked).
    init : (M, state), optional
        The start; default ``plain_fit(W, None)``, the plain fit, so the
        result is never worse than it in the metric.
    max_iter : int, default=500
        Passes: the start, then one majorisation step each.
    tol : float, default=1e-6
        Stop when a step improves the relative error by a fraction ``<= tol``.

    Returns
    -------
    MajorizeFit

    Notes
    -----
    ``c = lambda_H lambda_G`` starts from a power-iteration estimate of the
    largest eigenvalues (times 1.001; exact for diagonal Grams) and doubles,
    up to the guaranteed bound ``min(trace, ||.||_F)`` of each, whenever a
    step would increase ``f``: every accepted step is a majorisation step, ``f``
    never increases. The passes run through the project's stopping loop
    (``n_iter`` counts the start as the first pass).
    Convergence is linear at a rate about ``1 - lambda_min / lambda_max`` of
    the metric on the structure's tangent space: slow for ill-conditioned
    Grams (damping helps), which is why the layout structures use exact
    block steps instead.
    """
    p = prepare(W, input_gram, output_gram, gram_damping)
    if not callable(plain_fit):
        raise TypeError(f"plain_fit must be callable (Z, state) -> (M, state), got {plain_fit!r}")
    return majorize(p, plain_fit, init, max_iter, tol)


class _Iterate:
    """A fit ``M`` as given by the callback, with ``P = H_d (W - M) G_d`` and ``f_delta(M)``."""

    def __init__(self, p, P0, f0, M, state):
        self.M, self.state = M, state
        if isinstance(M, tuple):
            B, A = (np.asarray(a, np.float64) for a in M)
            self.dense = B @ A
            HB = p.H.rmul(B.T).T
            self.P = P0 - HB @ p.G.rmul(A)
        else:
            self.dense = np.array(M, dtype=np.float64)
            self.P = P0 - metric_product(p, self.dense)
        D = np.asarray(p.W, np.float64) - self.dense
        self.f = float(np.einsum("ij,ij->", self.P, D))
        if self.f < _DIRECT * f0:  # cancellation: from the dense residual
            self.f = _data_energy(D, p.G, p.H)[1]


def majorize(p, plain_fit, init, max_iter, tol):
    """:func:`fit_majorize` on a prepared problem."""
    W = np.asarray(p.W, np.float64)
    P0 = metric_product(p, W)
    f0 = float(np.einsum("ij,ij->", P0, W))
    M, state = plain_fit(W.copy(), None) if init is None else init
    (eg, ug), (eh, uh) = p.G.lambda_max(), p.H.lambda_max()
    c = eg * eh if (eg == ug and eh == uh) else min(eg * eh * 1.001, ug * uh)
    run = _Run(p, P0, f0, _Iterate(p, P0, f0, M, state), c, ug * uh, plain_fit)
    trace, n_iter, reason = descend_one(run.cur.f, f0, run.propose, max_iter, tol)
    if run.callback:
        reason = "callback"
    return _result(p, run.cur, f0, trace, n_iter, reason, run.c, run.backtracks)


class _Run:
    """The state of a majorisation: the current iterate, ``c`` and its doublings."""

    def __init__(self, p, P0, f0, cur, c, c_up, plain_fit):
        self.p, self.P0, self.f0, self.cur, self.c, self.c_up, self.plain_fit = p, P0, f0, cur, c, c_up, plain_fit
        self.backtracks, self.callback = 0, False

    def rel(self, f):
        return np.sqrt(max(f, 0.0) / self.f0) if self.f0 > 0 else 0.0

    def propose(self):
        """One majorisation step (``c`` doubled while a step would raise ``f``): ``(f, commit)``."""
        cur = self.cur
        while True:
            Z = cur.dense + cur.P / self.c
            M, state = self.plain_fit(Z, cur.state)
            new = _Iterate(self.p, self.P0, self.f0, M, state)
            if np.linalg.norm(Z - new.dense) > np.linalg.norm(Z - cur.dense) * (1 + STEP_TOL):
                self.callback = True
                return np.inf, lambda: None
            if self.rel(new.f) > self.rel(cur.f) + STEP_TOL and self.c < self.c_up:
                self.c, self.backtracks = min(2 * self.c, self.c_up), self.backtracks + 1
                continue
            return new.f, lambda: setattr(self, "cur", new)


def _result(p, cur, f0, trace, n_iter, reason, c, backtracks):
    tots = totals(p.W, p.G, p.H, f0)
    f = cur.f
    if p.G.shift or p.H.shift:
        if isinstance(cur.M, tuple):
            B, A = (np.asarray(a, np.float64) for a in cur.M)
            f = _objective_lowrank(p.W, B, A, p.G, p.H, tots)
        else:
            f = _data_energy(np.asarray(p.W, np.float64) - cur.dense, p.G, p.H)[0]
    M = cur.M
    if p.w_exp:
        M = (p.unscale_left(M[0]), M[1]) if isinstance(M, tuple) else p.unscale_left(M)
    e2 = p.log2_energy
    return MajorizeFit(
        approx=M,
        state=cur.state,
        objective=float(np.ldexp(cur.f, e2)),
        total=float(np.ldexp(f0, e2)),
        output_error=float(np.sqrt(f / tots[0])) if tots[0] > 0 else 0.0,
        error_trace=np.asarray(trace),
        n_iter=n_iter,
        stop_reason=reason,
        lipschitz=float(c),
        n_backtracks=backtracks,
    )

"""What the iterative fits (hybrid, shared basis) share: input preparation and the result.

The stopping loop they share is :func:`blocklowrank._descent.descend` (below the
engine, so that the fits in a data metric use it too).
"""

from __future__ import annotations

import numpy as np

from .._engine import Approximation, FitReport
from .._validation import pow2_scale, validate_matrix
from ..factors import StructuredFactors

__all__ = ["prepare", "iterative_result", "damping_doc"]


def damping_doc(fit):
    """The ``gram_damping`` entry of an iterative estimator's parameters, pointing at its fit function ``fit``."""
    return f"""
    gram_damping : float, default=None
        Damping of a fit in a data metric (``fit(X, input_gram=G)``; see
        :func:`{fit}`); None: :data:`blocklowrank.GRAM_DAMPING`.
"""


def prepare(X):
    """Validated ``X`` as a float64 stack ``(N, m, n)`` (power-of-two scaled when extreme),
    with its dtype, batch shape and scale."""
    X = validate_matrix(X)
    m, n = X.shape[-2:]
    scale = pow2_scale(X)
    Xd = np.asarray(X if scale is None else np.ldexp(X, scale), dtype=np.float64).reshape((-1, m, n))
    return Xd, X.dtype, X.shape[:-2], scale


def iterative_result(
    layout, err, trace, batch, dtype, scale, *,
    blocks=None, global_factors=None, shared=None, structure=None, solver=None, metric=None,
):  # fmt: skip
    """One :class:`~blocklowrank.Approximation` from the arrays of a stacked fit and its ``Trace``.

    Every array has a leading axis of length N (the flattened stack); they are
    reshaped to ``batch``, cast to ``dtype`` and unscaled (left factors, or the
    couplings of shared bases, by the power-of-two exponents ``scale``).
    ``metric``: the report's fields of a fit in a data metric (``output_error``,
    ``objective``, ``total_objective``: arrays over the N matrices; ``gram_damping``).
    """
    k = None if scale is None else scale.reshape(-1)

    def shaped(a, left=False):
        if left and k is not None:
            a = np.ldexp(a, -k.reshape((-1,) + (1,) * (a.ndim - 1)))
        return np.ascontiguousarray(a.reshape(batch + a.shape[1:]), dtype=dtype)

    kw = {}
    if shared is not None:
        U, V, S = shared
        kw["shared"] = ([shaped(u) for u in U], [shaped(v) for v in V], shaped(S, left=True))
    else:
        kw["factors"] = {k: (shaped(B, True), shaped(A)) for k, (B, A) in blocks.items()}
        if global_factors is not None:
            kw["global_factors"] = (shaped(global_factors[0], True), shaped(global_factors[1]))
    factors = StructuredFactors(layout, structure=structure, **kw)
    errors, n_done, stop = trace.errors, trace.n_iter, trace.stop
    width = int(np.sum(~np.isnan(errors), axis=1).max())
    for key, value in (metric or {}).items():
        metric[key] = np.reshape(value, batch) if batch and key != "gram_damping" else value
        if not batch and key != "gram_damping":
            metric[key] = float(np.reshape(value, -1)[0])
    if batch:
        rep = dict(
            error=err.reshape(batch),
            n_iter=n_done.reshape(batch),
            stop_reason=stop.astype(str).reshape(batch),
            error_trace=errors[:, :width].reshape(batch + (width,)),
        )
    else:
        rep = dict(error=float(err[0]), n_iter=int(n_done[0]), stop_reason=str(stop[0]), error_trace=errors[0, :width])
    return Approximation(factors, FitReport(svd_solver=dict(solver or {}), **rep, **(metric or {})))

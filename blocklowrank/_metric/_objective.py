"""The objective ``f(M) = ||H^{1/2} (W - M) G^{1/2}||_F^2``: energies, its value from factors,
``output_error``, the result of a metric fit and the stopping rule of the iterative ones.

Units: a :class:`GramFactor` stores its Gram divided
by ``2**log2_scale`` and ``W`` may be rescaled by a power of two (see
:func:`prepare`); every energy here is in those units and multiplied back by
:attr:`Problem.log2_energy` (``ldexp``, exact) where it is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._descent import Trace, descend
from .._validation import pow2_scale, validate_matrix
from ._gram import as_gram

__all__ = ["MetricRun", "MetricFit", "Problem", "prepare", "grams", "output_error", "metric_energy"]

#: Column chunks of the energy passes hold about this many entries (32 MB of float64).
_CHUNK_ELEMS = 1 << 22
#: Below ``f / f(0) < _DIRECT`` the objective from factors (a difference of large
#: terms, off by about ``eps f(0)``) is recomputed from the dense residual.
_DIRECT = 100 * np.sqrt(np.finfo(np.float64).eps)


@dataclass(frozen=True, eq=False)
class MetricRun:
    """How a fit in a data metric went (the fields every metric fit reports; see :class:`MetricFit`)."""

    objective: float
    total: float
    output_error: float
    error_trace: np.ndarray
    n_iter: int
    stop_reason: str


@dataclass(frozen=True, eq=False)
class MetricFit(MetricRun):
    """A fit in a data metric: its factors and how it went.

    Attributes
    ----------
    factors : dict
        ``{(i, j): (B, A)}`` for every active block (``(0, 0)`` for the global
        fit), ``B`` of shape ``(m_i, r_ij)`` and ``A`` of shape ``(r_ij, n_j)``,
        in the dtype of ``W``; ``B = K^{-T} U_r S_r`` and ``A = V_r^T L^{-1}``
        where ``U S V^T`` is the SVD of the block's target in its metric
        (so ``A G_delta A^T = I`` on kept components; see each fit).
    singular_values : dict
        ``{(i, j): s}``: the metric spectrum of each block's (last) target;
        ``sum_{k > r} s_k^2`` is that block's share of the damped objective.
    objective, total : float
        The damped objective ``f_delta(M)`` minimised, and ``f_delta(0)``.
    output_error : float
        ``sqrt(f(M) / f(0))`` with the undamped Grams (the data objective):
        the relative error of the layer's outputs on the calibration inputs.
    error_trace : ndarray
        ``sqrt(f_delta / f_delta(0))`` at the start and after every accepted pass.
    n_iter : int
        Passes run, the start included (the convention of every iterative
        fit); 1 for a closed form.
    stop_reason : str
        "exact" (closed form or one exact sweep), "tol", "max_iter",
        "increase", or "callback" for the majorisation fallback.
    exact : bool
        Whether the result is provably the optimum of ``f_delta``.
    svd_solver : str
        Solver of the SVDs ("full", "randomized"; "auto" resolved).
    """

    factors: dict
    singular_values: dict
    exact: bool
    svd_solver: str


@dataclass(eq=False)
class Problem:
    """A validated metric problem: ``W`` (power-of-two scaled), the two Grams and the units."""

    W: np.ndarray
    G: object
    H: object
    dtype: np.dtype
    w_exp: int  # W was multiplied by 2**w_exp

    @property
    def log2_energy(self):
        """Energies in these units times ``2**log2_energy`` are in the caller's units."""
        return self.G.log2_scale + self.H.log2_scale - 2 * self.w_exp

    def unscale_left(self, B):
        """Left factors back to the caller's scale of W."""
        return np.ldexp(B, -self.w_exp) if self.w_exp else B


def prepare(W, input_gram, output_gram=None, gram_damping=None, *, array_damping=None):
    """Validated :class:`Problem`: ``W`` a finite real matrix (float32 kept), ``input_gram`` of side
    ``n`` and ``output_gram`` (None: absent) of side ``m`` as Gram factors (arrays or shared
    :class:`GramFactor` objects; ``gram_damping`` as in :func:`as_gram`, ``array_damping`` the
    damping of a Gram given as an array when ``gram_damping`` is None)."""
    W = validate_matrix(W, name="W", max_ndim=2)
    m, n = W.shape
    G, H = grams(input_gram, output_gram, (m, n), gram_damping, array_damping)
    k = pow2_scale(W)
    w_exp = 0 if k is None else int(k[0, 0])
    return Problem(np.ldexp(W, w_exp) if w_exp else W, G, H, W.dtype, w_exp)


def grams(input_gram, output_gram, shape, gram_damping=None, array_damping=None):
    """``(G, H)`` as Gram factors for a layer of ``shape`` (m, n) (see :func:`prepare`)."""
    m, n = shape

    def one(gram, size, name):
        d = gram_damping
        if d is None and array_damping is not None and gram is not None and not hasattr(gram, "rmul_factor"):
            d = array_damping
        return as_gram(gram, size, damping=d, name=name)

    return one(input_gram, n, "input_gram"), one(output_gram, m, "output_gram")


# ---------------------------------------------------------------------------- energies
def _energies(X, G, H, need_kx=False):
    """``(||K^T X L||^2, ||X L||^2, ||K^T X||^2 or None)`` of ``X`` (m, n) in float64 sums.

    By column chunks of ``L`` (rows above a Cholesky column block are zero and
    skipped: ``m n^2`` multiply-adds in all), never an ``m x n`` temporary of
    ``X L`` unless ``H`` is present (``K^T`` mixes rows; then one chunk at a time).
    """
    m, n = X.shape
    eye = np.eye(n, dtype=X.dtype)
    step = max(1, _CHUNK_ELEMS // max(m, 1))
    e_kxl = e_xl = 0.0
    for j0 in range(0, G.rank, step):
        j1 = min(j0 + step, G.rank)
        r0, F = _factor_columns(G, j0, j1, eye)
        Z = X[:, r0:] @ F  # (m, chunk) of X L
        e_xl += float(np.einsum("ij,ij->", Z, Z, dtype=np.float64))
        if not H.is_identity:
            KZ = H.rmul_factor(Z.T)  # (chunk, p_H): (K^T Z)^T
            e_kxl += float(np.einsum("ij,ij->", KZ, KZ, dtype=np.float64))
    if H.is_identity:
        e_kxl = e_xl
    e_kx = None
    if need_kx:
        e_kx = 0.0
        for j0 in range(0, n, step):
            KX = H.rmul_factor(X[:, j0 : j0 + step].T)
            e_kx += float(np.einsum("ij,ij->", KX, KX, dtype=np.float64))
    return e_kxl, e_xl, e_kx


def _factor_columns(G, j0, j1, eye):
    """``(r0, F[r0:, j0:j1])``: a column block of the factor, rows above ``r0`` being zero."""
    if G.is_identity:
        return j0, eye[j0:, j0:j1]
    f = G._arrays(eye.dtype)
    if f.L is not None:
        return j0, f.L[j0:, j0:j1]
    return 0, f.Q[:, j0:j1] * f.sqrt_w[j0:j1]


def _data_energy(X, G, H):
    """``(f(X), f_delta(X))``: ``tr(H X G X^T)`` with the undamped and the damped Grams.

    ``tr((H_d - a I) X (G_d - b I) X^T) = ||K^T X L||^2 - b ||K^T X||^2 - a ||X L||^2 + a b ||X||^2``
    with ``a``, ``b`` the shifts of ``H``, ``G`` (normalised units).
    """
    a, b = H.shift, G.shift
    e_kxl, e_xl, e_kx = _energies(X, G, H, need_kx=bool(b) and not H.is_identity)
    if not (a or b):
        return e_kxl, e_kxl
    x2 = float(np.einsum("ij,ij->", X, X, dtype=np.float64))
    if e_kx is None:
        e_kx = x2 if H.is_identity else 0.0  # b = 0 when not needed
    return max(e_kxl - b * e_kx - a * e_xl + a * b * x2, 0.0), e_kxl


def totals(W, G, H, f_delta0=None):
    """``(f(0), f_delta(0))``; from a known ``f_delta(0)`` without a pass over ``W`` when
    ``H`` is absent (``f(0) = f_delta(0) - b ||W||^2``) or nothing is damped."""
    if f_delta0 is None:
        return _data_energy(W, G, H)
    if not (G.shift or H.shift):
        return f_delta0, f_delta0
    if H.is_identity:
        w2 = float(np.einsum("ij,ij->", W, W, dtype=np.float64))
        return max(f_delta0 - G.shift * w2, 0.0), f_delta0
    return _data_energy(W, G, H)


def finish(p, factors, spectra, f_delta, tots, trace, n_iter, stop, exact, solver, edges=(None, None)):
    """The :class:`MetricFit` in the caller's units: factors cast to W's dtype, left factors and
    energies unscaled, and the undamped ``output_error`` (from the factors, cheaply)."""
    f = f_delta = max(f_delta, 0.0)
    if p.G.shift or p.H.shift:
        Bb, Ab = _stack_factors(factors, p.W.shape, *edges)
        f = _objective_lowrank(p.W, Bb, Ab, p.G, p.H, tots)
    err = float(np.sqrt(f / tots[0])) if tots[0] > 0 else 0.0
    e2 = p.log2_energy
    out = {k: (np.asarray(p.unscale_left(B), p.dtype), np.asarray(A, p.dtype)) for k, (B, A) in factors.items()}
    s_unit = float(np.sqrt(2.0**e2))
    return MetricFit(
        factors=out,
        singular_values={k: np.asarray(v, np.float64) * s_unit for k, v in spectra.items()},
        objective=float(np.ldexp(f_delta, e2)),
        total=float(np.ldexp(tots[1], e2)),
        output_error=err,
        error_trace=np.asarray(trace, dtype=np.float64),
        n_iter=int(n_iter),
        stop_reason=stop,
        exact=bool(exact),
        svd_solver=solver,
    )


def metric_energy(W, input_gram, output_gram=None):
    """``tr(H W G W^T) = ||H^{1/2} W G^{1/2}||_F^2``, the objective of ``M = 0`` (the total energy).

    Costs ``m n^2`` multiply-adds through the Cholesky factor of ``G``
    (half a product ``W G``), plus ``m^2 n`` with ``H``: for a general dense
    ``G`` no exact route is cheaper (``m`` quadratic forms in ``n``
    variables); an eigen-factor of rank ``p`` costs ``m n p``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> W, X = rng.standard_normal((4, 5)), rng.standard_normal((30, 5))
    >>> bool(np.isclose(metric_energy(W, X.T @ X / 30), np.linalg.norm(W @ X.T) ** 2 / 30))
    True
    """
    p = prepare(W, input_gram, output_gram, array_damping=0.0)
    return float(np.ldexp(_data_energy(p.W, p.G, p.H)[0], p.log2_energy))


def metric_product(p, X):
    """``H_delta X G_delta`` (float64, m x n, normalised units): one product ``X G`` and one ``H (X G)``."""
    XG = p.G.rmul(X)
    return XG if p.H.is_identity else p.H.rmul(XG.T).T


# ---------------------------------------------------------------------------- objective of factors
def _stack_factors(factors, shape, row_edges=None, col_edges=None):
    """``(B_big, A_big)`` float64 with ``M = B_big A_big`` from ``{(i, j): (B, A)}`` (block-sparse)."""
    keys = [k for k in factors if np.shape(factors[k][0])[1] > 0]
    R = sum(np.shape(factors[k][0])[1] for k in keys)
    Bb, Ab = np.zeros((shape[0], R)), np.zeros((R, shape[1]))
    t = 0
    for i, j in keys:
        B, A = factors[(i, j)]
        r = B.shape[1]
        rs = slice(None) if row_edges is None else slice(row_edges[i], row_edges[i + 1])
        cs = slice(None) if col_edges is None else slice(col_edges[j], col_edges[j + 1])
        Bb[rs, t : t + r], Ab[t : t + r, cs] = B, A
        t += r
    return Bb, Ab


def _objective_lowrank(W, Bb, Ab, G, H, totals):
    """The undamped ``f(M)`` for ``M = Bb Ab`` (m x R, R x n) from ``totals = (f(0), f_delta(0))``.

    ``f(M) = f(0) - 2 <H W G, M> + <H M G, M>`` with ``<H W G, M> = <H Bb, W (G Ab^T)>`` and
    ``<H M G, M> = <Bb^T H Bb, Ab G Ab^T>``: ``(m^2 + n^2 + m n) R`` multiply-adds, ``W`` read once (in float64 by row chunks).
    Where the result is below ``_DIRECT f_delta(0)`` (cancellation) it is recomputed from the dense
    residual. (The damped ``f_delta(M) >= f(M)`` is not needed: the fits know it from their spectra.)
    """
    HB = H.rmul(Bb.T, damped=False).T
    GA = G.rmul(Ab, damped=False)
    step = max(1, _CHUNK_ELEMS // max(W.shape[1], 1))  # W in float64 by row chunks, never whole
    cross = sum(
        float(np.einsum("ij,ij->", HB[r : r + step], np.asarray(W[r : r + step], np.float64) @ GA.T))
        for r in range(0, W.shape[0], step)
    )
    quad = float(np.einsum("ij,ij->", Bb.T @ HB, Ab @ GA.T))
    f = totals[0] - 2 * cross + quad
    if f < _DIRECT * max(totals[1], 1e-300):
        return _data_energy(np.asarray(W, np.float64) - Bb @ Ab, G, H)[0]
    return max(f, 0.0)


def output_error(W, approx, input_gram, output_gram=None, *, layout=None):
    """The relative output error ``sqrt(f(M) / f(0))`` of an approximation of ``W`` in a data metric.

    ``f(M) = tr(H (W - M) G (W - M)^T)``; with ``G = X^T X / n_samples`` and
    ``H`` absent this is ``||(W - M) X^T||_F / ||W X^T||_F``, the relative
    error of the layer's outputs on the samples ``X``. Damping is not
    applied (a damped :class:`GramFactor` is
    undamped here).

    Parameters
    ----------
    W : array-like of shape (m, n)
    approx : ndarray (m, n), ``(B, A)`` or ``{(i, j): (B, A)}``
        The approximation ``M``: dense; global factors (``M = B A``, computed
        from the factors in ``(m^2 + n^2 + m n) r`` operations plus the total);
        or block factors with ``layout`` (a :class:`~blocklowrank.layout.BlockLayout`
        without permutation).
    input_gram, output_gram : array-like or GramFactor
        ``G`` (n x n) and optionally ``H`` (m x m).

    Returns
    -------
    float
        0.0 when ``f(0) = 0``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> W, X = rng.standard_normal((6, 5)), rng.standard_normal((40, 5))
    >>> B, A = rng.standard_normal((6, 2)), rng.standard_normal((2, 5))
    >>> e = output_error(W, (B, A), X.T @ X / 40)
    >>> bool(np.isclose(e, np.linalg.norm((W - B @ A) @ X.T) / np.linalg.norm(W @ X.T)))
    True
    """
    p = prepare(W, input_gram, output_gram, array_damping=0.0)
    totals = _data_energy(p.W, p.G, p.H)
    if totals[0] <= 0:
        return 0.0
    Bb, Ab = _approx_factors(approx, p, layout)
    if Bb is None:
        f = _data_energy(np.asarray(p.W, np.float64) - Ab, p.G, p.H)[0]
    else:
        f = _objective_lowrank(p.W, Bb, Ab, p.G, p.H, totals)
    return float(np.sqrt(f / totals[0]))


def _approx_factors(approx, p, layout):
    """``(Bb, Ab)`` of an approximation (scaled like ``p.W``), or ``(None, M)`` for a dense one."""
    m, n = p.W.shape
    scale = 2.0**p.w_exp
    if isinstance(approx, dict):
        if layout is None or tuple(layout.shape) != (m, n) or layout.permuted:
            raise ValueError(f"block factors need the unpermuted layout of shape {(m, n)}")
        fac = {k: (np.asarray(B, np.float64) * scale, np.asarray(A, np.float64)) for k, (B, A) in approx.items()}
        return _stack_factors(fac, (m, n), layout.row_edges, layout.col_edges)
    if isinstance(approx, tuple) and len(approx) == 2:
        B, A = (np.asarray(a, np.float64) for a in approx)
        if B.ndim != 2 or A.ndim != 2 or B.shape[0] != m or A.shape[1] != n or B.shape[1] != A.shape[0]:
            raise ValueError(f"factors (B, A) must have shapes ({m}, r) and (r, {n}), got {B.shape} and {A.shape}")
        return B * scale, A
    M = validate_matrix(approx, name="approx", max_ndim=2)
    if M.shape != (m, n):
        raise ValueError(f"approx must have the shape of W {(m, n)}, got {M.shape}")
    return None, np.asarray(M, np.float64) * scale


# ---------------------------------------------------------------------------- stopping
def descend_one(f_start, total, propose, max_iter, tol):
    """The project's stopping loop (``_descent.descend``) on one problem of the metric fits.

    The objective is the relative damped error ``sqrt(f / total)``; the start
    (``f_start``) is the first pass. ``propose`` (a callable, or a list of them:
    the steps of one pass) ``() -> (f, commit)`` runs a step on copies and
    returns its objective and how to keep it. Returns ``(trace, n_iter,
    stop_reason)``: the trace has the start and every accepted step, ``n_iter``
    counts passes, the start included (the convention of every iterative fit).
    """

    def rel(f):
        return float(np.sqrt(max(f, 0.0) / total)) if total > 0 else 0.0

    steps = list(propose) if isinstance(propose, (list, tuple)) else [propose]
    trace = Trace(1, 1 + len(steps) * max(max_iter - 1, 0))
    trace.record(np.arange(1), np.array([rel(f_start)]))

    def wrap(one):
        def step(ids):
            f, commit = one()

            def keep(accepted):
                if accepted[0]:
                    commit()

            return np.array([rel(f)]), keep

        return step

    descend(trace, [wrap(one) for one in steps], max_iter=max_iter, tol=tol)
    return trace.errors[0, : trace.length[0]].copy(), int(trace.n_iter[0]), str(trace.stop[0])

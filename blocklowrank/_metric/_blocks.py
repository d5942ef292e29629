"""Block structures in a data metric: exact block steps, block-coordinate descent, per-block spectra.

Notation: the grid cuts ``W`` into blocks ``W_ic`` (rows ``i``, columns ``c``);
``G_cc``, ``H_ii`` are the diagonal blocks of the (damped) Grams with factors
``L_c L_c^T = G_cc``, ``K_i K_i^T = H_ii``; ``M`` is zero outside the active blocks.

**One block given the others.** Write ``M = M_0 + E_i X E_c^T`` where ``M_0``
holds the other blocks, ``R = W - M_0``. Then
``f = tr(H (R - E_i X E_c^T) G (R - E_i X E_c^T)^T)
= f(M_0) - 2 <(H R G)_ic, X> + tr(H_ii X G_cc X^T)``, and with
``T = H_ii^{-1} (H R G)_ic G_cc^{-1}`` it is
``const + ||K_i^T (X - T) L_c||_F^2``: the best rank-``r`` block is ``T``'s
global fit in the metrics ``H_ii``, ``G_cc`` (Eckart-Young on
``Y = K_i^T T L_c = K_i^{-1} (H R G)_ic L_c^{-T}``, two triangular solves),
``X = K_i^{-T} [Y]_r L_c^{-1}``. Keeping ``P = H (W - M) G`` up to date,
``(H R G)_ic = P_ic + H_ii X_old G_cc``, so ``Y = K_i^{-1} P_ic L_c^{-T} +
(K_i^T X_old L_c)`` and the step lowers ``f`` by
``||Y - K_i^T X_old L_c||^2 - sum_{k > r} s_k(Y)^2 >= 0``.

**Diagonal blocks (MELoRA), H absent: exact.** Without ``H`` the objective
splits over block-rows, ``f = sum_i ||(W_i - M_i) L||^2``. A block-row with a
single active block ``(i, c)`` (the diagonal pattern) depends on that block
only, and in it the other blocks are fixed at zero, so ``R_i = W_i`` and the
one step above is its exact optimum: ``T = (W_i G)[:, c] G_cc^{-1}``, the
target's fit in ``G_cc``. The same holds for any pattern with at most one
active block per block-row.

**Any grid, G and H general: block-coordinate descent.** Sweeping the
active blocks (column by column) with the exact step never increases ``f``;
one sweep is exact when ``G`` is block-diagonal over the column cuts and
``H`` over the row cuts (or absent): then ``T_ic = W_ic`` whatever the other
blocks. Without ``H``, the blocks of one block-column are independent given
the other columns, so a column sweep is the exact column step.

Singular sub-Grams (no damping): solves act in the range of ``G_cc`` / ``H_ii``
(eigen-factor, cutoff ``rcond``; see :class:`GramFactor`),
so blocks have no component on directions the calibration never saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.utils import check_random_state

from .._allocation import allocate_ranks, no_worse_than_uniform
from .._linalg import STEP_TOL
from .._params import SVD_OPTIONS, validate_params
from .._svd import _exact_svd, _solve
from ..layout import BlockLayout
from ._objective import _DIRECT, Stop, _data_energy, finish, metric_product, prepare, totals

__all__ = ["fit_blocks", "metric_block_spectra", "MetricSpectra"]


@validate_params("gram_damping", "max_iter", "tol", *SVD_OPTIONS)
def fit_blocks(
    W,
    layout,
    input_gram,
    output_gram=None,
    *,
    gram_damping=0.0,
    max_iter=100,
    tol=1e-6,
    svd_solver="full",
    n_oversamples=10,
    iterated_power="auto",
    random_state=None,
    init=None,
):
    """Fit the active blocks of ``layout`` (with its ranks) in the metric ``||H^{1/2} (W - M) G^{1/2}||_F``.

    Exact in one step where the blocks decouple (``H`` absent and at most one
    active block per block-row, e.g. MELoRA's diagonal; or ``G`` block-diagonal
    over the column cuts and ``H`` over the row cuts); elsewhere
    block-coordinate descent (see the module docstring).

    **Guarantees.** The start is the better, in the metric, of the plain
    (Frobenius) fit of every block (``init`` when given) and the fit of every
    block ``W_ic`` in its own metrics ``H_ii``, ``G_cc`` (the optimum when the
    Grams are block-diagonal); every step is an exact minimisation over one
    block given the others, so the damped objective never increases (a step
    that would raise it, possible only with the randomized solver, is not
    taken), and the result is never worse than the plain fit. It stops when
    a sweep improves the relative error by a fraction ``<= tol`` or after
    ``max_iter`` sweeps; it converges to a stationary point, not necessarily
    the global optimum (for full-rank blocks, a convex problem, to the optimum).

    Parameters
    ----------
    W : array-like of shape (m, n)
    layout : BlockLayout
        Cuts, active blocks and ranks; a permuted layout is fitted in its own
        coordinates (the Grams are permuted once).
    input_gram, output_gram, gram_damping
        As in :func:`fit_global`.
    max_iter : int, default=100
    tol : float, default=1e-6
    svd_solver, n_oversamples, iterated_power, random_state
        For each block's SVD (on the dense ``m_i x n_c`` target).
    init : dict, optional
        ``{(i, j): (B, A)}``, the plain fit (e.g. the engine's), to spare
        recomputing it.

    Returns
    -------
    MetricFit
    """
    p = prepare(W, input_gram, output_gram, gram_damping)
    lay = _check_layout(layout, p)
    svd = (svd_solver, n_oversamples, iterated_power)
    stop = Stop(1.0, max_iter, tol)  # the total is set below
    g = _Grid(p, lay)
    return _fit_blocks(p, g, stop, svd, check_random_state(random_state), init)


def _fit_blocks(p, g, stop, svd, rng, init):
    """:func:`fit_blocks` on a prepared problem."""
    P0 = metric_product(p, p.W)
    g.f0 = f0 = float(np.einsum("ij,ij->", P0, g.W))
    tots = totals(p.W, p.G, p.H, f0)
    stop.total = f0
    if g.one_sweep:
        facs, P, f = {}, P0, f0
    else:
        facs, P, f = _start(g, P0, svd, rng, init)
    stop.start(f)
    reason, spectra, used = None, {}, set()
    while reason is None:
        for i, c, r in g.order:
            step = _step(g, P, facs.get((i, c)), i, c, r, svd, rng)
            spectra[(i, c)] = step.s
            used.add(step.solver)
            if step.B is not None:
                facs[(i, c)] = (step.B, step.A)
        f = g.objective(P, facs)
        reason = "exact" if g.one_sweep else stop.step(f)
    if g.one_sweep:
        stop.step(f)
    facs = {(i, c): facs.get((i, c), g.zero(i, c, r)) for i, c, r in g.all_blocks}
    solver = "full" if used <= {"full"} else "randomized"
    exact = g.one_sweep and solver == "full"
    return finish(p, facs, spectra, f, tots, stop.trace, stop.n_iter, reason, exact, solver, g.edges)


def _check_layout(layout, p):
    """The layout in its own coordinates; permutes ``p`` (W and the Grams) when it is permuted."""
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if tuple(layout.shape) != p.W.shape:
        raise ValueError(f"layout is for shape {layout.shape} but W has shape {p.W.shape}")
    if layout.n_params == 0:
        raise ValueError("the layout has no ranks: give it ranks (layout.with_ranks(r))")
    if layout.permuted:
        p.W = layout.permute(p.W)
        if layout.col_perm is not None:
            p.G = p.G.permuted(layout.col_perm)
        if layout.row_perm is not None:
            p.H = p.H.permuted(layout.row_perm)
        layout = layout.without_permutation()
    return layout


# ---------------------------------------------------------------------------- the grid
class _Grid:
    """A layout over a prepared problem: block slices, sub-Gram factors, the sweep order,
    whether one sweep is exact, and the products and updates of ``P = H (W - M) G``."""

    def __init__(self, p, lay):
        self.p, self.lay = p, lay
        self.W = np.asarray(p.W, dtype=np.float64)
        self.re, self.ce = lay.row_edges, lay.col_edges
        self.edges = (self.re, self.ce)
        kr, kc = lay.n_blocks
        self.all_blocks = [(i, c, int(lay.ranks[i, c])) for c in range(kc) for i in range(kr) if lay.active[i, c]]
        self.order = [(i, c, r) for i, c, r in self.all_blocks if r > 0]  # column by column
        per_row = np.bincount([i for i, _, _ in self.order], minlength=kr)
        rows_split = p.H.is_identity and per_row.max() <= 1
        self.one_sweep = rows_split or (p.G.is_block_diagonal(self.ce) and p.H.is_block_diagonal(self.re))

    def rows(self, i):
        return slice(int(self.re[i]), int(self.re[i + 1]))

    def cols(self, c):
        return slice(int(self.ce[c]), int(self.ce[c + 1]))

    def K(self, i):
        return self.p.H.sub(self.re[i], self.re[i + 1])

    def L(self, c):
        return self.p.G.sub(self.ce[c], self.ce[c + 1])

    def zero(self, i, c, r):
        return np.zeros((self.re[i + 1] - self.re[i], r)), np.zeros((r, self.ce[c + 1] - self.ce[c]))

    def update(self, P, i, c, dB, dA):
        """``P -= H[:, i] (dB dA) G[c, :]``: the change of ``P`` when block (i, c) gains ``dB dA``
        (``dA`` None: the identity, ``dB`` being the whole block)."""
        H, G = self.p.H, self.p.G
        rows, cols = (self.rows(i), self.cols(c))
        left = dB if H.is_identity else H.gram[:, rows] @ dB
        if dA is None:  # dB is the whole block (full rank): dA = I
            right = np.eye(cols.stop - cols.start) if G.is_identity else G.gram[cols, :]
        else:
            right = dA if G.is_identity else dA @ G.gram[cols, :]
        P[rows if H.is_identity else slice(None), cols if G.is_identity else slice(None)] -= left @ right

    def objective(self, P, facs):
        """``f_delta(M) = <P, W - M>``; from the dense residual where that cancels (small ``f``)."""
        D = self.W - self.dense(facs)
        f = float(np.einsum("ij,ij->", P, D))
        if f < _DIRECT * self.f0:
            f = _data_energy(D, self.p.G, self.p.H)[1]
        return max(f, 0.0)

    def dense(self, facs):
        """The dense ``M`` of the block factors (float64)."""
        M = np.zeros(self.W.shape)
        for (i, c), (B, A) in facs.items():
            M[self.rows(i), self.cols(c)] = B @ A
        return M

    def target(self, P, i, c, old):
        """``(Y, ||Y - Y_old||^2)``: block (i, c)'s target in its metrics and its current objective."""
        Ki, Lc = self.K(i), self.L(c)
        Y = Ki.rsolve_factor_t(Lc.rsolve_factor_t(P[self.rows(i), self.cols(c)]).T).T  # K^-1 P L^-T
        obj = float(np.einsum("ij,ij->", Y, Y))
        if old is not None:
            Y = Y + Ki.rmul_factor(old[0].T).T @ Lc.rmul_factor(old[1])  # + K^T X_old L
        return Y, obj

    def from_target(self, i, c, U, s, Vt):
        """``(B, A) = (K_i^{-T} U S, V^T L_c^{-1})``: the block whose metric image is ``U S V^T``."""
        return self.K(i).rsolve_factor((U * s).T).T, self.L(c).rsolve_factor(Vt)


@dataclass
class _Step:
    B: object
    A: object
    s: np.ndarray
    solver: str


def _step(g, P, old, i, c, r, svd, rng):
    """The exact (rank-``r``) minimisation over block (i, c) given the others; updates ``P``."""
    Y, old_obj = g.target(P, i, c, old)
    k = min(r, *Y.shape)
    if k == 0:  # the block's metric has no range: it stays zero
        return _Step(None, None, np.zeros(0), "full")
    U, s, Vt, solver = _solve(Y[None], k, svd[0], svd[1], svd[2], rng, 1, True)
    U, s, Vt = U[0], s[0], Vt[0]
    s2 = s.astype(np.float64) ** 2
    y2 = float(np.einsum("ij,ij->", Y, Y))
    new_obj = float(s2[k:].sum()) if solver == "full" else max(y2 - float(s2[:k].sum()), 0.0)
    if old is not None and new_obj > old_obj + STEP_TOL * y2:  # only a sketch can miss: keep the block
        return _Step(None, None, s, solver)
    B, A = g.from_target(i, c, U[:, :k], s[:k], Vt[:k])
    if k < r:
        B, A = np.pad(B, ((0, 0), (0, r - k))), np.pad(A, ((0, r - k), (0, 0)))
    if old is None:
        g.update(P, i, c, B, A)
    else:
        g.update(P, i, c, np.concatenate([B, -old[0]], axis=1), np.concatenate([A, old[1]], axis=0))
    return _Step(B, A, s, solver)


def _start(g, P0, svd, rng, init):
    """The better (in the metric) of the plain fit and the block-diagonal-Gram closed form:
    ``(factors, P, f)``."""
    W = g.W
    plain = init
    if plain is None:
        plain = {}
        for i, c, r in g.order:
            U, s, Vt, _ = _solve(W[g.rows(i), g.cols(c)][None], r, svd[0], svd[1], svd[2], rng, 1, False)
            plain[(i, c)] = (U[0] * s[0], Vt[0])
    plain = {k: (np.asarray(B, np.float64) * 2.0**g.p.w_exp, np.asarray(A, np.float64)) for k, (B, A) in plain.items()}
    bdiag = {}
    for i, c, r in g.order:
        Ki, Lc = g.K(i), g.L(c)
        Y = Ki.rmul_factor(Lc.rmul_factor(W[g.rows(i), g.cols(c)]).T).T  # K_i^T W_ic L_c
        k = min(r, *Y.shape)
        U, s, Vt, _ = _solve(Y[None], k, svd[0], svd[1], svd[2], rng, 1, False)
        B, A = g.from_target(i, c, U[0], s[0], Vt[0])
        bdiag[(i, c)] = (np.pad(B, ((0, 0), (0, r - k))), np.pad(A, ((0, r - k), (0, 0))))
    best = None
    for facs in (plain, bdiag):
        P = P0.copy()
        for (i, c), (B, A) in facs.items():
            g.update(P, i, c, B, A)
        f = g.objective(P, facs)
        if best is None or f < best[2]:
            best = (facs, P, f)
    return best


# ---------------------------------------------------------------------------- spectra for allocation
@dataclass(eq=False)
class MetricSpectra:
    """Per-block metric spectra of a layout, for rank allocation in the metric.

    Attributes
    ----------
    layout : BlockLayout
    values : dict
        ``{(i, j): s}``: singular values of each active block's target
        ``K_i^T T_ij L_j`` (caller's units).
    fixed_loss : float
        The part of ``f_delta(0)`` no rank can capture (``f_delta(0) - sum ||target||^2``).
    total : float
        ``f_delta(0)``.
    exact : bool
        True where the blocks decouple (one exact sweep: H absent with at most
        one active block per block-row, or block-diagonal Grams): then the
        damped objective at ranks ``r`` is exactly ``fixed_loss + sum of the
        spectra's tails``, and water-filling on them allocates optimally.
        False elsewhere: the values are those of the first sweep's targets
        (from zero, each block at full rank given the blocks before it), a
        heuristic; ``exact_allocation`` is then False.
    """

    layout: BlockLayout
    values: dict
    fixed_loss: float
    total: float
    exact: bool

    def _tails(self, ranks):
        r = np.broadcast_to(np.asarray(ranks), self.layout.n_blocks)
        lost = self.fixed_loss
        for (i, j), s in self.values.items():
            lost += float(np.sum(np.asarray(s, np.float64)[int(r[i, j]) :] ** 2))
        return lost

    def error(self, ranks):
        """The relative damped error ``sqrt(f_delta / f_delta(0))`` at per-block ranks (exact when ``exact``)."""
        return float(np.sqrt(max(self._tails(ranks), 0.0) / self.total)) if self.total > 0 else 0.0

    def allocate(self, *, budget=None, max_error=None):
        """Per-block ranks ``(K_rows, K_cols)`` for a parameter budget or a target relative
        (damped) output error, and ``exact_allocation``: spectra exact and allocation optimal
        (see :func:`blocklowrank.allocate_ranks`)."""
        lay = self.layout
        keys = list(self.values)
        gains = [np.asarray(self.values[k], np.float64)[None, :] ** 2 for k in keys]
        costs = [int(lay.block_costs[k]) for k in keys]
        maxr = [min(int(lay.max_ranks[k]), len(self.values[k])) for k in keys]
        if max_error is not None and budget is None:
            if self.fixed_loss > max_error * max_error * self.total * (1 + 1e-12):
                raise ValueError(
                    f"max_error={max_error} cannot be reached with this structure in this metric: what no "
                    f"rank captures leaves a relative error of {np.sqrt(self.fixed_loss / self.total):.4g}"
                )
            alloc, exact = allocate_ranks(
                gains, costs, maxr, max_error=max_error, fixed_loss=[self.fixed_loss], total=[self.total]
            )
        else:
            alloc, exact = allocate_ranks(gains, costs, maxr, budget=budget, max_error=max_error)
            if not exact:
                alloc = no_worse_than_uniform(alloc, gains, costs, maxr, budget)
        ranks = np.zeros(lay.n_blocks, dtype=np.int64)
        for t, k in enumerate(keys):
            ranks[k] = alloc[0, t]
        return ranks, bool(exact and self.exact)


@validate_params("gram_damping")
def metric_block_spectra(W, layout, input_gram, output_gram=None, *, gram_damping=0.0):
    """Metric spectra of every active block of ``layout`` (ranks ignored): :class:`MetricSpectra`.

    Costs one product ``H W G`` and one SVD (values only) per block; where the
    blocks do not decouple, one full-rank sweep besides (``m n^2`` more
    without ``H``).
    """
    p = prepare(W, input_gram, output_gram, gram_damping)
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    lay = _check_layout(layout.with_ranks(layout.max_ranks), p)
    g = _Grid(p, lay)
    P = metric_product(p, p.W)
    total = float(np.einsum("ij,ij->", P, g.W))
    values, kept = {}, 0.0
    for i, c, _ in g.order:
        Y, _ = g.target(P, i, c, None)
        (s,) = _exact_svd(Y, compute_uv=False) if min(Y.shape) else (np.zeros(0),)
        values[(i, c)] = s
        kept += float(np.einsum("ij,ij->", Y, Y))
        if not g.one_sweep:  # later targets see this block at full rank: X = K^-T Y L^-1
            X = g.L(c).rsolve_factor(g.K(i).rsolve_factor(Y.T).T)
            g.update(P, i, c, X, None)
    e2 = p.log2_energy
    unit = float(np.sqrt(2.0**e2))
    return MetricSpectra(
        layout=layout,
        values={k: v * unit for k, v in values.items()},
        fixed_loss=float(np.ldexp(max(total - kept, 0.0), e2)),
        total=float(np.ldexp(total, e2)),
        exact=bool(g.one_sweep),
    )

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
the other columns, so a column sweep is the exact column step: their targets
are formed together and the equal-shaped ones go through one batched SVD.
The block SVDs run in ``W``'s dtype (float32 for float32 layers); the targets,
``P`` and the objective stay in float64, and a step whose block objective,
computed in float64 from the factors it would store, is higher than the
block's current one is not taken -- so the descent stays monotone whatever the
solver (a sketch, float32). Every sweep's objective is ``<P, W - M>`` from the
incrementally updated ``P`` (measured: it agrees with a fresh ``H (W - M) G`` to
``1e-14`` relative after 60 sweeps, so ``P`` is never refreshed).

**Spectra for allocation.** Where the blocks decouple, the SVDs of the targets
from ``P0 = H W G`` are exact: the damped objective at any ranks is the fixed
loss plus their tails, and a fit at any ranks is a truncation. Elsewhere the
same targets (each block with the others at zero) are a heuristic.

Singular sub-Grams (no damping): solves act in the range of ``G_cc`` / ``H_ii``
(eigen-factor, cutoff ``rcond``; see :class:`GramFactor`),
so blocks have no component on directions the calibration never saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.utils import check_random_state

from .._linalg import STEP_TOL
from .._params import SVD_OPTIONS, validate_params
from .._svd import _flip, _solve
from ..layout import BlockLayout
from ._objective import _DIRECT, _data_energy, descend_one, finish, metric_product, prepare, totals

__all__ = ["fit_blocks", "metric_block_spectra", "MetricSpectra", "BCD_TOL"]

#: Default ``tol`` of the block-coordinate descent: stop when a sweep improves the relative
#: (damped) output error by less than 0.5 %. Measured (benchmarks/bench_metric.py --blocks 4,
#: a 2048 x 2048 float32 layer, K = 4, block rank 16): the sweeps gain 12 %, 2.6 %, 1.2 %,
#: 0.7 %, 0.5 %, 0.4 %, 0.3 %, ... and the error they leave falls slowly; 5e-3 stops after
#: 6 passes (the start counted), within 1.7 % of the error after 15 passes (1e-3), at 40 % of
#: its time. Pass ``tol`` (and ``max_iter``) for more.
BCD_TOL = 5e-3


@validate_params("gram_damping", "max_iter", "tol", *SVD_OPTIONS)
def fit_blocks(
    W, layout, input_gram, output_gram=None, *, gram_damping=None, max_iter=100, tol=BCD_TOL,
    svd_solver="full", n_oversamples=10, iterated_power="auto", random_state=None, n_jobs=None, init=None,
):  # fmt: skip
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
    that would raise it, possible only with a sketch or float32 SVDs, is not
    taken), and the result is never worse than the plain fit. It stops when
    a sweep improves the relative error by a fraction ``<= tol`` or after
    ``max_iter`` passes (the start counted as the first); it converges to a
    stationary point, not necessarily the global optimum (for full-rank
    blocks, a convex problem, to the optimum).

    Parameters
    ----------
    W : array-like of shape (m, n)
        float32 stays float32: the block SVDs run in float32, everything else
        (targets, products, objective) in float64.
    layout : BlockLayout
        Cuts, active blocks and ranks; a permuted layout is fitted in its own
        coordinates (the Grams are permuted once).
    input_gram, output_gram, gram_damping
        As in :func:`fit_global`.
    max_iter : int, default=100
        Passes, the start included.
    tol : float, default=BCD_TOL
    svd_solver, n_oversamples, iterated_power, random_state, n_jobs
        For the block SVDs (on the dense targets; without ``H`` the equal-shaped
        targets of a block-column go through one batched call).
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
    return _fit_blocks(p, _Grid(p, lay), svd, check_random_state(random_state), n_jobs, init, max_iter, tol)


def _fit_blocks(p, g, svd, rng, n_jobs, init, max_iter, tol):
    """:func:`fit_blocks` on a prepared problem and its grid."""
    P0 = g.start_product()
    tots = totals(p.W, p.G, p.H, g.f0)
    if g.one_sweep:
        svds = decoupled_svds(g, P0, svd, rng, n_jobs)
        return truncated_fit(p, g, svds, g.lay.ranks, tots)
    state = _start(g, P0, svd, rng, n_jobs, init)

    def propose():
        new = state.copy()
        sweep(g, new, svd, rng, n_jobs)
        new.f = g.objective(new.P, new.facs)
        return new.f, lambda: state.__dict__.update(new.__dict__)

    trace, n_iter, reason = descend_one(state.f, g.f0, propose, max_iter, tol)
    solver = "full" if state.solvers <= {"full"} else "randomized"
    facs = g.complete(state.facs)
    return finish(p, facs, state.spectra, state.f, tots, trace, n_iter, reason, False, solver, g.edges)


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
        self.columns = [(c, [(i, r) for i, cc, r in self.order if cc == c]) for c in range(kc)]
        per_row = np.bincount([i for i, _, _ in self.order], minlength=kr)
        rows_split = p.H.is_identity and per_row.max(initial=0) <= 1
        self.one_sweep = rows_split or (p.G.is_block_diagonal(self.ce) and p.H.is_block_diagonal(self.re))
        self.f0 = None

    def start_product(self):
        """``P0 = H W G`` (float64) and ``f_delta(0) = <P0, W>`` (stored as ``f0``)."""
        P0 = metric_product(self.p, self.W)
        self.f0 = float(np.einsum("ij,ij->", P0, self.W))
        return P0

    def rows(self, i):
        return slice(int(self.re[i]), int(self.re[i + 1]))

    def cols(self, c):
        return slice(int(self.ce[c]), int(self.ce[c + 1]))

    def K(self, i):
        return self.p.H.sub(self.re[i], self.re[i + 1])

    def L(self, c):
        return self.p.G.sub(self.ce[c], self.ce[c + 1])

    def complete(self, facs):
        """Factors of every active block (zeros for the blocks of rank 0 or never fitted)."""
        out = {}
        for i, c, r in self.all_blocks:
            mi, nc = self.re[i + 1] - self.re[i], self.ce[c + 1] - self.ce[c]
            out[(i, c)] = facs.get((i, c), (np.zeros((mi, r)), np.zeros((r, nc))))
        return out

    def update(self, P, i, c, dB, dA=None):
        """``P -= H[:, i] (dB dA) G[c, :]``: the change of ``P`` when block (i, c) gains ``dB dA``
        (``dA`` None: ``dB`` is the whole block)."""
        H, G = self.p.H, self.p.G
        rows, cols = self.rows(i), self.cols(c)
        if dA is None:  # X G[c, :], then H[:, i] (.)
            right = dB if G.is_identity else G.rmul_rows(dB, cols.start, cols.stop)
            if H.is_identity:
                P[rows, cols if G.is_identity else slice(None)] -= right
            else:
                wide = right if not G.is_identity else _widen(right, cols, P.shape[1])
                P -= H.rmul_rows(wide.T, rows.start, rows.stop).T
            return
        left = dB if H.is_identity else H.rmul_rows(dB.T, rows.start, rows.stop).T
        right = dA if G.is_identity else G.rmul_rows(dA, cols.start, cols.stop)
        P[rows if H.is_identity else slice(None), cols if G.is_identity else slice(None)] -= left @ right

    def objective(self, P, facs, extra=None):
        """``f_delta(M) = <P, W - M>`` (``extra``: a dense part of ``M`` outside the blocks);
        from the dense residual where that cancels (small ``f``)."""
        D = self.W - self.dense(facs)
        if extra is not None:
            D -= extra
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

    def from_target(self, i, c, U, s, Vt, r):
        """``(B, A) = (K_i^{-T} U S, V^T L_c^{-1})`` (float64, signs fixed, zero columns up to rank ``r``):
        the block whose metric image is ``U S V^T``."""
        B = self.K(i).rsolve_factor((np.asarray(U, np.float64) * np.asarray(s, np.float64)).T).T
        A = self.L(c).rsolve_factor(np.asarray(Vt, np.float64))
        _flip(B, A)
        k = B.shape[1]
        return np.pad(B, ((0, 0), (0, r - k))), np.pad(A, ((0, r - k), (0, 0)))


def _widen(X, cols, n):
    out = np.zeros((X.shape[0], n))
    out[:, cols] = X
    return out


@dataclass(eq=False)
class BlockState:
    """An iterate of the block fits: ``P = H_d (W - M) G_d``, the block factors, ``f_delta``,
    the last metric spectrum of each block and the solvers used."""

    P: np.ndarray
    facs: dict
    f: float = np.inf
    spectra: dict = field(default_factory=dict)
    solvers: set = field(default_factory=set)

    def copy(self):
        return BlockState(self.P.copy(), dict(self.facs), self.f, dict(self.spectra), set(self.solvers))


# ---------------------------------------------------------------------------- one sweep
def sweep(g, st, svd, rng, n_jobs):
    """One Gauss-Seidel sweep over the active blocks, column by column, updating ``st`` in place.

    Without ``H`` the blocks of one block-column are independent given the other
    columns, so their targets are computed together and the equal-shaped ones
    solved in one batched call; with ``H`` (which couples block-rows) one by one.
    """
    batch = g.p.H.is_identity
    for c, blocks in g.columns:
        groups = _by_height(g, blocks) if batch else [[b] for b in blocks]
        for grp in groups:
            targets = [g.target(st.P, i, c, st.facs.get((i, c))) for i, _ in grp]
            solved = _solve_targets([Y for Y, _ in targets], max(r for _, r in grp), g.p.dtype, svd, rng, n_jobs)
            for (i, r), (Y, obj), usv in zip(grp, targets, solved):
                _accept(g, st, i, c, r, Y, obj, *usv)


def _by_height(g, blocks):
    """The blocks of a column grouped by the shape of their targets (their height)."""
    groups = {}
    for i, r in blocks:
        groups.setdefault(g.K(i).rank, []).append((i, r))
    return list(groups.values())


def _solve_targets(Ys, k, dtype, svd, rng, n_jobs):
    """``[(U, s, Vt, solver)]`` of equal-shaped targets, one batched call in W's dtype (the leading
    ``k`` triplets; every singular value with the exact solver)."""
    k = min(k, *Ys[0].shape)
    if k == 0:
        z = Ys[0].shape
        return [(np.zeros((z[0], 0)), np.zeros(0), np.zeros((0, z[1])), "full")] * len(Ys)
    stack = np.stack(Ys).astype(dtype, copy=False)
    U, s, Vt, used = _solve(stack, k, svd[0], svd[1], svd[2], rng, n_jobs, True)
    return [(U[t], s[t], Vt[t], used) for t in range(len(Ys))]


def _accept(g, st, i, c, r, Y, old_obj, U, s, Vt, solver):
    """Take block (i, c)'s rank-``r`` step unless it would raise the block's objective (a sketch or
    float32 SVD can miss); the block's new objective ``||Y - U S V^T||^2`` is computed in float64."""
    k = min(r, U.shape[-1])
    U64, s64, Vt64 = (np.asarray(a, np.float64) for a in (U[:, :k], s[:k], Vt[:k]))
    if solver == "full" and U.dtype == np.float64:  # every singular value, in float64: the tail
        new_obj = float(np.sum(np.asarray(s[k:], np.float64) ** 2))
    else:
        R = Y - (U64 * s64) @ Vt64
        new_obj = float(np.einsum("ij,ij->", R, R))
    st.spectra[(i, c)] = s
    if new_obj > old_obj + STEP_TOL * float(np.einsum("ij,ij->", Y, Y)):
        return
    B, A = g.from_target(i, c, U64, s64, Vt64, r)
    old = st.facs.get((i, c))
    if old is None:
        g.update(st.P, i, c, B, A)
    else:
        g.update(st.P, i, c, np.concatenate([B, -old[0]], axis=1), np.concatenate([A, old[1]], axis=0))
    st.facs[(i, c)] = (B, A)
    st.solvers.add(solver)


# ---------------------------------------------------------------------------- starts
def _start(g, P0, svd, rng, n_jobs, init):
    """The better (in the metric) of the plain fit and the block-diagonal-Gram closed form."""
    w = 2.0**g.p.w_exp
    if init is not None:
        plain = {k: (np.asarray(B, np.float64) * w, np.asarray(A, np.float64)) for k, (B, A) in init.items()}
    else:
        plain = _per_block(g, lambda i, c: g.W[g.rows(i), g.cols(c)], svd, rng, n_jobs, metric=False)
    bdiag = _per_block(
        g, lambda i, c: g.K(i).rmul_factor(g.L(c).rmul_factor(g.W[g.rows(i), g.cols(c)]).T).T, svd, rng, n_jobs
    )
    best = None
    for facs in (plain, bdiag):
        st = BlockState(P0.copy(), {})
        for (i, c), (B, A) in facs.items():
            if B.shape[1]:
                g.update(st.P, i, c, B, A)
                st.facs[(i, c)] = (B, A)
        st.f = g.objective(st.P, st.facs)
        if best is None or st.f < best.f:
            best = st
    return best


def _per_block(g, block, svd, rng, n_jobs, metric=True):
    """``{(i, c): (B, A)}``: the rank-``r`` truncation of ``block(i, c)`` for every block, equal shapes
    batched; ``metric``: the block is a target ``K_i^T X L_c`` and the factors are mapped back."""
    groups = {}
    for i, c, r in g.order:
        X = block(i, c)
        groups.setdefault(X.shape, []).append((i, c, r, X))
    out = {}
    for items in groups.values():
        solved = _solve_targets([X for *_, X in items], max(r for _, _, r, _ in items), g.p.dtype, svd, rng, n_jobs)
        for (i, c, r, _), (U, s, Vt, _) in zip(items, solved):
            k = min(r, U.shape[-1])
            if metric:
                out[(i, c)] = g.from_target(i, c, U[:, :k], s[:k], Vt[:k], r)
            else:
                B, A = np.asarray(U[:, :k], np.float64) * np.asarray(s[:k], np.float64), np.asarray(Vt[:k], np.float64)
                out[(i, c)] = (np.pad(B, ((0, 0), (0, r - k))), np.pad(A, ((0, r - k), (0, 0))))
    return out


# ---------------------------------------------------------------------------- decoupled blocks
def decoupled_svds(g, P0, svd, rng, n_jobs, full=False):
    """``{(i, c): (U, s, Vt, solver, energy)}``: the SVD of every block's target from ``P0`` when the
    blocks decouple (one exact sweep), equal shapes batched; ``full``: every triplet (for allocation)."""
    items = {}
    for i, c, r in g.all_blocks if full else g.order:
        Y, e = g.target(P0, i, c, None)
        k = min(Y.shape) if full else r
        items.setdefault(Y.shape, []).append((i, c, k, Y, e))
    out = {}
    solver = ("full",) + tuple(svd[1:]) if full else svd
    for group in items.values():
        solved = _solve_targets(
            [Y for *_, Y, _ in group], max(k for _, _, k, _, _ in group), g.p.dtype, solver, rng, n_jobs
        )
        for (i, c, _, Y, e), (U, s, Vt, used) in zip(group, solved):
            out[(i, c)] = (U, s, Vt, used, e, None if used == "full" else Y)
    return out


def truncated_fit(p, g, svds, ranks, tots):
    """The decoupled fit at per-block ``ranks`` from the targets' SVDs: a :class:`MetricFit` (exact with
    the exact solver: then ``f_delta`` is the fixed loss plus the spectra's tails)."""
    facs, spectra, f, solvers = {}, {}, g.f0, set()
    for (i, c), (U, s, Vt, used, e, Y) in svds.items():
        r = int(ranks[i, c])
        k = min(r, U.shape[-1])
        spectra[(i, c)] = s
        solvers.add(used)
        if Y is None:  # every singular value: the tail
            f -= e - float(np.sum(np.asarray(s[k:], np.float64) ** 2))
        else:  # a sketch: from the residual
            R = Y - (np.asarray(U[:, :k], np.float64) * np.asarray(s[:k], np.float64)) @ np.asarray(Vt[:k], np.float64)
            f -= e - float(np.einsum("ij,ij->", R, R))
        if r:
            facs[(i, c)] = g.from_target(i, c, U[:, :k], s[:k], Vt[:k], r)
    if f < _DIRECT * g.f0:  # the fixed loss is a difference of large terms: from the dense residual
        f = _data_energy(g.W - g.dense(facs), p.G, p.H)[1]
    solver = "full" if solvers <= {"full"} else "randomized"
    trace = [float(np.sqrt(max(f, 0.0) / g.f0)) if g.f0 > 0 else 0.0]
    return finish(p, g.complete(facs), spectra, f, tots, trace, 1, "exact", solver == "full", solver, g.edges)


# ---------------------------------------------------------------------------- spectra for allocation
@dataclass(eq=False)
class MetricSpectra:
    """Per-block metric spectra of a layout (one matrix), for rank allocation in the metric.

    Attributes
    ----------
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
        False elsewhere: the values are those of every block's target with
        the other blocks at zero, a heuristic; ``exact_allocation`` is then False.
    fit_at : callable or None
        Where exact and asked for: ``fit_at(ranks)``, the fit at per-block
        ranks by truncating the targets' SVDs (:func:`truncated_fit`).
    """

    values: dict
    fixed_loss: float
    total: float
    exact: bool
    fit_at: object = None


def block_spectra_of(p, g, n_jobs=None, keep_svds=False):
    """:class:`MetricSpectra` of a prepared problem on a grid (ranks ignored): one product ``H W G``
    and, per block, an SVD of its target given the other blocks at zero (equal shapes batched).

    Where the blocks decouple these are the exact spectra; elsewhere a heuristic
    that treats every block alike (each block's target with the others at zero,
    a Jacobi step; their energies may add up to more than ``f_delta(0)``).
    """
    P = g.start_product()
    e2 = p.log2_energy
    unit = float(np.sqrt(2.0**e2))
    svds = decoupled_svds(g, P, ("full", 10, "auto"), None, n_jobs, full=True)
    kept = sum(v[4] for v in svds.values())
    sp = MetricSpectra(
        values={k: np.asarray(v[1], np.float64) * unit for k, v in svds.items()},
        fixed_loss=float(np.ldexp(max(g.f0 - kept, 0.0), e2)),
        total=float(np.ldexp(g.f0, e2)),
        exact=bool(g.one_sweep),
    )
    if keep_svds and g.one_sweep:
        tots = totals(p.W, p.G, p.H, g.f0)

        def fit_at(ranks):
            at = _Grid(p, g.lay.with_ranks(ranks))
            at.f0 = g.f0
            return truncated_fit(p, at, svds, ranks, tots)

        sp.fit_at = fit_at
    return sp


@validate_params("gram_damping")
def metric_block_spectra(W, layout, input_gram, output_gram=None, *, gram_damping=None):
    """Metric spectra of every active block of ``layout`` (ranks ignored): :class:`MetricSpectra`.

    Costs one product ``H W G`` and one SVD per block (see :func:`block_spectra_of`).
    """
    p = prepare(W, input_gram, output_gram, gram_damping)
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    lay = _check_layout(layout.with_ranks(layout.max_ranks), p)
    return block_spectra_of(p, _Grid(p, lay))

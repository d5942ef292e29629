"""The iterative structures in a data metric: the hybrid by exact alternating steps, the shared basis
by majorisation-minimisation. Both start from the plain (Frobenius) fit, so they end no worse than it
in the metric, and never increase the objective (the project's stopping loop enforces it).

Per matrix of a stack (one ``G`` and ``H`` shared). A metric that is a multiple of the identity on
both sides is the Frobenius metric: the plain fit is returned as it is, with ``output_error = error``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .._descent import Trace
from .._engine import Approximation
from .._metric._blocks import BlockState, _Grid, sweep
from .._metric._global import _factors, global_svd
from .._metric._mm import majorize
from .._metric._objective import _data_energy, descend_one, grams, prepare, totals
from ._iterative import iterative_result

__all__ = ["hybrid_in_metric", "shared_basis_in_metric"]


@dataclasses.dataclass
class _Out:
    """One matrix's result: factors in the caller's units, trace and the metric's numbers."""

    parts: dict
    error: float
    trace: np.ndarray
    n_iter: int
    stop: str
    output_error: float
    objective: float
    total: float


def _metric_of(X, metric):
    m, n = X.shape[-2:]
    G, H = grams(metric[0], metric[1], (m, n), metric[2])
    return G, H, (H.damping if G.is_identity else G.damping)


def in_scalar_metric(plain, X, G, H, delta):
    """The plain fit, reported in a scalar metric ``a I``, ``b I``: ``output_error = error``."""
    ab = G.scalar() * H.scalar()
    tot = np.einsum("...ij,...ij->...", X, X, dtype=np.float64)
    err = np.asarray(plain.report.error)
    objective, total = ab * err**2 * tot, ab * tot
    if not np.ndim(err):
        objective, total = float(objective), float(total)
    rep = dataclasses.replace(
        plain.report, output_error=plain.report.error, objective=objective, total_objective=total, gram_damping=delta
    )
    return Approximation(plain.factors, rep)


def _result(layout, outs, X, delta, structure, **factors):
    """The per-matrix results as one :class:`~blocklowrank.Approximation` (through ``iterative_result``)."""
    N = len(outs)
    width = max(len(o.trace) for o in outs)
    errors = np.full((N, width), np.nan)
    for t, o in enumerate(outs):
        errors[t, : len(o.trace)] = o.trace
    trace = Trace.from_arrays(errors, np.array([o.n_iter for o in outs]), np.array([o.stop for o in outs]))
    metric = {
        "output_error": np.array([o.output_error for o in outs]),
        "objective": np.array([o.objective for o in outs]),
        "total_objective": np.array([o.total for o in outs]),
        "gram_damping": delta,
    }
    err = np.array([o.error for o in outs])
    return iterative_result(
        layout, err, trace, X.shape[:-2], X.dtype, None, structure=structure, metric=metric, **factors
    )


def _frobenius(p, M):
    """The relative Frobenius error of a dense fit ``M`` (scaled units)."""
    D = np.asarray(p.W, np.float64) - M
    w2 = float(np.einsum("ij,ij->", p.W, p.W, dtype=np.float64))
    return float(np.sqrt(np.einsum("ij,ij->", D, D) / w2)) if w2 > 0 else 0.0


def _numbers(p, M, f_delta, tots):
    """``(error, output_error, objective, total)`` of a dense fit ``M`` (scaled units) in the caller's units."""
    f = _data_energy(np.asarray(p.W, np.float64) - M, p.G, p.H)[0] if (p.G.shift or p.H.shift) else f_delta
    out = float(np.sqrt(max(f, 0.0) / tots[0])) if tots[0] > 0 else 0.0
    e2 = p.log2_energy
    return _frobenius(p, M), out, float(np.ldexp(f_delta, e2)), float(np.ldexp(tots[1], e2))


# ---------------------------------------------------------------------------- hybrid
def hybrid_in_metric(X, layout, r_g, plain, svd, rng, n_jobs, iters, first_step, metric):
    """:func:`~blocklowrank.structures.fit_hybrid` in a data metric (``plain``: its plain fit of ``X``)."""
    G, H, delta = _metric_of(X, metric)
    if G.is_scalar and H.is_scalar:
        return in_scalar_metric(plain, X, G, H, delta)
    m, n = X.shape[-2:]
    flat = X.reshape((-1, m, n))
    outs, hybrids = [], []
    for b, W in enumerate(flat):
        start = _plain_parts(plain, b, X.ndim > 2)
        hybrids.append(_Hybrid(prepare(W, G, H), layout, r_g, svd, rng, n_jobs))
        outs.append(hybrids[-1].run(start, first_step, *iters))
    blocks = {
        k: tuple(np.stack([o.parts["blocks"][k][t] for o in outs]) for t in (0, 1)) for k in outs[0].parts["blocks"]
    }
    gf = tuple(np.stack([o.parts["global"][t] for o in outs]) for t in (0, 1))
    solver = dict(plain.report.svd_solver)  # the plain start's, then the global steps' in the metric
    used = set().union(*(o.used for o in hybrids)) | ({solver[(m, n)]} if (m, n) in solver else set())
    if used:
        solver[(m, n)] = "+".join(sorted(used))
    return _result(layout, outs, X, delta, "hybrid", blocks=blocks, global_factors=gf, solver=solver)


def _plain_parts(plain, b, stacked):
    f = plain.factors
    pick = (lambda a: a[b]) if stacked else (lambda a: a)
    blocks = {k: (pick(B), pick(A)) for k, (B, A) in f.items()}
    return blocks, tuple(pick(a) for a in f.global_factors)


class _Hybrid:
    """The alternation of one matrix: ``P = H_d (W - M) G_d`` kept up to date, the global step
    (``fit_global`` of ``W - blocks``, exact) and the block step (one sweep of exact block steps)."""

    def __init__(self, p, layout, r_g, svd, rng, n_jobs):
        self.p, self.r_g, self.svd, self.rng, self.n_jobs = p, r_g, svd, rng, n_jobs
        self.g = _Grid(p, layout)
        self.P0 = self.g.start_product()
        self.tots = totals(p.W, p.G, p.H, self.g.f0)
        m, n = p.W.shape
        self.zero_global = (np.zeros((m, r_g)), np.zeros((r_g, n)))
        self.used = set()  # the solvers the global steps ran (report.svd_solver)

    def objective(self, st):
        return self.g.objective(st.P, st.facs, extra=st.glob[0] @ st.glob[1])

    def global_step(self, st):
        """The best global term in the metric given the blocks: ``(f, new state)``."""
        R = self.g.W - self.g.dense(st.facs)
        pR = dataclasses.replace(self.p, W=R.astype(self.p.dtype, copy=False))
        k = min(self.r_g, self.p.H.rank, self.p.G.rank)
        U, s, used, _ = global_svd(pR, k, self.svd, self.rng, self.n_jobs)
        self.used.add(used)
        B, A = (np.asarray(a, np.float64) for a in _factors(pR.W, self.p.G, self.p.H, U[:, :k], s[:k]))
        B, A = np.pad(B, ((0, 0), (0, self.r_g - k))), np.pad(A, ((0, self.r_g - k), (0, 0)))
        new = _HState(st.P.copy(), dict(st.facs), (B, A))
        dB, dA = np.concatenate([B, -st.glob[0]], axis=1), np.concatenate([A, st.glob[1]], axis=0)
        new.P -= self.p.H.rmul(dB.T).T @ self.p.G.rmul(dA)
        new.f = self.objective(new)
        return new

    def block_step(self, st):
        """One sweep of exact block steps given the global term and the other blocks."""
        bs = BlockState(st.P.copy(), dict(st.facs))
        sweep(self.g, bs, self.svd, self.rng, self.n_jobs)
        new = _HState(bs.P, bs.facs, st.glob)
        new.f = self.objective(new)
        return new

    def _steps(self, first_step):
        order = [("global", self.global_step), ("blocks", self.block_step)]
        order = [s for s in order if (s[0] == "global" and self.r_g) or (s[0] == "blocks" and self.g.order)]
        return order if first_step == "global" else order[::-1]

    def start(self, plain_parts, first_step):
        """The better, in the metric, of the plain fit and the metric's own first pass."""
        st = _HState(self.P0.copy(), {}, self.zero_global)
        for _, step in self._steps(first_step):
            st = step(st)
        blocks, (Bg, Ag) = plain_parts
        w = 2.0**self.p.w_exp
        pl = _HState(self.P0.copy(), {}, (np.asarray(Bg, np.float64) * w, np.asarray(Ag, np.float64)))
        pl.P -= self.p.H.rmul(pl.glob[0].T).T @ self.p.G.rmul(pl.glob[1])
        for (i, c), (B, A) in blocks.items():
            if B.shape[-1]:
                pl.facs[(i, c)] = (np.asarray(B, np.float64) * w, np.asarray(A, np.float64))
                self.g.update(pl.P, i, c, *pl.facs[(i, c)])
        pl.f = self.objective(pl)
        return st if st.f <= pl.f else pl

    def run(self, plain_parts, first_step, max_iter, tol):
        steps = self._steps(first_step)
        if len(steps) == 1 and (steps[0][0] == "global" or self.g.one_sweep):  # one part, fitted exactly
            box = {"st": steps[0][1](_HState(self.P0.copy(), {}, self.zero_global))}
            trace, n_iter, stop = [np.sqrt(box["st"].f / self.g.f0) if self.g.f0 > 0 else 0.0], 1, "exact"
        else:
            box = {"st": self.start(plain_parts, first_step)}

            def proposer(step):
                def propose():
                    new = step(box["st"])
                    return new.f, lambda: box.update(st=new)

                return propose

            trace, n_iter, stop = descend_one(box["st"].f, self.g.f0, [proposer(s) for _, s in steps], max_iter, tol)
        return self._out(box["st"], trace, n_iter, stop)

    def _out(self, st, trace, n_iter, stop):
        p, w = self.p, 2.0**-self.p.w_exp
        M = self.g.dense(st.facs) + st.glob[0] @ st.glob[1]
        err, out, objective, total = _numbers(p, M, st.f, self.tots)
        facs = self.g.complete(st.facs)
        parts = {
            "blocks": {k: (np.asarray(B * w, p.dtype), np.asarray(A, p.dtype)) for k, (B, A) in facs.items()},
            "global": (np.asarray(st.glob[0] * w, p.dtype), np.asarray(st.glob[1], p.dtype)),
        }
        return _Out(parts, err, np.asarray(trace), n_iter, stop, out, objective, total)


@dataclasses.dataclass(eq=False)
class _HState:
    P: np.ndarray
    facs: dict
    glob: tuple
    f: float = np.inf


# ---------------------------------------------------------------------------- shared basis
def shared_basis_in_metric(X, layout, plain, fit_plain, iters, metric):
    """:func:`~blocklowrank.structures.fit_shared_basis` in a data metric by majorisation-minimisation
    (``plain``: its plain fit of ``X``; ``fit_plain(Z, init)``: one warm-started ALS pass and sweep)."""
    G, H, delta = _metric_of(X, metric)
    if G.is_scalar and H.is_scalar:
        return in_scalar_metric(plain, X, G, H, delta)
    m, n = X.shape[-2:]
    U, V, S = plain.factors.shared
    outs = []
    for b, W in enumerate(X.reshape((-1, m, n))):
        pick = (lambda a: a[b]) if X.ndim > 2 else (lambda a: a)  # noqa: B023
        outs.append(
            _shared_one(
                prepare(W, G, H), layout, ([pick(u) for u in U], [pick(v) for v in V], pick(S)), fit_plain, iters
            )
        )
    shared = (
        [np.stack([o.parts[0][i] for o in outs]) for i in range(len(U))],
        [np.stack([o.parts[1][j] for o in outs]) for j in range(len(V))],
        np.stack([o.parts[2] for o in outs]),
    )
    return _result(layout, outs, X, delta, "shared_basis", shared=shared)


def _big(shared, layout):
    """``(B_big, A_big)`` with ``M = B_big A_big``: ``B_big`` block-diagonal in the ``U_i``, ``A_big``
    stacking each block-row's decoder ``[diag(s_i1) V_1^T, ...]`` (``(m^2 + n^2 + m n) K_rows r`` per product)."""
    U, V, S = shared
    r = S.shape[-1]
    kr = len(U)
    m, n = layout.shape
    B, A = np.zeros((m, kr * r)), np.zeros((kr * r, n))
    re, ce = layout.row_edges, layout.col_edges
    for i in range(kr):
        B[re[i] : re[i + 1], i * r : (i + 1) * r] = U[i]
        for j in range(len(V)):
            A[i * r : (i + 1) * r, ce[j] : ce[j + 1]] = S[i, j][:, None] * np.asarray(V[j], np.float64).T
    return B, A


def _shared_one(p, layout, shared, fit_plain, iters):
    """Majorisation-minimisation of one matrix from its plain fit ``shared`` (caller's units)."""
    w = 2.0**p.w_exp
    U, V, S = (
        [np.asarray(u, np.float64) for u in shared[0]],
        [np.asarray(v, np.float64) for v in shared[1]],
        np.asarray(shared[2], np.float64) * w,
    )

    def plain_fit(Z, state):
        new = fit_plain(Z, state)
        return _big(new, layout), new

    res = majorize(p, plain_fit, (_big((U, V, S), layout), (U, V, S)), *iters)
    U, V, S = res.state
    parts = ([np.asarray(u, p.dtype) for u in U], [np.asarray(v, p.dtype) for v in V], np.asarray(S / w, p.dtype))
    B, A = _big(res.state, layout)
    err = _frobenius(p, B @ A)
    return _Out(parts, err, res.error_trace, res.n_iter, res.stop_reason, res.output_error, res.objective, res.total)

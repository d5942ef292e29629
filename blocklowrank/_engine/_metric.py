"""Layout fits in a data metric: what :func:`~blocklowrank.fit_layout` runs when a Gram is given.

Per matrix of a stack (one ``G`` and ``H`` shared: their factors are reused):

- a 1 x 1 layout: the exact global fit in the metric (Eckart-Young on ``K^T W L``);
- any other layout: the block fits of :func:`~blocklowrank._metric.fit_blocks` -- exact
  in one step where the blocks decouple, block-coordinate descent elsewhere;
- ``budget``: per-block ranks from the blocks' metric spectra (water-filling or
  the exact programme; exact where the blocks decouple, else
  ``exact_allocation=False``), then the fit at those ranks (a truncation of the
  spectra's SVDs where the blocks decouple);
- ``max_error``: the fewest parameters whose **output error** (undamped) is within
  it: exactly the fewest from the spectra where the blocks decouple and nothing is
  damped; otherwise the shortest prefix of the spectra's gain-per-parameter order
  whose fit reaches the target (a search over fits, ``exact_allocation=False``).

A metric that is a multiple of the identity on both sides is the Frobenius
metric: the plain fit is returned, with ``output_error = error``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .._allocation import _allocate as _allocate_ranks
from .._metric._blocks import MetricSpectra, _fit_blocks, _Grid, block_spectra_of
from .._metric._global import _fit_global, global_fit, global_svd
from .._metric._objective import grams, prepare
from ..factors import StructuredFactors
from ._plain import _block_energies, _budget_allocation, _fit_layout, residual_energy
from ._results import Approximation, FitReport

__all__ = ["fit_layout_metric", "metric_spectra"]


def fit_layout_metric(X, lay, mode, value, svd, rng, n_jobs, structure, metric, iters):
    """The engine's fit of ``X`` (validated; one matrix or a stack) in the metric ``(G, H, damping)``."""
    m, n = X.shape[-2:]
    G, H = grams(metric[0], metric[1], (m, n), metric[2])
    delta = H.damping if G.is_identity else G.damping
    if G.is_scalar and H.is_scalar:
        return _scalar_metric(_fit_layout(X, lay, mode, value, svd, rng, n_jobs, structure), G, H, delta)
    G, H, lay0 = permuted_problem(lay, G, H)
    flat = X.reshape((-1, m, n))
    if lay.permuted:
        flat = lay.permute(flat)
    ones = [_fit_one(W, lay0, G, H, mode, value, svd, rng, n_jobs, iters) for W in flat]
    return _assemble(X.shape[:-2], lay, ones, structure, delta)


def permuted_problem(lay, G, H):
    """``(G, H, layout)`` in the layout's own coordinates (the Grams permuted once, for every matrix)."""
    if not lay.permuted:
        return G, H, lay
    G = G if lay.col_perm is None else G.permuted(lay.col_perm)
    H = H if lay.row_perm is None else H.permuted(lay.row_perm)
    return G, H, lay.without_permutation()


def _scalar_metric(res, G, H, delta):
    """The plain fit's result reported in a scalar metric ``a I``, ``b I``: ``output_error = error``."""
    ab = G.scalar() * H.scalar()
    rep = res.report
    objective, total = ab * np.asarray(rep.discarded_energy), ab * np.asarray(rep.total_energy)
    if not res.factors.batch_shape:
        objective, total = float(objective), float(total)
    rep = dataclasses.replace(
        rep, output_error=rep.error, objective=objective, total_objective=total, gram_damping=delta
    )
    return Approximation(res.factors, rep)


# ---------------------------------------------------------------------------- one matrix
@dataclasses.dataclass
class _One:
    fit: object  # MetricFit
    ranks: np.ndarray
    exact: object
    discarded: float  # ||W - M||_F^2
    total: float  # ||W||_F^2


def _fit_one(W, lay, G, H, mode, value, svd, rng, n_jobs, iters):
    """One matrix in the layout's coordinates: its :class:`_One`."""
    p = prepare(W, G, H)
    exact = None
    if mode == "layout":
        ranks, fit = lay.ranks, fit_ranks(p, lay, svd, rng, n_jobs, iters)
    else:
        sp = metric_spectra(p, lay, n_jobs, keep=True)
        if mode == "budget":
            ranks, exact = allocate_budget(sp, lay, value)
            fit = _fit_from(p, lay, sp, ranks, svd, rng, n_jobs, iters)
            if not sp.exact:  # heuristic spectra: never worse than the uniform ranks the budget allows
                ranks, fit = _no_worse_than_uniform(p, lay, value, ranks, fit, svd, rng, n_jobs, iters)
        else:
            ranks, exact, fit = _target_error(p, lay, sp, value, svd, rng, n_jobs, iters)
    return _One(fit, np.asarray(ranks), exact, *_frobenius(p, lay, fit.factors))


def fit_ranks(p, lay, svd, rng, n_jobs, iters):
    """The fit of a prepared problem at the layout's ranks: global (1 x 1) or blocks."""
    if lay.n_blocks == (1, 1):
        return _fit_global(p, int(lay.ranks[0, 0]), svd, rng, n_jobs)
    return _fit_blocks(p, _Grid(p, lay), svd, rng, n_jobs, None, *iters)


def metric_spectra(p, lay, n_jobs=None, keep=False):
    """The ``MetricSpectra`` of a prepared problem (ranks ignored); with
    ``keep``, where exact, ``fit_at(ranks)`` fits by truncating the spectra's SVDs."""
    if lay.n_blocks == (1, 1):  # the global fit: K^T W L formed once, every singular value
        out = global_svd(p, min(p.H.rank, p.G.rank), ("full", 10, "auto"), None, n_jobs)
        U, s, used, tots = out
        e2 = p.log2_energy
        s64 = np.asarray(s, np.float64)
        sp = MetricSpectra(
            values={(0, 0): s64 * float(np.sqrt(2.0**e2))},
            fixed_loss=float(np.ldexp(max(tots[1] - float(np.sum(s64**2)), 0.0), e2)),
            total=float(np.ldexp(tots[1], e2)),
            exact=True,
        )
        if keep:
            sp.fit_at = lambda ranks: global_fit(p, int(ranks[0, 0]), *out)
        return sp
    return block_spectra_of(p, _Grid(p, lay.with_ranks(lay.max_ranks)), n_jobs, keep_svds=keep)


def _fit_from(p, lay, sp, ranks, svd, rng, n_jobs, iters):
    """The fit at ``ranks``: a truncation of the spectra's SVDs where exact, else a fit."""
    if sp.fit_at is not None:
        return sp.fit_at(ranks)
    return fit_ranks(p, lay.with_ranks(ranks), svd, rng, n_jobs, iters)


def _items(sp, lay):
    """``(keys, gains, costs, max ranks)`` of the spectra's blocks, for the allocation."""
    keys = list(sp.values)
    gains = [np.asarray(sp.values[k], np.float64)[None, :] ** 2 for k in keys]
    costs = [int(lay.block_costs[k]) for k in keys]
    maxr = [min(int(lay.max_ranks[k]), len(sp.values[k])) for k in keys]
    return keys, gains, costs, maxr


def _ranks(keys, alloc, lay):
    out = np.zeros(lay.n_blocks, dtype=np.int64)
    for t, k in enumerate(keys):
        out[k] = alloc[t]
    return out


def allocate_budget(sp, lay, budget):
    """Budget-optimal ranks on the metric spectra (exact where they are and the allocation is)."""
    keys, gains, costs, maxr = _items(sp, lay)
    alloc, exact = _budget_allocation(gains, costs, maxr, budget)
    return _ranks(keys, alloc[0], lay), bool(exact and sp.exact)


def _no_worse_than_uniform(p, lay, budget, ranks, fit, svd, rng, n_jobs, iters):
    """``(ranks, fit)``: the allocated fit, or the uniform one within ``budget`` where that is better."""
    r = min(budget // int(lay.block_costs[lay.active].sum()), int(lay.max_ranks[lay.active].min()))
    uniform = np.where(lay.active, r, 0)
    if r < 1 or np.array_equal(uniform, ranks):
        return ranks, fit
    other = fit_ranks(p, lay.with_ranks(uniform), svd, rng, n_jobs, iters)
    return (uniform, other) if other.objective < fit.objective else (ranks, fit)


def _target_error(p, lay, sp, target, svd, rng, n_jobs, iters):
    """``(ranks, exact, fit)``: the fewest parameters whose output error is ``<= target``."""
    keys, gains, costs, maxr = _items(sp, lay)
    undamped = not (p.G.shift or p.H.shift)
    if sp.exact and undamped:  # the spectra give the output error of every rank choice exactly
        if sp.fixed_loss > target * target * sp.total * (1 + 1e-12):
            raise _unreachable(target, np.sqrt(sp.fixed_loss / sp.total))
        alloc, exact = _allocate_ranks(
            gains, costs, maxr, max_error=target, fixed_loss=np.array([sp.fixed_loss]), total=np.array([sp.total])
        )
        ranks = _ranks(keys, alloc[0], lay)
        return ranks, bool(exact), _fit_from(p, lay, sp, ranks, svd, rng, n_jobs, iters)
    search = _PrefixSearch(keys, gains, costs, maxr, lay, sp)
    fits = {}

    def error(t):
        if t not in fits:
            fits[t] = _fit_from(p, lay, sp, search.ranks(t), svd, rng, n_jobs, iters)
        return fits[t].output_error

    t = search.smallest(error, target)
    return search.ranks(t), False, fits[t]


def _unreachable(target, worst):
    return ValueError(
        f"max_error={target} cannot be reached with this structure in this metric: the output error "
        f"stays at {worst:.4g} or more"
    )


class _PrefixSearch:
    """Rank vectors along the spectra's gain-per-parameter order (the first ``t`` components) and the
    search for the shortest prefix whose fit has an output error within a target."""

    def __init__(self, keys, gains, costs, maxr, lay, sp):
        owner, ratio = [], []
        for b, (g, c, mr) in enumerate(zip(gains, costs, maxr)):
            owner += [b] * mr
            ratio.append(g[0, :mr] / c)
        order = np.argsort(-np.concatenate(ratio), kind="stable") if ratio else np.zeros(0, int)
        self.owner = np.asarray(owner, dtype=np.int64)[order]
        self.keys, self.lay = keys, lay
        gain = np.concatenate([g[0, :mr] for g, mr in zip(gains, maxr)])[order]
        lost = sp.fixed_loss + np.concatenate([np.cumsum(gain[::-1])[::-1], [0.0]])
        self.damped = np.sqrt(np.maximum(lost, 0.0) / sp.total) if sp.total > 0 else np.zeros(len(gain) + 1)

    def ranks(self, t):
        return _ranks(self.keys, np.bincount(self.owner[:t], minlength=len(self.keys)), self.lay)

    def smallest(self, error, target):
        """The smallest ``t`` with ``error(t) <= target``: from where the damped spectra reach it, doubling
        the step up (or bisecting down), then bisecting (the output error falls along the order)."""
        N = len(self.owner)
        t0 = max(int(np.argmax(self.damped <= target)) if np.any(self.damped <= target) else N, 1)
        if error(t0) <= target:
            lo, hi = 0, t0
        else:
            lo, step = t0, 1
            while True:
                hi = min(lo + step, N)
                if error(hi) <= target:
                    break
                if hi == N:
                    raise _unreachable(target, error(N))
                lo, step = hi, 2 * step
        while hi - lo > 1:  # error(hi) <= target < error(lo), or lo = 0
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if error(mid) <= target else (mid, hi)
        return hi


def _frobenius(p, lay, factors):
    """``(||W - M||_F^2, ||W||_F^2)`` in the caller's units, from the block factors (float64 sums)."""
    W, w = p.W, 2.0**p.w_exp
    E = _block_energies(W, lay)
    discarded = float((E * ~lay.active).sum())
    for (i, c), (B, A) in factors.items():
        rows, cols = lay.block_slice(i, c)
        discarded += residual_energy(W[rows, cols], np.asarray(B, np.float64) * w, np.asarray(A, np.float64))
    k = -2 * p.w_exp
    return float(np.ldexp(discarded, k)), float(np.ldexp(float(E.sum()), k))


# ---------------------------------------------------------------------------- the result
def _assemble(batch, lay, ones, structure, delta):
    """One :class:`~blocklowrank.Approximation` from the fits of the matrices of a stack."""
    ranks = np.stack([o.ranks for o in ones])
    lay_out = lay.with_ranks(ranks.max(axis=0))
    facs = {}
    for key in ones[0].fit.factors:
        r = int(lay_out.ranks[key])
        Bs = [np.pad(o.fit.factors[key][0], ((0, 0), (0, r - o.fit.factors[key][0].shape[1]))) for o in ones]
        As = [np.pad(o.fit.factors[key][1], ((0, r - o.fit.factors[key][1].shape[0]), (0, 0))) for o in ones]
        facs[key] = (np.stack(Bs).reshape(batch + Bs[0].shape), np.stack(As).reshape(batch + As[0].shape))
    factors = StructuredFactors(
        lay_out, facs, ranks=ranks.reshape(batch + lay.n_blocks) if batch else None, structure=structure
    )
    return Approximation(factors, _report(batch, lay, ones, delta))


def _report(batch, lay, ones, delta):
    def arr(values, dtype=np.float64):
        a = np.asarray(values, dtype=dtype)
        return a.reshape(batch) if batch else a.reshape(()).item()

    fits = [o.fit for o in ones]
    solver = "full" if all(f.svd_solver == "full" for f in fits) else "randomized"
    disc, tot = np.array([o.discarded for o in ones]), np.array([o.total for o in ones])
    err = np.where(tot > 0, np.sqrt(np.maximum(disc, 0) / np.where(tot > 0, tot, 1)), 0.0)
    spectra = {}
    for key in fits[0].singular_values:
        vals = [np.asarray(f.singular_values[key]) for f in fits]
        L = max(v.size for v in vals)
        spectra[key] = np.stack([np.pad(v, (0, L - v.size)) for v in vals]).reshape(batch + (L,)) if batch else vals[0]
    rep = dict(
        error=arr(err),
        discarded_energy=arr(disc),
        total_energy=arr(tot),
        svd_solver={shp: solver for shp in lay.groups()},
        exact_allocation=None if ones[0].exact is None else all(o.exact for o in ones),
        singular_values=spectra,
        output_error=arr([f.output_error for f in fits]),
        objective=arr([f.objective for f in fits]),
        total_objective=arr([f.total for f in fits]),
        gram_damping=delta,
    )
    if any(f.stop_reason != "exact" for f in fits):
        width = max(len(f.error_trace) for f in fits)
        trace = np.full((len(fits), width), np.nan)
        for t, f in enumerate(fits):
            trace[t, : len(f.error_trace)] = f.error_trace
        rep.update(
            error_trace=trace.reshape(batch + (width,)) if batch else trace[0],
            n_iter=arr([f.n_iter for f in fits], np.int64),
            stop_reason=np.array([f.stop_reason for f in fits]).reshape(batch) if batch else fits[0].stop_reason,
        )
    return FitReport(**rep)

"""The plain engine: batched truncated SVD over the blocks of a layout.

:func:`_fit_layout` reads as its steps: plan (how many components each group of
equal-shaped blocks needs, with which solver), SVD (one batched call per group),
allocate (per-block ranks for a budget or a target error), truncate (the kept
factors), error (from the discarded spectrum). Every active block is cut out of
the matrix (or every matrix of a stack) without a Python loop over blocks:
consecutive equal-sized block-rows/columns form regions that reshape into stacks.
"""

from __future__ import annotations

import numpy as np

from .._allocation import _allocate as _allocate_ranks
from .._allocation import no_worse_than_uniform
from .._svd import _solve
from .._validation import pow2_scale
from ..factors import StructuredFactors, _Group
from ._results import Approximation, FitReport

__all__ = []


def _fit_layout(X, lay, mode, value, svd, rng, n_jobs, structure=None):
    """plan -> SVD -> allocate -> truncate -> error, on validated input."""
    scale = pow2_scale(X)
    if scale is not None:  # exact power-of-two rescaling keeps the energies finite
        X = np.ldexp(X, scale)
    if lay.permuted:  # work in the permuted coordinates; to_dense puts them back
        X = lay.permute(X)
    batch = X.shape[:-2]
    groups_idx = lay.groups()
    blocks = _gather(X, lay, groups_idx)
    plan = _plan(lay, groups_idx, mode, value, svd)
    computed = {shp: _svd_group(blocks[shp], k, solver, svd, rng, n_jobs) for shp, (k, solver) in plan.items()}
    E = _block_energies(X, lay)
    total = E.sum(axis=(-2, -1))
    ranks, exact = np.broadcast_to(lay.ranks, batch + lay.n_blocks).copy(), None
    if mode in ("budget", "max_error"):
        ranks, exact = _allocate(lay, groups_idx, computed, E, total, mode, value, batch)
        lay = lay.with_ranks(ranks.reshape((-1,) + lay.n_blocks).max(axis=0))
    groups, discarded = _truncate(lay, groups_idx, computed, blocks, ranks, E, X.dtype)
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.where(total > 0, np.sqrt(np.maximum(discarded, 0) / np.where(total > 0, total, 1)), 0.0)
    if scale is not None:
        k = scale[..., 0, 0]
        groups = [_Group(g.shape, g.rows, g.cols, np.ldexp(g.B, -scale[..., None, :, :]), g.A) for g in groups]
        discarded, total = np.ldexp(discarded, -2 * k), np.ldexp(total, -2 * k)
        computed = {key: (U, np.ldexp(sv, -k[..., None, None]), Vt, so) for key, (U, sv, Vt, so) in computed.items()}
    factors = StructuredFactors(lay, _groups=groups, ranks=ranks if batch else None, structure=structure)
    one = (lambda a: float(a)) if not batch else (lambda a: a)  # noqa: E731
    spectra = {
        (int(i), int(j)): computed[shp][1][..., t, :].copy()
        for shp, (ii, jj) in groups_idx.items()
        for t, (i, j) in enumerate(zip(ii, jj))
    }
    report = FitReport(
        error=one(err),
        discarded_energy=one(discarded),
        total_energy=one(total),
        svd_solver={shp: c[3] for shp, c in computed.items()},
        exact_allocation=exact,
        singular_values=spectra,
    )
    return Approximation(factors, report)


# ---------------------------------------------------------------------------- steps
def _plan(lay, groups_idx, mode, value, svd):
    """``{shape: (components, solver)}``: how many singular triplets each group needs."""
    solver, n_over, _ = svd
    plan = {}
    for shp, (ii, jj) in groups_idx.items():
        L = min(shp)
        if mode == "layout":
            k = int(lay.ranks[ii, jj].max())
        elif mode == "budget":
            k = min(L, value // (shp[0] + shp[1]))
        else:
            k = L
        # budget and max_error allocate over every singular value: exact spectra
        s = "full" if mode in ("budget", "max_error") else solver
        if s == "randomized" and k + n_over >= L:
            s = "full"
        plan[shp] = (max(k, 0), s)
    return plan


def _svd_group(A, k, solver, svd, rng, n_jobs):
    """``(U, s, Vt, solver)`` of a group: the leading ``k`` triplets (all singular values
    with the exact solver); "auto" resolves to the solver it used (see
    :func:`~blocklowrank.batched_svd`)."""
    if k == 0:
        g = A.shape[:-2]
        m, n = A.shape[-2:]
        z = (np.zeros(g + (m, 0), A.dtype), np.zeros(g + (0,), A.dtype), np.zeros(g + (0, n), A.dtype))
        return z + ("full" if solver == "auto" else solver,)
    return _solve(A, k, solver, svd[1], svd[2], rng, n_jobs, True)


def _allocate(lay, groups_idx, computed, E, total, mode, value, batch):
    """Per-matrix ranks ``(..., K_rows, K_cols)`` for a budget or a target error."""
    B = int(np.prod(batch)) if batch else 1
    gains, costs, maxr, where = [], [], [], []
    for shp, (ii, jj) in groups_idx.items():
        s = computed[shp][1].reshape((B, len(ii), -1)).astype(np.float64)
        for t in range(len(ii)):
            gains.append(s[:, t, :] ** 2)
            costs.append(shp[0] + shp[1])
            maxr.append(min(shp))
            where.append((int(ii[t]), int(jj[t])))
    if mode == "max_error":
        tot = total.reshape(B)
        fixed = (E * ~lay.active).sum(axis=(-2, -1)).reshape(B)
        bad = fixed > value * value * tot * (1 + 1e-12)
        if np.any(bad):
            worst = float(np.sqrt(fixed[bad] / np.where(tot[bad] > 0, tot[bad], 1)).max())
            raise ValueError(
                f"max_error={value} cannot be reached with this structure: its inactive "
                f"blocks alone leave a relative error of {worst:.4g}"
            )
        alloc, exact = _allocate_ranks(gains, costs, maxr, max_error=value, fixed_loss=fixed, total=tot)
    else:
        alloc, exact = _budget_allocation(gains, costs, maxr, value)
    return _scatter(alloc, where, batch, lay.n_blocks), exact


def _budget_allocation(gains, costs, maxr, budget):
    """Budget-optimal ranks; a greedy answer is replaced by the uniform one where that is better."""
    alloc, exact = _allocate_ranks(gains, costs, maxr, budget=budget)
    if not exact:
        alloc = no_worse_than_uniform(alloc, gains, costs, maxr, budget)
    return alloc, exact


def _scatter(alloc, where, batch, n_blocks):
    """Per-block ranks (batch..., K_rows, K_cols) from allocations listed in ``where`` order."""
    B = alloc.shape[0]
    ranks = np.zeros((B,) + n_blocks, dtype=np.int64)
    for t, (i, j) in enumerate(where):
        ranks[:, i, j] = alloc[:, t]
    return ranks.reshape(batch + n_blocks)


def _truncate(lay, groups_idx, computed, blocks, ranks, E, dtype):
    """Kept factors per group (``B = U_k S_k``, zero columns past each block's rank) and
    the discarded energy per matrix."""
    groups = []
    discarded = (E * ~lay.active).sum(axis=(-2, -1))
    for shp, (ii, jj) in groups_idx.items():
        U, s, Vt, solver = computed[shp]
        r_blocks = ranks[..., ii, jj]  # (batch..., g)
        k = int(r_blocks.max()) if r_blocks.size else 0
        s_k = np.where(np.arange(k) < r_blocks[..., None], s[..., :k], 0).astype(dtype)
        B = U[..., :k] * s_k[..., None, :]
        A = np.ascontiguousarray(Vt[..., :k, :])
        groups.append(_Group(shp, ii, jj, B, A))
        Eb = E[..., ii, jj]
        if s.shape[-1] == 0:  # no component computed (rank 0 everywhere): all energy lost
            discarded = discarded + Eb.sum(axis=-1)
        elif solver == "full":
            s64 = s.astype(np.float64)
            drop = np.where(np.arange(s.shape[-1]) >= r_blocks[..., None], s64 * s64, 0.0)
            discarded = discarded + drop.sum(axis=(-2, -1))
        else:
            discarded = discarded + _randomized_residual(blocks[shp], B, A, s_k, Eb).sum(axis=-1)
    return groups, discarded


def _gather(X, layout, groups_idx):
    """Stacks ``(..., g, m_i, n_j)`` of the active blocks of each shape group."""
    batch = X.shape[:-2]
    parts = {shp: [] for shp in groups_idx}
    for r0, r1, c0, c1, bi0, bj0, kr, kc, shp in layout.regions():
        sub = layout.active[bi0 : bi0 + kr, bj0 : bj0 + kc]
        ii, jj = np.nonzero(sub)
        if ii.size == 0:
            continue
        h, w = shp
        if kr == kc == 1:  # one block: a view, no copy (a global fit never copies X)
            parts[shp].append(X[..., None, r0:r1, c0:c1])
            continue
        reg = X[..., r0:r1, c0:c1].reshape(batch + (kr, h, kc, w)).swapaxes(-3, -2)
        parts[shp].append(reg[..., ii, jj, :, :])
    return {shp: (np.concatenate(p, axis=-3) if len(p) > 1 else p[0]) for shp, p in parts.items()}


def _block_energies(X, layout):
    """``||X_ij||_F^2`` for every block, shape (..., K_rows, K_cols), float64."""
    batch = X.shape[:-2]
    E = np.zeros(batch + layout.n_blocks)
    for r0, r1, c0, c1, bi0, bj0, kr, kc, (h, w) in layout.regions():
        reg = X[..., r0:r1, c0:c1].reshape(batch + (kr, h, kc, w))
        sq = np.einsum("...ahbw,...ahbw->...ab", reg, reg, dtype=np.float64)
        E[..., bi0 : bi0 + kr, bj0 : bj0 + kc] = sq
    return E


def _randomized_residual(A, B, Vt, s_k, Eb):
    """``||A_b - B_b V_b^T||_F^2`` of every block ``b`` of a randomized group, shape (..., g).

    The randomized factors are a projection: ``U_k = Q U~_k`` has orthonormal
    columns and ``S_k V_k^T = U_k^T A`` (see :func:`_randomized_svd`), so
    ``X_hat = U_k U_k^T A`` and the residual energy is ``||A||^2 - sum s_k^2``
    without a pass over the block. The subtraction loses about ``eps ||A||^2``
    to rounding, which moves the relative error ``e`` of the block by about
    ``eps / e``; where ``e^2 < 100 sqrt(eps)`` (``e`` below 1.2e-3 in float64,
    0.19 in float32) the residual is computed from the block itself, so the
    reported error stays within about 1e-12 of the true one in float64.
    """
    s64 = s_k.astype(np.float64)
    d = Eb - np.einsum("...k,...k->...", s64, s64)
    tiny = d <= 100 * np.sqrt(np.finfo(s_k.dtype).eps) * Eb
    for b in zip(*np.nonzero(tiny)):
        d[b] = residual_energy(A[b], B[b], Vt[b])
    return np.maximum(d, 0.0)


def residual_energy(a, b, vt):
    """``||a - b vt||_F^2`` (float64 sums) by row chunks of about ``_RESIDUAL_CHUNK`` entries: no copy of ``a``."""
    step = max(1, _RESIDUAL_CHUNK // max(1, a.shape[-1]))
    out = 0.0
    for r in range(0, a.shape[0], step):
        R = a[r : r + step] - b[r : r + step] @ vt
        out += float(np.einsum("ij,ij->", R, R, dtype=np.float64))
    return out


_RESIDUAL_CHUNK = 1 << 20  # entries per chunk of a residual computed from the block

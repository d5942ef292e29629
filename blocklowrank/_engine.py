"""The numerical engine: batched truncated SVD over the blocks of a layout.

:func:`fit_layout` reads as its steps: plan (how many components each group of
equal-shaped blocks needs, with which solver), SVD (one batched call per group),
allocate (per-block ranks for a budget or a target error), truncate (the kept
factors), error (from the discarded spectrum). Every active block is cut out of
the matrix (or every matrix of a stack) without a Python loop over blocks:
consecutive equal-sized block-rows/columns form regions that reshape into stacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._allocation import _allocate as _allocate_ranks
from ._allocation import no_worse_than_uniform
from ._parallel import run_chunked
from ._params import SVD_OPTIONS, validate_params
from ._svd import _exact_jobs, _exact_svd, _solve
from ._validation import OptionError, pow2_scale, validate_matrix
from .factors import StructuredFactors, _Group
from .layout import BlockLayout

__all__ = ["fit_layout", "Approximation", "FitReport", "BlockSpectra", "block_spectra"]


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True, eq=False)
class FitReport:
    """How a fit went, beside its factors (for a stack, arrays over the stack).

    Attributes
    ----------
    error : float or ndarray
        Relative Frobenius error ``||X - X_hat||_F / ||X||_F`` (0.0 for X = 0).
    discarded_energy, total_energy : float or ndarray
        ``||X - X_hat||_F^2`` and ``||X||_F^2``.
    svd_solver : dict
        Always a dict, in every fit: the shape ``(rows, columns)`` of the
        matrices a fit decomposed (its blocks; for the hybrid, also the whole
        matrix of its global steps; for shared bases, the block-rows and
        block-columns of its SVD start) -> the solver that ran on them,
        "full" or "randomized" ("auto" resolved to the one it kept;
        "full+randomized" when the steps of an iterative fit used both).
        Empty when no SVD ran (shared bases from a random start).
    exact_allocation : bool or None
        For a budget or a target error: whether the rank allocation is provably
        optimal (see :func:`~blocklowrank.allocate_ranks`); None otherwise.
    singular_values : dict or None
        ``{(i, j): sigma}`` computed for each active block (SVD structures).
    error_trace, n_iter, stop_reason
        Iterative fits: error after every accepted step, passes run, and why
        they stopped; None for the one-pass SVD structures.
    """

    error: object
    discarded_energy: object = None
    total_energy: object = None
    svd_solver: dict = field(default_factory=dict)
    exact_allocation: object = None
    singular_values: dict = None
    error_trace: object = None
    n_iter: object = None
    stop_reason: object = None


class Approximation:
    """What every fit returns: its :class:`~blocklowrank.factors.StructuredFactors`
    (``.factors``) and its :class:`FitReport` (``.report``).

    The report's fields (``error``, ``error_trace``, ...) and the container's
    (``layout``, ``ranks``, ``n_params``, ``global_factors``, ``shared``, ...)
    read as attributes of the result. ``reconstruction`` is the dense
    approximation, built on first access.
    """

    def __init__(self, factors, report):
        self.factors = factors
        self.report = report
        self._dense = None

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        for src in (self.__dict__.get("report"), self.__dict__.get("factors")):
            if src is not None and hasattr(src, name):
                return getattr(src, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def ranks(self):
        return self.factors.ranks.copy() if self.factors.batch_shape else self.factors.layout.ranks.copy()

    @property
    def reconstruction(self):
        if self._dense is None:
            self._dense = self.factors.to_dense()
        return self._dense

    def to_dense(self):
        """The dense approximation (same as :attr:`reconstruction`)."""
        return self.reconstruction

    def block_factors(self, i, j):
        """``(B_ij, A_ij)`` of block ``(i, j)``."""
        return self.factors[(i, j)]

    def __repr__(self):
        err = self.error if np.ndim(self.error) == 0 else f"array{np.shape(self.error)}"
        return f"Approximation({self.factors!r}, error={err})"


# ---------------------------------------------------------------------------- entry
def _rank_mode(layout, rank, budget, max_error, cap_rank):
    """The one rank rule given (``("rank" | "budget" | "max_error" | "layout", value)``), checked
    against the layout (the values' own rules are checked by :func:`fit_layout`'s decorator)."""
    given = [p for p, v in (("rank", rank), ("budget", budget), ("max_error", max_error)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give only one of rank, budget and max_error (got {', '.join(given)})")
    if not given:
        if layout.n_params == 0:
            raise ValueError("give one of rank, budget or max_error (or a layout with ranks)")
        return "layout", None
    if given[0] == "budget":
        cheapest = int(layout.block_costs[layout.active].min())
        if budget < cheapest:
            raise ValueError(
                f"budget={budget} is below the cheapest configuration of this layout: one "
                f"rank-1 block costs {cheapest} parameters"
            )
        return "budget", budget
    if given[0] == "max_error":
        return "max_error", max_error
    r = rank if np.ndim(rank) == 0 else np.asarray(rank)
    if np.ndim(r) and r.shape != layout.n_blocks:
        raise ValueError(f"per-block rank must have shape {layout.n_blocks} (the grid), got {r.shape}")
    rr = np.where(layout.active, np.broadcast_to(np.asarray(r), layout.active.shape), 0)
    over = np.argwhere(rr > layout.max_ranks)
    if over.size and not cap_rank:
        i, j = (int(v) for v in over[0])
        raise OptionError(
            f"rank {int(rr[i, j])} exceeds the smaller side of block ({i}, {j}), which is "
            f"{layout.row_sizes[i]}x{layout.col_sizes[j]} (max rank {int(layout.max_ranks[i, j])}); lower "
            "«rank», use fewer blocks («n_blocks»), or pass «cap_rank=True» to cap each block's rank at its "
            "smaller side"
        )
    lay = layout.with_ranks(r, cap_rank=cap_rank)
    if lay.n_params == 0:
        raise ValueError("per-block ranks are all zero")
    return "layout", lay


@validate_params("rank", "budget", "max_error", "cap_rank", *SVD_OPTIONS, layout=[BlockLayout])
def fit_layout(
    X,
    layout,
    *,
    rank=None,
    budget=None,
    max_error=None,
    svd_solver="auto",
    n_oversamples=10,
    iterated_power="auto",
    random_state=None,
    cap_rank=False,
    n_jobs=None,
    structure=None,
):
    """Fit every active block of ``layout`` by its truncated SVD (the engine's public entry).

    Parameters and result as :func:`blocklowrank.approximate`, with the layout
    given (use ``approximate`` to name a structure instead).
    """
    X = validate_matrix(X)
    if tuple(layout.shape) != tuple(X.shape[-2:]):
        raise ValueError(f"layout is for shape {layout.shape} but X has shape {tuple(X.shape[-2:])}")
    mode, value = _rank_mode(layout, rank, budget, max_error, cap_rank)
    if mode == "layout":
        layout, value = (value or layout), None
    svd = (svd_solver, n_oversamples, iterated_power)
    if svd_solver == "randomized" and mode == "max_error":
        raise ValueError("max_error needs every singular value: use svd_solver='full' or 'auto'")
    from sklearn.utils import check_random_state

    return _fit_layout(X, layout, mode, value, svd, check_random_state(random_state), n_jobs, structure)


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
    for b in zip(*np.nonzero(tiny)):  # row chunks of about _RESIDUAL_CHUNK entries: no copy of A
        a, bb, vt = A[b], B[b], Vt[b]
        step = max(1, _RESIDUAL_CHUNK // max(1, a.shape[-1]))
        d[b] = 0.0
        for r in range(0, a.shape[0], step):
            R = a[r : r + step] - bb[r : r + step] @ vt
            d[b] += np.einsum("ij,ij->", R, R, dtype=np.float64)
    return np.maximum(d, 0.0)


_RESIDUAL_CHUNK = 1 << 20  # entries per chunk of a residual computed from the block


# ---------------------------------------------------------------------------- spectra only
@dataclass(eq=False)
class BlockSpectra:
    """Singular values of every active block of a layout, for one matrix or a stack.

    Cheaper than a fit when only errors are needed (no singular vectors are
    computed), and enough to evaluate any rank choice exactly: by
    Eckart-Young the error of rank ``r`` on a block is the energy of its
    singular values past ``r``.

    Attributes
    ----------
    layout : BlockLayout
    values : dict
        ``{(i, j): sigma}`` with ``sigma`` of shape ``(..., min(m_i, n_j))``.
    block_energy : ndarray, shape (..., K_rows, K_cols)
        ``||X_ij||_F^2`` of every block (active or not).
    total_energy : ndarray, shape (...)
    scale : ndarray or None
        Power-of-two exponent per matrix applied before summing squares
        (None: 0); errors are computed on the scaled values, so extreme but
        finite entries never overflow them.
    """

    layout: BlockLayout
    _values: dict
    _energy: np.ndarray
    scale: object = None

    def _unscaled(self, a, power):
        """``a`` (of shape ``batch + extra``) divided by the scale to the ``power``."""
        if self.scale is None:
            return a
        nb = self.scale.ndim - 2
        return np.ldexp(a, -power * self.scale.reshape(self.scale.shape[:nb] + (1,) * (a.ndim - nb)))

    @property
    def values(self):
        return {k: self._unscaled(v, 1) for k, v in self._values.items()}

    @property
    def block_energy(self):
        return self._unscaled(self._energy, 2)

    @property
    def total_energy(self):
        return self._unscaled(self._energy.sum(axis=(-2, -1)), 2)

    def _tails(self):
        """(..., n_active, L_max + 1): energy past rank r of each active block."""
        if getattr(self, "_tail_cache", None) is None:
            keys = list(self._values)
            batch = self._energy.shape[:-2]
            L = max(v.shape[-1] for v in self._values.values())
            T = np.zeros(batch + (len(keys), L + 1))
            for t, k in enumerate(keys):
                s2 = self._values[k].astype(np.float64) ** 2
                T[..., t, : s2.shape[-1]] = np.cumsum(s2[..., ::-1], axis=-1)[..., ::-1]
            self._tail_cache = (T, np.array([k[0] for k in keys]), np.array([k[1] for k in keys]))
        return self._tail_cache

    def _ranks(self, ranks):
        lay = self.layout
        r = np.asarray(ranks)
        if r.dtype == bool or not np.issubdtype(r.dtype, np.integer) or np.any(r < 0):
            raise ValueError(f"ranks must be integers >= 0 (one, per block, or per matrix and block), got {ranks!r}")
        return np.broadcast_to(np.where(lay.active, ranks, 0), self._energy.shape[:-2] + lay.n_blocks)

    def _discarded(self, ranks):
        R = self._ranks(ranks)
        out = (self._energy * ~self.layout.active).sum(axis=(-2, -1))
        T, ii, jj = self._tails()
        r = np.minimum(R[..., ii, jj], T.shape[-1] - 1)
        return out + np.take_along_axis(T, r[..., None], axis=-1)[..., 0].sum(axis=-1)

    def discarded(self, ranks):
        """Energy left out by per-block ranks (int, (K_rows, K_cols) or (..., K_rows, K_cols))."""
        return self._unscaled(self._discarded(ranks), 2)

    def error(self, ranks):
        """Relative Frobenius error for the given per-block ranks (0 for X = 0)."""
        d = self._discarded(ranks)
        tot = self._energy.sum(axis=(-2, -1))
        return np.where(tot > 0, np.sqrt(np.maximum(d, 0) / np.where(tot > 0, tot, 1)), 0.0)

    def n_params(self, ranks):
        return (self._ranks(ranks) * self.layout.block_costs).sum(axis=(-2, -1))

    @validate_params("budget")
    def allocate(self, budget):
        """Budget-optimal per-block ranks, shape (..., K_rows, K_cols), and the exactness flag."""
        lay = self.layout
        batch = self._energy.shape[:-2]
        B = int(np.prod(batch)) if batch else 1
        keys = list(self._values)
        if getattr(self, "_gain_cache", None) is None:
            self._gain_cache = [self._values[k].reshape(B, -1).astype(np.float64) ** 2 for k in keys]
        gains = self._gain_cache
        costs = [int(lay.block_costs[k]) for k in keys]
        maxr = [int(lay.max_ranks[k]) for k in keys]
        alloc, exact = _budget_allocation(gains, costs, maxr, budget)
        return _scatter(alloc, keys, batch, lay.n_blocks), exact


@validate_params("n_jobs")
def block_spectra(X, layout, *, n_jobs=None):
    """Singular values of every active block of ``layout`` (ranks ignored), batched.

    Parameters
    ----------
    X : array-like of shape (m, n) or (..., m, n)
    layout : BlockLayout
    n_jobs : int, optional
        As in :func:`blocklowrank.approximate`.

    Returns
    -------
    BlockSpectra

    Examples
    --------
    >>> import numpy as np
    >>> from blocklowrank import BlockLayout, approximate
    >>> from blocklowrank import block_spectra
    >>> X = np.random.default_rng(0).standard_normal((3, 12, 12))
    >>> sp = block_spectra(X, BlockLayout.block((12, 12), 2))
    >>> bool(np.allclose(sp.error(2), approximate(X, method="block", n_blocks=2, rank=2).error))
    True
    """
    X = validate_matrix(X)
    if not isinstance(layout, BlockLayout) or tuple(layout.shape) != tuple(X.shape[-2:]):
        raise ValueError(f"layout must be a BlockLayout of shape {tuple(X.shape[-2:])}, got {layout!r}")
    scale = pow2_scale(X)
    if scale is not None:
        X = np.ldexp(X, scale)
    if layout.permuted:
        X = layout.permute(X)
    lay = layout.with_ranks(0)
    groups_idx = lay.groups()
    blocks = _gather(X, lay, groups_idx)
    values = {}
    for shp, (ii, jj) in groups_idx.items():
        A = blocks[shp]
        flat = A.reshape((-1,) + shp)
        jobs = _exact_jobs(n_jobs, flat.shape[0], *shp, flat.dtype)
        (s,) = run_chunked(
            lambda a: _exact_svd(a, in_workers=min(jobs, len(flat)) > 1, compute_uv=False), (flat,), jobs
        )
        s = s.reshape(A.shape[:-2] + (min(shp),))
        for t, (i, j) in enumerate(zip(ii.tolist(), jj.tolist())):
            values[(i, j)] = s[..., t, :]
    return BlockSpectra(lay, values, _block_energies(X, lay), scale)

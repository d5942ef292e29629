"""Singular values only: the error of every rank choice of a layout, plain or in a data metric, and
one total budget allocated over many layers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._allocation import _allocate as _allocate_ranks
from .._allocation import allocate_ranks
from .._metric._objective import grams, prepare
from .._parallel import run_chunked
from .._params import validate_params
from .._svd import _exact_jobs, _exact_svd
from .._validation import pow2_scale, validate_matrix
from ..layout import BlockLayout
from ._metric import metric_spectra, permuted_problem
from ._plain import _block_energies, _budget_allocation, _gather, _scatter

__all__ = ["BlockSpectra", "block_spectra", "allocate_total_budget"]


@dataclass(eq=False)
class BlockSpectra:
    """Singular values of every active block of a layout, for one matrix or a stack.

    Cheaper than a fit when only errors are needed (no singular vectors are
    computed), and enough to evaluate any rank choice exactly: by
    Eckart-Young the error of rank ``r`` on a block is the energy of its
    singular values past ``r``.

    In a data metric (:func:`block_spectra` with ``input_gram``/``output_gram``)
    the values are those of each block's target in its metric, the energies
    are in the damped objective ``f_delta``, and :meth:`error` is the damped
    relative output error ``sqrt(f_delta / f_delta(0))``: exactly that of the
    fit at those ranks where the blocks decouple (``exact``), a heuristic
    elsewhere (the first sweep of the block-coordinate descent, ``exact=False``).

    Attributes
    ----------
    layout : BlockLayout
    values : dict
        ``{(i, j): sigma}`` with ``sigma`` of shape ``(..., min(m_i, n_j))``.
    block_energy : ndarray, shape (..., K_rows, K_cols)
        ``||X_ij||_F^2`` of every block (active or not); in a data metric, the
        energy of each active block's target (0 elsewhere).
    total_energy : ndarray, shape (...)
        ``||X||_F^2``; in a data metric ``f_delta(0)``.
    fixed_loss : ndarray, shape (...)
        The energy no rank captures: the inactive blocks' (plain), or
        ``f_delta(0)`` minus the targets' energy (in a data metric).
    scale : ndarray or None
        Power-of-two exponent per matrix applied before summing squares
        (None: 0); errors are computed on the scaled values, so extreme but
        finite entries never overflow them.
    exact : bool
        Whether the error of every rank choice is exact (always, plain).
    gram_damping : float or None
        The damping of the metric (None: plain).
    """

    layout: BlockLayout
    _values: dict
    _energy: np.ndarray
    scale: object = None
    _fixed: object = None
    exact: bool = True
    gram_damping: object = None

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

    def _fixed_loss(self):
        return (self._energy * ~self.layout.active).sum(axis=(-2, -1)) if self._fixed is None else self._fixed

    def _total(self):
        if self._fixed is None:  # plain: every block's energy
            return self._energy.sum(axis=(-2, -1))
        return (self._energy * self.layout.active).sum(axis=(-2, -1)) + self._fixed

    @property
    def total_energy(self):
        return self._unscaled(self._total(), 2)

    @property
    def fixed_loss(self):
        return self._unscaled(self._fixed_loss(), 2)

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
        T, ii, jj = self._tails()
        r = np.minimum(R[..., ii, jj], T.shape[-1] - 1)
        return self._fixed_loss() + np.take_along_axis(T, r[..., None], axis=-1)[..., 0].sum(axis=-1)

    def discarded(self, ranks):
        """Energy left out by per-block ranks (int, (K_rows, K_cols) or (..., K_rows, K_cols))."""
        return self._unscaled(self._discarded(ranks), 2)

    def error(self, ranks):
        """Relative error for the given per-block ranks (0 for X = 0): Frobenius, or in a data metric
        the damped output error (see the class docstring)."""
        d, tot = self._discarded(ranks), self._total()
        return np.where(tot > 0, np.sqrt(np.maximum(d, 0) / np.where(tot > 0, tot, 1)), 0.0)

    def n_params(self, ranks):
        return (self._ranks(ranks) * self.layout.block_costs).sum(axis=(-2, -1))

    def _gains(self):
        keys = list(self._values)
        batch = self._energy.shape[:-2]
        B = int(np.prod(batch)) if batch else 1
        if getattr(self, "_gain_cache", None) is None:
            self._gain_cache = [self._values[k].reshape(B, -1).astype(np.float64) ** 2 for k in keys]
        lay = self.layout
        return (
            keys,
            batch,
            self._gain_cache,
            [int(lay.block_costs[k]) for k in keys],
            [int(lay.max_ranks[k]) for k in keys],
        )

    @validate_params("budget", "max_error")
    def allocate(self, budget=None, *, max_error=None):
        """Per-block ranks, shape (..., K_rows, K_cols), and whether they are provably optimal:
        the budget-optimal ranks, or the fewest parameters whose :meth:`error` is ``<= max_error``."""
        if (budget is None) == (max_error is None):
            raise ValueError("give exactly one of budget and max_error")
        keys, batch, gains, costs, maxr = self._gains()
        if budget is not None:
            alloc, exact = _budget_allocation(gains, costs, maxr, budget)
        else:
            fixed, total = (np.reshape(a, -1).astype(np.float64) for a in (self._fixed_loss(), self._total()))
            worst = np.sqrt(fixed / np.where(total > 0, total, 1))
            if np.any(worst > max_error * (1 + 1e-12)):
                raise ValueError(
                    f"max_error={max_error} cannot be reached: what no rank captures leaves a relative "
                    f"error of {float(worst.max()):.4g}"
                )
            alloc, exact = _allocate_ranks(gains, costs, maxr, max_error=max_error, fixed_loss=fixed, total=total)
        return _scatter(alloc, keys, batch, self.layout.n_blocks), bool(exact and self.exact)


@validate_params("gram_damping", "n_jobs")
def block_spectra(X, layout, *, input_gram=None, output_gram=None, gram_damping=None, n_jobs=None):
    """Singular values of every active block of ``layout`` (ranks ignored), batched.

    Parameters
    ----------
    X : array-like of shape (m, n) or (..., m, n)
    layout : BlockLayout
    input_gram, output_gram, gram_damping : optional
        A data metric, as in :func:`blocklowrank.approximate`: the spectra of
        each block's target in its metric (see :class:`BlockSpectra`), one
        matrix of a stack after the other.
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
    if input_gram is not None or output_gram is not None:
        return _metric_block_spectra(X, layout, (input_gram, output_gram, gram_damping), n_jobs)
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


def _metric_block_spectra(X, layout, metric, n_jobs):
    """:func:`block_spectra` in a data metric: per matrix, :func:`metric_spectra`."""
    m, n = X.shape[-2:]
    G, H = grams(metric[0], metric[1], (m, n), metric[2])
    G, H, lay0 = permuted_problem(layout, G, H)
    batch = X.shape[:-2]
    flat = X.reshape((-1, m, n))
    if layout.permuted:
        flat = layout.permute(flat)
    sps = [metric_spectra(prepare(W, G, H), lay0, n_jobs) for W in flat]
    values, energy = {}, np.zeros((len(sps),) + layout.n_blocks)
    for key in sps[0].values:
        vals = [sp.values[key] for sp in sps]
        L = max(v.size for v in vals)
        values[key] = np.stack([np.pad(v, (0, L - v.size)) for v in vals]).reshape(batch + (L,))
        energy[(slice(None),) + key] = [float(np.sum(v**2)) for v in vals]
    fixed = np.array([sp.fixed_loss for sp in sps]).reshape(batch)
    delta = H.damping if G.is_identity else G.damping
    exact = all(sp.exact for sp in sps)
    return BlockSpectra(
        layout.with_ranks(0), values, energy.reshape(batch + layout.n_blocks), None, fixed, exact, delta
    )


def allocate_total_budget(spectra, budget):
    """Per-block ranks of many layers under one total parameter budget, minimising the sum of the
    layers' squared relative errors.

    The rule: ``sum_l discarded_l(r_l) / total_l`` is minimised, that is
    ``sum_l f_l / f_l(0)`` in a data metric (each layer's squared relative output
    error) or ``sum_l ||W_l - M_l||^2 / ||W_l||^2`` plain. It is scale-free: layers
    whose inputs live in different units (a metric per input site) weigh alike,
    each by how much of its own output it loses. Solved as one allocation over
    every component of every layer (gain ``sigma^2 / total_l`` for ``m_i + n_j``
    parameters; :func:`~blocklowrank.allocate_ranks`).

    Parameters
    ----------
    spectra : sequence of BlockSpectra
        One per layer, each of a single matrix (plain or in its metric).
    budget : int
        Parameters to spend over all the layers.

    Returns
    -------
    ranks : list of ndarray of int
        Per-block ranks of each layer, ``(K_rows, K_cols)``.
    exact : bool
        Whether the allocation is provably optimal (an exact allocation on
        spectra that are exact for every layer).

    Examples
    --------
    >>> import numpy as np
    >>> from blocklowrank import BlockLayout, allocate_total_budget, block_spectra
    >>> rng = np.random.default_rng(0)
    >>> lay = BlockLayout.global_((8, 8))
    >>> low = rng.standard_normal((8, 2)) @ rng.standard_normal((2, 8))
    >>> sps = [block_spectra(low * 1e3, lay), block_spectra(rng.standard_normal((8, 8)), lay)]
    >>> ranks, exact = allocate_total_budget(sps, 4 * 16)
    >>> [int(r.sum()) for r in ranks], exact   # the large but rank-2 layer needs only 2
    ([2, 2], True)
    """
    spectra = list(spectra)
    if not spectra or not all(isinstance(sp, BlockSpectra) and not sp._energy.shape[:-2] for sp in spectra):
        raise ValueError("spectra must be a non-empty sequence of BlockSpectra of single matrices (one per layer)")
    weights = [1.0 / total if total > 0 else 0.0 for total in (float(sp._total()) for sp in spectra)]
    ranks, exact, _ = pooled_allocation(spectra, budget, weights)
    return ranks, bool(exact and all(sp.exact for sp in spectra))


def pooled_allocation(spectra, budget, weights):
    """One allocation over every block of every layer, layer ``l``'s gains (its squared singular
    values in the spectra's internal units) times ``weights[l]``: ``(ranks, exact, (gains, costs,
    max_ranks, alloc))``, the pooled items last (for a caller's bound on the optimum)."""
    gains, costs, maxr, owner = [], [], [], []
    for t, (sp, w) in enumerate(zip(spectra, weights)):
        keys, _, g, c, mr = sp._gains()
        for k, gk, ck, mk in zip(keys, g, c, mr):
            gains.append(gk * w)
            costs.append(ck)
            maxr.append(mk)
            owner.append((t, k))
    alloc, exact = allocate_ranks(gains, costs, maxr, budget=budget)
    ranks = [np.zeros(sp.layout.n_blocks, dtype=np.int64) for sp in spectra]
    for a, (t, k) in zip(alloc[0], owner):
        ranks[t][k] = a
    return ranks, bool(exact), (gains, costs, maxr, alloc[0])

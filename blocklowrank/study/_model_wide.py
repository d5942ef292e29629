"""Model-wide allocation: one total budget over every block of every layer (see :mod:`blocklowrank.study`)."""

from __future__ import annotations

import numpy as np

from .._engine._spectra import pooled_allocation
from ..budget import RecordList
from ._calibrated import relative_spectra
from ._spectra import _load_spectra, _partitions

#: Columns of the model-wide records.
MODEL_WIDE_COLUMNS = (
    "structure",
    "n_blocks",
    "allocation",
    "total_budget",
    "n_params",
    "error",
    "mean_layer_error",
    "exact",
    "error_lower_bound",
    "fallback",
    "n_layers",
    "measure",
)


def allocate_model_wide(spectra, total_budget):
    """Per-block ranks of every layer under one total budget (gain-per-parameter water-filling) that
    minimise the total discarded energy, in the layers' own units (where
    :func:`~blocklowrank.allocate_total_budget` minimises the sum of relative errors).

    Parameters
    ----------
    spectra : list of BlockSpectra
        One per layer (single matrices), each of the same structure and grid size.
    total_budget : int
        The parameters all the layers share.

    Returns
    -------
    ranks : list of ndarray of int
        One ``(K_rows, K_cols)`` array of block ranks a layer.
    exact : bool
        True for a provably optimal allocation (equal block costs, or the
        exact dynamic programme): see :func:`~blocklowrank.allocate_ranks`.
    gap : float
        How much more energy than this allocation the optimum can keep at
        most (the fractional relaxation's optimum minus the energy kept here;
        0 up to rounding when ``exact``): the optimal discarded energy lies
        between ``discarded - gap`` and ``discarded``.

    Examples
    --------
    >>> import numpy as np
    >>> from blocklowrank.layout import BlockLayout
    >>> from blocklowrank import block_spectra
    >>> rng = np.random.default_rng(0)
    >>> sps = [block_spectra(rng.standard_normal((8, 8)) * s, BlockLayout.global_((8, 8))) for s in (1, 3)]
    >>> ranks, exact, _ = allocate_model_wide(sps, 4 * 16)
    >>> [int(r.sum()) for r in ranks], exact   # the larger layer gets more of the budget
    ([0, 4], True)
    """
    unscale = [float(sp._unscaled(np.ones(1), 2)[0]) for sp in spectra]  # energies in the layers' own units
    ranks, exact, (gains, costs, maxr, alloc) = pooled_allocation(spectra, int(total_budget), unscale)
    kept = sum(float(g[0, :r].sum()) for g, r in zip(gains, alloc))
    return ranks, exact, max(_fractional_bound(gains, costs, maxr, int(total_budget)) - kept, 0.0)


def _fractional_bound(gains, costs, maxr, budget):
    """Most energy the LP relaxation keeps: items by gain per parameter, the last one in part."""
    g = np.concatenate([gn[0, :mr] for gn, mr in zip(gains, maxr)])
    c = np.concatenate([np.full(min(gn.shape[1], mr), cost) for gn, mr, cost in zip(gains, maxr, costs)])
    order = np.argsort(-g / c, kind="stable")
    g, c = g[order], c[order].astype(np.float64)
    spent = np.cumsum(c)
    full = spent <= budget
    kept = g[full].sum()
    t = int(full.sum())
    if t < g.size:
        kept += g[t] * (budget - (spent[t - 1] if t else 0.0)) / c[t]
    return float(kept)


def _model_wide(layers, files, names, ks, total, uniform_budgets, relative=False):
    """Model-wide vs uniform records for every layout partition present in every layer.

    ``relative`` (a study in the layers' data metrics): every layer's energies divided by its own total,
    so that the allocation minimises the sum of the layers' relative squared output errors and ``error``
    is their root mean square; ``exact`` also needs every layer's spectra to give its fits' errors."""
    out, per_layer, notes = [], [], []
    for name, K in dict.fromkeys(p for lay in layers for p in _partitions(names, lay["shape"], ks)):
        spectra = [_load_spectra(file, name, K, lay["shape"]) for lay, file in zip(layers, files)]
        if any(sp is None for sp in spectra):
            notes.append(f"{name} K={K}: not every layer has {K} blocks per side; no model-wide row")
            continue
        if relative:
            spectra = [relative_spectra(sp) for sp in spectra]
        energy = sum(float(sp.total_energy) for sp in spectra)
        unif = [
            sp.allocate(b)[0] if b >= 1 else np.zeros(sp.layout.n_blocks, int)
            for sp, b in zip(spectra, uniform_budgets)
        ]
        ranks, exact, gap = allocate_model_wide(spectra, total)
        exact = exact and all(sp.exact for sp in spectra)
        floor = _discarded(spectra, ranks) - gap  # no allocation within the total discards less
        fallback = not exact and _discarded(spectra, ranks) > _discarded(spectra, unif)
        ranks = unif if fallback else ranks
        for alloc, R, budget in (("model-wide", ranks, total), ("uniform", unif, sum(uniform_budgets))):
            errs = [float(sp.error(r)) for sp, r in zip(spectra, R)]
            wide = alloc == "model-wide"
            out.append(
                {
                    "structure": name,
                    "n_blocks": K,
                    "allocation": alloc,
                    "total_budget": int(budget),
                    "n_params": int(sum(int(sp.n_params(r)) for sp, r in zip(spectra, R))),
                    "error": _total_error(_discarded(spectra, R), energy),
                    "mean_layer_error": float(np.mean(errs)),
                    "exact": exact if wide else None,
                    "error_lower_bound": _total_error(floor, energy) if wide else None,
                    "fallback": fallback if wide else None,
                    "n_layers": len(spectra),
                    "measure": "output" if relative else "frobenius",
                }
            )
            per_layer += [
                {
                    "structure": name,
                    "n_blocks": K,
                    "allocation": alloc,
                    "layer": lay["layer"],
                    "module_type": lay["module_type"],
                    "n_params": int(sp.n_params(r)),
                    "rank_equivalent": int(sp.n_params(r)) / sum(lay["shape"]),
                    "error": e,
                }
                for lay, sp, r, e in zip(layers, spectra, R, errs)
            ]
    return (
        RecordList(out, columns=MODEL_WIDE_COLUMNS),
        RecordList(
            per_layer,
            columns=(
                "structure",
                "n_blocks",
                "allocation",
                "layer",
                "module_type",
                "n_params",
                "rank_equivalent",
                "error",
            ),
        ),
        notes,
    )


def _discarded(spectra, ranks):
    return sum(float(sp.discarded(r)) for sp, r in zip(spectra, ranks))


def _total_error(discarded, energy):
    return float(np.sqrt(max(discarded, 0.0) / energy)) if energy > 0 else 0.0

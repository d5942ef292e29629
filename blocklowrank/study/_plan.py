"""What a study runs and how it is shown: its default structures, the cost of the iterative ones, module roles.

- :func:`default_structures`: the layout structures (global, diagonal,
  block: one spectrum per grid size and layer, seconds per layer). The
  iterative ones (hybrid, shared basis) are studied only when named.
- :func:`estimate_cost`: before they start, the cost of the iterative
  structures, measured: one alternation of each on a random matrix of each
  layer shape, times the configurations that spend the layer's budget, times
  the most alternations allowed (an upper bound: fits stop earlier when they
  converge).
- :func:`apply_roles`: each layer's ``module_type`` is its role in its block
  (:func:`~blocklowrank.checkpoints.module_roles`), so that BERT's four kinds
  of ``dense`` are four types.
"""

from __future__ import annotations

import time

import numpy as np

from ..budget import match_budget
from ..checkpoints import module_roles
from ..structures import get_structure, structure_names

__all__ = ["default_structures", "estimate_cost", "cost_summary", "apply_roles"]

#: The iterative structures' own ``max_iter`` default.
_MAX_ITER = 100


def default_structures():
    """The layout structures (``Structure.spectral``): what a study fits when none are named."""
    return [name for name in structure_names() if get_structure(name).spectral]


def _one_alternation(name, shape, rec, fit_options, rng, grams):
    """Seconds of one alternation (``max_iter=1``: the initial pass) of one configuration on a random matrix
    (in the layer's metric ``grams``, the fit's keywords: {} for a plain fit)."""
    s = get_structure(name)
    X = rng.standard_normal(shape).astype(np.float32)
    opts = {k: v for k, v in {**fit_options, "max_iter": 1}.items() if k in s.options}
    start = time.perf_counter()
    s.fit(X, n_blocks=rec["n_blocks"], rank=rec["rank"], **{k: rec[k] for k in s.extra}, **opts, **grams)
    return time.perf_counter() - start


def _configs(name, pair, budget, ks):
    """The configurations of structure ``name`` that spend ``budget`` on ``pair`` (none: the layer is skipped)."""
    layer_ks = [K for K in ks if K <= min(pair.shape)] or [1]
    try:
        return match_budget(pair.shape, budget, methods=[name], n_blocks=layer_ks)
    except ValueError:
        return []


def _alternations(name, X, rec, fit_options, grams):
    """How many alternations a whole fit of one configuration takes on ``X`` (a real layer, in its metric)."""
    s = get_structure(name)
    opts = {k: v for k, v in fit_options.items() if k in s.options}
    res = s.fit(X, n_blocks=rec["n_blocks"], rank=rec["rank"], **{k: rec[k] for k in s.extra}, **opts, **grams)
    return max(1, int(np.max(res.n_iter)))


def estimate_cost(pairs, budgets, names, ks, fit_options=None, *, sample=None, metric=None, seed=0):
    """The cost of the iterative structures among ``names`` on these layers, measured before the study.

    Parameters
    ----------
    pairs : list of LayerPair
    budgets : list of int
        Each layer's budget.
    names : list of str
        The study's structures; the layout ones cost seconds and are skipped.
    ks : list of int
        Grid sizes.
    fit_options : dict, optional
        The study's ``max_iter`` (default 100) and ``tol``.
    sample : callable, optional
        ``sample(pair) -> ΔW`` of a layer: the smallest layer is fitted once
        in full (its first configuration), to count the alternations a fit
        takes; without it only the upper bound is given.
    metric : callable, optional
        ``metric(pair) -> dict``: the layer's Grams as the fit's keywords
        (``input_gram``, ``output_gram``, ``gram_damping``) in a calibrated
        study, whose fits are timed in them (a fit in a metric costs more
        per alternation than a plain one). Without it: plain fits.

    Returns
    -------
    list of dict
        Per iterative structure: ``structure``, ``fits`` (configurations
        over all layers), ``seconds_per_alternation`` (one alternation of
        every fit, extrapolated from one fit per layer shape on a random
        matrix), ``max_iter``, ``upper_bound`` (seconds, every fit running
        all its alternations) and, with ``sample``, ``alternations`` (those
        of the whole fit of the smallest layer), ``layer`` (its name) and
        ``estimate`` (seconds at that many alternations per fit).
    """
    fit_options = dict(fit_options or {})
    metric = metric or (lambda pair: {})
    max_iter = int(fit_options.get("max_iter", _MAX_ITER))
    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        if get_structure(name).spectral:
            continue
        fits, per_alt, measured, first = 0, 0.0, {}, None
        for pair, budget in sorted(zip(pairs, budgets), key=lambda pb: pb[0].shape[0] * pb[0].shape[1]):
            key = (tuple(pair.shape), int(budget))
            if key not in measured:
                recs = _configs(name, pair, budget, ks)
                seconds = _one_alternation(name, pair.shape, recs[0], fit_options, rng, metric(pair)) if recs else 0.0
                measured[key] = (len(recs), seconds * len(recs), recs[0] if recs else None)
            n, t, rec = measured[key]
            fits, per_alt = fits + n, per_alt + t
            first = first or (rec and (pair, rec))
        cost = {"structure": name, "fits": fits, "seconds_per_alternation": per_alt, "max_iter": max_iter}
        cost["upper_bound"] = per_alt * max_iter
        if sample is not None and first is not None:
            n_iter = min(_alternations(name, sample(first[0]), first[1], fit_options, metric(first[0])), max_iter)
            cost.update(alternations=n_iter, layer=first[0].module, estimate=per_alt * n_iter)
        out.append(cost)
    return out


def _duration(seconds):
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cost_summary(costs):
    """The estimate as lines to print before the study starts."""
    lines = []
    for c in costs:
        ten = _duration(c["seconds_per_alternation"] * min(10, c["max_iter"]))
        about = (
            f"a whole fit of {c['layer']} took {c['alternations']} alternations, so about "
            f"{_duration(c['estimate'])}, at most {_duration(c['upper_bound'])}"
            if "estimate" in c
            else f"so at most {_duration(c['upper_bound'])}"
        )
        lines.append(
            f"[study] {c['structure']} is iterative: {c['fits']} fits of up to {c['max_iter']} alternations; "
            f"one alternation of every fit costs about {_duration(c['seconds_per_alternation'])} here; {about} "
            f"(a max_iter of 10, --max-iter 10 or fit_options={{'max_iter': 10}}, bounds it to {ten})"
        )
    return lines


def apply_roles(layers):
    """Set ``module_type`` of each layer record and of its rows to the layer's role (in place)."""
    roles = module_roles([lay["layer"] for lay in layers])
    for lay in layers:
        lay["module_type"] = roles[lay["layer"]]
        for row in lay.get("rows", ()):
            row["module_type"] = roles[lay["layer"]]
    return layers

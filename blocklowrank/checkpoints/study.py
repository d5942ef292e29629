"""The checkpoint study: every layer of a model approximated by every registered structure.

For each selected layer of a checkpoint pair, the weight update
``ΔW = W_finetuned - W_base`` (or, with one checkpoint, the weight ``W``
itself: compression) is approximated by every registered structure
(:func:`~blocklowrank.structures.structures`) at a matched parameter budget,
with :func:`~blocklowrank.compare.compare_at_budget` (every configuration of
every grid size, uniform ranks and budget-optimal per-block ranks).

Budgets
-------
Per layer, as a LoRA-equivalent rank (``budget_rank=r``: ``r (m + n)``
parameters for an ``m x n`` layer) or as a fraction of the layer's size
(``budget_fraction=f``: ``floor(f m n)``). With ``total_budget=P`` the
model-wide total is ``P`` and each layer's own budget is the largest common
LoRA-equivalent rank ``t = P / sum (m + n)`` (a fraction), ``floor(t (m + n))``.

Model-wide allocation
---------------------
For every layout structure (``Structure.spectral``) and grid size, one total
budget is spread over all layers and all their blocks at once: every block of
every layer contributes its squared singular values ``sigma_k^2`` (the energy
rank ``k`` would capture) at cost ``m_i + n_j`` per rank, and
:func:`~blocklowrank._allocation.allocate_ranks` is called once on the
concatenation (:func:`allocate_model_wide`). It minimises the total discarded
energy ``sum_l ||ΔW_l - approx_l||_F^2``, i.e. the model-wide relative error
``sqrt(sum discarded / sum ||ΔW_l||_F^2)``:

- equal costs (every block of every layer with the same ``m_i + n_j``): keeping
  the largest ``sigma^2`` is exactly optimal by the exchange argument;
- unequal costs: the exact dynamic programme while it is small, else greedy by
  gain per parameter. The greedy keeps every item before the first that does not
  fit in gain-per-parameter order, so it is within that item's gain (at most the
  largest single ``sigma^2``) of the fractional (LP) optimum, hence of the
  optimum. The study reports the certified gap: ``error_lower_bound`` comes
  from the LP optimum, and the optimal error lies between it and ``error``.

It is reported against the *uniform* allocation at the same total: every layer
gets the study's per-layer budget (the same LoRA-equivalent rank, or the same
fraction), spent optimally inside the layer. The uniform allocation is one of
those the model-wide one chooses among, so the model-wide error is never
larger when the allocation is exact; a greedy result worse than the uniform
one is replaced by it (``fallback``).

Effective rank
--------------
Per layer, the entropy effective rank of Roy & Vetterli (2007):
``exp(-sum_k p_k log p_k)`` with ``p_k = sigma_k / sum_j sigma_j`` over the
singular values of the matrix studied (0 for a zero matrix). It lies between
1 and ``min(m, n)``; a rank-``r`` matrix with equal singular values has
effective rank ``r``.

Long runs
---------
Layers run through :func:`joblib.Parallel` (``n_jobs``), each worker opening
the checkpoint files by path and reading only its own layer, so peak memory is
a few layers' worth whatever the model size. Any joblib backend works without
code change, e.g. Dask (workers must see the checkpoint and output paths)::

    from dask.distributed import Client
    import joblib
    client = Client("scheduler:8786")
    with joblib.parallel_config(backend="dask"):
        run_study("base.safetensors", "tuned.safetensors", out="study", n_jobs=-1)

(Ray: ``from ray.util.joblib import register_ray; register_ray()``, then
``backend="ray"``.) A ``tqdm`` bar counts the layers. With ``out``, each
finished layer is one JSON line of ``out/study.jsonl``
(:class:`~blocklowrank.sweep.RunLog`) and its spectra one file in
``out/spectra/``: a killed study started again with the same settings redoes
only the layers not logged (a torn last line included).

References
----------
.. [1] O. Roy and M. Vetterli, "The effective rank: a measure of effective
   dimensionality", EUSIPCO 2007.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from .._allocation import allocate_ranks
from .._engine import BlockSpectra, block_spectra
from ..budget import RecordList, check_methods, match_budget
from ..compare import compare_at_budget
from ..structures import get_structure, structure_names
from .safetensors import open_checkpoint
from .select import ALL_LINEAR, LayerPair, iter_deltas, pair_layers

__all__ = [
    "run_study",
    "effective_rank",
    "allocate_model_wide",
    "STUDY_COLUMNS",
    "MODEL_WIDE_COLUMNS",
    "DEFAULT_N_BLOCKS",
]

#: Grid sizes K tried by default (those at most a layer's smaller side).
DEFAULT_N_BLOCKS = (2, 4, 8)
#: LoRA-equivalent ranks of the error-vs-budget curves (those below a layer's dense size).
CURVE_RANKS = (1, 2, 4, 8, 16, 32, 64)
#: Columns of the per-layer records.
STUDY_COLUMNS = (
    "layer",
    "module_type",
    "shape",
    "structure",
    "config",
    "allocation",
    "n_blocks",
    "rank",
    "block_ranks",
    "n_params",
    "budget",
    "budget_rank",
    "exact",
    "error",
    "energy",
    "best",
    "effective_rank",
)
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
)


def effective_rank(singular_values):
    """Entropy effective rank (Roy & Vetterli): ``exp(H(p))`` with ``p = sigma / sum(sigma)``.

    Examples
    --------
    >>> effective_rank([3.0, 3.0, 3.0, 0.0]), effective_rank([0.0, 0.0])
    (3.0, 0.0)
    """
    s = np.abs(np.asarray(singular_values, dtype=np.float64))
    total = s.sum()
    if not total > 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def _budget(shape, budget_rank, budget_fraction):
    m, n = shape
    return int(budget_fraction * m * n) if budget_fraction is not None else int(budget_rank) * (m + n)


def _config(rec):
    """``"K=2 r=4"``, ``"K=2 r=1 global_rank=2"`` or ``"K=4 optimal ranks"``."""
    s = get_structure(rec["method"])
    words = [f"K={rec['n_blocks']}"]
    if rec["allocation"] == "optimal":
        words.append("optimal ranks")
    else:
        words.append(f"r={rec['rank']}")
        words += [f"{k}={rec[k]}" for k in s.extra if rec.get(k) is not None]
    return " ".join(words)


def _partitions(names, shape, ks):
    """``(structure, K)`` of every layout structure among ``names`` valid for ``shape``."""
    out = []
    for name in names:
        s = get_structure(name)
        if s.spectral:
            out += [(name, K) for K in ([s.fixed_blocks] if s.fixed_blocks else ks) if K <= min(shape)]
    return out


def _spectra_arrays(delta, names, ks):
    """Singular values and block energies of every layout partition, as npz-ready arrays."""
    arrays = {}
    for name, K in _partitions(names, delta.shape, ks):
        sp = block_spectra(delta, get_structure(name).layout(delta.shape, K))
        arrays[f"{name}|{K}|E"] = sp.block_energy
        arrays.update({f"{name}|{K}|{i}|{j}": v for (i, j), v in sp.values.items()})
    return arrays


def _load_spectra(arrays, name, K, shape):
    """The :class:`BlockSpectra` of partition ``(name, K)`` from arrays or an npz file (None if absent)."""
    prefix = f"{name}|{K}|"
    if not isinstance(arrays, dict):
        with np.load(arrays) as z:
            arrays = {key: z[key] for key in z.files if key.startswith(prefix)}
    if prefix + "E" not in arrays:
        return None
    lay = get_structure(name).layout(tuple(shape), K)
    values = {
        tuple(int(t) for t in key[len(prefix) :].split("|")): np.asarray(arrays[key])
        for key in arrays
        if key.startswith(prefix) and not key.endswith("|E")
    }
    return BlockSpectra(lay, values, np.asarray(arrays[prefix + "E"]))


def _curve(arrays, names, ks, shape):
    """Error of each layout structure (best grid size, optimal ranks) at the curve's budget ranks."""
    m, n = shape
    curve = {}
    for name, K in _partitions(names, shape, ks):
        sp = _load_spectra(arrays, name, K, shape)
        for r in CURVE_RANKS:
            if r * (m + n) < m * n and r * (m + n) >= int(sp.layout.block_costs[sp.layout.active].min()):
                err = float(sp.error(sp.allocate(r * (m + n))[0]))
                prev = curve.setdefault(name, {}).get(r)
                curve[name][r] = err if prev is None else min(prev, err)
    return {name: sorted(pts.items()) for name, pts in curve.items()}


def _save_npz(path, arrays):
    """Write ``arrays`` to ``path`` atomically (a reader sees the whole file or none)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _study_layer(task, *, base, finetuned, settings, progress=False, live=False):
    """Study one layer in a worker: read it from the files, fit, return its JSON record."""
    from ..sweep import jsonable

    name, module, stored_shape = task["pair"]
    pair = LayerPair(name, module, tuple(stored_shape))
    if settings.get("adapter"):  # a PEFT adapter directory in place of a fine-tuned checkpoint
        from ..peft import adapter_deltas

        ((_, delta),) = list(adapter_deltas(base, finetuned, names=[pair.name]))
    else:
        with open_checkpoint(base) as b, open_checkpoint(finetuned) if finetuned else nullcontext() as f:
            ((_, delta),) = list(iter_deltas(b, f, [pair]))  # arrays stay valid after close
    names, ks = settings["structures"], settings["n_blocks"]
    shape = delta.shape
    arrays = _spectra_arrays(delta, names, ks)
    whole = [k for k in arrays if k.endswith("|1|0|0")]  # a one-block partition holds the spectrum
    erank = effective_rank(arrays[whole[0]] if whole else np.linalg.svd(delta, compute_uv=False))
    _save_npz(task["spectra"], arrays)
    rec = {
        "layer": module,
        "module_type": module.split(".")[-1],
        "shape": list(shape),
        "effective_rank": erank,
        "budget": task["budget"],
        "curve": _curve(arrays, names, ks, shape),
        "rows": [],
        "skipped": None,
        "missing": [],
    }
    layer_ks = [K for K in ks if K <= min(shape)] or [1]
    try:  # only a budget that no configuration of this layer spends skips it; other errors stop the study
        match_budget(shape, task["budget"], methods=names, n_blocks=layer_ks)
    except ValueError as exc:
        rec["skipped"] = str(exc).splitlines()[0]
        rec["summary"] = "skipped: " + rec["skipped"]
        return jsonable(rec)
    known = [_load_spectra(arrays, name, K, shape) for name, K in _partitions(names, shape, ks)]
    found = compare_at_budget(
        delta,
        task["budget"],
        methods=names,
        n_blocks=layer_ks,
        svd_solver=settings["svd_solver"],
        fit_options=settings["fit_options"],
        spectra=[sp for sp in known if sp is not None],
    )  # computed once per layer
    rec["rows"] = [_row(r, rec) for r in found]
    rec["missing"] = [name for name in names if name not in {r["structure"] for r in rec["rows"]}]
    best = min(rec["rows"], key=lambda r: r["error"])
    rec["summary"] = f"best {best['structure']} {best['config']}: error {best['error']:.4f}"
    return jsonable(rec)


def _row(r, layer):
    m, n = layer["shape"]
    return {
        "layer": layer["layer"],
        "module_type": layer["module_type"],
        "shape": f"{m}x{n}",
        "structure": r["method"],
        "config": _config(r),
        "allocation": r["allocation"],
        "n_blocks": r["n_blocks"],
        "rank": r["rank"],
        "block_ranks": ";".join(" ".join(str(int(v)) for v in row) for row in np.atleast_2d(r["block_ranks"])),
        "n_params": r["n_params"],
        "budget": r["budget"],
        "budget_rank": r["budget"] / (m + n),
        "exact": r["exact"],
        "error": r["error"],
        "energy": 1.0 - r["error"] ** 2,
        "effective_rank": layer["effective_rank"],
    }


def _mark_best(rows):
    """``best``: the lowest-error row of each (layer, structure)."""
    best = {}
    for t, r in enumerate(rows):
        key = (r["layer"], r["structure"])
        if key not in best or r["error"] < rows[best[key]]["error"]:
            best[key] = t
    chosen = set(best.values())
    for t, r in enumerate(rows):
        r["best"] = t in chosen
    return rows


# ---------------------------------------------------------------------------- model-wide
def allocate_model_wide(spectra, total_budget):
    """Per-block ranks of every layer under one total budget (gain-per-parameter water-filling).

    Parameters
    ----------
    spectra : list of BlockSpectra
        One per layer (single matrices), each of the same structure and grid size.
    total_budget : int
        Parameters to spend over all the layers.

    Returns
    -------
    ranks : list of ndarray of int
        Per-block ranks of each layer, ``(K_rows, K_cols)``.
    exact : bool
        Whether the allocation is provably optimal (equal block costs, or the
        exact dynamic programme): see :func:`~blocklowrank._allocation.allocate_ranks`.
    gap : float
        How much more energy than this allocation the optimum can keep at
        most (the fractional relaxation's optimum minus the energy kept here;
        0 up to rounding when ``exact``): the optimal discarded energy lies
        between ``discarded - gap`` and ``discarded``.

    Examples
    --------
    >>> import numpy as np
    >>> from blocklowrank.layout import BlockLayout
    >>> from blocklowrank._engine import block_spectra
    >>> rng = np.random.default_rng(0)
    >>> sps = [block_spectra(rng.standard_normal((8, 8)) * s, BlockLayout.global_((8, 8))) for s in (1, 3)]
    >>> ranks, exact, _ = allocate_model_wide(sps, 4 * 16)
    >>> [int(r.sum()) for r in ranks], exact   # the larger layer gets more of the budget
    ([0, 4], True)
    """
    gains, costs, maxr, owner = [], [], [], []
    for t, sp in enumerate(spectra):
        lay = sp.layout
        for (i, j), v in sp.values.items():
            gains.append(np.asarray(v, dtype=np.float64).reshape(1, -1) ** 2)
            costs.append(int(lay.block_costs[i, j]))
            maxr.append(int(lay.max_ranks[i, j]))
            owner.append((t, i, j))
    alloc, exact = allocate_ranks(gains, costs, maxr, budget=int(total_budget))
    ranks = [np.zeros(sp.layout.n_blocks, dtype=np.int64) for sp in spectra]
    for t, (layer, i, j) in enumerate(owner):
        ranks[layer][i, j] = alloc[0, t]
    kept = sum(float(g[0, :r].sum()) for g, r in zip(gains, alloc[0]))
    return ranks, bool(exact), max(_fractional_bound(gains, costs, maxr, int(total_budget)) - kept, 0.0)


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


def _model_wide(layers, files, names, ks, total, uniform_budgets):
    """Model-wide vs uniform records for every layout partition present in every layer."""
    out, per_layer, notes = [], [], []
    for name, K in dict.fromkeys(p for lay in layers for p in _partitions(names, lay["shape"], ks)):
        spectra = [_load_spectra(file, name, K, lay["shape"]) for lay, file in zip(layers, files)]
        if any(sp is None for sp in spectra):
            notes.append(f"{name} K={K}: not every layer has {K} blocks per side; no model-wide row")
            continue
        energy = sum(float(sp.total_energy) for sp in spectra)
        unif = [
            sp.allocate(b)[0] if b >= 1 else np.zeros(sp.layout.n_blocks, int)
            for sp, b in zip(spectra, uniform_budgets)
        ]
        ranks, exact, gap = allocate_model_wide(spectra, total)
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


# ---------------------------------------------------------------------------- entry
def _check_budgets(budget_rank, budget_fraction, total_budget):
    if budget_fraction is not None and total_budget is not None:
        raise ValueError("give at most one of budget_fraction and total_budget")
    if budget_fraction is not None:
        if isinstance(budget_fraction, bool) or not (0 < float(budget_fraction) < 1):
            raise ValueError(f"budget_fraction must be a number in (0, 1), got {budget_fraction!r}")
        return "fraction", float(budget_fraction)
    value, what = (total_budget, "total_budget") if total_budget is not None else (budget_rank, "budget_rank")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be an int >= 1, got {value!r}")
    return what, int(value)


def _settings_file(out, settings):
    """Record the settings in ``out/study.json``; refuse a folder whose finished layers used others."""
    path = Path(out) / "study.json"
    log = Path(out) / "study.jsonl"
    if path.exists() and log.exists() and log.stat().st_size:  # a study with finished layers
        old = json.loads(path.read_text())
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(
                f"{out} holds a study with other settings ({', '.join(diff)}); use another --out or remove that folder"
            )
    else:  # a new study, or one stopped before its first layer
        path.write_text(json.dumps(settings, indent=1, sort_keys=True))


def run_study(
    base,
    finetuned=None,
    *,
    out=None,
    structures=None,
    budget_rank=16,
    budget_fraction=None,
    total_budget=None,
    target_modules=ALL_LINEAR,
    n_blocks=None,
    n_jobs=None,
    progress=True,
    svd_solver="auto",
    fit_options=None,
):
    """Approximate every layer of a checkpoint by every registered structure at matched budgets.

    Parameters
    ----------
    base : str or path-like
        A safetensors file, a sharded checkpoint's folder or index file.
    finetuned : str or path-like, optional
        The fine-tuned checkpoint: layers are ``ΔW = W_finetuned - W_base``.
        Or a PEFT adapter directory (LoRA or GraLoRA, holding
        ``adapter_config.json``): layers are the adapter's own ΔW, on the
        base's selected layers that the adapter holds. Without it, the weights
        ``W`` of ``base`` themselves (compression).
    out : str or path-like, optional
        Folder for ``layers.csv``, ``model_wide.csv``, ``summary.md``,
        ``error_heatmap.png``, ``error_vs_budget.png``, and the resumable log
        ``study.jsonl`` (with ``study.json``, the settings, and ``spectra/``).
        Without it nothing is written and nothing can be resumed.
    structures : sequence of str, optional
        Registered structures to study; default every registered one.
    budget_rank : int, default=16
        Per-layer budget as a LoRA-equivalent rank: ``budget_rank (m + n)``.
    budget_fraction : float in (0, 1), optional
        Per-layer budget as a fraction of the layer's size, ``floor(f m n)``
        (replaces ``budget_rank``).
    total_budget : int, optional
        One model-wide total (replaces ``budget_rank``): each layer's own
        budget is its share at one common LoRA-equivalent rank
        ``t = total_budget / sum (m + n)``, ``floor(t (m + n))``, and the
        model-wide allocation spends the whole total.
    target_modules : "all-linear", str or list of str, default="all-linear"
        Which layers (see :func:`~blocklowrank.checkpoints.select_names`).
    n_blocks : sequence of int, optional
        Grid sizes K; default :data:`DEFAULT_N_BLOCKS` (those at most a
        layer's smaller side are used on that layer).
    n_jobs : int, optional
        Layers in parallel through :class:`joblib.Parallel` (backend from
        ``joblib.parallel_config``; see the module notes).
    progress : bool, default=True
        A ``tqdm.auto`` bar over the layers and a line per finished layer.
    svd_solver : {"auto", "full", "randomized"}, default="auto"
        Passed to :func:`~blocklowrank.compare.compare_at_budget`. The
        model-wide allocation and the curves use exact singular values.
    fit_options : dict, optional
        ``max_iter``/``tol`` of the iterative structures. They dominate the
        time: every configuration that spends the budget (for a structure
        with a global term, every split of it) is one fit of up to
        ``max_iter`` alternations, each with SVDs of the whole layer, where a
        layout structure needs one spectrum per grid size. On large models
        lower ``max_iter`` or leave them out of ``structures``.

    Returns
    -------
    records : RecordList
        One row per layer and configuration (:data:`STUDY_COLUMNS`: ``layer``,
        ``module_type``, ``shape``, ``structure``, ``config``, ``allocation``,
        ``n_params``, ``budget``, ``error`` (relative Frobenius), ``energy``
        (captured, ``1 - error^2``), ``best`` (lowest error of its layer and
        structure), ``effective_rank``, ...). Attributes: ``model_wide``
        (:data:`MODEL_WIDE_COLUMNS`, model-wide against uniform per layout
        structure and grid size), ``model_wide_layers`` (where the model-wide
        allocation puts the parameters), ``layers`` (per-layer records with
        ``skipped`` reasons, ``missing`` structures and error curves),
        ``pairing`` (:class:`~blocklowrank.checkpoints.PairingReport`),
        ``notes`` and ``settings``.

    Raises
    ------
    ValueError
        Invalid settings, no layer selected, or ``out`` holding a study with
        other settings. A layer whose budget no configuration fits is not an
        error: it is skipped and listed (``layers[i]["skipped"]``).
    FileNotFoundError, CheckpointError
        Missing or unreadable checkpoint files.

    See Also
    --------
    blocklowrank.compare.compare_at_budget : the per-layer comparison.
    allocate_model_wide : one budget over the blocks of every layer.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import numpy as np
    >>> from blocklowrank.checkpoints import save_file
    >>> rng = np.random.default_rng(0)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> W = {f"layers.{i}.q_proj.weight": rng.standard_normal((16, 16)) for i in range(2)}
    >>> dW = {k: w + np.outer(rng.standard_normal(16), rng.standard_normal(16)) for k, w in W.items()}
    >>> base = save_file(pathlib.Path(tmp.name) / "base.safetensors", W)
    >>> tuned = save_file(pathlib.Path(tmp.name) / "tuned.safetensors", dW, dtypes="BF16")
    >>> res = run_study(base, tuned, structures=["global", "block"], budget_rank=2, n_blocks=[2],
    ...                 progress=False)
    >>> for r in res:
    ...     if r["best"]:
    ...         print(r["layer"], r["structure"], r["config"], r["n_params"], f"{r['error']:.3f}")
    layers.0.q_proj global K=1 r=2 64 0.002
    layers.0.q_proj block K=2 r=1 64 0.002
    layers.1.q_proj global K=1 r=2 64 0.002
    layers.1.q_proj block K=2 r=1 64 0.002
    >>> [(r["structure"], r["allocation"], r["n_params"]) for r in res.model_wide[:2]]
    [('global', 'model-wide', 128), ('global', 'uniform', 128)]
    >>> tmp.cleanup()
    """
    from ..sweep import RunLog, run_sweep

    mode, value = _check_budgets(budget_rank, budget_fraction, total_budget)
    names = structure_names() if structures is None else check_methods(structures)
    ks = sorted(set(DEFAULT_N_BLOCKS if n_blocks is None else (int(k) for k in np.atleast_1d(n_blocks))))
    if not ks or min(ks) < 1:
        raise ValueError(f"n_blocks must hold ints >= 1, got {n_blocks!r}")
    adapter = finetuned is not None and (Path(finetuned) / "adapter_config.json").is_file()
    with (
        open_checkpoint(base) as b,
        open_checkpoint(finetuned) if finetuned is not None and not adapter else nullcontext() as f,
    ):
        pairing = pair_layers(b, f, target_modules)
        paths = str(b.path), (str(f.path) if f is not None else None)
    if adapter:  # the adapter's layers, in the base's names (lazy import: peft imports the checkpoints package)
        from ..peft import adapter_pairs

        held = {p.name for p in adapter_pairs(base, finetuned)}
        pairing.pairs[:] = [p for p in pairing.pairs if p.name in held]
        paths = paths[0], str(Path(finetuned).resolve())
    if not pairing.pairs:
        raise ValueError(
            f"no layer selected by target_modules={target_modules!r}: "
            + "; ".join(line.strip() for line in pairing.summary().splitlines())
        )
    sides = sum(p.shape[0] + p.shape[1] for p in pairing.pairs)
    if mode == "total_budget" and value < sides:
        raise ValueError(f"total_budget={value} is below LoRA-equivalent rank 1 on every layer ({sides} parameters)")
    if mode == "total_budget":  # a common (fractional) LoRA-equivalent rank value / sides, rounded down per layer
        budgets = [value * (p.shape[0] + p.shape[1]) // sides for p in pairing.pairs]
    else:
        budgets = [_budget(p.shape, value, value if mode == "fraction" else None) for p in pairing.pairs]
    total = value if mode == "total_budget" else sum(budgets)
    settings = {
        "base": paths[0],
        "finetuned": paths[1],
        "structures": list(names),
        "n_blocks": ks,
        "budget": [mode, value],
        "target_modules": target_modules,
        "svd_solver": svd_solver,
        "fit_options": fit_options or {},
        "adapter": adapter,
    }
    tmp = tempfile.TemporaryDirectory() if out is None else None
    folder = Path(tmp.name if tmp else out)
    try:
        (folder / "spectra").mkdir(parents=True, exist_ok=True)
        _settings_file(folder, settings)
        tasks = [
            {"id": p.name, "pair": list(p), "budget": bud, "spectra": str(folder / "spectra" / f"{_safe(p.name)}.npz")}
            for p, bud in zip(pairing.pairs, budgets)
        ]
        fn = functools.partial(_study_layer, base=paths[0], finetuned=paths[1], settings=settings)
        done = run_sweep(
            tasks,
            fn,
            RunLog(folder / "study.jsonl"),
            n_jobs=1 if n_jobs is None else n_jobs,
            progress=progress,
            name="study",
            label=lambda t: t["pair"][1],
        )
        layers = [done[t["id"]] for t in tasks]
        files = [t["spectra"] for t in tasks]
        model_wide, model_layers, notes = _model_wide(layers, files, names, ks, total, budgets)
    finally:
        if tmp:
            tmp.cleanup()
    records = RecordList(_mark_best([row for lay in layers for row in lay["rows"]]), columns=STUDY_COLUMNS)
    records.model_wide, records.model_wide_layers, records.layers = model_wide, model_layers, layers
    records.pairing, records.notes, records.settings = pairing, notes, settings
    if out is not None:
        from .plots import write_study

        write_study(records, out)
    return records


def _safe(name):
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    return re.sub(r"[^\w.-]", "_", name)[:100] + "-" + digest

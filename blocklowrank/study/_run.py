"""The study's entry point, :func:`run_study`, and the work on one layer (see :mod:`blocklowrank.study`)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from .._extras import require
from .._io import atomic_write_text, open_regular, read_json, sha256_file
from .._validation import OptionError
from ..budget import RecordList, check_methods, match_budget
from ..checkpoints import ALL_LINEAR, LayerPair, iter_deltas, open_checkpoint, pair_layers, resolve_model
from ..checkpoints._names import no_layer_selected
from ..compare import compare_at_budget
from ..peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_deltas, adapter_pairs
from ..structures import get_structure
from ..sweep import RunLog, canonical, jsonable, run_sweep
from ._calibrated import check_calibration, layer_metric, release_metrics
from ._model_wide import _model_wide
from ._plan import apply_roles, cost_summary, default_structures, estimate_cost
from ._report import write_study
from ._spectra import _curve, _load_spectra, _partitions, _save_npz, _spectra_arrays, effective_rank

#: Grid sizes K tried by default (those at most a layer's smaller side).
DEFAULT_N_BLOCKS = (2, 4, 8)
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
    "output_error",
    "energy",
    "best",
    "effective_rank",
)


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


def _read_layer(pair, base, finetuned, settings):
    """ΔW of one layer as (out, in), and the SHA-256 of the stored bytes it was computed from."""
    if settings["adapter"]:  # a PEFT adapter directory in place of a fine-tuned checkpoint
        ((_, delta),) = list(
            adapter_deltas(base, finetuned, names=[pair.name], stored=False, orientation=settings["orientation"])
        )
        return delta, {}  # the adapter's files are hashed whole in the settings
    digests = {}
    with open_checkpoint(base) as b, open_checkpoint(finetuned) if finetuned else nullcontext() as f:
        ((_, delta),) = list(iter_deltas(b, f, [pair], digests=digests))  # arrays stay valid after close
    return delta, dict(digests)


def _study_layer(task, *, base, finetuned, settings, progress=False, live=False):
    """Study one layer in a worker: read it from the files, fit, return its JSON record."""
    name, module, shape, kind = task["pair"]
    pair = LayerPair(name, module, tuple(shape), kind)
    delta, digests = _read_layer(pair, base, finetuned, settings)
    names, ks = settings["structures"], settings["n_blocks"]
    shape = delta.shape
    metric = layer_metric(settings, task["study"], module)  # {} without calibration
    arrays = _spectra_arrays(delta, names, ks, metric)
    whole = [k for k in arrays if k.endswith("|1|0|0") and not metric]  # a one-block partition holds the spectrum
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
        "inputs_sha256": digests,
        "spectra_sha256": sha256_file(task["spectra"]),
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
        spectra=None if metric else [sp for sp in known if sp is not None],
        **metric,
    )  # computed once per layer
    rec["rows"] = [_row(r, rec, bool(metric)) for r in found]
    rec["missing"] = [name for name in names if name not in {r["structure"] for r in rec["rows"]}]
    best = min(rec["rows"], key=_ranking)
    rec["summary"] = f"best {best['structure']} {best['config']}: error {best['error']:.4f}" + (
        f", output error {best['output_error']:.4f}" if metric else ""
    )
    return jsonable(rec)


def _ranking(row):
    """What the best row has least: the output error in a data metric (what its fits aim at), else the error."""
    return row["error"] if row.get("output_error") is None else row["output_error"]


def _row(r, layer, calibrated=False):
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
        "output_error": r["output_error"] if calibrated else None,
        "energy": 1.0 - r["error"] ** 2,
        "effective_rank": layer["effective_rank"],
    }


def _mark_best(rows):
    """``best``: the lowest-error row of each (layer, structure) (lowest output error in a data metric)."""
    best = {}
    for t, r in enumerate(rows):
        key = (r["layer"], r["structure"])
        if key not in best or _ranking(r) < _ranking(rows[best[key]]):
            best[key] = t
    chosen = set(best.values())
    for t, r in enumerate(rows):
        r["best"] = t in chosen
    return rows


def _check_budgets(budget_rank, budget_fraction, total_budget):
    if budget_fraction is not None and total_budget is not None:
        raise OptionError("give at most one of «budget_fraction» and «total_budget»")
    if budget_fraction is not None:
        if isinstance(budget_fraction, bool) or not (0 < float(budget_fraction) < 1):
            raise OptionError(f"«budget_fraction» must be a number in (0, 1), got {budget_fraction!r}")
        return "fraction", float(budget_fraction)
    value, what = (total_budget, "total_budget") if total_budget is not None else (budget_rank, "budget_rank")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise OptionError(f"«{what}» must be an int >= 1, got {value!r}")
    return what, int(value)


#: What a record of ``_study_layer`` holds (key -> JSON types), checked before a logged one is used.
_RECORD = {
    "layer": (str,),
    "module_type": (str,),
    "shape": (list,),
    "effective_rank": (int, float),
    "budget": (int,),
    "curve": (dict,),
    "rows": (list,),
    "skipped": (str, type(None)),
    "missing": (list,),
    "summary": (str,),
    "spectra_sha256": (str,),
}


def _check_record(rec, task):
    """Why a logged layer record cannot be used (None if it can): its keys, and its spectra file's SHA-256."""
    if rec.get("status") != "ok":
        return f"its status is {rec.get('status')!r}"
    for key, types in _RECORD.items():
        if not isinstance(rec.get(key), types) or isinstance(rec.get(key), bool):
            return f"its {key!r} is missing or not a {types[0].__name__}"
    if not all(isinstance(row, dict) for row in rec["rows"]):
        return "its rows are not records"
    try:
        with open_regular(task["spectra"]) as f:
            digest = sha256_file(f)
    except OSError as exc:
        return f"its spectra file {task['spectra']} cannot be read ({exc.strerror or exc})"
    if digest != rec["spectra_sha256"]:
        return f"its spectra file {task['spectra']} changed since it was written"
    return None


def _read_settings(path):
    try:
        old = read_json(path)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{path} cannot be read ({exc}); it records what the study in {path.parent} was run on: "
            "remove that folder or use another --out"
        ) from None
    if not isinstance(old, dict):
        raise ValueError(f"{path} does not hold the settings of a study; remove that folder or use another --out")
    return old


def _settings_file(out, settings):
    """Record the settings in ``out/study.json``; refuse a folder whose finished layers used others."""
    path = Path(out) / "study.json"
    log = Path(out) / "study.jsonl"
    logged = log.exists() and log.stat().st_size > 0
    if path.exists() and logged:  # a study with finished layers
        old = _read_settings(path)
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff == ["inputs"]:
            changed = [f["path"] for f in settings["inputs"] if f not in old.get("inputs", [])]
            raise ValueError(
                f"{out} holds a study of other inputs: {', '.join(changed) or 'the files'} changed since it ran "
                "(size, modification time, header or content); use another --out or remove that folder"
            )
        if diff:
            raise ValueError(
                f"{out} holds a study with other settings ({', '.join(diff)}); use another --out or remove that folder"
            )
    elif logged:
        raise ValueError(
            f"{log} holds finished layers but {path} (what they were computed from) is missing; "
            "use another --out or remove that folder"
        )
    else:  # a new study, or one stopped before its first layer
        atomic_write_text(path, json.dumps(settings, indent=1, sort_keys=True))


def _file_identity(path):
    """Path, size, modification time, identity and SHA-256 of a (small) regular file."""
    with open_regular(path) as f:
        st = os.fstat(f.fileno())
        digest = sha256_file(f)
    out = {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {**out, "device": st.st_dev, "inode": st.st_ino, "sha256": digest}


def _inputs(b, f, adapter_dir):
    """Fingerprints of every file the study reads: each data file's identity and header hash (checkpoints; see
    :meth:`~blocklowrank.checkpoints.Checkpoint.fingerprint`), the adapter's two files hashed whole, and the
    ``config.json`` files that decide the layers' kinds."""
    found = b.fingerprint() + (f.fingerprint() if f is not None else [])
    if adapter_dir is not None:
        found += [_file_identity(Path(adapter_dir) / n) for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)]
    for ckpt in (b, f):
        config = None if ckpt is None else ckpt.path.parent / "config.json"
        if config is not None and config.is_file():
            found.append(_file_identity(config))
    return found


def run_study(
    base, finetuned=None, *, out=None, structures=None, n_blocks=None, fit_options=None,
    budget_rank=16, budget_fraction=None, total_budget=None, target_modules=ALL_LINEAR, orientation=None,
    calibration=None, gram_damping=None, svd_solver="auto", n_jobs=None, progress=True,
):  # fmt: skip
    """Approximate every layer of a checkpoint by every registered structure at matched budgets.

    Parameters
    ----------
    base : str or path-like
        A safetensors file, a sharded checkpoint's folder or index file, a
        Hugging Face cache folder or a model id
        (:func:`~blocklowrank.checkpoints.resolve_model`).
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
        Without it nothing is written and nothing can be resumed. The
        figures need matplotlib (the ``plots`` extra): without it, a study
        with ``out`` is refused before it starts, in one line. A study run
        again with the same ``out`` resumes only if it reads the same
        inputs with the same settings: ``study.json`` records both (every
        file's size, modification time, identity and header hash; an
        adapter's files and the models' ``config.json`` hashed whole), and a
        logged layer is used only if its record is whole, was made for this
        study and its spectra file still has the SHA-256 it was written with
        (else that layer is computed again, with a warning). Each layer's
        record holds the SHA-256 of the stored bytes it was computed from
        (``inputs_sha256``).
    structures : sequence of str, optional
        Registered structures to study; default the layout structures
        (global, diagonal, block: seconds per layer). The iterative ones
        (hybrid, shared_basis: minutes per large layer) run only when named;
        with ``progress`` their cost is measured and printed before they start.
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
    target_modules : "all-linear", str or collection of str, default="all-linear"
        Which layers (see :func:`~blocklowrank.checkpoints.select_names`); a
        set or a tuple of names is recorded as a sorted list.
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
        lower ``max_iter`` or leave them out of ``structures``. Values must be
        what JSON can record (NumPy scalars are converted).
    orientation : {"out_in", "in_out"}, optional
        How the checkpoints store their layers' weights where their
        ``config.json`` does not say (see
        :func:`~blocklowrank.checkpoints.pair_layers`; for an adapter, its
        ``fan_in_fan_out`` decides then). ΔW is studied as ``(out, in)``.
    calibration : str or path-like, optional
        Calibration statistics of the base model (``blocklowrank calibrate``;
        or :class:`~blocklowrank.calibration.CalibrationStats` read from a
        file): every configuration is fitted in each layer's data metric
        (``G`` of its input site, ``H`` where the file has it; see
        :func:`~blocklowrank.compare.compare_at_budget`), rows carry
        ``output_error`` beside ``error``, ``best`` is the lowest output
        error, the curves are of the output error, and the model-wide
        allocation minimises the sum of the layers' relative squared output
        errors. Checked against the layers before anything is written;
        ``study.json`` records the file (its SHA-256 among the inputs) and
        ``gram_damping``, so a resume with other statistics is refused.
    gram_damping : float >= 0, optional
        The metric's damping (default :data:`~blocklowrank.GRAM_DAMPING`);
        only with ``calibration``.

    Returns
    -------
    records : RecordList
        One row per layer and configuration (:data:`STUDY_COLUMNS`: ``layer``,
        ``module_type``, ``shape``, ``structure``, ``config``, ``allocation``,
        ``n_params``, ``budget``, ``error`` (relative Frobenius),
        ``output_error`` (with ``calibration``: relative output error; None
        without), ``energy`` (captured, ``1 - error^2``), ``best`` (lowest
        error of its layer and structure; lowest output error with
        ``calibration``), ``effective_rank`` (of ΔW), ...). Attributes: ``model_wide``
        (:data:`MODEL_WIDE_COLUMNS`, model-wide against uniform per layout
        structure and grid size), ``model_wide_layers`` (where the model-wide
        allocation puts the parameters), ``layers`` (per-layer records with
        ``skipped`` reasons, ``missing`` structures and error curves),
        ``pairing`` (:class:`~blocklowrank.checkpoints.PairingReport`),
        ``notes`` and ``settings``.

    Raises
    ------
    ValueError
        Invalid settings (named), no layer selected, or ``out`` holding a
        study with other settings or of other inputs, a log without its
        ``study.json`` or a ``study.json`` that cannot be read. A layer whose
        budget no configuration fits is not an error: it is skipped and
        listed (``layers[i]["skipped"]``).
    FileNotFoundError, CheckpointError
        Missing or unreadable checkpoint files; a layer that is not
        floating-point or holds NaN/inf (naming the file and tensor).

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
    mode, value = _check_budgets(budget_rank, budget_fraction, total_budget)
    if out is not None:
        require("matplotlib")  # the figures of ``out``: refuse before the work, not after it
    names = default_structures() if structures is None else check_methods(structures)
    ks = sorted(set(DEFAULT_N_BLOCKS if n_blocks is None else (int(k) for k in np.atleast_1d(n_blocks))))
    if not ks or min(ks) < 1:
        raise OptionError(f"«n_blocks» must hold ints >= 1, got {n_blocks!r}")
    target_modules = _as_list(target_modules)
    base = resolve_model(base, role="base")
    finetuned = None if finetuned is None else resolve_model(finetuned, role="fine-tuned")
    pairing, paths, adapter, inputs = _layers_to_study(base, finetuned, target_modules, orientation)
    budgets, total = _budgets(pairing.pairs, mode, value)
    calibrated, stats_file = check_calibration(calibration, gram_damping, pairing.pairs)  # before any file is made
    if stats_file is not None:
        inputs = inputs + [_file_identity(stats_file)]
    settings = {
        "base": paths[0],
        "finetuned": paths[1],
        "structures": list(names),
        "n_blocks": ks,
        "budget": [mode, value],
        "target_modules": target_modules,
        "svd_solver": svd_solver,
        "fit_options": _recorded("fit_options", fit_options or {}),
        "adapter": adapter,
        "orientation": orientation,
        "inputs": inputs,
        **calibrated,  # only with calibration: a plain study's study.json is as before
    }
    settings = _recorded("settings", settings)
    study = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    tmp = tempfile.TemporaryDirectory() if out is None else None
    folder = Path(tmp.name if tmp else out)
    try:
        (folder / "spectra").mkdir(parents=True, exist_ok=True)
        _settings_file(folder, settings)
        tasks = [
            {"id": p.name, "pair": list(p), "budget": bud, "spectra": str(folder / "spectra" / f"{_safe(p.name)}.npz"),
             "study": study}
            for p, bud in zip(pairing.pairs, budgets)
        ]  # fmt: skip
        fn = functools.partial(_study_layer, base=paths[0], finetuned=paths[1], settings=settings)
        if progress and any(not get_structure(n).spectral for n in names):  # minutes per large layer: say so first
            sample = lambda pair: _read_layer(pair, paths[0], paths[1], settings)[0]  # noqa: E731
            metric = lambda pair: layer_metric(settings, study, pair.module)  # noqa: E731  (factors kept for the fits)
            costs = estimate_cost(pairing.pairs, budgets, names, ks, fit_options, sample=sample, metric=metric)
            for line in cost_summary(costs):
                print(line, file=sys.stderr, flush=True)
        done = run_sweep(
            tasks,
            fn,
            RunLog(folder / "study.jsonl"),
            n_jobs=1 if n_jobs is None else n_jobs,
            progress=progress,
            name="study",
            label=lambda t: t["pair"][1],
            check=_check_record,
        )
        layers = apply_roles([done[t["id"]] for t in tasks])
        files = [t["spectra"] for t in tasks]
        model_wide, model_layers, notes = _model_wide(layers, files, names, ks, total, budgets, bool(calibrated))
    finally:
        release_metrics()  # the statistics file this process opened for the layers it ran (workers keep theirs)
        if tmp:
            tmp.cleanup()
    records = RecordList(_mark_best([row for lay in layers for row in lay["rows"]]), columns=STUDY_COLUMNS)
    records.model_wide, records.model_wide_layers, records.layers = model_wide, model_layers, layers
    records.pairing, records.notes, records.settings = pairing, notes, settings
    if out is not None:
        write_study(records, out)
    return records


def _as_list(target_modules):
    """A collection of module names as a sorted list (a set or a tuple names the same layers), else as given."""
    if isinstance(target_modules, (str, Mapping)) or not isinstance(target_modules, Iterable):
        return target_modules  # a regular expression, "all-linear", or refused by pair_layers
    items = list(target_modules)
    return sorted(set(items)) if all(isinstance(t, str) and t for t in items) else items


def _recorded(name, value):
    """``value`` as ``study.json`` records it (:func:`~blocklowrank.sweep.canonical`), or ValueError naming it."""
    try:
        return canonical(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must hold what JSON can record (numbers, strings, lists, dicts): {exc}") from None


def _layers_to_study(base, finetuned, target_modules, orientation):
    """``(pairing, paths, adapter, inputs)``: the layers, the files by path, whether ``finetuned`` is a PEFT
    adapter directory, and the fingerprints of everything read."""
    adapter = finetuned is not None and (Path(finetuned) / ADAPTER_CONFIG).is_file()
    fallback = None
    if adapter:  # the adapter's own fan_in_fan_out, where the base's config.json does not decide
        flag = _read_settings(Path(finetuned) / ADAPTER_CONFIG).get("fan_in_fan_out")
        fallback = "in_out" if flag is True else "out_in"
    with (
        open_checkpoint(base) as b,
        open_checkpoint(finetuned) if finetuned is not None and not adapter else nullcontext() as f,
    ):
        pairing = pair_layers(b, f, target_modules, orientation=orientation, fallback=fallback)
        paths = str(b.path), (str(f.path) if f is not None else None)
        inputs = _inputs(b, f, finetuned if adapter else None)
    if adapter:  # the adapter's layers, in the base's names
        held = {p.name: p for p in adapter_pairs(base, finetuned, orientation=orientation)}
        pairing.pairs[:] = [held[p.name] for p in pairing.pairs if p.name in held]
        paths = paths[0], str(Path(finetuned).resolve())
    if not pairing.pairs:
        modules = [n.rsplit(".", 1)[0] for n in pairing.excluded if n.endswith(".weight")]
        raise no_layer_selected(modules, target_modules).with_context("no layer selected: ")
    return pairing, paths, adapter, inputs


def _budgets(pairs, mode, value):
    """Each layer's budget and the total the model-wide allocation spends."""
    sides = sum(p.shape[0] + p.shape[1] for p in pairs)
    if mode == "total_budget" and value < sides:
        raise OptionError(f"«total_budget={value}» is below LoRA-equivalent rank 1 on every layer ({sides} parameters)")
    if mode == "total_budget":  # a common (fractional) LoRA-equivalent rank value / sides, rounded down per layer
        budgets = [value * (p.shape[0] + p.shape[1]) // sides for p in pairs]
    else:
        budgets = [_budget(p.shape, value, value if mode == "fraction" else None) for p in pairs]
    return budgets, (value if mode == "total_budget" else sum(budgets))


def _safe(name):
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    return re.sub(r"[^\w.-]", "_", name)[:100] + "-" + digest

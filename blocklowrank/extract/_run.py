"""The extraction itself, :func:`extract_adapter`, and its report (see :mod:`blocklowrank.extract`)."""

from __future__ import annotations

import contextlib
import json
import os
import time

import numpy as np

from .._engine import allocate_total_budget, block_spectra
from .._io import atomic_write_text, check_output_dir, sha256_file
from .._metric import GRAM_DAMPING, output_error
from .._validation import OptionError
from ..calibration._sites import SiteMetrics, check_damping
from ..checkpoints import ALL_LINEAR, Checkpoint, changed_tensors, iter_deltas
from ..checkpoints._dtypes import bf16_to_float32, float_to_bf16
from ..checkpoints._names import resolve_model
from ..convert import as_factors
from ..factors import StructuredFactors
from ..peft import ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_WEIGHTS, save_peft_adapter
from ..structures import approximate
from ..study import allocate_model_wide
from ..sweep import _bar
from ._plan import (
    _calibrated,
    _calibration_paths,
    _opened,
    _prepare,
    check_metric,
    check_output_grams,
    fit_sides,
    lost_changes,
)
from ._report import REPORT_FILE, ExtractReport

__all__ = ["extract_adapter"]


#: The report written beside the adapter's files.
# ---------------------------------------------------------------------------- fitting
def _model_wide_ranks(base, tuned, pairing, structure, n_blocks, total_budget, progress=False, metrics=None):
    """``({weight name: per-block ranks}, allocation)`` spreading ``total_budget`` over every block of every
    layer (a first pass over the layers, their spectra only). Plain: the least discarded energy
    (:func:`~blocklowrank.study.allocate_model_wide`). With ``metrics`` (a :class:`SiteMetrics`): the
    least sum of the layers' relative squared output errors, on their spectra in their metrics
    (:func:`~blocklowrank.allocate_total_budget`)."""
    names, spectra = [], []
    with _bar(progress, total=len(pairing.pairs), desc="spectra", unit="layer") as bar:
        for pair, delta in iter_deltas(base, tuned, pairing):
            names.append(pair.name)
            metric = {} if metrics is None else metrics(pair.module)
            spectra.append(block_spectra(delta, structure.layout(delta.shape, n_blocks), **metric))
            del delta, metric  # before the next layer is read: one layer in memory, not two
            bar.update()
    if metrics is None:
        ranks, exact, _ = allocate_model_wide(spectra, int(total_budget))
        rule = "the total squared Frobenius error sum_l ||ΔW_l - M_l||²"
    else:
        ranks, exact = allocate_total_budget(spectra, int(total_budget))
        rule = "the sum of the layers' relative squared output errors sum_l f_l(M_l) / f_l(0) (damped metric)"
    if not any(r.any() for r in ranks):
        cheapest = min(int(sp.layout.block_costs[sp.layout.active].min()) for sp in spectra)
        raise OptionError(
            f"«total_budget={total_budget}» is below the cheapest rank of any selected layer "
            f"({cheapest} parameters: one rank of its smallest block); raise it"
        )
    return dict(zip(names, ranks)), {"rule": rule, "exact": bool(exact)}


def _inputs(*sources):
    """The paths of the checkpoints (given, and every file they open) that ``out`` must never replace."""
    paths = []
    for source in sources:
        paths += [source.path, *source.files] if isinstance(source, Checkpoint) else [source]
    return paths


def _rounded(sf, store):
    """The factors as stored in ``store`` (16-bit types round them), as a container."""
    if store == "float16":
        r = lambda a: np.asarray(a, np.float16).astype(np.float32)  # noqa: E731
    else:
        r = lambda a: bf16_to_float32(float_to_bf16(np.asarray(a, np.float32)))  # noqa: E731
    gf = None if not sf.global_rank else tuple(r(x) for x in sf.global_factors)
    return StructuredFactors(sf.layout, {k: (r(B), r(A)) for k, (B, A) in sf.items()}, global_factors=gf)


def _fit_one(delta, prep, size, svd_solver, cap_rank, options, grams, sides):
    """One layer's fit and its record: in the Grams ``grams`` (the layer's ``input_gram`` and
    ``output_gram``, empty without calibration) that ``sides`` (:func:`fit_sides`) selects; with
    calibration, ``output_error`` in the file's whole metric whichever sides the fit used."""
    if cap_rank:  # the layout structures' option (the iterative fits have none)
        options = {**options, "cap_rank": True}
    metric = {k: grams[k] for k, on in zip(("input_gram", "output_gram"), sides) if on and grams.get(k) is not None}
    res = approximate(
        delta, method=prep.structure.name, n_blocks=prep.n_blocks, svd_solver=svd_solver, **size, **options, **metric
    )
    sf = as_factors(res)
    rec = {"shape": tuple(delta.shape), "n_params": int(res.n_params), "error": float(res.error)}
    whole = {k: v for k, v in grams.items() if v is not None}
    if not whole:
        rec["output_error"] = None
    elif metric.keys() == whole.keys():
        rec["output_error"] = float(res.output_error)
    else:  # fitted plain or on one side: measured in the file's metric all the same, from the factors
        lay = sf.layout  # (no dense M and no float64 W - M: the low-rank terms plus the total)
        approx = sf.to_dense() if sf.global_rank or lay.permuted else dict(sf.items())
        rec["output_error"] = output_error(delta, approx, whole["input_gram"], whole.get("output_gram"), layout=lay)
    if whole:
        rec["metric"] = {(): "plain", ("input_gram",): "input", ("output_gram",): "output"}.get(tuple(metric), "both")
    rec["ranks"] = res.ranks.tolist()
    if prep.store in ("bfloat16", "float16"):
        norm = np.linalg.norm(delta)
        stored = _rounded(sf, prep.store).to_dense()
        rec["error_stored"] = float(np.linalg.norm(delta - stored) / norm) if norm else 0.0
    return sf, rec


def _fit_layers(b, f, prep, alloc, svd_solver, cap_rank, options, progress, metrics=None, metric="auto"):
    fits, layers, unchanged = {}, {}, []
    with _bar(progress, total=len(prep.pairing.pairs), desc="extract", unit="layer") as bar:
        for pair, delta in iter_deltas(b, f, prep.pairing):
            bar.update()
            if not np.any(delta) or (alloc is not None and not alloc[pair.name].any()):
                unchanged.append(pair.module)  # ΔW = 0, or no rank from the model-wide budget
                if metrics is not None:
                    metrics.skip(pair.module)
                del delta
                continue
            if alloc is not None:
                size = {"rank": alloc[pair.name]}
            elif prep.mode == "budget_rank":
                size = {"budget": int(prep.size) * sum(pair.shape)}
            else:
                size = {prep.mode: prep.size}
            grams = {} if metrics is None else metrics(pair.module)
            sides = fit_sides(metric, prep.structure.name, prep.mode, grams.get("output_gram") is not None)
            fits[pair.module], layers[pair.module] = _fit_one(
                delta, prep, size, svd_solver, cap_rank, options, grams, sides
            )  # fmt: skip
            del delta, grams  # before the next layer is read: one layer in memory, not two
    return fits, layers, unchanged


def _calibration_record(stats, metrics, damping, layers):
    source = None if stats.source is None else str(stats.source)
    return {
        "file": source,
        "sha256": None if source is None else sha256_file(source),
        "gram_damping": GRAM_DAMPING if damping is None else damping,
        "sites_factored": metrics.factored,
        "output_grams": len(set(layers) & set(stats.output_layers)),
    }


def _write_report(report):
    """``extract_report.json`` beside the adapter's files (their sizes in it; its own added after)."""
    report.files = {n: os.path.getsize(os.path.join(report.directory, n)) for n in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)}
    path = os.path.join(report.directory, REPORT_FILE)
    atomic_write_text(path, json.dumps(report.to_json(), indent=1, sort_keys=True) + "\n")
    report.files[REPORT_FILE] = os.path.getsize(path)
    return report


def extract_adapter(
    base, finetuned, out, *, method="global", n_blocks=1, peft_type="auto", dtype=None, modules_to_save=None,
    rank=None, budget_rank=None, total_budget=None, max_error=None, cap_rank=False, target_modules=ALL_LINEAR,
    orientation=None, calibration=None, gram_damping=None, metric="auto", svd_solver="auto", overwrite=False,
    progress=False, **options,
):  # fmt: skip
    """Extract a PEFT adapter from a fine-tuned checkpoint: fit each ΔW with one structure.

    Parameters
    ----------
    base, finetuned : str, path or Checkpoint
        The base model and its fully fine-tuned version: safetensors
        checkpoints (a file, a sharded index or a model folder), Hugging Face
        cache folders or model ids (see
        :func:`~blocklowrank.checkpoints.resolve_model`); any dtype the
        reader takes (F32, BF16, F16, F64).
    out : str or path
        The adapter directory to write (``adapter_model.safetensors``,
        ``adapter_config.json``, then ``extract_report.json``); written
        atomically, only once every layer has been fitted.
    method : str, default="global"
        A registered structure with a PEFT form (``get_structure(method).peft``):
        "global" (LoRA), "diagonal" (MELoRA, written as LoRA), "block"
        (Localized LoRA, written as GraLoRA), "hybrid" (GraLoRA with
        ``hybrid_r``; pass ``global_rank=``).
    n_blocks : int or (int, int), default=1
        Grid size (ignored by structures with a fixed grid, such as global).
        GraLoRA needs ``n_blocks >= 2`` dividing every layer's sides.
    rank : int, optional
        Rank of every active block.
    budget_rank : int, optional
        A budget given as a LoRA-equivalent rank R: ``R * (m + n)`` parameters
        per m x n layer, spent with budget-optimal per-block ranks.
    total_budget : int, optional
        One total over all selected layers, spread over every block of every
        layer by gain-per-parameter water-filling (layout structures; the
        model-wide allocation of the checkpoint study). Layers that get no
        rank are left out and listed.
    max_error : float in (0, 1), optional
        Per layer, the fewest parameters whose relative error of ΔW is at
        most ``max_error`` (the threshold mode of kohya's and LyCORIS's
        extract scripts; layout structures); **with** ``calibration``, whose
        relative *output* error (``output_error``) is at most ``max_error``.
        Exactly one of ``rank``, ``budget_rank``, ``total_budget`` and ``max_error``.
    target_modules : "all-linear", str or list of str, default="all-linear"
        Which layers, in PEFT's terms (see
        :func:`~blocklowrank.checkpoints.select_names`).
    peft_type : {"auto", "LORA", "GRALORA"}, default="auto"
        "auto": the structure's own PEFT type. "LORA" writes any layout
        exactly as a stacked LoRA (more parameters for grids).
    svd_solver : {"auto", "full", "randomized"}, default="auto"
        Passed to :func:`~blocklowrank.structures.approximate`.
    cap_rank : bool, default=False
        Cap a ``rank`` above a block's smaller side at that side instead of raising.
    dtype : {"float32", "bfloat16", "float16", "float64"}, optional
        The adapter's tensors' type; default the fine-tuned checkpoint's own
        for the selected layers (a BF16 fine-tune gives a bfloat16 adapter;
        mixed 16/32-bit types float32).
        Fits are computed in float32 or float64 and rounded when stored.
    modules_to_save : str or list of str, optional
        Modules carried whole from the fine-tuned checkpoint (PEFT's
        ``modules_to_save``: e.g. a changed embedding or head), matched as
        in ``target_modules``; their tensors are written exactly (in their own
        dtype, whatever ``dtype`` is) under PEFT's key names and the config
        lists their full paths.
    overwrite : bool, default=False
        Replace a non-empty ``out`` if it is an adapter directory (nothing
        else is ever replaced), in one atomic step. ``out`` may never be an
        input, a folder holding one, the working directory or the home
        directory (refused before anything is read).
    progress : bool, default=False
        A progress bar over the layers (tqdm, the ``progress`` extra).
    orientation : {"out_in", "in_out"}, optional
        How the checkpoints store their layers' weights, when their
        ``config.json`` does not say: ``"in_out"`` for transformers'
        ``Conv1D`` (GPT-2), ``"out_in"`` for ``nn.Linear`` (see
        :func:`~blocklowrank.checkpoints.pair_layers`). Conv1D layers are
        fitted as ``(out, in)`` like every other and written with
        ``fan_in_fan_out: true``; an embedding chosen by ``target_modules``
        is written in PEFT's embedding layout (LoRA) or refused (GraLoRA).
    calibration : str, path or CalibrationStats, optional
        Calibration statistics of the base model (``blocklowrank calibrate``,
        :mod:`blocklowrank.calibration`): layers are then fitted (as
        ``metric`` says) in their data metric, minimising ``tr(H (ΔW - M) G (ΔW - M)ᵀ)`` with ``G`` the
        second moment of its inputs (one factorisation per input site, shared
        by q/k/v or gate/up) and ``H`` where the file has it for that layer
        (see :func:`~blocklowrank.structures.approximate`), instead of
        ``||ΔW - M||_F``; the report gives each layer's ``output_error``.
        ``G`` acts on ΔW's columns, the layer's input features (a Conv1D's
        ΔW is turned to (out, in) first). ``total_budget`` then minimises
        the sum of the layers' relative squared output errors; it reads the
        layers twice (their spectra, then their fits) and factors each site's
        ``G`` once per pass: keeping every site's factor between the passes
        would hold them all in memory (0.9 GB per 11008-wide site). Statistics
        that do not fit the selected layers are refused in one line naming
        the file and the entry, before anything is written. Default: the
        plain fit.
    gram_damping : float >= 0, optional
        The metric's damping ``delta``: ``G + delta mean(diag G) I`` (and so
        for ``H``); default :data:`~blocklowrank.GRAM_DAMPING`. Only with ``calibration``.
    metric : {"auto", "plain", "input", "output", "both"}, default="auto"
        With ``calibration``, which Grams a layer's fit uses: none, ``G``,
        ``H``, or both (``output``/``both`` need an ``H`` for every layer).
        ``auto`` follows the task-accuracy measurements in the README: a
        global (LoRA) adapter of a given rank or budget is fitted plain (on a
        MiniLM fine-tune the input metric cost it 1.7-7.7 points of test
        accuracy), every other structure in ``G`` and ``H`` where the layer
        has one (MELoRA and K x K gained 2-30 points), and a target in output
        error (``max_error``, ``total_budget``) in the metric it is stated in.
        Every layer's ``output_error`` is measured in the file's whole metric
        (``G``, and ``H`` where present) whatever it was fitted in; its
        record's ``metric`` says which it was.
    **options
        Further keywords of the structure's fit (e.g. ``global_rank``,
        ``max_iter`` for hybrid).

    Returns
    -------
    ExtractReport
        Per-layer errors, ranks and parameter counts, the files and their
        sizes, the changes the adapter loses, the pairing report and the
        adapter's config; ``str(report)`` is the summary the command line
        prints, ``report.to_json()`` what ``extract_report.json`` holds.

    Raises
    ------
    ValueError
        Bad options, no layer selected, no changed layer, or a layer that the
        adapter cannot hold (GraLoRA: a shape not divisible by K; a rank above
        a block's side); the message names the layer and the option to change
        (:class:`~blocklowrank.OptionError`); calibration statistics that do
        not fit (:class:`~blocklowrank.calibration.CalibrationError`, naming
        the file and the entry). Nothing is written then.
    FileNotFoundError, CheckpointError
        A missing or unreadable checkpoint (pickle files are refused).
    FileExistsError
        ``out`` is not empty and ``overwrite`` is False, or it is not an
        adapter directory.

    See Also
    --------
    plan_extraction : the same decisions from the headers alone (a dry run).

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> from blocklowrank.checkpoints import save_file
    >>> rng = np.random.default_rng(0)
    >>> tmp = tempfile.mkdtemp()
    >>> W = {"layers.0.q_proj.weight": rng.standard_normal((8, 8)), "embed_tokens.weight": np.zeros((5, 8))}
    >>> base = save_file(os.path.join(tmp, "base.safetensors"), W)
    >>> W["layers.0.q_proj.weight"] = W["layers.0.q_proj.weight"] + np.outer(np.ones(8), np.arange(8))
    >>> ft = save_file(os.path.join(tmp, "ft.safetensors"), W)
    >>> rep = extract_adapter(base, ft, os.path.join(tmp, "adapter"), rank=1)
    >>> rep.peft_type, rep.config["r"], round(rep.layers["layers.0.q_proj"]["error"], 6), rep.dtype
    ('LORA', 1, 0.0, 'float64')
    >>> rep.pairing.excluded, sorted(rep.files)
    (['embed_tokens.weight'], ['adapter_config.json', 'adapter_model.safetensors', 'extract_report.json'])
    """
    t0 = time.perf_counter()
    base, finetuned = resolve_model(base, role="base"), resolve_model(finetuned, role="fine-tuned")
    damping = check_damping(calibration, gram_damping, "extract_adapter")
    check_metric(metric, calibration)
    protect = _inputs(base, finetuned) + _calibration_paths(calibration)
    check_output_dir(out, inputs=protect, overwrite=overwrite, replaceable=ADAPTER_FILES)
    with _opened(base, finetuned) as (b, f), contextlib.ExitStack() as stack:
        prep = _prepare(b, f, method, n_blocks, rank, budget_rank, total_budget, max_error, target_modules,
                        peft_type, cap_rank, dtype, modules_to_save, orientation)  # fmt: skip
        # every G is factored before anything is written, and its factor checks it: no separate PSD check
        stats = stack.enter_context(_calibrated(calibration, prep.pairing.pairs, factor=False))
        modules = [p.module for p in prep.pairing.pairs]
        check_output_grams(metric, stats, modules)
        metrics = (lambda: None) if stats is None else (lambda: SiteMetrics(stats, damping, modules))  # noqa: E731
        alloc = allocation = None
        if prep.mode == "total_budget":
            alloc, allocation = _model_wide_ranks(
                b, f, prep.pairing, prep.structure, prep.n_blocks, prep.size, progress, metrics()
            )
        site_metrics = metrics()
        fits, layers, unchanged = _fit_layers(
            b, f, prep, alloc, svd_solver, cap_rank, options, progress, site_metrics, metric
        )  # fmt: skip
        if not fits:
            raise ValueError(
                f"no selected layer changed: the {len(unchanged)} layers chosen by "
                f"target_modules={target_modules!r} are equal in both checkpoints"
            )
        changed = changed_tensors(b, f, list(prep.pairing.excluded) + list(prep.pairing.not_2d))
        inputs = _inputs(base, finetuned, b, f) + _calibration_paths(calibration)
        cal = None if stats is None else _calibration_record(stats, site_metrics, damping, layers)
        carried = {m: {t: (np.asarray(f.get(t)), f.info(t).dtype) for t in ts} for m, ts in prep.saved.items()}
    written = save_peft_adapter(
        out,
        fits,
        kinds={p.module: p.kind for p in prep.pairing.pairs},
        peft_type=prep.kind,
        overwrite=overwrite,
        protect=inputs,
        base_model_name_or_path=None if isinstance(base, Checkpoint) else os.fspath(base),
        dtype=prep.store,
        modules_to_save=carried,
    )
    for name, info in written["layers"].items():
        layers[name]["n_params_written"] = info["n_params_written"]
        layers[name]["rank"] = info["rank"]
    lost, suggest = lost_changes(changed, prep.targets, prep.saved, prep.names)
    settings = {"method": prep.structure.name, "n_blocks": prep.n_blocks, prep.mode: prep.size}
    settings.update(target_modules=target_modules, peft_type=peft_type, svd_solver=svd_solver, cap_rank=cap_rank)
    if stats is not None:
        settings["metric"] = metric
    report = ExtractReport(
        directory=written["directory"],
        peft_type=written["peft_type"],
        config=written["config"],
        layers=layers,
        pairing=prep.pairing,
        unchanged=unchanged,
        changed_not_written=lost,
        suggested_modules_to_save=suggest,
        modules_to_save={m: list(t) for m, t in prep.saved.items()},
        n_params=written["n_params_effective"],
        n_params_written=written["n_params_written"],
        dense_params=sum(int(np.prod(v["shape"])) for v in layers.values()),
        dtype=prep.store,
        settings={**settings, **{k: v for k, v in options.items() if isinstance(v, (int, float, str))}},
        seconds=time.perf_counter() - t0,
        calibration=cal,
        allocation=allocation,
    )
    return _write_report(report)

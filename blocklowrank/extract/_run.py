"""The extraction itself, :func:`extract_adapter`, and its report (see :mod:`blocklowrank.extract`)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .._engine import allocate_total_budget, block_spectra
from .._io import atomic_write_text, check_output_dir, sha256_file
from .._metric import GRAM_DAMPING
from .._validation import OptionError, spell_options
from .._version import __version__
from ..calibration._sites import SiteMetrics, check_damping
from ..checkpoints import ALL_LINEAR, Checkpoint, changed_tensors, iter_deltas
from ..checkpoints._dtypes import bf16_to_float32, float_to_bf16
from ..checkpoints._names import resolve_model
from ..checkpoints._select import _listing
from ..convert import as_factors
from ..factors import StructuredFactors
from ..peft import ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_WEIGHTS, save_peft_adapter
from ..structures import approximate
from ..study import allocate_model_wide
from ..sweep import _bar
from ._plan import _calibrated, _calibration_paths, _opened, _prepare, lost_changes

__all__ = ["extract_adapter", "ExtractReport", "REPORT_FILE"]

#: The report written beside the adapter's files.
REPORT_FILE = "extract_report.json"


@dataclass
class ExtractReport:
    """What :func:`extract_adapter` did.

    Attributes
    ----------
    directory : str
        The adapter directory written.
    peft_type : str
        ``"LORA"`` or ``"GRALORA"``.
    config : dict
        ``adapter_config.json`` as written.
    layers : dict of str to dict
        Per module path: ``shape``, ``n_params`` (the structure's own),
        ``n_params_written`` (with PEFT's zero padding), ``error`` (relative
        Frobenius error of the fit against ΔW), ``output_error`` (with
        ``calibration``: the relative error of the layer's outputs on the
        calibration inputs, ``||(ΔW - M) Xᵀ|| / ||ΔW Xᵀ||``, in the undamped
        metric, ``H``-weighted where the file has ``H``; None without), ``ranks`` (per block),
        ``rank`` (the adapter's rank for the layer) and, for a 16-bit
        ``dtype``, ``error_stored`` (the error of the factors as stored).
    pairing : PairingReport
        Where every tensor of the two checkpoints went.
    unchanged : list of str
        Selected layers left out of the adapter: ΔW exactly zero, or no rank
        from a model-wide ``total_budget``.
    changed_not_written : list of str
        Tensors that changed but that the adapter does not hold (embeddings
        and heads left out by ``target_modules``, biases, norms): changes
        lost when the adapter is applied.
    suggested_modules_to_save : list of str
        Modules holding those changes that ``modules_to_save`` could carry whole.
    modules_to_save : dict of str to list of str
        Modules carried whole, with their tensors.
    n_params, n_params_written : int
        Totals over the layers (the modules carried whole not included).
    dense_params : int
        Weights of the selected layers (what a full ΔW would store).
    dtype : str
        The adapter's dtype ("float32", "bfloat16", "float16", "float64").
    files : dict of str to int
        The files written and their sizes in bytes.
    settings : dict
        The options of the extraction (method, grid, size option, ...).
    seconds : float
        Wall time of the extraction.
    calibration : dict or None
        With ``calibration``: ``file`` (None for statistics in memory),
        ``sha256`` of the file, ``gram_damping``, ``sites_factored`` (input
        sites factored, once each), ``output_grams`` (layers fitted with an ``H``).
    allocation : dict or None
        With ``total_budget``: ``rule`` (what the allocation minimised) and
        ``exact`` (whether it is provably optimal; in a data metric also
        whether every layer's fit at its ranks attains what the spectra say).
    """

    directory: str
    peft_type: str
    config: dict
    layers: dict
    pairing: object
    unchanged: list = field(default_factory=list)
    changed_not_written: list = field(default_factory=list)
    suggested_modules_to_save: list = field(default_factory=list)
    modules_to_save: dict = field(default_factory=dict)
    n_params: int = 0
    n_params_written: int = 0
    dense_params: int = 0
    dtype: str = "float32"
    files: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    calibration: dict = None
    allocation: dict = None

    def summary(self, max_names=5, *, style="python"):
        """A short multi-line account: the adapter, its layers and files, what it loses.

        ``style``: "python" spells options as keywords, "cli" as flags.
        """
        return spell_options("\n".join(_summary_lines(self, max_names)), style)

    __str__ = summary

    def to_json(self):
        """The report as a JSON-serialisable dict (what ``extract_report.json`` holds)."""
        p = self.pairing
        return {
            "blocklowrank": __version__,
            "directory": self.directory,
            "peft_type": self.peft_type,
            "dtype": self.dtype,
            "config": self.config,
            "settings": self.settings,
            "layers": {k: {**v, "shape": list(v["shape"])} for k, v in self.layers.items()},
            "n_params": self.n_params,
            "n_params_written": self.n_params_written,
            "dense_params": self.dense_params,
            "files": self.files,
            "modules_to_save": self.modules_to_save,
            "changed_not_written": self.changed_not_written,
            "suggested_modules_to_save": self.suggested_modules_to_save,
            "unchanged": self.unchanged,
            "excluded": list(p.excluded),
            "not_2d": list(p.not_2d),
            "only_in_base": list(p.only_in_base),
            "only_in_finetuned": list(p.only_in_finetuned),
            "shape_mismatch": [[n, list(a), list(b)] for n, a, b in p.shape_mismatch],
            "seconds": self.seconds,
            "calibration": self.calibration,
            "allocation": self.allocation,
        }


def _size(n):
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("kB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def _adapter_size_line(rep):
    cfg = rep.config
    ranks = sorted({v["rank"] for v in rep.layers.values()})
    if "gralora_k" in cfg:
        size = f"gralora_k={cfg['gralora_k']}, r={cfg['r']}" + (
            f", hybrid_r={cfg['hybrid_r']}" if cfg["hybrid_r"] else ""
        )
    elif len(ranks) == 1:
        size = f"r={ranks[0]} on every layer"
    else:
        size = f"rank {ranks[0]}-{ranks[-1]} by layer (rank_pattern; r={cfg['r']} for the most common)"
    return f"wrote {rep.peft_type} adapter ({size}) in {rep.dtype} to {rep.directory}"


def _layer_lines(rep, max_names):
    """The layers: all of them (up to 40) when their ranks differ, else the worst few."""
    varied = len({str(v["ranks"]) for v in rep.layers.values()}) > 1
    key = "error" if rep.calibration is None else "output_error"
    items = list(rep.layers.items()) if varied else sorted(rep.layers.items(), key=lambda kv: -kv[1][key])
    shown = items[: 40 if varied else max_names]
    lines = [
        f"    {name} {v['shape'][0]}x{v['shape'][1]}: rank {v['rank']}, error {v['error']:.4f}"
        + (f" ({v['error_stored']:.4f} as stored)" if "error_stored" in v else "")
        + ("" if v.get("output_error") is None else f", output error {v['output_error']:.4f}")
        + f", {v['n_params']:,} params"
        for name, v in shown
    ]
    if len(items) > len(shown):
        more = "" if varied else ", lower errors"
        lines.append(f"    ... ({len(items) - len(shown)} more layers{more}; all in {REPORT_FILE})")
    return lines


def _metric_lines(rep):
    """The calibration and the model-wide allocation, when used."""
    lines = []
    cal = rep.calibration
    if cal is not None:
        out = [v["output_error"] for v in rep.layers.values()]
        lines.append(
            f"  fitted in the data metric of {cal['file'] or 'the statistics given'} (G per input site, "
            f"{cal['sites_factored']} factored; H on {cal['output_grams']} layers; gram_damping "
            f"{cal['gram_damping']:g}): relative output error mean {np.mean(out):.4f}, max {np.max(out):.4f}"
        )
    if rep.allocation is not None:
        proof = "provably optimal" if rep.allocation["exact"] else "not proven optimal (greedy or coupled blocks)"
        lines.append(f"  «total_budget» allocated to minimise {rep.allocation['rule']}: {proof}")
    return lines


def _summary_lines(rep, max_names):
    errors = [v["error"] for v in rep.layers.values()]
    dense = rep.dense_params * {"float64": 8, "float32": 4}.get(rep.dtype, 2)
    lines = [
        _adapter_size_line(rep),
        f"  {len(rep.layers)} layers, {rep.n_params:,} parameters ({rep.n_params_written:,} in the file, dense ΔW "
        f"{rep.dense_params:,}); relative error of ΔW: mean {np.mean(errors):.4f}, max {np.max(errors):.4f}; "
        f"{rep.seconds:.1f} s",
        *_metric_lines(rep),
        "  files: "
        + ", ".join(f"{name} {_size(n)}" for name, n in rep.files.items())
        + f" (the dense ΔW of these layers in {rep.dtype}: {_size(dense)})",
    ]
    lines += _layer_lines(rep, max_names)
    if rep.modules_to_save:
        lines.append(_listing("carried whole («modules_to_save»)", list(rep.modules_to_save), max_names))
    if rep.changed_not_written:
        own = [n for n in rep.changed_not_written if n.rsplit(".", 1)[0] in rep.layers]
        why = f", {len(own)} of them biases of its layers: LoRA has no bias term" if own else ""
        shown = ", ".join(rep.changed_not_written[:max_names])
        more = len(rep.changed_not_written) - max_names
        lines.append(
            f"changed, NOT in the adapter: lost when it is applied ({len(rep.changed_not_written)}{why}): {shown}"
            + (f", ... and {more} more" if more > 0 else "")
        )
        if rep.suggested_modules_to_save:
            lines.append(f"  to carry them whole: «modules_to_save={' '.join(rep.suggested_modules_to_save)}»")
    lines.append("not in the adapter:")
    p = rep.pairing
    lost = set(rep.changed_not_written) | {t for tensors in rep.modules_to_save.values() for t in tensors}
    mismatches = [f"{name} {a} vs {b}" for name, a, b in p.shape_mismatch]
    groups = [
        ("only in base", p.only_in_base),
        ("only in fine-tuned", p.only_in_finetuned),
        ("shape mismatch", mismatches),
        ("excluded by «target_modules», unchanged", [n for n in p.excluded if n not in lost]),
        ("not 2-D, unchanged", [n for n in p.not_2d if n not in lost]),
        ("unchanged (ΔW = 0) or no rank from the budget", rep.unchanged),
    ]
    lines += [_listing(title, items, max_names) for title, items in groups if items]
    return lines


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


def _fit_one(delta, prep, size, svd_solver, cap_rank, options, metric):
    """One layer's fit (in its data metric when ``metric`` holds its Grams) and its record."""
    if cap_rank:  # the layout structures' option (the iterative fits have none)
        options = {**options, "cap_rank": True}
    res = approximate(
        delta, method=prep.structure.name, n_blocks=prep.n_blocks, svd_solver=svd_solver, **size, **options, **metric
    )
    sf = as_factors(res)
    rec = {"shape": tuple(delta.shape), "n_params": int(res.n_params), "error": float(res.error)}
    rec["output_error"] = float(res.output_error) if metric else None
    rec["ranks"] = res.ranks.tolist()
    if prep.store in ("bfloat16", "float16"):
        norm = np.linalg.norm(delta)
        stored = _rounded(sf, prep.store).to_dense()
        rec["error_stored"] = float(np.linalg.norm(delta - stored) / norm) if norm else 0.0
    return sf, rec


def _fit_layers(b, f, prep, alloc, svd_solver, cap_rank, options, progress, metrics=None):
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
            metric = {} if metrics is None else metrics(pair.module)
            fits[pair.module], layers[pair.module] = _fit_one(delta, prep, size, svd_solver, cap_rank, options, metric)
            del delta, metric  # before the next layer is read: one layer in memory, not two
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
    orientation=None, calibration=None, gram_damping=None, svd_solver="auto", overwrite=False, progress=False,
    **options,
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
        :mod:`blocklowrank.calibration`): every layer is then fitted in its
        data metric, minimising ``tr(H (ΔW - M) G (ΔW - M)ᵀ)`` with ``G`` the
        second moment of its inputs (one factorisation per input site, shared
        by q/k/v or gate/up) and ``H`` where the file has it for that layer
        (see :func:`~blocklowrank.structures.approximate`), instead of
        ``||ΔW - M||_F``; the report gives each layer's ``output_error``.
        ``G`` acts on ΔW's columns, the layer's input features (a Conv1D's
        ΔW is turned to (out, in) first). ``total_budget`` then minimises
        the sum of the layers' relative squared output errors. Statistics
        that do not fit the selected layers are refused in one line naming
        the file and the entry, before anything is written. Default: the
        plain fit.
    gram_damping : float >= 0, optional
        The metric's damping ``delta``: ``G + delta mean(diag G) I`` (and so
        for ``H``); default :data:`~blocklowrank.GRAM_DAMPING`. Only with ``calibration``.
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
    protect = _inputs(base, finetuned) + _calibration_paths(calibration)
    check_output_dir(out, inputs=protect, overwrite=overwrite, replaceable=ADAPTER_FILES)
    with _opened(base, finetuned) as (b, f), contextlib.ExitStack() as stack:
        prep = _prepare(b, f, method, n_blocks, rank, budget_rank, total_budget, max_error, target_modules,
                        peft_type, cap_rank, dtype, modules_to_save, orientation)  # fmt: skip
        stats = stack.enter_context(_calibrated(calibration, prep.pairing.pairs))
        modules = [p.module for p in prep.pairing.pairs]
        metrics = (lambda: None) if stats is None else (lambda: SiteMetrics(stats, damping, modules))  # noqa: E731
        alloc = allocation = None
        if prep.mode == "total_budget":
            alloc, allocation = _model_wide_ranks(
                b, f, prep.pairing, prep.structure, prep.n_blocks, prep.size, progress, metrics()
            )
        site_metrics = metrics()
        fits, layers, unchanged = _fit_layers(b, f, prep, alloc, svd_solver, cap_rank, options, progress, site_metrics)
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

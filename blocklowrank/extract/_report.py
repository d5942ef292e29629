"""What :func:`~blocklowrank.extract.extract_adapter` reports: :class:`ExtractReport`, its JSON and its summary."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .._validation import spell_options
from .._version import __version__
from ..checkpoints._select import _listing

__all__ = ["ExtractReport", "REPORT_FILE"]

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
        used = {}
        for v in rep.layers.values():
            used[v["metric"]] = used.get(v["metric"], 0) + 1
        fitted = ", ".join(f"{n} {'plain' if m == 'plain' else 'in ' + m}" for m, n in sorted(used.items()))
        lines.append(
            f"  calibration {cal['file'] or 'given in memory'} (G per input site, {cal['sites_factored']} "
            f"factored; H on {cal['output_grams']} layers; gram_damping {cal['gram_damping']:g}); metric "
            f"{rep.settings.get('metric', 'auto')}: layers fitted {fitted}; relative output error mean "
            f"{np.mean(out):.4f}, max {np.max(out):.4f}"
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

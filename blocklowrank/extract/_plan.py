"""What an extraction will write, decided from the checkpoints' headers alone.

- :func:`store_dtype`: the adapter's dtype (asked for, or the checkpoints' own);
- :func:`select_modules_to_save`: the modules carried whole (PEFT's
  ``modules_to_save``), by PEFT's own matching rule;
- :func:`lost_changes`: what changed but the adapter does not hold, and the
  module to name in ``modules_to_save`` to carry it;
- :func:`plan_extraction`: the dry run -- every layer, its ranks, parameter
  counts and the adapter file's size, exact for ``rank`` and bounded for the
  budget modes, without reading any tensor's data.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from .._validation import OptionError
from ..calibration._sites import check_damping, open_calibration
from ..checkpoints import ALL_LINEAR, pair_layers, safetensors_size
from ..checkpoints._names import close_matches, no_layer_selected, resolve_model
from ..peft import ADAPTER_WEIGHTS, PEFT_TYPES
from ..peft._read import PREFIX, _open
from ..structures import get_structure

__all__ = [
    "STORE_DTYPES",
    "METRICS",
    "fit_sides",
    "store_dtype",
    "select_modules_to_save",
    "lost_changes",
    "plan_extraction",
    "ExtractPlan",
]

#: The adapter dtypes, as ``--dtype`` spells them, and their safetensors codes.
STORE_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
_OWN = {code: name for name, code in STORE_DTYPES.items()}
_SIZE_OPTIONS = ("rank", "budget_rank", "total_budget", "max_error")

#: How a calibrated extraction fits each layer (``metric=``, ``--metric``); see :func:`fit_sides`.
METRICS = ("auto", "plain", "input", "output", "both")


def check_metric(metric, calibration):
    """``metric`` checked: one of :data:`METRICS`; a metric other than ``auto``/``plain`` needs ``calibration``."""
    if not isinstance(metric, str) or metric not in METRICS:
        raise OptionError(f"«metric» must be one of {', '.join(METRICS)}, got {metric!r}")
    if calibration is None and metric not in ("auto", "plain"):
        raise OptionError(f"«metric={metric}» fits in the data metric of «calibration»: pass «calibration» too")
    return metric


def check_output_grams(metric, stats, modules):
    """``metric`` "output" or "both" needs an ``H`` for every selected layer: refused up front, naming one."""
    if stats is None or metric not in ("output", "both"):
        return
    missing = [m for m in modules if m not in set(stats.output_layers)]
    if missing:
        source = "the calibration statistics" if stats.source is None else os.fspath(stats.source)
        raise OptionError(
            f"{source}: «metric={metric}» needs an output Gram H for every layer, and the file has none for "
            f"{missing[0]!r} ({len(missing)} of {len(modules)} layers; blocklowrank calibrate --output-grams "
            "collects them), or use «metric=input»"
        )


def fit_sides(metric, structure, mode, has_output):
    """``(input, output)``: whether a calibrated layer's fit uses its ``G`` and its ``H``.

    ``auto`` follows the task-accuracy measurements in the README ("Which extraction keeps a fine-tune's
    accuracy"): a global (LoRA) fit at a given size is fitted plain -- on the MiniLM fine-tune the input
    metric cost LoRA 7.7, 1.7 and 1.7 points of test accuracy at ranks 8, 16 and 32, and ``H`` gained
    nothing --, while every block structure is fitted in ``G`` and ``H`` where the layer has one (MELoRA
    and K x K gained 2 to 30 points); an output-error target (``max_error``, ``total_budget``) is
    always met in the metric it is stated in.
    """
    if metric == "plain" or (metric == "auto" and structure == "global" and mode not in ("max_error", "total_budget")):
        return False, False
    if metric == "input":
        return True, False
    if metric == "output":
        return False, True
    return True, has_output if metric == "auto" else True


def store_dtype(dtype, checkpoints, names):
    """The adapter's dtype: ``dtype`` if given, else the one the checkpoints store tensors ``names`` in.

    Pass the fine-tuned checkpoint (the adapter stands in for it): one
    stored type (F32, BF16, F16, F64) gives that type; a mix of the 16- and
    32-bit types gives float32, a mix with F64 float64.
    """
    if dtype is not None:
        if dtype not in STORE_DTYPES:
            raise OptionError(f"«dtype» must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
        return dtype
    codes = {ck.info(n).dtype for ck in checkpoints for n in names}
    if len(codes) == 1 and codes <= _OWN.keys():
        return _OWN[codes.pop()]
    return "float64" if "F64" in codes else "float32"


def _prefixes(name):
    """Every module path that holds tensor ``name`` (``a.b.c.weight`` -> ``a``, ``a.b``, ``a.b.c``)."""
    parts = name.split(".")[:-1]
    return [".".join(parts[: t + 1]) for t in range(len(parts))]


def select_modules_to_save(modules_to_save, names, targets):
    """``{module path: [tensor names]}`` of the modules to carry whole (PEFT's ``modules_to_save``).

    A name matches as in ``target_modules``: a module path equal to it or
    ending with ``"." + name``; every tensor under a matched module is
    carried (its parameters and buffers, as PEFT saves the module's
    ``state_dict``), and the config lists the full paths, so that PEFT
    (which matches by plain string suffix) wraps exactly these modules. A
    name that matches nothing, or a module holding a LoRA target, is
    refused by name.
    """
    if not modules_to_save:
        return {}
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    paths = list(dict.fromkeys(p for n in names for p in _prefixes(n)))
    chosen = {}
    for want in modules_to_save:
        if not isinstance(want, str) or not want.strip("."):
            raise OptionError(f"«modules_to_save» must hold module names, got {want!r}")
        hit = [p for p in paths if p == want or p.endswith("." + want)]
        if not hit:
            near = close_matches(want, paths + list(dict.fromkeys(p.split(".")[-1] for p in paths)))
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise OptionError(f"«modules_to_save» {want!r} matches no module of the fine-tuned checkpoint{hint}")
        for p in hit:
            inside = sorted(t for t in targets if t == p or t.startswith(p + "."))
            if inside:
                raise OptionError(
                    f"«modules_to_save» {want!r} matches {p!r}, which holds {inside[0]!r}, a layer the adapter "
                    "fits as LoRA; name a module outside the «target_modules» or leave that layer out of them"
                )
            chosen[p] = [n for n in names if n.startswith(p + ".")]
    clash = sorted(p for p in paths if p not in chosen and any(p.endswith(c) for c in chosen))
    if clash:  # PEFT matches the config's paths by plain string suffix: it would also wrap these
        raise OptionError(
            f"«modules_to_save»: PEFT matches module paths by plain string suffix, so it would also wrap "
            f"{clash[0]!r}; name modules that hold tensors directly (e.g. {clash[0]!r} itself)"
        )
    return chosen


def lost_changes(changed, targets, saved, names):
    """Changed tensors the adapter does not hold, and the modules to name to carry them.

    Returns ``(lost, suggest)``: tensor names (those of ``saved`` modules are
    carried, not lost) and the names that ``modules_to_save`` could carry
    them with: a module's last name when it names every module of that name
    (``LayerNorm``), else its full path. Biases of the adapter's own layers
    are lost too (a LoRA layer has no bias term) and are never suggested.
    """
    carried = {n for tensors in saved.values() for n in tensors}
    lost = [n for n in changed if n not in carried]
    owners = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in lost if "." in n))
    owners = [m for m in owners if m not in targets and not any(m.startswith(t + ".") for t in targets)]
    modules = {n.rsplit(".", 1)[0] for n in names if "." in n}
    by_last = {}
    for m in modules:
        by_last.setdefault(m.split(".")[-1], set()).add(m)
    suggest = []
    for m in owners:
        last = m.split(".")[-1]
        short = last if by_last[last] <= set(owners) and not by_last[last] & set(targets) else m
        if short not in suggest:
            suggest.append(short)
    return lost, suggest


# ---------------------------------------------------------------------------- checks before any fit
def _size_option(structure, rank, budget_rank, total_budget, max_error):
    """``(mode, value)``: the one size option given, checked."""
    given = [(k, v) for k, v in zip(_SIZE_OPTIONS, (rank, budget_rank, total_budget, max_error)) if v is not None]
    if len(given) != 1:
        raise OptionError(
            "give exactly one of «rank» (per block), «budget_rank» (a LoRA-equivalent rank per layer), "
            "«total_budget» (one total over all layers) and «max_error» (a relative error per layer)"
        )
    name, value = given[0]
    if name == "max_error":
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0 < value < 1:
            raise OptionError(f"«max_error» must be a number in (0, 1), got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise OptionError(f"«{name}» must be a positive integer, got {value!r}")
    if name in ("total_budget", "max_error") and not structure.spectral:
        raise OptionError(
            f"«{name}» chooses ranks from the blocks' spectra, which the {structure.name} structure does not "
            "have; use «budget_rank» or «rank»"
        )
    return name, value


def _gralora_ks(pairs):
    """The grid sizes K >= 2 (up to 16) dividing every side of every selected layer."""
    g = 0
    for pair in pairs:
        g = math.gcd(g, math.gcd(*pair.shape))
    return [k for k in range(2, min(g, 16) + 1) if g % k == 0]


def _check_fit(structure, n_blocks, pairs, peft_type, rank, cap_rank):
    """The adapter type, after checking that every selected layer can be fitted and written as it."""
    if peft_type not in PEFT_TYPES:
        raise OptionError(f"«peft_type» must be one of {', '.join(PEFT_TYPES)}, got {peft_type!r}")
    kind = structure.peft if peft_type == "auto" else peft_type
    if kind is None:
        raise OptionError(
            f"the {structure.name} structure has no PEFT adapter form; pick a «method» with one "
            "(global, diagonal, block, hybrid)"
        )
    ks = ", ".join(map(str, _gralora_ks(pairs))) or "none"
    flags = {pair.kind for pair in pairs} - {"embedding"}
    if len(flags) > 1:
        linear, conv1d = (next(p.module for p in pairs if p.kind == k) for k in ("linear", "conv1d"))
        raise OptionError(
            f"one adapter has one fan_in_fan_out, and {linear!r} is nn.Linear while {conv1d!r} is a Conv1D "
            "layer; extract them as two adapters («target_modules»)"
        )
    for pair in pairs:
        if kind == "GRALORA" and pair.kind == "embedding":
            raise OptionError(
                f"{pair.module!r} is an embedding, which GraLoRA cannot hold (PEFT's GraLoRA takes nn.Linear "
                "and Conv1D layers only); leave it out with «target_modules», or use a LoRA structure; "
                "nothing was written"
            )
        (m, n), where = pair.shape, f"layer {pair.module!r} (out={pair.shape[0]}, in={pair.shape[1]})"
        try:
            layout = structure.layout((m, n), n_blocks)
        except ValueError as exc:
            raise OptionError(f"{where}: {exc}; choose another «n_blocks»") from None
        K = layout.n_blocks[0]
        if kind == "GRALORA" and (layout.n_blocks != (K, K) or K < 2):
            raise OptionError(
                f"a GraLoRA adapter needs a K x K grid with K >= 2, and the {structure.name} structure with "
                f"«n_blocks={n_blocks}» gives {layout.n_blocks[0]}x{layout.n_blocks[1]}: pass «n_blocks» K "
                f"(K dividing every selected layer: {ks}), or «peft_type=LORA», or «method=global»"
            )
        if kind == "GRALORA" and (m % K or n % K):
            raise OptionError(
                f"{where} is not divisible by gralora_k={K}, which PEFT requires: use another «n_blocks» "
                f"({ks} divide every selected layer), write the adapter as LoRA with «peft_type=LORA» "
                "(exact, more parameters), or leave the layer out with «target_modules»; nothing was written"
            )
        side = int(layout.max_ranks[layout.active].min())
        if rank is not None and not cap_rank and rank > side:
            raise OptionError(
                f"{where}: «rank» {rank} exceeds the smaller side of its smallest block ({side}, with "
                f"«n_blocks={n_blocks}»): lower «rank», use fewer blocks, or pass «cap_rank=True» to cap each "
                "block's rank at its smaller side"
            )
    return kind


def _prepare(b, f, method, n_blocks, rank, budget_rank, total_budget, max_error, target_modules, peft_type,
             cap_rank, dtype, modules_to_save, orientation=None):  # fmt: skip
    """Everything decided from the headers: structure, size option, pairing, adapter type, dtype, modules."""
    structure = get_structure(method)
    mode, size = _size_option(structure, rank, budget_rank, total_budget, max_error)
    n_blocks = structure.fixed_blocks or n_blocks
    pairing = pair_layers(b, f, target_modules, orientation=orientation)
    if not pairing.pairs:
        modules = [n.rsplit(".", 1)[0] for n in pairing.excluded if n.endswith(".weight")]
        raise no_layer_selected(modules, target_modules).with_context("no layer selected: ")
    kind = _check_fit(structure, n_blocks, pairing.pairs, peft_type, rank if mode == "rank" else None, cap_rank)
    targets = {x.module for x in pairing.pairs}
    saved = select_modules_to_save(modules_to_save, f.keys(), targets)
    store = store_dtype(dtype, (f,), [x.name for x in pairing.pairs])
    return SimpleNamespace(
        structure=structure, n_blocks=n_blocks, mode=mode, size=size, pairing=pairing, kind=kind,
        store=store, saved=saved, targets=targets, names=f.keys(),
    )  # fmt: skip


@contextlib.contextmanager
def _opened(base, finetuned):
    """Both checkpoints open (paths opened here are closed on exit)."""
    base_ckpt, close_base = _open(base, "base")
    try:
        tuned_ckpt, close_tuned = _open(finetuned, "fine-tuned")
    except BaseException:
        if close_base:
            base_ckpt.close()
        raise
    try:
        yield base_ckpt, tuned_ckpt
    finally:
        for ckpt, opened in ((base_ckpt, close_base), (tuned_ckpt, close_tuned)):
            if opened:
                ckpt.close()


def _calibration_paths(calibration):
    return [calibration] if isinstance(calibration, (str, os.PathLike)) else []


@contextlib.contextmanager
def _calibrated(calibration, pairs, factor=True):
    """The statistics checked against the layers of ``pairs`` (None without ``calibration``), closed on exit;
    ``factor=False``: their PSD check left to the fits' factors (:func:`~blocklowrank.calibration.check_statistics`)."""
    if calibration is None:
        yield None
        return
    layers = {p.module: tuple(p.shape) for p in pairs}  # (out, in): Conv1D's ΔW is turned before fitting
    stats, opened = open_calibration(calibration, layers, kinds={p.module: p.kind for p in pairs}, factor=factor)
    try:
        yield stats
    finally:
        if opened:
            stats.close()


# ---------------------------------------------------------------------------- the dry run
@dataclass
class ExtractPlan:
    """What :func:`~blocklowrank.extract.extract_adapter` would write (see :func:`plan_extraction`).

    Attributes
    ----------
    peft_type : str
    dtype : str
        The adapter's dtype.
    layers : dict of str to dict
        Per module: ``shape``, ``ranks`` (per block, or None when the fit
        chooses them), ``n_params`` and ``n_params_written`` (exact, or upper
        bounds when ``exact`` is False).
    modules_to_save : dict of str to list of str
        Modules carried whole and their tensors.
    n_params, n_params_written, size : int
        Totals, and the bytes of ``adapter_model.safetensors`` (exact or upper bounds).
    exact : bool
        True when the sizes are exact (``rank``), False for the budget and
        error-target modes (upper bounds; the fit chooses the ranks).
    excluded : list of str
        Tensors left out (their changes are only known by reading them).
    """

    peft_type: str
    dtype: str
    layers: dict
    modules_to_save: dict = field(default_factory=dict)
    n_params: int = 0
    n_params_written: int = 0
    size: int = 0
    exact: bool = True
    excluded: list = field(default_factory=list)
    mode: str = "rank"

    def summary(self, style="python", max_names=40):
        """The plan as lines of text: one line per layer, then the totals."""
        bound = "" if self.exact else "at most "
        ranks = "ranks chosen by the fit" if not self.exact else "ranks per block as given"
        lines = [
            f"dry run: a {self.peft_type} adapter in {self.dtype}, {len(self.layers)} layers ({ranks}); "
            "nothing is read beyond the headers, nothing is written",
            f"  {'layer':<48} {'shape':>11} {'ranks':>10} {'parameters':>12} {'in the file':>12}",
        ]
        for name, v in list(self.layers.items())[:max_names]:
            r = "-" if v["ranks"] is None else _ranks_text(v["ranks"])
            lines.append(
                f"  {name:<48} {v['shape'][0]:>5}x{v['shape'][1]:<5} {r:>10} {v['n_params']:>12,} "
                f"{v['n_params_written']:>12,}"
            )
        if len(self.layers) > max_names:
            lines.append(f"  ... {len(self.layers) - max_names} more layers")
        saved = sum(len(t) for t in self.modules_to_save.values())
        if saved:
            lines.append(f"  modules_to_save: {', '.join(self.modules_to_save)} ({saved} tensors, whole)")
        lines.append(
            f"total: {bound}{self.n_params:,} parameters ({bound}{self.n_params_written:,} in the file); "
            f"{ADAPTER_WEIGHTS}: {bound}{_mib(self.size)}"
        )
        lines.append(
            f"a real run reads the tensors: it leaves out layers whose ΔW is 0 and flags what changed among the "
            f"{len(self.excluded)} tensors left out (embeddings, heads, biases, norms)"
        )
        return "\n".join(lines)

    def to_json(self):
        return {
            "dry_run": True,
            "peft_type": self.peft_type,
            "dtype": self.dtype,
            "exact": self.exact,
            "mode": self.mode,
            "layers": {k: {**v, "shape": list(v["shape"])} for k, v in self.layers.items()},
            "modules_to_save": self.modules_to_save,
            "n_params": self.n_params,
            "n_params_written": self.n_params_written,
            "files": {ADAPTER_WEIGHTS: self.size},
            "excluded": self.excluded,
        }


def _mib(n):
    return f"{n / 2**20:.2f} MiB" if n >= 2**16 else f"{n:,} bytes"


def _ranks_text(ranks):
    """``"4"`` for equal ranks, ``"2-5"`` for a range."""
    flat = np.asarray(ranks).ravel()
    lo, hi = int(flat.min()), int(flat.max())
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _layer_bounds(layout, mode, size, kind, K):
    """``(ranks or None, n_params, R)`` of one layer: R the written rank (LoRA: stacked; GraLoRA: block rank)."""
    m, n = layout.shape
    costs = layout.block_costs[layout.active]
    sides = layout.max_ranks[layout.active]
    if mode == "rank":
        return (
            layout.ranks.tolist(),
            int(layout.n_params),
            int(layout.ranks.sum() if kind == "LORA" else layout.ranks.max()),
        )
    budget = size if mode == "total_budget" else (size * (m + n) if mode == "budget_rank" else int(sides @ costs))
    most = int(min(budget, int(sides @ costs)))
    if kind == "LORA":
        return None, most, int(min(budget // int(costs.min()), int(sides.sum())))
    return None, most, int(min(budget // int(costs.min()), int(sides.max())))


def _adapter_specs(layers, kind, K, store, hybrid_r):
    """``{tensor: (code, shape)}`` of the adapter's factors, in PEFT's key layout (see :mod:`blocklowrank.peft`)."""
    code, specs = STORE_DTYPES[store], {}
    rho = max((v["R"] for v in layers.values()), default=1)
    for name, v in layers.items():
        m, n = v["shape"]
        key = f"{PREFIX}{name}."
        if kind == "LORA":
            names = (
                ("lora_embedding_A", "lora_embedding_B")
                if v["kind"] == "embedding"
                else ("lora_A.weight", "lora_B.weight")
            )
            specs[key + names[0]] = (code, (max(v["R"], 1), n))
            specs[key + names[1]] = (code, (m, max(v["R"], 1)))
            continue
        specs[key + "gralora_A"] = (code, (K, n // K, K * rho))
        specs[key + "gralora_B"] = (code, (K, K * rho, m // K))
        if hybrid_r:
            specs[key + "gralora_A_general.weight"] = (code, (hybrid_r, n))
            specs[key + "gralora_B_general.weight"] = (code, (m, hybrid_r))
    return specs, rho


def plan_extraction(base, finetuned, *, method="global", n_blocks=1, rank=None, budget_rank=None,
                    total_budget=None, max_error=None, target_modules=ALL_LINEAR, peft_type="auto",
                    cap_rank=False, dtype=None, modules_to_save=None, orientation=None, calibration=None,
                    gram_damping=None, metric="auto", **options):  # fmt: skip
    """What :func:`~blocklowrank.extract.extract_adapter` would write, from the headers alone (a dry run).

    Parameters are those of ``extract_adapter`` (without ``out``). Every
    check it makes before fitting is made (selection, the adapter type,
    ranks against block sides, ``modules_to_save``, the calibration
    statistics against the layers); no tensor data of the checkpoints is read.

    Returns
    -------
    ExtractPlan
        Exact counts and file size with ``rank``; upper bounds with
        ``budget_rank``, ``total_budget`` and ``max_error``, whose ranks the
        fit chooses from the spectra.
    """
    base = resolve_model(base, role="base")
    finetuned = resolve_model(finetuned, role="fine-tuned")
    check_damping(calibration, gram_damping, "plan_extraction")
    check_metric(metric, calibration)
    with _opened(base, finetuned) as (b, f):
        prep = _prepare(b, f, method, n_blocks, rank, budget_rank, total_budget, max_error, target_modules,
                        peft_type, cap_rank, dtype, modules_to_save, orientation)  # fmt: skip
        with _calibrated(calibration, prep.pairing.pairs) as stats:  # refused here as in a real run
            check_output_grams(metric, stats, [p.module for p in prep.pairing.pairs])
        saved_specs = {
            f"{PREFIX}{t}": (f.info(t).dtype, f.info(t).shape)  # carried whole in their own dtype
            for tensors in prep.saved.values()
            for t in tensors
        }
    structure, K, kind = prep.structure, prep.n_blocks, prep.kind
    mode, size = prep.mode, prep.size
    layers = {}
    for pair in prep.pairing.pairs:
        layout = structure.layout(tuple(pair.shape), K)
        if mode == "rank":
            layout = layout.with_ranks(rank, cap_rank=cap_rank)
        ranks, n_params, R = _layer_bounds(layout, mode, size, kind, K)
        layers[pair.module] = {"shape": tuple(pair.shape), "ranks": ranks, "n_params": n_params, "R": R}
        layers[pair.module]["kind"] = pair.kind
    if mode == "total_budget":  # one total over every layer bounds each layer and their sum
        total = int(size)
        for v in layers.values():
            v["n_params"] = min(v["n_params"], total)
    hybrid_r = int(options.get("global_rank") or 0) if kind == "GRALORA" else 0
    specs, rho = _adapter_specs(layers, kind, K, prep.store, hybrid_r)
    for v in layers.values():
        m, n = v["shape"]
        v["n_params_written"] = (K * rho + hybrid_r) * (m + n) if kind == "GRALORA" else max(v.pop("R"), 1) * (m + n)
        v.pop("R", None)
        v.pop("kind")
    n_params = sum(v["n_params"] for v in layers.values())
    if mode == "total_budget":
        n_params = min(n_params, int(size))
    return ExtractPlan(
        peft_type=kind,
        dtype=prep.store,
        layers=layers,
        modules_to_save={m: list(t) for m, t in prep.saved.items()},
        n_params=n_params,
        n_params_written=sum(v["n_params_written"] for v in layers.values()),
        size=safetensors_size({**specs, **saved_specs}, metadata={"format": "pt"}),
        exact=mode == "rank",
        excluded=list(prep.pairing.excluded) + list(prep.pairing.not_2d),
        mode=mode,
    )

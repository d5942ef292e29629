"""PEFT adapters extracted from a full fine-tune.

:func:`extract_adapter` pairs a base checkpoint with its fine-tuned version
(:func:`~blocklowrank.checkpoints.pair_layers`), streams ``ΔW = W_ft - W_base``
one layer at a time (:func:`~blocklowrank.checkpoints.iter_deltas`), fits each
with a registered structure (:func:`~blocklowrank.structures.approximate`) and
writes the fits as one PEFT adapter directory
(:func:`~blocklowrank.peft.save_peft_adapter`): LoRA for the global and
diagonal structures, GraLoRA for K x K grids (see the structure's ``peft``
field). ``blocklowrank extract BASE FINETUNED --out DIR`` is the same on the
command line.

:func:`blocklowrank.peft.adapter_deltas` goes the other way: the ΔW of each
layer of an adapter directory under the base checkpoint's weight names, so
that anything that takes ``(name, ΔW)`` pairs (the model study) can take an
adapter in place of a fine-tuned checkpoint.

Only what a PEFT adapter holds is extracted: the 2-D weights chosen by
``target_modules`` (``"all-linear"`` leaves out embeddings and output heads).
Everything else that changed (biases, norms) is listed in the report, not
written. Each layer's kind is decided once from the model's ``config.json``
(:func:`~blocklowrank.checkpoints.pair_layers`): GPT-2's ``Conv1D`` layers
are fitted as ``(out, in)`` like every other and written with
``fan_in_fan_out: true``; an embedding chosen by ``target_modules`` is
written in PEFT's embedding layout (LoRA) or refused before anything is
fitted (GraLoRA). ``out`` is never an input, a folder holding one, the working
directory or the home directory, and ``overwrite`` replaces only an adapter
directory, in one atomic step. Nothing here imports torch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from ._engine import block_spectra
from ._io import check_output_dir
from .checkpoints import ALL_LINEAR, Checkpoint, changed_tensors, iter_deltas, pair_layers
from .checkpoints._select import _listing
from .convert import as_factors
from .peft import ADAPTER_FILES, PEFT_TYPES, save_peft_adapter
from .peft._read import _open
from .peft._write import _gralora_fits
from .structures import approximate, get_structure
from .study import allocate_model_wide

__all__ = ["extract_adapter", "ExtractReport"]


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
        Frobenius error of the fit against ΔW) and ``ranks`` (per block).
    pairing : PairingReport
        Where every tensor of the two checkpoints went (embeddings and heads
        excluded by ``target_modules``, tensors in one checkpoint only, shape
        mismatches, 1-D tensors).
    unchanged : list of str
        Selected layers left out of the adapter: ΔW exactly zero, or no rank
        from a model-wide ``total_budget``.
    changed_not_written : list of str
        Tensors that are not 2-D (biases, norms) whose values changed: a PEFT
        LoRA/GraLoRA adapter cannot hold them.
    n_params, n_params_written : int
        Totals over the layers.
    dense_params : int
        Weights of the selected layers (what a full ΔW would store).
    seconds : float
        Wall time of the extraction.
    """

    directory: str
    peft_type: str
    config: dict
    layers: dict
    pairing: object
    unchanged: list = field(default_factory=list)
    changed_not_written: list = field(default_factory=list)
    n_params: int = 0
    n_params_written: int = 0
    dense_params: int = 0
    seconds: float = 0.0

    def summary(self, max_names=5):
        """A short multi-line account: the adapter, its layers and what was left out."""
        errors = [v["error"] for v in self.layers.values()]
        cfg = self.config
        size = f"r={cfg['r']}" + (f", gralora_k={cfg['gralora_k']}" if "gralora_k" in cfg else "")
        lines = [
            f"wrote {self.peft_type} adapter ({size}) to {self.directory}",
            f"  {len(self.layers)} layers, {self.n_params:,} parameters "
            f"({self.n_params_written:,} in the file, dense ΔW {self.dense_params:,}); "
            f"relative error of ΔW: mean {np.mean(errors):.4f}, max {np.max(errors):.4f}; "
            f"{self.seconds:.1f} s",
        ]
        worst = sorted(self.layers.items(), key=lambda kv: -kv[1]["error"])[:max_names]
        lines += [
            f"    {name} {v['shape'][0]}x{v['shape'][1]}: error {v['error']:.4f}, {v['n_params']:,} params"
            for name, v in worst
        ]
        if len(self.layers) > len(worst):
            lines.append(f"    ... ({len(self.layers) - len(worst)} more layers, lower errors)")
        lines.append("not in the adapter:")
        lines += self.pairing.summary(max_names).splitlines()[1:]
        if self.unchanged:
            lines.append(_listing("unchanged (ΔW = 0)", self.unchanged, max_names))
        if self.changed_not_written:
            lines.append(
                _listing("changed but not 2-D (biases, norms: not written)", self.changed_not_written, max_names)
            )
        return "\n".join(lines)

    __str__ = summary


def _grid_size(structure, n_blocks, rank, budget_rank, total_budget=None):
    """The grid size to fit with, after checking that exactly one size is given, a positive int."""
    given = [
        (k, v)
        for k, v in (("rank", rank), ("budget_rank", budget_rank), ("total_budget", total_budget))
        if v is not None
    ]
    if len(given) != 1:
        raise ValueError(
            "give exactly one of rank (per block), budget_rank (a LoRA-equivalent rank per layer) "
            "and total_budget (one total over all layers)"
        )
    name, size = given[0]
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"{name} must be a positive integer, got {size!r}")
    if name == "total_budget" and not structure.spectral:
        raise ValueError(
            f"total_budget spreads ranks over the blocks of layout structures; {structure.name!r} "
            "is not one (use budget_rank)"
        )
    return structure.fixed_blocks or n_blocks


def _model_wide_ranks(base, tuned, pairing, structure, n_blocks, total_budget):
    """``{weight name: per-block ranks}`` spreading ``total_budget`` over every block of every layer
    (a first pass over the layers, their spectra only; see
    :func:`~blocklowrank.study.allocate_model_wide`)."""
    names, spectra = [], []
    for pair, delta in iter_deltas(base, tuned, pairing):
        names.append(pair.name)
        spectra.append(block_spectra(delta, structure.layout(delta.shape, n_blocks)))
        del delta  # before the next layer is read: one layer in memory, not two
    ranks, _, _ = allocate_model_wide(spectra, int(total_budget))
    if not any(r.any() for r in ranks):
        cheapest = min(int(sp.layout.block_costs[sp.layout.active].min()) for sp in spectra)
        raise ValueError(
            f"total_budget={total_budget} is below the cheapest rank of any selected layer "
            f"({cheapest} parameters: one rank of its smallest block); raise --total-budget"
        )
    return dict(zip(names, ranks))


def _check_peft_fit(structure, n_blocks, pairs, peft_type):
    """The adapter type, after checking that every selected layer can be written as it (before any fit)."""
    if peft_type not in PEFT_TYPES:
        raise ValueError(f"peft_type must be one of {PEFT_TYPES}, got {peft_type!r}")
    kind = structure.peft if peft_type == "auto" else peft_type
    if kind is None:
        raise ValueError(
            f"the {structure.name} structure has no PEFT adapter form; "
            "pick a structure with one (global, diagonal, block, hybrid)"
        )
    flags = {pair.kind for pair in pairs} - {"embedding"}
    if len(flags) > 1:
        linear, conv1d = (next(p.module for p in pairs if p.kind == k) for k in ("linear", "conv1d"))
        raise ValueError(
            f"one adapter has one fan_in_fan_out, and {linear!r} is nn.Linear while {conv1d!r} is a Conv1D "
            "layer; extract them as two adapters (target_modules)"
        )
    for pair in pairs:
        layout = structure.layout(tuple(pair.shape), n_blocks)
        if kind != "GRALORA":
            continue
        if pair.kind == "embedding":
            raise ValueError(
                f"{pair.module!r} is an embedding, which GraLoRA cannot hold (PEFT's GraLoRA takes nn.Linear "
                "and Conv1D layers only); leave it out with target_modules, or use a LoRA structure; "
                "nothing was written"
            )
        K = layout.n_blocks[0]
        if layout.n_blocks != (K, K) or K < 2:
            raise ValueError(
                f"a GraLoRA adapter needs a K x K grid with K >= 2; the {structure.name} "
                f"structure with n_blocks={n_blocks!r} gives {layout.n_blocks}; "
                "use peft_type='LORA' or method='block'"
            )
        problem = _gralora_fits(pair.module, SimpleNamespace(layout=layout), K)
        if problem:
            raise ValueError(f"{problem}, or leave the layer out with target_modules; nothing was written")
    return kind


def _inputs(*sources):
    """The paths of the checkpoints (given, and every file they open) that ``out`` must never replace."""
    paths = []
    for source in sources:
        paths += [source.path, *source.files] if isinstance(source, Checkpoint) else [source]
    return paths


def extract_adapter(
    base,
    finetuned,
    out,
    *,
    method="global",
    n_blocks=1,
    rank=None,
    budget_rank=None,
    total_budget=None,
    target_modules=ALL_LINEAR,
    peft_type="auto",
    svd_solver="auto",
    overwrite=False,
    orientation=None,
    **options,
):
    """Extract a PEFT adapter from a fine-tuned checkpoint: fit each ΔW with one structure.

    Parameters
    ----------
    base, finetuned : str, path or Checkpoint
        safetensors checkpoints (a file, a sharded index or a model folder)
        of the base model and of its fully fine-tuned version; any dtype the
        reader takes (F32, BF16, F16, F64).
    out : str or path
        The adapter directory to write (``adapter_model.safetensors`` and
        ``adapter_config.json``); written atomically, only once every layer
        has been fitted. It may not be empty, an input, a folder holding an
        input, the working directory or the home directory (refused before
        anything is read).
    method : str, default="global"
        A registered structure with a PEFT form (``get_structure(method).peft``):
        "global" (LoRA), "diagonal" (MELoRA, written as LoRA), "block"
        (Localized LoRA, written as GraLoRA), "hybrid" (GraLoRA with
        ``hybrid_r``; pass ``global_rank=``).
    n_blocks : int or (int, int), default=1
        Grid size (ignored by structures with a fixed grid, such as global).
    rank : int, optional
        Rank of every active block.
    budget_rank : int, optional
        A budget given as a LoRA-equivalent rank R: ``R * (m + n)`` parameters
        per m x n layer, spent with budget-optimal per-block ranks.
    total_budget : int, optional
        One total over all selected layers, spread over every block of every
        layer by gain-per-parameter water-filling (layout structures; the
        model-wide allocation of the checkpoint study). Layers that get no
        rank are left out and listed. Exactly one of ``rank``,
        ``budget_rank`` and ``total_budget``.
    target_modules : "all-linear", str or list of str, default="all-linear"
        Which layers, in PEFT's terms (see
        :func:`~blocklowrank.checkpoints.select_names`).
    peft_type : {"auto", "LORA", "GRALORA"}, default="auto"
        "auto": the structure's own PEFT type. "LORA" writes any layout
        exactly as a stacked LoRA (more parameters for grids).
    svd_solver : {"auto", "full", "randomized"}, default="auto"
        Passed to :func:`~blocklowrank.structures.approximate`.
    overwrite : bool, default=False
        Replace a non-empty ``out`` if it is an adapter directory (nothing
        else is ever replaced), in one atomic step.
    orientation : {"out_in", "in_out"}, optional
        How the checkpoints store their layers' weights, when their
        ``config.json`` does not say: ``"in_out"`` for transformers'
        ``Conv1D`` (GPT-2), ``"out_in"`` for ``nn.Linear`` (see
        :func:`~blocklowrank.checkpoints.pair_layers`).
    **options
        Further keywords of the structure's fit (e.g. ``global_rank``,
        ``max_iter`` for hybrid).

    Returns
    -------
    ExtractReport
        Per-layer errors and parameter counts, the pairing report (what was
        left out and why) and the adapter's config; ``str(report)`` is the
        summary the command line prints.

    Raises
    ------
    ValueError
        Bad options, no layer selected, no changed layer, a ``total_budget``
        below the cheapest rank, a layer that the adapter type cannot hold
        (GraLoRA: a shape not divisible by K, an embedding), ``nn.Linear``
        and ``Conv1D`` layers in one adapter, a layer whose storage cannot be
        told (see ``orientation``), or an ``out`` that would replace an
        input; the message names the layer. Nothing is written then.
    FileNotFoundError, CheckpointError
        A missing or unreadable checkpoint (pickle files are refused); a
        layer that is not floating-point or holds NaN/inf, or whose ΔW
        overflows (naming the file and the tensor).
    FileExistsError
        ``out`` is not empty and ``overwrite`` is False, or it is not an
        adapter directory.

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
    >>> rep.peft_type, rep.config["r"], round(rep.layers["layers.0.q_proj"]["error"], 6)
    ('LORA', 1, 0.0)
    >>> rep.pairing.excluded
    ['embed_tokens.weight']
    """
    t0 = time.perf_counter()
    structure = get_structure(method)
    n_blocks = _grid_size(structure, n_blocks, rank, budget_rank, total_budget)
    check_output_dir(out, inputs=_inputs(base, finetuned), overwrite=overwrite, replaceable=ADAPTER_FILES)
    base_ckpt, close_base = _open(base, "base")
    try:
        tuned_ckpt, close_tuned = _open(finetuned, "fine-tuned")
    except BaseException:
        if close_base:
            base_ckpt.close()
        raise
    try:
        pairing = pair_layers(base_ckpt, tuned_ckpt, target_modules, orientation=orientation)
        if not pairing.pairs:
            raise ValueError(
                f"no layer selected: target_modules={target_modules!r} matches no 2-D weight "
                f"present in both checkpoints with the same shape "
                f"({len(pairing.excluded)} excluded, {len(pairing.shape_mismatch)} shape mismatches)"
            )
        kind = _check_peft_fit(structure, n_blocks, pairing.pairs, peft_type)
        alloc = (
            None
            if total_budget is None
            else _model_wide_ranks(base_ckpt, tuned_ckpt, pairing, structure, n_blocks, total_budget)
        )
        size = {"rank": rank} if rank is not None else {"budget_rank": budget_rank, "alloc": alloc}
        fits, layers, unchanged = _fit_layers(base_ckpt, tuned_ckpt, pairing, structure, n_blocks, size,
                                              dict(options, svd_solver=svd_solver))  # fmt: skip
        if not fits:
            raise ValueError(
                f"no selected layer changed: the {len(unchanged)} layers chosen by "
                f"target_modules={target_modules!r} are equal in both checkpoints"
            )
        changed = changed_tensors(base_ckpt, tuned_ckpt, pairing.not_2d)
        inputs = _inputs(base, finetuned, base_ckpt, tuned_ckpt)
    finally:
        for ckpt, opened in ((base_ckpt, close_base), (tuned_ckpt, close_tuned)):
            if opened:
                ckpt.close()
    written = save_peft_adapter(
        out,
        fits,
        kinds={p.module: p.kind for p in pairing.pairs},
        peft_type=kind,
        overwrite=overwrite,
        protect=inputs,
        base_model_name_or_path=None if isinstance(base, Checkpoint) else os.fspath(base),
    )
    for name, info in written["layers"].items():
        layers[name]["n_params_written"] = info["n_params_written"]
    return ExtractReport(
        directory=written["directory"],
        peft_type=written["peft_type"],
        config=written["config"],
        layers=layers,
        pairing=pairing,
        unchanged=unchanged,
        changed_not_written=changed,
        n_params=written["n_params_effective"],
        n_params_written=written["n_params_written"],
        dense_params=sum(int(np.prod(v["shape"])) for v in layers.values()),
        seconds=time.perf_counter() - t0,
    )


def _fit_layers(base, tuned, pairing, structure, n_blocks, size, options):
    """Fit every changed layer, one in memory at a time: ``(fits, per-layer report, unchanged modules)``.

    ``size``: ``{"rank": r}``, or ``{"budget_rank": R, "alloc": None or per-layer block ranks}``.
    """
    alloc = size.get("alloc")
    fits, layers, unchanged = {}, {}, []
    for pair, delta in iter_deltas(base, tuned, pairing):
        if not np.any(delta) or (alloc is not None and not alloc[pair.name].any()):
            unchanged.append(pair.module)  # ΔW = 0, or no rank from the model-wide budget
            del delta
            continue
        if alloc is not None:
            layer_size = {"rank": alloc[pair.name]}
        elif "rank" in size:
            layer_size = {"rank": size["rank"]}
        else:
            layer_size = {"budget": int(size["budget_rank"]) * sum(pair.shape)}
        res = approximate(delta, method=structure.name, n_blocks=n_blocks, **layer_size, **options)
        fits[pair.module] = as_factors(res)
        layers[pair.module] = {
            "shape": tuple(pair.shape),
            "n_params": int(res.n_params),
            "error": float(res.error),
            "ranks": res.ranks.tolist(),
        }
        del delta, res  # before the next layer is read: one layer in memory, not two
    return fits, layers, unchanged

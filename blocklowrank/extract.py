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
written. Nothing here imports torch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from ._engine import block_spectra
from .checkpoints import ALL_LINEAR, Checkpoint, iter_deltas, pair_layers
from .checkpoints._select import _listing
from .convert import as_factors
from .peft import PEFT_TYPES, _gralora_fits, _open, save_peft_adapter
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
    for pair in pairs:
        layout = structure.layout(tuple(pair.shape), n_blocks)
        if kind != "GRALORA":
            continue
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


def _changed(base, finetuned, names):
    """The tensors among ``names`` whose values differ between the two checkpoints."""
    return [
        n
        for n in names
        if not np.array_equal(np.asarray(base.get(n), np.float64), np.asarray(finetuned.get(n), np.float64))
    ]


def _check_out(out, overwrite):
    out = os.path.abspath(os.fspath(out))
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} exists and is not a directory")
    return out


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
        has been fitted.
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
        Replace a non-empty ``out``.
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
        Bad options, no layer selected, no changed layer, or a layer that the
        adapter type cannot hold (GraLoRA: a shape not divisible by K); the
        message names the layer. Nothing is written then.
    FileNotFoundError, CheckpointError
        A missing or unreadable checkpoint (pickle files are refused).
    FileExistsError
        ``out`` is not empty and ``overwrite`` is False.

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
    out = _check_out(out, overwrite)
    base_ckpt, close_base = _open(base, "base")
    try:
        tuned_ckpt, close_tuned = _open(finetuned, "fine-tuned")
    except BaseException:
        if close_base:
            base_ckpt.close()
        raise
    try:
        pairing = pair_layers(base_ckpt, tuned_ckpt, target_modules)
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
        fits, layers, unchanged = {}, {}, []
        for pair, delta in iter_deltas(base_ckpt, tuned_ckpt, pairing):
            if not np.any(delta) or (alloc is not None and not alloc[pair.name].any()):
                unchanged.append(pair.module)  # ΔW = 0, or no rank from the model-wide budget
                del delta
                continue
            if alloc is not None:
                size = {"rank": alloc[pair.name]}
            else:
                size = {"rank": rank} if rank is not None else {"budget": int(budget_rank) * sum(pair.shape)}
            res = approximate(delta, method=structure.name, n_blocks=n_blocks, svd_solver=svd_solver, **size, **options)
            fits[pair.module] = as_factors(res)
            layers[pair.module] = {
                "shape": tuple(pair.shape),
                "n_params": int(res.n_params),
                "error": float(res.error),
                "ranks": res.ranks.tolist(),
            }
            del delta, res  # before the next layer is read: one layer in memory, not two
        if not fits:
            raise ValueError(
                f"no selected layer changed: the {len(unchanged)} layers chosen by "
                f"target_modules={target_modules!r} are equal in both checkpoints"
            )
        changed = _changed(base_ckpt, tuned_ckpt, pairing.not_2d)
    finally:
        for ckpt, opened in ((base_ckpt, close_base), (tuned_ckpt, close_tuned)):
            if opened:
                ckpt.close()
    written = save_peft_adapter(
        out,
        fits,
        peft_type=kind,
        overwrite=overwrite,
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

"""Selecting layers of a checkpoint and pairing a base model with its fine-tuned version.

Layers are chosen with PEFT's ``target_modules`` terms, applied to tensor
names: a tensor ``<module>.weight`` belongs to the module ``<module>`` (its
*module path*); other tensors (biases, norms' ``.bias``, buffers) are never
layers.

- a list of suffixes, e.g. ``["q_proj", "v_proj"]`` or ``["attn.c_proj"]``:
  a module path matches if it equals a suffix or ends with ``"." + suffix``;
- a string other than ``"all-linear"``: a regular expression that must match
  the whole module path (``re.fullmatch``), as in PEFT;
- ``"all-linear"`` (any case): every 2-D weight except embeddings, output heads
  and adapter factors. PEFT picks ``nn.Linear``/``Conv1D`` modules and drops
  the output embedding; without the model we go by name. A 2-D weight is
  left out when the last part of its module path contains ``embed``
  (``embed_tokens``, ``word_embeddings``, ``embed_positions``, ``embed_out``)
  or is one of ``wte``, ``wpe``, ``shared``, ``relative_attention_bias``,
  ``lm_head``, ``output_layer``; when the module path is exactly ``output``
  (the head of Meta-format Llama); or when any part of it is an adapter factor
  (``lora_A``, ``lora_B``, ...), since those are pieces of a ΔW, not layers.
  Classification heads (``classifier``, ``score``) stay in, as in PEFT
  outside sequence classification.

:func:`pair_layers` sorts every tensor of the two checkpoints into exactly one
group of a :class:`PairingReport` (nothing is dropped silently), and
:func:`iter_deltas` streams ``ΔW = W_finetuned - W_base`` one layer at a time.

Examples
--------
>>> import tempfile, pathlib
>>> import numpy as np
>>> from blocklowrank.checkpoints import open_checkpoint, save_file
>>> tmp = tempfile.TemporaryDirectory()
>>> folder = pathlib.Path(tmp.name)
>>> w = {"embed_tokens.weight": np.zeros((10, 4)), "layers.0.q_proj.weight": np.eye(4),
...      "layers.0.q_proj.bias": np.zeros(4), "lm_head.weight": np.zeros((10, 4))}
>>> base = open_checkpoint(save_file(folder / "base.safetensors", w))
>>> w["layers.0.q_proj.weight"] = 2 * np.eye(4)
>>> tuned = open_checkpoint(save_file(folder / "tuned.safetensors", w, dtypes="BF16"))
>>> report = pair_layers(base, tuned)
>>> [pair.module for pair in report.pairs], report.excluded, report.not_2d
(['layers.0.q_proj'], ['embed_tokens.weight', 'lm_head.weight'], ['layers.0.q_proj.bias'])
>>> for pair, delta in iter_deltas(base, tuned, report):
...     print(pair.name, delta.dtype, np.diag(delta))
layers.0.q_proj.weight float64 [1. 1. 1. 1.]
>>> print(report.summary())
1 layer pairs (16 weights) selected by target_modules='all-linear'
  not 2-D (1): layers.0.q_proj.bias
  excluded by target_modules (2): embed_tokens.weight, lm_head.weight
>>> base.close(); tuned.close(); tmp.cleanup()
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ._safetensors import _error

__all__ = ["ALL_LINEAR", "select_names", "module_of", "LayerPair", "PairingReport", "pair_layers", "iter_deltas"]

#: The ``target_modules`` shorthand for every linear layer.
ALL_LINEAR = "all-linear"

_NOT_LINEAR = frozenset({"wte", "wpe", "shared", "relative_attention_bias", "lm_head", "output_layer"})
_TOP_LEVEL_HEADS = frozenset({"output"})
_ADAPTER_PARTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"})
_WEIGHT = ".weight"


def module_of(name):
    """Return the module path of a weight tensor name, or None for other tensors.

    Examples
    --------
    >>> module_of("model.layers.0.self_attn.q_proj.weight"), module_of("lm_head.bias")
    ('model.layers.0.self_attn.q_proj', None)
    """
    if name.endswith(_WEIGHT) and len(name) > len(_WEIGHT):
        return name[: -len(_WEIGHT)]
    return None


def _is_linear(module):
    """The ``all-linear`` rule on a module path (the 2-D test is made by the caller)."""
    parts = module.split(".")
    last = parts[-1]
    return not (
        "embed" in last.lower()
        or last in _NOT_LINEAR
        or module in _TOP_LEVEL_HEADS
        or not _ADAPTER_PARTS.isdisjoint(parts)
    )


def _matcher(target_modules):
    """Return (is_all_linear, predicate on module paths) for a ``target_modules`` value."""
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            return True, _is_linear
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression ({exc})") from None
        return False, lambda module: pattern.fullmatch(module) is not None
    if isinstance(target_modules, Iterable) and not isinstance(target_modules, Mapping):
        suffixes = tuple(target_modules)
        if not all(isinstance(suffix, str) and suffix for suffix in suffixes):
            raise TypeError(f"target_modules must hold non-empty module names, got {suffixes!r}")
        return False, lambda module: any(module == s or module.endswith("." + s) for s in suffixes)
    raise TypeError(
        "target_modules must be 'all-linear', a regular expression or a list of module names, "
        f"got {type(target_modules).__name__}"
    )


def select_names(names, target_modules=ALL_LINEAR, *, shapes=None):
    """Return the weight names chosen by ``target_modules``, in the order given.

    Parameters
    ----------
    names : iterable of str
        Tensor names, e.g. ``Checkpoint.names()``.
    target_modules : "all-linear", str or list of str, default="all-linear"
        A list of module-name suffixes, a regular expression matched against
        the whole module path, or ``"all-linear"`` (see the module notes).
    shapes : mapping of str to tuple, optional
        Shapes by name; with them only 2-D weights are chosen. Required for
        ``"all-linear"``.

    Returns
    -------
    selected : list of str
        The chosen tensor names (all ending in ``.weight``).

    Examples
    --------
    >>> names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
    ...          "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.bias"]
    >>> select_names(names, ["q_proj", "mlp.up_proj"])
    ['model.layers.0.self_attn.q_proj.weight', 'model.layers.0.mlp.up_proj.weight']
    >>> select_names(names, r".*\\.(q|v)_proj")
    ['model.layers.0.self_attn.q_proj.weight', 'model.layers.0.self_attn.v_proj.weight']
    """
    all_linear, matches = _matcher(target_modules)
    if all_linear and shapes is None:
        raise ValueError("target_modules='all-linear' needs the shapes of the tensors (pass shapes=)")
    selected = []
    for name in names:
        module = module_of(name)
        if module is None or not matches(module):
            continue
        if shapes is not None:
            if name not in shapes:
                raise ValueError(f"shapes has no entry for tensor {name!r}")
            if len(shapes[name]) != 2:
                continue
        selected.append(name)
    return selected


class LayerPair(NamedTuple):
    """One layer to compare: tensor name, module path and (common) shape."""

    name: str
    module: str
    shape: tuple


def _listing(title, items, max_names):
    shown = ", ".join(map(str, items[:max_names]))
    more = f", ... and {len(items) - max_names} more" if len(items) > max_names else ""
    return f"  {title} ({len(items)}): {shown}{more}"


@dataclass(frozen=True)
class PairingReport:
    """Where every tensor of a base and a fine-tuned checkpoint went.

    Each tensor name lands in exactly one list.

    Attributes
    ----------
    pairs : list of LayerPair
        Selected 2-D weights present in both with equal shapes, in the base's order.
    only_in_base, only_in_finetuned : list of str
        Tensors present in one checkpoint only.
    shape_mismatch : list of (str, tuple, tuple)
        ``(name, base_shape, finetuned_shape)``, e.g. a resized vocabulary.
    not_2d : list of str
        Tensors in both, of equal shape, that are not matrices (biases, norms).
    excluded : list of str
        2-D tensors in both that ``target_modules`` left out.
    target_modules : object
        The selection used.
    """

    pairs: list
    only_in_base: list
    only_in_finetuned: list
    shape_mismatch: list
    not_2d: list
    excluded: list
    target_modules: object = ALL_LINEAR

    def summary(self, max_names=5):
        """Return a short multi-line account of the pairing."""
        n_weights = sum(int(np.prod(pair.shape)) for pair in self.pairs)
        lines = [
            f"{len(self.pairs)} layer pairs ({n_weights:,} weights) selected by target_modules={self.target_modules!r}"
        ]
        mismatches = [f"{name} {base} vs {tuned}" for name, base, tuned in self.shape_mismatch]
        groups = [
            ("only in base", self.only_in_base),
            ("only in fine-tuned", self.only_in_finetuned),
            ("shape mismatch", mismatches),
            ("not 2-D", self.not_2d),
            ("excluded by target_modules", self.excluded),
        ]
        lines += [_listing(title, items, max_names) for title, items in groups if items]
        unpaired = self.only_in_base + self.only_in_finetuned
        if not self.pairs and any(not _ADAPTER_PARTS.isdisjoint(name.split(".")) for name in unpaired):
            lines.append(
                "  hint: one checkpoint looks like a PEFT adapter (lora_A/lora_B names); "
                "merge it into its base model first"
            )
        return "\n".join(lines)


def _shapes(checkpoint):
    return {name: checkpoint.info(name).shape for name in checkpoint.names()}


def pair_layers(base, finetuned, target_modules=ALL_LINEAR):
    """Pair the layers of a base checkpoint with those of its fine-tuned version.

    Parameters
    ----------
    base : Checkpoint
    finetuned : Checkpoint or None
        None pairs ``base`` with itself (to compress the weights themselves).
    target_modules : "all-linear", str or list of str, default="all-linear"
        Which layers to pair: see :func:`select_names`.

    Returns
    -------
    report : PairingReport
        The pairs, and every tensor that was not paired with the reason.
        Only headers are read.
    """
    base_shapes = _shapes(base)
    tuned_shapes = base_shapes if finetuned is None else _shapes(finetuned)
    selected = set(select_names(base_shapes, target_modules, shapes=base_shapes))
    groups = {key: [] for key in ("pairs", "only_in_base", "shape_mismatch", "not_2d", "excluded")}
    for name, shape in base_shapes.items():
        if name not in tuned_shapes:
            groups["only_in_base"].append(name)
        elif tuned_shapes[name] != shape:
            groups["shape_mismatch"].append((name, shape, tuned_shapes[name]))
        elif len(shape) != 2:
            groups["not_2d"].append(name)
        elif name not in selected:
            groups["excluded"].append(name)
        else:
            groups["pairs"].append(LayerPair(name, module_of(name), shape))
    only_in_finetuned = [name for name in tuned_shapes if name not in base_shapes]
    return PairingReport(only_in_finetuned=only_in_finetuned, target_modules=target_modules, **groups)


def _layer(base, finetuned, pair, dtype):
    """ΔW (or W when ``finetuned`` is None) of one pair, computed in ``dtype`` or float64."""
    infos = [ckpt.info(pair.name) for ckpt in (base, finetuned) if ckpt is not None]
    for info in infos:
        if info.shape != tuple(pair.shape):
            raise _error(info.file, f"shape {info.shape} differs from the pair's {tuple(pair.shape)}", pair.name)
    if any(info.dtype == "F64" for info in infos):
        dtype = np.dtype(np.float64)
    # Read chunk by chunk into the one full-size result: no second copy of the
    # layer, and no page of either file stays resident (see Checkpoint._read_into).
    delta = (base if finetuned is None else finetuned)._read_into(pair.name, np.empty(pair.shape, dtype))
    if finetuned is not None:
        base._read_into(pair.name, delta, subtract=True)
    return delta


def _stream(base, finetuned, pairs, dtype):
    for pair in pairs:
        layer = _layer(base, finetuned, pair, dtype)
        yield pair, layer
        del layer  # drop our reference before the next layer is read


def iter_deltas(base, finetuned, pairs, *, dtype=np.float32):
    """Stream ``ΔW = W_finetuned - W_base`` one layer at a time.

    Parameters
    ----------
    base : Checkpoint
    finetuned : Checkpoint or None
        With None, yield the base weights ``W`` themselves.
    pairs : PairingReport or iterable of LayerPair
        The layers, e.g. ``pair_layers(base, finetuned).pairs``.
    dtype : {float32, float64}, default=float32
        Precision of the result; float64 is used for a layer whenever either
        checkpoint stores it as F64.

    Yields
    ------
    pair : LayerPair
    delta : ndarray of shape ``pair.shape``
        A new writable array; only this layer is held in memory (the files are
        read chunk by chunk, never memory-mapped into the resident set). The
        loop variable still holds the previous layer while the next one is
        read: ``del delta`` at the end of the loop body keeps one layer, not two.

    Raises
    ------
    CheckpointError
        If a layer's shape differs from its pair's (checked as each is read).
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    pairs = pairs.pairs if isinstance(pairs, PairingReport) else list(pairs)
    return _stream(base, finetuned, pairs, dtype)

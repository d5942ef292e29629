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

What a layer is (``nn.Linear``, transformers' ``Conv1D``, ``nn.Embedding``),
and so how its weight is stored, is decided once when it is paired, from the
model's own description (its ``config.json``; see
:func:`pair_layers`), and carried by its :class:`LayerPair`: every ΔW is
yielded as ``(out_features, in_features)`` whatever the storage, so what
fits, counts and writes it never sees the difference. A selected layer must be
a floating-point matrix (F16, BF16, F32, F64) holding finite values, and ΔW
must be finite in the precision asked for: anything else is refused naming
the file and the tensor.

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

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ._dtypes import DTYPES, bf16_to_float32
from ._orientation import KINDS, layer_kinds, model_config
from ._safetensors import _error

__all__ = [
    "ALL_LINEAR",
    "select_names",
    "module_of",
    "LayerPair",
    "PairingReport",
    "pair_layers",
    "iter_deltas",
    "changed_tensors",
]

#: The ``target_modules`` shorthand for every linear layer.
ALL_LINEAR = "all-linear"

_NOT_LINEAR = frozenset({"wte", "wpe", "shared", "relative_attention_bias", "lm_head", "output_layer"})
_TOP_LEVEL_HEADS = frozenset({"output"})
_ADAPTER_PARTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"})
_WEIGHT = ".weight"
_FLOATS = ("F16", "BF16", "F32", "F64")
_CHECK_ELEMENTS = 1 << 20  # finiteness is checked this many elements at a time (no full-size mask)


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
    """One layer to compare.

    Attributes
    ----------
    name : str
        The weight's tensor name, ``<module>.weight``.
    module : str
        Its module path.
    shape : tuple of int
        The layer's ``(out_features, in_features)``: the shape of the ΔW
        :func:`iter_deltas` yields, whatever the storage.
    kind : {"linear", "conv1d", "embedding"}, default="linear"
        ``nn.Linear`` stores ``(out, in)``; transformers' ``Conv1D`` and
        ``nn.Embedding`` store the transpose (``stored_shape``).
    """

    name: str
    module: str
    shape: tuple
    kind: str = "linear"

    @property
    def transposed(self):
        """Whether the checkpoint stores the weight as ``(in_features, out_features)``."""
        return self.kind != "linear"

    @property
    def stored_shape(self):
        """The weight's shape in the checkpoint."""
        return tuple(reversed(self.shape)) if self.transposed else tuple(self.shape)


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


def _check_float(checkpoints, name):
    """Refuse a selected weight that is not a floating-point matrix, naming the file, tensor and dtype."""
    for ckpt in checkpoints:
        info = ckpt.info(name)
        if info.dtype not in _FLOATS:
            spec = DTYPES[info.dtype]
            what = f"{info.dtype} ({spec.numpy.name})" if spec.numpy is not None else f"{info.dtype} (no NumPy type)"
            raise _error(
                info.file,
                f"dtype {what} is not a floating-point weight ({', '.join(_FLOATS)}): a quantized, integer, bool "
                "or complex layer is not a matrix to approximate; dequantize the checkpoint or leave the layer "
                "out with target_modules",
                name,
            )


def pair_layers(base, finetuned, target_modules=ALL_LINEAR, *, orientation=None, fallback=None):
    """Pair the layers of a base checkpoint with those of its fine-tuned version.

    Parameters
    ----------
    base : Checkpoint
    finetuned : Checkpoint or None
        None pairs ``base`` with itself (to compress the weights themselves).
    target_modules : "all-linear", str or list of str, default="all-linear"
        Which layers to pair: see :func:`select_names`.
    orientation : {"out_in", "in_out"}, optional
        How the weights of the layers that are not embeddings are stored:
        ``"out_in"`` as ``nn.Linear``, ``"in_out"`` as transformers'
        ``Conv1D`` (GPT-2). By default this is decided from the model's
        ``config.json`` beside the checkpoint (``model_type``); without one,
        a layer named like GPT-2's ``Conv1D`` layers (``c_attn``,
        ``c_proj``, ``c_fc``, ``q_attn``) is refused. Given with a
        ``config.json``, it must agree with it.
    fallback : {"out_in", "in_out"}, optional
        Used where neither ``orientation`` nor a ``config.json`` decides
        (e.g. a PEFT adapter's ``fan_in_fan_out``).

    Returns
    -------
    report : PairingReport
        The pairs (each with its kind and its ``(out, in)`` shape), and every
        tensor that was not paired with the reason. Only headers (and
        ``config.json``) are read.

    Raises
    ------
    CheckpointError
        A selected weight that is not of a floating-point dtype (F16, BF16,
        F32, F64): integer codes of a quantized model, bool, complex.
    ValueError
        A layer whose storage cannot be told (see ``orientation``).
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
            _check_float([c for c in (base, finetuned) if c is not None], name)
            groups["pairs"].append(name)
    configs = [(str(c.path.parent / "config.json"), model_config(c)) for c in (base, finetuned) if c is not None]
    kinds = layer_kinds([module_of(n) for n in groups["pairs"]], configs, orientation, fallback)
    groups["pairs"] = [_pair(name, base_shapes[name], kinds[module_of(name)]) for name in groups["pairs"]]
    only_in_finetuned = [name for name in tuned_shapes if name not in base_shapes]
    return PairingReport(only_in_finetuned=only_in_finetuned, target_modules=target_modules, **groups)


def _pair(name, stored_shape, kind):
    """The LayerPair of a weight stored with ``stored_shape`` by a layer of ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    shape = tuple(stored_shape) if kind == "linear" else tuple(reversed(stored_shape))
    return LayerPair(name, module_of(name), shape, kind)


def _nonfinite(ckpt, name):
    """Whether tensor ``name`` holds a NaN or an infinity (read chunk by chunk)."""
    info = ckpt.info(name)
    for _, chunk in ckpt._chunks(name, chunk_bytes=_CHECK_ELEMENTS * 4):
        values = bf16_to_float32(chunk) if info.dtype == "BF16" else chunk
        if not np.isfinite(values).all():
            return True
    return False


def _check_finite(base, finetuned, pair, delta):
    """Refuse a ΔW (or W) that is not finite, naming the file and tensor to blame."""
    flat = np.ravel(delta, order="K")  # a view: the layer in memory order
    if all(np.isfinite(flat[s : s + _CHECK_ELEMENTS]).all() for s in range(0, flat.size, _CHECK_ELEMENTS)):
        return
    for ckpt in (finetuned, base):
        if ckpt is not None and _nonfinite(ckpt, pair.name):
            raise _error(ckpt.info(pair.name).file, "holds NaN or infinite values; a layer must be finite", pair.name)
    raise _error(
        (finetuned or base).info(pair.name).file,
        f"ΔW = fine-tuned - base overflows {delta.dtype} although both weights are finite; "
        "it needs float64 (iter_deltas(..., dtype=numpy.float64)), and an adapter in float32 cannot hold it",
        pair.name,
    )


def _layer(base, finetuned, pair, dtype, digests=None):
    """ΔW (or W when ``finetuned`` is None) of one pair as ``(out, in)``, computed in ``dtype`` or float64.

    ``digests``, if given, gets ``{"base": sha256, "finetuned": sha256}`` of the stored bytes read.
    """
    infos = [ckpt.info(pair.name) for ckpt in (base, finetuned) if ckpt is not None]
    for info in infos:
        if info.shape != pair.stored_shape:
            raise _error(info.file, f"shape {info.shape} differs from the pair's {pair.stored_shape}", pair.name)
    if any(info.dtype == "F64" for info in infos):
        dtype = np.dtype(np.float64)
    sides = [("base", base)] if finetuned is None else [("finetuned", finetuned), ("base", base)]
    hashers = {role: hashlib.sha256() if digests is not None else None for role, _ in sides}
    # Read chunk by chunk into the one full-size result: no second copy of the
    # layer, and no page of either file stays resident (see Checkpoint._read_into).
    delta = np.empty(pair.stored_shape, dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # checked below, naming the layer
        for t, (role, ckpt) in enumerate(sides):
            ckpt._read_into(pair.name, delta, subtract=t > 0, hasher=hashers[role])
    if digests is not None:
        digests.clear()
        digests.update({role: h.hexdigest() for role, h in hashers.items()})
    delta = delta.T if pair.transposed else delta  # (out, in) for every layer: a view, no copy
    _check_finite(base, finetuned, pair, delta)
    return delta


def _stream(base, finetuned, pairs, dtype, digests):
    for pair in pairs:
        layer = _layer(base, finetuned, pair, dtype, digests)
        yield pair, layer
        del layer  # drop our reference before the next layer is read


def iter_deltas(base, finetuned, pairs, *, dtype=np.float32, digests=None):
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
    digests : dict, optional
        If given, cleared and filled before each layer is yielded with the
        SHA-256 of the bytes read for it: ``{"base": ..., "finetuned": ...}``
        (``{"base": ...}`` without ``finetuned``), computed as they stream.

    Yields
    ------
    pair : LayerPair
    delta : ndarray of shape ``pair.shape`` (out_features, in_features)
        A new writable array (for a layer stored transposed, such as GPT-2's
        ``Conv1D``, a transposed view of it); only this layer is held in
        memory (the files are read chunk by chunk, never memory-mapped into
        the resident set). The loop variable still holds the previous layer
        while the next one is read: ``del delta`` at the end of the loop body
        keeps one layer, not two.

    Raises
    ------
    CheckpointError
        If a layer's shape differs from its pair's, a weight holds NaN or
        infinity, or ΔW overflows ``dtype`` (checked as each is read; the
        message names the file and the tensor).
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    pairs = pairs.pairs if isinstance(pairs, PairingReport) else list(pairs)
    return _stream(base, finetuned, pairs, dtype, digests)


def _same_values(a, b):
    """Equal values, NaN equal to NaN (for tensors stored with different dtypes)."""
    same = a == b
    if a.dtype.kind in "fc" and b.dtype.kind in "fc":
        same |= np.isnan(a) & np.isnan(b)
    return bool(same.all())


def _decoded(ckpt, name, elements):
    """The values of tensor ``name``, ``elements`` at a time (BF16 decoded to float32)."""
    info = ckpt.info(name)
    for _, chunk in ckpt._chunks(name, chunk_bytes=elements * DTYPES[info.dtype].numpy.itemsize):
        yield bf16_to_float32(chunk) if info.dtype == "BF16" else chunk


def changed_tensors(base, finetuned, names, *, chunk_bytes=1 << 20):
    """The tensors among ``names`` whose values differ between two checkpoints, read chunk by chunk.

    Same dtype: the stored bytes are compared, so identical bits are
    unchanged (NaN included). Different dtypes: the decoded values are
    compared, NaN equal to NaN. Memory: two chunks of about ``chunk_bytes``,
    whatever the tensors' sizes. A tensor of a dtype NumPy cannot read (FP8)
    raises CheckpointError naming it.
    """
    changed = []
    for name in names:
        a, b = base.info(name), finetuned.info(name)
        if a.shape != b.shape:
            changed.append(name)
            continue
        if a.dtype == b.dtype:
            pairs = zip(base._chunks(name, chunk_bytes=chunk_bytes), finetuned._chunks(name, chunk_bytes=chunk_bytes))
            same = all(np.array_equal(x.view(np.uint8), y.view(np.uint8)) for (_, x), (_, y) in pairs)
        else:
            elements = max(1, chunk_bytes // 8)
            pairs = zip(_decoded(base, name, elements), _decoded(finetuned, name, elements))
            same = all(_same_values(x, y) for x, y in pairs)
        if not same:
            changed.append(name)
    return changed

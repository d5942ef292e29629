"""Reading PEFT LoRA and GraLoRA adapters: what PEFT applies, or a clear refusal (see :mod:`blocklowrank.peft`)."""

from __future__ import annotations

import os
import re

import numpy as np

from .._io import read_json
from ..checkpoints import Checkpoint, LayerPair, layer_kinds, model_config, open_checkpoint
from ..convert import from_gralora
from ..factors import StructuredFactors
from ..layout import BlockLayout
from ._config import check_config, pattern_value, targeted

__all__ = ["load_peft_adapter", "adapter_pairs", "adapter_deltas", "ADAPTER_WEIGHTS", "ADAPTER_CONFIG", "PREFIX"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
_LORA_KEYS = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_embedding_A": "embedding_A",
    "lora_embedding_B": "embedding_B",
}
_GRALORA_KEYS = {
    "gralora_A": "A",
    "gralora_B": "B",
    "gralora_A_general.weight": "A_general",
    "gralora_B_general.weight": "B_general",
}
_MODULE = re.compile(r"[\w\-]+(\.[\w\-]+)*")
_MAX_MODULE = 512  # characters of a module path read from a file


def _saved_whole(key, config):
    """Whether ``key`` belongs to a module of the config's ``modules_to_save`` (PEFT: a path ending with a name)."""
    names = config.get("modules_to_save") or []
    if not isinstance(names, list) or not key.startswith(PREFIX):
        return False
    parts = key[len(PREFIX) :].split(".")[:-1]
    paths = [".".join(parts[: t + 1]) for t in range(len(parts))]
    return any(isinstance(n, str) and n and p.endswith(n) for n in names for p in paths)


def _group_keys(ckpt, suffixes, wpath, config=None):
    """``{module: {role: key}}`` from the checkpoint's keys, each ``PREFIX<module>.<suffix>``.

    Tensors of modules carried whole (the config's ``modules_to_save``) are
    not updates of a layer: they are skipped.
    """
    modules = {}
    for key in ckpt.names():
        if config is not None and _saved_whole(key, config):
            continue
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if suffix is None or not key.startswith(PREFIX):
            raise ValueError(f"{wpath}: key {key!r} is not a {'/'.join(suffixes)} weight of this adapter type")
        module = key[len(PREFIX) : -len(suffix) - 1]
        if len(module) > _MAX_MODULE or not _MODULE.fullmatch(module):
            raise ValueError(f"{wpath}: key {key[:80]!r} does not name a module path")
        modules.setdefault(module, {})[suffixes[suffix]] = key
    if not modules:
        raise ValueError(f"{wpath}: the file holds no adapter weights")
    return modules


def _get(ckpt, key, shape, wpath):
    """Tensor ``key`` as float64-compatible array, checked against ``shape`` (None = any size)."""
    a = ckpt.get(key)
    if a.dtype.kind != "f":
        raise ValueError(f"{wpath}: tensor {key!r} has dtype {a.dtype}, not a floating type")
    a = np.array(a, dtype=np.result_type(a.dtype, np.float32))  # a copy, off the memory map
    if a.ndim != len(shape) or any(s is not None and s != t for s, t in zip(shape, a.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{wpath}: tensor {key!r} has shape {list(a.shape)}, the config implies {want}")
    if not np.isfinite(a).all():
        raise ValueError(f"{wpath}: tensor {key!r} holds NaN or infinite values")
    return a


def _global(B, A):
    """``B A`` as a global (1 x 1) layout; a rank above ``min(out, in)`` is reduced exactly (SVD of ``B A``)."""
    shape = (B.shape[0], A.shape[1])
    r = B.shape[1]
    if r > min(shape):  # PEFT allows it; the product has rank <= min(out, in)
        U, s, Vt = np.linalg.svd(B.astype(np.float64) @ A.astype(np.float64), full_matrices=False)
        dtype = np.result_type(B.dtype, A.dtype)
        B, A, r = (U * s).astype(dtype), Vt.astype(dtype), min(shape)
    return StructuredFactors(BlockLayout.global_(shape, rank=r), {(0, 0): (B, A)})


def _lora_module(ckpt, cfg, module, roles, wpath):
    """``(factors of ΔW as (out, in), kind)`` of one LoRA module ("embedding" for lora_embedding_A/B keys)."""
    embedding = "embedding_A" in roles or "embedding_B" in roles
    need = ("embedding_A", "embedding_B") if embedding else ("A", "B")
    for role in need:
        if role not in roles:
            key = next(k for k, v in _LORA_KEYS.items() if v == role)
            raise ValueError(f"{wpath}: module {module!r} has no {key}")
    if set(roles) - set(need):
        raise ValueError(f"{wpath}: module {module!r} mixes lora_A/lora_B with lora_embedding_A/B keys")
    if not targeted(cfg, module):
        raise ValueError(f"{wpath}: key {roles[need[0]]!r} is for a module outside the config's target_modules")
    r = int(pattern_value(cfg, "rank_pattern", module, cfg["r"]))
    alpha = float(pattern_value(cfg, "alpha_pattern", module, cfg["lora_alpha"]))
    A = _get(ckpt, roles[need[0]], (r, None), wpath)  # [r, in] (in = num_embeddings for an embedding)
    B = _get(ckpt, roles[need[1]], (None, r), wpath)  # [out, r]
    scale = alpha / np.sqrt(r) if cfg["use_rslora"] else alpha / r
    kind = "embedding" if embedding else ("conv1d" if cfg["fan_in_fan_out"] else "linear")
    return _global(B * scale, A), kind


def _read_lora(ckpt, cfg, wpath):
    modules = _group_keys(ckpt, _LORA_KEYS, wpath, cfg)
    return {module: _lora_module(ckpt, cfg, module, roles, wpath) for module, roles in modules.items()}


def _read_gralora(ckpt, cfg, wpath):
    K, r, hr = cfg["gralora_k"], cfg["r"], cfg["hybrid_r"]
    scale = float(cfg["alpha"]) / (r + hr)
    kind = "conv1d" if cfg["fan_in_fan_out"] else "linear"
    out = {}
    for module, roles in _group_keys(ckpt, _GRALORA_KEYS, wpath, cfg).items():
        need = ("A", "B", "A_general", "B_general") if hr else ("A", "B")
        for role in need:
            if role not in roles:
                raise ValueError(f"{wpath}: module {module!r} has no {PREFIX}{module}.gralora_{role}")
        extra = set(roles) - set(need)
        if extra:
            raise ValueError(f"{wpath}: key {roles[min(extra)]!r} is unexpected with hybrid_r={hr}")
        if not targeted(cfg, module):
            raise ValueError(f"{wpath}: key {roles['A']!r} is for a module outside the config's target_modules")
        A = _get(ckpt, roles["A"], (K, None, r), wpath)
        B = _get(ckpt, roles["B"], (K, r, None), wpath)
        general = {}
        if hr:
            n, m = K * A.shape[1], K * B.shape[2]
            general["gralora_A_general"] = _get(ckpt, roles["A_general"], (hr, n), wpath)
            general["gralora_B_general"] = _get(ckpt, roles["B_general"], (m, hr), wpath)
        out[module] = from_gralora(A, B, scaling=scale, **general), kind
    return out


def _whole_module_names(config, path):
    """The config's ``modules_to_save`` (modules PEFT carries whole, not updates), checked: names, a few hundred."""
    names = config.get("modules_to_save") or []
    if not isinstance(names, list) or len(names) > 1000:
        raise ValueError(f"{path}: 'modules_to_save' must be a list of module names")
    for name in names:
        if not isinstance(name, str) or not name or len(name) > _MAX_MODULE:
            raise ValueError(f"{path}: 'modules_to_save' holds {str(name)[:80]!r}, not a module name")
    return names


def _read(directory):
    """``({module: (factors of ΔW as (out, in), kind)}, config, checked fields)`` of an adapter directory."""
    directory = os.fspath(directory)
    cpath, wpath = os.path.join(directory, ADAPTER_CONFIG), os.path.join(directory, ADAPTER_WEIGHTS)
    for path in (cpath, wpath):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing")
    config = read_json(cpath, constants=True)  # PEFT writes with Python's json: NaN is refused by field, below
    cfg = check_config(config, cpath)
    cfg["modules_to_save"] = _whole_module_names(config, cpath)
    readers = {"LORA": _read_lora, "GRALORA": _read_gralora}
    with open_checkpoint(wpath) as ckpt:
        return readers[cfg["peft_type"]](ckpt, cfg, wpath), config, cfg


def load_peft_adapter(directory):
    """Read a PEFT LoRA or GraLoRA adapter directory into our factors: what PEFT applies, or an error.

    Parameters
    ----------
    directory : str or path
        Holding ``adapter_config.json`` and ``adapter_model.safetensors``
        (as written by PEFT's ``save_pretrained`` or by
        :func:`save_peft_adapter`).

    Returns
    -------
    layers : dict of str to StructuredFactors
        Module path (without PEFT's ``base_model.model.`` prefix) to the
        layer's update ΔW **in the orientation of the module's stored
        weight**, PEFT's scale folded in: what PEFT's ``get_delta_weight``
        returns and ``merge`` adds to the weight. That is ``s B A`` of shape
        ``(out_features, in_features)`` for ``nn.Linear``; its transpose,
        ``(in_features, out_features)``, for a ``fan_in_fan_out`` adapter
        (transformers' ``Conv1D``, GPT-2) and for an embedding
        (``lora_embedding_A``/``lora_embedding_B``, stored as
        ``(num_embeddings, embedding_dim)``). LoRA gives a 1 x 1 layout of rank
        ``r`` (``min(out, in)`` when ``r`` is larger: the exact product, reduced);
        GraLoRA a full ``gralora_k`` grid of rank ``r / gralora_k`` per block
        plus the hybrid term.
    config : dict
        The adapter's config as stored.

    Raises
    ------
    FileNotFoundError
        When a file is missing.
    ValueError
        When the config or the tensors are not a LoRA/GraLoRA adapter whose
        update is ``s B A``, or keys or shapes do not match the config; the
        message names the file and the field or key. The config is parsed
        strictly (no NaN/Infinity, no key twice) and every field that changes
        the update is checked (:data:`~blocklowrank.peft.LORA_FIELDS`): a
        non-finite or non-positive ``lora_alpha``/``alpha_pattern``, an
        ``init_lora_weights`` that rewrote the base model (PiSSA, OLoRA,
        CorDA, LoRA-GA: with PEFT's conversion to plain LoRA; LoftQ), DoRA,
        LoRA biases and other LoRA variants are refused. Patterns
        (``target_modules``, ``rank_pattern``, ``alpha_pattern``) are matched
        without backtracking: a forged one cannot hang the reader.
    """
    read, config, _ = _read(directory)
    return {module: sf.transpose() if kind != "linear" else sf for module, (sf, kind) in read.items()}, config


# ---------------------------------------------------------------------------- adapters as weight updates
def _open(path_or_checkpoint, role):
    """(Checkpoint, opened_here) for a path or an open Checkpoint."""
    if isinstance(path_or_checkpoint, Checkpoint):
        return path_or_checkpoint, False
    if not os.path.exists(path_or_checkpoint):
        raise FileNotFoundError(f"{role} checkpoint {os.fspath(path_or_checkpoint)} does not exist")
    return open_checkpoint(path_or_checkpoint), True


def _kinds(ckpt, read, cfg, orientation, wpath):
    """The kind of each adapter module on this base: the base's config.json, else the adapter's own flag."""
    fallback = "in_out" if cfg["fan_in_fan_out"] else "out_in"
    linear = [m for m, (_, kind) in read.items() if kind != "embedding"]
    kinds = layer_kinds(linear, [(str(ckpt.path.parent / "config.json"), model_config(ckpt))], orientation, fallback)
    for module, kind in kinds.items():
        if kind == "embedding":  # PEFT loads lora_embedding_A/B for it and ignores these weights
            raise ValueError(
                f"{wpath}: module {module!r} is an embedding, for which PEFT loads lora_embedding_A/B; "
                f"the adapter's {'gralora' if cfg['peft_type'] == 'GRALORA' else 'lora_A/lora_B'} weights "
                "for it would be ignored"
            )
    return {m: kinds.get(m, "embedding") for m in read}


def _adapter_layers(base, adapter_dir, orientation=None):
    """The adapter's layers as (out, in) factors and their LayerPairs on the base, checked against its header."""
    read, _, cfg = _read(adapter_dir)
    wpath = os.path.join(os.fspath(adapter_dir), ADAPTER_WEIGHTS)
    ckpt, opened = _open(base, "base")
    try:
        kinds = _kinds(ckpt, read, cfg, orientation, wpath)
        names, pairs = set(ckpt.names()), []
        for module, (sf, _) in read.items():
            name = module + ".weight"
            if name not in names:
                raise ValueError(f"{wpath}: module {module!r} has no weight {name!r} in the base checkpoint")
            pair = LayerPair(name, module, tuple(sf.layout.shape), kinds[module])
            if tuple(ckpt.info(name).shape) != pair.stored_shape:
                raise ValueError(
                    f"adapter module {module!r} ({pair.kind}) is {sf.layout.shape[0]}x{sf.layout.shape[1]} "
                    f"(out x in), so its weight would be stored as {pair.stored_shape}; "
                    f"the base's {name!r} is {ckpt.info(name).shape}"
                )
            pairs.append(pair)
    finally:
        if opened:
            ckpt.close()
    return {module: sf for module, (sf, _) in read.items()}, pairs


def adapter_pairs(base, adapter_dir, *, orientation=None):
    """The layers of a PEFT adapter as :class:`~blocklowrank.checkpoints.LayerPair` of the base checkpoint.

    What :func:`~blocklowrank.checkpoints.pair_layers` gives for a fine-tuned
    checkpoint (its ``.pairs``): ``(name, module, shape, kind)`` with ``name``
    the base's weight ``<module>.weight`` and ``shape`` ``(out, in)``. The
    kind comes from the base's ``config.json`` (else ``orientation``, else the
    adapter's ``fan_in_fan_out``; embeddings from their keys). Raises
    ValueError as :func:`adapter_deltas`.
    """
    return _adapter_layers(base, adapter_dir, orientation)[1]


def adapter_deltas(base, adapter_dir, *, names=None, dtype=np.float32, stored=True, orientation=None):
    """Yield ``(name, ΔW)`` for each layer of a PEFT adapter, under the base checkpoint's names.

    Parameters
    ----------
    base : str, path or Checkpoint
        The base model's checkpoint (only its header, and its
        ``config.json`` if any, are read).
    adapter_dir : str or path
        A PEFT LoRA or GraLoRA adapter directory (ours or PEFT's own).
    names : iterable of str, optional
        Only these weight names (e.g. ``[pair.name]`` in a worker that
        studies one layer); all of the adapter's layers by default.
    dtype : {float32, float64}, default=float32
    stored : bool, default=True
        True: ΔW in the orientation of the base's stored weight, so that
        ``base[name] + ΔW`` is PEFT's merged weight. False: ``(out_features,
        in_features)``, as :func:`~blocklowrank.checkpoints.iter_deltas`
        yields (they differ for ``Conv1D`` layers and embeddings).
    orientation : {"out_in", "in_out"}, optional
        How the base stores its layers, where its ``config.json`` does not
        say (see :func:`~blocklowrank.checkpoints.pair_layers`); by default
        the adapter's ``fan_in_fan_out``.

    Yields
    ------
    name : str
        The base's weight name, ``<module path>.weight``.
    delta : ndarray
        The layer's ΔW with PEFT's scale applied, built one layer at a time.

    Raises
    ------
    ValueError
        When an adapter module has no weight in the base or its shape differs,
        or ``names`` asks for a layer the adapter does not have (all checked
        before the first ΔW is yielded); and as :func:`load_peft_adapter`.

    Notes
    -----
    The model study takes this in place of a fine-tuned checkpoint: where it
    pairs with ``pair_layers(base, finetuned).pairs`` and reads a layer with
    ``iter_deltas(base, finetuned, [pair])``, an adapter directory (one
    holding ``adapter_config.json``) gives ``adapter_pairs(base, adapter_dir)``
    and ``adapter_deltas(base, adapter_dir, names=[pair.name], stored=False)``,
    with the same names and shapes.
    """
    dtype = np.dtype(dtype)
    layers, pairs = _adapter_layers(base, adapter_dir, orientation)
    wanted = [p for p in pairs if names is None or p.name in set(names)]
    unknown = sorted(set(names or ()) - {p.name for p in pairs})
    if unknown:
        raise ValueError(f"the adapter in {os.fspath(adapter_dir)} has no layer {unknown[0]!r}")
    return ((p.name, _delta(layers[p.module], p, dtype, stored)) for p in wanted)


def _delta(sf, pair, dtype, stored):
    delta = sf.to_dense().astype(dtype, copy=False)
    return delta.T if stored and pair.transposed else delta

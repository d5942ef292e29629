"""PEFT adapter files out of fitted structures, and back in.

(Over 600 lines: writing and reading of both adapter formats, LoRA and
GraLoRA, in one place so that key names, shapes and scales cannot drift apart.)

:func:`save_peft_adapter` writes a directory that
``peft.PeftModel.from_pretrained(base_model, directory)`` loads:
``adapter_model.safetensors`` and ``adapter_config.json``.
:func:`load_peft_adapter` reads a PEFT LoRA or GraLoRA adapter directory into
:class:`~blocklowrank.factors.StructuredFactors`, one per module.

How each structure is written (W has shape ``(out_features, in_features)``):

- global (1 x 1 layout) -> LoRA of the same rank;
- a layout that is not a full ``K x K`` grid (MELoRA's diagonal, sparse
  patterns; a global term or not) -> LoRA of rank ``sum r_ij (+ r_g)``: the
  block factors side by side, zeros off their blocks (exact, but with the
  parameters of a dense LoRA of that rank);
- a full ``K x K`` grid -> GraLoRA ``gralora_k = K``, ``r = K * rho`` with
  ``rho`` the largest block rank (smaller blocks padded with zero
  components); a global term -> GraLoRA's ``hybrid_r``. PEFT needs equal
  blocks: a grid on a shape not divisible by ``K`` is refused (or written as
  LoRA on request, ``peft_type="LORA"``).

The scale is 1: LoRA gets ``lora_alpha = r`` (``alpha_pattern`` where a
layer's rank differs from ``r``), GraLoRA ``alpha = r + hybrid_r``, so PEFT's
``Delta W`` equals ours with no rescaled factors. Formats checked against
PEFT 0.21.2 (``peft/tuners/lora``, ``peft/tuners/gralora``,
``peft/utils/save_and_load.py``); the test suite loads the files with it.

This module never imports torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping

import numpy as np

from ._io import atomic_write_text
from .checkpoints import Checkpoint, LayerPair, open_checkpoint, save_file
from .convert import as_factors, from_gralora, to_gralora
from .factors import StructuredFactors
from .layout import BlockLayout

__all__ = [
    "save_peft_adapter",
    "load_peft_adapter",
    "adapter_pairs",
    "adapter_deltas",
    "ADAPTER_WEIGHTS",
    "ADAPTER_CONFIG",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
PEFT_TYPES = ("auto", "LORA", "GRALORA")
_LORA_KEYS = {"lora_A.weight": "A", "lora_B.weight": "B"}
_GRALORA_KEYS = {
    "gralora_A": "A",
    "gralora_B": "B",
    "gralora_A_general.weight": "A_general",
    "gralora_B_general.weight": "B_general",
}


# ---------------------------------------------------------------------------- writing
def _classify(name, sf):
    """The grid size K when layer ``name`` is a full K x K grid (GraLoRA), else None (LoRA)."""
    lay = sf.layout
    kr, kc = lay.n_blocks
    if lay.permuted and sf.global_rank:
        raise ValueError(f"layer {name!r}: a hybrid layout with a row/column permutation has no PEFT form")
    return kr if kr == kc > 1 and lay.active.all() else None


def _gralora_fits(name, sf, K):
    """Why layer ``name`` cannot be written as GraLoRA with ``gralora_k = K``, or None."""
    lay = sf.layout
    m, n = lay.shape
    if m % K or n % K:
        return (
            f"layer {name!r} of shape (out={m}, in={n}) is not divisible by gralora_k={K}, "
            "which PEFT requires; fit it with another K or write it as LoRA (peft_type='LORA')"
        )
    if lay.n_blocks == (1, 1):
        return None
    if lay.permuted:
        return (
            f"layer {name!r} has a row/column permutation, which GraLoRA blocks cannot hold; "
            "write it as LoRA (peft_type='LORA', exact)"
        )
    if lay.n_blocks != (K, K) or set(lay.row_sizes) != {m // K} or set(lay.col_sizes) != {n // K}:
        return (
            f"layer {name!r} is a {lay.pattern} {lay.n_blocks[0]}x{lay.n_blocks[1]} grid with "
            f"row sizes {lay.row_sizes}; GraLoRA with gralora_k={K} needs {K}x{K} equal blocks"
        )
    return None


def _stacked_lora(sf, dtype):
    """LoRA factors ``(B [m, R], A [R, n])`` with ``B @ A`` = the structure's ``Delta W``."""
    lay = sf.layout
    m, n = lay.shape
    pairs = [(lay.block_slice(i, j), sf.factors[(i, j)]) for i, j in sorted(sf.factors)]
    R = sum(np.shape(B)[1] for _, (B, _) in pairs) + sf.global_rank
    Bs, As = np.zeros((m, max(R, 1)), dtype), np.zeros((max(R, 1), n), dtype)
    c = 0
    for (rows, cols), (B, A) in pairs:
        r = np.shape(B)[1]
        Bs[rows, c : c + r], As[c : c + r, cols] = B, A
        c += r
    if lay.row_perm is not None:  # factors live in permuted coordinates
        Bs = Bs[np.argsort(lay.row_perm)]
    if lay.col_perm is not None:
        As = As[:, np.argsort(lay.col_perm)]
    if sf.global_rank:
        Bs[:, c:], As[c:] = sf.global_factors
    return Bs, As


def _gralora_tensors(sf, K, dtype):
    """GraLoRA tensors of one layer at its own block rank (zero blocks where inactive)."""
    lay = sf.layout
    m, n = lay.shape
    gf = sf.global_factors if sf.global_rank else None
    if lay.n_blocks == (1, 1):  # a global layer: zero blocks, everything in the hybrid term
        Bg, Ag = _stacked_lora(sf, dtype)
        gf = (Bg, Ag) if sf.layout.ranks.sum() + sf.global_rank else None
        factors, rho = {}, 1
    else:
        factors, rho = sf.factors, max(1, int(lay.ranks.max()))
    mb, nb = m // K, n // K
    padded = {}
    for i in range(K):
        for j in range(K):
            B, A = np.zeros((mb, rho), dtype), np.zeros((rho, nb), dtype)
            if (i, j) in factors:
                r = np.shape(factors[(i, j)][0])[1]
                B[:, :r], A[:r] = factors[(i, j)]
            padded[(i, j)] = (B, A)
    gf = None if gf is None else tuple(np.asarray(x, dtype) for x in gf)
    return to_gralora(StructuredFactors(BlockLayout.block((m, n), K, rank=rho), padded, global_factors=gf))


def _pad_gralora(t, K, rho, hybrid_r):
    """Pad one layer's GraLoRA tensors with zero components to block rank ``rho`` and ``hybrid_r``."""
    A, B = t["gralora_A"], t["gralora_B"]
    own = A.shape[2] // K
    A = np.pad(A.reshape(K, A.shape[1], K, own), [(0, 0)] * 3 + [(0, rho - own)]).reshape(K, -1, K * rho)
    B = np.pad(B.reshape(K, K, own, B.shape[2]), [(0, 0)] * 2 + [(0, rho - own), (0, 0)])
    out = {"gralora_A": A, "gralora_B": B.reshape(K, K * rho, -1)}
    if hybrid_r:
        m, n = B.shape[0] * B.shape[3], A.shape[0] * A.shape[1]
        Ag = t.get("gralora_A_general", np.zeros((0, n), A.dtype))
        Bg = t.get("gralora_B_general", np.zeros((m, 0), A.dtype))
        out["gralora_A_general.weight"] = np.pad(Ag, [(0, hybrid_r - Ag.shape[0]), (0, 0)])
        out["gralora_B_general.weight"] = np.pad(Bg, [(0, 0), (0, hybrid_r - Bg.shape[1])])
    return out


def _pattern_key(name, names):
    """The ``rank_pattern`` key of module ``name``: its escaped path less the first component.

    PEFT matches a key against a dotted suffix of the module path (0.13
    only after a dot, so never the whole path). When the shortened path
    would also match another of ``names`` (``encoder.x`` and ``decoder.x``),
    a lookbehind pins the first component.
    """
    head, _, tail = name.partition(".")
    if not tail:
        return re.escape(name)
    if not any(o != name and (o == tail or o.endswith("." + tail)) for o in names):
        return re.escape(tail)
    return rf"(?<=^{re.escape(head)}\.){re.escape(tail)}"


def _choose_type(kinds, peft_type, gralora_k):
    """The adapter's peft_type and GraLoRA grid size from the per-layer kinds."""
    want = {name: k for name, k in kinds.items() if k is not None}
    Ks = set(want.values()) | ({gralora_k} if gralora_k else set())
    if peft_type == "LORA":
        return "LORA", None
    if peft_type == "auto" and not want:
        return "LORA", None
    if len(Ks) > 1:
        raise ValueError(f"one GraLoRA adapter has one gralora_k; the layers ask for {sorted(Ks)}")
    if not Ks:
        raise ValueError("writing GraLoRA needs gralora_k when no layer is a K x K grid")
    K = Ks.pop()
    lora_only = sorted(set(kinds) - set(want))
    if peft_type == "auto" and lora_only:
        raise ValueError(
            f"one adapter holds one peft_type, and layers {lora_only} are LoRA while {sorted(want)} are "
            f"GraLoRA; pass peft_type='LORA' (exact, more parameters) or peft_type='GRALORA' "
            f"(exact where a layer fits gralora_k={K})"
        )
    return "GRALORA", K


def _atomic_write(directory, tensors, config, overwrite):
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f"{directory} exists and is not a directory")
    if os.path.isdir(directory) and os.listdir(directory) and not overwrite:
        raise FileExistsError(f"{directory} is not empty; pass overwrite=True to replace it")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", dir=parent)
    old = None
    try:
        save_file(os.path.join(tmp, ADAPTER_WEIGHTS), tensors, metadata={"format": "pt"})
        atomic_write_text(os.path.join(tmp, ADAPTER_CONFIG), json.dumps(config, indent=2, sort_keys=True))
        if os.path.isdir(directory):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old.", dir=parent)
            os.rename(directory, os.path.join(old, "d"))
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.exists(directory):
            os.rename(os.path.join(old, "d"), directory)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return directory


def save_peft_adapter(
    directory,
    layers,
    *,
    base_model_name_or_path=None,
    peft_type="auto",
    gralora_k=None,
    task_type=None,
    dtype=np.float32,
    overwrite=False,
):
    """Write fitted structures as a PEFT adapter directory (LoRA or GraLoRA).

    Parameters
    ----------
    directory : str or path
        Created with ``adapter_model.safetensors`` (metadata ``{"format":
        "pt"}``) and ``adapter_config.json``; written into a temporary
        directory beside it, then renamed into place.
    layers : mapping of str to fitted structure
        Module path (as in ``model.named_modules()``, e.g.
        ``"model.layers.0.self_attn.q_proj"``) to anything
        :func:`~blocklowrank.convert.as_factors` accepts, fitted to the
        layer's ``Delta W`` of shape ``(out_features, in_features)``.
    base_model_name_or_path : str, optional
        Recorded in the config.
    peft_type : {"auto", "LORA", "GRALORA"}, default="auto"
        One adapter holds one type. "auto" writes GraLoRA when some layer is
        a full ``K x K`` grid (hybrid or not), LoRA when none is, and raises
        when the layers are of both kinds. "LORA" writes every layer as a stacked
        LoRA (exact for every layout; a permuted one gets the permutation
        applied to the rows of ``lora_B`` and the columns of ``lora_A``;
        hybrids with a permutation are refused). "GRALORA" writes every layer
        with one ``gralora_k``: global layers go to the hybrid term, grids
        of ``K x K`` equal blocks keep their blocks (inactive ones zero).
    gralora_k : int, optional
        Grid size for GraLoRA when no layer is a ``K x K`` grid.
    task_type : str, optional
        PEFT's ``task_type`` (e.g. ``"CAUSAL_LM"``), written only if given.
    dtype : {numpy.float32, numpy.float64}, default=numpy.float32
        Dtype of the stored tensors.
    overwrite : bool, default=False
        Replace a non-empty ``directory`` (all of it) instead of raising.

    Returns
    -------
    dict
        ``directory``, ``peft_type``, ``config`` (as written) and per layer
        (``layers``) the ``rank`` written and the parameter counts
        ``n_params_effective`` (the structure's own) and ``n_params_written``
        (including the zero padding); totals of both.

    Raises
    ------
    ValueError
        When the layers need different adapter types, a layer does not fit
        GraLoRA (shape not divisible by ``gralora_k``, unequal blocks, a
        permutation), or a hybrid carries a permutation; nothing is written
        then.
    FileExistsError
        When ``directory`` is not empty and ``overwrite`` is False.

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> from blocklowrank import approximate
    >>> dW = np.random.default_rng(0).standard_normal((8, 6))
    >>> fit = approximate(dW, method="block", n_blocks=2, rank=1)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> rep = save_peft_adapter(os.path.join(tmp.name, "adapter"), {"model.fc": fit})
    >>> rep["peft_type"], rep["config"]["gralora_k"], rep["config"]["r"], rep["config"]["alpha"]
    ('GRALORA', 2, 2, 2)
    >>> layers, config = load_peft_adapter(rep["directory"])
    >>> bool(np.allclose(layers["model.fc"].to_dense(), fit.reconstruction, atol=1e-6))
    True
    >>> tmp.cleanup()
    """
    if peft_type not in PEFT_TYPES:
        raise ValueError(f"peft_type must be one of {PEFT_TYPES}, got {peft_type!r}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    if not isinstance(layers, Mapping) or not layers:
        raise ValueError("layers must be a non-empty mapping from module path to fitted structure")
    sfs = {}
    for name, obj in layers.items():
        if not isinstance(name, str) or not re.fullmatch(r"[\w\-]+(\.[\w\-]+)*", name):
            raise ValueError(f"module path {name!r} must be a dotted name such as 'model.layers.0.mlp.up_proj'")
        sfs[name] = as_factors(obj)
    kinds = {name: _classify(name, sf) for name, sf in sfs.items()}
    kind, K = _choose_type(kinds, peft_type, gralora_k)
    config = {"peft_type": kind, "base_model_name_or_path": base_model_name_or_path}
    if task_type is not None:
        config["task_type"] = task_type
    config["target_modules"] = sorted(sfs)
    tensors, written = {}, {}
    if kind == "LORA":
        pairs = {name: _stacked_lora(sf, dtype) for name, sf in sfs.items()}
        ranks = {name: B.shape[1] for name, (B, _) in pairs.items()}
        r = max(set(ranks.values()), key=lambda v: (list(ranks.values()).count(v), -v))
        pattern = {_pattern_key(name, ranks): v for name, v in ranks.items() if v != r}
        config.update(r=r, lora_alpha=r)
        if pattern:
            config.update(rank_pattern=pattern, alpha_pattern=dict(pattern))
        for name, (B, A) in pairs.items():
            tensors[f"{PREFIX}{name}.lora_A.weight"] = A
            tensors[f"{PREFIX}{name}.lora_B.weight"] = B
            written[name] = A.size + B.size
    else:
        problems = [p for p in (_gralora_fits(name, sf, K) for name, sf in sfs.items()) if p]
        if problems:
            raise ValueError(problems[0] if len(problems) == 1 else "; ".join(problems))
        own = {name: _gralora_tensors(sf, K, dtype) for name, sf in sfs.items()}
        rho = max(t["r"] for t in own.values()) // K
        hybrid_r = max(t["hybrid_r"] for t in own.values())
        config.update(r=K * rho, alpha=K * rho + hybrid_r, gralora_k=K, hybrid_r=hybrid_r)
        for name, t in own.items():
            padded = _pad_gralora(t, K, rho, hybrid_r)
            tensors.update({f"{PREFIX}{name}.{key}": value for key, value in padded.items()})
            written[name] = sum(v.size for v in padded.values())
    report = {
        name: {
            "rank": int(ranks[name] if kind == "LORA" else config["r"]),
            "n_params_effective": int(sf.n_params),
            "n_params_written": int(written[name]),
        }
        for name, sf in sfs.items()
    }
    tensors = {k: np.ascontiguousarray(v, dtype) for k, v in tensors.items()}
    path = _atomic_write(directory, tensors, config, overwrite)
    return {
        "directory": path,
        "peft_type": kind,
        "config": config,
        "layers": report,
        "n_params_effective": sum(v["n_params_effective"] for v in report.values()),
        "n_params_written": sum(v["n_params_written"] for v in report.values()),
    }


# ---------------------------------------------------------------------------- reading
def _pattern_value(config, field_, module, default, path):
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: a key matches a dotted suffix of the module path."""
    patterns = config.get(field_) or {}
    if not isinstance(patterns, dict) or not all(isinstance(v, (int, float)) for v in patterns.values()):
        raise ValueError(f"{path}: {field_!r} must map module patterns to numbers")
    for key, value in patterns.items():
        try:
            hit = re.match(rf"(.*\.)?({key})$", module)
        except re.error as exc:
            raise ValueError(f"{path}: {field_!r} key {key!r} is not a regular expression") from exc
        if hit:
            return value
    return default


def _targeted(target_modules, module, path):
    if target_modules is None or target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        try:
            return re.fullmatch(target_modules, module) is not None
        except re.error as exc:
            raise ValueError(f"{path}: target_modules {target_modules!r} is not a regular expression") from exc
    if not isinstance(target_modules, list) or not all(isinstance(t, str) for t in target_modules):
        raise ValueError(f"{path}: target_modules must be a string or a list of strings")
    return any(module == t or module.endswith("." + t) for t in target_modules)


def _group_keys(ckpt, suffixes, wpath):
    """``{module: {role: key}}`` from the checkpoint's keys, each ``PREFIX<module>.<suffix>``."""
    modules = {}
    for key in ckpt.names():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if suffix is None or not key.startswith(PREFIX):
            raise ValueError(f"{wpath}: key {key!r} is not a {'/'.join(suffixes)} weight of this adapter type")
        module = key[len(PREFIX) : -len(suffix) - 1]
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
    return a


def _read_lora(ckpt, config, wpath, cpath):
    if config.get("use_dora") or config.get("lora_bias"):
        raise ValueError(f"{cpath}: DoRA and LoRA biases are not structured low-rank updates; not supported")
    out = {}
    for module, roles in _group_keys(ckpt, _LORA_KEYS, wpath).items():
        for role in ("A", "B"):
            if role not in roles:
                raise ValueError(f"{wpath}: module {module!r} has no lora_{role}.weight")
        if not _targeted(config.get("target_modules"), module, cpath):
            raise ValueError(f"{wpath}: key {roles['A']!r} is for a module outside the config's target_modules")
        r = int(_pattern_value(config, "rank_pattern", module, config["r"], cpath))
        alpha = float(_pattern_value(config, "alpha_pattern", module, config.get("lora_alpha", 8), cpath))
        A = _get(ckpt, roles["A"], (r, None), wpath)
        B = _get(ckpt, roles["B"], (None, r), wpath)
        scale = alpha / np.sqrt(r) if config.get("use_rslora") else alpha / r
        shape = (B.shape[0], A.shape[1])
        if r <= min(shape):
            out[module] = StructuredFactors(BlockLayout.global_(shape, rank=r), {(0, 0): (B * scale, A)})
        else:  # a rank above min(out, in) has no 1 x 1 layout: keep the exact factors as a global term
            layout = BlockLayout(shape, shape[:1], shape[1:], [[True]], [[0]])
            out[module] = StructuredFactors(layout, {(0, 0): (B[:, :0], A[:0])}, global_factors=(B * scale, A))
    return out


def _read_gralora(ckpt, config, wpath, cpath):
    K, r, hr = int(config.get("gralora_k", 2)), int(config["r"]), int(config.get("hybrid_r", 0))
    scale = float(config.get("alpha", 64)) / (r + hr)
    out = {}
    for module, roles in _group_keys(ckpt, _GRALORA_KEYS, wpath).items():
        need = ("A", "B", "A_general", "B_general") if hr else ("A", "B")
        for role in need:
            if role not in roles:
                raise ValueError(f"{wpath}: module {module!r} has no {PREFIX}{module}.gralora_{role}")
        extra = set(roles) - set(need)
        if extra:
            raise ValueError(f"{wpath}: key {roles[min(extra)]!r} is unexpected with hybrid_r={hr}")
        if not _targeted(config.get("target_modules"), module, cpath):
            raise ValueError(f"{wpath}: key {roles['A']!r} is for a module outside the config's target_modules")
        A = _get(ckpt, roles["A"], (K, None, r), wpath)
        B = _get(ckpt, roles["B"], (K, r, None), wpath)
        general = {}
        if hr:
            n, m = K * A.shape[1], K * B.shape[2]
            general["gralora_A_general"] = _get(ckpt, roles["A_general"], (hr, n), wpath)
            general["gralora_B_general"] = _get(ckpt, roles["B_general"], (m, hr), wpath)
        out[module] = from_gralora(A, B, scaling=scale, **general)
    return out


def load_peft_adapter(directory):
    """Read a PEFT LoRA or GraLoRA adapter directory into our factors.

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
        layer's update ``Delta W`` of shape ``(out_features, in_features)``,
        PEFT's scale folded into the ``B`` factors. LoRA gives a 1 x 1
        layout of rank ``r``; GraLoRA a full ``gralora_k`` grid of rank
        ``r / gralora_k`` per block plus the hybrid term.
    config : dict
        The adapter's config as stored.

    Raises
    ------
    FileNotFoundError
        When a file is missing.
    ValueError
        When the config or the tensors are not a LoRA/GraLoRA adapter, or keys
        or shapes do not match the config; the message names the file and
        the key.
    """
    directory = os.fspath(directory)
    cpath, wpath = os.path.join(directory, ADAPTER_CONFIG), os.path.join(directory, ADAPTER_WEIGHTS)
    for path in (cpath, wpath):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing")
    try:
        with open(cpath) as f:
            config = json.load(f)
    except ValueError as exc:
        raise ValueError(f"{cpath} is not valid JSON") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{cpath} does not hold a JSON object")
    kind = config.get("peft_type")
    readers = {"LORA": _read_lora, "GRALORA": _read_gralora}
    if kind not in readers:
        raise ValueError(f"{cpath}: peft_type {kind!r} is not one of {sorted(readers)}")
    for field_ in ("r",) + (("gralora_k",) if kind == "GRALORA" else ()):
        if not isinstance(config.get(field_), int) or config[field_] <= 0:
            raise ValueError(f"{cpath}: {field_!r} must be a positive integer, got {config.get(field_)!r}")
    if kind == "GRALORA" and config["r"] % config["gralora_k"]:
        raise ValueError(f"{cpath}: r={config['r']} is not divisible by gralora_k={config['gralora_k']}")
    with open_checkpoint(wpath) as ckpt:
        return readers[kind](ckpt, config, wpath, cpath), config


# ---------------------------------------------------------------------------- adapters as weight updates
def _open(path_or_checkpoint, role):
    """(Checkpoint, opened_here) for a path or an open Checkpoint."""
    if isinstance(path_or_checkpoint, Checkpoint):
        return path_or_checkpoint, False
    if not os.path.exists(path_or_checkpoint):
        raise FileNotFoundError(f"{role} checkpoint {os.fspath(path_or_checkpoint)} does not exist")
    return open_checkpoint(path_or_checkpoint), True


def _adapter_layers(base, adapter_dir):
    """The adapter's layers and their LayerPairs on the base, checked against the base's header."""
    layers, _ = load_peft_adapter(adapter_dir)
    ckpt, opened = _open(base, "base")
    try:
        names, pairs = set(ckpt.names()), []
        for module, sf in layers.items():
            name = module + ".weight"
            if name not in names:
                raise ValueError(
                    f"{os.path.join(os.fspath(adapter_dir), ADAPTER_WEIGHTS)}: module {module!r} "
                    f"has no weight {name!r} in the base checkpoint"
                )
            if tuple(ckpt.info(name).shape) != tuple(sf.layout.shape):
                raise ValueError(
                    f"adapter module {module!r} is {sf.layout.shape[0]}x{sf.layout.shape[1]}, "
                    f"the base's {name!r} is {ckpt.info(name).shape}"
                )
            pairs.append(LayerPair(name, module, tuple(sf.layout.shape)))
    finally:
        if opened:
            ckpt.close()
    return layers, pairs


def adapter_pairs(base, adapter_dir):
    """The layers of a PEFT adapter as :class:`~blocklowrank.checkpoints.LayerPair` of the base checkpoint.

    What :func:`~blocklowrank.checkpoints.pair_layers` gives for a fine-tuned
    checkpoint (its ``.pairs``): ``(name, module, shape)`` with ``name`` the
    base's weight ``<module>.weight``. Raises ValueError as :func:`adapter_deltas`.
    """
    return _adapter_layers(base, adapter_dir)[1]


def adapter_deltas(base, adapter_dir, *, names=None, dtype=np.float32):
    """Yield ``(name, ΔW)`` for each layer of a PEFT adapter, under the base checkpoint's names.

    Parameters
    ----------
    base : str, path or Checkpoint
        The base model's checkpoint (only its header is read).
    adapter_dir : str or path
        A PEFT LoRA or GraLoRA adapter directory (ours or PEFT's own).
    names : iterable of str, optional
        Only these weight names (e.g. ``[pair.name]`` in a worker that
        studies one layer); all of the adapter's layers by default.
    dtype : {float32, float64}, default=float32

    Yields
    ------
    name : str
        The base's weight name, ``<module path>.weight``.
    delta : ndarray of shape (out_features, in_features)
        The layer's ΔW with PEFT's scale applied, built one layer at a time.

    Raises
    ------
    ValueError
        When an adapter module has no weight in the base or its shape differs,
        or ``names`` asks for a layer the adapter does not have (all checked
        before the first ΔW is yielded).

    Notes
    -----
    The model study takes this in place of a fine-tuned checkpoint: where it
    pairs with ``pair_layers(base, finetuned).pairs`` and reads a layer with
    ``iter_deltas(base, finetuned, [pair])``, an adapter directory (one
    holding ``adapter_config.json``) gives ``adapter_pairs(base, adapter_dir)``
    and ``adapter_deltas(base, adapter_dir, names=[pair.name])``, with the same
    names and shapes.
    """
    dtype = np.dtype(dtype)
    layers, pairs = _adapter_layers(base, adapter_dir)
    wanted = [p for p in pairs if names is None or p.name in set(names)]
    unknown = sorted(set(names or ()) - {p.name for p in pairs})
    if unknown:
        raise ValueError(f"the adapter in {os.fspath(adapter_dir)} has no layer {unknown[0]!r}")
    return ((p.name, layers[p.module].to_dense().astype(dtype, copy=False)) for p in wanted)

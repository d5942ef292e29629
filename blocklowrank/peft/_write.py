"""Writing fitted structures as PEFT adapter directories (see :mod:`blocklowrank.peft`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping

import numpy as np

from .._io import atomic_write_text, check_output_dir, replace_directory
from ..checkpoints import KINDS, save_file
from ..convert import as_factors, to_gralora
from ..factors import StructuredFactors
from ..layout import BlockLayout
from ._read import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX

__all__ = ["save_peft_adapter", "PEFT_TYPES", "ADAPTER_FILES"]

PEFT_TYPES = ("auto", "LORA", "GRALORA")
#: What an adapter directory may hold to be replaced with ``overwrite`` (PEFT's save_pretrained adds a README).
ADAPTER_FILES = frozenset({ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md", "extract_report.json"})


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


def _write_directory(directory, tensors, config, dtypes=None):
    """Write the adapter into a temporary directory beside ``directory``, then swap it into place."""
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=parent)
    try:
        save_file(os.path.join(tmp, ADAPTER_WEIGHTS), tensors, metadata={"format": "pt"}, dtypes=dtypes)
        atomic_write_text(os.path.join(tmp, ADAPTER_CONFIG), json.dumps(config, indent=2, sort_keys=True))
        return replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _orientation(kinds, names, peft_type):
    """``fan_in_fan_out`` of the adapter from the layers' kinds (one flag per adapter), after checking them."""
    kinds = {name: "linear" for name in names} if kinds is None else dict(kinds)
    for name in names:
        if kinds.get(name, "linear") not in KINDS:
            raise ValueError(f"kinds[{name!r}] must be one of {KINDS}, got {kinds[name]!r}")
    by_kind = {}
    for name in names:
        by_kind.setdefault(kinds.get(name, "linear"), []).append(name)
    if "linear" in by_kind and "conv1d" in by_kind:
        raise ValueError(
            f"one adapter has one fan_in_fan_out, and {by_kind['linear'][0]!r} is nn.Linear while "
            f"{by_kind['conv1d'][0]!r} is a Conv1D layer; write them as two adapters (target_modules)"
        )
    if "embedding" in by_kind and peft_type == "GRALORA":
        raise ValueError(
            f"{by_kind['embedding'][0]!r} is an embedding, which GraLoRA cannot hold (PEFT's GraLoRA takes "
            "nn.Linear and Conv1D layers only); leave it out with target_modules or write LoRA"
        )
    return "conv1d" in by_kind, set(by_kind.get("embedding", ()))


def _lora_tensors(sfs, dtype, embeddings, config):
    """LoRA tensors of every layer (``lora_embedding_A/B`` for embeddings), their sizes and ranks."""
    pairs = {name: _stacked_lora(sf, dtype) for name, sf in sfs.items()}
    ranks = {name: B.shape[1] for name, (B, _) in pairs.items()}
    r = max(set(ranks.values()), key=lambda v: (list(ranks.values()).count(v), -v))
    pattern = {_pattern_key(name, ranks): v for name, v in ranks.items() if v != r}
    config.update(r=r, lora_alpha=r)
    if pattern:
        config.update(rank_pattern=pattern, alpha_pattern=dict(pattern))
    tensors, written = {}, {}
    for name, (B, A) in pairs.items():  # A [r, in], B [out, r]: in = num_embeddings, out = embedding_dim
        keys = ("lora_embedding_A", "lora_embedding_B") if name in embeddings else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PREFIX}{name}.{keys[0]}"], tensors[f"{PREFIX}{name}.{keys[1]}"] = A, B
        written[name] = A.size + B.size
    return tensors, written, ranks


def _gralora_all(sfs, K, dtype, config):
    """GraLoRA tensors of every layer at one block rank and ``hybrid_r``, and their sizes."""
    problems = [p for p in (_gralora_fits(name, sf, K) for name, sf in sfs.items()) if p]
    if problems:
        raise ValueError(problems[0] if len(problems) == 1 else "; ".join(problems))
    own = {name: _gralora_tensors(sf, K, dtype) for name, sf in sfs.items()}
    rho = max(t["r"] for t in own.values()) // K
    hybrid_r = max(t["hybrid_r"] for t in own.values())
    config.update(r=K * rho, alpha=K * rho + hybrid_r, gralora_k=K, hybrid_r=hybrid_r)
    tensors, written = {}, {}
    for name, t in own.items():
        padded = _pad_gralora(t, K, rho, hybrid_r)
        tensors.update({f"{PREFIX}{name}.{key}": value for key, value in padded.items()})
        written[name] = sum(v.size for v in padded.values())
    return tensors, written


_STORE_TYPES = {"float32": (np.float32, None), "float64": (np.float64, None), "float16": (np.float32, "F16")}
_STORE_TYPES["bfloat16"] = (np.float32, "BF16")


def _store_type(dtype):
    """(NumPy dtype the tensors are built in, safetensors code they are stored as, or None)."""
    name = dtype if isinstance(dtype, str) else getattr(np.dtype(dtype) if dtype is not None else None, "name", None)
    if name not in _STORE_TYPES:
        raise TypeError(f"dtype must be one of {', '.join(_STORE_TYPES)}, got {dtype!r}")
    return _STORE_TYPES[name]


def _whole_modules(modules_to_save, config):
    """PEFT's keys of the modules carried whole (``{key: (array, code or None)}``), listed in the config."""
    if not modules_to_save:
        return {}
    tensors = {}
    for module, named in modules_to_save.items():
        for name, value in named.items():
            if not name.startswith(module + "."):
                raise ValueError(f"modules_to_save[{module!r}]: tensor {name!r} is not inside that module")
            array, code = value if isinstance(value, tuple) else (value, None)
            tensors[PREFIX + name] = (np.ascontiguousarray(array), code)
    targets = config["target_modules"]
    clash = sorted(m for m in modules_to_save for t in targets if m == t or t.startswith(m + "."))
    if clash:
        raise ValueError(f"modules_to_save: {clash[0]!r} is (or holds) a layer of the adapter")
    config["modules_to_save"] = sorted(modules_to_save)
    return tensors


def save_peft_adapter(
    directory,
    layers,
    *,
    kinds=None,
    base_model_name_or_path=None,
    peft_type="auto",
    gralora_k=None,
    task_type=None,
    dtype=np.float32,
    modules_to_save=None,
    overwrite=False,
    protect=(),
):
    """Write fitted structures as a PEFT adapter directory (LoRA or GraLoRA).

    Parameters
    ----------
    directory : str or path
        Created with ``adapter_model.safetensors`` (metadata ``{"format":
        "pt"}``) and ``adapter_config.json``; written into a temporary
        directory beside it, then swapped into place in one step (see
        ``overwrite``). Never the working directory, the home directory, a
        folder holding them, or one of ``protect``.
    layers : mapping of str to fitted structure
        Module path (as in ``model.named_modules()``, e.g.
        ``"model.layers.0.self_attn.q_proj"``) to anything
        :func:`~blocklowrank.convert.as_factors` accepts, fitted to the
        layer's ``Delta W`` of shape ``(out_features, in_features)``, whatever
        the module stores (see ``kinds``).
    kinds : mapping of str to {"linear", "conv1d", "embedding"}, optional
        The kind of each module (``LayerPair.kind``; "linear" where not
        given). Conv1D layers (GPT-2) get ``fan_in_fan_out: true``, as PEFT
        requires of them; one adapter holds one such flag, so ``nn.Linear``
        and ``Conv1D`` layers cannot be mixed. Embeddings are written as
        PEFT's ``lora_embedding_A`` ``[r, num_embeddings]`` and
        ``lora_embedding_B`` ``[embedding_dim, r]``; GraLoRA cannot hold them.
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
    dtype : {"float32", "float64", "bfloat16", "float16"} or numpy dtype, default=numpy.float32
        Type of the stored tensors (16-bit types round the float32 factors
        to nearest even; PEFT loads them into its float32 layers).
    modules_to_save : mapping of str to mapping of str to array, optional
        Modules carried whole (PEFT's ``modules_to_save``): full module path
        -> ``{tensor name: array or (array, safetensors code)}``, each tensor
        name ``<module path>.<param>``. They are stored as
        ``base_model.model.<tensor name>`` (the keys PEFT's
        ``save_pretrained`` writes for them), in their own dtype (or the code
        given, e.g. ``"BF16"``), never rounded to ``dtype``; the config lists
        the paths.
    overwrite : bool, default=False
        Replace a non-empty ``directory`` instead of raising, if it is an
        adapter directory (it holds nothing but ``adapter_config.json``,
        ``adapter_model.safetensors``, ``README.md`` and
        ``extract_report.json``); anything else is
        never replaced. The old adapter is swapped out in one
        ``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere it is moved aside
        first and put back by the next call if a crash came in between.
    protect : iterable of str or path, optional
        Paths ``directory`` may neither be nor hold (e.g. the checkpoints the
        adapter was extracted from).

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
        permutation, an embedding), a hybrid carries a permutation,
        ``nn.Linear`` and ``Conv1D`` layers are mixed, or ``directory`` is
        empty, protected or holds a protected path; nothing is written then.
    FileExistsError
        When ``directory`` is not empty and ``overwrite`` is False, or it is
        not an adapter directory.

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
    >>> from blocklowrank.peft import load_peft_adapter
    >>> layers, config = load_peft_adapter(rep["directory"])
    >>> bool(np.allclose(layers["model.fc"].to_dense(), fit.reconstruction, atol=1e-6))
    True
    >>> tmp.cleanup()
    """
    if peft_type not in PEFT_TYPES:
        raise ValueError(f"peft_type must be one of {PEFT_TYPES}, got {peft_type!r}")
    dtype, code = _store_type(dtype)
    if not isinstance(layers, Mapping) or not layers:
        raise ValueError("layers must be a non-empty mapping from module path to fitted structure")
    directory = check_output_dir(directory, inputs=protect, overwrite=overwrite, replaceable=ADAPTER_FILES)
    sfs = {}
    for name, obj in layers.items():
        if not isinstance(name, str) or not re.fullmatch(r"[\w\-]+(\.[\w\-]+)*", name):
            raise ValueError(f"module path {name!r} must be a dotted name such as 'model.layers.0.mlp.up_proj'")
        sfs[name] = as_factors(obj)
    kind, K = _choose_type({name: _classify(name, sf) for name, sf in sfs.items()}, peft_type, gralora_k)
    fan_in_fan_out, embeddings = _orientation(kinds, sfs, kind)
    config = {"peft_type": kind, "base_model_name_or_path": base_model_name_or_path}
    if task_type is not None:
        config["task_type"] = task_type
    config["target_modules"] = sorted(sfs)
    if fan_in_fan_out:  # written only when true: a minimal config otherwise
        config["fan_in_fan_out"] = True
    if kind == "LORA":
        tensors, written, ranks = _lora_tensors(sfs, dtype, embeddings, config)
    else:
        tensors, written = _gralora_all(sfs, K, dtype, config)
        ranks = dict.fromkeys(sfs, config["r"])
    report = {
        name: {"rank": int(ranks[name]), "n_params_effective": int(sf.n_params), "n_params_written": int(written[name])}
        for name, sf in sfs.items()
    }
    whole = _whole_modules(modules_to_save, config)
    tensors = {k: np.ascontiguousarray(v, dtype) for k, v in tensors.items()}
    codes = {k: code for k in tensors} if code else {}
    for key, (array, own) in whole.items():  # carried whole: stored as they were given, never rounded
        tensors[key] = array
        if own is not None:
            codes[key] = own
    path = _write_directory(directory, tensors, config, dtypes=codes or None)
    return {
        "directory": path,
        "peft_type": kind,
        "config": config,
        "layers": report,
        "n_params_effective": sum(v["n_params_effective"] for v in report.values()),
        "n_params_written": sum(v["n_params_written"] for v in report.values()),
    }

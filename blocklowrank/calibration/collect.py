"""Collect calibration statistics by running a PyTorch model (the ``calibrate`` extra).

The one module of the library that uses torch and transformers; both are
imported inside the functions (a missing one is reported in one line naming
the extra), so importing this module (or :mod:`blocklowrank.calibration`) loads neither.

How the statistics are collected
--------------------------------
- **Layers**: the model's ``nn.Linear`` modules and transformers' ``Conv1D``
  (GPT-2; its weight is stored (in, out), its input is recorded all the same),
  chosen by ``target_modules`` with the rules of
  :func:`blocklowrank.checkpoints.select_names` applied to module paths; with
  ``"all-linear"`` the model's output embedding (``get_output_embeddings()``)
  is also left out, as PEFT does.
- **Input sites**: a forward hook on each layer sees its input tensor. Within
  one forward pass, layers fed the *same tensor object* share an input site
  (BERT's query/key/value, Llama's q/k/v and gate/up; a tensor that died and
  whose id was reused is told apart by a weak reference), so ``G`` is
  accumulated once per site. A site is named after the first of its layers in
  the model's module order (``named_modules``). The grouping found in the
  first pass must hold in every later pass, else the run stops with an error.
- **Masked tokens**: as PEFT's EVA initialisation does, the batch's attention
  mask is handed to the hooks through shared state set before each forward
  pass. A layer input of shape (batch, seq, n) counts the tokens the mask
  keeps; (batch·seq, n) the same tokens flattened; (batch, n) (a pooler or a
  classification head: one row per sequence) counts the sequences with a
  kept token. Any other shape is refused rather than counted wrongly.
- **Precision**: each site's ``Σ x xᵀ`` is accumulated in float64 by torch,
  on the model's device (``addmm_`` of float64 copies of the kept rows, a
  16 MiB chunk at a time): float16, bfloat16 and float32 values convert to
  float64 exactly, so only the float64 additions round, as in
  :class:`~blocklowrank.calibration.GramAccumulator` (the NumPy accumulator,
  for statistics computed elsewhere). torch rather than NumPy because the
  hooks run between the model's own operations: alternating NumPy's OpenBLAS
  threads with torch's OpenMP threads on the same cores made all-MiniLM-L6-v2
  on 400 sentences (2 cores) take 54 s instead of 10 s with torch's
  accumulation (3.3 s without hooks); and a model on a GPU keeps its sums
  there instead of copying every input to the host. The lower triangle is
  mirrored from the upper one at the end, so ``G`` is exactly symmetric.
- **Output side** (``output_grams=True``): each layer's output tensors are
  kept from the forward pass and ``torch.autograd.grad(loss, outputs)``
  gives the gradient of the batch's loss at every layer output in one
  backward pass, without touching any parameter's ``.grad``. The layers'
  weights are made to require grad for the run (and restored after), so a
  frozen model works too. The loss is ``loss_fn(model, batch)`` if given,
  else the model's own: the batch's ``labels`` if it has them; for a causal LM
  the inputs (``labels = input_ids``, padding ignored); for a masked LM a
  second forward pass on a copy with 15 % of the kept tokens replaced by the
  mask token (seeded) with those tokens as labels, while ``G`` comes from the
  clean batch.
- The model runs in eval mode (no dropout) and is put back as it was;
  torch's thread settings are left alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .._extras import MissingExtraError, require
from .._params import Int, StrOptions, validate_params
from .._version import __version__
from ..checkpoints import ALL_LINEAR, module_of, resolve_model, select_names
from ..sweep import _bar
from ._batches import as_inputs, masked_copy, padded, read_texts, read_tokens, token_mask, trim
from ._hooks import Collector, drain
from ._stats import CalibrationError, CalibrationStats, save_statistics

__all__ = ["collect_statistics", "calibrate_folder", "MLM_PROBABILITY"]

#: Share of the kept tokens masked for a masked LM's own loss.
MLM_PROBABILITY = 0.15


def _select_layers(model, target_modules, torch):
    """Module path -> module of the selected Linear/Conv1D layers, in module order."""
    kinds = (torch.nn.Linear,)
    try:
        kinds += (require("transformers.pytorch_utils").Conv1D,)
    except MissingExtraError:
        pass
    modules = {name: m for name, m in model.named_modules() if isinstance(m, kinds) and name}
    shapes = {f"{name}.weight": tuple(m.weight.shape) for name, m in modules.items()}
    chosen = [module_of(name) for name in select_names(shapes, target_modules, shapes=shapes)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        chosen = [name for name in chosen if modules[name] is not head]
    if not chosen:
        some = ", ".join(list(modules)[:4]) or "none"
        raise CalibrationError(
            f"target_modules={target_modules!r} selects no linear layer of the model (its linear layers: {some}, ...)"
        )
    return {name: modules[name] for name in chosen}


def _lm_kind(model, transformers):
    """'causal-lm', 'masked-lm' or None, from the transformers class of the model."""
    if transformers is None:
        return None
    auto = transformers.models.auto.modeling_auto
    for kind, names in (
        ("causal-lm", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
        ("masked-lm", auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
    ):
        flat = {n for v in names.values() for n in ((v,) if isinstance(v, str) else v)}
        if type(model).__name__ in flat:
            return kind
    return None


def _loss_kind(model, loss_fn, output_grams, first_batch_has_labels, mask_token_id):
    if loss_fn is not None:
        if not output_grams:
            raise ValueError("loss_fn is used only for the output side: pass output_grams=True with it")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
        return f"loss_fn:{getattr(loss_fn, '__qualname__', type(loss_fn).__name__)}"
    if not output_grams:
        return ""
    if first_batch_has_labels:
        return "labels"
    try:
        transformers = require("transformers")
    except MissingExtraError:
        transformers = None
    kind = _lm_kind(model, transformers)
    if kind is None:
        raise CalibrationError(
            f"output_grams needs a loss: {type(model).__name__} is not a causal or masked language model of "
            "transformers; pass batches with labels or loss_fn(model, batch)"
        )
    if kind == "masked-lm" and mask_token_id is None and getattr(model.config, "mask_token_id", None) is None:
        raise CalibrationError("a masked LM's own loss needs the tokenizer's mask token: pass mask_token_id")
    return kind


def _run_batch(model, inputs, col, kind, loss_fn, state, torch):
    """One batch: the forward pass(es) with the hooks on, and the backward pass for ``H``.

    The losses see every token of the batch (``state["attended"]``, the
    attention mask); only the counting (``col.mask``) stops at a token limit.
    """
    col.on_inputs, col.on_outputs = True, bool(kind) and kind != "masked-lm"
    if not kind:
        with torch.no_grad():
            model(**inputs)
    elif kind == "masked-lm":
        with torch.no_grad():
            model(**inputs)
        col.on_inputs, col.on_outputs = False, True
        with torch.enable_grad():
            masked = masked_copy(
                inputs, state["attended"], state["mask_token_id"], MLM_PROBABILITY, state["gen"], torch
            )
            col.backward(model(**masked).loss)
    else:
        with torch.enable_grad():
            if loss_fn is not None:
                loss = loss_fn(model, inputs)
            elif kind == "labels":
                loss = model(**inputs).loss
            else:  # causal LM: predict the inputs, padding ignored
                ids = inputs["input_ids"]
                loss = model(
                    **inputs, labels=ids.masked_fill(~torch.from_numpy(state["attended"]).to(ids.device), -100)
                ).loss
            col.backward(loss)
    col.end_pass()


def _versions(torch):
    versions = {"created_by": f"blocklowrank {__version__}", "torch": torch.__version__}
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        versions["transformers"] = transformers.__version__
    return versions


def _require_grad(layers):
    """Make the layers' weights require grad (so their outputs carry one); return what to restore."""
    flags = {}
    for module in layers.values():
        weight = module.weight
        if id(weight) not in flags:
            flags[id(weight)] = (weight, weight.requires_grad)
            weight.requires_grad_(True)
    return flags


@validate_params(
    output_grams=["boolean"],
    max_tokens=[Int(1)],
    progress=["boolean"],
    mask_token_id=[Int(0)],
    seed=[Int(0, 2**32 - 1)],
)
def collect_statistics(
    model, batches, *, target_modules=ALL_LINEAR, output_grams=False, loss_fn=None, max_tokens=None,
    progress=True, mask_token_id=None, seed=0,
):  # fmt: skip
    """Run a PyTorch model on batches and collect its calibration statistics.

    Parameters
    ----------
    model : torch.nn.Module
        E.g. a transformers model. It runs in eval mode and is put back as it was.
    batches : iterable
        Each a mapping of model inputs (``input_ids``, ``attention_mask``, ...,
        tensors or NumPy arrays, moved to the model's device), or a tensor of
        input ids. Only tokens the ``attention_mask`` keeps are counted.
    target_modules : "all-linear", str or list of str, default="all-linear"
        The layers, as in :func:`blocklowrank.checkpoints.select_names`
        (PEFT's ``target_modules``) applied to module paths.
    output_grams : bool, default=False
        Also collect ``H`` per layer: the second moment of the gradient of
        the loss at the layer's output.
    loss_fn : callable, optional
        ``loss_fn(model, batch) -> scalar tensor`` (``batch`` as the model
        gets it); it must run the model once on the batch. Default: the
        model's own language-modelling loss (see the module notes).
    max_tokens : int, optional
        Stop after this many counted tokens; the last batch runs whole but
        only its first tokens (row-major) are counted, so every token-level
        site counts exactly ``min(max_tokens, tokens in the batches)``.
    progress : bool, default=True
        A tqdm progress bar (the ``progress`` extra; without it, one warning).
    mask_token_id : int, optional
        For a masked LM's own loss: the tokenizer's mask token (default
        ``model.config.mask_token_id``).
    seed : int, default=0
        Seeds the tokens masked for a masked LM's own loss.

    Returns
    -------
    stats : CalibrationStats
        ``G`` per input site, the layer -> site map, ``H`` per layer when
        asked for, and the metadata (model, dtype, loss, token counts, versions).

    Raises
    ------
    CalibrationError
        If no layer is selected, a selected layer never ran, no token was
        counted, a layer's tensors do not line up with the attention mask,
        the input sharing changes between batches, or there is no loss for ``H``.

    See Also
    --------
    calibrate_folder : the same for a model folder and a text or token file.
    blocklowrank.calibration.save_statistics
    """
    torch = require("torch")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _loss_kind(model, loss_fn, output_grams, True, mask_token_id)  # argument errors before any work
    layers = _select_layers(model, target_modules, torch)
    col = Collector(layers, torch)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    state = {"mask_token_id": mask_token_id or getattr(getattr(model, "config", None), "mask_token_id", None)}
    state["gen"] = torch.Generator().manual_seed(seed)
    kind, flags, handles = None, {}, []
    modes = [(module, module.training) for module in model.modules()]
    counted = sequences = n_batches = 0
    with _bar(progress, total=max_tokens, unit="tok", unit_scale=True, desc="calibrating", leave=False) as bar:
        try:
            handles = [m.register_forward_hook(col.hook(name), with_kwargs=True) for name, m in layers.items()]
            model.eval()
            for batch in batches:
                inputs = as_inputs(batch, device, torch)
                state["attended"] = token_mask(inputs)
                if kind is None:
                    kind = _loss_kind(model, loss_fn, output_grams, "labels" in inputs, mask_token_id)
                    flags = _require_grad(layers) if kind else {}
                budget = None if max_tokens is None else max_tokens - counted
                col.mask = state["attended"] if budget is None else trim(state["attended"], budget)
                _run_batch(model, inputs, col, kind, loss_fn, state, torch)
                counted += int(col.mask.sum())
                sequences += int(col.mask.any(axis=1).sum())
                n_batches += 1
                bar.update(int(col.mask.sum()))
                if max_tokens is not None and counted >= max_tokens:
                    break
        finally:
            for handle in handles:
                handle.remove()
            for weight, flag in flags.values():
                weight.requires_grad_(flag)
            for module, mode in modes:
                module.train(mode)
    return _statistics(model, layers, col, kind, torch, target_modules, counted, sequences, n_batches, max_tokens)


def _statistics(model, layers, col, kind, torch, target_modules, counted, sequences, n_batches, max_tokens):
    """The collected accumulators as CalibrationStats, with the run's metadata."""
    if not counted:
        raise CalibrationError("the batches held no token the attention mask keeps: nothing was collected")
    never = [name for name in layers if name not in col.site_of]
    if never:
        raise CalibrationError(
            f"{len(never)} selected layers never ran on the batches ({', '.join(never[:3])}, ...); "
            "leave them out with target_modules"
        )
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    info = {
        **_versions(torch),
        "model_class": type(model).__name__,
        "target_modules": target_modules if isinstance(target_modules, str) else list(target_modules),
        "sequences": sequences,
        "batches": n_batches,
        "tokens": counted,
        "max_tokens": max_tokens,
    }
    if kind == "masked-lm":
        info.update(mlm_probability=MLM_PROBABILITY)
    inputs = drain(col.inputs, sorted(col.inputs, key=col.order.get))
    outputs = drain(col.outputs, [name for name in layers if name in col.outputs])
    return CalibrationStats(
        *inputs,
        {name: col.site_of[name] for name in layers},
        *outputs,
        model=str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
        model_dtype="" if param is None else str(param.dtype).removeprefix("torch."),
        loss=kind or "",
        info=info,
    )


def _load_folder(folder, transformers):
    """The model of a local folder, as the class its config names (so module paths match its tensors)."""
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json; MODEL must be a local model folder (config + safetensors)")
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    names = getattr(config, "architectures", None) or []
    cls = (getattr(transformers, names[0], None) if names else None) or transformers.AutoModel
    model, loading = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, output_loading_info=True)
    if loading.get("missing_keys"):
        missing = sorted(loading["missing_keys"])
        raise CalibrationError(
            f"{folder}: the checkpoint lacks {len(missing)} weights of {cls.__name__} ({', '.join(missing[:3])}, ...);"
            " they would run with random values"
        )
    return model


@validate_params(
    max_tokens=[Int(1)],
    max_length=[Int(1)],
    batch_size=[Int(1)],
    output_grams=["boolean"],
    overwrite=["boolean"],
    progress=["boolean"],
    dtype=[StrOptions({"float64", "float32"})],
)
def calibrate_folder(
    model_dir, out, *, texts=None, tokens=None, target_modules=ALL_LINEAR,
    max_tokens=None, max_length=None, batch_size=8, output_grams=False, overwrite=False, progress=True, dtype="float64",
):  # fmt: skip
    """Collect the statistics of a local model folder on a text or token file and write them (``calibrate``).

    Parameters
    ----------
    model_dir : str or path-like
        A folder with ``config.json``, safetensors weights and (for
        ``texts``) a tokenizer, read offline; or a Hugging Face cache folder
        or a model id found in the cache (see
        :func:`~blocklowrank.checkpoints.resolve_model`). The model is built as the class
        ``config.json`` names in ``architectures`` (so its module paths are the
        checkpoint's tensor names), else ``AutoModel``; a weight missing from
        the checkpoint is refused (it would be random).
    out : str or path-like
        The statistics file to write (atomically).
    texts : str or path-like, optional
        A UTF-8 file, one text per line (blank lines skipped); each is
        tokenized and truncated to ``max_length`` tokens.
    tokens : str or path-like, optional
        Instead of ``texts``: a ``.npy`` integer array of token ids, 1-D (one
        stream, cut into windows of ``max_length``) or 2-D (one sequence per
        row; negative ids after a row's tokens are padding).
    target_modules, max_tokens, output_grams
        As in :func:`collect_statistics`.
    max_length : int, optional
        Tokens per sequence at most; default the model's position limit, at most 512.
    batch_size : int, default=8
        Sequences per forward pass (right-padded to the longest; padding is
        masked and never counted).
    overwrite : bool, default=False
        Replace an existing ``out``; without it an existing file is refused
        before anything runs.
    progress : bool, default=True
    dtype : {"float64", "float32"}, default="float64"
        Precision of the stored matrices (:func:`save_statistics`).

    Returns
    -------
    stats : CalibrationStats
        What was written to ``out``.
    """
    folder, out = Path(resolve_model(model_dir, role="model")), Path(out)
    if (texts is None) == (tokens is None):
        raise ValueError("pass one of texts (a text file, one per line) and tokens (a .npy file of token ids)")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: no such folder to write {out.name} into")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder")
    transformers = require("transformers")
    require("torch")
    logging = transformers.utils.logging
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # unused-weight notices; missing weights are refused below
    logging.disable_progress_bar()
    try:
        model = _load_folder(folder, transformers)
        tokenizer = None if texts is None else transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 512
    max_length = min(512, limit) if max_length is None else max_length
    if max_length > limit:
        raise ValueError(f"max_length {max_length} exceeds the model's {limit} positions")
    if texts is not None:
        rows = tokenizer(read_texts(texts), truncation=True, max_length=max_length)["input_ids"]
    else:
        rows = read_tokens(tokens, max_length, getattr(config, "vocab_size", None))
    batches = (padded(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size))
    stats = collect_statistics(
        model,
        batches,
        target_modules=target_modules,
        output_grams=output_grams,
        max_tokens=max_tokens,
        progress=progress,
        mask_token_id=getattr(tokenizer, "mask_token_id", None),
    )
    source = {"text_file": str(texts)} if texts is not None else {"token_file": str(tokens)}
    stats.info.update(source, max_length=max_length, batch_size=batch_size)
    save_statistics(out, stats, dtype=dtype, overwrite=overwrite)
    return stats

"""What a layer is, and so how its weight is stored: decided once, from the model's own description.

``nn.Linear`` stores its weight as ``(out_features, in_features)``;
transformers' ``Conv1D`` (GPT-2 and its family) as ``(in_features,
out_features)``; ``nn.Embedding`` as ``(num_embeddings, embedding_dim)``,
which PEFT treats as ``(in, out)`` (its update is ``(B A)^T``). Shapes cannot
tell them apart (a square layer fits both ways), so a layer's *kind* is
decided from what describes the model:

- embeddings by module name (:data:`EMBEDDINGS`; another name containing
  ``embed`` is refused when selected, since it could be either);
- an explicit ``orientation``: ``"out_in"`` (every other layer is stored as
  ``nn.Linear`` does) or ``"in_out"`` (as ``Conv1D`` does);
- else the ``config.json`` beside the checkpoint: its ``model_type`` (or
  ``architectures``) in :data:`CONV1D_MODELS`, the table of every model of
  transformers 5.25 built with ``Conv1D``, and which of its modules are;
- else the fallback the caller has (a PEFT adapter's ``fan_in_fan_out``);
- else a module named like GPT-2's ``Conv1D`` layers (``c_attn``,
  ``q_attn``, ``c_proj``, ``c_fc``) is refused by name with the way out,
  and any other module is ``nn.Linear``.
"""

from __future__ import annotations

from .._io import read_json

__all__ = ["KINDS", "ORIENTATIONS", "CONV1D_MODELS", "EMBEDDINGS", "model_config", "layer_kinds"]

#: A layer's kind: how its weight is stored and which PEFT layer applies to it.
KINDS = ("linear", "conv1d", "embedding")
#: Values of ``orientation``: how every layer that is not an embedding is stored.
ORIENTATIONS = ("out_in", "in_out")

_GPT2 = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
#: ``model_type`` -> last part of the module paths built with transformers' ``Conv1D``
#: (every such model of transformers 5.25; CLVP's attention is ``nn.Linear``, its decoder MLP is not).
CONV1D_MODELS = {
    "gpt2": _GPT2,
    "openai-gpt": _GPT2,
    "imagegpt": _GPT2,
    "decision_transformer": _GPT2,
    "clvp": frozenset({"c_fc", "c_proj"}),
    "clvp_decoder": frozenset({"c_fc", "c_proj"}),
}
_ARCHITECTURES = {  # class-name prefix in ``architectures`` -> model_type
    "GPT2": "gpt2",
    "OpenAIGPT": "openai-gpt",
    "ImageGPT": "imagegpt",
    "DecisionTransformer": "decision_transformer",
    "Clvp": "clvp",
}
#: Last parts of module paths that are ``nn.Embedding`` layers.
EMBEDDINGS = frozenset(
    {
        "wte",
        "wpe",
        "embed_tokens",
        "embed_positions",
        "embed_in",
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
        "shared",
        "relative_attention_bias",
    }
)
_LINEAR_EMBED = frozenset({"embed_out", "embed_proj"})  # GPT-NeoX's output head, DeBERTa's projection


def model_config(checkpoint):
    """The ``config.json`` beside a checkpoint (a dict), or None when there is none.

    Raises ValueError naming the file when it exists but is not a JSON object.
    """
    path = checkpoint.path.parent / "config.json"
    if not path.exists():
        return None
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object (the model's configuration)")
    return config


def _family(config):
    """The model_type a config names (from ``architectures`` when it has none), or None."""
    kind = config.get("model_type")
    if isinstance(kind, str) and kind:
        return kind
    for arch in config.get("architectures") or ():
        for prefix, model_type in _ARCHITECTURES.items():
            if isinstance(arch, str) and arch.startswith(prefix):
                return model_type
    return None


def _families(configs):
    found = {}
    for where, config in configs:
        if config is not None and _family(config) is not None:
            found.setdefault(_family(config), where)
    if len(found) > 1:
        listed = ", ".join(f"{kind!r} ({where})" for kind, where in found.items())
        raise ValueError(f"the checkpoints describe different models: model_type {listed}")
    return next(iter(found), None)


def _way_out(module):
    return (
        f"cannot tell how the weight of {module!r} is stored: transformers' Conv1D (GPT-2 and its family) "
        "stores (in, out), nn.Linear (out, in), and the shapes cannot decide; put the model's config.json "
        "beside the checkpoint, or pass orientation='in_out' (Conv1D) or 'out_in' (nn.Linear), "
        "--orientation on the command line"
    )


def layer_kinds(modules, configs=(), orientation=None, fallback=None):
    """``{module: kind}`` for module paths (see the module notes for the order of the sources).

    Parameters
    ----------
    modules : iterable of str
    configs : iterable of (str, dict or None)
        ``(where, config.json)`` of each checkpoint (:func:`model_config`).
    orientation : {"out_in", "in_out"}, optional
        Given by the user: how every layer that is not an embedding is stored.
    fallback : {"out_in", "in_out"}, optional
        Used when neither ``orientation`` nor a config decides.

    Raises
    ------
    ValueError
        An unknown ``orientation``, one that contradicts the model's
        config.json, configs of different models, a module named like an
        embedding that is not in :data:`EMBEDDINGS`, or a module named like
        GPT-2's ``Conv1D`` layers that nothing decides.
    """
    for name, value in (("orientation", orientation), ("fallback", fallback)):
        if value is not None and value not in ORIENTATIONS:
            raise ValueError(f"{name} must be one of {ORIENTATIONS} or None, got {value!r}")
    family = _families(configs)
    conv1d = CONV1D_MODELS.get(family, frozenset())
    kinds = {}
    for module in modules:
        last = module.rsplit(".", 1)[-1]
        if last in EMBEDDINGS:
            kinds[module] = "embedding"
            continue
        if "embed" in last.lower() and last not in _LINEAR_EMBED:
            raise ValueError(
                f"cannot tell whether {module!r} is an embedding (PEFT's lora_embedding_A/B) or a linear layer "
                "from its name; leave it out with target_modules"
            )
        by_config = None if family is None else ("conv1d" if last in conv1d else "linear")
        given = orientation or (fallback if by_config is None else None)
        by_given = None if given is None else ("conv1d" if given == "in_out" else "linear")
        if by_config is not None and by_given is not None and by_config != by_given:
            raise ValueError(
                f"orientation={orientation!r} contradicts the model's config.json (model_type {family!r}): "
                f"{module!r} is {'a Conv1D' if by_config == 'conv1d' else 'an nn.Linear'} layer there"
            )
        kind = by_config or by_given
        if kind is None:
            if last in _GPT2:
                raise ValueError(_way_out(module))
            kind = "linear"
        kinds[module] = kind
    return kinds

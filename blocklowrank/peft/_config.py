"""What an ``adapter_config.json`` may say: one table of the fields that change what PEFT applies.

A LoRA adapter's ΔW is ``s B A`` with ``s = alpha / r`` (``alpha / sqrt(r)``
with rslora) only when nothing else in its config changes what PEFT does
with it. Every field of PEFT 0.21.2's ``LoraConfig`` and ``GraloraConfig``
that does is in :data:`LORA_FIELDS` / :data:`GRALORA_FIELDS`, with what it
may be; the reader checks them all at its boundary and refuses anything
else, naming the file and the field. Fields not in the tables (dropout,
``layers_to_transform``, task type, ...) choose layers or shape training and
leave ΔW alone. ``init_lora_weights`` values that rewrote the base model when
the adapter was made (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ) make
``base + s B A`` wrong: PEFT rewrites the base again when it loads such an
adapter, so they are refused, with PEFT's conversion that turns them into
plain LoRA.
"""

from __future__ import annotations

import math
import re

from ._patterns import Pattern

__all__ = ["LORA_FIELDS", "GRALORA_FIELDS", "check_config", "KEEP_BASE_INITS", "targeted", "pattern_value"]

#: ``init_lora_weights`` values that leave the base model alone (ΔW = s B A).
KEEP_BASE_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
_CONVERT = (
    "it rewrote the base model's weights when the adapter was made, and PEFT rewrites them again whenever "
    "it loads the adapter, so the update is not s·B·A; convert it to plain LoRA with PEFT first: "
    "peft_model.save_pretrained(out, path_initial_model_for_weight_conversion=<the initial adapter>)"
)
_REWRITING = {
    "pissa": _CONVERT,
    "olora": _CONVERT,
    "corda": _CONVERT,
    "lora_ga": _CONVERT,
    "loftq": "it quantised the base model, so the update against the full-precision base is not s·B·A",
}


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value):
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return f"must be a positive integer, got {value!r}"
    return None


def _positive_number(value):
    if not (_number(value) and math.isfinite(value) and value > 0):
        return f"must be a finite number > 0, got {value!r}"
    return None


def _flag(value):
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def _off(why):
    def check(value):
        return None if value in (None, False, [], {}, "none") else f"is {value!r}: {why}; not supported"

    return check


def _patterns(check_value):
    def check(value):
        if value is None:
            return None
        if not isinstance(value, dict):
            return f"must map module patterns to numbers, got {type(value).__name__}"
        for key, item in value.items():
            problem = check_value(item)
            if problem:
                return f"[{key!r}] {problem}"
            try:
                Pattern(key)
            except re.error as exc:
                return f"key {key!r} is not a regular expression this reader can match ({exc})"
        return None

    return check


def _targets(value):
    if value is None:
        return None
    if isinstance(value, str):
        if value.lower() == "all-linear":
            return None
        try:
            Pattern(value)
        except re.error as exc:
            return f"{value!r} is not a regular expression this reader can match ({exc})"
        return None
    if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
        return f"must be a string or a list of module names, got {value!r}"
    return None


def _init(value):
    if value in KEEP_BASE_INITS and (isinstance(value, bool) or isinstance(value, str)):
        return None
    name = "pissa" if isinstance(value, str) and re.fullmatch(r"pissa(_niter_\d+)?", value) else value
    if isinstance(name, str) and name in _REWRITING:
        return f"is {value!r}: {_REWRITING[name]}"
    return f"is {value!r}, not a value PEFT knows ({', '.join(map(repr, KEEP_BASE_INITS))}, or a base-rewriting one)"


_VARIANT = "a LoRA variant whose update is not the low-rank s·B·A"
#: LoRA fields that change ΔW: field -> (default, check returning a problem or None).
LORA_FIELDS = {
    "r": (8, _positive_int),
    "lora_alpha": (8, _positive_number),
    "rank_pattern": ({}, _patterns(_positive_int)),
    "alpha_pattern": ({}, _patterns(_positive_number)),
    "use_rslora": (False, _flag),
    "fan_in_fan_out": (False, _flag),
    "init_lora_weights": (True, _init),
    "target_modules": (None, _targets),
    "use_dora": (False, _off("DoRA rescales each column of the merged weight")),
    "lora_bias": (False, _off("a bias on lora_B is not a low-rank update")),
    "bias": ("none", _off("the adapter trains the layers' biases too")),
    "alora_invocation_tokens": (None, _off("activated LoRA applies only after its invocation tokens")),
    "use_qalora": (False, _off(_VARIANT)),
    "use_bdlora": (None, _off(_VARIANT)),
    "kasa_config": (None, _off(_VARIANT)),
    "monteclora_config": (None, _off(_VARIANT)),
    "arrow_config": (None, _off("Arrow routes each input among adapters")),
    "layer_replication": (None, _off("the adapter copies layers of the base model")),
    "target_parameters": (None, _off("LoRA on parameters (MoE experts) is not read here")),
}
#: GraLoRA fields that change ΔW (same form).
GRALORA_FIELDS = {
    "r": (32, _positive_int),
    "alpha": (64, _positive_number),
    "gralora_k": (2, _positive_int),
    "hybrid_r": (0, lambda v: None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else "must be >= 0"),
    "fan_in_fan_out": (False, _flag),
    "init_weights": (True, _flag),
    "target_modules": (None, _targets),
    "bias": ("none", _off("the adapter trains the layers' biases too")),
}


def check_config(config, path):
    """The fields of ``config`` that change ΔW, checked (defaults filled in), or ValueError naming the field."""
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    tables = {"LORA": LORA_FIELDS, "GRALORA": GRALORA_FIELDS}
    kind = config.get("peft_type")
    if kind not in tables:
        raise ValueError(f"{path}: peft_type {kind!r} is not one of {sorted(tables)}")
    out = {"peft_type": kind}
    for field, (default, check) in tables[kind].items():
        value = config.get(field, default)
        problem = check(value)
        if problem:
            raise ValueError(f"{path}: {field if field == 'target_modules' else repr(field)} {problem}")
        out[field] = default if value is None and field in ("rank_pattern", "alpha_pattern") else value
    if kind == "GRALORA" and out["r"] % out["gralora_k"]:
        raise ValueError(f"{path}: r={out['r']} is not divisible by gralora_k={out['gralora_k']}")
    return out


def targeted(config, module):
    """Whether ``target_modules`` names ``module`` (PEFT's rule: a regex matches the whole path, a list a suffix)."""
    target = config["target_modules"]
    if target is None or (isinstance(target, str) and target.lower() == "all-linear"):
        return True
    if isinstance(target, str):
        return Pattern(target).fullmatch(module)
    return any(module == t or module.endswith("." + t) for t in target)


def pattern_value(config, field, module, default):
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching a dotted suffix of ``module``."""
    for key, value in config[field].items():
        if Pattern(key).suffix_match(module):
            return value
    return default

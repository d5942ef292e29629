"""PEFT adapter files out of fitted structures, and back in.

:func:`save_peft_adapter` writes a directory that
``peft.PeftModel.from_pretrained(base_model, directory)`` loads:
``adapter_model.safetensors`` and ``adapter_config.json``.
:func:`load_peft_adapter` reads a PEFT LoRA or GraLoRA adapter directory into
:class:`~blocklowrank.factors.StructuredFactors`, one per module;
:func:`adapter_deltas` and :func:`adapter_pairs` give an adapter's ΔW under a
base checkpoint's weight names.

How each structure is written (ΔW has shape ``(out_features, in_features)``):

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

What a layer is decides the rest (``kinds``, from
:class:`~blocklowrank.checkpoints.LayerPair`): transformers' ``Conv1D``
layers (GPT-2), which store ``(in, out)``, are written with
``fan_in_fan_out: true``, as PEFT requires (the factors are the same:
``lora_A`` is ``[r, in]``, ``lora_B`` ``[out, r]``); embeddings as PEFT's
``lora_embedding_A``/``lora_embedding_B`` (LoRA only: GraLoRA cannot hold
them). Reading honours the same: PEFT's ``fan_in_fan_out`` and embedding
keys, and every config field that changes the update (:data:`LORA_FIELDS`,
:data:`GRALORA_FIELDS`), refusing what would not be ``s B A``.

The scale is 1: LoRA gets ``lora_alpha = r`` (``alpha_pattern`` where a
layer's rank differs from ``r``), GraLoRA ``alpha = r + hybrid_r``, so PEFT's
``Delta W`` equals ours with no rescaled factors. Formats checked against
PEFT 0.21.2 (``peft/tuners/lora``, ``peft/tuners/gralora``,
``peft/utils/save_and_load.py``); the test suite loads the files with it.

This package never imports torch.
"""

from ._config import GRALORA_FIELDS, KEEP_BASE_INITS, LORA_FIELDS
from ._read import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_deltas, adapter_pairs, load_peft_adapter
from ._write import ADAPTER_FILES, PEFT_TYPES, save_peft_adapter

__all__ = [
    "save_peft_adapter",
    "load_peft_adapter",
    "adapter_pairs",
    "adapter_deltas",
    "ADAPTER_WEIGHTS",
    "ADAPTER_CONFIG",
    "ADAPTER_FILES",
    "PEFT_TYPES",
    "LORA_FIELDS",
    "GRALORA_FIELDS",
    "KEEP_BASE_INITS",
]

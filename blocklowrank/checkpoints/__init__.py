"""Checkpoints: safetensors reading and writing, layer selection and ΔW streaming.

Everything here works with NumPy alone; torch is never imported, and
pickle-based checkpoints are refused rather than unpickled. This package
reads and writes files only; what analyses them (the checkpoint study,
:mod:`blocklowrank.study`, and adapter extraction, :mod:`blocklowrank.extract`)
sits above it.

- safetensors files: :class:`Checkpoint` (lazy, chunk-by-chunk reader of
  single files, sharded sets and folders), :func:`open_checkpoint`,
  :func:`save_file`, :func:`load_file`, :func:`safetensors_size` (the size
  ``save_file`` would write), :class:`CheckpointError`.
- model references: :func:`resolve_model` (a path, a Hugging Face cache
  folder or a model id, cached or downloaded), :func:`hf_cache_dir`;
  :func:`module_roles` (a module path's role in its block, for tables).
- layers: :func:`select_names` (PEFT's ``target_modules`` rules),
  :func:`pair_layers` (base vs fine-tuned, with a report of everything not
  paired, each layer's kind decided from the model's ``config.json``:
  ``nn.Linear``, transformers' ``Conv1D`` stored as ``(in, out)``, or
  ``nn.Embedding``; :func:`layer_kinds`, :func:`model_config`,
  :data:`KINDS`, :data:`CONV1D_MODELS`, :data:`EMBEDDINGS`, :data:`ORIENTATIONS`), :func:`iter_deltas` (ΔW one layer at a time, always
  ``(out_features, in_features)``) and :func:`changed_tensors` (what else
  changed, compared chunk by chunk).
"""

from ._names import hf_cache_dir, module_roles, resolve_model
from ._orientation import CONV1D_MODELS, EMBEDDINGS, KINDS, ORIENTATIONS, layer_kinds, model_config
from ._safetensors import (
    MAX_HEADER_BYTES,
    Checkpoint,
    CheckpointError,
    TensorInfo,
    load_file,
    open_checkpoint,
    safetensors_size,
    save_file,
)
from ._select import (
    ALL_LINEAR,
    LayerPair,
    PairingReport,
    changed_tensors,
    iter_deltas,
    module_of,
    pair_layers,
    select_names,
)

__all__ = [
    "resolve_model",
    "hf_cache_dir",
    "module_roles",
    "KINDS",
    "ORIENTATIONS",
    "layer_kinds",
    "model_config",
    "CONV1D_MODELS",
    "EMBEDDINGS",
    "changed_tensors",
    "ALL_LINEAR",
    "LayerPair",
    "PairingReport",
    "iter_deltas",
    "module_of",
    "pair_layers",
    "select_names",
    "MAX_HEADER_BYTES",
    "Checkpoint",
    "CheckpointError",
    "TensorInfo",
    "load_file",
    "open_checkpoint",
    "save_file",
    "safetensors_size",
]

"""Checkpoints: safetensors reading and writing, layer selection and ΔW streaming.

Everything here works with NumPy alone; torch is never imported, and
pickle-based checkpoints are refused rather than unpickled.

- :mod:`~blocklowrank.checkpoints.safetensors`: :class:`Checkpoint` (lazy,
  chunk-by-chunk reader of single files, sharded sets and folders),
  :func:`save_file`, :func:`load_file`, :class:`CheckpointError`.
- :mod:`~blocklowrank.checkpoints.select`: :func:`select_names` (PEFT's
  ``target_modules`` rules), :func:`pair_layers` (base vs fine-tuned, with a
  report of everything not paired) and :func:`iter_deltas` (ΔW one layer at a
  time).
- :mod:`~blocklowrank.checkpoints.study`: :func:`run_study` (every layer by
  every registered structure at matched budgets, model-wide allocation,
  resumable and parallel) and :func:`allocate_model_wide`;
  :mod:`~blocklowrank.checkpoints.plots` writes its tables, summary and figures.
"""

from .safetensors import (
    MAX_HEADER_BYTES,
    Checkpoint,
    CheckpointError,
    TensorInfo,
    load_file,
    open_checkpoint,
    save_file,
)
from .select import ALL_LINEAR, LayerPair, PairingReport, iter_deltas, module_of, pair_layers, select_names
from .study import allocate_model_wide, effective_rank, run_study

__all__ = [
    "run_study",
    "allocate_model_wide",
    "effective_rank",
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
]

"""PEFT adapters extracted from a full fine-tune.

:func:`extract_adapter` pairs a base checkpoint with its fine-tuned version
(:func:`~blocklowrank.checkpoints.pair_layers`), streams ``ΔW = W_ft - W_base``
one layer at a time (:func:`~blocklowrank.checkpoints.iter_deltas`), fits each
with a registered structure (:func:`~blocklowrank.structures.approximate`) and
writes the fits as one PEFT adapter directory
(:func:`~blocklowrank.peft.save_peft_adapter`): LoRA for the global and
diagonal structures, GraLoRA for K x K grids (see the structure's ``peft``
field), beside ``extract_report.json`` (the report, as JSON).
``blocklowrank extract BASE FINETUNED --out DIR`` is the same on the command
line. The models are local paths, Hugging Face cache folders or model ids
(:func:`~blocklowrank.checkpoints.resolve_model`).

:func:`plan_extraction` is the dry run: the layers, their ranks, the parameter
count and the adapter file's size, from the checkpoints' headers alone.

:func:`blocklowrank.peft.adapter_deltas` goes the other way: the ΔW of each
layer of an adapter directory under the base checkpoint's weight names, so
that anything that takes ``(name, ΔW)`` pairs (the model study) can take an
adapter in place of a fine-tuned checkpoint.

With ``calibration`` (statistics of ``blocklowrank calibrate``) every layer is
fitted in its data metric, the error of its outputs on the calibration inputs,
and the report gives each layer's ``output_error`` (see :func:`extract_adapter`).

Only what a PEFT adapter holds is extracted: the 2-D weights chosen by
``target_modules`` (``"all-linear"`` leaves out embeddings and output heads),
and whole modules named by ``modules_to_save``. Everything else that changed
(embeddings, heads, biases, norms) is flagged in the report as a change the
adapter loses. Nothing here imports torch.
"""

from ._plan import STORE_DTYPES, ExtractPlan, plan_extraction
from ._run import REPORT_FILE, ExtractReport, extract_adapter

__all__ = ["extract_adapter", "ExtractReport", "plan_extraction", "ExtractPlan", "STORE_DTYPES", "REPORT_FILE"]

"""Calibration statistics: the second moments that let a fit aim at a model's error.

A layer ``y = W x`` is used on its model's activations, not on arbitrary
inputs. The error of a replacement ``M`` over real inputs is
``tr((W - M) G (W - M)ᵀ)`` with ``G = Σ x xᵀ / n`` the (uncentred) second
moment of the layer's inputs, and a loss-weighted version also weights the
output side by ``H = Σ g gᵀ / n``, the second moment of the loss gradient
``g`` at the layer's output. This package holds those statistics (NumPy only):

- :class:`GramAccumulator`: a streaming float64 sum of ``x xᵀ`` with its
  count; partial sums over shards merge (``a + b``).
- :class:`CalibrationStats`: one model's statistics: ``G`` per *input site*
  (layers that read the same tensor -- q/k/v, gate/up -- share one), the map
  from layer to site, ``H`` per layer where collected, and what they came from.
- :func:`save_statistics`, :func:`load_statistics`: the file (below).
- :func:`check_statistics`: refuses statistics that do not fit a model's
  layers, in one line naming the file and the entry (:class:`CalibrationError`).

The collector that runs a PyTorch model is
:func:`blocklowrank.calibration.collect.collect_statistics` (the ``calibrate``
extra; the one module of the library that imports torch, lazily), and on the
command line ``blocklowrank calibrate MODEL --texts FILE --out stats.safetensors``.

The file format (version 1)
---------------------------
One safetensors file (written by :func:`blocklowrank.checkpoints.save_file`,
readable by any safetensors reader):

Tensors
    ``G.<site>``
        float64 (``F64``; ``F32`` when saved with ``dtype="float32"``),
        shape ``(n_in, n_in)``: the second moment ``Σ x xᵀ / count`` of the
        inputs of the layers reading input site ``<site>``, over the tokens
        the attention mask keeps. The sum is ``count · G``; two files over
        disjoint data merge as the count-weighted mean. Exactly symmetric.
        ``<site>`` is the module path of the first of its layers in the
        model's module order, e.g. ``G.encoder.layer.0.attention.self.query``
        is read by that layer's query, key and value.
    ``H.<layer>`` (optional, per layer)
        Same precision, shape ``(n_out, n_out)``: ``Σ g gᵀ / count`` over the
        same tokens, ``g`` the gradient of the batch's loss (as the loss
        function returns it, e.g. a mean over the batch) at the layer's output.
    No other tensor.

``__metadata__`` (string values; the structured ones are JSON)
    ``format``: ``"blocklowrank.calibration"``; ``format_version``: ``"1"``.
    ``layer_sites``: JSON object, layer module path -> its site (a key of a
    ``G.`` entry). Every layer has one; every site is read by some layer.
    ``input_counts``: JSON object, site -> number of samples (tokens) behind
    ``G``, an integer >= 1. ``output_counts``: JSON object, layer -> number of
    samples behind ``H`` (``{}`` without ``H``), equal to its site's count
    (the same tokens). Every entry has a count and every count an entry.
    ``model``: the model's id or path; ``model_dtype``: the dtype it ran in
    (e.g. ``"float32"``, ``"bfloat16"``); ``loss``: what ``H`` is the
    gradient of (``"causal-lm"``, ``"masked-lm"``, ``"labels"``,
    ``"loss_fn:<name>"``; ``""`` without ``H``).
    ``info``: JSON object: ``created_by`` (``"blocklowrank <version>"``),
    library versions, ``model_class``, ``target_modules``, ``sequences``,
    ``batches``, ``tokens`` (kept by the mask), ``max_tokens``.

A layer's shapes are those of its map ``y = W x``: ``G`` is ``in × in`` and
``H`` is ``out × out`` whatever the weight's storage (GPT-2's ``Conv1D``
stores ``W`` as (in, out)). Size: ``8 n_in²`` bytes per site (float64):
about 1.6 MiB for MiniLM's 384-wide sites, 128 MiB for a 4096-wide one.

Examples
--------
>>> import tempfile, pathlib
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> acc = GramAccumulator(4).update(rng.standard_normal((2, 5, 4)), mask=[[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
>>> stats = CalibrationStats.from_accumulators({"l.q": acc}, {"l.q": "l.q", "l.k": "l.q"}, model="toy")
>>> tmp = tempfile.TemporaryDirectory()
>>> path = save_statistics(pathlib.Path(tmp.name) / "stats.safetensors", stats)
>>> with load_statistics(path) as loaded:
...     check_statistics(loaded, {"l.q": (4, 4), "l.k": (2, 4)}).input_count("l.k")
8
>>> with load_statistics(path) as loaded:
...     check_statistics(loaded, {"l.v": (4, 4)})  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
    ...
blocklowrank.calibration.CalibrationError: .../stats.safetensors: layer 'l.v': no input statistics ...
>>> tmp.cleanup()
"""

from ._accumulator import GramAccumulator
from ._stats import (
    FORMAT,
    FORMAT_VERSION,
    CalibrationError,
    CalibrationStats,
    check_statistics,
    load_statistics,
    save_statistics,
)

__all__ = [
    "GramAccumulator",
    "CalibrationStats",
    "CalibrationError",
    "save_statistics",
    "load_statistics",
    "check_statistics",
    "FORMAT",
    "FORMAT_VERSION",
]

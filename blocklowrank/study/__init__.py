"""The checkpoint study: every layer of a model approximated by every registered structure.

For each selected layer of a checkpoint pair, the weight update
``ΔW = W_finetuned - W_base`` (or, with one checkpoint, the weight ``W``
itself: compression) is approximated by every registered structure
(:func:`~blocklowrank.structures.structures`) at a matched parameter budget,
with :func:`~blocklowrank.compare.compare_at_budget` (every configuration of
every grid size, uniform ranks and budget-optimal per-block ranks).

Budgets
-------
Per layer, as a LoRA-equivalent rank (``budget_rank=r``: ``r (m + n)``
parameters for an ``m x n`` layer) or as a fraction of the layer's size
(``budget_fraction=f``: ``floor(f m n)``). With ``total_budget=P`` the
model-wide total is ``P`` and each layer's own budget is the largest common
LoRA-equivalent rank ``t = P / sum (m + n)`` (a fraction), ``floor(t (m + n))``.

Model-wide allocation
---------------------
For every layout structure (``Structure.spectral``) and grid size, one total
budget is spread over all layers and all their blocks at once: every block of
every layer contributes its squared singular values ``sigma_k^2`` (the energy
rank ``k`` would capture) at cost ``m_i + n_j`` per rank, and
:func:`~blocklowrank.allocate_ranks` is called once on the
concatenation (:func:`allocate_model_wide`). It minimises the total discarded
energy ``sum_l ||ΔW_l - approx_l||_F^2``, i.e. the model-wide relative error
``sqrt(sum discarded / sum ||ΔW_l||_F^2)``:

- equal costs (every block of every layer with the same ``m_i + n_j``): keeping
  the largest ``sigma^2`` is exactly optimal by the exchange argument;
- unequal costs: the exact dynamic programme while it is small, else greedy by
  gain per parameter. The greedy keeps every item before the first that does not
  fit in gain-per-parameter order, so it is within that item's gain (at most the
  largest single ``sigma^2``) of the fractional (LP) optimum, hence of the
  optimum. The study reports the certified gap: ``error_lower_bound`` comes
  from the LP optimum, and the optimal error lies between it and ``error``.

It is reported against the *uniform* allocation at the same total: every layer
gets the study's per-layer budget (the same LoRA-equivalent rank, or the same
fraction), spent optimally inside the layer. The uniform allocation is one of
those the model-wide one chooses among, so the model-wide error is never
larger when the allocation is exact; a greedy result worse than the uniform
one is replaced by it (``fallback``).

In a data metric
----------------
With ``calibration`` (statistics of ``blocklowrank calibrate``) every layer is
fitted in its metric ``tr(H (ΔW - M) G (ΔW - M)ᵀ)`` and its spectra are those
of its blocks' targets in that metric. The layers' metrics have their own
units, so the model-wide allocation then minimises the sum of the layers'
*relative* squared output errors ``sum_l f_l(M_l) / f_l(0)`` (each layer's
spectrum divided by its own total: the same allocation over the
concatenation), and its ``error`` is their root mean square
(``measure = "output"``). It is exact where each layer's spectra give its
fits' errors (global and diagonal grids; a full grid's blocks are coupled by
the metric) and the allocation is exact.

Effective rank
--------------
Per layer, the entropy effective rank of Roy & Vetterli (2007):
``exp(-sum_k p_k log p_k)`` with ``p_k = sigma_k / sum_j sigma_j`` over the
singular values of the matrix studied (0 for a zero matrix). It lies between
1 and ``min(m, n)``; a rank-``r`` matrix with equal singular values has
effective rank ``r``.

Long runs
---------
Layers run through :func:`joblib.Parallel` (``n_jobs``), each worker opening
the checkpoint files by path and reading only its own layer, so peak memory is
a few layers' worth whatever the model size. Any joblib backend works without
code change, e.g. Dask (workers must see the checkpoint and output paths)::

    from dask.distributed import Client
    import joblib
    client = Client("scheduler:8786")
    with joblib.parallel_config(backend="dask"):
        run_study("base.safetensors", "tuned.safetensors", out="study", n_jobs=-1)

(Ray: ``from ray.util.joblib import register_ray; register_ray()``, then
``backend="ray"``.) A ``tqdm`` bar counts the layers. With ``out``, each
finished layer is one JSON line of ``out/study.jsonl``
(:class:`~blocklowrank.sweep.RunLog`) and its spectra one file in
``out/spectra/``: a killed study started again with the same settings and
inputs redoes only the layers not logged (a torn last line included).
``out/study.json`` records the settings and a fingerprint of every input
file (size, modification time, identity, header hash; an adapter's files
and the models' ``config.json`` hashed whole): a study of other inputs or
settings, or a log without its ``study.json``, is refused; a logged layer
whose record is damaged, made for another study, or whose spectra file no
longer has the SHA-256 it was written with is computed again.

References
----------
.. [1] O. Roy and M. Vetterli, "The effective rank: a measure of effective
   dimensionality", EUSIPCO 2007.

Contents: :func:`run_study`, :func:`allocate_model_wide`, :func:`effective_rank`;
:func:`write_study` writes a study's tables, summary (:func:`summary_markdown`)
and figures (:func:`plot_error_heatmap`, :func:`plot_error_vs_budget`; these
need matplotlib, the ``plots`` extra).
"""

from ._model_wide import MODEL_WIDE_COLUMNS, allocate_model_wide
from ._report import plot_error_heatmap, plot_error_vs_budget, summary_markdown, write_study
from ._run import DEFAULT_N_BLOCKS, STUDY_COLUMNS, run_study
from ._spectra import effective_rank

__all__ = [
    "run_study",
    "allocate_model_wide",
    "effective_rank",
    "write_study",
    "summary_markdown",
    "plot_error_heatmap",
    "plot_error_vs_budget",
    "STUDY_COLUMNS",
    "MODEL_WIDE_COLUMNS",
    "DEFAULT_N_BLOCKS",
]

"""Fits in a data metric: the model's error instead of the matrix's (issue 19, the mathematics).

A layer computes ``y = W x``. Over its calibration inputs (rows of ``X``) the
error of a replacement ``M`` is ``||(W - M) X^T||_F^2 = n_samples tr((W - M) G (W - M)^T)``
with ``G = X^T X / n_samples``; an optional output weight ``H`` (e.g. the
second moment of the loss gradient at the layer's output) gives the objective

    ``f(M) = ||H^{1/2} (W - M) G^{1/2}||_F^2 = tr(H (W - M) G (W - M)^T)``,

and ``output_error = sqrt(f(M) / f(0))``. ``G = H = I`` is the plain Frobenius fit.

Pure array functions on one matrix; the engine (``fit_layout``,
``approximate``), the structures, the estimators and the spectra use them.
Public names (``GramFactor``, ``GRAM_DAMPING``, ``output_error``,
``metric_energy``) live at the package root:

- :class:`GramFactor` -- a validated Gram and its factor, built once per input
  site, shared by the layers reading that input; the damping rule
  ``G + delta mean(diag G) I`` (``gram_damping``, default :data:`GRAM_DAMPING`).
- :func:`fit_global` -- the exact global (LoRA) fit, one side or two; LAPACK,
  randomized through products only, or certified "auto".
- :func:`fit_blocks` -- any grid: exact where the blocks decouple (MELoRA's
  diagonal with ``H`` absent; block-diagonal Grams), block-coordinate descent
  elsewhere.
- :func:`fit_majorize` -- majorisation-minimisation for any structure with a
  plain fitter (BLAST).
- :func:`metric_block_spectra` -- per-block metric spectra for the rank
  allocation (:class:`MetricSpectra`).
- :func:`output_error`, :func:`metric_energy` -- the objective, cheaply from
  factors.

Units: Grams are stored divided by a power of two near their mean diagonal
(exact); fits do not depend on the scale of ``G`` or ``H``.
"""

from ._blocks import BCD_TOL, MetricSpectra, fit_blocks, metric_block_spectra
from ._global import MetricOperator, fit_global
from ._gram import GRAM_DAMPING, GramFactor, IdentityGram, as_gram, max_asymmetry
from ._mm import MajorizeFit, fit_majorize
from ._objective import MetricFit, metric_energy, output_error

__all__ = [
    "GRAM_DAMPING",
    "BCD_TOL",
    "GramFactor",
    "IdentityGram",
    "as_gram",
    "max_asymmetry",
    "MetricFit",
    "MetricSpectra",
    "MajorizeFit",
    "MetricOperator",
    "fit_global",
    "fit_blocks",
    "fit_majorize",
    "metric_block_spectra",
    "metric_energy",
    "output_error",
]

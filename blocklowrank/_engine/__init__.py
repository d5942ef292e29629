"""The numerical engine: batched truncated SVD over the blocks of a layout, plain or in a data metric.

:func:`fit_layout` checks its arguments and dispatches: without a Gram, the
plain engine (``_plain``: plan -> SVD -> allocate -> truncate -> error, one
batched SVD per group of equal-shaped blocks); with ``input_gram`` /
``output_gram``, the fits in a data metric (``_metric``). Every fit returns an
:class:`Approximation` (``_results``); ``_spectra`` gives singular values only
(:func:`block_spectra`) and allocates one budget over many layers.
"""

from ._fit import fit_layout
from ._plain import _block_energies, _fit_layout  # noqa: F401  (used by the hybrid and compare)
from ._results import Approximation, FitReport
from ._spectra import BlockSpectra, allocate_total_budget, block_spectra

__all__ = ["fit_layout", "Approximation", "FitReport", "BlockSpectra", "block_spectra", "allocate_total_budget"]

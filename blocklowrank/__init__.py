"""blocklowrank: structured low-rank matrix approximation.

One block layout (:class:`BlockLayout`) describes the grid structures: global
low rank (LoRA), diagonal blocks (MELoRA) and full K x K blocks (Localized
LoRA / GraLoRA); one engine fits them with batched truncated SVDs; one
registry (:mod:`blocklowrank.structures`) declares every structure, the hybrid
(blocks plus a global term) and BLAST (shared bases) included; and every fit
returns its factors in one container (:class:`StructuredFactors`).
"""

from ._allocation import allocate_ranks
from ._engine import Approximation, FitReport, block_spectra, fit_layout
from ._svd import batched_svd
from ._version import __version__ as __version__
from .budget import RecordList, budget_sweep_points, count_params, match_budget
from .compare import compare_at_budget
from .convert import rank_report, save_factors
from .estimators import single_fit_cv
from .factors import FactorsFileError, StructuredFactors, load_factors
from .layout import BlockLayout, split_sizes
from .structures import (
    BlockLowRank,
    DiagonalBlockLowRank,
    GlobalLowRank,
    HybridLowRank,
    SharedBasisLowRank,
    approximate,
    fit_hybrid,
    fit_shared_basis,
    get_structure,
    hybrid_params,
    register,
    shared_basis_params,
    structure_names,
)

__all__ = [
    "BlockLayout",
    "split_sizes",
    "Approximation",
    "FitReport",
    "StructuredFactors",
    "approximate",
    "fit_layout",
    "block_spectra",
    "allocate_ranks",
    "batched_svd",
    "GlobalLowRank",
    "DiagonalBlockLowRank",
    "BlockLowRank",
    "HybridLowRank",
    "SharedBasisLowRank",
    "fit_hybrid",
    "fit_shared_basis",
    "hybrid_params",
    "shared_basis_params",
    "get_structure",
    "structure_names",
    "register",
    "single_fit_cv",
    "save_factors",
    "load_factors",
    "FactorsFileError",
    "rank_report",
    "count_params",
    "match_budget",
    "compare_at_budget",
    "budget_sweep_points",
    "RecordList",
]

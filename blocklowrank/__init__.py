"""blocklowrank: structured low-rank matrix approximation.

One block layout (:class:`BlockLayout`) describes every structure: global
low rank (LoRA), diagonal blocks (MELoRA) and full K x K blocks (Localized
LoRA / GraLoRA). One engine (:func:`approximate`) fits any layout with
batched truncated SVDs.
"""

__version__ = "0.1.0"

from .layout import BlockLayout, split_sizes
from ._engine import Approximation, allocate_ranks, approximate, batched_svd
from .estimators import BlockLowRank, DiagonalBlockLowRank, GlobalLowRank
from .hybrid import HybridLowRank, fit_hybrid, hybrid_params
from .shared_basis import SharedBasisLowRank, fit_shared_basis, shared_basis_params
from .convert import load_factors, rank_report, save_factors
from .budget import RecordList, budget_sweep_points, compare_at_budget, count_params, match_budget

__all__ = [
    "BlockLayout",
    "split_sizes",
    "Approximation",
    "approximate",
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
    "save_factors",
    "load_factors",
    "rank_report",
    "count_params",
    "match_budget",
    "compare_at_budget",
    "budget_sweep_points",
    "RecordList",
]

"""blocklowrank: structured low-rank matrix approximation.

One block layout (:class:`BlockLayout`) describes the grid structures: global
low rank (LoRA), diagonal blocks (MELoRA) and full K x K blocks (Localized
LoRA / GraLoRA); one engine fits them with batched truncated SVDs; one
registry (:mod:`blocklowrank.structures`) declares every structure, the hybrid
(blocks plus a global term) and BLAST (shared bases) included; and every fit
returns its factors in one container (:class:`StructuredFactors`).

The names below are loaded on first use (``import blocklowrank`` imports no
submodule, so the command line starts without scikit-learn): ``from
blocklowrank import approximate`` and ``blocklowrank.approximate`` work as
usual, and so does ``blocklowrank.<subpackage>``.
"""

import importlib
import importlib.util

from ._version import __version__ as __version__

#: Each public name of the core API -> the module it comes from (imported on first use).
_EXPORTS = {
    "BlockLayout": "layout",
    "split_sizes": "layout",
    "Approximation": "_engine",
    "FitReport": "_engine",
    "StructuredFactors": "factors",
    "approximate": "structures",
    "fit_layout": "_engine",
    "block_spectra": "_engine",
    "allocate_total_budget": "_engine",
    "GramFactor": "_metric",
    "GRAM_DAMPING": "_metric",
    "output_error": "_metric",
    "metric_energy": "_metric",
    "allocate_ranks": "_allocation",
    "batched_svd": "_svd",
    "GlobalLowRank": "structures",
    "DiagonalBlockLowRank": "structures",
    "BlockLowRank": "structures",
    "HybridLowRank": "structures",
    "SharedBasisLowRank": "structures",
    "fit_hybrid": "structures",
    "fit_shared_basis": "structures",
    "hybrid_params": "structures",
    "shared_basis_params": "structures",
    "get_structure": "structures",
    "structure_names": "structures",
    "register": "structures",
    "single_fit_cv": "estimators",
    "save_factors": "convert",
    "load_factors": "factors",
    "FactorsFileError": "factors",
    "rank_report": "convert",
    "count_params": "budget",
    "match_budget": "budget",
    "compare_at_budget": "compare",
    "budget_sweep_points": "budget",
    "RecordList": "budget",
    "OptionError": "_validation",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    """Import a public name (or a subpackage) of the package on first use."""
    if name in _EXPORTS:
        try:
            module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        except AttributeError as exc:  # raised here it would read "no attribute {name}": say what failed
            raise ImportError(f"importing {__name__}.{_EXPORTS[name]} failed: {exc}") from exc
        value = getattr(module, name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))

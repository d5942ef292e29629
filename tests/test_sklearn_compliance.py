"""scikit-learn's estimator checks over every estimator of the library, in one module."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from blocklowrank import (
    BlockLowRank,
    DiagonalBlockLowRank,
    GlobalLowRank,
    HybridLowRank,
    SharedBasisLowRank,
)

_ROW_POSITION = (
    "with several block-rows a row's block-row is fixed by its position, so transform "
    "needs all fitted rows in their fitted order"
)


def _expected_failed_checks(estimator):
    kr = 1
    if hasattr(estimator, "n_blocks"):
        nb = estimator.n_blocks
        kr = nb[0] if isinstance(nb, (tuple, list)) else nb
    if kr > 1:
        return {
            "check_methods_subset_invariance": _ROW_POSITION,
            "check_methods_sample_order_invariance": _ROW_POSITION,
            "check_fit_idempotent": _ROW_POSITION + " (it transforms held-out rows)",
        }
    return {}


ESTIMATORS = [
    GlobalLowRank(rank=1),
    GlobalLowRank(budget=1000),
    GlobalLowRank(rank=1, svd_solver="randomized", random_state=0),
    BlockLowRank(n_blocks=2, rank=1),
    BlockLowRank(n_blocks=(1, 2), rank=1),
    BlockLowRank(n_blocks=2, budget=1000),
    BlockLowRank(n_blocks=2, tol=0.5),
    DiagonalBlockLowRank(n_blocks=2, rank=1),
    DiagonalBlockLowRank(n_blocks=2, rank=1, row_perm="strided", col_perm="strided"),
    HybridLowRank(n_blocks=2, rank=1, global_rank=1),
    HybridLowRank(n_blocks=(1, 2), rank=1, global_rank=1),
    HybridLowRank(n_blocks=2, rank=1, global_rank=1, pattern="diagonal", init="blocks"),
    HybridLowRank(n_blocks=1, rank=1, global_rank=0),
    SharedBasisLowRank(n_blocks=2, rank=1),
    SharedBasisLowRank(n_blocks=(1, 2), rank=1),
    SharedBasisLowRank(n_blocks=1, rank=1, init="random", random_state=0),
]


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=_expected_failed_checks)
def test_sklearn_compatible(estimator, check):
    check(estimator)

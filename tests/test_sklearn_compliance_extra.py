"""scikit-learn's estimator checks over the structures beyond the paper (hybrid, shared basis)."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from blocklowrank.hybrid import HybridLowRank
from blocklowrank.shared_basis import SharedBasisLowRank

_ROW_POSITION = (
    "with several block-rows a row's block-row is fixed by its position, so transform "
    "needs all fitted rows in their fitted order"
)


def _expected_failed_checks(estimator):
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

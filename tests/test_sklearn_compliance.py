"""scikit-learn's estimator checks over every registered structure's estimator, in one module.

Every structure of the registry is checked on its defaults and on small grids
(``blocklowrank.testing.conformance.structure_estimators``); the list below adds the
parameter sets worth checking on top. Expected failures only where a check
cannot apply (``blocklowrank.testing.conformance.expected_failed_checks``: the row-position
checks of grids with several block-rows).
"""

from sklearn.utils.estimator_checks import parametrize_with_checks

from blocklowrank import BlockLowRank, DiagonalBlockLowRank, GlobalLowRank, HybridLowRank, SharedBasisLowRank
from blocklowrank.structures import structures
from blocklowrank.testing.conformance import expected_failed_checks, structure_estimators

ESTIMATORS = [est for s in structures() for est in structure_estimators(s)] + [
    GlobalLowRank(budget=1000),
    GlobalLowRank(rank=1, svd_solver="randomized", random_state=0),
    BlockLowRank(n_blocks=2, budget=1000),
    BlockLowRank(n_blocks=2, max_error=0.5),
    DiagonalBlockLowRank(n_blocks=2, rank=1, row_perm="strided", col_perm="strided"),
    HybridLowRank(n_blocks=2, rank=1, global_rank=1, pattern="diagonal", first_step="blocks"),
    HybridLowRank(n_blocks=1, rank=1, global_rank=0),
    SharedBasisLowRank(n_blocks=1, rank=1, init="random", random_state=0),
]


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=expected_failed_checks)
def test_sklearn_compatible(estimator, check):
    check(estimator)

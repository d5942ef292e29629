"""The registry is the one place a structure is declared: a sixth structure added through
it alone gets the library's estimator, counts, budget matching, comparisons, files and the
shared checks, with no edit anywhere else."""

import numpy as np
import pytest

from blocklowrank import approximate, compare_at_budget, count_params, match_budget
from blocklowrank.structures import get_structure, layout_structure, registered, structure_names, structures
from blocklowrank.testing.conformance import check_structure


def _upper(kr, kc):
    """Blocks on and above the diagonal: an upper-triangular block pattern."""
    return np.triu(np.ones((kr, kc), dtype=bool))


TOY = layout_structure("upper", "Upper blocks", "blocks on and above the diagonal, B_ij A_ij of rank r", _upper)


def _reference_error(X, K, r):
    """Independent per-block SVD loop: rank r on the upper blocks, the others dropped."""
    tot = kept = 0.0
    rows, cols = np.array_split(np.arange(X.shape[0]), K), np.array_split(np.arange(X.shape[1]), K)
    for i, ri in enumerate(rows):
        for j, cj in enumerate(cols):
            s = np.linalg.svd(X[np.ix_(ri, cj)], compute_uv=False)
            tot += (s**2).sum()
            kept += (s[:r] ** 2).sum() if j >= i else 0.0
    return np.sqrt((tot - kept) / tot)


def test_a_sixth_structure_through_the_registry_alone():
    X = np.random.default_rng(0).standard_normal((12, 10))
    with registered(TOY):
        assert "upper" in structure_names() and get_structure("upper") is TOY
        check_structure("upper")  # scikit-learn compliance, counts, budget, save/load round trip
        res = approximate(X, method="upper", n_blocks=3, rank=1)
        assert res.error == pytest.approx(_reference_error(X, 3, 1), rel=1e-12)
        # rows 4,4,4 and columns 4,3,3: upper blocks (0,0..2), (1,1..2), (2,2)
        assert count_params("upper", (12, 10), n_blocks=3, rank=1) == 3 * 4 + 10 + 2 * (4 + 3) + (4 + 3)
        recs = match_budget((12, 10), 60, methods=["upper", "global"], n_blocks=[2, 3])
        assert {r["method"] for r in recs} == {"upper", "global"}
        rows = compare_at_budget(X, 60, methods=["upper"], n_blocks=[2])
        assert {r["allocation"] for r in rows} == {"uniform", "optimal"}
        est = TOY.estimator(n_blocks=2, rank=1).fit(X)
        assert est.n_params_ == count_params("upper", X.shape, n_blocks=2, rank=1)
    assert "upper" not in structure_names()  # registered only inside the block


@pytest.mark.parametrize("name", [s.name for s in structures()])
def test_every_registered_structure_passes_the_shared_checks(name):
    """Counts, budget matching and the save/load round trip (compliance has its own module)."""
    check_structure(name, sklearn=False)


def test_one_spelling():
    with pytest.raises(ValueError, match="registered structure"):
        get_structure("shared")
    assert structure_names() == ("global", "diagonal", "block", "hybrid", "shared_basis")
    assert structure_names(paper=True) == ("global", "diagonal", "block")

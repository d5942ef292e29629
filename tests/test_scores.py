"""Confidence intervals and paired tests of the MiniLM verdicts (``experiments._scores``).

Each claim is checked against an independent computation: the Wilson
interval's endpoints solve the score equation, the McNemar p-value is SciPy's
exact binomial test on the discordant pairs, the paired bootstrap resamples
by hand.
"""

import numpy as np
import pytest
from scipy.stats import binomtest

from blocklowrank.experiments._scores import Z95, compare_paired, mcnemar_exact, paired_bootstrap, wilson_interval


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (283, 352), (1, 1), (175, 350)])
def test_wilson_endpoints_solve_the_score_equation(k, n):
    """Claim: the endpoints p are where |p_hat - p| = z sqrt(p (1 - p) / n), with p_hat inside."""
    low, high = wilson_interval(k, n)
    p_hat = k / n
    assert 0 <= low <= p_hat <= high <= 1
    for p in (low, high):
        if 0 < p < 1:
            assert abs(abs(p_hat - p) - Z95 * np.sqrt(p * (1 - p) / n)) < 1e-12
    if k == 0:
        assert low == 0
    if k == n:
        assert high == 1


def test_wilson_refuses_impossible_counts():
    for k, n in ((-1, 5), (6, 5), (0, 0)):
        with pytest.raises(ValueError, match="0 <= k <= n"):
            wilson_interval(k, n)


@pytest.mark.parametrize("seed", range(6))
def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs(seed):
    rng = np.random.default_rng(seed)
    a = rng.random(200) < 0.8
    b = np.where(rng.random(200) < 0.15, ~a, a)
    res = mcnemar_exact(a, b)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    assert (res["only_a"], res["only_b"]) == (only_a, only_b)
    assert np.isclose(res["p"], binomtest(only_a, only_a + only_b, 0.5).pvalue, rtol=1e-12)


def test_mcnemar_of_identical_predictions_is_one():
    a = np.array([1, 0, 1, 1])
    assert mcnemar_exact(a, a) == {"only_a": 0, "only_b": 0, "p": 1.0}


def test_paired_bootstrap_matches_a_hand_resampling():
    rng = np.random.default_rng(3)
    a, b = rng.random(80) < 0.7, rng.random(80) < 0.75
    diff, low, high = paired_bootstrap(a, b, n_boot=500, seed=11)
    idx = np.random.default_rng(11).integers(0, 80, size=(500, 80))
    boots = b[idx].mean(1) - a[idx].mean(1)
    assert diff == pytest.approx(b.mean() - a.mean())
    assert (low, high) == pytest.approx(tuple(np.quantile(boots, [0.025, 0.975])))
    same = paired_bootstrap(a, a)
    assert same == (0.0, 0.0, 0.0)


def test_compare_paired_and_bad_input():
    a, b = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 1, 1, 1])
    res = compare_paired(a, b, n_boot=200)
    assert res["only_reference"] == 1 and res["only_other"] == 2 and res["diff"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="same examples"):
        mcnemar_exact(a, b[:4])
    with pytest.raises(ValueError, match="0/1"):
        paired_bootstrap(a, b * 2)

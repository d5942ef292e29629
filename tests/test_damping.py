"""The held-out measurement that chooses gram_damping (``experiments.damping``), on small synthetic layers."""

import numpy as np
import pytest

from blocklowrank.experiments.damping import choose, heldout_rows
from blocklowrank.structures import approximate

STRUCTURES = [("global", "global", 1), ("block K=2", "block", 2)]


def _problem(seed=0, n=24, m=16, dead=4):
    """Two layers reading one site; the calibration inputs never use the last ``dead`` features."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((200, n)) * np.linspace(0.2, 2, n)
    X_cal, X_val = X[:120].copy(), X[120:]
    X_cal[:, -dead:] = 0
    layers = [(rng.standard_normal((m, n)), "s"), (rng.standard_normal((m // 2, n)), "s")]
    return layers, {"s": X_cal.T @ X_cal / 120}, {"s": X_val.T @ X_val / 80}, X_cal, X_val


def test_rows_are_means_of_the_measured_output_errors():
    """Claim: each row's errors are the mean over layers of ||(W - M) X^T|| / ||W X^T|| on the calibration and
    held-out inputs, M the fit in the damped calibration Gram (recomputed independently here)."""
    layers, cal, val, X_cal, X_val = _problem()
    rows = heldout_rows("toy", layers, cal, val, STRUCTURES, (4,), dampings=(0.0, 0.1), n_jobs=1)
    assert len(rows) == len(STRUCTURES) * 3  # plain, two dampings
    for row in rows:
        method, k = next((meth, kk) for label, meth, kk in STRUCTURES if label == row["structure"])
        kw = {} if row["damping"] is None else {"input_gram": cal["s"], "gram_damping": row["damping"]}
        errs = []
        for W, _ in layers:
            M = approximate(W, method=method, n_blocks=k, rank=4 // k, **kw).reconstruction
            errs.append([np.linalg.norm((W - M) @ X.T) / np.linalg.norm(W @ X.T) for X in (X_cal, X_val)])
        assert row["calibration_error"] == pytest.approx(np.mean(errs, 0)[0], rel=1e-4)
        assert row["heldout_error"] == pytest.approx(np.mean(errs, 0)[1], rel=1e-4)


def test_the_undamped_global_fit_is_best_on_its_own_inputs():
    """Claim: with delta = 0 the global fit minimises the calibration output error (Eckart-Young in G), so no
    damping and not the plain fit does better there; large damping tends to the plain fit."""
    layers, cal, val, _, _ = _problem(1)
    rows = heldout_rows("toy", layers, cal, val, STRUCTURES[:1], (3,), dampings=(0.0, 1e-2, 1e6), n_jobs=1)
    by = {r["damping"]: r for r in rows}
    assert all(by[0.0]["calibration_error"] <= r["calibration_error"] + 1e-9 for r in rows)
    assert by[1e6]["heldout_error"] == pytest.approx(by[None]["heldout_error"], rel=1e-3)


def test_choose_takes_the_least_error_per_cell_and_the_least_regret_overall():
    rows = []
    for cell, errs in {("a", 4): {0.0: 1.0, 0.1: 2.0, 1.0: 3.0}, ("b", 4): {0.0: 9.0, 0.1: 1.0, 1.0: 1.1}}.items():
        for d, e in errs.items():
            rows.append({"case": "x", "structure": cell[0], "rank": cell[1], "damping": d, "heldout_error": e})
        rows.append({"case": "x", "structure": cell[0], "rank": cell[1], "damping": None, "heldout_error": 5.0})
    best, overall = choose(rows)
    assert best == {("x", "a", 4): 0.0, ("x", "b", 4): 0.1}
    assert overall == 0.1  # regrets: 0.0 -> 1 + 9, 0.1 -> 2 + 1, 1.0 -> 3 + 1.1

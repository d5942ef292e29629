"""The compress experiment (full fine-tune's ΔW1 fitted at Figure 2's budgets) on synthetic digits."""

import csv

import numpy as np
from test_adapters_sweep import _synthetic_mnist

from blocklowrank.experiments.compress import plot_compress, run_compress
from blocklowrank.experiments.figure2 import figure2_configs


def test_run_compress_small(tmp_path):
    fields = ["method", "config", "n_params", "lr", "n_seeds", "test_acc_mean", "test_acc_std", "selected"]
    with open(tmp_path / "sweep.csv", "w", newline="") as f:  # a Figure 2 result to compare with
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerow(
            dict(
                method="full",
                config="full",
                n_params=50565,
                lr=2e-3,
                n_seeds=2,
                test_acc_mean=0.9,
                test_acc_std=0.01,
                selected=True,
            )
        )
        w.writerow(
            dict(
                method="global",
                config="r=2",
                n_params=1696,
                lr=1e-3,
                n_seeds=2,
                test_acc_mean=0.0,
                test_acc_std=0.0,
                selected=True,
            )
        )
    res = run_compress(tmp_path, seeds=2, subset=120, data=_synthetic_mnist(), epochs=3, progress=False)
    assert res.settings["ft_lr"] == 2e-3 and res.settings["lr_source"] == "Figure 2's selection"
    kept, _ = figure2_configs()
    assert len(res.runs) == 2 * (1 + 2 * len(kept))
    exact = [r for r in res.table if r["method"] == "exact"]
    assert len(exact) == 1 and exact[0]["error_mean"] == 0.0
    for r in res.table:
        assert r["n_seeds"] == 2 and r["n_params_used"] <= r["n_params"]
        if r["method"] == "global":  # budget-optimal ranks of one block are the uniform rank
            twin = next(t for t in res.table if t["config"] == r["config"] and t["rule"] != r["rule"])
            assert np.isclose(twin["error_mean"], r["error_mean"])
    uniform = {r["config"]: r["error_mean"] for r in res.table if r["method"] == "block" and r["rule"] == "uniform"}
    budget = {r["config"]: r["error_mean"] for r in res.table if r["method"] == "block" and r["rule"] == "budget"}
    assert all(budget[c] <= uniform[c] + 1e-9 for c in uniform)  # optimal ranks never fit worse
    assert "compressed r=2" in res.summary and "compression wins" in res.summary
    assert (tmp_path / "compress.csv").exists() and (tmp_path / "compress_summary.txt").exists()
    plot_compress(res, tmp_path / "compress.png")
    assert (tmp_path / "compress.png").stat().st_size > 10_000
    again = run_compress(tmp_path, seeds=2, subset=120, data=_synthetic_mnist(), epochs=3, progress=False)
    assert [r["test_acc"] for r in again.runs] == [r["test_acc"] for r in res.runs]  # cached fine-tunes

"""The compress experiment (full fine-tune's ΔW1 fitted at Figure 2's budgets) on synthetic digits."""

import csv

import numpy as np
from test_adapters_sweep import _synthetic_mnist

from blocklowrank.experiments.compress import extra_configs, plot_compress, run_compress
from blocklowrank.experiments.figure2 import SHAPE
from blocklowrank.structures import approximate

#: A few configurations of every kind (the full grid is what `reproduce compress` runs).
CONFIGS = [
    {"method": "global", "n_blocks": 1, "rank": 2, "n_params": 2 * sum(SHAPE)},
    {"method": "diagonal", "n_blocks": 2, "rank": 2, "n_params": 2 * sum(SHAPE)},
    {"method": "block", "n_blocks": 2, "rank": 2, "n_params": 4 * sum(SHAPE)},
    *extra_configs(ranks=(4,)),
]


def _sweep(path):
    fields = ["method", "config", "n_params", "lr", "n_seeds", "test_acc_mean", "test_acc_std", "selected"]
    with open(path, "w", newline="") as f:  # a Figure 2 result to compare with
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerow(dict(method="full", config="full", n_params=50565, lr=2e-3, n_seeds=2, test_acc_mean=0.9,
                        test_acc_std=0.01, selected=True))  # fmt: skip
        w.writerow(dict(method="global", config="r=2", n_params=1696, lr=1e-3, n_seeds=2, test_acc_mean=0.0,
                        test_acc_std=0.0, selected=True))  # fmt: skip


def test_extra_configs_spend_figure2_budgets():
    """Claim: the hybrid spends exactly r (m + n) (4 blocks of rank r/4 on 32 x 392, global r/2 on 64 x 784);
    BLAST has the largest rank whose fitted parameter count stays within it."""
    W = np.random.default_rng(0).standard_normal(SHAPE)
    configs = extra_configs()
    assert [c["n_params"] for c in configs] == [r * sum(SHAPE) for r in (4, 8, 16, 32) for _ in range(2)]
    for cfg in configs:
        r = cfg["n_params"] // sum(SHAPE)
        if cfg["method"] == "hybrid":
            assert (cfg["rank"], cfg["global_rank"]) == (r // 4, r // 2)
            assert 4 * cfg["rank"] * (32 + 392) + cfg["global_rank"] * (64 + 784) == cfg["n_params"]
        else:
            fit = approximate(W, method="shared_basis", n_blocks=2, rank=cfg["rank"], max_iter=1)
            more = approximate(W, method="shared_basis", n_blocks=2, rank=cfg["rank"] + 1, max_iter=1)
            assert fit.n_params <= cfg["n_params"] < more.n_params


def test_run_compress_small(tmp_path):
    _sweep(tmp_path / "sweep.csv")
    res = run_compress(
        tmp_path, seeds=2, subset=120, data=_synthetic_mnist(), epochs=3, progress=False, configs=CONFIGS
    )
    assert res.settings["ft_lr"] == 2e-3 and res.settings["lr_source"] == "Figure 2's selection"
    layouts = sum(c["method"] in ("global", "diagonal", "block") for c in CONFIGS)
    per_seed = 1 + 2 * (2 * layouts + (len(CONFIGS) - layouts))  # exact; metrics x (rules | uniform)
    assert len(res.runs) == 2 * per_seed
    exact = [r for r in res.table if r["method"] == "exact"]
    assert len(exact) == 1 and exact[0]["error_mean"] == 0.0
    for r in res.table:
        assert r["n_seeds"] == 2 and r["n_params_used"] <= r["n_params"]
        if r["method"] == "global":  # budget-optimal ranks of one block are the uniform rank
            twin = next(
                t
                for t in res.table
                if (t["config"], t["metric"]) == (r["config"], r["metric"]) and t["rule"] != r["rule"]
            )
            assert np.isclose(twin["error_mean"], r["error_mean"])
    rows = [r for r in res.table if r["method"] == "block" and r["metric"] == "plain"]
    uniform = {r["config"]: r["error_mean"] for r in rows if r["rule"] == "uniform"}
    budget = {r["config"]: r["error_mean"] for r in rows if r["rule"] == "budget"}
    assert all(budget[c] <= uniform[c] + 1e-9 for c in uniform)  # optimal ranks never fit worse
    # the metric fits minimise the damped objective exactly for global and diagonal: their output error on the
    # training images is no larger than the plain fit's, and the plain fit's Frobenius error no larger than theirs
    by = {(r["seed"], r["method"], r["config"], r["rule"], r["metric"]): r for r in res.runs}
    for (seed, method, config, rule, metric), r in by.items():
        if method in ("global", "diagonal") and metric == "input":
            plain = by[seed, method, config, rule, "plain"]
            assert r["output_error"] <= plain["output_error"] + 1e-6
            assert plain["error"] <= r["error"] + 1e-6
    assert {"hybrid", "shared_basis"} <= {r["method"] for r in res.table}
    assert "compressed r=2" in res.summary and "compression wins" in res.summary
    assert (tmp_path / "compress.csv").exists() and (tmp_path / "compress_summary.txt").exists()
    plot_compress(res, tmp_path / "compress.png")
    assert (tmp_path / "compress.png").stat().st_size > 10_000
    again = run_compress(
        tmp_path, seeds=2, subset=120, data=_synthetic_mnist(), epochs=3, progress=False, configs=CONFIGS
    )
    assert [r["test_acc"] for r in again.runs] == [r["test_acc"] for r in res.runs]  # cached fine-tunes


def test_compress_reuses_figure2s_full_fine_tunes_which_are_what_it_would_train(tmp_path, capsys):
    """Claim: Figure 2's sweep keeps each full fine-tune, and compress reuses it instead of training
    again; the model compress trains on its own (a folder without the sweep) is the same bit for bit,
    so the reuse changes no result."""
    from blocklowrank.experiments.compress import mnist_models
    from blocklowrank.experiments.figure2 import run_figure2

    data = _synthetic_mnist(n_train=300, n_test=100)
    run_figure2(tmp_path / "f2", seeds=1, epochs=2, lrs=(1e-3,), grid={"global": [{"n_blocks": 1, "rank": 2}]},
                data=data, progress=False)  # fmt: skip
    assert len(list((tmp_path / "f2" / "finetuned").glob("full_*_lr0.001_seed0.npz"))) == 1
    capsys.readouterr()
    reused = mnist_models(tmp_path / "f2", seeds=1, data=data, epochs=2, ft_lr=1e-3)["tuned"][0]
    assert "full fine-tuning" not in capsys.readouterr().err
    alone = mnist_models(tmp_path / "alone", seeds=1, data=data, epochs=2, ft_lr=1e-3)["tuned"][0]
    assert "full fine-tuning, seed 0" in capsys.readouterr().err
    for k, v in reused.to_dict().items():
        np.testing.assert_array_equal(v, alone.to_dict()[k], err_msg=k)

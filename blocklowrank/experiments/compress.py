"""Compress a full fine-tune, or train an adapter? The MNIST MLP at Figure 2's budgets.

Figure 2 trains structured adapters on the first layer of the MLP
``784 -> 64 -> 5`` (pretrained on digits 0-4, adapted to 5-9). The other
road to the same number of parameters: fine-tune every parameter, then
approximate the first layer's update ``ΔW1 = W1_ft - W1_pre`` (64 x 784) with
a structure, with no further training.

Protocol (Figure 2's data, seeds, pretraining and full fine-tuning, reused
from :mod:`~blocklowrank.experiments.figure2`):

1. Per seed, the pretrained MLP of Figure 2 (the same cache,
   ``out_dir/pretrained``) and its full fine-tune at one learning rate:
   the one Figure 2 selected for full fine-tuning when its ``sweep.csv`` is
   in ``out_dir``, else ``DEFAULT_FT_LR``. The fine-tuned MLPs are cached in
   ``out_dir/compress/``.
2. For every Figure 2 configuration (global r; diagonal N, r; block K, r;
   the same skip rule) two fits of ``ΔW1``: the configuration's uniform
   ranks, and budget-optimal per-block ranks on the same grid at the same
   parameter count (the same thing for global).
3. The model evaluated on the 5-9 test set: ``W1_pre + approximation`` with
   the **pretrained** first-layer bias (an adapter cannot change it either)
   and the **fine-tuned output layer** (the adapters of Figure 2 train
   theirs), so both roads spend the same parameters: the structure's plus the
   325 of the output layer. The row ``exact`` is ``ΔW1`` itself (50,176
   parameters): what compression tends to as the budget grows.
4. Per method and parameter count, the configuration with the best
   validation accuracy (Figure 2's validation split) averaged over seeds, as
   Figure 2 selects by validation loss; mean +- std of the test accuracy
   over seeds.

:func:`run_compress` returns the data and writes ``compress.csv`` and
``compress_summary.txt``; :func:`plot_compress` draws it beside Figure 2's
trained adapters (read from ``sweep.csv``) as ``compress.png``.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from .._extras import require
from .._io import atomic_write_csv, atomic_write_text, save_figure
from ..adapters import MLP
from ..datasets import load_mnist
from ..structures import approximate
from . import figure2 as f2

__all__ = ["run_compress", "plot_compress", "CompressResult", "read_figure2_selected", "DEFAULT_FT_LR"]

#: Learning rate of the full fine-tune when Figure 2's sweep.csv is not there to choose it.
DEFAULT_FT_LR = 5e-4
RULES = ("uniform", "budget")
_FIELDS = [
    "method",
    "label",
    "config",
    "n_blocks",
    "rank",
    "rule",
    "n_params",
    "n_params_used",
    "n_trainable",
    "n_seeds",
    "error_mean",
    "val_acc_mean",
    "test_acc_mean",
    "test_acc_std",
    "selected",
]


@dataclass
class CompressResult:
    """What :func:`run_compress` returns.

    Attributes
    ----------
    runs : list of dict
        One row per seed, configuration and rank rule: relative error of the
        fit of ``ΔW1``, validation and test accuracy.
    table : list of dict
        Aggregated over seeds (the rows of ``compress.csv``).
    selected : list of dict
        Per method, rule and parameter count, the row with the best mean
        validation accuracy.
    full_ft : dict
        Test accuracy of the full fine-tunes (``mean``, ``std``, ``lr``).
    figure2 : list of dict
        Figure 2's selected trained adapters (empty when no ``sweep.csv``).
    summary : str
    settings : dict
    """

    runs: list
    table: list
    selected: list
    full_ft: dict
    figure2: list = field(default_factory=list)
    summary: str = ""
    settings: dict = field(default_factory=dict)


def read_figure2_selected(path):
    """Figure 2's selected rows (``method, config, n_params, lr, test_acc_mean, test_acc_std``) from sweep.csv.

    Returns an empty list when the file does not exist.
    """
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("selected") == "True"]
    keep = []
    for r in rows:
        keep.append(
            {
                "method": r["method"],
                "config": r["config"],
                "n_params": int(r["n_params"]),
                "lr": float(r["lr"]),
                "n_seeds": int(r["n_seeds"]),
                "test_acc_mean": float(r["test_acc_mean"]),
                "test_acc_std": float(r["test_acc_std"]),
            }
        )
    return keep


def _fine_tuned(out_dir, seeds, d, settings, lr, pretrained, progress):
    """The full fine-tune of each seed at ``lr`` (Figure 2's protocol), cached as .npz."""
    cache = os.path.join(out_dir, "compress")
    os.makedirs(cache, exist_ok=True)
    out = {}
    for s in seeds:
        path = os.path.join(cache, f"full_ft_{settings['tag']}_lr{lr:g}_seed{s}.npz")
        if os.path.exists(path):
            out[s] = MLP.load(path)
            continue
        if progress:
            print(f"[compress] full fine-tuning, seed {s}, lr {lr:g} ...", file=sys.stderr, flush=True)
        task = {
            "method": "full",
            "seed": s,
            "lr": lr,
            "epochs": settings["epochs"],
            "batch_size": settings["batch_size"],
            "patience": f2.PATIENCE,
        }
        res, _ = f2.train_run(task, data=d, pretrained={s: pretrained[s].to_dict()})
        res.mlp.save(path)
        out[s] = res.mlp
    return out


def _fits(dW, cfg):
    """``{rule: Approximation}`` of ΔW1 for one Figure 2 configuration."""
    kw = dict(method=cfg["method"], n_blocks=cfg["n_blocks"])
    return {"uniform": approximate(dW, rank=cfg["rank"], **kw), "budget": approximate(dW, budget=cfg["n_params"], **kw)}


def _seed_rows(seed, pre, ft, d, configs):
    """Every configuration and rule on one seed: error, validation and test accuracy."""
    X, y = f2._float(d["ad_X"]), d["ad_y"]
    _, va = f2._split(len(y), seed)
    Xv, yv, Xt, yt = X[va], y[va], f2._float(d["te_X"]), d["te_y"]
    mixed = MLP(pre.W1, pre.b1, ft.W2, ft.b2)  # pretrained first layer, fine-tuned output layer
    dW = (ft.W1.astype(np.float64) - pre.W1).astype(np.float32)
    exact = {
        "method": "exact",
        "config": "ΔW1",
        "n_blocks": 1,
        "rank": min(dW.shape),
        "rule": "uniform",
        "n_params": dW.size,
        "n_params_used": dW.size,
        "error": 0.0,
        "val_acc": mixed.score(Xv, yv, dW),
        "test_acc": mixed.score(Xt, yt, dW),
    }
    rows = [exact]
    for cfg in configs:
        for rule, fit in _fits(dW, cfg).items():
            approx = fit.reconstruction.astype(np.float32)
            rows.append(
                {
                    **cfg,
                    "config": f2._config_name(cfg["method"], cfg["n_blocks"], cfg["rank"]),
                    "rule": rule,
                    "n_params_used": int(fit.n_params),
                    "error": float(fit.error),
                    "val_acc": mixed.score(Xv, yv, approx),
                    "test_acc": mixed.score(Xt, yt, approx),
                }
            )
    for r in rows:
        r["seed"] = seed
    return rows


def _aggregate(runs):
    groups = {}
    for r in runs:
        groups.setdefault((r["method"], r["config"], r["rule"]), []).append(r)
    table = []
    for (method, config, rule), rs in groups.items():
        acc_mean, acc_std = f2._mean_std([r["test_acc"] for r in rs])
        table.append(
            {
                "method": method,
                "label": f2.LABELS.get(method, "exact ΔW1"),
                "config": config,
                "n_blocks": rs[0]["n_blocks"],
                "rank": rs[0]["rank"],
                "rule": rule,
                "n_params": rs[0]["n_params"],
                "n_params_used": int(round(np.mean([r["n_params_used"] for r in rs]))),
                "n_trainable": rs[0]["n_params"] + 325,
                "n_seeds": len(rs),
                "error_mean": float(np.mean([r["error"] for r in rs])),
                "val_acc_mean": float(np.mean([r["val_acc"] for r in rs])),
                "test_acc_mean": acc_mean,
                "test_acc_std": acc_std,
                "selected": False,
            }
        )
    best = {}
    for row in table:
        key = (row["method"], row["rule"], row["n_params"])
        if key not in best or row["val_acc_mean"] > best[key]["val_acc_mean"]:
            best[key] = row
    for row in best.values():
        row["selected"] = True
    order = {"exact": 0, "global": 1, "diagonal": 2, "block": 3}
    table.sort(key=lambda r: (order[r["method"]], RULES.index(r["rule"]), r["n_params"], r["config"]))
    return table, [r for r in table if r["selected"]]


def _verdicts(selected, figure2):
    """Per method and budget: compressed (uniform ranks) vs the trained adapter of Figure 2."""
    trained = {(r["method"], r["n_params"]): r for r in figure2}
    lines = []
    for c in selected:
        t = trained.get((c["method"], c["n_params"]))
        if c["rule"] != "uniform" or t is None:
            continue
        ca, cs = 100 * c["test_acc_mean"], 100 * c["test_acc_std"]
        ta, ts = 100 * t["test_acc_mean"], 100 * t["test_acc_std"]
        if ca - cs > ta + ts:
            verdict = "compression wins"
        elif ta - ts > ca + cs:
            verdict = "the trained adapter wins"
        else:
            verdict = "within the seed spread"
        lines.append(
            f"  {f2.LABELS[c['method']]:<15}{c['n_params']:>7d}  compressed {c['config']:<9}"
            f"{ca:6.2f}+-{cs:4.2f}%  trained {t['config']:<9}{ta:6.2f}+-{ts:4.2f}%  {verdict}"
        )
    return lines


def _summary(selected, full_ft, figure2, settings):
    lines = [
        "Compress the full fine-tune's ΔW1, or train an adapter? (MNIST 0-4 -> 5-9, first layer)",
        f"seeds={settings['seeds']}, full fine-tune lr={settings['ft_lr']:g} ({settings['lr_source']}), "
        f"subset={settings['subset']}; compressed model = W1_pre + approx(ΔW1), pretrained b1, "
        "fine-tuned output layer; no training after the fit",
        f"Full fine-tuning: test accuracy {100 * full_ft['mean']:.2f} +- {100 * full_ft['std']:.2f}%",
        "",
        f"{'method':<15}{'rule':<9}{'config':<10}{'params':>8}{'ΔW1 err':>9}{'test acc %':>16}",
    ]
    for r in selected:
        lines.append(
            f"{r['label']:<15}{r['rule']:<9}{r['config']:<10}{r['n_params']:>8d}{r['error_mean']:>9.3f}"
            f"{100 * r['test_acc_mean']:>9.2f} +- {100 * r['test_acc_std']:<4.2f}"
        )
    lines += [
        "",
        "Compressed (uniform ranks) vs trained adapter (Figure 2), same method and parameter count "
        "(mean +- std intervals):",
    ]
    verdicts = _verdicts(selected, figure2)
    lines += verdicts or [
        "  Figure 2's sweep.csv is not in the output directory: run `blocklowrank reproduce "
        "figure2` first for the comparison"
    ]
    return "\n".join(lines) + "\n"


def run_compress(
    out_dir, *, seeds=3, subset=None, data=None, ft_lr=None, epochs=f2.DEFAULT_EPOCHS, progress=True, n_jobs=1
):
    """Fit the full fine-tune's ΔW1 with each structure at Figure 2's budgets and evaluate without training.

    Parameters
    ----------
    out_dir : str or path-like
        Gets ``compress.csv``, ``compress_summary.txt`` and ``compress/``
        (the cached full fine-tunes); Figure 2's ``pretrained/`` cache and
        ``sweep.csv`` are used when present (run after ``figure2``).
    seeds : int or sequence of int, default=3
        Seeds of Figure 2's protocol (pretraining, split, shuffling).
    subset : int, optional
        Only the first ``subset`` images of each split (quick checks).
    data : object, optional
        MNIST-like (``train_images, train_labels, test_images, test_labels``);
        default :func:`blocklowrank.datasets.load_mnist`.
    ft_lr : float, optional
        Learning rate of the full fine-tune; default: Figure 2's selection
        from ``sweep.csv``, else :data:`DEFAULT_FT_LR`.
    epochs : int, default=figure2.DEFAULT_EPOCHS
        Cap of the full fine-tune (it ends by early stopping); part of the
        protocol's settings, so Figure 2's cache is shared only at its value.
    progress : bool, default=True
    n_jobs : int, default=1
        Parallel pretraining (joblib), as in Figure 2.

    Returns
    -------
    CompressResult
    """
    t0 = time.perf_counter()
    seed_list = list(range(int(seeds))) if np.ndim(seeds) == 0 else [int(s) for s in seeds]
    if not seed_list:
        raise ValueError("seeds must be a positive int or a non-empty list")
    if data is None:
        data = load_mnist()
    d = f2._prepare(data, subset)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    settings = f2.protocol_settings(d, epochs=epochs, subset=subset)
    figure2 = read_figure2_selected(os.path.join(out_dir, "sweep.csv"))
    chosen = [r["lr"] for r in figure2 if r["method"] == "full"]
    lr_source = "given" if ft_lr is not None else ("Figure 2's selection" if chosen else "default, no sweep.csv")
    ft_lr = float(ft_lr if ft_lr is not None else (chosen[0] if chosen else DEFAULT_FT_LR))
    settings.update(seeds=seed_list, ft_lr=ft_lr, lr_source=lr_source)

    pretrained = f2.pretrained_mlps(out_dir, seed_list, d, settings["tag"], n_jobs=n_jobs, progress=progress)
    tuned = _fine_tuned(out_dir, seed_list, d, settings, ft_lr, pretrained, progress)
    configs, _ = f2.figure2_configs()
    runs, ft_accs = [], []
    with threadpool_limits(limits=1, user_api="blas"):  # 64 x 784 blocks: threads only contend
        for s in seed_list:
            runs += _seed_rows(s, pretrained[s], tuned[s], d, configs)
            ft_accs.append(tuned[s].score(f2._float(d["te_X"]), d["te_y"]))
    table, selected = _aggregate(runs)
    mean, std = f2._mean_std(ft_accs)
    full_ft = {"mean": mean, "std": std, "lr": ft_lr}
    settings["seconds"] = time.perf_counter() - t0
    text = _summary(selected, full_ft, figure2, settings)
    atomic_write_csv(os.path.join(out_dir, "compress.csv"), table, _FIELDS, extrasaction="ignore")
    atomic_write_text(os.path.join(out_dir, "compress_summary.txt"), text)
    if progress:
        print(text, file=sys.stderr, flush=True)
    return CompressResult(
        runs=runs, table=table, selected=selected, full_ft=full_ft, figure2=figure2, summary=text, settings=settings
    )


def plot_compress(result, path=None):
    """Two panels on one parameter axis: Figure 2's trained adapters, and the compressed full fine-tune.

    Test accuracy (mean +- std over seeds) against the structure's
    parameters; solid markers uniform ranks, open markers budget-optimal
    ranks; the dotted line is full fine-tuning.

    Parameters
    ----------
    result : CompressResult
    path : str, optional
        Where to save the figure (e.g. ``results/compress.png``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt, ticker = require("matplotlib.pyplot"), require("matplotlib.ticker")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120, sharex=True, sharey=True)
    for method in ("global", "diagonal", "block"):
        st = f2._STYLE[method]
        trained = sorted((r for r in result.figure2 if r["method"] == method), key=lambda r: r["n_params"])
        if trained:
            left.errorbar(
                [r["n_params"] for r in trained],
                [100 * r["test_acc_mean"] for r in trained],
                yerr=[100 * r["test_acc_std"] for r in trained],
                color=st["color"],
                marker=st["marker"],
                capsize=3,
                label=f2.LABELS[method],
            )
        for rule, fill in (("uniform", st["color"]), ("budget", "white")):
            rows = sorted(
                (r for r in result.selected if r["method"] == method and r["rule"] == rule), key=lambda r: r["n_params"]
            )
            right.errorbar(
                [r["n_params"] for r in rows],
                [100 * r["test_acc_mean"] for r in rows],
                yerr=[100 * r["test_acc_std"] for r in rows],
                color=st["color"],
                marker=st["marker"],
                mfc=fill,
                ls="-" if rule == "uniform" else "--",
                capsize=3,
                label=f"{f2.LABELS[method]} ({'uniform' if rule == 'uniform' else 'budget-optimal'} ranks)",
            )
    ft = 100 * result.full_ft["mean"]
    for ax, title in ((left, "trained adapters (Figure 2)"), (right, "compressed full fine-tune, no training")):
        ax.axhline(ft, color="k", ls=":", lw=1, label=f"full FT {ft:.2f}%")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.FixedLocator([1000, 2000, 5000, 10000, 20000, 50000]))
        ax.xaxis.set_major_formatter(ticker.StrMethodFormatter("{x:,.0f}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if not result.figure2:
        left.text(
            0.5,
            0.5,
            "no sweep.csv:\nrun `blocklowrank reproduce figure2`",
            transform=left.transAxes,
            ha="center",
            va="center",
        )
    left.set_ylabel("test accuracy on digits 5-9 (%)")
    fig.supxlabel("parameters of the first-layer update (both roads also spend the output layer's 325)", fontsize=9)
    fig.suptitle(f"MNIST 0-4 -> 5-9, {len(result.settings.get('seeds', []))} seeds", fontsize=10)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig

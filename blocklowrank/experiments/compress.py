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
   in ``out_dir``, else ``DEFAULT_FT_LR``. The fine-tuned MLPs are Figure 2's
   own (its sweep keeps them in ``out_dir/finetuned/``; trained the same way
   and kept there when missing).
2. For every Figure 2 configuration (global r; diagonal N, r; block K, r;
   the same skip rule) fits of ``ΔW1``: the configuration's uniform
   ranks, and budget-optimal per-block ranks on the same grid at the same
   parameter count (the same thing for global); beside them, at each budget
   ``r (m + n)`` with ``r >= 4``, the hybrid (K=2 blocks of rank ``r/4`` plus a
   global term of rank ``r/2``) and BLAST (K=2, the largest rank within the
   budget). Each fit twice: **plain** (Frobenius) and **in the input metric**
   ``G = X^T X / n`` of the first layer's inputs -- the pixels of the seed's
   training split (Figure 2's), nothing else -- so that it minimises the
   error of the layer's pre-activations on the training images rather than of
   the weights (``gram_damping``: the library's default; 784 pixels with a
   dead border make ``G`` singular).
3. The model evaluated on the 5-9 test set: ``W1_pre + approximation`` with
   the **pretrained** first-layer bias (an adapter cannot change it either)
   and the **fine-tuned output layer** (the adapters of Figure 2 train
   theirs), so both roads spend the same parameters: the structure's plus the
   325 of the output layer. The row ``exact`` is ``ΔW1`` itself (50,176
   parameters): what compression tends to as the budget grows.
4. Per method, rank rule, metric and parameter count, the configuration
   with the best validation accuracy (Figure 2's validation split) averaged
   over seeds, as Figure 2 selects by validation loss; mean +- std of the
   test accuracy over seeds.

:func:`run_compress` returns the data and writes ``compress.csv`` and
``compress_summary.txt``; :func:`plot_compress` draws it beside Figure 2's
trained adapters (read from ``sweep.csv``) as ``compress.png``.
:func:`mnist_models` gives the data, the pretrained MLPs and the fine-tunes
(for :mod:`~blocklowrank.experiments.damping`).
"""

from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from joblib import Parallel, delayed
from threadpoolctl import threadpool_limits

from .. import GramFactor
from .._extras import require
from .._io import atomic_write_csv, atomic_write_text, save_figure
from ..adapters import MLP
from ..budget import match_budget
from ..datasets import load_mnist
from ..structures import approximate
from . import figure2 as f2
from ._scores import relative_output_error

__all__ = [
    "run_compress",
    "plot_compress",
    "CompressResult",
    "read_figure2_selected",
    "mnist_models",
    "pixel_gram",
    "extra_configs",
    "DEFAULT_FT_LR",
    "METRICS",
]

#: Learning rate of the full fine-tune when Figure 2's sweep.csv is not there to choose it.
DEFAULT_FT_LR = 5e-4
RULES = ("uniform", "budget")
#: How ΔW1 is fitted: the Frobenius error, or the error of the pre-activations on the training images.
METRICS = ("plain", "input")
_ORDER = {"exact": 0, "global": 1, "diagonal": 2, "block": 3, "hybrid": 4, "shared_basis": 5}
_FIELDS = (
    "method label config n_blocks rank global_rank rule metric n_params n_params_used n_trainable n_seeds "
    "error_mean output_error_mean val_output_error_mean val_acc_mean test_acc_mean test_acc_std selected"
).split()


@dataclass
class CompressResult:
    """What :func:`run_compress` returns.

    Attributes
    ----------
    runs : list of dict
        One row per seed, configuration, rank rule and metric: relative
        error of the fit of ``ΔW1``, its output error on the training and on
        the validation images, validation and test accuracy.
    table : list of dict
        Aggregated over seeds (the rows of ``compress.csv``).
    selected : list of dict
        Per method, rule, metric and parameter count, the row with the best
        mean validation accuracy.
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
    """The full fine-tune of each seed at ``lr`` (Figure 2's protocol): Figure 2's sweep's own when it
    kept it (:func:`~blocklowrank.experiments.figure2.full_ft_path`), else trained and kept there."""
    out = {}
    for s in seeds:
        path = f2.full_ft_path(out_dir, settings["tag"], lr, s)
        os.makedirs(os.path.dirname(path), exist_ok=True)
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


def mnist_models(
    out_dir, *, seeds=3, subset=None, data=None, ft_lr=None, epochs=f2.DEFAULT_EPOCHS, n_jobs=1, progress=True
):
    """Figure 2's data, pretrained MLPs and full fine-tunes (made and cached when missing).

    Returns
    -------
    dict
        ``d`` (Figure 2's splits), ``seeds``, ``settings`` (with ``ft_lr`` and
        ``lr_source``), ``figure2`` (its selected rows, from ``sweep.csv``),
        ``pretrained`` and ``tuned`` (seed -> :class:`~blocklowrank.adapters.MLP`).
    """
    seed_list = list(range(int(seeds))) if np.ndim(seeds) == 0 else [int(s) for s in seeds]
    if not seed_list:
        raise ValueError("seeds must be a positive int or a non-empty list")
    d = f2._prepare(load_mnist() if data is None else data, subset)
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
    return {
        "d": d,
        "seeds": seed_list,
        "settings": settings,
        "figure2": figure2,
        "pretrained": pretrained,
        "tuned": tuned,
    }


def pixel_gram(d, seed, part="train"):
    """``X^T X / n`` (float64) of the first layer's inputs on the seed's ``"train"`` or ``"val"`` images."""
    X = f2._float(d["ad_X"])
    tr, va = f2._split(len(d["ad_y"]), seed)
    rows = X[tr if part == "train" else va].astype(np.float64)
    return rows.T @ rows / len(rows)


def extra_configs(shape=f2.SHAPE, ranks=(4, 8, 16, 32)):
    """Hybrid and BLAST configurations at Figure 2's budgets ``r (m + n)``.

    Hybrid: K=2 blocks of rank ``r/4`` plus a global rank ``r/2`` (exactly the
    budget); BLAST: K=2 with the largest rank within the budget.
    """
    m, n = shape
    out = []
    for r in ranks:
        budget = r * (m + n)
        out.append({"method": "hybrid", "n_blocks": 2, "rank": r // 4, "global_rank": r // 2, "n_params": budget})
        blast = max(match_budget(shape, budget, methods=("shared_basis",), n_blocks=2), key=lambda rec: rec["n_params"])
        out.append({"method": "shared_basis", "n_blocks": 2, "rank": int(blast["rank"]), "n_params": budget})
    return out


def _config_name(cfg):
    if cfg["method"] == "hybrid":
        return f"K={cfg['n_blocks']},r={cfg['rank']}+g={cfg['global_rank']}"
    if cfg["method"] == "shared_basis":
        return f"K={cfg['n_blocks']},r={cfg['rank']}"
    return f2._config_name(cfg["method"], cfg["n_blocks"], cfg["rank"])


def _fits(dW, cfg, gram):
    """``{(rule, metric): Approximation}`` of ΔW1 for one configuration."""
    kw = dict(method=cfg["method"], n_blocks=cfg["n_blocks"])
    if cfg.get("global_rank"):
        kw["global_rank"] = cfg["global_rank"]
    rules = RULES if cfg["method"] in f2.GRID else RULES[:1]  # budget-optimal ranks: layout structures
    out = {}
    for metric in METRICS:
        metric_kw = {"input_gram": gram} if metric == "input" else {}
        for rule in rules:
            size = {"rank": cfg["rank"]} if rule == "uniform" else {"budget": cfg["n_params"]}
            out[rule, metric] = approximate(dW, **kw, **size, **metric_kw)
    return out


def _config_rows(cfg, dW, factor, grams, mixed, Xv, yv, Xt, yt):
    rows = []
    for (rule, metric), fit in _fits(dW, cfg, factor).items():
        approx = fit.reconstruction.astype(np.float32)
        rows.append(
            {
                **cfg,
                "config": _config_name(cfg),
                "rule": rule,
                "metric": metric,
                "n_params_used": int(fit.n_params),
                "error": float(fit.error),
                "output_error": relative_output_error(dW, approx, grams[0]),
                "val_output_error": relative_output_error(dW, approx, grams[1]),
                "val_acc": mixed.score(Xv, yv, approx),
                "test_acc": mixed.score(Xt, yt, approx),
            }
        )
    return rows


def _seed_rows(seed, pre, ft, d, configs, n_jobs=1):
    """Every configuration, rule and metric on one seed: errors, validation and test accuracy."""
    X, y = f2._float(d["ad_X"]), d["ad_y"]
    _, va = f2._split(len(y), seed)
    Xv, yv, Xt, yt = X[va], y[va], f2._float(d["te_X"]), d["te_y"]
    mixed = MLP(pre.W1, pre.b1, ft.W2, ft.b2)  # pretrained first layer, fine-tuned output layer
    dW = (ft.W1.astype(np.float64) - pre.W1).astype(np.float32)
    grams = (pixel_gram(d, seed), pixel_gram(d, seed, "val"))  # training images (the fits'), validation images
    factor = GramFactor(grams[0])  # the library's default damping
    exact = {
        "method": "exact",
        "config": "ΔW1",
        "n_blocks": 1,
        "rank": min(dW.shape),
        "rule": "uniform",
        "metric": "plain",
        "n_params": dW.size,
        "n_params_used": dW.size,
        "error": 0.0,
        "output_error": 0.0,
        "val_output_error": 0.0,
        "val_acc": mixed.score(Xv, yv, dW),
        "test_acc": mixed.score(Xt, yt, dW),
    }
    with threadpool_limits(limits=1, user_api="blas"):  # 64 x 784 blocks: threads only contend
        parts = Parallel(n_jobs=n_jobs, prefer="threads")(
            delayed(_config_rows)(cfg, dW, factor, grams, mixed, Xv, yv, Xt, yt) for cfg in configs
        )
    rows = [exact] + [r for part in parts for r in part]
    for r in rows:
        r["seed"] = seed
    return rows


def _aggregate(runs):
    groups = {}
    for r in runs:
        groups.setdefault((r["method"], r["config"], r["rule"], r["metric"]), []).append(r)
    table = []
    for (method, config, rule, metric), rs in groups.items():
        acc_mean, acc_std = f2._mean_std([r["test_acc"] for r in rs])
        table.append(
            {
                "method": method,
                "label": _label(method),
                "config": config,
                "n_blocks": rs[0]["n_blocks"],
                "rank": rs[0]["rank"],
                "global_rank": rs[0].get("global_rank"),
                "rule": rule,
                "metric": metric,
                "n_params": rs[0]["n_params"],
                "n_params_used": int(round(np.mean([r["n_params_used"] for r in rs]))),
                "n_trainable": rs[0]["n_params"] + 325,
                "n_seeds": len(rs),
                "error_mean": float(np.mean([r["error"] for r in rs])),
                "output_error_mean": float(np.mean([r["output_error"] for r in rs])),
                "val_output_error_mean": float(np.mean([r["val_output_error"] for r in rs])),
                "val_acc_mean": float(np.mean([r["val_acc"] for r in rs])),
                "test_acc_mean": acc_mean,
                "test_acc_std": acc_std,
                "selected": False,
            }
        )
    best = {}
    for row in table:
        key = (row["method"], row["rule"], row["metric"], row["n_params"])
        if key not in best or row["val_acc_mean"] > best[key]["val_acc_mean"]:
            best[key] = row
    for row in best.values():
        row["selected"] = True
    table.sort(
        key=lambda r: (
            _ORDER[r["method"]],
            METRICS.index(r["metric"]),
            RULES.index(r["rule"]),
            r["n_params"],
            r["config"],
        )
    )
    return table, [r for r in table if r["selected"]]


_LABELS = {"exact": "exact ΔW1", "hybrid": "hybrid", "shared_basis": "BLAST"}


def _label(method):
    return f2.LABELS.get(method) or _LABELS.get(method, method)


def _verdict(a, sa, b, sb):
    if a - sa > b + sb:
        return "compression wins"
    if b - sb > a + sa:
        return "the trained adapter wins"
    return "within the seed spread"


def _verdicts(selected, figure2):
    """Per method and budget: compressed (uniform ranks, plain and in the metric) vs Figure 2's trained adapter."""
    trained = {(r["method"], r["n_params"]): r for r in figure2}
    lines = []
    for c in selected:
        t = trained.get((c["method"], c["n_params"]))
        if c["rule"] != "uniform" or t is None:
            continue
        ca, cs = 100 * c["test_acc_mean"], 100 * c["test_acc_std"]
        ta, ts = 100 * t["test_acc_mean"], 100 * t["test_acc_std"]
        lines.append(
            f"  {_label(c['method']):<15}{c['n_params']:>7d}  {c['metric']:<6} compressed {c['config']:<9}"
            f"{ca:6.2f}+-{cs:4.2f}%  trained {t['config']:<9}{ta:6.2f}+-{ts:4.2f}%  {_verdict(ca, cs, ta, ts)}"
        )
    return lines


def _best_per_budget(selected, figure2):
    """Per budget: the best compression (any structure, rule, metric) against the best trained adapter."""
    lines = []
    for n in sorted({r["n_params"] for r in selected if r["method"] != "exact"}):
        comp = max((r for r in selected if r["n_params"] == n), key=lambda r: r["val_acc_mean"])
        trained = [r for r in figure2 if r["n_params"] == n and r["method"] != "full"]
        ca, cs = 100 * comp["test_acc_mean"], 100 * comp["test_acc_std"]
        text = (
            f"  {n:>7d}  compressed {_label(comp['method'])} {comp['config']} ({comp['rule']}, {comp['metric']}) "
            f"{ca:.2f}+-{cs:.2f}%"
        )
        if trained:
            t = max(trained, key=lambda r: r["test_acc_mean"])
            ta, ts = 100 * t["test_acc_mean"], 100 * t["test_acc_std"]
            text += f"  trained {_label(t['method'])} {t['config']} {ta:.2f}+-{ts:.2f}%  {_verdict(ca, cs, ta, ts)}"
        lines.append(text)
    return lines


def _summary(selected, full_ft, figure2, settings):
    lines = [
        "Compress the full fine-tune's ΔW1, or train an adapter? (MNIST 0-4 -> 5-9, first layer)",
        f"seeds={settings['seeds']}, full fine-tune lr={settings['ft_lr']:g} ({settings['lr_source']}), "
        f"subset={settings['subset']}; compressed model = W1_pre + approx(ΔW1), pretrained b1, "
        "fine-tuned output layer; no training after the fit; metric 'input': fitted in the second moment "
        "of the training images' pixels",
        f"Full fine-tuning: test accuracy {100 * full_ft['mean']:.2f} +- {100 * full_ft['std']:.2f}%",
        "",
        f"{'method':<15}{'rule':<9}{'metric':<7}{'config':<14}{'params':>8}{'ΔW1 err':>9}{'out err':>9}"
        f"{'val out':>9}{'test acc %':>16}",
    ]
    for r in selected:
        lines.append(
            f"{r['label']:<15}{r['rule']:<9}{r['metric']:<7}{r['config']:<14}{r['n_params']:>8d}"
            f"{r['error_mean']:>9.3f}{r['output_error_mean']:>9.3f}{r['val_output_error_mean']:>9.3f}"
            f"{100 * r['test_acc_mean']:>9.2f} +- {100 * r['test_acc_std']:<4.2f}"
        )
    lines += ["", "Compressed (uniform ranks) vs trained adapter (Figure 2), same method and parameter count:"]
    lines += _verdicts(selected, figure2) or [
        "  Figure 2's sweep.csv is not in the output directory: run `blocklowrank reproduce "
        "figure2` first for the comparison"
    ]
    lines += ["", "Best compression (chosen by validation accuracy) vs best trained adapter, per budget:"]
    lines += _best_per_budget(selected, figure2)
    lines.append(f"\n{settings['seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def run_compress(
    out_dir,
    *,
    seeds=3,
    subset=None,
    data=None,
    ft_lr=None,
    epochs=f2.DEFAULT_EPOCHS,
    progress=True,
    n_jobs=1,
    configs=None,
):
    """Fit the full fine-tune's ΔW1 with each structure at Figure 2's budgets, plain and in the input metric.

    Parameters
    ----------
    out_dir : str or path-like
        Gets ``compress.csv`` and ``compress_summary.txt``; Figure 2's
        ``pretrained/`` and ``finetuned/`` caches and ``sweep.csv`` are used
        when present (run after ``figure2``), and made when missing.
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
        Parallel pretraining (joblib processes) and fits (threads), as in Figure 2.
    configs : list of dict, optional
        The configurations (``method, n_blocks, rank, n_params`` and, for the
        hybrid, ``global_rank``); default Figure 2's and :func:`extra_configs`.

    Returns
    -------
    CompressResult
    """
    t0 = time.perf_counter()
    kw = dict(seeds=seeds, subset=subset, data=data, ft_lr=ft_lr, epochs=epochs, n_jobs=n_jobs, progress=progress)
    models = mnist_models(out_dir, **kw)
    d, settings, figure2 = models["d"], models["settings"], models["figure2"]
    configs = f2.figure2_configs()[0] + extra_configs() if configs is None else list(configs)
    runs, ft_accs = [], []
    for s in models["seeds"]:
        if progress:
            print(f"[compress] seed {s}: {len(configs)} configurations ...", file=sys.stderr, flush=True)
        runs += _seed_rows(s, models["pretrained"][s], models["tuned"][s], d, configs, n_jobs)
        ft_accs.append(models["tuned"][s].score(f2._float(d["te_X"]), d["te_y"]))
    table, selected = _aggregate(runs)
    mean, std = f2._mean_std(ft_accs)
    full_ft = {"mean": mean, "std": std, "lr": settings["ft_lr"]}
    settings["seconds"] = time.perf_counter() - t0
    text = _summary(selected, full_ft, figure2, settings)
    out_dir = os.fspath(out_dir)
    atomic_write_csv(os.path.join(out_dir, "compress.csv"), table, _FIELDS, extrasaction="ignore")
    atomic_write_text(os.path.join(out_dir, "compress_summary.txt"), text)
    if progress:
        print(text, file=sys.stderr, flush=True)
    return CompressResult(
        runs=runs, table=table, selected=selected, full_ft=full_ft, figure2=figure2, summary=text, settings=settings
    )


_EXTRA_STYLE = {"hybrid": {"color": "tab:purple", "marker": "D"}, "shared_basis": {"color": "tab:brown", "marker": "v"}}


def _errorbar(ax, rows, style, **kw):
    rows = sorted(rows, key=lambda r: r["n_params"])
    if rows:
        ax.errorbar(
            [r["n_params"] for r in rows],
            [100 * r["test_acc_mean"] for r in rows],
            yerr=[100 * r["test_acc_std"] for r in rows],
            color=style["color"],
            marker=style["marker"],
            capsize=3,
            **kw,
        )


def plot_compress(result, path=None):
    """Three panels on one parameter axis: Figure 2's trained adapters, the compressed full fine-tune plain and in the metric.

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
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), dpi=110, sharex=True, sharey=True)
    styles = {**f2._STYLE, **_EXTRA_STYLE}
    for method, st in styles.items():
        trained = [r for r in result.figure2 if r["method"] == method]
        _errorbar(axes[0], trained, st, label=_label(method))
        for ax, metric in zip(axes[1:], METRICS):
            for rule, fill in (("uniform", st["color"]), ("budget", "white")):
                rows = [r for r in result.selected if (r["method"], r["rule"], r["metric"]) == (method, rule, metric)]
                name = _label(method) + (" (budget-optimal ranks)" if rule == "budget" else "")
                _errorbar(ax, rows, st, mfc=fill, ls="-" if rule == "uniform" else "--", label=name)
    ft = 100 * result.full_ft["mean"]
    titles = (
        "trained adapters (Figure 2)",
        "compressed full fine-tune, plain fit",
        "compressed, fit in the input metric",
    )
    for ax, title in zip(axes, titles):
        ax.axhline(ft, color="k", ls=":", lw=1, label=f"full FT {ft:.2f}%")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.FixedLocator([1000, 2000, 5000, 10000, 20000, 50000]))
        ax.xaxis.set_major_formatter(ticker.StrMethodFormatter("{x:,.0f}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=6, loc="lower right")
    if not result.figure2:
        axes[0].text(
            0.5,
            0.5,
            "no sweep.csv:\nrun `blocklowrank reproduce figure2`",
            transform=axes[0].transAxes,
            ha="center",
            va="center",
        )
    axes[0].set_ylabel("test accuracy on digits 5-9 (%)")
    fig.supxlabel("parameters of the first-layer update (both roads also spend the output layer's 325)", fontsize=9)
    fig.suptitle(f"MNIST 0-4 -> 5-9, {len(result.settings.get('seeds', []))} seeds", fontsize=10)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig

"""Figure 2 of the paper: MNIST adaptation at matched parameter budgets.

(Over 600 lines: the protocol, the resumable sweep, the summary and the plot of
one experiment, kept together so the protocol is read in one place.)

Protocol (paper, Experiment 2, with the choices the paper leaves open
written down here):

1. Pretrain the MLP ``784 -> 64 (ReLU) -> 5`` (50,565 parameters) on the
   MNIST training digits 0-4: every parameter, Adam lr 1e-3, 20 epochs,
   batch 64, PyTorch-default initialisation. Pixels are scaled to [0, 1].
2. Adapt to digits 5-9 (labels 5-9 -> 0-4). 10 % of the 5-9 training
   images are held out as a validation set (a seeded split); the test set
   is the 5-9 part of the MNIST test set.
3. Methods, all adapters on the first layer's 64 x 784 weight, added
   before the ReLU, with ``W1, b1`` frozen and the output layer trained
   (``TRAIN_HEAD``): LoRA r in {2,4,8,16,32}; MELoRA r_diag in
   {2,4,8,16,32} x N in {2,4,8,16}; Localized LoRA r_block in {2,4,8,16}
   x K in {2,4,8,16}; and full fine-tuning of all 50,565 parameters.
   ``dW = B A`` with no alpha/r scale, ``A`` Kaiming-uniform from each
   block's width, ``B = 0``.
4. Every configuration is trained with Adam at lr in {1e-4, 2e-4, 5e-4}
   with batch 64 until it converges: a run stops once its validation loss
   has not improved for ``PATIENCE`` (20) epochs, and keeps the parameters
   of the epoch with the lowest validation loss. ``DEFAULT_EPOCHS`` (1000)
   is only a safety cap (see "Epochs" below).
5. **Skip rule**: a configuration is skipped when a block's rank exceeds
   half its smaller side, ``r > min(m_i, n_j) / 2`` (a block that close to
   full rank is no longer a low-rank adapter; ``r > min`` is impossible).
6. Selection: per method and parameter count, the (configuration, lr)
   with the lowest validation loss averaged over seeds; report its test
   accuracy (mean +- std over seeds) and the drop from full fine-tuning
   (per-seed paired differences) against the fraction of trainable
   parameters ``(adapter + head) / 50,565``.

Epochs (measured on MNIST, batch 64, one seed, the full grid of 78 runs,
``python benchmarks/bench_adapters.py --sweep``): the learning rates are
small, so the number of epochs a run needs is set by its learning rate.
The median best epoch is 58 at lr 5e-4 (the latest 90), 132 at 2e-4 (the
latest 274) and 240 at 1e-4 (the latest 541, MELoRA N=8 r=2); 23 of the
26 runs at lr 1e-4 and 3 at 2e-4 need more than 200 epochs; together the
78 runs take 13,437 epochs. With a cap of 200 epochs (protocol 2), 54 of
the 78 lr 1e-4 runs of a 3-seed sweep were still improving when they were
cut off. The cap is therefore 1000 epochs:
in the 3-seed sweep of ``make reproduce`` (234 runs) every run ended by
early stopping, i.e. converged, the longest after 860 epochs (MELoRA N=16
r=2, lr 1e-4, seed 2). The summary says how many runs stopped early and
lists any that reached the cap instead.

Beyond the paper: several seeds (each seed redoes pretraining, the
validation split, the adapter initialisation and the shuffling), and a
plain statement per budget of whether Localized LoRA beats LoRA and
MELoRA beyond the seed spread: "beyond the spread" means the intervals
mean +- std of the two test accuracies do not overlap.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from joblib import Parallel, delayed

from .._extras import require
from .._io import atomic_write_csv, atomic_write_text, save_figure
from ..adapters import MLP, StructuredAdapter, pretrain, train
from ..datasets import load_mnist
from ..structures import get_structure
from ..sweep import RunLog, epoch_progress, run_sweep

__all__ = [
    "run_figure2",
    "plot_figure2",
    "figure2_configs",
    "Figure2Result",
    "LRS",
    "GRID",
    "DEFAULT_EPOCHS",
    "skip_reason",
]

SHAPE = (64, 784)
SIZES = (784, 64, 5)
N_MODEL_PARAMS = 50_565
LRS = (1e-4, 2e-4, 5e-4)
GRID = {
    "global": [{"n_blocks": 1, "rank": r} for r in (2, 4, 8, 16, 32)],
    "diagonal": [{"n_blocks": n, "rank": r} for n in (2, 4, 8, 16) for r in (2, 4, 8, 16, 32)],
    "block": [{"n_blocks": k, "rank": r} for k in (2, 4, 8, 16) for r in (2, 4, 8, 16)],
}
#: Structure labels come from the registry; "full" is full fine-tuning (not a structure).
LABELS = {**{m: get_structure(m).label for m in GRID}, "full": "Full FT"}
#: Epochs of every adaptation run (see the module notes for the convergence measurement).
DEFAULT_EPOCHS = 1000
#: Early stopping: a run ends once its validation loss has not improved for this many epochs.
PATIENCE = 20
BATCH_SIZE = 64
VAL_FRACTION = 0.1
TRAIN_HEAD = True
PRETRAIN = {"lr": 1e-3, "epochs": 20, "batch_size": 64}
PROTOCOL_VERSION = 3  # 2: early stopping (PATIENCE), 200 epochs at most; 3: at most 1000


# ---------------------------------------------------------------------------- configurations
def _layout(method, n_blocks, rank, shape=SHAPE):
    return get_structure(method).layout(shape, n_blocks).with_ranks(rank)


def skip_reason(method, n_blocks, rank, shape=SHAPE):
    """Why a configuration is skipped (``None`` if it is run).

    Rule: skip when ``rank > min(m_i, n_j) / 2`` for some active block.
    """
    lay = get_structure(method).layout(shape, n_blocks)
    side = int(lay.max_ranks[lay.active].min())
    if rank > side / 2:
        return f"rank {rank} > min(m_i, n_j)/2 = {side / 2:g} (blocks {lay.row_sizes[-1]}x{lay.col_sizes[-1]})"
    return None


def figure2_configs(grid=None, shape=SHAPE):
    """``(kept, skipped)``: lists of config dicts (``method, n_blocks, rank, n_params``);
    skipped ones carry a ``reason``."""
    grid = GRID if grid is None else grid
    kept, skipped = [], []
    for method, cfgs in grid.items():
        s = get_structure(method)
        if not s.spectral:
            raise ValueError(f"the adapters train layout structures; {method!r} is not one")
        for c in cfgs:
            k = s.fixed_blocks or int(c["n_blocks"])
            r = int(c["rank"])
            cfg = {"method": method, "n_blocks": k, "rank": r}
            why = skip_reason(method, k, r, shape)
            if why:
                skipped.append({**cfg, "reason": why})
            else:
                cfg["n_params"] = _layout(method, k, r, shape).n_params
                kept.append(cfg)
    return kept, skipped


def _config_name(method, n_blocks, rank):
    if method == "full":
        return "full"
    if method == "global":
        return f"r={rank}"
    return f"{'N' if method == 'diagonal' else 'K'}={n_blocks},r={rank}"


# ---------------------------------------------------------------------------- data
def _as_images(a, name):
    a = np.asarray(a)
    if a.ndim == 3:
        a = a.reshape(a.shape[0], -1)
    if a.ndim != 2 or a.shape[1] != 784:
        raise ValueError(f"{name} must be (N, 28, 28) or (N, 784) images, got shape {a.shape}")
    return a


def _prepare(data, subset):
    """Split MNIST into the pretraining set (0-4) and the adaptation/test sets (5-9)."""
    Xtr = _as_images(data.train_images, "train_images")
    ytr = np.asarray(data.train_labels).astype(np.int64)
    Xte = _as_images(data.test_images, "test_images")
    yte = np.asarray(data.test_labels).astype(np.int64)
    if len(ytr) != len(Xtr) or len(yte) != len(Xte):
        raise ValueError("images and labels differ in length")
    for y, nm in ((ytr, "train_labels"), (yte, "test_labels")):
        if y.size and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"{nm} must be digits 0-9")
    lo, hi, th = ytr < 5, ytr >= 5, yte >= 5
    out = {
        "pre_X": Xtr[lo],
        "pre_y": ytr[lo],
        "ad_X": Xtr[hi],
        "ad_y": ytr[hi] - 5,
        "te_X": Xte[th],
        "te_y": yte[th] - 5,
    }
    if subset is not None:
        subset = int(subset)
        if subset < 10:
            raise ValueError(f"subset must be >= 10 images, got {subset}")
        out = {k: v[:subset] for k, v in out.items()}
    for k in ("pre_y", "ad_y", "te_y"):
        if out[k].size == 0:
            raise ValueError(f"no images for {k} (need digits 0-4 and 5-9 in train and test)")
    return out


def _float(X):
    X = np.asarray(X)
    if X.dtype == np.uint8:
        return X.astype(np.float32) / np.float32(255)
    return np.ascontiguousarray(X, dtype=np.float32)


def _split(n, seed):
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    perm = rng.permutation(n)
    n_val = max(1, int(round(VAL_FRACTION * n)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _fingerprint(d):
    h = hashlib.sha256()
    for k in sorted(d):
        a = np.ascontiguousarray(d[k])
        h.update(k.encode() + str(a.shape).encode() + str(a.dtype).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:12]


def protocol_settings(d, *, epochs=DEFAULT_EPOCHS, batch_size=BATCH_SIZE, subset=None):
    """The settings that define a run of the protocol, with their hash ``tag`` (names cached files)."""
    settings = {
        "protocol": PROTOCOL_VERSION,
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "patience": PATIENCE,
        "subset": subset,
        "val_fraction": VAL_FRACTION,
        "train_head": TRAIN_HEAD,
        "pretrain": PRETRAIN,
        "data": _fingerprint(d),
    }
    settings["tag"] = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return settings


def pretrained_mlps(out_dir, seeds, d, tag, *, n_jobs=1, progress=False):
    """The MLPs pretrained on digits 0-4, one per seed, cached in ``out_dir/pretrained``."""
    pre_dir = os.path.join(out_dir, "pretrained")
    os.makedirs(pre_dir, exist_ok=True)
    pretrained, need = {}, []
    for s in seeds:
        p = os.path.join(pre_dir, f"mlp_{tag}_seed{s}.npz")
        if os.path.exists(p):
            pretrained[s] = MLP.load(p)
        else:
            need.append(s)
    if need:
        if progress:
            print(f"[figure2] pretraining on digits 0-4 for seeds {need} ...", file=sys.stderr, flush=True)
        mlps = Parallel(n_jobs=n_jobs)(delayed(_pretrain_task)(s, d["pre_X"], d["pre_y"]) for s in need)
        for s, m in zip(need, mlps):
            m.save(os.path.join(pre_dir, f"mlp_{tag}_seed{s}.npz"))
            pretrained[s] = m
    return pretrained


def full_ft_path(out_dir, tag, lr, seed):
    """Where the full fine-tune of ``seed`` at ``lr`` is kept (``out_dir/finetuned``): Figure 2's sweep
    writes it, :mod:`~blocklowrank.experiments.compress` reads it (or trains and writes it)."""
    return os.path.join(out_dir, "finetuned", f"full_{tag}_lr{lr:g}_seed{seed}.npz")


# ---------------------------------------------------------------------------- one run
def _pretrain_task(seed, pre_X, pre_y):
    res = pretrain(
        _float(pre_X),
        pre_y,
        sizes=SIZES,
        random_state=np.random.SeedSequence([seed, 0]),
        lr=PRETRAIN["lr"],
        epochs=PRETRAIN["epochs"],
        batch_size=PRETRAIN["batch_size"],
    )
    return res.mlp


def _summ(x, k=6):
    return [None if v is None else float(f"{v:.{k}g}") for v in x]


def train_run(task, *, data, pretrained, callback=None):
    """Train one run of the protocol: ``(TrainResult, n_params)``.

    ``task`` holds ``method`` ("full" or a structure with ``n_blocks`` and
    ``rank``), ``seed``, ``lr``, ``epochs``, ``batch_size`` and ``patience``;
    ``data`` the adaptation set (``ad_X``, ``ad_y``); ``pretrained`` the
    pretrained MLPs by seed (as dicts). The result's ``mlp`` is the trained
    model (every parameter for "full").
    """
    seed = task["seed"]
    mlp = MLP(**pretrained[seed])
    X = _float(data["ad_X"])
    y = data["ad_y"]
    tr, va = _split(len(y), seed)
    kw = dict(
        lr=task["lr"],
        epochs=task["epochs"],
        batch_size=task["batch_size"],
        X_val=X[va],
        y_val=y[va],
        random_state=np.random.SeedSequence([seed, 2]),
        restore_best=True,
        patience=task.get("patience"),
        callback=callback,
    )
    if task["method"] == "full":
        return train(mlp, X[tr], y[tr], mode="full", **kw), N_MODEL_PARAMS
    ad = StructuredAdapter(
        _layout(task["method"], task["n_blocks"], task["rank"]), random_state=np.random.SeedSequence([seed, 1])
    )
    return train(mlp, X[tr], y[tr], adapter=ad, mode="adapter", train_head=TRAIN_HEAD, **kw), ad.n_params


def _adapt_task(task, *, data, pretrained, keep_full=None, progress=False, live=False):
    """One adaptation run (a module-level function so joblib can pickle it). ``keep_full``: the path
    ``(lr, seed) -> str`` a full fine-tune's model is saved to (for the compress experiment)."""
    cpu0 = time.process_time()
    with epoch_progress(task["label"], task["epochs"], enabled=live) as cb:
        res, n_params = train_run(task, data=data, pretrained=pretrained, callback=cb)
    if task["method"] == "full" and keep_full is not None:
        path = keep_full(task["lr"], task["seed"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        res.mlp.save(path)
    te_loss, te_acc = res.evaluate(_float(data["te_X"]), data["te_y"])
    h = res.history
    b = res.best_epoch - 1
    return {
        "status": "ok",
        "n_params": n_params,
        "n_trainable": res.n_trainable,
        "best_epoch": res.best_epoch,
        "val_loss": h.val_loss[b],
        "val_acc": h.val_acc[b],
        "train_loss": h.train_loss[b],
        "test_loss": te_loss,
        "test_acc": te_acc,
        "final_val_loss": h.val_loss[-1],
        "seconds": res.seconds,
        "cpu_seconds": time.process_time() - cpu0,
        "history": {k: _summ(v) for k, v in h.to_dict().items()},
        "summary": f"val_loss {h.val_loss[b]:.4f} test_acc {100 * te_acc:.2f}% (best epoch {res.best_epoch})",
    }


def _cost_estimate(task):
    """Rough relative cost of a run (only used to start the long runs first)."""
    if task["method"] == "full":
        n = N_MODEL_PARAMS
    else:
        n = _layout(task["method"], task["n_blocks"], task["rank"]).n_params
    return (1.0 + n / 10_000) / task["lr"]


# ---------------------------------------------------------------------------- results
@dataclass
class Figure2Result:
    """What :func:`run_figure2` returns (and :func:`plot_figure2` draws).

    Attributes
    ----------
    runs : list of dict
        Every run record (one per configuration, lr and seed).
    table : list of dict
        One row per configuration and lr, aggregated over seeds (the rows
        of ``sweep.csv``), including skipped configurations.
    selected : list of dict
        Per method and parameter count, the row chosen by validation loss,
        with ``drop_mean``/``drop_std`` (percentage points below full FT).
    full_ft : dict
        The chosen full fine-tuning row.
    comparisons : list of dict
        Localized LoRA vs LoRA and MELoRA at each shared budget.
    skipped : list of dict
    summary : str
        The plain-text verdicts (also in ``figure2_summary.txt``).
    """

    runs: list
    table: list
    selected: list
    full_ft: dict
    comparisons: list
    skipped: list
    summary: str
    settings: dict = field(default_factory=dict)
    out_dir: str = None


def _mean_std(v):
    v = np.asarray(v, dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _aggregate(runs, seeds, skipped):
    groups = {}
    for r in runs:
        t = r["task"]
        key = (t["method"], t["n_blocks"], t["rank"], t["lr"])
        groups.setdefault(key, []).append(r)
    table = []
    for (method, k, rank, lr), rs in groups.items():
        ok = sorted((r for r in rs if r.get("status") == "ok"), key=lambda r: r["task"]["seed"])
        failed = [r for r in rs if r.get("status") != "ok"]
        n_params = N_MODEL_PARAMS if method == "full" else _layout(method, k, rank).n_params
        n_train = N_MODEL_PARAMS if method == "full" else n_params + (325 if TRAIN_HEAD else 0)
        vl, va = _mean_std([r["val_loss"] for r in ok])
        ta, ts = _mean_std([r["test_acc"] for r in ok])
        table.append(
            {
                "method": method,
                "label": LABELS[method],
                "config": _config_name(method, k, rank),
                "n_blocks": k,
                "rank": rank,
                "lr": lr,
                "n_params": n_params,
                "n_trainable": n_train,
                "fraction": n_train / N_MODEL_PARAMS,
                "n_seeds": len(ok),
                "n_failed": len(failed),
                "val_loss_mean": vl,
                "val_loss_std": va,
                "test_acc_mean": ta,
                "test_acc_std": ts,
                "best_epoch_mean": _mean_std([r["best_epoch"] for r in ok])[0],
                "status": "ok" if not failed else ("failed" if not ok else "partly failed"),
                "error": failed[0].get("error") if failed else "",
                "seeds": [r["task"]["seed"] for r in ok],
                "test_accs": [r["test_acc"] for r in ok],
                "selected": False,
                "reason": "",
            }
        )
    for s in skipped:
        n_params = _layout(s["method"], s["n_blocks"], min(s["rank"], 1)).n_params * s["rank"]
        table.append(
            {
                "method": s["method"],
                "label": LABELS[s["method"]],
                "config": _config_name(s["method"], s["n_blocks"], s["rank"]),
                "n_blocks": s["n_blocks"],
                "rank": s["rank"],
                "lr": None,
                "n_params": n_params,
                "n_trainable": n_params + (325 if TRAIN_HEAD else 0),
                "fraction": (n_params + (325 if TRAIN_HEAD else 0)) / N_MODEL_PARAMS,
                "n_seeds": 0,
                "n_failed": 0,
                "status": "skipped",
                "reason": s["reason"],
                "selected": False,
            }
        )
    order = {"full": 0, "global": 1, "diagonal": 2, "block": 3}
    table.sort(key=lambda r: (order[r["method"]], r["n_params"], r["n_blocks"], r["rank"], r["lr"] or 0))
    return table


def _select(table, n_seeds):
    """Per (method, n_params): the complete row (all seeds ok) with the lowest mean val loss."""
    best = {}
    for row in table:
        if row["status"] != "ok" or row["n_seeds"] < n_seeds:
            continue
        key = (row["method"], row["n_params"])
        if key not in best or row["val_loss_mean"] < best[key]["val_loss_mean"]:
            best[key] = row
    for row in best.values():
        row["selected"] = True
    return best


def _paired_drop(row, ft):
    """Per-seed accuracy drop from full FT (percentage points), paired by seed."""
    ft_by_seed = dict(zip(ft["seeds"], ft["test_accs"]))
    d = [100 * (ft_by_seed[s] - a) for s, a in zip(row["seeds"], row["test_accs"]) if s in ft_by_seed]
    return _mean_std(d)


def _compare(best):
    out = []
    loc = {n: r for (m, n), r in best.items() if m == "block"}
    for n, L in sorted(loc.items()):
        for other in ("global", "diagonal"):
            O = best.get((other, n))
            if O is None:
                continue
            la, ls = 100 * L["test_acc_mean"], 100 * L["test_acc_std"]
            oa, os_ = 100 * O["test_acc_mean"], 100 * O["test_acc_std"]
            n_seeds = min(L["n_seeds"], O["n_seeds"])
            if n_seeds < 2:
                verdict = ("higher" if la > oa else "lower" if la < oa else "equal") + (
                    " (one seed: the spread is unknown)"
                )
            elif la - ls > oa + os_:
                verdict = "better, beyond the seed spread"
            elif la + ls < oa - os_:
                verdict = "worse, beyond the seed spread"
            else:
                verdict = "within the seed spread (no clear difference)"
            out.append(
                {
                    "n_params": n,
                    "localized": L["config"],
                    "other_method": LABELS[other],
                    "other": O["config"],
                    "localized_acc": la,
                    "localized_std": ls,
                    "other_acc": oa,
                    "other_std": os_,
                    "verdict": verdict,
                }
            )
    return out


def _summary_text(selected, ft, comps, skipped, settings):
    lines = []
    lines.append("Figure 2 reproduction: MNIST 0-4 -> 5-9 adaptation, first-layer adapters")
    lines.append(
        f"seeds={settings['seeds']}, epochs={settings['epochs']}, batch={settings['batch_size']}, "
        f"lrs={list(settings['lrs'])}, subset={settings['subset']}, head trained={TRAIN_HEAD}"
    )
    lines.append(
        f"Skip rule: a configuration is skipped when a block's rank r > min(m_i, n_j)/2 ({len(skipped)} skipped)."
    )
    if ft:
        lines.append(
            f"Full fine-tuning ({N_MODEL_PARAMS} params, lr={ft['lr']:g}): test accuracy "
            f"{100 * ft['test_acc_mean']:.2f} +- {100 * ft['test_acc_std']:.2f}% (paper: 97.59%)"
        )
    cpu = settings.get("cpu_seconds")
    if cpu:
        lines.append(
            f"Compute: {settings['n_runs']} runs, {cpu:.0f} CPU-seconds in the runs "
            f"({cpu / max(settings['n_runs'], 1):.1f} s per run); this call took {settings['seconds']:.0f} s."
        )
    conv = settings.get("convergence")
    if conv:
        lines.append(
            f"Convergence: {conv['early_stopped']} of {conv['ok']} runs ended by early stopping "
            f"(no better validation loss for {settings['patience']} epochs) before the cap of "
            f"{settings['epochs']} epochs; the longest took {conv['longest']} epochs ({conv['longest_label']})"
            + (f"; {len(conv['capped'])} reached the cap: " + ", ".join(conv["capped"]) if conv["capped"] else "")
            + "."
        )
    lines.append("")
    lines.append(f"{'method':<15}{'config':<10}{'lr':>8}{'params':>8}{'frac %':>8}{'test acc %':>16}{'drop pp':>16}")
    for r in selected:
        lines.append(
            f"{r['label']:<15}{r['config']:<10}{r['lr']:>8g}{r['n_params']:>8d}{100 * r['fraction']:>8.2f}"
            f"{100 * r['test_acc_mean']:>9.2f} +- {100 * r['test_acc_std']:<4.2f}"
            f"{r.get('drop_mean', float('nan')):>9.2f} +- {r.get('drop_std', float('nan')):<4.2f}"
        )
    lines.append("")
    lines.append("Does Localized LoRA beat LoRA and MELoRA at the same budget? (mean +- std intervals)")
    if not comps:
        lines.append("  no budget shared by Localized LoRA and another method")
    for c in comps:
        lines.append(
            f"  {c['n_params']:>6d} params: Localized {c['localized']} {c['localized_acc']:.2f}+-{c['localized_std']:.2f}% "
            f"vs {c['other_method']} {c['other']} {c['other_acc']:.2f}+-{c['other_std']:.2f}%: "
            f"Localized is {c['verdict']}"
        )
    return "\n".join(lines) + "\n"


_CSV_FIELDS = [
    "method",
    "label",
    "config",
    "n_blocks",
    "rank",
    "lr",
    "n_params",
    "n_trainable",
    "fraction",
    "n_seeds",
    "n_failed",
    "val_loss_mean",
    "val_loss_std",
    "test_acc_mean",
    "test_acc_std",
    "drop_mean",
    "drop_std",
    "best_epoch_mean",
    "selected",
    "status",
    "reason",
    "error",
]


def _write_csv(path, table):
    rows = ({k: ("" if row.get(k) is None else row.get(k, "")) for k in _CSV_FIELDS} for row in table)
    atomic_write_csv(path, rows, _CSV_FIELDS, extrasaction="ignore")


# ---------------------------------------------------------------------------- entry point
def run_figure2(
    out_dir, *, seeds=3, epochs=DEFAULT_EPOCHS, lrs=LRS, grid=None, batch_size=BATCH_SIZE, subset=None, data=None,
    n_jobs=1, progress=True,
):  # fmt: skip
    """Run (or resume) the Figure 2 sweep; write ``sweep.csv`` and a summary.

    Parameters
    ----------
    out_dir : str or path-like
        Gets ``figure2_runs.jsonl`` (one line per finished run: the resume
        log), ``sweep.csv`` (one row per configuration and lr, mean and std
        over seeds; skipped configurations with their reason),
        ``figure2_summary.txt``, ``pretrained/`` and ``finetuned/`` (the full
        fine-tunes, which ``reproduce compress`` reuses). Rerunning with the
        same settings continues where a killed sweep stopped.
    seeds : int or sequence of int, default=3
        Number of seeds (0, 1, ...) or the seeds themselves.
    epochs : int, default=DEFAULT_EPOCHS
    n_jobs : int, default=1
        Parallel runs through joblib (``-1``: all cores). Each run uses one
        BLAS thread. The backend follows ``joblib.parallel_config`` (Dask,
        Ray, ... on a cluster, with no code change).
    progress : bool, default=True
        Progress on stderr: a line per finished run with the overall
        progress and ETA, and per-run epoch progress.
    subset : int, optional
        Use only the first ``subset`` images of each split (pretraining,
        adaptation, test): for quick checks.
    lrs : sequence of float, default=(1e-4, 2e-4, 5e-4)
    grid : dict, optional
        ``{method: [{"n_blocks": K, "rank": r}, ...]}`` to run a part of
        :data:`GRID`.
    batch_size : int, default=64
    data : object, optional
        MNIST-like object with ``train_images, train_labels, test_images,
        test_labels``; default :func:`blocklowrank.datasets.load_mnist`.

    Returns
    -------
    Figure2Result
    """
    t0 = time.perf_counter()
    seed_list, lrs = _check_sweep(seeds, epochs, lrs)
    kept, skipped = figure2_configs(grid)
    d = _prepare(load_mnist() if data is None else data, subset)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    settings = protocol_settings(d, epochs=epochs, batch_size=batch_size, subset=subset)
    settings.update({"seeds": seed_list, "lrs": lrs})

    # 1. pretraining, once per seed (cached in out_dir/pretrained)
    pretrained = pretrained_mlps(out_dir, seed_list, d, settings["tag"], n_jobs=n_jobs, progress=progress)
    pre_dicts = {s: m.to_dict() for s, m in pretrained.items()}

    # 2. the sweep
    tasks = _sweep_tasks(kept, lrs, seed_list, epochs, batch_size, settings["tag"])
    fn = functools.partial(
        _adapt_task,
        data={k: d[k] for k in ("ad_X", "ad_y", "te_X", "te_y")},
        pretrained=pre_dicts,
        keep_full=functools.partial(full_ft_path, out_dir, settings["tag"]),
    )
    log = RunLog(os.path.join(out_dir, "figure2_runs.jsonl"))
    # longest runs first, so that the workers finish together: a run's time grows
    # with 1 / lr (epochs to converge) and with its parameters (work per step)
    order = sorted(tasks, key=lambda t: -_cost_estimate(t))
    results = run_sweep(order, fn, log, n_jobs=n_jobs, progress=progress, name="figure2", label=lambda t: t["label"])
    runs = [results[t["id"]] for t in tasks]

    # 3. aggregate, select, compare
    table = _aggregate(runs, seed_list, skipped)
    best = _select(table, len(seed_list))
    ft = best.get(("full", N_MODEL_PARAMS))
    selected = sorted(
        (r for (m, _), r in best.items() if m != "full"),
        key=lambda r: ({"global": 0, "diagonal": 1, "block": 2}[r["method"]], r["n_params"]),
    )
    if ft is not None:
        for r in selected:
            r["drop_mean"], r["drop_std"] = _paired_drop(r, ft)
        ft["drop_mean"], ft["drop_std"] = 0.0, 0.0
    comps = _compare(best)
    settings["seconds"] = time.perf_counter() - t0
    settings["n_runs"] = len(runs)
    settings["cpu_seconds"] = float(sum(r.get("cpu_seconds") or 0.0 for r in runs))
    settings.update(_convergence(tasks, runs, epochs))
    text = _summary_text(selected, ft, comps, skipped, settings)
    _write_csv(os.path.join(out_dir, "sweep.csv"), table)
    atomic_write_text(os.path.join(out_dir, "figure2_summary.txt"), text)
    if progress:
        print(text, file=sys.stderr, flush=True)
    return Figure2Result(
        runs=runs,
        table=table,
        selected=selected,
        full_ft=ft,
        comparisons=comps,
        skipped=skipped,
        summary=text,
        settings=settings,
        out_dir=out_dir,
    )


def _check_sweep(seeds, epochs, lrs):
    """The seeds as a list and the learning rates as a tuple of floats, after checking them and ``epochs``."""
    if isinstance(seeds, (int, np.integer)):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        seed_list = list(range(int(seeds)))
    else:
        seed_list = [int(s) for s in seeds]
        if not seed_list or len(set(seed_list)) != len(seed_list):
            raise ValueError("seeds must be a positive int or a list of distinct ints")
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    lrs = tuple(float(lr) for lr in lrs)
    if not lrs or any(not np.isfinite(lr) or lr <= 0 for lr in lrs):
        raise ValueError(f"lrs must be positive finite numbers, got {lrs}")
    return seed_list, lrs


def _sweep_tasks(kept, lrs, seed_list, epochs, batch_size, tag):
    """One task per run: full fine-tuning and every kept configuration, at every lr and seed."""
    tasks = []
    for cfg in [{"method": "full", "n_blocks": None, "rank": None}] + kept:
        for lr in lrs:
            for s in seed_list:
                name = f"{LABELS[cfg['method']]} {_config_name(cfg['method'], cfg['n_blocks'], cfg['rank'])}"
                tasks.append(
                    {
                        "id": f"{cfg['method']}|{cfg['n_blocks']}|{cfg['rank']}|{lr:g}|{s}|{tag}",
                        "method": cfg["method"],
                        "n_blocks": cfg["n_blocks"],
                        "rank": cfg["rank"],
                        "lr": lr,
                        "seed": s,
                        "epochs": int(epochs),
                        "batch_size": int(batch_size),
                        "patience": PATIENCE,
                        "label": f"{name} lr={lr:g} seed={s}",
                    }
                )
    return tasks


def _convergence(tasks, runs, epochs):
    """``{"convergence": ...}``: how many finished runs stopped early, which reached the cap, the longest."""
    ok = [(t, r) for t, r in zip(tasks, runs) if r.get("status") == "ok"]
    if not ok:
        return {}
    n_ep = [len(r["history"]["epoch"]) for _, r in ok]
    capped = [t["label"] for (t, r), e in zip(ok, n_ep) if e >= int(epochs) and e - r["best_epoch"] < PATIENCE]
    k = int(np.argmax(n_ep))
    return {
        "convergence": {
            "ok": len(ok),
            "early_stopped": len(ok) - len(capped),
            "capped": capped,
            "longest": int(n_ep[k]),
            "longest_label": ok[k][0]["label"],
        }
    }


# ---------------------------------------------------------------------------- plot
_STYLE = {
    "global": dict(color="tab:blue", marker="o"),
    "diagonal": dict(color="tab:orange", marker="s"),
    "block": dict(color="tab:green", marker="^"),
}


def _pareto(points):
    """Non-dominated points (fewer parameters and smaller drop), sorted by parameters."""
    pts = sorted(points, key=lambda p: (p[0], p[1]))
    front, best = [], float("inf")
    for x, y in pts:
        if y < best:
            front.append((x, y))
            best = y
    return front


def plot_figure2(result, path=None, *, ax=None, title=None):
    """Draw the accuracy drop from full fine-tuning against the fraction of
    trainable parameters, one marker per selected configuration (error bars:
    std over seeds) and each method's Pareto frontier. At equal budgets the
    methods' markers are shifted by +-3 % along the (log) x-axis to keep them
    apart.

    Parameters
    ----------
    result : Figure2Result
    path : str, optional
        Where to save the figure (e.g. ``results/figure2.png``).
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    ticker = require("matplotlib.ticker")
    if ax is None:
        fig, ax = require("matplotlib.pyplot").subplots(figsize=(7, 4.5), dpi=120)
    else:
        fig = ax.figure
    for method in ("global", "diagonal", "block"):
        rows = [r for r in result.selected if r["method"] == method and "drop_mean" in r]
        if not rows:
            continue
        # equal budgets: spread the three methods slightly sideways so error bars stay readable
        dodge = {"global": 0.97, "diagonal": 1.0, "block": 1.03}[method]
        x = np.array([100 * r["fraction"] for r in rows]) * dodge
        y = np.array([r["drop_mean"] for r in rows])
        e = np.array([r["drop_std"] for r in rows])
        st = _STYLE[method]
        ax.errorbar(
            x, y, yerr=e, ls="none", marker=st["marker"], color=st["color"], capsize=3, label=LABELS[method], alpha=0.9
        )
        for xi, yi, r in zip(x, y, rows):
            ax.annotate(r["config"], (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=6, color=st["color"])
        front = _pareto(list(zip(x, y)))
        fx, fy = zip(*front)
        ax.step(fx, fy, where="post", color=st["color"], lw=1.2, alpha=0.7)
    ax.axhline(0, color="k", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.FixedLocator([0.5, 1, 2, 5, 10, 20, 50, 100]))
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel(
        "trainable parameters: adapter + output layer (% of the MLP's 50,565)"
        if TRAIN_HEAD
        else "trainable parameters (% of the MLP's 50,565)"
    )
    ax.set_ylabel("accuracy drop from full fine-tuning (pp)")
    ft = result.full_ft
    n = len(result.settings.get("seeds", [])) if result.settings else 0
    if title is None:
        title = "MNIST 0-4 -> 5-9: structured adapters on the first layer"
        if ft:
            title += f"\nfull FT {100 * ft['test_acc_mean']:.2f}±{100 * ft['test_acc_std']:.2f}% ({n} seed{'s' if n != 1 else ''}); lines: Pareto frontiers"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    if path is not None:
        d = os.path.dirname(os.fspath(path))
        if d:
            os.makedirs(d, exist_ok=True)
        save_figure(fig, path)
    return fig

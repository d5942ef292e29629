"""Writes notebooks/02_adapters.ipynb (nbformat 4, no outputs). Run from the repo root."""

import json
import os

CELLS = [
    (
        "markdown",
        """# Structured adapters on MNIST (paper Experiment 2, small scale)

An MLP `784 -> 64 (ReLU) -> 5` is pretrained on digits 0-4, then adapted to digits 5-9
(labels 5-9 -> 0-4) with a structured low-rank update `dW` of its first layer, added before
the ReLU while `W1, b1` stay frozen:

* **LoRA**: one global `B A` (1 x 1 grid),
* **MELoRA**: `N` diagonal blocks, each `B_ii A_ii`,
* **Localized LoRA**: every block of a `K x K` grid, each `B_ij A_ij`.

All three are the same object, a `StructuredAdapter` on a `BlockLayout`; gradients are closed
form and the frozen pre-activation `W1 x + b1` is computed once per data set.
Set `BLOCKLOWRANK_NB_FAST=1` to run everything on a small subset in seconds.""",
    ),
    (
        "code",
        """import os
import tempfile

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from blocklowrank.adapters import MLP, StructuredAdapter, fine_tune, fit_adapter, pretrain
from blocklowrank.experiments.figure2 import plot_figure2, run_figure2

FAST = os.environ.get("BLOCKLOWRANK_NB_FAST") == "1"
N_TRAIN = 600 if FAST else 20000   # images per split used in this notebook
EPOCHS = 2 if FAST else 30""",
    ),
    (
        "markdown",
        """## Data
`load_mnist()` reads the cached MNIST files (fetching them once). In fast mode without the
cache, a synthetic stand-in with the same shapes is used so the notebook still runs.""",
    ),
    (
        "code",
        """try:
    from blocklowrank.datasets import load_mnist

    mnist = load_mnist()
    source = "MNIST"
except Exception as exc:  # no cache / no network
    if not FAST:
        raise
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    protos = rng.random((10, 784))

    def fake(n):
        y = rng.integers(0, 10, n)
        x = np.clip(protos[y] + 0.35 * rng.standard_normal((n, 784)), 0, 1)
        return (255 * x).astype(np.uint8).reshape(n, 28, 28), y.astype(np.uint8)

    tr, te = fake(2 * N_TRAIN), fake(N_TRAIN)
    mnist = SimpleNamespace(train_images=tr[0], train_labels=tr[1], test_images=te[0], test_labels=te[1])
    source = f"synthetic stand-in ({type(exc).__name__})"


def split(images, labels, digits):
    keep = np.isin(labels, digits)
    X = images[keep].reshape(-1, 784).astype(np.float32) / 255
    return X[:N_TRAIN], (labels[keep].astype(int) - min(digits))[:N_TRAIN]


X_pre, y_pre = split(mnist.train_images, mnist.train_labels, range(5))
X_ad, y_ad = split(mnist.train_images, mnist.train_labels, range(5, 10))
X_te, y_te = split(mnist.test_images, mnist.test_labels, range(5, 10))
n_val = len(y_ad) // 10
X_val, y_val, X_tr, y_tr = X_ad[:n_val], y_ad[:n_val], X_ad[n_val:], y_ad[n_val:]
print(source, X_pre.shape, X_tr.shape, X_val.shape, X_te.shape)""",
    ),
    ("markdown", "## Pretraining on digits 0-4"),
    (
        "code",
        """pre = pretrain(X_pre, y_pre, sizes=(784, 64, 5), epochs=3 if FAST else 20, random_state=0)
mlp = pre.mlp
print(f"{mlp.n_params} parameters; accuracy on 5-9 before adapting: {mlp.score(X_te, y_te):.3f}")""",
    ),
    (
        "markdown",
        """## One adapter of each kind at the same budget
LoRA `r=4`, MELoRA `N=4, r_diag=4` and Localized LoRA `K=2, r_block=2` all have
`4 * (64 + 784) = 3392` parameters. The output layer is trained too.""",
    ),
    (
        "code",
        """shape = mlp.W1.shape
adapters = {
    "LoRA r=4": StructuredAdapter.lora(shape, 4, random_state=0),
    "MELoRA N=4, r=4": StructuredAdapter.melora(shape, 4, 4, random_state=0),
    "Localized K=2, r=2": StructuredAdapter.localized(shape, 2, 2, random_state=0),
}
results = {}
for name, ad in adapters.items():
    results[name] = fit_adapter(mlp, X_tr, y_tr, ad, lr=5e-4, epochs=EPOCHS, X_val=X_val, y_val=y_val,
                                random_state=0)
results["Full FT"] = fine_tune(mlp, X_tr, y_tr, lr=5e-4, epochs=EPOCHS, X_val=X_val, y_val=y_val, random_state=0)
for name, res in results.items():
    print(f"{name:<20} trainable {res.n_trainable:>6}  test acc {res.score(X_te, y_te):.4f}  "
          f"({res.history.seconds[-1]:.1f} s)")""",
    ),
    ("markdown", "## Learning curves"),
    (
        "code",
        """fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for name, res in results.items():
    h = res.history
    axes[0].plot(h.epoch, h.val_loss, label=name)
    axes[0].plot(h.epoch, h.train_loss, ls=":", color=axes[0].lines[-1].get_color())
    axes[1].plot(h.epoch, h.val_acc, label=name)
axes[0].set(xlabel="epoch", ylabel="loss (solid: validation, dotted: train)", yscale="log")
axes[1].set(xlabel="epoch", ylabel="validation accuracy")
axes[1].legend(fontsize=8)
fig.tight_layout()""",
    ),
    ("markdown", "## Where each method puts its update: |dW| of the first layer"),
    (
        "code",
        """fig, axes = plt.subplots(3, 1, figsize=(10, 4))
for ax, (name, ad) in zip(axes, adapters.items()):
    ax.imshow(np.abs(ad.delta_weight()), aspect="auto", cmap="magma")
    ax.set_title(f"{name}: {ad.n_params} parameters", fontsize=9)
    ax.set_xticks([]); ax.set_yticks([])
fig.tight_layout()""",
    ),
    (
        "markdown",
        """## Accuracy against budget
A reduced version of the Figure 2 sweep (`run_figure2`, resumable, `n_jobs` for parallel runs):
each point is the configuration with the best validation loss at its parameter count, the error
bars are the spread over seeds, the lines each method's Pareto frontier. The full protocol is
`blocklowrank reproduce figure2 --out results`.""",
    ),
    (
        "code",
        """grid = {
    "global": [{"rank": r} for r in (2, 4, 8)],
    "diagonal": [{"n_blocks": 4, "rank": r} for r in (2, 4, 8)],
    "block": [{"n_blocks": 2, "rank": 2}, {"n_blocks": 4, "rank": 2}, {"n_blocks": 2, "rank": 4}],
}
if FAST:
    grid = {method: configs[:1] for method, configs in grid.items()}
out = tempfile.mkdtemp(prefix="fig2_nb_")
sweep = run_figure2(out, seeds=2, epochs=1 if FAST else 15, lrs=(5e-4,) if FAST else (2e-4, 5e-4),
                    grid=grid, subset=N_TRAIN, progress=True, data=mnist)
print(sweep.summary)
plot_figure2(sweep);""",
    ),
]


def main():
    nb = {
        "cells": [],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    for i, (kind, src) in enumerate(CELLS):
        lines = src.splitlines(keepends=True)
        cell = {"cell_type": kind, "id": f"cell-{i:02d}", "metadata": {}, "source": lines}
        if kind == "code":
            cell["execution_count"] = None
            cell["outputs"] = []
        nb["cells"].append(cell)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "02_adapters.ipynb")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(nb, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print("wrote", path)


if __name__ == "__main__":
    main()

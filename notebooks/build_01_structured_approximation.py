"""Writes notebooks/01_structured_approximation.ipynb (no outputs are committed).

Run: python notebooks/build_01_structured_approximation.py
"""

import json
from pathlib import Path

cells = []


def md(text):
    cells.append(
        {
            "cell_type": "markdown",
            "id": f"cell-{len(cells):02d}",
            "metadata": {},
            "source": text.strip("\n").splitlines(True),
        }
    )


def code(text):
    cells.append(
        {
            "cell_type": "code",
            "id": f"cell-{len(cells):02d}",
            "metadata": {},
            "execution_count": None,
            "outputs": [],
            "source": text.strip("\n").splitlines(True),
        }
    )


md("""
# Structured low-rank approximation of an MNIST digit

What a researcher does first with `blocklowrank`: load a digit, fit the three structures of the
Localized LoRA paper at one parameter budget, look at the reconstructions, trace the error against the
budget, let the library allocate ranks, and drop an estimator into a scikit-learn pipeline.
""")
code("""
import os
import numpy as np
import matplotlib
matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt

import blocklowrank as blr
from blocklowrank import BlockLowRank, DiagonalBlockLowRank, GlobalLowRank, approximate
from blocklowrank.datasets import load_mnist_split

FAST = os.environ.get("BLOCKLOWRANK_NB_FAST") == "1"   # the test suite runs this notebook fast
images, labels = load_mnist_split("test")
if FAST:
    images, labels = images[:500], labels[:500]
digit = images[1].astype(float)          # the paper's digit: the first "2" of the test set
print(labels[1], digit.shape, np.linalg.matrix_rank(digit))
""")
md("""
## The three structures at 224 parameters

LoRA with rank 4, MELoRA with 4 diagonal blocks of rank 4, and Localized LoRA with a 2×2 grid of rank-2
blocks all cost `4·(28+28) = 224` parameters (Table I of the paper).
""")
code("""
models = {
    "LoRA r=4": GlobalLowRank(rank=4),
    "MELoRA N=4 r=4": DiagonalBlockLowRank(n_blocks=4, rank=4),
    "Localized K=2 r=2": BlockLowRank(n_blocks=2, rank=2),
    "optimal ranks, 2x2": BlockLowRank(n_blocks=2, budget=224),
}
for name, est in models.items():
    est.fit(digit)
    print(f"{name:<20} params {est.n_params_:4d}  error {est.error_:.4f}  ranks {est.ranks_.tolist()}")
""")
code("""
fig, axes = plt.subplots(1, len(models) + 1, figsize=(12, 2.8))
axes[0].imshow(digit, cmap="gray"); axes[0].set_title("original")
for ax, (name, est) in zip(axes[1:], models.items()):
    ax.imshow(est.reconstruct(), cmap="gray", vmin=0, vmax=255)
    ax.set_title(f"{name}\\nerr {est.error_:.3f}", fontsize=9)
for ax in axes:
    ax.axis("off")
plt.tight_layout()
""")
md("""
## Which configurations exist at a budget?

`match_budget` lists every configuration of each method whose count equals the budget;
`compare_at_budget` fits them all (plus the budget-optimal allocation of each partition) and ranks them.
""")
code("""
from blocklowrank import compare_at_budget, count_params, match_budget

print(count_params("block", (28, 28), rank=2, n_blocks=2), count_params("diagonal", (256, 256), rank=4, n_blocks=4))
configs = match_budget((28, 28), 224)
print(len(configs), "configurations at 224 parameters")
ranking = compare_at_budget(digit, 224)
for rec in list(ranking)[:5]:
    print({k: rec[k] for k in ("method", "n_blocks", "rank", "n_params", "error")})
""")
md("""
## Error against budget, over many digits

`approximate` works on a stack of images in a few batched calls. The error of every rank follows from
the singular values, so one spectrum per partition gives the whole curve.
""")
code("""
stack = images[:200].astype(float)
budgets, curves = [], {"LoRA": [], "Localized K=2": [], "optimal 2x2": []}
for r in range(1, 15):
    budgets.append(56 * r)
    curves["LoRA"].append(approximate(stack, method="global", rank=r).error.mean())
    curves["Localized K=2"].append(approximate(stack, method="block", n_blocks=2, rank=r // 2).error.mean() if r % 2 == 0 and r // 2 <= 14 else np.nan)
    curves["optimal 2x2"].append(approximate(stack, method="block", n_blocks=2, budget=56 * r).error.mean())
for name, ys in curves.items():
    plt.plot(budgets, ys, "o-", label=name)
plt.xlabel("parameters"); plt.ylabel("mean relative error"); plt.legend(); plt.title("200 test digits")
""")
md("""
## Rank allocation

With `budget=`, each block gets the ranks that minimise the error: water-filling over the blocks'
singular values by gain per parameter. Blank corners of a digit get rank 0.
""")
code("""
est = BlockLowRank(n_blocks=4, budget=224).fit(digit)
print(est.ranks_)
print("error", round(est.error_, 4), "vs uniform rank 1:", round(BlockLowRank(n_blocks=4, rank=1).fit(digit).error_, 4))
tol = BlockLowRank(n_blocks=2, max_error=0.1).fit(digit)
print("fewest parameters for 10% error:", tol.n_params_, tol.ranks_.tolist())
""")
md("""
## In a scikit-learn pipeline

The estimators are scikit-learn transformers: `GlobalLowRank` is an uncentred truncated SVD, so it can
feed a classifier. `score` is minus the relative reconstruction error on held-out rows, so
`GridSearchCV` measures how well each rank generalises without labels (more rank always fits better;
the curve shows how fast the gain flattens).
""")
code("""
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

n = 400 if FAST else 3000
Xflat = images[:n].reshape(n, -1) / 255.0
y = labels[:n]
pipe = make_pipeline(GlobalLowRank(rank=20), StandardScaler(), LogisticRegression(max_iter=300))
pipe.fit(Xflat[: n // 2], y[: n // 2])
print("accuracy on held-out digits:", round(pipe.score(Xflat[n // 2 :], y[n // 2 :]), 3))

search = GridSearchCV(GlobalLowRank(), {"rank": [5, 10, 20, 40]}, cv=3).fit(Xflat)
for rank, score in zip(search.cv_results_["param_rank"], search.cv_results_["mean_test_score"]):
    print(f"rank {rank:2d}: held-out relative error {-score:.3f}")
""")

nb = {
    "cells": cells,
    "metadata": {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    },
    "nbformat": 4,
    "nbformat_minor": 5,
}
out = Path(__file__).resolve().parent / "01_structured_approximation.ipynb"
out.write_text(json.dumps(nb, indent=1) + "\n")
print("wrote", out)

"""Paper Table I and Figure 1: one MNIST digit at a budget of 224 parameters.

The paper approximates the first "2" of the MNIST test set (index 1; a
28 x 28 image of rank 15) with LoRA (r=4), MELoRA (N=4, r_diag=4) and
Localized LoRA (K=2, r_block=2) -- all 224 parameters -- and reports the
normalised Frobenius errors 0.2313, 0.9071 and 0.2119. We add two rows: the
budget-optimal rank allocation on the 2 x 2 partition and the best
configuration :func:`blocklowrank.compare.compare_at_budget` finds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._extras import pyplot_agg
from .._io import atomic_write_csv, atomic_write_text, save_figure
from ..compare import compare_at_budget
from ..datasets import load_mnist_split
from ..structures import approximate

#: The paper's Table I (arXiv 2506.00236), for comparison in the output.
PAPER_TABLE1 = {("global", 1, 4): 0.2313, ("diagonal", 4, 4): 0.9071, ("block", 2, 2): 0.2119}
PAPER_LABELS = {"global": "LoRA", "diagonal": "MELoRA", "block": "Localized LoRA"}
BUDGET = 224
IMAGE_INDEX = 1


def _fmt_nb(nb):
    if isinstance(nb, (tuple, list)):
        return f"{nb[0]}x{nb[1]}" if nb[0] != nb[1] else str(nb[0])
    return str(nb)


def compute_table1(image, budget=BUDGET):
    """Rows of Table I for ``image`` (any scale; errors are relative).

    Returns
    -------
    rows : list of dict
        ``label, method, n_blocks, rank, n_params, error, paper_error``
        plus ``reconstruction`` (ndarray) for plotting.
    """
    X = np.asarray(image, dtype=np.float64)
    rows = []
    for (method, K, r), paper in PAPER_TABLE1.items():
        res = approximate(X, method=method, n_blocks=K, rank=r, svd_solver="full")
        label = f"{PAPER_LABELS[method]} ({'r' if method == 'global' else ('N' if method == 'diagonal' else 'K')}"
        label += f"={K}, r={r})" if method != "global" else f"={r})"
        if method == "diagonal":
            label = f"MELoRA (N={K}, r_diag={r})"
        elif method == "block":
            label = f"Localized LoRA (K={K}, r_block={r})"
        rows.append(
            dict(
                label=label,
                method=method,
                n_blocks=K,
                rank=r,
                n_params=res.n_params,
                error=res.error,
                paper_error=paper,
                reconstruction=res.reconstruction,
            )
        )
    opt = approximate(X, method="block", n_blocks=2, budget=budget, svd_solver="full")
    rows.append(
        dict(
            label="Budget-optimal 2x2 (ours)",
            method="block",
            n_blocks=2,
            rank=str(opt.ranks.tolist()),
            n_params=opt.n_params,
            error=opt.error,
            paper_error=None,
            reconstruction=opt.reconstruction,
        )
    )
    ranking = list(compare_at_budget(X, budget))
    best = dict(ranking[0])
    kw = {"budget": budget} if best["allocation"] == "optimal" else {"rank": int(best["rank"])}
    res = approximate(X, method=best["method"], n_blocks=best["n_blocks"], svd_solver="full", **kw)
    rank_txt = str(res.ranks.tolist()) if "budget" in kw else str(best["rank"])
    rows.append(
        dict(
            label=f"Best found: {best['method']} K={_fmt_nb(best['n_blocks'])}, "
            + ("optimal ranks" if "budget" in kw else f"r={best['rank']}")
            + " (ours)",
            method=best["method"],
            n_blocks=best["n_blocks"],
            rank=rank_txt,
            n_params=res.n_params,
            error=res.error,
            paper_error=None,
            reconstruction=res.reconstruction,
        )
    )
    return rows


def write_table1(rows, out_dir, *, numerical_rank=None):
    out_dir = Path(out_dir)
    fields = ["label", "method", "n_blocks", "rank", "n_params", "error", "paper_error"]
    csv_path = out_dir / "table1.csv"
    atomic_write_csv(
        csv_path,
        ({k: (f"{r[k]:.6f}" if k == "error" else ("" if r[k] is None else r[k])) for k in fields} for r in rows),
        fields,
    )
    md = [
        f'Table I: MNIST test image {IMAGE_INDEX} (the first "2"'
        + (f", rank {numerical_rank}" if numerical_rank is not None else "")
        + f"), budget {BUDGET} parameters, normalised Frobenius error.",
        "",
        "| method | parameters | error | paper |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        paper = "" if r["paper_error"] is None else f"{r['paper_error']:.4f}"
        md.append(f"| {r['label']} | {r['n_params']} | {r['error']:.4f} | {paper} |")
    md_path = out_dir / "table1.md"
    atomic_write_text(md_path, "\n".join(md) + "\n")
    return [csv_path, md_path], "\n".join(md)


def plot_figure1(image, rows, path):
    """Original and each reconstruction (top) with its absolute error map (bottom)."""
    plt = pyplot_agg()
    X = np.asarray(image, dtype=np.float64)
    n = len(rows) + 1
    fig, axes = plt.subplots(2, n, figsize=(2.3 * n, 5.0), constrained_layout=True)
    vmax = float(np.abs(X).max()) or 1.0
    emax = max(float(np.abs(X - r["reconstruction"]).max()) for r in rows) or 1.0
    axes[0, 0].imshow(X, cmap="gray", vmin=0, vmax=vmax)
    axes[0, 0].set_title(f"original\n{X.shape[0]}x{X.shape[1]} = {X.size} values", fontsize=9)
    axes[1, 0].axis("off")
    axes[1, 0].text(0.5, 0.5, "|error| maps\n(shared scale)", ha="center", va="center", fontsize=9)
    for k, r in enumerate(rows, start=1):
        axes[0, k].imshow(r["reconstruction"], cmap="gray", vmin=0, vmax=vmax)
        axes[0, k].set_title(f"{r['label']}\n{r['n_params']} params, err {r['error']:.4f}", fontsize=8)
        im = axes[1, k].imshow(np.abs(X - r["reconstruction"]), cmap="magma", vmin=0, vmax=emax)
        K = r["n_blocks"]
        if r["method"] != "global" and K > 1:  # the block grid, on both panels
            for cut in np.cumsum([len(a) for a in np.array_split(np.arange(X.shape[0]), K)])[:-1] - 0.5:
                for ax in (axes[0, k], axes[1, k]):
                    ax.axhline(cut, color="#4fc3f7", lw=0.6, alpha=0.7)
                    ax.axvline(cut, color="#4fc3f7", lw=0.6, alpha=0.7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[1, 1:].tolist(), shrink=0.8, label="|X - X_hat|")
    fig.suptitle(f"Figure 1: one MNIST digit, {BUDGET}-parameter budget", fontsize=11)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def run_table1(out_dir, *, progress=True, data=None):
    """Load MNIST, compute Table I, write table1.csv/.md and figure1.png; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if data is None:
        images, labels = load_mnist_split("test")
    else:
        images, labels = data
    image = images[IMAGE_INDEX].astype(np.float64)
    rank = int(np.linalg.matrix_rank(image))
    rows = compute_table1(image)
    paths, md = write_table1(rows, out_dir, numerical_rank=rank)
    paths.append(plot_figure1(image, rows, out_dir / "figure1.png"))
    if progress:
        print(f"\nMNIST test image {IMAGE_INDEX}: label {int(labels[IMAGE_INDEX])}, rank {rank}")
        print(md)
        for r in rows:
            if r["paper_error"] is not None:
                ok = "matches" if round(r["error"], 4) == r["paper_error"] else "DIFFERS from"
                print(f"  {r['label']}: {r['error']:.4f} {ok} the paper's {r['paper_error']:.4f}")
    return paths

"""The default ``gram_damping``, chosen by the output error on held-out inputs.

A fit in a data metric uses ``G_δ = G + δ · mean(diag G) · I`` (and the same
rule on ``H``): ``δ = 0`` minimises the error on the calibration inputs
exactly, ``δ > 0`` pulls directions the calibration saw rarely (or never:
the MNIST border pixels are always 0) towards the plain fit. Which ``δ``
generalises best is measured here, on inputs the Grams never saw:

- **MLP** (Figure 2's protocol, the full fine-tune's ``ΔW1``, 64 x 784, per
  seed): ``G`` from the pixels of the seed's training split, the error
  ``‖(ΔW − M) X_valᵀ‖ / ‖ΔW X_valᵀ‖`` on its validation split
  (:func:`~blocklowrank.experiments.compress.mnist_models`; run after
  ``figure2`` and ``compress`` so the fine-tunes are cached).
- **MiniLM** (the pydoc-topics fine-tune, its 36 encoder linears): ``G``
  from 80 % of the training sentences (``cal``), the error on the other
  20 % (``val``), both collected by
  :mod:`~blocklowrank.experiments.minilm_metric` (``calibration/``).

For each structure (global, diagonal, K x K) at two LoRA-equivalent budgets
and each ``δ`` in :data:`DAMPINGS`, the mean over layers (and seeds) of the
held-out output error, beside the plain fit's. Writes ``damping.csv`` and
``damping_summary.txt``; ``python -m blocklowrank.experiments.damping --out
results`` (the folder of ``reproduce``'s results).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from threadpoolctl import threadpool_limits

from .. import GramFactor
from .._io import atomic_write_csv, atomic_write_text
from ..structures import approximate
from ._scores import relative_output_error

__all__ = ["DAMPINGS", "CASES", "heldout_rows", "choose", "run_damping", "main"]

#: The dampings compared (relative to the mean diagonal of G).
DAMPINGS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
#: Per case: (structure label, method, n_blocks, block rank per LoRA-equivalent rank r).
CASES = {
    "mlp": [("global", "global", 1), ("diagonal N=2", "diagonal", 2), ("block K=2", "block", 2)],
    "minilm": [("global", "global", 1), ("diagonal N=4", "diagonal", 4), ("block K=2", "block", 2)],
}
#: LoRA-equivalent ranks (two budgets) per case.
RANKS = {"mlp": (4, 16), "minilm": (8, 32)}


def _block_rank(method, k, r):
    return r // k if method == "block" else r


def _one(delta, method, k, r, gram, cal, val):
    """(calibration error, held-out error) of one layer's fit in ``gram`` (None: the plain fit)."""
    kw = {} if gram is None else {"input_gram": gram}
    fit = approximate(delta, method=method, n_blocks=k, rank=_block_rank(method, k, r), **kw)
    M = fit.reconstruction
    return relative_output_error(delta, M, cal), relative_output_error(delta, M, val)


def heldout_rows(case, layers, cal, val, structures, ranks, dampings=DAMPINGS, *, n_jobs=-1):
    """Mean calibration and held-out output errors per structure, rank and damping (plain fit: ``damping=None``).

    Parameters
    ----------
    case : str
        A name for the rows (``"mlp"``, ``"minilm"``).
    layers : list of (ΔW, site)
        The matrices and the key of their input site in ``cal`` and ``val``.
    cal, val : dict
        Site -> the second moment of the calibration and of the held-out inputs.
    structures : list of (label, method, n_blocks)
    ranks : sequence of int
        LoRA-equivalent ranks.

    Returns
    -------
    list of dict
        ``case, structure, rank, damping`` (None for the plain fit),
        ``calibration_error``, ``heldout_error`` (means over layers),
        ``heldout_std`` (spread over layers), ``n_layers``.
    """
    measure = {
        key: {site: np.asarray(g, np.float32) for site, g in grams.items()}
        for key, grams in (("cal", cal), ("val", val))
    }
    rows = []
    for damping in (None, *dampings):  # one damping's factors at a time (one per site)
        fitted = None if damping is None else {site: GramFactor(g, damping=damping) for site, g in cal.items()}
        jobs = [(s, r) for s in structures for r in ranks]
        with threadpool_limits(limits=1, user_api="blas"):
            errs = Parallel(n_jobs=n_jobs, prefer="threads")(
                delayed(_one)(
                    d,
                    method,
                    k,
                    r,
                    None if fitted is None else fitted[site],
                    measure["cal"][site],
                    measure["val"][site],
                )
                for (_, method, k), r in jobs
                for d, site in layers
            )
        errs = np.asarray(errs).reshape(len(jobs), len(layers), 2)
        for ((label, _, _), r), e in zip(jobs, errs):
            rows.append(
                {
                    "case": case,
                    "structure": label,
                    "rank": r,
                    "damping": damping,
                    "calibration_error": float(e[:, 0].mean()),
                    "heldout_error": float(e[:, 1].mean()),
                    "heldout_std": float(e[:, 1].std()),
                    "n_layers": len(layers),
                }
            )
    return rows


def choose(rows):
    """Per (case, structure, rank): the damping with the least held-out error, and the overall choice.

    The overall choice minimises the *sum over all cells* of each cell's
    held-out error relative to its best damping (so every cell counts alike).

    Returns ``(best, overall)``: ``{(case, structure, rank): damping}`` and a damping.
    """
    cells = {}
    for r in rows:
        if r["damping"] is not None:
            cells.setdefault((r["case"], r["structure"], r["rank"]), {})[r["damping"]] = r["heldout_error"]
    best = {key: min(v, key=v.get) for key, v in cells.items()}
    dampings = sorted({d for v in cells.values() for d in v})
    regret = {d: sum(v[d] / min(v.values()) for v in cells.values()) for d in dampings}
    return best, min(regret, key=regret.get)


def _mlp_layers(out, seeds, progress, ft_lr=None):
    """``(layers, cal, val)`` of the MLP: one ΔW1 and one pixel Gram pair per seed."""
    from .compress import mnist_models, pixel_gram

    models = mnist_models(out, seeds=seeds, ft_lr=ft_lr, progress=progress)
    layers, cal, val = [], {}, {}
    for s in models["seeds"]:
        pre, ft = models["pretrained"][s], models["tuned"][s]
        layers.append(((ft.W1.astype(np.float64) - pre.W1).astype(np.float32), s))
        cal[s], val[s] = pixel_gram(models["d"], s), pixel_gram(models["d"], s, "val")
    return layers, cal, val


def _minilm_layers(out):
    """``(layers, cal, val)`` of MiniLM's 36 encoder linears, ``G`` per input site."""
    from ..calibration import load_statistics
    from ..checkpoints import open_checkpoint, select_names
    from .realweights import MINILM_TARGETS, minilm_checkpoint

    folder = Path(out) / "minilm_metric" / "calibration"
    if not (folder / "cal.safetensors").is_file():
        raise FileNotFoundError(f"{folder}: no MiniLM calibration; run `blocklowrank reproduce minilm` first")
    tuned = Path(out) / "realweights" / "minilm" / "model.safetensors"
    layers = []
    with (
        open_checkpoint(minilm_checkpoint()) as base,
        open_checkpoint(tuned) as ft,
        load_statistics(folder / "cal.safetensors") as cal_stats,
        load_statistics(folder / "val.safetensors") as val_stats,
    ):
        for name in select_names(base.names(), MINILM_TARGETS):
            layer = name.removesuffix(".weight")
            dW = (np.array(ft.get(name), dtype=np.float64) - np.array(base.get(name))).astype(np.float32)
            layers.append((dW, cal_stats.site_of(layer)))
        cal = {site: cal_stats.site_gram(site) for site in cal_stats.sites}
        val = {site: val_stats.site_gram(site) for site in val_stats.sites}
    return layers, cal, val


def _summary(rows, best, overall, seconds):
    lines = [
        "Held-out output error ||(dW - M) X_val^T|| / ||dW X_val^T|| by gram_damping (mean over layers; "
        "G from calibration inputs only)",
        "",
        f"{'case':<8}{'structure':<14}{'r':>4}  {'plain':>7}"
        + "".join(f"{('d=' + format(d, 'g')):>9}" for d in DAMPINGS)
        + "   best",
    ]
    cells = {}
    for r in rows:
        cells.setdefault((r["case"], r["structure"], r["rank"]), {})[r["damping"]] = r["heldout_error"]
    for key, v in cells.items():
        case, structure, rank = key
        vals = "".join(f"{v[d]:>9.4f}" for d in DAMPINGS)
        lines.append(f"{case:<8}{structure:<14}{rank:>4}  {v[None]:>7.4f}{vals}   {best[key]:g}")
    lines += ["", f"Overall (least summed error relative to each cell's best): gram_damping = {overall:g}"]
    lines.append(f"{seconds:.0f} s")
    return "\n".join(lines) + "\n"


def run_damping(out, *, seeds=3, cases=("mlp", "minilm"), dampings=DAMPINGS, ft_lr=None, progress=True):
    """Measure the held-out output error per damping on the MLP and MiniLM (see the module notes).

    Parameters
    ----------
    out : path-like
        The results folder of ``blocklowrank reproduce`` (``sweep.csv``,
        ``pretrained/``, ``finetuned/``, ``realweights/minilm``,
        ``minilm_metric/calibration``); gets ``damping.csv`` and
        ``damping_summary.txt``.
    ft_lr : float, optional
        The MLP's full fine-tuning learning rate (default: Figure 2's
        selection from ``sweep.csv``, as ``compress``).

    Returns
    -------
    dict
        ``rows``, ``best`` (per cell), ``overall``, ``summary``.
    """
    t0 = time.perf_counter()
    rows = []
    for case in cases:
        if progress:
            print(f"[damping] {case} ...", file=sys.stderr, flush=True)
        layers, cal, val = _mlp_layers(out, seeds, progress, ft_lr) if case == "mlp" else _minilm_layers(out)
        rows += heldout_rows(case, layers, cal, val, CASES[case], RANKS[case], dampings)
    best, overall = choose(rows)
    text = _summary(rows, best, overall, time.perf_counter() - t0)
    fields = ["case", "structure", "rank", "damping", "calibration_error", "heldout_error", "heldout_std", "n_layers"]
    atomic_write_csv(Path(out) / "damping.csv", rows, fields)
    atomic_write_text(Path(out) / "damping_summary.txt", text)
    if progress:
        print(text, file=sys.stderr, flush=True)
    return {"rows": rows, "best": best, "overall": overall, "summary": text}


def main(argv=None):
    """``python -m blocklowrank.experiments.damping --out RESULTS [--cases mlp minilm] [--seeds 3]``."""
    parser = argparse.ArgumentParser(
        prog="python -m blocklowrank.experiments.damping", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, help="the results folder of blocklowrank reproduce")
    parser.add_argument("--cases", nargs="+", choices=tuple(CASES), default=list(CASES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ft-lr", type=float, help="the MLP's full fine-tuning lr (default: Figure 2's choice)")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    res = run_damping(args.out, seeds=args.seeds, cases=args.cases, ft_lr=args.ft_lr, progress=not args.quiet)
    print(res["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

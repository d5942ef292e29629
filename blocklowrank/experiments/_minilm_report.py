"""Tables, diagnostics and the figure of the MiniLM verdicts (NumPy and matplotlib only).

Private to :mod:`blocklowrank.experiments.minilm_metric`: from the run
records (``runs.jsonl``) and the calibration statistics it writes
``minilm_metric.csv`` (one row per evaluated model, with the Wilson interval
of its accuracy and the paired comparison with the plain fit of the same
structure and budget), ``minilm_layers.csv`` (output errors per adapter and
layer type), ``minilm_metric.json`` (the diagnostics), the summary text and
``minilm_metric.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .._extras import require
from .._io import atomic_write_csv, atomic_write_text, save_figure
from ..structures import approximate
from ._scores import compare_paired, wilson_interval

__all__ = ["write_report", "versus_lora", "layer_type", "outlier_shares", "outlier_fits", "LAYER_TYPES"]

#: The six linears of a BERT encoder layer (``attention.output.dense`` before ``output.dense``: suffix matching).
LAYER_TYPES = tuple(
    "attention.self.query attention.self.key attention.self.value attention.output.dense intermediate.dense "
    "output.dense".split()
)
#: Input site kinds (named by the first layer reading them) -> what their input is.
_SITE_KINDS = {
    "attention.self.query": "q/k/v: the layer's input",
    "attention.output.dense": "attention.output: context",
    "intermediate.dense": "intermediate: attention block's output",
    "output.dense": "output: GELU activations",
}
_FIELDS = [
    "id",
    "kind",
    "structure",
    "rank",
    "metric",
    "calibration",
    "n_params",
    "n_params_written",
    "peft_type",
    "accuracy",
    "acc_low",
    "acc_high",
    "kept",
    "vs_plain",
    "vs_plain_low",
    "vs_plain_high",
    "p_mcnemar",
    "test_loss",
    "agreement",
    "kl",
    "error_mean",
    "out_train_mean",
    "out_test_mean",
    "fit_seconds",
    "seconds",
]


def layer_type(layer):
    """``encoder.layer.3.attention.self.query`` -> ``attention.self.query``."""
    return next(t for t in LAYER_TYPES if layer.endswith(t))  # attention.output.dense is tried before output.dense


def _plain_twin(rec, runs):
    if rec.get("kind") != "adapter" or (rec["metric"] == "plain" and rec["calibration"] == "train"):
        return None
    return runs.get(f"{rec['structure']}-r{rec['rank']}-plain")


def table_rows(runs, y):
    """One row per run: accuracy with its Wilson interval, the paired comparison with the plain twin."""
    y = np.asarray(y)
    tuned = runs["finetuned"]["accuracy"]
    rows = []
    for rec in runs.values():
        correct = np.asarray(rec["pred"]) == y
        low, high = wilson_interval(int(correct.sum()), len(y))
        row = {k: rec.get(k) for k in _FIELDS}
        row.update(acc_low=low, acc_high=high, kept=rec["accuracy"] / tuned)
        twin = _plain_twin(rec, runs)
        if twin is not None:
            cmp = compare_paired(np.asarray(twin["pred"]) == y, correct)
            row.update(vs_plain=cmp["diff"], vs_plain_low=cmp["diff_low"], vs_plain_high=cmp["diff_high"])
            row["p_mcnemar"] = cmp["p_mcnemar"]
        if rec.get("layers"):
            for key in ("error", "out_train", "out_test"):
                row[f"{key}_mean"] = float(np.mean([v[key] for v in rec["layers"].values()]))
        rows.append(row)
    return rows


def layer_rows(runs):
    """Per adapter and layer type: mean Frobenius error and output errors (calibration, held-out)."""
    rows = []
    for rid, rec in runs.items():
        for t in LAYER_TYPES:
            vals = [v for layer, v in (rec.get("layers") or {}).items() if layer_type(layer) == t]
            if vals:
                row = {"id": rid, **{k: rec[k] for k in ("structure", "rank", "metric", "calibration")}}
                row["layer_type"] = t
                for key in ("error", "out_train", "out_test"):
                    row[key] = float(np.mean([v[key] for v in vals]))
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------- why
def outlier_shares(stats, top=(1, 3, 10)):
    """Per input-site kind: the share of ``tr(G)`` on its ``k`` largest diagonal entries (mean over layers)."""
    kinds = {}
    for site in stats.sites:
        d = np.sort(np.diag(stats.site_gram(site)))[::-1]
        kind = _SITE_KINDS[layer_type(site)]
        kinds.setdefault(kind, []).append([d[:k].sum() / d.sum() for k in top] + [d[0] / np.median(d)])
    return {
        k: dict(zip([f"top{t}" for t in top] + ["max_over_median"], np.mean(v, 0).tolist())) for k, v in kinds.items()
    }


def outlier_fits(deltas, stats, grams, ranks=(8, 16), k=3):
    """Does whitening spend rank on outlier inputs? Global fits, plain vs in the input metric.

    Per rank and fit: the share of ``‖M‖²`` on the ``k`` input dimensions
    with the largest ``G_ii`` (``ΔW``'s own share beside it), and the
    held-out output error split into the bulk and those dimensions
    (``‖(ΔW − M)_S X_Sᵀ‖ / ‖ΔW_S X_Sᵀ‖`` over the columns ``S`` of each part,
    ``X`` the test sentences' inputs). ``grams``: the training statistics'
    :class:`~blocklowrank.experiments.minilm_metric.Grams` (the fits' own).
    """
    train, test = stats["train"], stats["test"]
    out = {}
    for r in ranks:
        acc = {}
        for layer, dW in deltas.items():
            idx = np.argsort(np.diag(train.input_gram(layer)))[::-1][:k]
            parts = {"bulk": np.setdiff1d(np.arange(dW.shape[1]), idx), "outliers": idx}
            Gt = test.input_gram(layer)
            acc.setdefault("delta_share", []).append(_share(dW, idx))
            for key, kw in (("plain", {}), ("input", {"input_gram": grams.input(layer)})):
                M = approximate(dW, method="global", rank=r, **kw).reconstruction
                acc.setdefault(f"{key}_share", []).append(_share(M, idx))
                for part, cols in parts.items():
                    G = Gt[np.ix_(cols, cols)]
                    E, W = (dW[:, cols] - M[:, cols]).astype(np.float64), dW[:, cols].astype(np.float64)
                    ratio = np.sum((E @ G) * E) / np.sum((W @ G) * W)
                    acc.setdefault(f"{key}_{part}", []).append(float(np.sqrt(max(ratio, 0.0))))
        out[r] = {key: float(np.mean(v)) for key, v in acc.items()}
    return out


def _share(M, cols):
    M = np.asarray(M, dtype=np.float64)
    return float(np.sum(M[:, cols] ** 2) / np.sum(M**2))


def _paired_summary(runs, y, tag):
    """Rows of (spec, accuracy on train calibration, accuracy with ``tag`` calibration, paired test)."""
    y = np.asarray(y)
    lines = []
    for rid, rec in runs.items():
        if rec.get("calibration") != tag:
            continue
        base = runs.get(rid.removesuffix(f"-{tag}"))
        if base is None:
            continue
        cmp = compare_paired(np.asarray(base["pred"]) == y, np.asarray(rec["pred"]) == y)
        lines.append(
            {
                "id": rid,
                "train": base["accuracy"],
                tag: rec["accuracy"],
                "diff": cmp["diff"],
                "diff_low": cmp["diff_low"],
                "diff_high": cmp["diff_high"],
                "p_mcnemar": cmp["p_mcnemar"],
                "kl_train": base["kl"],
                f"kl_{tag}": rec["kl"],
                "out_test_train": _mean_out(base),
                f"out_test_{tag}": _mean_out(rec),
            }
        )
    return lines


def _mean_out(rec, key="out_test"):
    return float(np.mean([v[key] for v in rec["layers"].values()])) if rec.get("layers") else None


def _generalisation(runs):
    """Per metric: mean output error on the calibration tokens and on the held-out ones."""
    out = {}
    for rec in runs.values():
        if rec.get("kind") == "adapter" and rec["calibration"] == "train":
            d = out.setdefault(rec["metric"], {"out_train": [], "out_test": []})
            d["out_train"].append(_mean_out(rec, "out_train"))
            d["out_test"].append(_mean_out(rec))
    return {m: {k: float(np.mean(v)) for k, v in d.items()} for m, d in out.items()}


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def versus_lora(runs, y, metrics=("plain", "both")):
    """Each block structure in each of ``metrics`` against LoRA's plain fit at the same rank (paired tests)."""
    y = np.asarray(y)
    out = []
    for rid, rec in runs.items():
        if rec.get("kind") != "adapter" or rec["calibration"] != "train" or rec["structure"] == "global":
            continue
        lora = runs.get(f"global-r{rec['rank']}-plain")
        if rec["metric"] in metrics and lora is not None:
            cmp = compare_paired(np.asarray(lora["pred"]) == y, np.asarray(rec["pred"]) == y)
            out.append({"id": rid, "lora": lora["accuracy"], "accuracy": rec["accuracy"], **cmp})
    return sorted(out, key=lambda v: (int(v["id"].split("-r")[1].split("-")[0]), v["id"]))


def diagnostics(runs, stats, grams, deltas, y):
    """The 'why' numbers (see :mod:`~blocklowrank.experiments.minilm_metric`)."""
    adapters = [r for r in runs.values() if r.get("kind") == "adapter" and r.get("layers")]
    out = {
        "outlier_shares": outlier_shares(stats["train"]),
        "outlier_fits": outlier_fits(deltas, stats, grams),
        "sequential": _paired_summary(runs, y, "sequential"),
        "test_calibration": _paired_summary(runs, y, "test"),
        "generalisation": _generalisation(runs),
        "versus_lora": versus_lora(runs, y),
    }
    if len(adapters) > 2:
        err = [_mean_out(r) for r in adapters]
        out["spearman_out_test_vs_kl"] = _spearman(err, [r["kl"] for r in adapters])
        out["spearman_out_test_vs_accuracy"] = _spearman(err, [r["accuracy"] for r in adapters])
    return out


# ---------------------------------------------------------------------------- text and figure
def _cell(row):
    text = f"{100 * row['accuracy']:5.1f} [{100 * row['acc_low']:4.1f},{100 * row['acc_high']:5.1f}]"
    if row.get("vs_plain") is not None:
        text += f" {100 * row['vs_plain']:+5.1f} p={row['p_mcnemar']:.2f}"
    return text


def summary_text(rows, diag, seconds, n_layers, n_test, metrics, labels):
    """The summary: reference rows, the grid (structure x rank by metric), the diagnostics."""
    by_id = {r["id"]: r for r in rows}
    lines = [
        f"MiniLM pydoc-topics fine-tune: adapters extracted from ΔW of the {n_layers} encoder linears, loaded through",
        f"PEFT, scored on the {n_test} test sentences with the fine-tuned head. Accuracy % [95% Wilson interval];",
        "for metric fits: difference to the plain fit of the same structure and budget (points) and the exact",
        "McNemar p-value (paired).",
        "",
    ]
    for rid, what in (
        ("finetuned", "full fine-tune"),
        ("exact", "base + exact ΔW (36 linears)"),
        ("base", "base + head"),
    ):
        if rid in by_id:
            lines.append(f"  {what:<32}{_cell(by_id[rid])}")
    lines += ["", f"{'structure':<15}{'r':>3}  " + "".join(f"{m:<33}" for m in metrics)]
    keys = {(r["structure"], r["rank"]) for r in rows if r["kind"] == "adapter"}
    for s in labels:
        for rank in sorted(r for st, r in keys if st == s):
            cells = [by_id.get(f"{s}-r{rank}-{m}") for m in metrics]
            lines.append(f"{labels[s]:<15}{rank:>3}  " + "".join(f"{_cell(c) if c else '-':<33}" for c in cells))
    lines += ["", "Why:"] + _why_lines(diag) + [f"\n{seconds:.0f} s"]
    return "\n".join(lines) + "\n"


def _why_lines(diag):
    lines = ["  share of tr(G) on the top 1 / 3 / 10 input dimensions (training sentences; mean over layers):"]
    for kind, v in diag["outlier_shares"].items():
        lines.append(
            f"    {kind:<42}{v['top1']:.3f} / {v['top3']:.3f} / {v['top10']:.3f}  (max/median diag {v['max_over_median']:.0f})"
        )
    lines.append(
        "  global fits: share of ||M||^2 on the top-3 inputs (ΔW's own), held-out output error bulk / outliers:"
    )
    for r, v in diag["outlier_fits"].items():
        lines.append(
            f"    r={r}: ΔW {v['delta_share']:.3f}; plain {v['plain_share']:.3f} ({v['plain_bulk']:.3f} / "
            f"{v['plain_outliers']:.3f}); input metric {v['input_share']:.3f} ({v['input_bulk']:.3f} / {v['input_outliers']:.3f})"
        )
    lines.append("  output error on calibration vs held-out tokens, mean over adapters:")
    for m, v in diag["generalisation"].items():
        lines.append(f"    {m:<7}{v['out_train']:.3f} -> {v['out_test']:.3f}")
    for tag, what in (
        ("sequential", "layer by layer on the compressed model"),
        ("test", "on the test sentences (oracle)"),
    ):
        key = "sequential" if tag == "sequential" else "test_calibration"
        if diag[key]:
            lines.append(f"  calibrated {what} vs on the fine-tuned model's training sentences:")
        for v in diag[key]:
            lines.append(
                f"    {v['id']:<28}{100 * v['train']:5.1f} -> {100 * v[tag]:5.1f}  ({100 * v['diff']:+.1f} "
                f"[{100 * v['diff_low']:+.1f},{100 * v['diff_high']:+.1f}], p={v['p_mcnemar']:.2f}); "
                f"held-out output error {v['out_test_train']:.3f} -> {v[f'out_test_{tag}']:.3f}"
            )
    if diag.get("versus_lora"):
        lines.append(
            "  block structures against LoRA's plain fit at the same rank (points, paired bootstrap, McNemar):"
        )
    for v in diag.get("versus_lora", []):
        lines.append(
            f"    {v['id']:<28}{100 * v['accuracy']:5.1f} vs {100 * v['lora']:5.1f}  ({100 * v['diff']:+.1f} "
            f"[{100 * v['diff_low']:+.1f},{100 * v['diff_high']:+.1f}], p={v['p_mcnemar']:.3f})"
        )
    if "spearman_out_test_vs_kl" in diag:
        lines.append(
            f"  across adapters, Spearman rank correlation of the mean held-out output error with KL "
            f"{diag['spearman_out_test_vs_kl']:+.2f}, with accuracy {diag['spearman_out_test_vs_accuracy']:+.2f}"
        )
    return lines


def plot(rows, metrics, labels, path=None):
    """Accuracy (top) and mean held-out output error (bottom) against rank, one panel per structure."""
    plt = require("matplotlib.pyplot")
    fig, axes = plt.subplots(2, len(labels), figsize=(4 * len(labels), 7), dpi=100, sharex=True, sharey="row")
    refs = {r["id"]: r for r in rows if r["kind"] == "reference"}
    colours = dict(zip(metrics, ("k", "tab:blue", "tab:orange", "tab:green")))
    for col, s in enumerate(labels):
        for tag, ls in (("train", "-"), ("sequential", ":")):
            for m in metrics:
                pts = sorted(
                    (r for r in rows if (r.get("structure"), r.get("metric"), r.get("calibration")) == (s, m, tag)),
                    key=lambda r: r["rank"],
                )
                if not pts:
                    continue
                x = [r["rank"] for r in pts]
                acc = np.array([[r["accuracy"], r["acc_low"], r["acc_high"]] for r in pts]) * 100
                label = m if tag == "train" else f"{m}, sequential"
                axes[0, col].errorbar(
                    x,
                    acc[:, 0],
                    yerr=[acc[:, 0] - acc[:, 1], acc[:, 2] - acc[:, 0]],
                    color=colours[m],
                    ls=ls,
                    marker="o",
                    ms=3,
                    capsize=2,
                    label=label,
                )
                axes[1, col].plot(x, [r["out_test_mean"] for r in pts], color=colours[m], ls=ls, marker="o", ms=3)
        for rid, ls in (("finetuned", "--"), ("exact", ":")):
            if rid in refs:
                axes[0, col].axhline(100 * refs[rid]["accuracy"], color="grey", ls=ls, lw=1, label=rid)
        axes[0, col].set_title(labels[s], fontsize=10)
        axes[1, col].set_xscale("log", base=2)
        axes[1, col].set_xlabel("LoRA-equivalent rank r (r(m+n) parameters per layer)")
    axes[0, 0].set_ylabel("test accuracy % (95% Wilson)")
    axes[1, 0].set_ylabel("held-out output error (mean of 36 layers)")
    axes[0, -1].legend(fontsize=7, loc="lower right")
    fig.suptitle("MiniLM pydoc-topics: adapters extracted from the fine-tune, loaded through PEFT", fontsize=11)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def write_report(out, runs, stats, grams, deltas, y, seconds, *, metrics, labels):
    """Write the tables, the diagnostics, the summary and the figure; return them."""
    out = Path(out)
    rows = table_rows(runs, y)
    diag = diagnostics(runs, stats, grams, deltas, y)
    text = summary_text(rows, diag, seconds, len(deltas), len(y), metrics, labels)
    atomic_write_csv(out / "minilm_metric.csv", rows, _FIELDS, extrasaction="ignore")
    lfields = ["id", "structure", "rank", "metric", "calibration", "layer_type", "error", "out_train", "out_test"]
    atomic_write_csv(out / "minilm_layers.csv", layer_rows(runs), lfields)
    atomic_write_text(out / "minilm_metric.json", json.dumps(diag, indent=1) + "\n")
    atomic_write_text(out / "minilm_metric_summary.txt", text)
    plot(rows, metrics, labels, out / "minilm_metric.png")
    return {"rows": rows, "diagnostics": diag, "summary": text, "seconds": seconds, "runs": runs}

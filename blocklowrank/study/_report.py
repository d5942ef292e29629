"""Files of a checkpoint study: tables, the markdown summary and the figures.

:func:`write_study` writes, from what :func:`~blocklowrank.study.run_study`
returns: ``layers.csv`` (one row per layer and configuration),
``model_wide.csv`` and ``model_wide_layers.csv`` (the model-wide allocation
against the uniform one, in total and per layer), ``summary.md``, and the
figures ``error_heatmap.png`` (best error of each structure on each layer) and
``error_vs_budget.png`` (mean error against the LoRA-equivalent budget rank,
one panel per module type). matplotlib runs on the Agg backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._extras import pyplot_agg
from .._io import atomic_write_csv, atomic_write_text, save_figure

__all__ = ["write_study", "plot_error_heatmap", "plot_error_vs_budget", "summary_markdown"]


def _write_csv(path, records):
    return atomic_write_csv(path, records, records.columns, extrasaction="ignore")


def _best_errors(records, key="error"):
    """``{(layer, structure): error}`` (or ``key``) of the best configuration of each structure on each layer."""
    return {(r["layer"], r["structure"]): r[key] for r in records if r["best"]}


def _measured(records):
    """``(key, label)`` of what the figures show: the output error in a data metric, else the error."""
    if records.settings.get("calibration"):
        return "output_error", "relative output error"
    return "error", "relative error"


def _module_types(layers):
    return list(dict.fromkeys(lay["module_type"] for lay in layers))


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def summary_markdown(records):
    """The study's ``summary.md`` text: settings, errors by structure and module type,
    model-wide against uniform, skipped layers and the full pairing report."""
    out = _settings_section(records) + _error_section(records) + _model_wide_section(records)
    out += _skipped_section(records.layers)
    out += ["", "## Pairing of the checkpoints", "", "```", records.pairing.summary(max_names=10**9), "```", ""]
    return "\n".join(out)


def _settings_section(records):
    st = records.settings
    what = "ΔW = W_finetuned - W_base" if st["finetuned"] else "W (compression of one checkpoint)"
    return [
        "# Checkpoint study",
        "",
        f"- base: `{st['base']}`",
        f"- fine-tuned: `{st['finetuned']}`" if st["finetuned"] else "- fine-tuned: none (one checkpoint)",
        f"- studied: {what}",
        f"- layers: {len(records.layers)} selected by target_modules={st['target_modules']!r}",
        f"- budget: {st['budget'][0]} = {st['budget'][1]}; grid sizes K in {st['n_blocks']}",
        f"- structures: {', '.join(st['structures'])}",
        f"- calibration: `{st['calibration']}` (gram_damping {st['gram_damping']:g}): every configuration fitted in "
        "each layer's data metric; `output_error` is the relative error of the layer's outputs on the "
        "calibration inputs, `error` the relative Frobenius error of ΔW"
        if st.get("calibration")
        else "- calibration: none (plain fits of ΔW; `output_error` blank)",
        "",
    ]


def _error_section(records):
    """Mean best error by structure and module type, and the mean effective rank by module type."""
    calibrated = bool(records.settings.get("calibration"))
    out = []
    for key, what in (("error", "relative error"), ("output_error", "relative output error"))[: 1 + calibrated]:
        out += _mean_table(records, key, what, calibrated)
    types = _module_types(records.layers)
    layers = records.layers
    erank = [
        f"{mt}: {np.mean([lay['effective_rank'] for lay in layers if lay['module_type'] == mt]):.1f}" for mt in types
    ]
    return out + [
        "",
        "Mean effective rank (entropy effective rank, Roy & Vetterli) by module type: " + ", ".join(erank) + ".",
        "",
    ]


def _mean_table(records, key, what, calibrated):
    """Mean ``key`` of the best configuration of each structure, by module type."""
    layers, names = records.layers, records.settings["structures"]
    best = _best_errors(records, key)
    least = "output error" if calibrated else "error"
    out = [
        f"## Mean {what} by structure and module type",
        "",
        f"Best configuration of each structure on each layer (lowest {least} over its grid sizes, uniform "
        "and optimal ranks), averaged over the layers of each module type; `-`: never matched.",
        "",
    ]
    types = _module_types(layers)
    rows = []
    for name in names:
        cells = []
        for mt in types + [None]:
            errs = [
                best[(lay["layer"], name)]
                for lay in layers
                if (mt is None or lay["module_type"] == mt) and (lay["layer"], name) in best
            ]
            cells.append(f"{np.mean(errs):.4f}" if errs else "-")
        rows.append([name] + cells)
    return out + _table(["structure"] + types + ["all"], rows) + [""]


_MEASURES = {
    "frobenius": "`error` is the model-wide relative error sqrt(sum of discarded energy / sum of ||ΔW||²), which the "
    "allocation minimises; `exact`: provably optimal (equal block costs, or the exact dynamic programme); "
    "otherwise greedy, and the optimum lies between `lower bound` (from the fractional relaxation) and `error`.",
    "output": "In the layers' data metrics (calibration): the allocation minimises the sum of the layers' relative "
    "squared output errors f_l / f_l(0) (damped metric, from each layer's metric spectra), and `error` is their "
    "root mean square; `exact`: provably optimal and every layer's spectra give its fits' errors exactly "
    "(global and diagonal structures; a full grid's blocks are coupled by the metric, and its spectra are those "
    "of the first sweep of its fit); the optimum lies between `lower bound` and `error` on these spectra.",
}


def _model_wide_section(records):
    """The model-wide allocation against the uniform one, and where the best one puts the parameters."""
    measure = records.model_wide[0]["measure"] if len(records.model_wide) else "frobenius"
    out = [
        "## Model-wide allocation against uniform",
        "",
        "One total budget spread over every block of every layer by gain-per-parameter water-filling "
        "(`model-wide`), against every layer at the same per-layer budget (`uniform`, optimal ranks "
        "inside each layer). " + _MEASURES[measure],
        "",
    ]
    mw = [
        [
            r["structure"],
            r["n_blocks"],
            r["allocation"],
            r["total_budget"],
            r["n_params"],
            f"{r['error']:.4f}",
            f"{r['mean_layer_error']:.4f}",
            "-" if r["exact"] is None else r["exact"],
            "-" if r["error_lower_bound"] is None else f"{r['error_lower_bound']:.4f}",
        ]
        for r in records.model_wide
    ]
    header = ["structure", "K", "allocation", "total budget", "parameters", "error", "mean layer error", "exact"]
    out += _table(header + ["lower bound"], mw)
    wide = [r for r in records.model_wide if r["allocation"] == "model-wide"]
    if wide:
        top = min(wide, key=lambda r: r["error"])
        key = (top["structure"], top["n_blocks"], "model-wide")
        given = {}
        for r in records.model_wide_layers:
            if (r["structure"], r["n_blocks"], r["allocation"]) == key:
                given.setdefault(r["module_type"], []).append(r["rank_equivalent"])
        ranks = [f"{mt}: {np.mean(given[mt]):.1f}" for mt in _module_types(records.layers)]
        out += [
            "",
            f"Where the best model-wide allocation ({top['structure']}, K={top['n_blocks']}) puts the "
            "parameters, as mean LoRA-equivalent rank by module type: " + ", ".join(ranks) + ".",
        ]
    if any(r["fallback"] for r in records.model_wide):
        out += ["", "Rows with a greedy result worse than uniform were replaced by the uniform allocation."]
    return out + [f"- {note}" for note in records.notes]


def _skipped_section(layers):
    skipped = [
        f"- `{lay['layer']}` ({lay['shape'][0]}x{lay['shape'][1]}): {lay['skipped']}"
        for lay in layers
        if lay["skipped"]
    ]
    missing = [
        f"- `{lay['layer']}`: no configuration of {', '.join(lay['missing'])} at budget {lay['budget']}"
        for lay in layers
        if lay["missing"] and not lay["skipped"]
    ]
    return ["", "## Skipped layers and structures", ""] + (skipped + missing or ["No layer or structure was skipped."])


def _color_range(E):
    """The colour scale of the heat map: the data's own range (a flat one widened a little)."""
    finite = E[np.isfinite(E)]
    if not finite.size:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    pad = max(1e-3, 0.05 * (hi - lo)) if hi - lo < 1e-3 else 0.0
    return lo - pad, hi + pad


def plot_error_heatmap(records, path):
    """Best relative error of each structure (columns) on each layer (rows).

    The colour scale spans the errors found (not a fixed 0-1), so that
    differences between structures show; grey cells: no configuration at
    the budget.
    """
    plt = pyplot_agg()
    fig = _heatmap_figure(records, plt)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def _heatmap_figure(records, plt):
    layers = [lay["layer"] for lay in records.layers]
    names = records.settings["structures"]
    key, label = _measured(records)
    best = _best_errors(records, key)
    E = np.array([[best.get((lay, name), np.nan) for name in names] for lay in layers])
    width = max(2.2 + 1.1 * len(names), 3.0 + 0.07 * max(map(len, layers), default=0))
    fig, ax = plt.subplots(figsize=(width, 1.8 + 0.22 * len(layers)), constrained_layout=True)
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")  # grey: no configuration at this budget
    lo, hi = _color_range(E)
    im = ax.imshow(np.ma.masked_invalid(E), aspect="auto", cmap=cmap, vmin=lo, vmax=hi)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), layers, fontsize=max(4, 9 - len(layers) // 40))
    fig.colorbar(im, ax=ax, label=f"{label} (best configuration)")
    title = "best error per layer" + ("\n(grey: not matched)" if np.isnan(E).any() else "")
    ax.set_title(title, fontsize=10)
    return fig


def plot_error_vs_budget(records, path):
    """Mean error against the LoRA-equivalent budget rank, one panel per module type.

    Layout structures: a curve over several budget ranks (best grid size,
    optimal ranks, from the layers' spectra); other structures: one marker at
    the study's budget (their best configuration there).
    """
    plt = pyplot_agg()
    layers, names = records.layers, records.settings["structures"]
    types = _module_types(layers)
    key, label = _measured(records)
    best = _best_errors(records, key)
    ncols = min(4, len(types))
    nrows = -(-len(types) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.4 * nrows), squeeze=False, constrained_layout=True)
    for ax in axes.flat[len(types) :]:
        ax.set_visible(False)
    colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    for ax, mt in zip(axes.flat, types):
        group = [lay for lay in layers if lay["module_type"] == mt]
        for name in names:
            pts = {}
            for lay in group:
                for r, e in lay["curve"].get(name, ()):
                    pts.setdefault(r, []).append(e)
            full = sorted((r, np.mean(v)) for r, v in pts.items() if len(v) == len(group))
            if full:
                ax.plot(*zip(*full), "o-", ms=3, color=colors[name], label=name)
            at = [
                (best[(lay["layer"], name)], lay["budget"] / sum(lay["shape"]))
                for lay in group
                if (lay["layer"], name) in best
            ]
            if at and not full:
                ax.plot(
                    np.mean([a[1] for a in at]),
                    np.mean([a[0] for a in at]),
                    "D",
                    color=colors[name],
                    label=f"{name} (study budget)",
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (LoRA-equivalent rank)")
        ax.set_title(f"{mt} ({len(group)} layers)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel(f"mean {label}")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def write_study(records, out):
    """Write the study's tables, summary and figures to ``out``; return the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        _write_csv(out / "layers.csv", records),
        _write_csv(out / "model_wide.csv", records.model_wide),
        _write_csv(out / "model_wide_layers.csv", records.model_wide_layers),
    ]
    paths.append(atomic_write_text(out / "summary.md", summary_markdown(records)))
    paths.append(plot_error_heatmap(records, out / "error_heatmap.png"))
    paths.append(plot_error_vs_budget(records, out / "error_vs_budget.png"))
    return paths

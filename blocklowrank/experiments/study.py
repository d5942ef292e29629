"""Beyond one image: the three structures on all 10,000 MNIST test digits.

Table I is one image. Here every test digit is approximated:

1. at the paper's budget (224 parameters): LoRA r=4, MELoRA N=4 r_diag=4,
   Localized K=2 r_block=2 and the budget-optimal allocation on the 2 x 2
   partition -- mean, median and spread of each method's error, how often
   Localized beats LoRA and MELoRA, per digit class;
2. a budget sweep over every budget at which the methods can be matched
   (multiples of ``m + n = 56``: LoRA rank t, MELoRA r_diag = t with N >= 2
   blocks, Localized K * r_block = t with K >= 2, up to LoRA's full rank 28),
   taking for each method the best configuration (lowest mean error) at each
   budget, and the budget-optimal allocation on the even partitions.

Every number of the paper's three structures comes from singular values computed
once per partition on the whole image stack
(:func:`blocklowrank.block_spectra`); by Eckart-Young the error of any rank
choice follows from those spectra exactly, so that part takes seconds.

Beyond the paper, BLAST (shared bases, :func:`blocklowrank.structures.fit_shared_basis`) is fitted
by its iterative ALS, vectorised over the digits (about 1-3 ms per digit for 100
sweeps), so it runs on fixed subsets, which the outputs name:

3. at budget 224, the BLAST configuration (``K`` in ``BLAST_BLOCKS``, the largest
   shared rank that fits) with the lowest mean error on the first
   ``blast_curve_n`` digits, fitted on the first ``blast_n`` digits and compared
   with the other methods on those same digits;
4. a BLAST curve for the budget figure: at every budget that is a multiple of
   ``2 (m + n)``, the best of ``BLAST_BLOCKS`` on the first ``blast_curve_n``
   digits.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .._engine import block_spectra
from .._extras import pyplot_agg
from .._io import atomic_write_csv, save_figure
from ..budget import match_budget
from ..datasets import load_mnist_split
from ..layout import BlockLayout
from ..structures import fit_shared_basis, get_structure

BUDGET = 224
PAPER_CONFIGS = {"LoRA": ("global", 1, 4), "MELoRA": ("diagonal", 4, 4), "Localized": ("block", 2, 2)}
OPTIMAL_PARTITIONS = (2, 4, 7)  # even splits of 28: the allocation is provably optimal there
BLAST_BLOCKS = (2, 4, 7)  # BLAST grids tried (even splits of 28)
BLAST_N = 2000  # digits BLAST is fitted on at the study's budget (the first ones)
BLAST_CURVE_N = 100  # digits of the BLAST budget curve and of the choice of K


def _say(progress, msg):
    if progress:
        print(msg, flush=True)


def _stats(e):
    e = np.asarray(e, dtype=np.float64)
    return dict(
        mean=float(e.mean()),
        median=float(np.median(e)),
        std=float(e.std()),
        p10=float(np.percentile(e, 10)),
        p90=float(np.percentile(e, 90)),
        n=int(e.size),
    )


#: Partitions of the sweep: every K up to 7 and K=14 (K = 8..13 leave blocks of 2-3 pixels,
#: which only admit ranks 1-2 and add nothing to the curves).
BLOCK_COUNTS = (1, 2, 3, 4, 5, 6, 7, 14)


def compute_study(
    images, labels, *, budget=BUDGET, block_counts=BLOCK_COUNTS, blast_blocks=BLAST_BLOCKS, blast_n=BLAST_N,
    blast_curve_n=BLAST_CURVE_N, n_jobs=-1, progress=True,
):  # fmt: skip
    """Errors of every structure on an image stack.

    Parameters
    ----------
    images : ndarray of shape (N, h, w)
    labels : ndarray of shape (N,)
    budget : int
        The budget of part 1 (default: the paper's 224).
    block_counts : sequence of int
        The partitions K x K (and N for MELoRA) of the sweep; must contain 1, 2 and 4.
    blast_blocks : sequence of int
        BLAST grids ``K x K`` tried (empty: no BLAST).
    blast_n, blast_curve_n : int
        BLAST is fitted at ``budget`` on the first ``blast_n`` digits and its budget
        curve (and the choice of its configuration) on the first ``blast_curve_n``.

    Returns
    -------
    dict with keys ``at_budget`` (method -> per-image errors), ``configs``
    (method -> description), ``sweep`` (list of records), ``labels``,
    ``timings`` and ``blast`` (None without BLAST, else a dict: ``errors`` on the
    first ``n`` digits, ``config``, ``n_blocks``, ``rank``, ``n_params``, ``n``,
    ``curve_n``, ``seconds``).
    """
    S = np.asarray(images, dtype=np.float64)
    labels = np.asarray(labels)
    m, n = S.shape[-2:]
    unit = m + n
    t0 = time.perf_counter()
    spectra = {}
    for K in block_counts:
        if K > min(m, n):
            continue
        spectra[K] = block_spectra(S, BlockLayout.block((m, n), K), n_jobs=n_jobs)
        _say(progress, f"  spectra of {K}x{K} blocks on {S.shape[0]} images ({time.perf_counter() - t0:.1f} s)")
    t_spectra = time.perf_counter() - t0

    def err(method, K, r):
        # any pattern on the K x K grid: rank r on its active blocks, the others dropped (rank 0)
        return spectra[K].error(get_structure(method).layout((m, n), K).with_ranks(r).ranks)

    # ---- part 1: the paper's budget
    at_budget, configs = {}, {}
    for name, (method, K, r) in PAPER_CONFIGS.items():
        at_budget[name] = err(method, K, r)
        configs[name] = f"{method} K={K} r={r}"
    t1 = time.perf_counter()
    R, exact = spectra[2].allocate(budget)
    at_budget["Optimal 2x2"] = spectra[2].error(R)
    configs["Optimal 2x2"] = f"block K=2, per-image ranks at budget {budget} ({'exact' if exact else 'greedy'})"
    t_alloc = time.perf_counter() - t1

    # ---- part 2: the sweep over matched budgets
    t2 = time.perf_counter()
    sweep, chosen = _budget_sweep(spectra, (m, n), err)
    t_sweep = time.perf_counter() - t2

    # ---- parts 3 and 4: BLAST on subsets (iterative fits)
    t3 = time.perf_counter()
    blast = None
    if blast_blocks:
        blast = _blast(
            S,
            labels,
            budget,
            tuple(blast_blocks),
            min(blast_n, S.shape[0]),
            min(blast_curve_n, S.shape[0]),
            unit,
            sweep,
            n_jobs,
            progress,
        )
        k = blast["curve_n"]
        # the other methods on the BLAST curve's digits, for a like-for-like comparison
        blast["others_on_curve_digits"] = {key: float(np.mean(e[:k])) for key, e in chosen.items()}
    t_blast = time.perf_counter() - t3
    return dict(
        at_budget=at_budget,
        configs=configs,
        sweep=sweep,
        labels=labels,
        budget=budget,
        blast=blast,
        timings=dict(
            spectra=t_spectra, allocation=t_alloc, sweep=t_sweep, blast=t_blast, total=time.perf_counter() - t0
        ),
    )


def _budget_sweep(spectra, shape, err):
    """Part 2 of the study: at every budget ``t (m + n)``, the best configuration of each method.

    Returns the sweep's records and ``chosen``: ``{(budget, method): per-digit errors}`` of the
    configuration each record shows.
    """
    m, n = shape
    sweep, chosen = [], {}

    def min_side(K):
        return min(
            min(np.array_split(np.arange(m), K), key=len).size, min(np.array_split(np.arange(n), K), key=len).size
        )

    for t in range(1, min(m, n) + 1):
        P = (m + n) * t
        cand = {"LoRA": [(f"r={t}", err("global", 1, t))]}
        cand["MELoRA"] = [(f"N={K} r={t}", err("diagonal", K, t)) for K in spectra if K >= 2 and t < min_side(K)]
        cand["Localized"] = [
            (f"K={K} r={t // K}", err("block", K, t // K))
            for K in spectra
            if K >= 2 and t % K == 0 and t // K < min_side(K)
        ]
        opt = []
        for K in OPTIMAL_PARTITIONS:
            if K in spectra and P <= spectra[K].layout.full_rank_params:
                Ropt, _ = spectra[K].allocate(P)
                opt.append((f"K={K}", spectra[K].error(Ropt)))
        cand["Optimal allocation"] = opt
        for method, options in cand.items():
            if not options:
                continue
            cfg, e = min(options, key=lambda o: float(np.mean(o[1])))
            sweep.append(dict(budget=P, method=method, config=cfg, n_options=len(options), **_stats(e)))
            chosen[(P, method)] = e
    return sweep, chosen


def _blast(S, labels, budget, blocks, n_fit, n_curve, unit, sweep, n_jobs, progress):
    """BLAST curve on the first n_curve digits (appended to ``sweep``), then the best
    configuration at ``budget`` on the first n_fit digits."""
    m, n = S.shape[-2:]
    curve = S[:n_curve]
    t0 = time.perf_counter()
    at_budget_options = []
    for P in range(2 * unit, unit * min(m, n) + 1, 2 * unit):
        try:
            recs = match_budget((m, n), P, methods=["shared_basis"], n_blocks=list(blocks))
        except ValueError:  # past every BLAST configuration below full rank
            break
        options = []
        for rec in recs:
            res = fit_shared_basis(curve, rec["n_blocks"], rec["rank"], n_jobs=n_jobs)
            options.append((f"K={rec['n_blocks']} r={rec['rank']} ({rec['n_params']} params)", res.error, rec))
        cfg, err, _ = min(options, key=lambda o: float(np.mean(o[1])))
        sweep.append(dict(budget=P, method="BLAST", config=cfg, n_options=len(options), **_stats(err)))
        if P == budget:
            at_budget_options = options
    if not at_budget_options:  # the study's budget is not on the curve's grid
        recs = match_budget((m, n), budget, methods=["shared_basis"], n_blocks=list(blocks))
        at_budget_options = [
            (None, fit_shared_basis(curve, r["n_blocks"], r["rank"], n_jobs=n_jobs).error, r) for r in recs
        ]
    _say(progress, f"  BLAST curve on {n_curve} digits ({time.perf_counter() - t0:.1f} s)")
    _, _, best = min(at_budget_options, key=lambda o: float(np.mean(o[1])))
    t1 = time.perf_counter()
    res = fit_shared_basis(S[:n_fit], best["n_blocks"], best["rank"], n_jobs=n_jobs)
    seconds = time.perf_counter() - t1
    _say(progress, f"  BLAST K={best['n_blocks']} r={best['rank']} on {n_fit} digits ({seconds:.1f} s)")
    return dict(
        errors=np.asarray(res.error),
        n_blocks=best["n_blocks"],
        rank=best["rank"],
        n_params=best["n_params"],
        config=f"shared_basis K={best['n_blocks']} r={best['rank']} ({best['n_params']} params; "
        f"K in {list(blocks)} chosen on the first {n_curve} digits)",
        n=n_fit,
        curve_n=n_curve,
        seconds=seconds,
        mean_passes=float(np.mean(res.n_iter)),
        choices={f"K={r['n_blocks']} r={r['rank']}": float(np.mean(e)) for _, e, r in at_budget_options},
    )


def summarize(study):
    """Plain-language summary lines of what the data shows, whichever way it falls."""
    ab, labels = study["at_budget"], study["labels"]
    loc, lora, mel = ab["Localized"], ab["LoRA"], ab["MELoRA"]
    lines = [f"At budget {study['budget']} on {loc.size} test digits (relative Frobenius error):"]
    for name, e in ab.items():
        s = _stats(e)
        lines.append(
            f"  {name:<12} mean {s['mean']:.4f}  median {s['median']:.4f}  "
            f"p10-p90 {s['p10']:.4f}-{s['p90']:.4f}   [{study['configs'][name]}]"
        )
    w_lora = float(np.mean(loc < lora))
    w_mel = float(np.mean(loc < mel))
    lines.append(
        f"  Localized (K=2, r=2) beats LoRA (r=4) on {100 * w_lora:.1f}% of digits "
        f"and MELoRA (N=4, r=4) on {100 * w_mel:.1f}%."
    )
    verdict = "better than" if loc.mean() < lora.mean() else "worse than"
    lines.append(
        f"  On average Localized is {verdict} LoRA "
        f"({loc.mean():.4f} vs {lora.mean():.4f}); the paper's single digit "
        f"(0.2119 vs 0.2313) is {'typical' if (loc < lora).mean() > 0.5 else 'not typical'}."
    )
    per = []
    for d in np.unique(labels):
        sel = labels == d
        per.append((int(d), float(np.mean(loc[sel] < lora[sel])), float(loc[sel].mean()), float(lora[sel].mean())))
    worst = min(per, key=lambda p: p[1])
    best = max(per, key=lambda p: p[1])
    lines.append(
        f"  Per class, Localized beats LoRA most often on digit {best[0]} ({100 * best[1]:.0f}%) "
        f"and least often on digit {worst[0]} ({100 * worst[1]:.0f}%)."
    )
    gain = ab["Localized"] - ab["Optimal 2x2"]
    lines.append(
        f"  The budget-optimal 2x2 allocation lowers Localized's error by {gain.mean():.4f} on "
        f"average (never raises it: min change {gain.min():.2e})."
    )
    # sweep: who wins at each budget
    sw = study["sweep"]
    budgets = sorted({r["budget"] for r in sw})
    wins = {}
    for P in budgets:
        rows = [r for r in sw if r["budget"] == P and r["method"] in ("LoRA", "MELoRA", "Localized")]
        if len(rows) < 2:
            continue
        w = min(rows, key=lambda r: r["mean"])
        wins.setdefault(w["method"], []).append(P)
    lines.append("  Budget sweep (best configuration of each method per budget, mean error):")
    for meth, Ps in wins.items():
        lines.append(f"    {meth} is best at {len(Ps)} of the budgets: {Ps[:6]}{' ...' if len(Ps) > 6 else ''}")
    lines += _summarize_blast(study)
    return lines


def _summarize_blast(study):
    bl = study.get("blast")
    if not bl:
        return []
    ab = study["at_budget"]
    k = bl["n"]
    e = bl["errors"]
    lora, loc, opt = ab["LoRA"][:k], ab["Localized"][:k], ab["Optimal 2x2"][:k]
    choices = ", ".join(f"{c}: {v:.4f}" for c, v in bl["choices"].items())
    out = [
        f"  BLAST at budget {study['budget']}: best configuration on the first {bl['curve_n']} digits "
        f"({choices}) is K={bl['n_blocks']} r={bl['rank']}, {bl['n_params']} parameters "
        f"({study['budget'] - bl['n_params']} below the budget: r K^2 couplings).",
        f"    On the first {k} digits: BLAST mean {e.mean():.4f} (median {np.median(e):.4f}) vs LoRA "
        f"{lora.mean():.4f}, Localized {loc.mean():.4f}, optimal 2x2 {opt.mean():.4f}; BLAST beats LoRA on "
        f"{100 * np.mean(e < lora):.1f}% and Localized on {100 * np.mean(e < loc):.1f}% of them "
        f"(fit in {bl['seconds']:.1f} s, {bl['mean_passes']:.0f} ALS passes on average).",
    ]
    curve = sorted((r for r in study["sweep"] if r["method"] == "BLAST"), key=lambda r: r["budget"])
    others = bl.get("others_on_curve_digits", {})
    below, above = [], []
    for r in curve:
        rivals = [others[(r["budget"], mth)] for mth in ("LoRA", "MELoRA", "Localized") if (r["budget"], mth) in others]
        if rivals:
            (below if r["mean"] < min(rivals) else above).append(r["budget"])
    if curve:
        out.append(
            f"    BLAST curve (first {bl['curve_n']} digits, same digits for the others): lowest mean error "
            f"of the four at budgets {below}, not at {above}."
        )
    return out


def write_study(study, out_dir):
    out_dir = Path(out_dir)
    path = out_dir / "study.csv"
    fields = [
        "section",
        "method",
        "config",
        "budget",
        "digit",
        "mean",
        "median",
        "std",
        "p10",
        "p90",
        "n",
        "win_rate_vs_LoRA",
        "win_rate_vs_MELoRA",
    ]
    ab, labels = study["at_budget"], study["labels"]
    rows = []
    for name, e in ab.items():
        for d in ["all"] + [int(x) for x in np.unique(labels)]:
            sel = np.ones(e.size, bool) if d == "all" else labels == d
            row = dict(
                section="at_budget",
                method=name,
                config=study["configs"][name],
                budget=study["budget"],
                digit=d,
                **_stats(e[sel]),
            )
            row["win_rate_vs_LoRA"] = f"{np.mean(e[sel] < ab['LoRA'][sel]):.4f}"
            row["win_rate_vs_MELoRA"] = f"{np.mean(e[sel] < ab['MELoRA'][sel]):.4f}"
            rows.append(row)
    bl = study.get("blast")
    if bl:
        k, e = bl["n"], bl["errors"]
        for d in ["all"] + [int(x) for x in np.unique(labels[:k])]:
            sel = np.ones(k, bool) if d == "all" else labels[:k] == d
            row = dict(
                section="at_budget",
                method="BLAST",
                config=bl["config"] + f"; first {k} digits",
                budget=study["budget"],
                digit=d,
                **_stats(e[sel]),
            )
            row["win_rate_vs_LoRA"] = f"{np.mean(e[sel] < ab['LoRA'][:k][sel]):.4f}"
            row["win_rate_vs_MELoRA"] = f"{np.mean(e[sel] < ab['MELoRA'][:k][sel]):.4f}"
            rows.append(row)
    for r in study["sweep"]:
        row = dict(section="sweep", digit="all", **{k: r[k] for k in r if k in fields})
        if r["method"] == "BLAST":
            row["config"] = f"{r['config']}; first {bl['curve_n']} digits"
        rows.append(row)
    atomic_write_csv(path, rows, fields)
    return path


def plot_study(study, path):
    plt = pyplot_agg()
    ab, labels = dict(study["at_budget"]), study["labels"]
    labs = {k: labels for k in ab}
    bl = study.get("blast")
    if bl:
        name = f"BLAST (first {bl['n']})"
        ab[name], labs[name] = bl["errors"], labels[: bl["n"]]
    names = list(ab)
    colors = {"LoRA": "#1f77b4", "MELoRA": "#d62728", "Localized": "#2ca02c", "Optimal 2x2": "#9467bd"}
    if bl:
        colors[names[-1]] = "#ff7f0e"
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(13, 4.6), constrained_layout=True, gridspec_kw=dict(width_ratios=[1, 2.2])
    )
    parts = ax1.violinplot([ab[k] for k in names], showmedians=True)
    for body, k in zip(parts["bodies"], names):
        body.set_facecolor(colors.get(k, "gray"))
        body.set_alpha(0.6)
    ax1.set_xticks(range(1, len(names) + 1), [k.replace(" (", "\n(") for k in names], rotation=15)
    ax1.set_ylabel("relative Frobenius error")
    ax1.set_title(f"All {labels.size} test digits, budget {study['budget']}")
    digits = np.unique(labels)
    width = 0.8 / len(names)
    for t, k in enumerate(names):
        means = [ab[k][labs[k] == d].mean() for d in digits]
        q = [np.percentile(ab[k][labs[k] == d], [25, 75]) for d in digits]
        yerr = np.array([[mu - a, b - mu] for mu, (a, b) in zip(means, q)]).T
        ax2.bar(
            digits + (t - (len(names) - 1) / 2) * width,
            means,
            width,
            yerr=yerr,
            color=colors.get(k, "gray"),
            label=k,
            capsize=1.5,
            error_kw=dict(lw=0.6),
        )
    ax2.set_xticks(digits)
    ax2.set_xlabel("digit class")
    ax2.set_ylabel("mean error (bars: interquartile range)")
    ax2.set_title("Per class")
    ax2.legend(ncol=5, fontsize=8, loc="upper center")
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def plot_budget(study, path):
    plt = pyplot_agg()
    colors = {
        "LoRA": "#1f77b4",
        "MELoRA": "#d62728",
        "Localized": "#2ca02c",
        "Optimal allocation": "#9467bd",
        "BLAST": "#ff7f0e",
    }
    bl = study.get("blast")
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for method, c in colors.items():
        rows = sorted((r for r in study["sweep"] if r["method"] == method), key=lambda r: r["budget"])
        if not rows:
            continue
        x = np.array([r["budget"] for r in rows])
        mu = np.array([r["mean"] for r in rows])
        ax.fill_between(x, [r["p10"] for r in rows], [r["p90"] for r in rows], color=c, alpha=0.15)
        label = f"{method} (best config per budget)"
        if method == "BLAST" and bl:
            label = f"BLAST (best K in {list(BLAST_BLOCKS)}; first {bl['curve_n']} digits)"
        ax.plot(x, mu, "-o" if method != "BLAST" else "-s", ms=3, color=c, label=label)
    ax.axvline(study["budget"], color="gray", ls=":", lw=1)
    ax.text(study["budget"], 0.02, f" {study['budget']}", color="gray", fontsize=8)
    ax.set_xlabel("parameters")
    ax.set_ylabel("relative Frobenius error (line: mean, band: 10th-90th percentile)")
    ax.set_title(f"Error vs budget on {study['labels'].size} MNIST test digits (28x28)")
    ax.set_ylim(0, None)
    ax.legend()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def run_study(out_dir, *, progress=True, data=None):
    """Load the MNIST test set, run the study, write study.csv and the two figures."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = load_mnist_split("test") if data is None else data
    _say(progress, f"study: {images.shape[0]} test digits")
    study = compute_study(images, labels, progress=progress)
    paths = [
        write_study(study, out_dir),
        plot_study(study, out_dir / "figure_study.png"),
        plot_budget(study, out_dir / "figure_budget.png"),
    ]
    if progress:
        print("\n".join(summarize(study)))
        tm = study["timings"]
        print(
            f"  (computed in {tm['total']:.1f} s: spectra {tm['spectra']:.1f} s, "
            f"sweep {tm['sweep']:.1f} s, BLAST {tm['blast']:.1f} s)"
        )
    return paths


__all__ = ["compute_study", "summarize", "write_study", "plot_study", "plot_budget", "run_study"]

#!/usr/bin/env python
"""LoRA extraction in a data metric at 7B scale: its cost against the plain extraction and a torch whitened SVD.

Issue 19, item 5. One decoder block of a 7B Llama (the seven linear layers of
``bench_checkpoint.py``: q, k, v, o 4096 x 4096, gate and up 11008 x 4096,
down 4096 x 11008; BF16 checkpoint pair, ΔW a decaying spectrum over the BF16
noise floor) and calibration statistics written with
:func:`blocklowrank.calibration.save_statistics` (float64): one synthetic
decaying-spectrum ``G`` per input site, as a forward pass shares them -- q/k/v
one (4096), o its own (4096), gate/up one (4096), down its own (11008).
``G = C C^T / p + 1e-3 I`` with ``p = 1024`` columns scaled ``(1 + i)^-0.75``
plus 4 outlier features (50 x the mean diagonal), as ``bench_metric.py``.

Each side is its own subprocess under ``/usr/bin/time -v`` (wall time, peak
RSS), BLAS and torch at the same thread count; every side reads ΔW the same
way (``iter_deltas``, one layer at a time) and writes its factors:

* ``plain``: ``approximate(dW, method="global", rank=16, svd_solver="auto")``
  (what ``extract`` runs without calibration);
* ``metric``: the same with ``input_gram=`` the site's :class:`~blocklowrank.GramFactor`
  (``gram_damping`` 0.01), read from the statistics file and factored once
  per site when the first layer reading it comes, released after the last
  (``extract(..., calibration=)``'s loop, through the public pieces);
  ``--check`` adds :func:`~blocklowrank.calibration.check_statistics` first,
  as an extraction from a file must;
* ``extract_plain`` / ``extract_metric``: :func:`~blocklowrank.extract.extract_adapter` itself,
  end to end, without and with ``calibration=`` the statistics file (``metric="input"``: every layer in
  its ``G``), PEFT file and report written; timed only (the objectives above check the fits);
* ``torch32`` / ``torch64``: the straightforward implementation of the same
  objective (SVD-LLM's whitening): ``L = torch.linalg.cholesky(G_delta)``
  once per site, ``torch.linalg.svd(W @ L)`` in full, truncation to rank 16,
  ``B = U_r S_r``, ``A = V_r^T L^{-1}`` by ``torch.linalg.solve_triangular``,
  in float32 and in float64 (``G_delta`` the same damped Gram).

The driver then checks that the sides solve the same problem: for every
layer, from the written factors, the damped relative output error
``sqrt(f(M) / f(0))`` with ``f(M) = ||(W - BA) L||_F^2`` in float64 (SciPy's
Cholesky of ``G_delta``; ``f(0)`` by ``W L`` in float64, the rest from the
factors), and its excess over torch64's (the exact optimum up to rounding).

Usage (torch 2.13 CPU in the interpreter)::

    PYTHONPATH=. python benchmarks/bench_metric_extract.py --out result.md
    PYTHONPATH=. python benchmarks/bench_metric_extract.py --sides plain metric --profile   # where the time goes
    PYTHONPATH=. python benchmarks/bench_metric_extract.py --keep DIR --per-layer self_attn.q_proj mlp.down_proj
        # one thread, CPU seconds per layer (DIR: the files of an earlier run with --keep DIR)

Nothing is asserted; the targets section prints PASS/MISS with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_checkpoint import RANK, SHAPES, emit, header, layer_names, make_pair, side_env, stream, timed_subprocess  # noqa: E402

DAMPING = 0.01
SITES = {  # module -> the module its input site is named after (the first layer reading it)
    "self_attn.q_proj": "self_attn.q_proj",
    "self_attn.k_proj": "self_attn.q_proj",
    "self_attn.v_proj": "self_attn.q_proj",
    "self_attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.gate_proj",
    "mlp.down_proj": "mlp.down_proj",
}


# ---------------------------------------------------------------------------- data
def synthetic_gram(n, seed, p=1024, n_outliers=4):
    """A decaying-spectrum second moment (n x n, float64), as described in the module docstring."""
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((n, p)) * (1.0 + np.arange(p)) ** -0.75
    G = C @ C.T / p
    G[np.diag_indices(n)] += 1e-3
    out = rng.choice(n, n_outliers, replace=False)
    G[out, out] += 50.0 * np.mean(np.diag(G))
    return G


def make_statistics(path, n_layers):
    """The statistics file: one G per input site of every decoder layer, float64."""
    from blocklowrank.calibration import CalibrationStats, save_statistics

    grams, counts, sites = {}, {}, {}
    for name in layer_names(n_layers):
        module = name[: -len(".weight")]
        prefix, mod = module.split(".", 3)[:3], module.split(".", 3)[3]
        site = ".".join(prefix + [SITES[mod]])
        sites[module] = site
        if site not in grams:
            grams[site], counts[site] = synthetic_gram(SHAPES[mod][1], seed=len(grams)), 100_000
    save_statistics(path, CalibrationStats(grams, counts, sites, model="synthetic-7B-block"), dtype="float64")
    return sites


def per_site(folder, stats, t, make):
    """``(pair, ΔW, the site's factor)`` one layer at a time, timing ``t["read"]``, ``t["gram_read"]``
    and ``t["gram_factor"]``: ``make(G)`` runs once per input site, when the first layer reading it
    comes, and its result is released after the site's last layer (``t["fit"]``: the caller's work)."""
    from blocklowrank.checkpoints import open_checkpoint, pair_layers

    with open_checkpoint(os.path.join(folder, "base.safetensors")) as base:
        pairs = list(pair_layers(base, base).pairs)
    site = {p.name: stats.site_of(p.module) for p in pairs}
    last = {site[p.name]: i for i, p in enumerate(pairs)}
    held = {}
    t0 = time.perf_counter()
    for i, (pair, dW) in enumerate(stream(folder)):
        t1 = time.perf_counter()
        t["read"] += t1 - t0
        s = site[pair.name]
        if s not in held:
            G = stats.site_gram(s)
            t2 = time.perf_counter()
            t["gram_read"] += t2 - t1
            held[s] = make(G)
            del G
            t1 = time.perf_counter()
            t["gram_factor"] += t1 - t2
        yield pair, dW, held[s]
        if last[s] == i:
            del held[s]
        del dW
        t0 = time.perf_counter()
        t["fit"] += t0 - t1


# ---------------------------------------------------------------------------- sides
def side_plain(folder):
    from blocklowrank import approximate

    t = dict(read=0.0, fit=0.0)
    factors, layers = {}, {}
    t0 = time.perf_counter()
    for pair, dW in stream(folder):
        t1 = time.perf_counter()
        t["read"] += t1 - t0
        res = approximate(dW, method="global", rank=RANK, svd_solver="auto", random_state=0)
        factors[pair.name + ".B"], factors[pair.name + ".A"] = res.factors[(0, 0)]
        layers[pair.name] = dict(solver=sorted(set(res.svd_solver.values())))
        del dW, res
        t0 = time.perf_counter()
        t["fit"] += t0 - t1
    return _written(folder, "plain", factors, layers, t)


def side_metric(folder, check):
    from blocklowrank import GramFactor, approximate
    from blocklowrank.calibration import check_statistics, load_statistics

    t = dict(check=0.0, read=0.0, gram_read=0.0, gram_factor=0.0, fit=0.0)
    factors, layers = {}, {}
    with load_statistics(os.path.join(folder, "stats.safetensors")) as stats:
        if check:
            t0 = time.perf_counter()
            check_statistics(stats, {k: SHAPES[k.split(".", 3)[3]] for k in stats.layers})
            t["check"] = time.perf_counter() - t0
        for pair, dW, gram in per_site(folder, stats, t, lambda G: GramFactor(G, G.shape[0], damping=DAMPING)):
            res = approximate(dW, method="global", rank=RANK, svd_solver="auto", random_state=0, input_gram=gram)
            factors[pair.name + ".B"], factors[pair.name + ".A"] = res.factors[(0, 0)]
            layers[pair.name] = dict(
                solver=sorted(set(res.svd_solver.values())), output_error=float(np.ravel(res.output_error)[0])
            )
            del dW, res
    return _written(folder, "metric", factors, layers, t)


def side_extract(folder, calibrated):
    """``extract_adapter`` itself, end to end (pairing, reading, the statistics' check and factors, fits,
    the PEFT file and its report): plain, or with ``calibration=`` the statistics file and
    ``metric="input"`` (a global adapter's ``auto`` would fit it plain)."""
    from blocklowrank.extract import extract_adapter

    kw = {"calibration": os.path.join(folder, "stats.safetensors"), "metric": "input"} if calibrated else {}
    t0 = time.perf_counter()
    rep = extract_adapter(
        os.path.join(folder, "base.safetensors"), os.path.join(folder, "tuned.safetensors"),
        os.path.join(folder, "extract_metric" if calibrated else "extract_plain"), rank=RANK, svd_solver="auto",
        overwrite=True, random_state=0, **kw,
    )  # fmt: skip
    layers = {name: dict(solver=[], output_error=v["output_error"]) for name, v in rep.layers.items()}
    return dict(layers=layers, phases={"fit": time.perf_counter() - t0})


def side_torch(folder, dtype, threads):
    import torch

    from blocklowrank.calibration import load_statistics

    torch.set_num_threads(threads)
    dt = dict(float32=torch.float32, float64=torch.float64)[dtype]

    def cholesky(G):  # L of G_delta = G + delta mean(diag G) I, once per site
        G = torch.from_numpy(np.array(G))
        G.diagonal().add_(DAMPING * float(G.diagonal().mean()))
        return torch.linalg.cholesky(G).to(dt)

    t = dict(read=0.0, gram_read=0.0, gram_factor=0.0, fit=0.0)
    factors, layers = {}, {}
    with load_statistics(os.path.join(folder, "stats.safetensors")) as stats:
        for pair, dW, L in per_site(folder, stats, t, cholesky):
            W = torch.from_numpy(dW).to(dt)
            U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
            B = (U[:, :RANK] * S[:RANK]).contiguous()
            A = torch.linalg.solve_triangular(L.T, Vh[:RANK].T, upper=True).T.contiguous()  # V_r^T L^-1
            factors[pair.name + ".B"], factors[pair.name + ".A"] = B.numpy(), A.numpy()
            layers[pair.name] = dict(solver=[f"torch.linalg.svd {dtype}"])
            del dW, W, U, S, Vh, L
    return _written(folder, "torch" + dtype[-2:], factors, layers, t)


def _written(folder, key, factors, layers, t):
    from blocklowrank.checkpoints import save_file

    t0 = time.perf_counter()
    save_file(os.path.join(folder, f"{key}.safetensors"), factors)
    t["write"] = time.perf_counter() - t0
    return dict(layers=layers, phases=t)


def run_side(args):
    if args.side == "plain":
        res = side_plain(args.workdir)
    elif args.side == "metric":
        res = side_metric(args.workdir, args.check)
    elif args.side.startswith("extract"):
        res = side_extract(args.workdir, args.side == "extract_metric")
    else:
        res = side_torch(args.workdir, "float" + args.side[-2:], args.threads)
    use = resource.getrusage(resource.RUSAGE_SELF)
    res["cpu"] = use.ru_utime + use.ru_stime  # CPU seconds of every thread (busy-waiting BLAS threads too)
    print("RESULT " + json.dumps(res))


# ---------------------------------------------------------------------------- per layer, CPU seconds
def per_layer(folder, modules):
    """One thread, CPU seconds per layer (robust to other work on the machine): each site's Gram
    factored (GramFactor; torch's Cholesky), the plain and metric fits, the metric fit through
    products only (``sketch="operator"``) and its exact total alone, and the torch whitened SVD."""
    import torch
    from threadpoolctl import threadpool_limits

    from blocklowrank import GramFactor, approximate
    from blocklowrank._metric import fit_global, metric_energy
    from blocklowrank.calibration import load_statistics

    torch.set_num_threads(1)

    def cpu(f):
        t = time.process_time()
        out = f()
        return time.process_time() - t, out

    kw = dict(method="global", rank=RANK, svd_solver="auto", random_state=0)
    with threadpool_limits(1), load_statistics(os.path.join(folder, "stats.safetensors")) as stats:
        for pair, dW in stream(folder):
            if pair.module.split(".", 3)[3] not in modules:
                continue
            G = np.array(stats.input_gram(pair.module))
            row = {}
            row["GramFactor"], gram = cpu(lambda: GramFactor(G, G.shape[0], damping=DAMPING))
            row["plain"], _ = cpu(lambda: approximate(dW, **kw))
            row["metric"], _ = cpu(lambda: approximate(dW, input_gram=gram, **kw))
            row["operator"], _ = cpu(
                lambda: fit_global(dW, RANK, gram, svd_solver="auto", random_state=0, sketch="operator")
            )
            row["total"], _ = cpu(lambda: metric_energy(dW, gram))
            Gd = torch.from_numpy(G)
            Gd.diagonal().add_(DAMPING * float(Gd.diagonal().mean()))
            row["torch cholesky"], L64 = cpu(lambda: torch.linalg.cholesky(Gd))
            for dt in (torch.float32, torch.float64):
                L, W = L64.to(dt), torch.from_numpy(dW).to(dt)

                def whitened():
                    U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
                    return U[:, :RANK] * S[:RANK], torch.linalg.solve_triangular(L.T, Vh[:RANK].T, upper=True).T

                row[f"torch {str(dt)[-7:]}"], _ = cpu(whitened)
            print(
                f"| {pair.module.split('.', 3)[3]} | " + " | ".join(f"{v:.2f}" for v in row.values()) + " |", flush=True
            )


# ---------------------------------------------------------------------------- the same objective
def objectives(folder, keys):
    """``{layer: {side: sqrt(f_delta(M) / f_delta(0))}}`` from the written factors, float64, independently
    of the library's metric code: ``L = cholesky(G_delta)`` (SciPy), ``f(0) = ||W L||^2``,
    ``f(M) = f(0) - 2 <(B^T W) L, A L> + <B^T B, (A L)(A L)^T>``."""
    import scipy.linalg

    from blocklowrank.calibration import load_statistics
    from blocklowrank.checkpoints import open_checkpoint

    out, L, cur = {}, None, None
    files = {k: open_checkpoint(os.path.join(folder, f"{k}.safetensors")) for k in keys}
    try:
        with load_statistics(os.path.join(folder, "stats.safetensors")) as stats:
            for pair, dW in stream(folder):
                s = stats.site_of(pair.module)
                if s != cur:
                    G = np.array(stats.site_gram(s))
                    G[np.diag_indices_from(G)] += DAMPING * np.mean(np.diag(G))
                    L, cur = scipy.linalg.cholesky(G, lower=True, overwrite_a=True, check_finite=False), s
                W = dW.astype(np.float64)
                del dW
                f0 = float(np.linalg.norm(W @ L) ** 2)
                out[pair.name] = {}
                for k, ck in files.items():
                    B, A = (ck.get(f"{pair.name}.{x}").astype(np.float64) for x in "BA")
                    AL = A @ L
                    f = f0 - 2 * float(np.sum((B.T @ W @ L) * AL)) + float(np.sum((B.T @ B) * (AL @ AL.T)))
                    out[pair.name][k] = float(np.sqrt(max(f, 0.0) / f0))
    finally:
        for ck in files.values():
            ck.close()
    return out


# ---------------------------------------------------------------------------- report
def report(lines, runs, errs, threads):
    out = ["```"] + lines + ["```", ""]
    out += [
        "| side | wall s | CPU s | peak RSS MiB | check s | read ΔW s | read G s | factor G s | fit s | solver |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, (res, wall, rss) in runs.items():
        ph = res["phases"]
        solvers = sorted({s for lay in res["layers"].values() for s in lay["solver"]})
        cells = [
            f"{ph.get(p, 0):.1f}" if p in ph else "-" for p in ("check", "read", "gram_read", "gram_factor", "fit")
        ]
        cpu = f"{res['cpu']:.1f}" if "cpu" in res else "-"
        out.append(f"| {key} | {wall:.1f} | {cpu} | {rss:.0f} | " + " | ".join(cells) + f" | {', '.join(solvers)} |")
    if errs:
        sides = list(next(iter(errs.values())))
        out += ["", "Damped relative output error `sqrt(f(M) / f(0))` of each side's written factors (float64):", ""]
        out += ["| layer | " + " | ".join(sides) + " |", "|---|" + "---:|" * len(sides)]
        for name, e in errs.items():
            out.append(f"| {name.split('.', 3)[3][:-7]} | " + " | ".join(f"{e[k]:.6f}" for k in sides) + " |")
    ok = lambda c: "PASS" if c else "MISS"  # noqa: E731
    out.append("")
    wall = {k: v[1] for k, v in runs.items()}
    if "plain" in wall and "metric" in wall:
        r = wall["metric"] / wall["plain"]
        out.append(f"- metric / plain, end to end: **{r:.2f}x** ({ok(r <= 2)}: target <= 2x)")
        fit = {k: runs[k][0]["phases"]["fit"] for k in ("plain", "metric")}
        g = runs["metric"][0]["phases"]
        out.append(
            f"- without the per-site G (read + factor, {g['gram_read'] + g['gram_factor']:.1f} s): "
            f"{(wall['metric'] - g['gram_read'] - g['gram_factor'] - g.get('check', 0)) / wall['plain']:.2f}x; "
            f"the fits alone {fit['metric'] / fit['plain']:.2f}x"
        )
    if "extract_plain" in wall and "extract_metric" in wall:
        r = wall["extract_metric"] / wall["extract_plain"]
        out.append(
            f"- extract_adapter with calibration / without, end to end: **{r:.2f}x** ({ok(r <= 2)}: target <= 2x)"
        )
    for k in ("torch32", "torch64"):
        if k in wall and "metric" in wall:
            r = wall[k] / wall["metric"]
            out.append(f"- {k} / metric, end to end: **{r:.1f}x** ({ok(r >= 5)}: target >= 5x)")
    if errs and "torch64" in next(iter(errs.values())):
        for k in (k for k in next(iter(errs.values())) if k != "torch64"):
            worst = max(e[k] ** 2 / e["torch64"] ** 2 - 1 for e in errs.values())
            what = " (the plain fit: not this objective's optimum)" if k == "plain" else ""
            out.append(f"- {k}: worst excess objective over torch64's, `f / f_torch64 - 1`: {worst:.2e}{what}")
    mem = {k: v[2] for k, v in runs.items()}
    out.append("- peak RSS (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in mem.items()) + f"; threads {threads}")
    return "\n".join(out)


# ---------------------------------------------------------------------------- driver
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", choices=("plain", "metric", "torch32", "torch64", "extract_plain", "extract_metric"))
    ap.add_argument("--sides", nargs="+", default=["plain", "metric", "torch32", "torch64"])
    ap.add_argument("--check", action="store_true", help="metric: check_statistics before the loop")
    ap.add_argument("--layers", type=int, default=1, help="decoder layers (7 linear layers each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", help="folder holding (or to receive) the checkpoints and statistics")
    ap.add_argument("--keep", help="keep the generated files in this folder (reused when present)")
    ap.add_argument("--profile", action="store_true", help="run the metric side under cProfile and print the top")
    ap.add_argument("--profile-out", help=argparse.SUPPRESS)
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument(
        "--per-layer", nargs="+", metavar="MODULE", help="only CPU seconds per layer, one thread (needs --keep)"
    )
    args = ap.parse_args(argv)
    if args.per_layer:
        print(
            "| layer | GramFactor | plain | metric | operator | total | torch cholesky | torch float32 | torch float64 |"
        )
        print("|---|" + "---:|" * 8)
        return per_layer(args.keep, args.per_layer)
    if args.side:
        if args.profile_out:
            import cProfile

            cProfile.runctx("run_side(args)", globals(), {"args": args}, args.profile_out)
            return
        return run_side(args)
    lines = header(args)
    env = side_env(args.threads)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = args.keep or tmp
        if not os.path.exists(os.path.join(folder, "stats.safetensors")):
            os.makedirs(folder, exist_ok=True)
            t0 = time.perf_counter()
            make_pair(folder, args.layers)
            make_statistics(os.path.join(folder, "stats.safetensors"), args.layers)
            lines.append(f"checkpoints and statistics written in {time.perf_counter() - t0:.1f} s")
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in ("base.safetensors", "tuned.safetensors"))
        lines.append(
            f"{args.layers} decoder layer(s), 7 linear layers each; checkpoint pair {size / 2**30:.2f} GiB (BF16), "
            f"statistics {os.path.getsize(os.path.join(folder, 'stats.safetensors')) / 2**30:.2f} GiB (float64)"
        )
        me = [sys.executable, os.path.abspath(__file__), "--workdir", folder, "--threads", str(args.threads)]
        runs = {}
        for key in args.sides:
            extra = ["--side", key] + (["--check"] if args.check and key == "metric" else [])
            if args.profile and key == "metric":
                extra += ["--profile-out", os.path.join(folder, "metric.prof")]
            runs[key] = timed_subprocess(me + extra, env)
            print(f"{key}: {runs[key][1]:.1f} s, {runs[key][2]:.0f} MiB", flush=True)
        if args.profile and "metric" in runs:
            import pstats

            pstats.Stats(os.path.join(folder, "metric.prof")).sort_stats("tottime").print_stats(25)
        errs = objectives(folder, [k for k in args.sides if not k.startswith("extract")])
        lines.append(f"load average at the end {os.getloadavg()[0]:.2f}")
    emit(report(lines, runs, errs, args.threads), args.out)


if __name__ == "__main__":
    sys.exit(main())

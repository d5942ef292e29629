#!/usr/bin/env python
"""Benchmark of the blocklowrank engine: ratios measured in one process.

Compares, on square d x d matrices cut into K x K blocks of rank r,

* our exact path (``approximate(..., svd_solver="full")``) with a Python
  loop of ``np.linalg.svd`` per block, and with itself on one thread and
  on ``n_jobs=2`` worker threads;
* our batched randomized SVD with a Python loop of
  ``sklearn.utils.extmath.randomized_svd`` per block, and with our exact
  path (time, and captured-energy deficit on a flat and a decaying
  spectrum);
* ``Approximation.reconstruction`` with filling a fresh d x d array, and with
  one BLAS call doing the same flops (the floor of any reconstruction);
* one global truncated SVD of the whole matrix, for scale.

Every group of competing methods runs in the same process, alternating
(A, B, C, C, B, A, ...), and the median is reported: separate runs of the
same code drift by up to 25% on shared machines. Timings are never
asserted in tests; the "targets" section prints PASS/MISS with the figure.

Usage::

    PYTHONPATH=. python benchmarks/bench_engine.py --quick      # d in {256, 1024}, < 2 min
    PYTHONPATH=. python benchmarks/bench_engine.py              # + d = 4096, ~10-15 min
    PYTHONPATH=. python benchmarks/bench_engine.py --out bench.md
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time

import numpy as np

try:
    import blocklowrank  # noqa: F401
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import sklearn
from sklearn.utils.extmath import randomized_svd
from threadpoolctl import ThreadpoolController, threadpool_info

from blocklowrank import approximate
from blocklowrank._parallel import resolve_n_jobs as _resolve_n_jobs


def choose_solver(block_shape, k, n_oversamples):
    """What svd_solver="auto" tries: "certified" (randomized, kept when its certificate
    passes, else the exact SVD) or "full" (small blocks: the cost rule)."""
    from blocklowrank._svd import _auto_plan

    return "full" if _auto_plan(k, *block_shape, n_oversamples, "auto") is None else "certified"


# "safe" for the randomized solver: relative deficit of captured energy below this
SAFE_DEFICIT = 1e-3
N_OVERSAMPLES = 10
SEED = 0


# the rule "auto" used before this benchmark (kept here to report what it would have picked)
def _old_rule(L, k, p=N_OVERSAMPLES):
    return L >= 512 and (k + p) * 10 <= L


# ---------------------------------------------------------------------------- timing
def _clock(fn, number):
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(number):
            out = fn()
            del out
        return (time.perf_counter() - t0) / number
    finally:
        gc.enable()


MIN_SAMPLE = 0.05  # seconds per timing sample (0.02 with --quick)


def alternate(fns, repeats, min_sample=None, max_call=5.0):
    """Median seconds per call of each ``(name, fn)``, run alternately in one process.

    A first pass calibrates how many calls make one sample (at least
    ``min_sample`` seconds, so that tiny calls are not lost in timer noise);
    a call longer than ``max_call`` seconds lowers the repeats to two (to one
    above ``4 max_call``);
    passes then alternate in forward and reverse order (A B C, C B A, ...)
    so that a slow drift of the machine hits every method alike. A
    calibration call longer than 0.5 s already counts as a sample.
    """
    min_sample = MIN_SAMPLE if min_sample is None else min_sample
    number, samples = {}, {name: [] for name, _ in fns}
    for name, fn in fns:
        t = _clock(fn, 1)
        number[name] = max(1, int(np.ceil(min_sample / max(t, 1e-7))))
        if t > 0.5:
            samples[name].append(t)
        if t > max_call:  # keep the full run bounded: a median of two for the longest calls,
            repeats = min(repeats, 2)  # a single run for calls over 4 max_call
        if t > 4 * max_call:
            repeats = 1
    for rep in range(repeats):
        order = fns if rep % 2 == 0 else fns[::-1]
        for name, fn in order:
            if len(samples[name]) < repeats:
                samples[name].append(_clock(fn, number[name]))
    return {name: float(np.median(v)) for name, v in samples.items()}


_BLAS = []


def one_thread(fn):
    """``fn`` with BLAS held to one thread. The controller is made once: a fresh
    ``threadpool_limits`` rescans every loaded library (about 2 ms per call
    once scikit-learn is imported), which would inflate the small cases."""

    def run():
        if not _BLAS:
            _BLAS.append(ThreadpoolController().select(user_api="blas"))
        with _BLAS[0].limit(limits=1):
            return fn()

    return run


# ---------------------------------------------------------------------------- data
def flat_matrix(d, rng):
    """Gaussian: a flat (Marchenko-Pastur) spectrum, the hard case for sketches."""
    return rng.standard_normal((d, d))


def decaying_matrix(d, rng):
    """``G1 diag((1+i)^-1) G2 / d``: singular values decaying roughly like 1/i."""
    s = 1.0 / (1.0 + np.arange(d))
    return (rng.standard_normal((d, d)) * s) @ rng.standard_normal((d, d)) / d


def block_views(X, K):
    b = X.shape[0] // K
    return [X[i * b : (i + 1) * b, j * b : (j + 1) * b] for i in range(K) for j in range(K)]


def block_svdvals(X, K):
    """All singular values of every block, shape (K*K, b), descending."""
    d = X.shape[0]
    b = d // K
    stack = X.reshape(K, b, K, b).swapaxes(1, 2).reshape(K * K, b, b)
    return np.linalg.svd(stack, compute_uv=False)


def captured_rand(res, r):
    """Captured energy ``||X_hat||_F^2`` of a randomized Approximation (= sum sigma_hat^2)."""
    return float(sum(np.sum(s[:r].astype(np.float64) ** 2) for s in res.singular_values.values()))


def gemm_floor(d, r, dtype=np.float64):
    """The same work as a rank-``r`` reconstruction in one BLAS call: a fresh
    ``d x d`` array written by ``np.matmul((d, r), (r, d), out=...)``.

    A K x K block reconstruction of uniform rank r does ``2 d^2 r`` flops,
    exactly like one global rank-r product; this is what any reconstruction
    costs on this machine's BLAS, however the blocks are organised.
    """
    rng = np.random.default_rng(SEED)
    B = rng.standard_normal((d, r)).astype(dtype)
    A = rng.standard_normal((r, d)).astype(dtype)

    def run():
        a = np.empty((d, d), dtype=dtype)
        np.matmul(B, A, out=a)
        return a

    return run


def deficit(exact, approx):
    return max(0.0, (exact - approx) / exact)


# ---------------------------------------------------------------------------- header
def header(args):
    lines = ["# blocklowrank engine benchmark", ""]
    lines.append(
        f"- python {platform.python_version()}, numpy {np.__version__}, "
        f"scikit-learn {sklearn.__version__}, machine {platform.machine()}, "
        f"{os.cpu_count()} CPUs"
    )
    for lib in threadpool_info():
        if lib.get("user_api") != "blas":
            continue
        owner = "numpy" if "numpy" in lib["filepath"] else "scipy" if "scipy" in lib["filepath"] else "?"
        lines.append(
            f"- BLAS ({owner}): {lib['internal_api']} {lib.get('version')}, kernel "
            f"{lib.get('architecture')}, {lib['num_threads']} threads, "
            f"threading layer {lib.get('threading_layer')}"
        )
    ct = os.environ.get("OPENBLAS_CORETYPE")
    lines.append(f"- OPENBLAS_CORETYPE={ct}" if ct else "- OPENBLAS_CORETYPE not set")
    try:
        nj = _resolve_n_jobs(None, 64, 1e12)
    except TypeError:  # engine before the n_jobs=None rule
        nj = _resolve_n_jobs(None)
    lines.append(f"- default n_jobs=None resolves to {nj} worker thread(s) on a large stack")
    try:
        load = os.getloadavg()
        lines.append("- load average at start: " + ", ".join(f"{v:.2f}" for v in load))
        if load[0] > 0.5 * (os.cpu_count() or 1):
            lines.append(
                "- **warning**: other processes are busy; timings that use BLAS threads "
                "(loop, n_jobs=1, sk-loop, recon) can be 10-100x slower than on an idle machine"
            )
    except OSError:
        pass
    mode = "quick" if args.quick else "full"
    lines.append(
        f"- mode {mode}: d in {args.sizes}, K in {args.blocks}, ranks {args.ranks}; medians of "
        f"{args.repeats} alternating runs ({args.repeats_big} for d >= 4096; 2 where one call "
        "takes over 5 s, 1 over 20 s)"
    )
    return lines


# ---------------------------------------------------------------------------- one case
def run_case(X, Xd, d, K, r, repeats, sv_flat, sv_decay, results, shared=None):
    """One (d, K, r) row. With ``shared`` (a dict per (d, K)), the exact-path
    columns, whose cost does not depend on r, are measured at the first rank
    only and reused (used at d = 4096 to keep the run bounded)."""
    blocks = block_views(X, K)
    b = d // K
    ell = r + N_OVERSAMPLES
    keep = {}

    def ours_full():
        keep["full"] = approximate(X, method="block", n_blocks=K, rank=r, svd_solver="full")
        return keep["full"]

    def ours_full_nj(n):
        return lambda: approximate(X, method="block", n_blocks=K, rank=r, svd_solver="full", n_jobs=n)

    def loop_full():
        return [np.linalg.svd(B, full_matrices=False) for B in block_views(X, K)]

    def ours_rand():
        keep["rand"] = approximate(X, method="block", n_blocks=K, rank=r, svd_solver="randomized", random_state=SEED)
        return keep["rand"]

    def sk_loop():
        keep["sk"] = [
            randomized_svd(B, r, n_oversamples=N_OVERSAMPLES, n_iter="auto", random_state=SEED)
            for B in block_views(X, K)
        ]
        return keep["sk"]

    exact = [
        ("ours", ours_full),
        ("loop", loop_full),
        ("1thr", one_thread(ours_full_nj(1))),
        ("nj2", ours_full_nj(2)),
        ("nj1", ours_full_nj(1)),
    ]
    rand = [("rand", ours_rand), ("sk", sk_loop)]
    reused = shared is not None and "exact" in shared
    if reused:
        t = alternate(rand, repeats)
        t.update(shared["exact"])
    else:
        t = alternate(exact + rand, repeats)
        if shared is not None:
            shared["exact"] = {name: t[name] for name, _ in exact}

    # energies: exact from the blocks' full spectra, randomized from the computed ones
    ex_flat = float(np.sum(sv_flat[:, :r] ** 2))
    ex_decay = float(np.sum(sv_decay[:, :r] ** 2))
    cap_flat = captured_rand(keep["rand"], r)
    cap_sk = float(sum(np.sum(s**2) for _, s, _ in keep["sk"]))
    res_d = approximate(Xd, method="block", n_blocks=K, rank=r, svd_solver="randomized", random_state=SEED)
    cap_decay = captured_rand(res_d, r)
    rand_is_full = ell >= b  # the engine falls back to the exact SVD

    # reconstruction against a fresh fill (its cost depends on the shapes and ranks only)
    res = keep["rand"]

    def recon():
        res._reconstruction = None
        return res.reconstruction

    def fill():
        a = np.empty((d, d))
        a.fill(1.0)
        return a

    tr = alternate([("recon", recon), ("fill", fill), ("gemm", gemm_floor(d, r))], max(repeats, 5))
    keep.clear()
    del blocks
    row = dict(
        d=d,
        K=K,
        r=r,
        b=b,
        ell=ell,
        **{f"t_{k}": v for k, v in t.items()},
        t_recon=tr["recon"],
        t_fill=tr["fill"],
        t_gemm=tr["gemm"],
        def_flat=deficit(ex_flat, cap_flat),
        def_flat_sk=deficit(ex_flat, cap_sk),
        def_decay=deficit(ex_decay, cap_decay),
        rand_is_full=rand_is_full,
        reused=reused,
        auto=choose_solver((b, b), r, N_OVERSAMPLES),
        old_auto="randomized" if _old_rule(b, r) else "full",
    )
    results.append(row)
    return row


def run_global(X, Xd, d, ranks, repeats, sv_decay):
    """One global truncated SVD, exact and randomized per rank, for scale."""
    out = []
    keep = {}

    def full():
        keep["full"] = approximate(X, method="global", rank=max(ranks), svd_solver="full")
        return keep["full"]

    def rand(r):
        def run():
            keep[r] = approximate(X, method="global", rank=r, svd_solver="randomized", random_state=SEED)
            return keep[r]

        return run

    # the exact global SVD of a 4096 x 4096 matrix takes tens of seconds: time it once there
    t = alternate([("full", full)] + [(r, rand(r)) for r in ranks], 1 if d >= 4096 else repeats)
    s_flat = keep["full"].singular_values[(0, 0)]
    for r in ranks:
        res_d = approximate(Xd, method="global", rank=r, svd_solver="randomized", random_state=SEED)
        out.append(
            dict(
                d=d,
                r=r,
                t_full=t["full"],
                t_rand=t[r],
                def_flat=deficit(float(np.sum(s_flat[:r] ** 2)), captured_rand(keep[r], r)),
                def_decay=deficit(float(np.sum(sv_decay[:r] ** 2)), captured_rand(res_d, r)),
                auto=choose_solver((d, d), r, N_OVERSAMPLES),
            )
        )
    return out


# ---------------------------------------------------------------------------- report
def ms(t):
    return f"{t * 1e3:.1f}" if t >= 0.01 else f"{t * 1e3:.2f}"


def sci(x):
    return "0" if x == 0 else f"{x:.1e}"


def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _rank_label(x, results):
    same = [y["r"] for y in results if (y["d"], y["K"]) == (x["d"], x["K"]) and y["reused"]]
    return ", ".join(str(r) for r in [x["r"]] + same) + "†" if same else x["r"]


def report(results, glob, args):
    L = []
    L += ["", '## Exact path (`svd_solver="full"`)', ""]
    L += [
        'ours = `approximate(X, method="block", n_blocks=K, rank=r, svd_solver="full")` with the '
        "default `n_jobs`; loop = `np.linalg.svd(block, full_matrices=False)` per block; "
        "1 thread = ours with `n_jobs=1` under `threadpool_limits(1)`; n_jobs=1 = one worker, "
        "BLAS threads free (the old default). Times in ms.",
        "",
    ]
    L += table(
        [
            "d",
            "K",
            "r",
            "block",
            "ours",
            "loop",
            "loop/ours",
            "1 thread",
            "n_jobs=2",
            "2 threads speedup",
            "n_jobs=1",
            "n_jobs=1/ours",
        ],
        [
            [
                x["d"],
                x["K"],
                _rank_label(x, results),
                f"{x['b']}²",
                ms(x["t_ours"]),
                ms(x["t_loop"]),
                f"{x['t_loop'] / x['t_ours']:.2f}",
                ms(x["t_1thr"]),
                ms(x["t_nj2"]),
                f"{x['t_1thr'] / x['t_nj2']:.2f}",
                ms(x["t_nj1"]),
                f"{x['t_nj1'] / x['t_ours']:.2f}",
            ]
            for x in results
            if not x["reused"]
        ],
    )
    if any(x["reused"] for x in results):
        L += [
            "",
            "†: measured once for both ranks (the exact solver computes every singular "
            "vector, so its cost does not depend on r).",
        ]
    L += ["", '## Randomized path (`svd_solver="randomized"`)', ""]
    L += [
        'ours-rand = `approximate(..., svd_solver="randomized", random_state=0)` (default '
        "`n_jobs`); sk-loop = `sklearn.utils.extmath.randomized_svd(block, r)` per block (same "
        '`n_oversamples=10`, `n_iter="auto"`); exact = ours above. deficit = 1 - captured '
        "energy of the randomized rank-r blocks / that of the exact ones (flat: Gaussian X; "
        "decay: singular values ~ 1/i). `*`: sketch r+10 >= block side, the engine uses the "
        'exact SVD. auto = what `svd_solver="auto"` picks (old = the rule before this '
        "benchmark). †: exact timed in the run of the other rank. Times in ms.",
        "",
    ]
    L += table(
        [
            "d",
            "K",
            "r",
            "block",
            "ours-rand",
            "sk-loop",
            "sk-loop/ours-rand",
            "exact",
            "exact/rand",
            "deficit flat",
            "deficit flat (sklearn)",
            "deficit decay",
            "auto",
            "old auto",
        ],
        [
            [
                x["d"],
                x["K"],
                x["r"],
                f"{x['b']}²" + ("*" if x["rand_is_full"] else ""),
                ms(x["t_rand"]),
                ms(x["t_sk"]),
                f"{x['t_sk'] / x['t_rand']:.2f}",
                ms(x["t_ours"]) + ("†" if x["reused"] else ""),
                f"{x['t_ours'] / x['t_rand']:.2f}",
                sci(x["def_flat"]),
                sci(x["def_flat_sk"]),
                sci(x["def_decay"]),
                x["auto"],
                x["old_auto"],
            ]
            for x in results
        ],
    )
    L += ["", "## Reconstruction", ""]
    L += [
        "recon = `res.reconstruction` rebuilt from the factors (cache reset); fill = "
        "`a = np.empty((d, d)); a.fill(1.0)` (a fresh array written once); gemm = "
        "`a = np.empty((d, d)); np.matmul(B, A, out=a)` with B (d x r), A (r x d): the same "
        "2 d² r flops in one BLAS call, the floor of any rank-r reconstruction with this BLAS. "
        "BLAS threads as installed (recon, fill and gemm alike). Times in ms.",
        "",
    ]
    L += table(
        ["d", "K", "r", "recon", "fill", "gemm", "recon/fill", "gemm/fill", "recon/gemm"],
        [
            [
                x["d"],
                x["K"],
                x["r"],
                ms(x["t_recon"]),
                ms(x["t_fill"]),
                ms(x["t_gemm"]),
                f"{x['t_recon'] / x['t_fill']:.2f}",
                f"{x['t_gemm'] / x['t_fill']:.2f}",
                f"{x['t_recon'] / x['t_gemm']:.2f}",
            ]
            for x in results
        ],
    )
    L += ["", "## One global truncated SVD (scale)", ""]
    L += [
        '`approximate(X, method="global", rank=r)`, exact (its cost does not depend on r; '
        "timed once at d=4096) and randomized. Times in ms.",
        "",
    ]
    L += table(
        ["d", "r", "exact", "randomized", "exact/rand", "deficit flat", "deficit decay", "auto"],
        [
            [
                g["d"],
                g["r"],
                ms(g["t_full"]),
                ms(g["t_rand"]),
                f"{g['t_full'] / g['t_rand']:.1f}",
                sci(g["def_flat"]),
                sci(g["def_decay"]),
                g["auto"],
            ]
            for g in glob
        ],
    )
    L += ["", "## Targets", ""]
    L += targets(results, glob, args)
    try:
        L += ["", "load average at end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())]
    except OSError:
        pass
    return L


def targets(results, glob, args):
    out = []

    def line(ok, text):
        out.append(f"- **{'PASS' if ok else 'MISS'}** {text}")

    # 1. exact never slower than the per-block loop
    w = min(results, key=lambda x: x["t_loop"] / x["t_ours"])
    v = w["t_loop"] / w["t_ours"]
    line(
        v >= 1.0,
        f"exact path never slower than the per-block loop: worst loop/ours = {v:.2f} "
        f"(d={w['d']}, K={w['K']}, r={w['r']}); median over cases "
        f"{np.median([x['t_loop'] / x['t_ours'] for x in results]):.2f}",
    )
    # 2. two threads
    rows = [x for x in results if x["d"] >= 4096 and x["K"] >= 4]
    if rows:
        w = min(rows, key=lambda x: x["t_1thr"] / x["t_nj2"])
        v = w["t_1thr"] / w["t_nj2"]
        line(
            v >= 1.6,
            f"n_jobs=2 >= 1.6x faster than one thread at d=4096, K>=4: worst "
            f"{v:.2f}x (K={w['K']}, r={w['r']}); all: "
            + ", ".join(f"K={x['K']} r={x['r']}: {x['t_1thr'] / x['t_nj2']:.2f}" for x in rows),
        )
    else:
        out.append("- **n/a** n_jobs=2 speedup at d=4096 (not measured in --quick mode)")
    # 3. batched randomized vs sklearn loop
    rows = [x for x in results if x["d"] == 1024 and x["K"] >= 8]
    if rows:
        w = min(rows, key=lambda x: x["t_sk"] / x["t_rand"])
        v = w["t_sk"] / w["t_rand"]
        line(
            v >= 2.0,
            f"batched randomized >= 2x faster than looping randomized_svd at d=1024, "
            f"K>=8: worst {v:.2f}x (K={w['K']}, r={w['r']})",
        )
    # 4. reconstruction
    w = max(results, key=lambda x: x["t_recon"] / x["t_fill"])
    v = w["t_recon"] / w["t_fill"]
    per_d = {}
    for x in results:
        per_d[x["d"]] = max(per_d.get(x["d"], 0), x["t_recon"] / x["t_fill"])
    line(
        v <= 2.0,
        f"reconstruction within 2x of a fresh fill: worst recon/fill = {v:.2f} "
        f"(d={w['d']}, K={w['K']}, r={w['r']}, {ms(w['t_recon'])} ms vs {ms(w['t_fill'])} ms); "
        "worst per d: " + ", ".join(f"d={d}: {v:.2f}" for d, v in sorted(per_d.items())),
    )
    out_of_reach = [x for x in results if x["t_gemm"] / x["t_fill"] > 2.0]
    reach = [x for x in results if x["t_gemm"] / x["t_fill"] <= 2.0]
    miss = [x for x in reach if x["t_recon"] / x["t_fill"] > 2.0]
    out.append(
        f"  - {len(out_of_reach)} of {len(results)} cases are out of reach of any reconstruction: "
        "one BLAS call doing the same flops already takes more than 2x the fill there ("
        + (
            ", ".join(
                f"d={x['d']} K={x['K']} r={x['r']}: gemm/fill {x['t_gemm'] / x['t_fill']:.2f}" for x in out_of_reach
            )
            or "none"
        )
        + f"); of the other {len(reach)}, {len(miss)} miss"
        + (" (" + ", ".join(f"d={x['d']} K={x['K']} r={x['r']}" for x in miss) + ")" if miss else "")
    )
    w = max(results, key=lambda x: x["t_recon"] / x["t_gemm"])
    out.append(
        f"  - reconstruction against that one-call floor: worst recon/gemm = "
        f"{w['t_recon'] / w['t_gemm']:.2f} (d={w['d']}, K={w['K']}, r={w['r']}); median "
        f"{np.median([x['t_recon'] / x['t_gemm'] for x in results]):.2f}"
    )
    # 5. auto rule, per (block side, rank): worst deficit over both spectra and all cases,
    # smallest exact/randomized time ratio
    cases = {}
    for side, r, dflat, ddec, speed, auto, is_full in [
        (x["b"], x["r"], x["def_flat"], x["def_decay"], x["t_ours"] / x["t_rand"], x["auto"], x["rand_is_full"])
        for x in results
    ] + [(g["d"], g["r"], g["def_flat"], g["def_decay"], g["t_full"] / g["t_rand"], g["auto"], False) for g in glob]:
        c = cases.setdefault((side, r), dict(deficit=0.0, speed=np.inf, auto=auto, full=is_full))
        c["deficit"] = max(c["deficit"], dflat, ddec)
        c["speed"] = min(c["speed"], speed)
    # "auto" keeps a randomized result only under its certificate (tests/test_solver_auto.py);
    # here: does its cost rule try the sketch only where the sketch is faster than exact?
    picked = {k: c for k, c in cases.items() if c["auto"] == "certified"}
    bad = {k: c for k, c in picked.items() if c["speed"] <= 1.0}
    line(
        not bad,
        f'svd_solver="auto" tries the certified randomized solver only where it is faster '
        f"than exact: tries it for {len(picked)} of {len(cases)} measured (block side, rank) pairs, "
        f"{len(bad)} of them slower",
    )

    def fmt(k, c):
        return f"side {k[0]} r={k[1]} (deficit {c['deficit']:.1e}, exact/rand {c['speed']:.1f})"

    ok = {k: c for k, c in cases.items() if not c["full"] and c["deficit"] < SAFE_DEFICIT}
    fast_ok = {k: c for k, c in ok.items() if c["speed"] > 1.0}
    out.append(
        "  - safe: "
        + (", ".join(fmt(k, c) for k, c in sorted(ok.items())) or "none")
        + f"; of these faster than exact: {len(fast_ok)}"
    )
    old = {k: c for k, c in cases.items() if _old_rule(*k)}
    if old:
        w = max(old.items(), key=lambda kc: kc[1]["deficit"])
        n_bad = sum(c["deficit"] >= SAFE_DEFICIT for c in old.values())
        out.append(
            f"  - the old rule (side >= 512 and 10 (r + 10) <= side) picks randomized for "
            f"{len(old)} pairs, {n_bad} unsafe; worst: {fmt(*w)}"
        )
    return out


# ---------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="d in {256, 1024}, few repeats (< 2 min)")
    p.add_argument("--out", metavar="FILE", help="also write the markdown report to FILE")
    p.add_argument("--repeats", type=int, default=None, help="alternating runs per case")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="override d values")
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = [256, 1024] if args.quick else [256, 1024, 4096]
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    args.repeats_big = min(args.repeats, 3)
    if args.quick:
        global MIN_SAMPLE
        MIN_SAMPLE = 0.02
    args.blocks = [2, 4, 8, 16]
    args.ranks = [2, 8]

    lines = header(args)
    for ln in lines:
        print(ln, flush=True)
    t_start = time.perf_counter()
    rng = np.random.default_rng(SEED)
    results, glob = [], []
    for d in args.sizes:
        X = flat_matrix(d, rng)
        Xd = decaying_matrix(d, rng)
        reps = args.repeats_big if d >= 4096 else args.repeats
        for K in args.blocks:
            sv_flat, sv_decay = block_svdvals(X, K), block_svdvals(Xd, K)
            shared = {} if d >= 4096 else None
            for r in args.ranks:
                row = run_case(X, Xd, d, K, r, reps, sv_flat, sv_decay, results, shared)
                print(
                    f"  d={d} K={K} r={r}: ours {ms(row['t_ours'])} ms, loop/ours "
                    f"{row['t_loop'] / row['t_ours']:.2f}, 2thr {row['t_1thr'] / row['t_nj2']:.2f}, "
                    f"sk/rand {row['t_sk'] / row['t_rand']:.2f}, recon/fill "
                    f"{row['t_recon'] / row['t_fill']:.2f}, deficit flat {sci(row['def_flat'])} "
                    f"[{time.perf_counter() - t_start:.0f} s]",
                    file=sys.stderr,
                    flush=True,
                )
        sv_decay_g = np.linalg.svd(Xd, compute_uv=False)
        glob += run_global(X, Xd, d, args.ranks, reps, sv_decay_g)
        print(f"  d={d} global done [{time.perf_counter() - t_start:.0f} s]", file=sys.stderr, flush=True)
    body = report(results, glob, args)
    body.append(f"total benchmark time: {time.perf_counter() - t_start:.0f} s")
    for ln in body:
        print(ln, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines + body) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

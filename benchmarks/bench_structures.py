"""Structures at matched parameter budgets: error and fit time.

Usage (from the repository root)::

    python benchmarks/bench_structures.py            # 28x28 and 256x256
    python benchmarks/bench_structures.py --repeat 5 --threads 2
    python benchmarks/bench_structures.py --stack 500 --sizes   # iterative fits on MNIST stacks only
    python benchmarks/bench_structures.py --experiment          # time the structures experiment

``--stack N`` times the iterative structures (hybrid, BLAST) on the first N MNIST
test digits fitted as one stack against a Python loop of single fits (on the
first ``--loop-n`` digits; the per-digit errors of the two are compared).
``--experiment`` runs :func:`blocklowrank.experiments.structures.compute_structures`
(the ``blocklowrank reproduce structures`` computation) and prints its time per
dataset.

Compares, on the same matrices and at the same parameter budget, global low
rank (LoRA), diagonal blocks (MELoRA, N=4), full blocks (Localized LoRA,
K=2 and K=4, uniform rank; and K=2 with the optimal per-block ranks under
the budget), the hybrid (K=2 blocks + a global term, about half the budget
each) and shared bases (BLAST, K=2 and K=4). Budgets: 224 for 28x28 (the
paper's 2 r d with r=4) and 8192 for 256x256 (r=16). Each configuration
uses the largest ranks that fit in the budget; its exact parameter count is
printed (BLAST's r K^2 couplings make it land below the budget).

Matrices (no download): "digit" images drawn as blurred pen strokes (an
MNIST-like 0, 2 and 7, rendered at the matrix size), and planted
structures plus 5% Gaussian noise (relative Frobenius norm), with ranks
that scale with the budget (given here for 28x28, where the budget is that
of global rank 4; times 4 at 256x256, whose budget is global rank 16), so
that no structure captures them exactly within the budget: global rank 8,
2x2 blocks of rank 4, hybrid (global rank 4 + 2x2 blocks of rank 2) and
shared bases (2x2, rank 6).

Errors are relative Frobenius errors ``||X - X_hat|| / ||X||``; times are
the median over ``--repeat`` fits (``--repeat-large`` for sides >= 128),
exact (LAPACK) SVDs throughout, BLAS held to ``--threads`` threads (1 by
default: on a shared 2-core machine, OpenBLAS with 2 threads under load
gives erratic times); the iterative fits (hybrid, BLAST) use their defaults
(tol=1e-6, max_iter=100) and the number of passes they ran is shown.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

from blocklowrank import BlockLayout, approximate, fit_hybrid, fit_shared_basis, match_budget  # noqa: E402  # noqa: E402

BUDGETS = {28: 224, 256: 8192}


# ---------------------------------------------------------------------------- matrices
def _strokes(d, curves, width):
    """Render pen strokes (lists of (x, y) points in [0, 1]^2) as a blurred d x d image."""
    yy, xx = np.mgrid[0:d, 0:d] / (d - 1)
    img = np.zeros((d, d))
    sigma = width
    for pts in curves:
        pts = np.asarray(pts)
        # dense resampling along the polyline
        seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
        t = np.concatenate([[0], np.cumsum(seg)])
        s = np.linspace(0, t[-1], max(8, int(4 * d * t[-1])))
        px = np.interp(s, t, pts[:, 0])
        py = np.interp(s, t, pts[:, 1])
        for x, y in zip(px, py):
            img = np.maximum(img, np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)))
    return img


def digit(kind, d):
    th = np.linspace(0, 2 * np.pi, 60)
    if kind == "0":
        curves = [np.c_[0.5 + 0.22 * np.cos(th), 0.5 + 0.32 * np.sin(th)]]
    elif kind == "2":
        a = np.linspace(np.pi * 1.05, np.pi * 2.2, 30)
        top = np.c_[0.5 + 0.22 * np.cos(a), 0.33 + 0.15 * np.sin(a)]
        curves = [top, [top[-1], (0.25, 0.8)], [(0.25, 0.8), (0.78, 0.8)]]
    elif kind == "7":
        curves = [[(0.25, 0.2), (0.75, 0.2)], [(0.75, 0.2), (0.42, 0.82)], [(0.4, 0.5), (0.65, 0.5)]]
    else:  # pragma: no cover
        raise ValueError(kind)
    return _strokes(d, curves, width=0.045)


def _noise(X, rng, level=0.05):
    E = rng.standard_normal(X.shape)
    return X + level * np.linalg.norm(X) / np.linalg.norm(E) * E


def planted(kind, d, f, rng):
    """Planted structure (ranks at 28x28 times ``f``) plus 5% noise."""
    g = rng.standard_normal
    h = d // 2
    if kind == "global":
        r = 8 * f
        X = g((d, r)) @ g((r, d))
    elif kind == "blocks":
        r = 4 * f
        X = np.block([[g((h, r)) @ g((r, h)) for _ in range(2)] for _ in range(2)])
    elif kind == "hybrid":
        rg, r = 4 * f, 2 * f
        X = g((d, rg)) @ g((rg, d)) + np.block([[g((h, r)) @ g((r, h)) for _ in range(2)] for _ in range(2)])
    elif kind == "shared":
        r = 6 * f
        U = [g((h, r)) for _ in range(2)]
        V = [g((h, r)) for _ in range(2)]
        X = np.block([[(U[i] * g(r)) @ V[j].T for j in range(2)] for i in range(2)])
    else:  # pragma: no cover
        raise ValueError(kind)
    return _noise(X, rng)


def matrices(d, f, seed=0):
    rng = np.random.default_rng(seed)
    names = {
        "global": f"global r{8 * f}",
        "blocks": f"blocks 2x2 r{4 * f}",
        "hybrid": f"hybrid g{4 * f}+2x2r{2 * f}",
        "shared": f"shared 2x2 r{6 * f}",
    }
    out = [(f"digit {k}", digit(k, d)) for k in "027"]
    out += [(names[k], planted(k, d, f, rng)) for k in ("global", "blocks", "hybrid", "shared")]
    return out


# ---------------------------------------------------------------------------- methods
def methods(shape, budget):
    m, n = shape
    r = budget // (m + n)
    rb2 = budget // (2 * (m + n))
    rb4 = budget // (4 * (m + n))
    hyb = match_budget(shape, budget, methods="hybrid", n_blocks=2)
    hr, hg = min(((h["rank"], h["global_rank"]) for h in hyb), key=lambda t: abs(t[0] * 2 - t[1]))
    s2 = match_budget(shape, budget, methods="shared_basis", n_blocks=2)[0]["rank"]
    s4 = match_budget(shape, budget, methods="shared_basis", n_blocks=4)[0]["rank"]
    full = dict(svd_solver="full")

    def approx(**kw):
        def fit(X):
            a = approximate(X, **kw, **full)
            return a.error, a.n_params, ""

        return fit

    def hybrid(X):
        res = fit_hybrid(X, BlockLayout.block(shape, 2, rank=hr), hg, **full)
        return res.error, res.n_params, f"{res.n_iter} it"

    def blast(K, rank):
        def fit(X):
            res = fit_shared_basis(X, K, rank)
            return res.error, res.n_params, f"{res.n_iter} it"

        return fit

    return [
        (f"global r={r}", approx(method="global", rank=r)),
        (f"diagonal N=4 r={r}", approx(method="diagonal", n_blocks=4, rank=r)),
        (f"block K=2 r={rb2}", approx(method="block", n_blocks=2, rank=rb2)),
        (f"block K=4 r={rb4}", approx(method="block", n_blocks=4, rank=rb4)),
        ("block K=2 budget", approx(method="block", n_blocks=2, budget=budget)),
        (f"hybrid K=2 r={hr}+g{hg}", hybrid),
        (f"BLAST K=2 r={s2}", blast(2, s2)),
        (f"BLAST K=4 r={s4}", blast(4, s4)),
    ]


def _median_time(fn, X, repeat):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(X)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def header(threads):
    blas = [
        f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')}, {i.get('num_threads')} threads)"
        for i in threadpool_info()
        if i.get("user_api") == "blas"
    ]
    core = os.environ.get("OPENBLAS_CORETYPE")
    print(f"# blocklowrank structures at matched budgets — numpy {np.__version__}, Python {platform.python_version()}")
    print(f"# BLAS: {'; '.join(blas) or 'unknown'}" + (f"; OPENBLAS_CORETYPE={core}" if core else ""))
    print(f"# timed with BLAS limited to {threads} thread(s)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[28, 256])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--repeat-large", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stack", type=int, default=0, help="MNIST digits for the stack-vs-loop timing")
    ap.add_argument("--loop-n", type=int, default=50, help="digits fitted one by one in the loop")
    ap.add_argument("--experiment", action="store_true", help="time the structures experiment")
    args = ap.parse_args(argv)
    header(args.threads)
    with threadpool_limits(limits=args.threads, user_api="blas"):
        for d in args.sizes:
            run_size(d, args.repeat if d < 128 else args.repeat_large)
        if args.stack:
            run_stack(args.stack, args.loop_n)
    if args.experiment:
        run_experiment()
    return 0


def run_stack(n, loop_n):
    """Hybrid and BLAST on a stack of MNIST digits: one vectorised fit vs a loop of single fits."""
    from blocklowrank.datasets import load_mnist_split

    images, _ = load_mnist_split("test")
    S = images[:n].astype(np.float64)
    print(f"\n## Iterative fits on {n} MNIST digits at budget 224: stack vs loop (loop on {loop_n})\n")
    print("| structure | stack: s | ms/digit | loop: ms/digit | loop/stack | max error diff | mean passes |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    cases = [
        ("hybrid K=2 r=1 + global r=2", lambda X: fit_hybrid(X, BlockLayout.block((28, 28), 2, rank=1), 2)),
        ("BLAST K=2 r=3", lambda X: fit_shared_basis(X, 2, 3)),
        ("BLAST K=4 r=3", lambda X: fit_shared_basis(X, 4, 3)),
    ]
    for name, fit in cases:
        t0 = time.perf_counter()
        stack = fit(S)
        ts = time.perf_counter() - t0
        t0 = time.perf_counter()
        singles = [fit(x) for x in S[:loop_n]]
        tl = (time.perf_counter() - t0) / loop_n
        diff = max(abs(a.error - b) for a, b in zip(singles, stack.error[:loop_n]))
        print(
            f"| {name} | {ts:.2f} | {1e3 * ts / n:.2f} | {1e3 * tl:.1f} | {tl * n / ts:.1f}x | {diff:.1e} "
            f"| {np.mean(stack.n_iter):.1f} |",
            flush=True,
        )


def run_experiment():
    from blocklowrank.datasets import load_mnist_split
    from blocklowrank.experiments.structures import compute_structures

    images, labels = load_mnist_split("test")
    print("\n## The structures experiment (blocklowrank reproduce structures)\n")
    res = compute_structures(images, labels, progress=True)
    print(f"\ntotal {res['seconds']:.1f} s")


def run_size(d, repeat):
    budget = BUDGETS.get(d, 2 * d * max(1, d // 16))
    mats = matrices(d, max(1, budget // (2 * d) // 4))
    meths = methods((d, d), budget)
    errs = np.zeros((len(mats), len(meths)))
    times = np.zeros((len(mats), len(meths)))
    params = [None] * len(meths)
    notes = [[""] * len(meths) for _ in mats]
    for a, (_, X) in enumerate(mats):
        for b, (_, fit) in enumerate(meths):
            t, (e, p, note) = _median_time(fit, X, repeat)
            errs[a, b], times[a, b] = e, t
            params[b] = p
            notes[a][b] = note
    print(f"\n## {d}x{d}, budget {budget} parameters: relative error (lower is better)\n")
    names = [nm for nm, _ in meths]
    w = max(len(nm) for nm in names)
    print(f"| {'method':<{w}} | params | " + " | ".join(f"{nm:>16}" for nm, _ in mats) + " |")
    print(f"|{'-' * (w + 2)}|-------:|" + "|".join("-" * 17 + ":" for _ in mats) + "|")
    for b, nm in enumerate(names):
        best = errs[:, b] <= errs.min(axis=1) + 1e-12
        cells = [f"{'**' if best[a] else ''}{errs[a, b]:.4f}{'**' if best[a] else ''}" for a in range(len(mats))]
        print(f"| {nm:<{w}} | {params[b]:>6} | " + " | ".join(f"{c:>16}" for c in cells) + " |")
    print(f"\n## {d}x{d}: fit time in ms (median of {repeat}); iterations for the iterative fits\n")
    print(f"| {'method':<{w}} | " + " | ".join(f"{nm:>16}" for nm, _ in mats) + " |")
    print(f"|{'-' * (w + 2)}|" + "|".join("-" * 17 + ":" for _ in mats) + "|")
    for b, nm in enumerate(names):
        cells = [f"{1e3 * times[a, b]:.2f}" + (f" ({notes[a][b]})" if notes[a][b] else "") for a in range(len(mats))]
        print(f"| {nm:<{w}} | " + " | ".join(f"{c:>16}" for c in cells) + " |")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The exact SVD kernels available in this process, against our exact path.

For stacks of N square blocks of side b (float32 and float64), times in one
process, alternating the competitors and keeping the median:

* ``numpy``: ``np.linalg.svd(stack, full_matrices=False)`` (one batched gufunc call);
* ``scipy``: ``scipy.linalg.svd(block, full_matrices=False, check_finite=False,
  lapack_driver="gesdd")`` per block;
* ``ours``: ``batched_svd(stack, svd_solver="full", full_spectrum=True)`` (threads
  over the stack as ``n_jobs=None`` decides, the BLAS threads otherwise).

numpy and scipy run twice: through the same worker split as ours (``split``,
one BLAS thread per worker), and as a user would call them (``direct``, one
call on the whole stack, BLAS threads as configured). ``ours/best`` divides by
the fastest of the four: the target figure (<= 1.15). Every function runs once
before timing (imports and first-call set-up are not measured), the competitors
alternate, and each keeps its fastest repeat (as ``timeit`` advises: noise from
other work on the machine only ever adds time). A pause before each call lets
OpenBLAS's threads stop spinning: after a call with all BLAS threads they
busy-wait for a while and slow whatever runs next (32 x 128 float32 through
the split: 35 ms alone, 47 ms right after a direct call).

Usage::

    PYTHONPATH=. python benchmarks/bench_exact.py [--big] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_info

from blocklowrank import batched_svd
from blocklowrank._parallel import resolve_n_jobs, run_chunked

CASES = [(256, 32), (64, 64), (32, 128), (16, 256), (4, 512), (1, 512), (2, 1024), (1, 1024), (2, 2048), (1, 2048)]


def kernels():
    def numpy_svd(a):
        return np.linalg.svd(a, full_matrices=False)

    def scipy_svd(a):
        out = [scipy.linalg.svd(x, full_matrices=False, check_finite=False, lapack_driver="gesdd") for x in a]
        return tuple(np.stack(t) for t in zip(*out))

    return {"numpy": numpy_svd, "scipy": scipy_svd}


def competitors(A, jobs):
    """``{name: call}``: the kernels through our worker split and called directly, and ours."""
    fns = {f"{k} split": (lambda f=f: run_chunked(f, (A,), jobs)) for k, f in kernels().items()}
    fns.update({f"{k} direct": (lambda f=f: f(A)) for k, f in kernels().items()})
    fns["ours"] = lambda: batched_svd(A, svd_solver="full", full_spectrum=True)
    return fns


def timed(fns, reps):
    """``{name: [seconds]}``: ``reps`` rounds, the order reversed every other round, with a
    pause before each call (BLAS's threads stop spinning after the last one)."""
    times = {k: [] for k in fns}
    for r in range(reps):
        for k in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            time.sleep(0.15)
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def paired(b, reps=5):
    """Ours against the one competitor that runs the same kernel on a 2 x b x b stack
    (float32: SciPy one matrix after the other; float64: NumPy's gufunc split), b >= 512."""
    if b < 512:
        raise SystemExit("--paired needs B >= 512: below that the stack takes other routes")
    for dtype, comp in ((np.float32, "scipy direct"), (np.float64, "numpy split")):
        A = np.random.default_rng(0).standard_normal((2, b, b)).astype(dtype)
        fns = competitors(A, resolve_n_jobs(None, 2, 2 * (float(b) ** 3 + 1e4)))
        times = timed({c: fns[c] for c in (comp, "ours")}, reps)
        print(
            f"{np.dtype(dtype).name} 2 x {b}: ours / {comp}: fastest "
            f"{min(times['ours']) / min(times[comp]):.2f}, median "
            f"{np.median(times['ours']) / np.median(times[comp]):.2f}",
            flush=True,
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--big", action="store_true", help="add one 4096 x 4096 matrix")
    ap.add_argument("--repeats", type=int, default=5, help="of each competitor (3x for sides <= 256; 3 from side 2048)")
    ap.add_argument("--side", type=int, action="append", help="only the cases of this block side (repeatable)")
    ap.add_argument(
        "--paired",
        type=int,
        metavar="B",
        help="only 2 x B x B stacks (B >= 512): ours against the kernel it routes to, 5 alternating repeats",
    )
    args = ap.parse_args(argv)
    if args.paired:
        return paired(args.paired)
    print(f"numpy {np.__version__}, scipy {scipy.__version__}, load average {os.getloadavg()[0]:.2f}")
    for i in threadpool_info():
        print(
            f"  {i['internal_api']} {i.get('version')} ({i.get('architecture')}), {i['num_threads']} threads: "
            f"{os.path.basename(i['filepath'])}"
        )
    print(
        "| dtype | N x b | numpy split ms | scipy split ms | numpy direct ms | scipy direct ms | ours ms | ours/best |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        for N, b in CASES + ([(1, 4096)] if args.big else []):
            if args.side and b not in args.side:
                continue
            A = rng.standard_normal((N, b, b)).astype(dtype)
            fns = competitors(A, resolve_n_jobs(None, N, N * (float(b) ** 3 + 1e4)))
            if b < 2048:  # first call: imports, allocations
                for f in fns.values():
                    f()
            times = timed(fns, 3 if b >= 2048 else args.repeats * (3 if b <= 256 else 1))
            t = {k: min(v) * 1e3 for k, v in times.items()}
            best = min(v for k, v in t.items() if k != "ours")
            print(
                f"| {np.dtype(dtype).name} | {N} x {b} | "
                + " | ".join(f"{v:.1f}" for v in t.values())
                + f" | {t['ours'] / best:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

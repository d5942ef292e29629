"""BLAST (shared bases) on a stack of MNIST digits: one vectorised ALS vs a loop over digits.

Prints, from one process, for each configuration at budget <= 224 (28x28 digits):
- the vectorised fit of the whole stack (``fit_shared_basis(stack, K, r)``): wall and CPU
  time, passes run;
- a Python loop of single-matrix fits on the first ``--loop-n`` digits (per-digit time,
  extrapolated to the stack) and the largest difference of the per-digit errors between
  the two (they are the same fits, to rounding).

CPU time (``time.process_time``) is printed next to wall time because this machine is
shared: wall time includes waiting for the CPU while CPU time does not.

Run: python benchmarks/bench_shared_basis.py [--n 10000] [--loop-n 200] [--n-jobs 1]
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from threadpoolctl import threadpool_info  # noqa: E402

from blocklowrank import fit_shared_basis, shared_basis_params  # noqa: E402
from blocklowrank.datasets import load_mnist_split  # noqa: E402

CONFIGS = ((2, 3), (4, 3), (7, 2))


def header():
    for info in threadpool_info():
        if info.get("user_api") == "blas":
            print(
                f"# BLAS: {info.get('internal_api')} {info.get('version')} kernel={info.get('architecture')} "
                f"threads={info.get('num_threads')}"
            )
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    print(
        f"# numpy {np.__version__}, cores {os.cpu_count()}, load average {load[0]:.2f}, "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}"
    )


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000, help="digits in the stack")
    ap.add_argument("--loop-n", type=int, default=200, help="digits fitted one by one")
    ap.add_argument("--n-jobs", type=int, default=1, help="threads over the stack")
    args = ap.parse_args(argv)
    header()
    images, _ = load_mnist_split("test")
    S = images[: args.n].astype(np.float64)
    print(
        f"\n| K | r | params | stack of {args.n}: wall s | CPU s | ms/digit (wall) | mean passes "
        f"| loop of {args.loop_n}: ms/digit (wall) | loop/stack | max error diff |"
    )
    print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for K, r in CONFIGS:
        batch, wall, cpu = timed(lambda: fit_shared_basis(S, K, r, n_jobs=args.n_jobs))
        loop, lwall, _ = timed(lambda: [fit_shared_basis(x, K, r) for x in S[: args.loop_n]])
        diff = max(abs(a.error - b) for a, b in zip(loop, batch.error[: args.loop_n]))
        per_b = 1e3 * wall / len(S)
        per_l = 1e3 * lwall / args.loop_n
        print(
            f"| {K} | {r} | {shared_basis_params((28, 28), n_blocks=K, rank=r)} | {wall:.2f} | {cpu:.2f} | {per_b:.2f} "
            f"| {batch.n_iter.mean():.1f} | {per_l:.1f} | {per_l / per_b:.1f}x | {diff:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())

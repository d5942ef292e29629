#!/usr/bin/env python
"""The exact SVD kernels available in this process, against our exact path.

For stacks of N square blocks of side b (float32 and float64), times in one
process, alternating the competitors and keeping the median:

* ``numpy``: ``np.linalg.svd(stack, full_matrices=False)`` (one batched gufunc call);
* ``scipy``: ``scipy.linalg.svd(block, full_matrices=False, check_finite=False,
  lapack_driver="gesdd")`` per block;
* ``ours``: ``batched_svd(stack, svd_solver="full", full_spectrum=True)`` (threads
  over the stack as ``n_jobs=None`` decides, the BLAS threads otherwise);

numpy and scipy run through the same worker split as ours, so that the
comparison is of kernels. ``ours/best`` is the target figure (<= 1.15).

Usage::

    PYTHONPATH=. python benchmarks/bench_exact.py [--big] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_info

from blocklowrank import batched_svd
from blocklowrank._parallel import resolve_n_jobs, run_chunked

CASES = [(256, 32), (64, 64), (32, 128), (16, 256), (4, 512), (1, 512), (2, 1024), (1, 1024), (1, 2048)]


def kernels():
    def numpy_svd(a):
        return np.linalg.svd(a, full_matrices=False)

    def scipy_svd(a):
        out = [scipy.linalg.svd(x, full_matrices=False, check_finite=False, lapack_driver="gesdd") for x in a]
        return tuple(np.stack(t) for t in zip(*out))

    return {"numpy": numpy_svd, "scipy": scipy_svd}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--big", action="store_true", help="add one 4096 x 4096 matrix")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"numpy {np.__version__}, scipy {scipy.__version__}, load average {os.getloadavg()[0]:.2f}")
    for i in threadpool_info():
        print(f"  {i['internal_api']} {i.get('version')} ({i.get('architecture')}), {i['num_threads']} threads: "
              f"{os.path.basename(i['filepath'])}")
    print("| dtype | N x b | numpy ms | scipy ms | ours ms | scipy/numpy | ours/best |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        for N, b in CASES + ([(1, 4096)] if args.big else []):
            A = rng.standard_normal((N, b, b)).astype(dtype)
            jobs = resolve_n_jobs(None, N, N * (float(b) ** 3 + 1e4))
            fns = {k: (lambda f=f: run_chunked(f, (A,), jobs)) for k, f in kernels().items()}
            fns["ours"] = lambda: batched_svd(A, svd_solver="full", full_spectrum=True)
            reps = 1 if b >= 2048 else args.repeats
            times = {k: [] for k in fns}
            for r in range(reps):
                for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                    t0 = time.perf_counter()
                    fns[k]()
                    times[k].append(time.perf_counter() - t0)
            t = {k: statistics.median(v) for k, v in times.items()}
            best = min(t["numpy"], t["scipy"])
            print(f"| {np.dtype(dtype).name} | {N} x {b} | {t['numpy'] * 1e3:.1f} | {t['scipy'] * 1e3:.1f} | "
                  f"{t['ours'] * 1e3:.1f} | {t['scipy'] / t['numpy']:.2f} | {t['ours'] / best:.2f} |", flush=True)


if __name__ == "__main__":
    main()

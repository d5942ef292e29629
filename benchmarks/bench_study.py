"""How long the 10,000-digit study takes, against fitting digit by digit.

Prints, from one process:
- the whole study (`compute_study`: spectra of every partition, the budget-224 comparison,
  the budget sweep, and BLAST on its subsets) on all 10,000 MNIST test digits;
- the batched engine vs a Python loop over digits for one configuration
  (Localized K=2, r_block=2 at budget 224), measured on the same digits, alternating runs.

Run: .venv/bin/python benchmarks/bench_study.py [--n 10000]
"""

import argparse
import os
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_info

from blocklowrank import approximate
from blocklowrank.datasets import load_mnist_split
from blocklowrank.experiments.study import compute_study


def header():
    import numpy

    for info in threadpool_info():
        if info.get("user_api") == "blas":
            print(
                f"# BLAS: {info.get('internal_api')} {info.get('version')} kernel={info.get('architecture')} "
                f"threads={info.get('num_threads')}"
            )
    print(
        f"# numpy {numpy.__version__}, cores {os.cpu_count()}, "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000, help="number of test digits")
    ap.add_argument("--loop-n", type=int, default=1000, help="digits for the per-digit loop comparison")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    header()
    images, labels = load_mnist_split("test")
    images, labels = images[: args.n], labels[: args.n]

    t = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        st = compute_study(images, labels, progress=False)
        t.append(time.perf_counter() - t0)
    tm = st["timings"]
    print(
        f"\nwhole study on {args.n} digits: median {statistics.median(t):.2f} s over {args.repeats} runs "
        f"(last run: spectra {tm['spectra']:.2f} s, allocation {tm['allocation']:.2f} s, sweep {tm['sweep']:.2f} s, "
        f"BLAST {tm.get('blast', 0.0):.2f} s)"
    )
    if st.get("blast"):
        bl = st["blast"]
        print(
            f"  BLAST: curve on {bl['curve_n']} digits, K={bl['n_blocks']} r={bl['rank']} fitted on {bl['n']} digits "
            f"in {bl['seconds']:.2f} s"
        )

    S = images[: args.loop_n].astype(np.float64)
    batched, loop = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        a = approximate(S, method="block", n_blocks=2, rank=2, svd_solver="full")
        batched.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        e = [approximate(x, method="block", n_blocks=2, rank=2, svd_solver="full").error for x in S]
        loop.append(time.perf_counter() - t0)
    assert np.allclose(a.error, e)
    b, l = statistics.median(batched), statistics.median(loop)
    print(
        f"Localized K=2 r=2 on {args.loop_n} digits: batched {b:.3f} s, loop over digits {l:.3f} s, "
        f"loop/batched = {l / b:.1f}x"
    )


if __name__ == "__main__":
    main()

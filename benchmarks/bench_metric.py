#!/usr/bin/env python
"""The cost of a global fit in a data metric, against the plain fit and a straightforward whitened SVD.

For each layer shape ``(m, n)`` (outputs x inputs; float32 ``W`` with a decaying
spectrum over a noise floor, like a fine-tuning update; a synthetic input
second moment ``G`` (n x n, float64) with a decaying spectrum, a floor and a
few outlier features) it times, in one process:

* ``gram``: :class:`~blocklowrank.GramFactor` of ``G`` (validation, the
  PSD check and the Cholesky factor of ``G_delta``; once per input site);
* ``plain rand``: ``approximate(W, method="global", rank=r, svd_solver="randomized")``;
* ``total``: the total energy ``tr(W G W^T)`` alone (``m n^2``, through the factor);
* ``metric randomized (formed)``: ``fit_global(W, r, gram, svd_solver="randomized")``:
  ``W L`` formed by chunks (its energy is the total), then the engine's randomized SVD;
* ``metric randomized (operator)``: the same with ``sketch="operator"``: products only,
  the total from a separate pass;
* ``metric auto (...)``: the same with ``svd_solver="auto"`` (certified, else exact);
* ``metric exact``: ``fit_global(W, r, gram, svd_solver="full")``;
* ``approximate(input_gram=) auto``: the public entry (adds the Frobenius ``error``
  from the factors, ``m n r``);
* ``stand-in``: the straightforward implementation (SVD-LLM's whitening), NumPy only:
  ``L = cholesky(G)`` per layer (float64), ``S = W L`` and a full
  ``np.linalg.svd(S)`` in float32, factors ``U_r S_r`` and ``V_r^T L^{-1}`` -- a torch-free
  stand-in for "full SVD of W L".

Each keeps its fastest of ``--repeats`` runs (noise from other work only adds
time); the header gives the BLAS in use and the load average. Results agree:
the metric fits' output errors are printed beside the stand-in's.

Usage::

    PYTHONPATH=. python benchmarks/bench_metric.py [--shapes 4096x4096 4096x11008] [--rank 64]
        [--repeats 1] [--skip-exact] [--skip-global] [--blocks K --block-rank r] [--iterative]
        [--gram 4096 11008]

``--blocks K`` also times the block structures on the first shape: the plain
engine fit (exact SVDs), the metric diagonal fit (one exact step), the metric
K x K fit (block-coordinate descent with the default ``tol``, and 8 sweeps to
show what each gains), each with the exact and the "auto" block solver, the
metric spectra used for allocation and a budget fit. ``--iterative`` times the
hybrid and shared-basis fits in the metric against their plain fits.
``--gram N [N ...]`` times a :class:`~blocklowrank.GramFactor` of side N (with and
without damping: the PSD check) and reports the memory it keeps.
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc

import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_info

from blocklowrank import GramFactor, approximate, block_spectra, get_structure, output_error
from blocklowrank._metric import fit_global
from blocklowrank._metric._objective import _data_energy, prepare


def synthetic(m, n, seed=0, rank=256, n_outliers=4):
    """``W`` (m, n) float32 and ``G`` (n, n) float64 as described in the module docstring."""
    rng = np.random.default_rng(seed)
    decay = (1.0 + np.arange(rank)) ** -1.0
    W = (rng.standard_normal((m, rank)).astype(np.float32) * decay.astype(np.float32)) @ rng.standard_normal(
        (rank, n)
    ).astype(np.float32)
    W += np.float32(0.02) * rng.standard_normal((m, n)).astype(np.float32)
    p = 512
    C = rng.standard_normal((n, p)) * (1.0 + np.arange(p)) ** -0.75
    G = C @ C.T / p + 1e-3 * np.eye(n)
    out = rng.choice(n, n_outliers, replace=False)
    G[out, out] += 50.0 * np.mean(np.diag(G))
    return W, G


def stand_in(W, G, r):
    """Whitened SVD, straightforwardly: the output error of its rank-r fit (for the comparison)."""
    L = np.linalg.cholesky(G)
    S = W @ L.astype(np.float32)
    U, s, Vt = np.linalg.svd(S, full_matrices=False)
    B = U[:, :r] * s[:r]
    A = np.linalg.solve(L.T.astype(np.float32), Vt[:r].T).T  # V_r^T L^{-1}
    del B, A
    s2 = s.astype(np.float64) ** 2
    return float(np.sqrt(s2[r:].sum() / s2.sum()))


def best_of(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        time.sleep(0.2)
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def run(m, n, r, repeats, skip_exact):
    W, G = synthetic(m, n)
    print(f"\nlayer {m} x {n} (float32 W), G {n} x {n} (float64), rank {r}")
    rows = []
    for delta in (0.01, 0.0):
        t, gram = best_of(lambda d=delta: GramFactor(G, n, damping=d), repeats)
        rows.append((f"gram (delta={delta}, {gram.kind})", t, None))
    gram = GramFactor(G, n, damping=0.01)
    t, res = best_of(lambda: approximate(W, method="global", rank=r, svd_solver="randomized", random_state=0), repeats)
    rows.append(("plain rand", t, f"error {res.error:.5f}"))
    p = prepare(W, gram)
    t, _ = best_of(lambda: _data_energy(p.W, p.G, p.H), repeats)
    rows.append(("total (tr W G W^T)", t, None))
    runs = [(s, k) for s in ("randomized", "auto") for k in ("formed", "operator")]
    for solver, sketch in runs + ([] if skip_exact else [("full", "formed")]):
        t, res = best_of(
            lambda s=solver, k=sketch: fit_global(W, r, gram, svd_solver=s, random_state=0, sketch=k), repeats
        )
        damped = np.sqrt(res.objective / res.total)
        note = f"damped error {damped:.5f}, output_error {res.output_error:.5f} ({res.svd_solver})"
        rows.append((f"metric {solver}" + ("" if solver == "full" else f" ({sketch})"), t, note))
    t, res = best_of(
        lambda: approximate(W, method="global", rank=r, input_gram=gram, svd_solver="auto", random_state=0), repeats
    )
    rows.append(("approximate(input_gram=) auto", t, f"output_error {res.output_error:.5f}, error {res.error:.5f}"))
    if not skip_exact:
        t, err = best_of(lambda: stand_in(W, G + 0.01 * np.mean(np.diag(G)) * np.eye(n), r), repeats)
        rows.append(("stand-in (chol + W L + full SVD)", t, f"damped error {err:.5f}"))
    base = rows[2][1]
    for name, t, note in rows:
        print(f"  {name:34s} {t:9.2f} s  {t / base:7.2f} x plain rand  {note or ''}")


def run_blocks(m, n, K, r, repeats):
    """Block structures: the plain engine fit against the metric fits (diagonal: one exact step;
    K x K: block-coordinate descent with the default tol, and 8 sweeps to see what each gains),
    the spectra and a budget fit, hybrid and shared basis (the iterative structures)."""
    W, G = synthetic(m, n)
    gram = GramFactor(G, n, damping=0.01)
    print(f"\nblocks: layer {m} x {n}, K = {K}, block rank {r}")
    rows = []
    for method in ("diagonal", "block"):
        lay = get_structure(method).layout((m, n), K).with_ranks(r)
        t, res = best_of(lambda: approximate(W, lay, svd_solver="full"), repeats)
        plain_out = output_error(W, res.reconstruction, gram)
        rows.append((f"plain {method} (full)", t, f"error {res.error:.5f}, output_error {plain_out:.5f}"))
        for solver in ("full", "auto"):
            t, res = best_of(lambda s=solver: approximate(W, lay, input_gram=gram, svd_solver=s), repeats)
            rows.append((f"metric {method} ({solver})", t, _how(res)))
        if method == "block":
            t, res = best_of(lambda: approximate(W, lay, input_gram=gram, svd_solver="full", max_iter=9, tol=0), 1)
            rows.append(("metric block, 8 sweeps (full)", t, _how(res)))
        t, sp = best_of(lambda: block_spectra(W, lay, input_gram=gram), repeats)
        rows.append((f"metric spectra {method}", t, f"exact={sp.exact}"))
        t, res = best_of(lambda: approximate(W, lay.with_ranks(0), budget=lay.n_params, input_gram=gram), repeats)
        rows.append(
            (f"metric {method} budget={lay.n_params}", t, _how(res) + f", exact_allocation={res.exact_allocation}")
        )
    for name, t, note in rows:
        print(f"  {name:34s} {t:9.2f} s  {note}")


def _how(res):
    out = f"output_error {res.output_error:.5f}"
    if res.error_trace is not None:
        out += f", {res.n_iter} passes ({res.stop_reason}), trace {np.round(res.error_trace, 5)}"
    return out


def run_iterative(m, n, K, r, repeats):
    """Hybrid and shared basis (BLAST) in the metric against their plain fits (max_iter 20)."""
    W, G = synthetic(m, n)
    gram = GramFactor(G, n, damping=0.01)
    print(f"\niterative structures: layer {m} x {n}, K = {K}, block rank {r}, max_iter 20")
    for method, kw in (("hybrid", dict(rank=r, global_rank=r)), ("shared_basis", dict(rank=r * K))):
        t, res = best_of(lambda: approximate(W, method=method, n_blocks=K, max_iter=20, **kw), repeats)
        print(f"  plain {method:27s} {t:9.2f} s  output_error {output_error(W, res.reconstruction, gram):.5f}")
        t, res = best_of(lambda: approximate(W, method=method, n_blocks=K, max_iter=20, input_gram=gram, **kw), repeats)
        print(f"  metric {method:26s} {t:9.2f} s  {_how(res)}")


def run_gram(n, repeats):
    """A GramFactor of side n: construction with and without damping (the PSD check is the extra
    Cholesky of the damped case), the memory it keeps, and after a float32 product."""
    _, G = synthetic(8, n)
    print(f"\nGramFactor, n = {n} (G itself: {G.nbytes / 2**20:.0f} MiB float64)")
    for delta in (0.0, 0.01):
        tracemalloc.start()
        t, gram = best_of(lambda d=delta: GramFactor(G, n, damping=d), repeats)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        held = gram.nbytes
        gram.rmul_factor(np.ones((4, n), np.float32))
        print(
            f"  damping {delta:<5}: {t:7.2f} s ({gram.kind}); keeps {held / 2**20:7.0f} MiB, "
            f"{gram.nbytes / 2**20:7.0f} MiB after a float32 product; peak while building {peak / 2**20:7.0f} MiB"
        )
    t, _ = best_of(lambda: scipy.linalg.cholesky(G, lower=True, check_finite=False), repeats)
    print(f"  one Cholesky of G (scipy, for scale): {t:7.2f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008"])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--skip-exact", action="store_true")
    ap.add_argument("--skip-global", action="store_true", help="skip the global routes (the other parts only)")
    ap.add_argument("--blocks", type=int, default=0, help="also time block structures with K blocks (first shape)")
    ap.add_argument("--block-rank", type=int, default=16)
    ap.add_argument("--iterative", action="store_true", help="also time hybrid and shared basis (first shape)")
    ap.add_argument("--gram", type=int, nargs="*", default=[], help="time and measure GramFactor at these sides")
    args = ap.parse_args()
    blas = "; ".join(f"{i['internal_api']} {i.get('version')} {i['num_threads']} threads" for i in threadpool_info())
    print(f"BLAS: {blas}; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    print(
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '(unset)')}; load average at start: {os.getloadavg()}"
    )
    for shape in args.shapes if not args.skip_global else ():
        m, n = (int(v) for v in shape.split("x"))
        run(m, n, args.rank, args.repeats, args.skip_exact)
    m, n = (int(v) for v in args.shapes[0].split("x"))
    if args.blocks:
        run_blocks(m, n, args.blocks, args.block_rank, args.repeats)
    if args.iterative:
        run_iterative(m, n, max(args.blocks, 2), args.block_rank, args.repeats)
    for side in args.gram:
        run_gram(side, args.repeats)
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()

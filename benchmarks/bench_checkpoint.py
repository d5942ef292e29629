#!/usr/bin/env python
"""End-to-end LoRA extraction from a checkpoint pair: ours against the usual way.

A synthetic base/fine-tuned pair shaped like decoder layers of a 7B Llama
(hidden 4096, MLP 11008; q, k, v, o 4096 x 4096, gate and up 11008 x 4096,
down 4096 x 11008) is written in BF16 with :func:`blocklowrank.checkpoints.save_file`.
Each ΔW is a decaying spectrum (``exp(-i / 8)`` over 64 random directions,
entries of about 1e-3) on top of weights of scale 0.02, so the BF16 rounding of
both checkpoints adds a flat noise floor to ΔW, as in real fine-tunes.

Each side runs as its own subprocess under ``/usr/bin/time -v`` (wall time and
peak resident memory), with the same number of threads:

* ``--side ours``: :func:`~blocklowrank.checkpoints.iter_deltas` (read chunk by
  chunk, one layer at a time), ``approximate(dW, method="global", rank=16,
  svd_solver="auto")`` and :func:`~blocklowrank.checkpoints.save_file` of the
  factors. ``--structure block4`` fits 4 x 4 blocks of rank 4 instead (the
  same parameter count as LoRA rank 16). The library never imports torch.
* ``--side baseline``: what extraction tools do today (mergekit's
  ``extract-lora``): ``safetensors.torch.load_file`` of both checkpoints, a
  float32 ``torch.linalg.svd(dW, full_matrices=False)`` of every layer, then
  truncation to rank 16 and ``safetensors.torch.save_file``.
* ``--side read``: the floor: read and decode every BF16 tensor of both
  checkpoints and form ΔW, nothing else.

Usage (torch 2.13.0 CPU in the interpreter that runs the baseline)::

    /work/venv-bench/bin/python benchmarks/bench_checkpoint.py --layers 1 --out result.md

Nothing is asserted; the targets section prints PASS/MISS with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

HIDDEN, MLP = 4096, 11008
SHAPES = {  # name -> (out, in), as in a Llama decoder layer
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (MLP, HIDDEN),
    "mlp.up_proj": (MLP, HIDDEN),
    "mlp.down_proj": (HIDDEN, MLP),
}
RANK, MODEL_LAYERS = 16, 32


def layer_names(n_layers):
    return [f"model.layers.{i}.{mod}.weight" for i in range(n_layers) for mod in SHAPES]


# ---------------------------------------------------------------------------- data
def make_pair(folder, n_layers, seed=0):
    """Write ``base.safetensors`` and ``tuned.safetensors`` (BF16) into ``folder``."""
    from blocklowrank.checkpoints import save_file

    rng = np.random.default_rng(seed)
    base, tuned = {}, {}
    for name in layer_names(n_layers):
        m, n = SHAPES[name.split(".", 3)[3].rsplit(".", 1)[0]]
        W = rng.standard_normal((m, n), dtype=np.float32)
        W *= 0.02
        s = np.exp(-np.arange(64) / 8.0).astype(np.float32)
        s *= 1e-3 * np.sqrt(m * n) / np.linalg.norm(s)  # entries of about 1e-3
        U = rng.standard_normal((m, 64), dtype=np.float32) / np.float32(np.sqrt(m))
        V = rng.standard_normal((64, n), dtype=np.float32) / np.float32(np.sqrt(n))
        base[name], tuned[name] = W, W + (U * s) @ V
    save_file(os.path.join(folder, "base.safetensors"), base, dtypes="BF16")
    save_file(os.path.join(folder, "tuned.safetensors"), tuned, dtypes="BF16")


# ---------------------------------------------------------------------------- sides
def stream(folder):
    """``(pair, ΔW)`` one layer at a time, both checkpoints open throughout (the
    reader keeps no file page resident, so nothing accumulates)."""
    from blocklowrank.checkpoints import iter_deltas, open_checkpoint, pair_layers

    paths = [os.path.join(folder, f) for f in ("base.safetensors", "tuned.safetensors")]
    with open_checkpoint(paths[0]) as base, open_checkpoint(paths[1]) as tuned:
        yield from iter_deltas(base, tuned, pair_layers(base, tuned))


def side_ours(folder, structure, out):
    from blocklowrank import approximate
    from blocklowrank.checkpoints import save_file

    kw = dict(method="global", rank=RANK) if structure == "global" else dict(method="block", n_blocks=4, rank=RANK // 4)
    t = {"read": 0.0, "fit": 0.0, "write": 0.0}
    layers, factors = {}, {}
    t0 = time.perf_counter()
    for pair, dW in stream(folder):
        t1 = time.perf_counter()
        t["read"] += t1 - t0
        res = approximate(dW, svd_solver="auto", random_state=0, **kw)
        t0 = time.perf_counter()
        t["fit"] += t0 - t1
        for i, j in res.factors:  # the active blocks: (B_ij, A_ij)
            factors[f"{pair.name}.{i}.{j}.B"], factors[f"{pair.name}.{i}.{j}.A"] = res.factors[(i, j)]
        layers[pair.name] = dict(
            captured=float(res.total_energy - res.discarded_energy),
            total=float(res.total_energy),
            solver=sorted(set(res.svd_solver.values())),
        )
        del dW, res  # as iter_deltas advises: one layer in memory while the next is read
    t1 = time.perf_counter()
    save_file(os.path.join(out, "ours.safetensors"), factors)
    t["write"] = time.perf_counter() - t1
    return dict(layers=layers, phases=t)


def side_baseline(folder, threads, out):
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(threads)
    t = {}
    t0 = time.perf_counter()
    base = load_file(os.path.join(folder, "base.safetensors"))
    tuned = load_file(os.path.join(folder, "tuned.safetensors"))
    t["read"], t["fit"] = time.perf_counter() - t0, 0.0
    layers, factors = {}, {}
    for name in base:
        t1 = time.perf_counter()
        dW = tuned[name].float() - base[name].float()
        U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
        factors[name + ".lora_B"] = (U[:, :RANK] * S[:RANK]).contiguous()
        factors[name + ".lora_A"] = Vh[:RANK].contiguous()
        S64 = S.double()
        layers[name] = dict(
            captured=float((S64[:RANK] ** 2).sum()), total=float((S64**2).sum()), solver=["torch.linalg.svd"]
        )
        del dW, U, S, Vh
        t["fit"] += time.perf_counter() - t1
    t1 = time.perf_counter()
    save_file(factors, os.path.join(out, "baseline.safetensors"))
    t["write"] = time.perf_counter() - t1
    return dict(layers=layers, phases=t)


def side_read(folder):
    t0 = time.perf_counter()
    energy = 0.0
    for _, d in stream(folder):
        energy += float(np.einsum("ij,ij->", d, d, dtype=np.float64))
        del d
    return dict(layers={}, phases={"read": time.perf_counter() - t0}, energy=energy)


def run_side(args):
    out = args.workdir
    if args.side == "ours":
        res = side_ours(args.workdir, args.structure, out)
    elif args.side == "baseline":
        res = side_baseline(args.workdir, args.threads, out)
    else:
        res = side_read(args.workdir)
    print("RESULT " + json.dumps(res))


def captured_energies(folder):
    """``{name: (ours, baseline)}``: energy of ΔW's projection onto each side's LoRA ``B``
    columns, in float64 from the written factors (the same measure for both sides:
    each side's approximation is that projection, ``U_k U_k^T ΔW``)."""
    from blocklowrank.checkpoints import open_checkpoint

    out = {}
    with (
        open_checkpoint(os.path.join(folder, "ours.safetensors")) as ours,
        open_checkpoint(os.path.join(folder, "baseline.safetensors")) as base,
    ):
        for pair, dW in stream(folder):
            dW = dW.astype(np.float64)
            out[pair.name] = tuple(
                float(np.linalg.norm(np.linalg.qr(ck.get(key).astype(np.float64))[0].T @ dW) ** 2)
                for ck, key in ((ours, f"{pair.name}.0.0.B"), (base, f"{pair.name}.lora_B"))
            )
    return out


# ---------------------------------------------------------------------------- report
def report(lines, runs, n_layers, rank, model_layers, energies):
    """Markdown: the header, one row per side, the ratios, the extrapolation and the targets."""
    out = (
        ["```"]
        + lines
        + [
            "```",
            "",
            "| side | wall s | peak RSS MiB | read+ΔW s | fit s | write s | solver |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
    )
    for key, (res, wall, rss) in runs.items():
        ph = res["phases"]
        solvers = sorted({s for lay in res["layers"].values() for s in lay["solver"]}) or ["-"]
        out.append(
            f"| {key} | {wall:.1f} | {rss:.0f} | {ph.get('read', 0):.1f} | {ph.get('fit', 0):.1f} | "
            f"{ph.get('write', 0):.2f} | {', '.join(solvers)} |"
        )
    ours, base = runs["ours"], runs["baseline"]
    deficit = max(1 - a / b for a, b in energies.values())
    speed, mem = base[1] / ours[1], ours[2] / base[2]
    floor = runs["read"][1]

    def whole_model(run):  # fixed start-up once, the per-layer phases scaled to every layer
        work = sum(run[0]["phases"].values())
        return (run[1] - work) + work * model_layers / n_layers

    ok = lambda c: "PASS" if c else "MISS"  # noqa: E731
    out += [
        "",
        f"- speed-up end to end (baseline wall / ours wall): **{speed:.1f}x** ({ok(speed >= 10)}: target >= 10x)",
        f"- captured-energy deficit of ours vs the exact truncation (worst layer, "
        f"`1 - ||P_ours dW||^2 / ||P_torch dW||^2` in float64): **{deficit:.2e}** "
        f"({ok(deficit <= 1e-3)}: target <= 1e-3)",
        f"- peak memory ours / baseline: **{mem:.2f}** ({ok(mem <= 0.5)}: target <= 0.5)",
        f"- floor (read + decode both BF16 checkpoints and form every ΔW): {floor:.1f} s; "
        f"ours is {ours[1] / floor:.2f}x the floor, the baseline {base[1] / floor:.2f}x",
        f"- extrapolated to {model_layers} layers (7 linear layers each): ours LoRA r={rank} "
        f"{whole_model(ours) / 60:.1f} min, ours 4x4 blocks r={rank // 4} "
        f"{whole_model(runs['ours 4x4']) / 60:.1f} min, baseline {whole_model(base) / 60:.1f} min, "
        f"read floor {whole_model(runs['read']) / 60:.1f} min",
        f"- every linear layer of a 7B model in under 5 minutes: LoRA {ok(whole_model(ours) < 300)}, "
        f"4x4 blocks {ok(whole_model(runs['ours 4x4']) < 300)}",
    ]
    return "\n".join(out)


# ---------------------------------------------------------------------------- driver
def timed_subprocess(argv, env):
    """Run ``argv`` under ``/usr/bin/time -v``: (parsed RESULT, wall s, peak RSS MiB)."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v"] + argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{argv} failed:\n{p.stdout}\n{p.stderr}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[7:]), wall, rss


def emit(text, out):
    """Print the report, and write it to ``out`` when given."""
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def side_env(threads):
    """The environment of a side's subprocess: ``threads`` BLAS/OpenMP threads, this checkout first on the path."""
    return dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        OPENBLAS_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONPATH=os.pathsep.join(
            [os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)]
            + [p for p in [os.environ.get("PYTHONPATH")] if p]
        ),
    )


def header(args):
    import scipy.linalg  # noqa: F401  (its BLAS shows up in the header)
    from threadpoolctl import threadpool_info

    import blocklowrank  # noqa: F401

    lines = [
        f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, threads {args.threads}, load average {os.getloadavg()[0]:.2f}"
    ]
    for i in threadpool_info():
        lines.append(
            f"  {i['internal_api']} {i.get('version')} ({i.get('architecture')}), "
            f"{i['num_threads']} threads: {os.path.basename(i['filepath'])}"
        )
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", choices=("ours", "baseline", "read"))
    ap.add_argument("--structure", choices=("global", "block4"), default="global")
    ap.add_argument("--layers", type=int, default=1, help="decoder layers in the synthetic pair")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", help="folder holding (or to receive) the checkpoint pair")
    ap.add_argument("--python", default=sys.executable, help="interpreter of the baseline (torch)")
    ap.add_argument("--out", help="also write the markdown report here")
    args = ap.parse_args(argv)
    if args.side:
        return run_side(args)
    lines = header(args)
    env = side_env(args.threads)
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        t0 = time.perf_counter()
        make_pair(folder, args.layers)
        lines.append(
            f"checkpoint pair: {args.layers} layer(s), written in {time.perf_counter() - t0:.1f} s, "
            f"{sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**30:.2f} GiB"
        )
        me = [args.python, os.path.abspath(__file__), "--workdir", folder, "--threads", str(args.threads)]
        runs = {}
        for key, extra in (
            ("read", ["--side", "read"]),
            ("ours", ["--side", "ours"]),
            ("baseline", ["--side", "baseline"]),
            ("ours 4x4", ["--side", "ours", "--structure", "block4"]),
        ):
            runs[key] = timed_subprocess(me + extra, env)
            print(f"{key}: {runs[key][1]:.1f} s, {runs[key][2]:.0f} MiB", flush=True)
            if key == "baseline":
                energies = captured_energies(folder)
        lines.append(f"load average at the end {os.getloadavg()[0]:.2f}")
    emit(report(lines, runs, args.layers, RANK, MODEL_LAYERS, energies), args.out)


if __name__ == "__main__":
    sys.exit(main())

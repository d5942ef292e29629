"""Adapter training speed: one epoch of blocklowrank's NumPy trainer vs PyTorch.

Usage (from the repository root)::

    python benchmarks/bench_adapters.py             # NumPy only (torch optional)
    /path/to/venv-with-torch/bin/python benchmarks/bench_adapters.py
    python benchmarks/bench_adapters.py --sweep     # also time the whole Figure 2 sweep
    python benchmarks/bench_adapters.py --parts     # where a training step's time goes

Both sides train the same model (784 -> 64 (ReLU) -> 5, first layer frozen,
structured adapter added before the ReLU, head trained) with Adam, the same
batch size (64 by default, the Figure 2 protocol's), float32, shuffled
minibatches, and the same number of threads (1 by default: ``--threads``).
The PyTorch side is a straightforward implementation: ``nn.Linear`` layers,
the adapter as reshape + einsum over stacked blocks (as PEFT's GraLoRA
forward), autograd and ``torch.optim.Adam``; it recomputes the frozen first
layer every step, which is what a plain PyTorch loop does. The NumPy side
caches that frozen pre-activation once per data set. Times are per epoch
(median of epochs 2..E, so one-off setup is excluded and printed apart).
Data: MNIST digits 5-9 if the blocklowrank cache is present, else random
data of the same shape (the speed does not depend on the values).
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

from blocklowrank.adapters import MLP, StructuredAdapter, train  # noqa: E402

CONFIGS = [
    ("LoRA r=8", "global", 1, 8),
    ("MELoRA N=4 r=8", "diagonal", 4, 8),
    ("Localized K=4 r=2", "block", 4, 2),
    ("Localized K=2 r=16", "block", 2, 16),
    ("Localized K=16 r=2", "block", 16, 2),
    ("Full fine-tuning", "full", None, None),
]


def load_data(n):
    try:
        from blocklowrank.datasets import load_mnist

        d = load_mnist()
        X = d.train_images.reshape(-1, 784)
        y = d.train_labels.astype(np.int64)
        keep = y >= 5
        X = X[keep][:n].astype(np.float32) / 255
        return X, y[keep][:n] - 5, "MNIST digits 5-9"
    except Exception:
        rng = np.random.default_rng(0)
        return rng.random((n, 784), dtype=np.float32), rng.integers(0, 5, n), "random (MNIST cache absent)"


def numpy_epoch(mlp, X, y, method, K, r, bs, epochs):
    if method == "full":
        res = train(mlp, X, y, mode="full", lr=1e-4, epochs=epochs, batch_size=bs, random_state=0)
    else:
        ad = StructuredAdapter.from_method(method, (64, 784), rank=r, n_blocks=K, random_state=0)
        res = train(mlp, X, y, adapter=ad, lr=1e-4, epochs=epochs, batch_size=bs, random_state=0)
    s = np.diff(np.r_[0.0, res.history.seconds])
    return float(np.median(s[1:])), float(s[0] - np.median(s[1:]))


def torch_epoch(mlp, X, y, method, K, r, bs, epochs):
    import torch
    from torch import nn

    torch.manual_seed(0)
    m, n = 64, 784

    class Adapter(nn.Module):
        def __init__(self):
            super().__init__()
            self.method = method
            if method == "global":
                self.A = nn.Parameter(torch.empty(r, n).uniform_(-1 / n**0.5, 1 / n**0.5))
                self.B = nn.Parameter(torch.zeros(m, r))
            elif method == "diagonal":
                w = n // K
                self.A = nn.Parameter(torch.empty(K, r, w).uniform_(-1 / w**0.5, 1 / w**0.5))
                self.B = nn.Parameter(torch.zeros(K, m // K, r))
            else:
                w = n // K
                self.A = nn.Parameter(torch.empty(K, K, r, w).uniform_(-1 / w**0.5, 1 / w**0.5))
                self.B = nn.Parameter(torch.zeros(K, K, m // K, r))

        def forward(self, x):
            if self.method == "global":
                return (x @ self.A.T) @ self.B.T
            xb = x.view(x.shape[0], K, n // K)
            if self.method == "diagonal":
                t = torch.einsum("bkw,krw->bkr", xb, self.A)
                return torch.einsum("bkr,khr->bkh", t, self.B).reshape(x.shape[0], m)
            t = torch.einsum("bjw,ijrw->bijr", xb, self.A)
            return torch.einsum("bijr,ijhr->bih", t, self.B).reshape(x.shape[0], m)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(n, m)
            self.fc2 = nn.Linear(m, 5)
            with torch.no_grad():
                self.fc1.weight.copy_(torch.from_numpy(mlp.W1))
                self.fc1.bias.copy_(torch.from_numpy(mlp.b1))
                self.fc2.weight.copy_(torch.from_numpy(mlp.W2))
                self.fc2.bias.copy_(torch.from_numpy(mlp.b2))
            self.adapter = Adapter() if method != "full" else None
            if self.adapter is not None:
                self.fc1.requires_grad_(False)

        def forward(self, x):
            h = self.fc1(x)
            if self.adapter is not None:
                h = h + self.adapter(x)
            return torch.log_softmax(self.fc2(torch.relu(h)), dim=1)

    net = Net()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(Xt.shape[0], generator=g)
        for s in range(0, Xt.shape[0], bs):
            idx = perm[s : s + bs]
            loss = torch.nn.functional.nll_loss(net(Xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def blas_header():
    info = threadpool_info()
    blas = [
        f"{i.get('internal_api')} {i.get('version')} ({i.get('threading_layer', '')}, "
        f"kernel {i.get('architecture', '?')}, {i.get('num_threads')} threads)"
        for i in info
        if i.get("user_api") == "blas"
    ]
    return "; ".join(blas) or "unknown"


PART_CONFIGS = [
    ("LoRA r=2", "global", 1, 2),
    ("MELoRA N=8 r=2", "diagonal", 8, 2),
    ("LoRA r=32", "global", 1, 32),
    ("Localized K=16 r=2", "block", 16, 2),
]


def step_parts(X, y, bs, repeats=400):
    """Microseconds per part of one adapter training step (batch ``bs``), each part timed
    alone on the same minibatch (min over 5 rounds of ``repeats`` calls): what the step
    costs, and how much of it is the adapter's products and Adam (real work) rather
    than the fixed per-call cost of the other small NumPy operations."""
    import timeit

    from blocklowrank.adapters import _training as T
    from blocklowrank.adapters import nll_and_grad

    mlp = MLP.init((784, 64, 5), random_state=0)
    rng = np.random.default_rng(0)

    def tm(f):
        return min(timeit.repeat(f, number=repeats, repeat=5)) / repeats * 1e6

    rows = []
    for name, method, K, r in PART_CONFIGS:
        ad = StructuredAdapter.from_method(method, (64, 784), rank=r, n_blocks=K, random_state=0)
        model = T._Model(mlp, ad, "adapter", True, np.float32)
        data = T._Data(model, X, y)
        opt = T.make_optimizer("adam", model.store.theta, model.store.grad, 1e-4)
        idx = rng.permutation(X.shape[0])[:bs]
        Xb, yb, Pb = X.take(idx, axis=0), y.take(idx), data.P.take(idx, axis=0)
        H = Pb.copy()
        cache = ad.forward(Xb, H)
        np.maximum(H, 0, out=H)
        Z = H @ model.W2.T + model.b2
        dZ = nll_and_grad(Z.copy(), yb)[2]
        dH = (dZ @ model.W2) * (H > 0)
        g = model.store.grads

        def head():
            Z = H @ model.W2.T
            Z += model.b2
            np.matmul(dZ.T, H, out=g["W2"])
            dZ.sum(axis=0, out=g["b2"])
            d = dZ @ model.W2
            d *= H > 0
            return Z, d

        def step():
            T._loss_grad(model, data, idx)
            opt.step()

        parts = {
            "gather": tm(lambda: (X.take(idx, axis=0), y.take(idx), data.P.take(idx, axis=0))),
            "adapter fwd": tm(lambda: ad.forward(Xb, Pb.copy())),
            "adapter bwd": tm(lambda: ad.backward(dH, cache, g)),
            "adam": tm(opt.step),
            "head+relu": tm(head) + tm(lambda: np.maximum(H, 0, out=H)),
            "nll": tm(lambda: nll_and_grad(Z.copy(), yb)),
        }
        total = tm(step)
        real = parts["adapter fwd"] + parts["adapter bwd"] + parts["adam"]
        rows.append((name, model.store.theta.size, total, parts, real))
    return rows


def time_sweep(args):
    """Time the whole Figure 2 sweep: all configurations x 3 lrs, one seed, default epochs."""
    import tempfile

    from blocklowrank.experiments.figure2 import DEFAULT_EPOCHS, figure2_configs, run_figure2

    kept, skipped = figure2_configs()
    n_runs = 3 * (len(kept) + 1)
    out = args.sweep_out or tempfile.mkdtemp(prefix="bench_fig2_")
    print(
        f"\nFigure 2 sweep: {len(kept)} adapter configurations + full FT, x 3 lrs, 1 seed "
        f"= {n_runs} runs of at most {DEFAULT_EPOCHS} epochs (early stopping), "
        f"n_jobs={args.n_jobs}, out={out}"
    )
    t0 = time.perf_counter()
    res = run_figure2(out, seeds=1, n_jobs=args.n_jobs, progress=not args.quiet)
    dt = time.perf_counter() - t0
    ep = [len(r["history"]["epoch"]) for r in res.runs if r.get("status") == "ok"]
    print(
        f"whole sweep: {dt:.1f} s ({dt / 60:.2f} min) wall for {len(res.runs)} runs, "
        f"{res.settings['cpu_seconds']:.0f} CPU-s in the runs, {sum(ep)} epochs in all, longest run "
        f"{max(ep)} epochs (includes pretraining; target < 5 min)"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4, help="epochs timed per config (median of 2..E)")
    p.add_argument("--n", type=int, default=26_500, help="training samples (the 5-9 training split)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sweep", action="store_true", help="also time the whole Figure 2 sweep")
    p.add_argument("--sweep-out", default=None)
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--parts", action="store_true", help="also time the parts of one training step")
    args = p.parse_args()

    X, y, src = load_data(args.n)
    mlp = MLP.init((784, 64, 5), random_state=0)
    try:
        import torch

        torch.set_num_threads(args.threads)
        tv = torch.__version__
    except ImportError:
        torch, tv = None, "not installed"
    with threadpool_limits(args.threads):
        print(
            f"python {platform.python_version()}, numpy {np.__version__}, torch {tv}, "
            f"{os.cpu_count()} cores, threads {args.threads}"
        )
        print(f"BLAS: {blas_header()}; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
        print(f"data: {src}, {X.shape[0]} samples, batch {args.batch_size}, float32, Adam\n")
        print(f"{'config':<22}{'numpy ms/epoch':>16}{'torch ms/epoch':>16}{'speed-up':>10}{'numpy setup ms':>16}")
        for name, method, K, r in CONFIGS:
            tn, setup = numpy_epoch(mlp, X, y, method, K, r, args.batch_size, args.epochs)
            if torch is not None:
                tt = torch_epoch(mlp, X, y, method, K, r, args.batch_size, args.epochs)
                ratio = f"{tt / tn:9.2f}x"
                tts = f"{1000 * tt:16.1f}"
            else:
                tts, ratio = f"{'-':>16}", f"{'-':>10}"
            print(f"{name:<22}{1000 * tn:16.1f}{tts}{ratio}{1000 * setup:16.1f}", flush=True)
    if args.parts:
        with threadpool_limits(args.threads):
            rows = step_parts(X, y, args.batch_size)
        names = list(rows[0][3])
        print(f"\nOne training step, batch {args.batch_size}, microseconds (each part timed alone):")
        print(f"{'config':<22}{'params':>8}{'step':>8}" + "".join(f"{n:>13}" for n in names) + f"{'products+adam':>15}")
        for name, n_par, total, parts, real in rows:
            print(
                f"{name:<22}{n_par:>8}{total:>8.0f}"
                + "".join(f"{parts[n]:>13.1f}" for n in names)
                + f"{real:>9.0f} ({100 * real / total:.0f}%)"
            )
    if args.sweep:
        time_sweep(args)


if __name__ == "__main__":
    main()

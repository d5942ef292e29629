"""The ``blocklowrank`` command line (also ``python -m blocklowrank``).

(Over 600 lines: the options of six subcommands and a thin function for each; the command line is
to be redesigned as a whole by another issue, so it is not split piecemeal here.)

Subcommands
-----------
reproduce   the paper's experiments (Table I / Figure 1, the 10k-digit study, Figure 2) and the
            structures beyond the paper at matched budgets
approximate fit one structure to a matrix or image file
budget      configurations of each structure at a parameter budget
study       every layer of a checkpoint (or of its fine-tuning update) by every structure
extract     a PEFT adapter (LoRA / GraLoRA) fitted to the ΔW of a fine-tuned checkpoint
calibrate   a model's calibration statistics (input second moments per site) from texts or tokens
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ._extras import MissingExtraError, require
from ._io import atomic_write
from ._version import __version__

EXPERIMENTS = ("table1", "study", "structures", "figure2", "compress")  # quick ones first; compress after figure2


class CLIError(Exception):
    """An error reported as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump): ``blocklowrank CMD: error: ...``, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


def _jobs(text):
    v = _count(-(2**31), "--n-jobs")(text)
    if v == 0:
        raise argparse.ArgumentTypeError("--n-jobs must be a non-zero integer (-1: every core)")
    return v


def _warn_unused(args, used, names):
    """One warning line per option the user typed that this command does not use."""
    for name in names:
        if getattr(args, name) is not None and name not in used:
            flag = "--" + name.replace("_", "-")
            print(f"blocklowrank: warning: {flag} is not used here; ignored", file=sys.stderr)


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
        return _parse_shape(text) if "x" in text.lower() else int(text)
    except (CLIError, ValueError):
        raise argparse.ArgumentTypeError(f"--n-blocks must be K or RxC, got {text!r}") from None


# ----------------------------------------------------------------------------- files
def load_matrix(path, key=None):
    """Read a matrix from .npy, .npz, .csv/.txt or an image file (as grayscale)."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if key is not None and suffix != ".npz":
        print(f"blocklowrank: warning: --key is for .npz files only; ignored for {path.name}", file=sys.stderr)
    if suffix in (".npy", ".npz"):
        X = _load_numpy(path, key)
    elif suffix in (".csv", ".txt", ".tsv"):
        delim = "\t" if suffix == ".tsv" else ("," if suffix == ".csv" else None)
        try:
            X = np.loadtxt(path, delimiter=delim, ndmin=2)
        except ValueError as exc:
            raise CLIError(f"could not read {path} as numbers: {exc}") from None
    elif suffix in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"):
        mpimg = require("matplotlib.image")
        try:
            img = mpimg.imread(path)
        except Exception as exc:  # Pillow/matplotlib errors vary
            raise CLIError(f"could not read image {path}: {exc}") from None
        img = np.asarray(img, dtype=np.float64)
        if img.ndim == 3:
            rgb = img[..., :3]
            img = rgb @ np.array([0.299, 0.587, 0.114]) if rgb.shape[-1] == 3 else rgb[..., 0]
        X = img
    else:
        raise CLIError(f"unsupported file type {suffix!r}: use .npy, .npz, .csv, .txt or an image")
    X = np.asarray(X)
    if X.ndim != 2:
        raise CLIError(f"{path} holds an array of shape {X.shape}; a 2-D matrix is needed")
    return X


def _load_numpy(path, key):
    """An array from .npy (memory-mapped first: a forged header cannot allocate) or .npz."""
    import zipfile

    try:
        if path.suffix.lower() == ".npy":
            return np.array(np.load(path, mmap_mode="r", allow_pickle=False))
        with np.load(path, allow_pickle=False) as z:
            names = list(z.keys())
            if not names:
                raise CLIError(f"{path} holds no arrays")
            name = key or names[0]
            if name not in z:
                raise CLIError(f"{path} has no array {name!r}; it has {names}")
            info = z.zip.getinfo(name + ".npy")
            if info.file_size > 4 * path.stat().st_size + 2**26:  # far beyond what the archive can hold
                raise CLIError(f"{path}: array {name!r} claims {info.file_size} bytes; the file is damaged or forged")
            return z[name]
    except CLIError:
        raise
    except (ValueError, OSError, EOFError, MemoryError, KeyError, zipfile.BadZipFile) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CLIError(f"{path.name} is not a readable {path.suffix} file ({first[:120]})") from None


def save_matrix(path, X):
    """Write ``X`` to a .npy, .npz (``reconstruction``), .csv/.txt or .png (grayscale) file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writers = {
        ".npy": lambda f: np.save(f, X),
        ".npz": lambda f: np.savez_compressed(f, reconstruction=X),
        ".csv": lambda f: np.savetxt(f, X, delimiter=","),
        ".txt": lambda f: np.savetxt(f, X, delimiter=" "),
        ".png": lambda f: require("matplotlib.image").imsave(f, X, cmap="gray", format="png"),
    }
    write = writers.get(path.suffix.lower())
    if write is None:
        raise CLIError(f"unsupported output type {path.suffix.lower()!r}: use .npy, .npz, .csv, .txt or .png")
    with atomic_write(path) as f:
        write(f)
    return path


# ----------------------------------------------------------------------------- commands
def cmd_approximate(args):
    from .structures import approximate, get_structure

    X = load_matrix(args.file, key=args.key)
    given = [n for n in ("rank", "budget", "max_error") if getattr(args, n) is not None]
    if len(given) != 1:
        raise CLIError("give exactly one of --rank, --budget and --max-error")
    kwargs = {given[0]: getattr(args, given[0])}
    fixed = get_structure(args.method).fixed_blocks
    if fixed is not None and args.n_blocks is not None:
        print(f"blocklowrank: warning: --n-blocks is ignored: {args.method} has {fixed} block", file=sys.stderr)
    if args.random_state is not None and args.svd_solver != "randomized":
        print("blocklowrank: warning: --random-state only seeds --svd-solver randomized; ignored", file=sys.stderr)
    n_blocks = fixed or (2 if args.n_blocks is None else args.n_blocks)
    res = approximate(
        X,
        method=args.method,
        n_blocks=n_blocks,
        svd_solver=args.svd_solver,
        random_state=0 if args.random_state is None else args.random_state,
        cap_rank=args.cap_rank,
        **kwargs,
    )
    lay = res.layout
    print(f"matrix      {X.shape[0]}x{X.shape[1]} from {args.file}")
    print(f"structure   {args.method}, {lay.n_blocks[0]}x{lay.n_blocks[1]} blocks")
    print(f"parameters  {res.n_params} (dense: {X.shape[0] * X.shape[1]})")
    print(f"error       {res.error:.6f} (relative Frobenius)")
    print("ranks")
    for row in lay.ranks:
        print("   " + " ".join(f"{int(r):3d}" for r in row))
    out = args.out or f"{Path(args.file).stem}_{args.method}.npy"
    path = save_matrix(out, res.reconstruction)
    print(f"wrote       {path}")
    return 0


def cmd_budget(args):
    from .budget import match_budget

    shape = _parse_shape(args.shape)
    print(f"configurations of a {shape[0]}x{shape[1]} matrix at budget {args.budget}", flush=True)
    records = match_budget(shape, args.budget, methods=tuple(args.methods))
    print(f"{'method':<10}{'n_blocks':>9}{'rank':>6}{'n_params':>10}  exact")
    for rec in records:
        r = dict(rec)
        nb = r["n_blocks"]
        nb = f"{nb[0]}x{nb[1]}" if isinstance(nb, (tuple, list)) else str(nb)
        flag = "yes" if r.get("exact", True) else "below"
        print(f"{r['method']:<10}{nb:>9}{str(r['rank']):>6}{r['n_params']:>10}  {flag}")
    return 0


def cmd_reproduce(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    which = EXPERIMENTS if args.what == "all" else (args.what,)
    used = ("seeds", "epochs", "n_jobs", "subset") if "figure2" in which else ()
    used = used or (("seeds", "n_jobs", "subset") if "compress" in which else ())
    _warn_unused(args, used, ("seeds", "epochs", "n_jobs", "subset"))
    written = []
    for name in which:
        if name == "table1":
            from .experiments.table1 import run_table1

            written += run_table1(out, progress=not args.quiet)
        elif name == "study":
            from .experiments.study import run_study

            written += run_study(out, progress=not args.quiet)
        elif name == "structures":
            from .experiments.structures import run_structures

            written += run_structures(out, progress=not args.quiet)
        elif name == "figure2":
            from .experiments.figure2 import DEFAULT_EPOCHS, plot_figure2, run_figure2

            res = run_figure2(
                out,
                seeds=3 if args.seeds is None else args.seeds,
                epochs=DEFAULT_EPOCHS if args.epochs is None else args.epochs,
                n_jobs=-1 if args.n_jobs is None else args.n_jobs,
                progress=not args.quiet,
                subset=args.subset,
            )
            plot_figure2(res, out / "figure2.png")
            written += [out / "sweep.csv", out / "figure2_summary.txt", out / "figure2.png"]
        elif name == "compress":
            from .experiments.compress import plot_compress, run_compress

            res = run_compress(
                out,
                seeds=3 if args.seeds is None else args.seeds,
                subset=args.subset,
                progress=not args.quiet,
                n_jobs=-1 if args.n_jobs is None else args.n_jobs,
            )
            plot_compress(res, out / "compress.png")
            written += [out / "compress.csv", out / "compress_summary.txt", out / "compress.png"]
    print("\nresults:")
    for p in written:
        print(f"  {p}")
    return 0


_REGEX_CHARS = set("*+?[](){}|^$\\")


def _target_modules(values):
    """``--target-modules``: 'all-linear', one regular expression, or module-name suffixes."""
    if len(values) == 1 and (values[0].lower() == "all-linear" or _REGEX_CHARS & set(values[0])):
        return values[0]
    return list(values)


def cmd_study(args):
    from .study import run_study

    budget = {
        "budget_rank": args.budget_rank or 16,
        "budget_fraction": args.budget_fraction,
        "total_budget": args.total_budget,
    }
    res = run_study(
        args.base,
        args.finetuned,
        out=args.out,
        structures=args.structures,
        target_modules=_target_modules(args.target_modules),
        n_blocks=args.n_blocks,
        n_jobs=args.n_jobs,
        progress=not args.quiet,
        svd_solver=args.svd_solver,
        fit_options=None if args.max_iter is None else {"max_iter": args.max_iter},
        orientation=args.orientation,
        **budget,
    )
    skipped = sum(1 for lay in res.layers if lay["skipped"])
    for lay in res.layers:
        if lay["skipped"]:
            print(f"skipped {lay['layer']}: {lay['skipped']}", file=sys.stderr)
    print(
        f"studied {len(res.layers) - skipped} layers ({skipped} skipped) with {len(res.settings['structures'])} "
        f"structures: {len(res)} configurations"
    )
    for row in res.model_wide:
        if row["allocation"] == "model-wide":
            unif = next(
                r
                for r in res.model_wide
                if r["allocation"] == "uniform"
                and (r["structure"], r["n_blocks"]) == (row["structure"], row["n_blocks"])
            )
            print(
                f"  {row['structure']:<10} K={row['n_blocks']:<3} model-wide error {row['error']:.4f} "
                f"vs uniform {unif['error']:.4f}"
            )
    print(f"wrote {args.out}/: layers.csv, model_wide.csv, summary.md, error_heatmap.png, error_vs_budget.png")
    return 0


def cmd_extract(args):
    from .extract import extract_adapter
    from .structures import get_structure

    fixed = get_structure(args.method).fixed_blocks
    if fixed is not None and args.n_blocks is not None:
        print(f"blocklowrank: warning: --n-blocks is ignored: {args.method} has {fixed} block", file=sys.stderr)
    report = extract_adapter(
        args.base,
        args.finetuned,
        args.out,
        method=args.method,
        n_blocks=fixed or (2 if args.n_blocks is None else args.n_blocks),
        rank=args.rank,
        budget_rank=args.budget_rank,
        total_budget=args.total_budget,
        target_modules=_target_modules(args.target_modules),
        peft_type=args.peft_type,
        svd_solver=args.svd_solver,
        overwrite=args.overwrite,
        orientation=args.orientation,
    )
    print(report.summary())
    return 0


def cmd_calibrate(args):
    from .calibration.collect import calibrate_folder

    names = ("texts", "tokens", "max_tokens", "max_length", "batch_size", "output_grams", "overwrite")
    options = {name: getattr(args, name) for name in names}
    modules = _target_modules(args.target_modules)
    stats = calibrate_folder(args.model, args.out, target_modules=modules, progress=not args.quiet, **options)
    print(f"wrote {args.out}: {stats!r}, {stats.info['tokens']:,} tokens of {stats.info['sequences']:,} sequences")
    return 0


def _reproduce_options(r):
    r.add_argument(
        "what",
        choices=("all",) + EXPERIMENTS,
        help="which part; 'all' runs everything, Figure 2's sweep included (about 25 min on 2 cores)",
    )
    r.add_argument("--out", default="results", help="output directory (default: results)")
    r.add_argument("--seeds", type=_count(1, "--seeds"), help="figure2, compress: seeds per configuration (default 3)")
    r.add_argument(
        "--epochs",
        type=_count(1, "--epochs"),
        help="figure2: most epochs per run; runs end earlier by early stopping (default 1000)",
    )
    r.add_argument(
        "--n-jobs",
        type=_jobs,
        help="figure2, compress: parallel runs via joblib, one BLAS thread each (default -1: every core)",
    )
    r.add_argument(
        "--subset",
        type=_count(10, "--subset"),
        help="figure2, compress: use only the first N (>= 10) images of each split (quick checks)",
    )
    r.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    r.set_defaults(func=cmd_reproduce)


def _approximate_options(a):
    from ._svd import SVD_SOLVERS
    from .structures import structure_names

    a.add_argument("file")
    a.add_argument("--method", choices=structure_names(spectral=True), default="block")
    a.add_argument("--n-blocks", type=_n_blocks, help="K or RxC (default 2; not for global)")
    g = a.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int, help="rank of every active block")
    g.add_argument("--budget", type=int, help="parameter budget (optimal per-block ranks)")
    g.add_argument("--max-error", type=float, help="largest relative error (fewest parameters)")
    a.add_argument("--svd-solver", choices=SVD_SOLVERS, default="auto")
    a.add_argument("--random-state", type=int, help="seed of --svd-solver randomized (default 0)")
    a.add_argument("--cap-rank", action="store_true", help="cap ranks at each block's smaller side")
    a.add_argument("--key", help="array name inside an .npz file")
    a.add_argument("--out", help="output file (.npy, .npz, .csv, .txt, .png); default FILE-stem_METHOD.npy")
    a.set_defaults(func=cmd_approximate)


def _budget_options(b):
    from .structures import structure_names

    b.add_argument("shape", help="matrix shape, e.g. 28x28")
    b.add_argument("budget", type=int)
    b.add_argument("--methods", nargs="+", default=list(structure_names(paper=True)), choices=structure_names())
    b.set_defaults(func=cmd_budget)


def _study_options(st):
    from ._svd import SVD_SOLVERS
    from .structures import structure_names

    st.add_argument("base", help="safetensors file, sharded checkpoint folder or index file")
    st.add_argument(
        "finetuned",
        nargs="?",
        help="the fine-tuned checkpoint, or a PEFT adapter directory (omit to compress BASE itself)",
    )
    st.add_argument("--out", required=True, help="output folder (also the resumable log)")
    st.add_argument(
        "--structures",
        nargs="+",
        choices=structure_names(),
        default=None,
        help="structures to study (default: every registered one)",
    )
    bg = st.add_mutually_exclusive_group()
    bg.add_argument(
        "--budget-rank",
        type=_count(1, "--budget-rank"),
        help="per-layer budget R (m + n), a LoRA-equivalent rank (default 16)",
    )
    bg.add_argument("--budget-fraction", type=float, help="per-layer budget as a fraction of m n")
    bg.add_argument(
        "--total-budget", type=_count(1, "--total-budget"), help="one total over all layers (model-wide allocation)"
    )
    st.add_argument(
        "--target-modules",
        nargs="+",
        default=["all-linear"],
        help="all-linear (default), module-name suffixes, or one regular expression",
    )
    st.add_argument("--n-blocks", nargs="+", type=int, default=None, help="grid sizes K (default 2 4 8)")
    st.add_argument("--n-jobs", type=_jobs, default=None, help="layers in parallel via joblib (default 1)")
    st.add_argument("--svd-solver", choices=SVD_SOLVERS, default="auto")
    st.add_argument(
        "--max-iter",
        type=_count(1, "--max-iter"),
        default=None,
        help="most alternations of the iterative structures per fit (default: theirs, 100)",
    )
    _orientation_option(st)
    st.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    st.set_defaults(func=cmd_study)


def _extract_options(e):
    from ._svd import SVD_SOLVERS
    from .structures import get_structure, structure_names

    e.add_argument("base", help="base model: .safetensors file, sharded index or model folder")
    e.add_argument("finetuned", help="fully fine-tuned model, same forms")
    e.add_argument("--out", required=True, help="adapter directory to write")
    e.add_argument(
        "--method", choices=[s for s in structure_names(spectral=True) if get_structure(s).peft], default="global"
    )
    e.add_argument("--n-blocks", type=_n_blocks, help="K (default 2; not for global)")
    size = e.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=_count(1, "--rank"), help="rank of every active block")
    size.add_argument(
        "--budget-rank",
        type=_count(1, "--budget-rank"),
        help="budget as a LoRA rank R: R*(m+n) parameters per layer, optimal per-block ranks",
    )
    size.add_argument(
        "--total-budget",
        type=_count(1, "--total-budget"),
        help="one total over all layers, spread model-wide over every block of every layer",
    )
    e.add_argument(
        "--target-modules",
        nargs="+",
        default=["all-linear"],
        metavar="NAME",
        help="module-name suffixes (q_proj v_proj), one regular expression matched against the "
        "whole module path, or all-linear (default)",
    )
    e.add_argument(
        "--peft-type",
        choices=("auto", "LORA", "GRALORA"),
        default="auto",
        help="auto: the structure's own (LoRA for global/diagonal, GraLoRA for block)",
    )
    e.add_argument("--svd-solver", choices=SVD_SOLVERS, default="auto")
    e.add_argument("--overwrite", action="store_true", help="replace an existing adapter directory at --out")
    _orientation_option(e)
    e.set_defaults(func=cmd_extract)


def _calibrate_options(c):
    c.add_argument("model", help="local model folder (config.json, safetensors weights, tokenizer), read offline")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--texts", help="UTF-8 text file, one text per line")
    src.add_argument("--tokens", help=".npy token ids: 1-D stream (cut into --max-length windows) or 2-D rows")
    c.add_argument("--out", required=True, help="statistics file to write (.safetensors)")
    c.add_argument("--target-modules", nargs="+", default=["all-linear"], metavar="NAME", help="as for extract")
    c.add_argument("--max-tokens", type=_count(1, "--max-tokens"), help="stop after this many tokens")
    c.add_argument("--max-length", type=_count(1, "--max-length"), help="tokens per sequence (default: model's, <=512)")
    c.add_argument("--batch-size", type=_count(1, "--batch-size"), default=8, help="sequences per batch (default 8)")
    c.add_argument("--output-grams", action="store_true", help="also H, under the model's own LM loss")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_calibrate)


def _orientation_option(parser):
    parser.add_argument(
        "--orientation",
        choices=("out_in", "in_out"),
        default=None,
        help="how the checkpoints store their weights when no config.json beside them says: "
        "in_out for GPT-2's Conv1D, out_in for nn.Linear (default: from config.json)",
    )


#: Every subcommand: name -> (help, description, the function adding its options).
SUBCOMMANDS = {
    "reproduce": (
        "reproduce the paper's experiments",
        "Reproduce Table I and Figure 1 (table1), the 10,000-digit study (study), "
        "Figure 2's adapter sweep (figure2), every structure at matched budgets (structures), "
        "the full fine-tune compressed at Figure 2's budgets (compress; after figure2), or all of them.",
        _reproduce_options,
    ),
    "approximate": (
        "fit one structure to a matrix or image file",
        "Fit a structured low-rank approximation to a .npy/.npz/CSV matrix or an image "
        "(read as grayscale); print the error, parameter count and per-block ranks; write the "
        "reconstruction.",
        _approximate_options,
    ),
    "budget": (
        "configurations of each structure at a parameter budget",
        "List every configuration of each method whose parameter count equals the "
        "budget (or the nearest below, flagged), e.g. `blocklowrank budget 28x28 224`.",
        _budget_options,
    ),
    "study": (
        "every layer of a checkpoint by every structure at matched budgets",
        "Approximate every selected layer's weight update (W_finetuned - W_base), or with "
        "one checkpoint the weights themselves, by every registered structure at matched budgets; "
        "compare a model-wide allocation of one total budget with the uniform one. Writes layers.csv, "
        "model_wide.csv, summary.md, error_heatmap.png and error_vs_budget.png; a study stopped "
        "midway resumes where it stopped when run again with the same --out.",
        _study_options,
    ),
    "extract": (
        "extract a PEFT adapter from a fine-tuned checkpoint",
        "Fit each layer's ΔW = W_finetuned - W_base with one structure and write a PEFT "
        "adapter directory (LoRA for global/diagonal, GraLoRA for block) that "
        "PeftModel.from_pretrained loads. Embeddings, output heads and biases are left out and listed.",
        _extract_options,
    ),
    "calibrate": (
        "a model's calibration statistics (the calibrate extra: torch, transformers)",
        "Run a local model folder on texts or token ids; write each selected linear layer's input second moment "
        "(one per input site) and, with --output-grams, that of the LM loss's gradient at its output.",
        _calibrate_options,
    ),
}


def build_parser(commands=None):
    """The command line's parser.

    ``commands``: the subcommands whose options are added (default: all). The
    others are listed with their help but parse nothing, so that running one
    command imports only what that command needs (``blocklowrank --help``
    imports no scikit-learn).
    """
    p = _Parser(
        prog="blocklowrank",
        description="Structured low-rank approximation: global (LoRA), diagonal-block (MELoRA) "
        "and full K x K block (Localized LoRA) structures at a parameter budget.",
    )
    p.add_argument("--version", action="version", version=f"blocklowrank {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (help_, description, add_options) in SUBCOMMANDS.items():
        parser = sub.add_parser(name, help=help_, description=description)
        if commands is None or name in commands:
            add_options(parser)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the top level has no option with a value
    args = build_parser(commands={command}).parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("blocklowrank: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, OSError, RuntimeError, MissingExtraError) as exc:
        msg = str(exc).strip().splitlines()
        first = msg[0] if msg else type(exc).__name__
        print(f"blocklowrank: error: {first}", file=sys.stderr)
        for line in msg[1:]:
            print(f"  {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

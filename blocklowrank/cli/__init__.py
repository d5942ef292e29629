"""The ``blocklowrank`` command line (also ``python -m blocklowrank``).

Subcommands
-----------
reproduce   the paper's experiments (Table I / Figure 1, the 10k-digit study, Figure 2), the
            structures beyond the paper at matched budgets, compress-or-train, and the MiniLM verdicts
approximate fit one structure to a matrix or image file
budget      configurations of each structure at a parameter budget
study       every layer of a checkpoint (or of its fine-tuning update) by the layout structures
extract     a PEFT adapter (LoRA / GraLoRA) fitted to the ΔW of a fine-tuned checkpoint
calibrate   a model's calibration statistics (input second moments per site) from texts or tokens

One command line: every option is declared once, in :data:`OPTIONS` (its
flags, type, help and default), and each subcommand lists the options it
takes in :data:`COMMANDS`; a default equals the Python API's (``--help``
shows it). Nothing heavy is imported before a subcommand runs: ``blocklowrank
--help`` loads neither NumPy, SciPy nor scikit-learn. Errors are one line,
with options spelled as flags (``--peft-type LORA``, ``--cap-rank``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .._version import __version__
from ._files import MATRIX_OUTPUTS, check_output, load_matrix, save_matrix
from ._options import COMMANDS, EXPERIMENTS, OPTIONS, CLIError, _Formatter, _parse_shape, _Parser

__all__ = ["main", "build_parser", "OPTIONS", "COMMANDS", "EXPERIMENTS", "CLIError", "load_matrix", "save_matrix"]
__all__ += ["check_output", "MATRIX_OUTPUTS"]


def _add(parser, name, overrides=None):
    flags, kw = OPTIONS[name]
    kw = {**kw, **(overrides or {})}
    if callable(kw.get("choices")):
        kw["choices"] = list(kw["choices"]())
    kw.setdefault("dest", name)
    parser.add_argument(*flags, **kw)


def _add_options(parser, name):
    _, _, positionals, options = COMMANDS[name]
    for pos, kw in positionals:
        parser.add_argument(pos, **kw)
    for entry in options:
        if isinstance(entry, str):
            _add(parser, entry)
        elif isinstance(entry[1], dict):
            _add(parser, *entry)
        else:
            title, names, required = entry
            group = parser.add_mutually_exclusive_group(required=required)
            for option in names:
                _add(group, *((option, None) if isinstance(option, str) else option))
    parser.set_defaults(func=globals()[f"cmd_{name}"])


def build_parser(commands=None):
    """The command line's parser.

    ``commands``: the subcommands whose options are added (default: all). The
    others are listed with their help but parse nothing, so that running one
    command imports only what that command needs (``blocklowrank --help``
    imports no NumPy, SciPy or scikit-learn).
    """
    p = _Parser(
        prog="blocklowrank",
        description="Structured low-rank approximation: global (LoRA), diagonal-block (MELoRA) "
        "and full K x K block (Localized LoRA) structures at a parameter budget, for matrices, "
        "checkpoints and PEFT adapters.",
        formatter_class=_Formatter,
    )
    p.add_argument("--version", action="version", version=f"blocklowrank {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (help_, description, _, _) in COMMANDS.items():
        parser = sub.add_parser(name, help=help_, description=description, formatter_class=_Formatter)
        if commands is None or name in commands:
            _add_options(parser, name)
    return p


# ----------------------------------------------------------------------------- commands
def _warn(message):
    print(f"blocklowrank: warning: {message}", file=sys.stderr)


def _warn_unused(args, used, names, defaults=None):
    """One warning line per option the user typed that this command does not use."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value != (defaults or {}).get(name) and name not in used:
            _warn(f"--{name.replace('_', '-')} is not used here; ignored")


def _size_kwargs(args, names):
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return given


def cmd_approximate(args):
    from ..structures import approximate, get_structure

    default_out = f"{Path(args.file).stem}_{args.method}.npy"
    out = check_output(args.out or default_out, overwrite=args.overwrite, suffixes=MATRIX_OUTPUTS)
    X = load_matrix(args.file, key=args.key)
    size = _size_kwargs(args, ("rank", "budget", "budget_rank", "max_error"))
    if "budget_rank" in size:
        size = {"budget": size.pop("budget_rank") * sum(X.shape)}
    fixed = get_structure(args.method).fixed_blocks
    if fixed is not None and args.n_blocks != 1:
        _warn(f"--n-blocks is ignored: {args.method} has {fixed} block")
    if args.random_state is not None and args.svd_solver != "randomized":
        _warn("--random-state only seeds --svd-solver randomized; ignored")
    res = approximate(
        X,
        method=args.method,
        n_blocks=fixed or args.n_blocks,
        svd_solver=args.svd_solver,
        random_state=0 if args.random_state is None else args.random_state,
        cap_rank=args.cap_rank,
        n_jobs=args.n_jobs,
        **size,
    )
    if out.suffix.lower() == ".npz":
        res.factors.save(out)
    else:
        save_matrix(out, res.reconstruction)
    lay = res.layout
    what = "factors (blocklowrank.load_factors reads them)" if out.suffix.lower() == ".npz" else "reconstruction"
    if args.json:
        print(json.dumps({
            "file": str(args.file), "shape": list(X.shape), "method": args.method, "n_blocks": list(lay.n_blocks),
            "n_params": int(res.n_params), "error": float(res.error), "ranks": lay.ranks.tolist(), "out": str(out),
            "written": what.split(" ")[0],
        }))  # fmt: skip
        return 0
    note = " (one block: the global truncated SVD; --n-blocks K for K x K blocks)" if lay.n_blocks == (1, 1) else ""
    print(f"matrix      {X.shape[0]}x{X.shape[1]} from {args.file}")
    print(f"structure   {args.method}, {lay.n_blocks[0]}x{lay.n_blocks[1]} blocks{note}")
    print(f"parameters  {res.n_params} (dense: {X.shape[0] * X.shape[1]})")
    print(f"error       {res.error:.6f} (relative Frobenius)")
    print("ranks")
    for row in lay.ranks:
        print("   " + " ".join(f"{int(r):3d}" for r in row))
    print(f"wrote       {out}: the {what}")
    return 0


def cmd_budget(args):
    from ..budget import match_budget, over_parameterised

    shape = _parse_shape(args.shape)
    methods = args.methods
    records = [dict(r) for r in match_budget(shape, args.budget, methods=methods)]
    hidden = [dict(r) for r in over_parameterised(shape, args.budget, methods=methods)]
    if args.json:
        print(json.dumps({"shape": list(shape), "budget": args.budget, "configurations": records,
                          "over_parameterised": hidden}, default=str))  # fmt: skip
        return 0
    print(f"configurations of a {shape[0]}x{shape[1]} matrix at budget {args.budget}", flush=True)
    print(f"{'method':<13}{'n_blocks':>9}{'rank':>6}{'n_params':>10}  exact")
    rows = records + (hidden if args.all else [])
    order = {m: t for t, m in enumerate(dict.fromkeys(r["method"] for r in records + hidden))}
    for r in sorted(rows, key=lambda r: (order[r["method"]], r["n_blocks"], r["rank"])):
        nb = r["n_blocks"]
        nb = f"{nb[0]}x{nb[1]}" if isinstance(nb, (tuple, list)) else str(nb)
        flag = "over (dense cheaper)" if r.get("over") else ("yes" if r.get("exact", True) else "below")
        print(f"{r['method']:<13}{nb:>9}{str(r['rank']):>6}{r['n_params']:>10}  {flag}")
    if hidden and not args.all:
        which = ", ".join(f"{r['method']} n_blocks={r['n_blocks']} rank={r['rank']}" for r in hidden[:6])
        more = f", ... ({len(hidden)} in all)" if len(hidden) > 6 else ""
        print(
            f"left out: {len(hidden)} configurations with a rank at or above a block's smaller side, which "
            f"is cheaper stored densely ({which}{more}); --all lists them"
        )
    return 0


def cmd_reproduce(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    which = EXPERIMENTS if args.what == "all" else (args.what,)
    used = ("seeds", "epochs", "n_jobs", "subset") if "figure2" in which else ()
    used = used or (("seeds", "n_jobs", "subset") if "compress" in which else ())
    _warn_unused(args, used, ("seeds", "epochs", "n_jobs", "subset"), defaults={"seeds": 3, "n_jobs": -1})
    written = []
    for name in which:
        written += _reproduce_one(name, out, args)
    print("\nresults:")
    for p in written:
        print(f"  {p}")
    return 0


def _reproduce_one(name, out, args):
    progress = not args.quiet
    if name == "table1":
        from ..experiments.table1 import run_table1

        return run_table1(out, progress=progress)
    if name == "study":
        from ..experiments.study import run_study

        return run_study(out, progress=progress)
    if name == "structures":
        from ..experiments.structures import run_structures

        return run_structures(out, progress=progress)
    if name == "figure2":
        from ..experiments.figure2 import DEFAULT_EPOCHS, plot_figure2, run_figure2

        epochs = DEFAULT_EPOCHS if args.epochs is None else args.epochs
        res = run_figure2(
            out, seeds=args.seeds, epochs=epochs, n_jobs=args.n_jobs, progress=progress, subset=args.subset
        )
        plot_figure2(res, out / "figure2.png")
        return [out / "sweep.csv", out / "figure2_summary.txt", out / "figure2.png"]
    if name == "minilm":
        from ..experiments.minilm_metric import run_minilm_metric

        folder = out / "minilm_metric"
        run_minilm_metric(folder, out / "realweights" / "minilm", progress=progress)
        return [folder / f for f in ("minilm_metric.csv", "minilm_metric_summary.txt", "minilm_metric.png")]
    from ..experiments.compress import plot_compress, run_compress

    res = run_compress(out, seeds=args.seeds, subset=args.subset, progress=progress, n_jobs=args.n_jobs)
    plot_compress(res, out / "compress.png")
    return [out / "compress.csv", out / "compress_summary.txt", out / "compress.png"]


_REGEX_CHARS = set("*+?[](){}|^$\\")


def _target_modules(values):
    """``--target-modules``: 'all-linear', one regular expression, or module-name suffixes."""
    if len(values) == 1 and (values[0].lower() == "all-linear" or _REGEX_CHARS & set(values[0])):
        return values[0]
    return list(values)


def cmd_study(args):
    from ..study import run_study

    out = check_output(args.out, folder=True)
    if out.is_dir() and any(out.iterdir()) and not (out / "study.json").exists() and not args.overwrite:
        raise CLIError(f"--out {out} is not empty and holds no study; use another folder or pass --overwrite")
    budget = _size_kwargs(args, ("budget_rank", "budget_fraction", "total_budget"))
    res = run_study(
        args.base,
        args.finetuned,
        out=args.out,
        structures=args.methods,
        target_modules=_target_modules(args.target_modules),
        n_blocks=args.n_blocks,
        n_jobs=args.n_jobs,
        progress=not args.quiet,
        svd_solver=args.svd_solver,
        fit_options=None if args.max_iter is None else {"max_iter": args.max_iter},
        orientation=args.orientation,
        calibration=args.calibration,
        gram_damping=args.gram_damping,
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
            what = "output error (rms)" if row["measure"] == "output" else "error"
            print(
                f"  {row['structure']:<10} K={row['n_blocks']:<3} model-wide {what} {row['error']:.4f} "
                f"vs uniform {unif['error']:.4f}"
            )
    print(f"wrote {args.out}/: layers.csv, model_wide.csv, summary.md, error_heatmap.png, error_vs_budget.png")
    return 0


def cmd_extract(args):
    from ..extract import extract_adapter, plan_extraction

    kw = dict(
        method=args.method,
        n_blocks=args.n_blocks,
        target_modules=_target_modules(args.target_modules),
        peft_type=args.peft_type,
        cap_rank=args.cap_rank,
        dtype=args.dtype,
        modules_to_save=args.modules_to_save,
        orientation=args.orientation,
        calibration=args.calibration,
        gram_damping=args.gram_damping,
        **_size_kwargs(args, ("rank", "budget_rank", "total_budget", "max_error")),
    )
    if args.max_iter is not None:
        kw["max_iter"] = args.max_iter
    if args.dry_run:
        plan = plan_extraction(args.base, args.finetuned, **kw)
        print(json.dumps(plan.to_json(), indent=1) if args.json else plan.summary())
        return 0
    if args.out is None:
        raise CLIError("extract needs --out DIR (or --dry-run to see what it would write)")
    check_output(args.out, folder=True)
    report = extract_adapter(
        args.base,
        args.finetuned,
        args.out,
        svd_solver=args.svd_solver,
        overwrite=args.overwrite,
        progress=not args.quiet and sys.stderr.isatty(),  # a bar in a terminal, not in a log file
        **kw,
    )
    print(json.dumps(report.to_json(), indent=1) if args.json else report.summary(style="cli"))
    return 0


def cmd_calibrate(args):
    from ..calibration.collect import calibrate_folder

    check_output(args.out, overwrite=args.overwrite)
    names = ("texts", "tokens", "max_tokens", "max_length", "batch_size", "output_grams", "overwrite")
    options = {name: getattr(args, name) for name in names}
    modules = _target_modules(args.target_modules)
    stats = calibrate_folder(args.model, args.out, target_modules=modules, progress=not args.quiet, **options)
    print(f"wrote {args.out}: {stats!r}, {stats.info['tokens']:,} tokens of {stats.info['sequences']:,} sequences")
    return 0


def _error_lines(exc):
    """The message of ``exc`` in the command line's spelling, as lines."""
    spelled = getattr(exc, "spelled", None)
    text = spelled("cli") if callable(spelled) else str(exc)
    return text.strip().splitlines() or [type(exc).__name__]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the top level has no option with a value
    args = build_parser(commands={command}).parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("blocklowrank: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, OSError, RuntimeError, ImportError) as exc:
        first, *rest = _error_lines(exc)
        print(f"blocklowrank: error: {first}", file=sys.stderr)
        for line in rest:
            print(f"  {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

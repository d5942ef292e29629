"""Issue 18, a newcomer's first hour: every item driven through the real command line, as a user would.

Each test runs the command line's ``main`` (what ``python -m blocklowrank``
exits with: ``blocklowrank/__main__.py`` is ``sys.exit(main())``) on the
arguments a user types, with its environment and working directory, its
stdout and stderr captured, on small checkpoints written here, and checks what
it prints and writes against an independent computation; the PEFT items load
what the command wrote with PEFT itself (``tests/test_newcomer_peft.py``).
``test_the_program_a_user_types_is_main`` runs the program itself in child
processes (exit codes, streams), as do the terminal and ``--help`` tests; the
rest run in this process (a child pays 2-3 s of imports per command).
"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import blocklowrank
from blocklowrank import approximate, load_factors
from blocklowrank.checkpoints import open_checkpoint, save_file

ROOT = str(Path(blocklowrank.__file__).resolve().parent.parent)
LAYERS = {  # a small BERT-like model: four kinds of dense, an embedding and a pooler
    "embeddings.word_embeddings.weight": (50, 24),
    "embeddings.LayerNorm.weight": (24,),
    "encoder.layer.0.attention.self.query.weight": (24, 24),
    "encoder.layer.0.attention.self.query.bias": (24,),
    "encoder.layer.0.attention.output.dense.weight": (24, 24),
    "encoder.layer.0.intermediate.dense.weight": (48, 24),
    "encoder.layer.0.output.dense.weight": (24, 48),
    "encoder.layer.1.attention.self.query.weight": (24, 24),
    "encoder.layer.1.attention.output.dense.weight": (24, 24),
    "encoder.layer.1.intermediate.dense.weight": (48, 24),
    "encoder.layer.1.output.dense.weight": (24, 48),
    "pooler.dense.weight": (24, 24),
}


def run_program(*args, env=None, cwd=None, check=None):
    """Run ``python -m blocklowrank ARGS`` in a child process: (exit code, stdout, stderr)."""
    full_env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "blocklowrank", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=600,
    )
    if check is not None:
        assert proc.returncode == check, proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


def cli(*args, env=None, cwd=None, check=None):
    """``blocklowrank ARGS`` as ``python -m blocklowrank`` runs it (``sys.exit(main(ARGS))``), in this
    process with ``env`` added to the environment and ``cwd`` as the working directory, both restored
    after: (exit code, stdout, stderr). An exception ``main`` lets out (a traceback for a user) fails
    the test."""
    from blocklowrank.cli import main

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        if cwd is not None:
            mp.chdir(cwd)
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's errors and --help, as the program would exit
            code = exc.code
    code = 0 if code is None else code
    if check is not None:
        assert code == check, err.getvalue()
    return code, out.getvalue(), err.getvalue()


def test_the_program_a_user_types_is_main(bert, tmp_path):
    """Claim: ``python -m blocklowrank`` (a child process) exits with the code and prints the streams that
    ``cli`` (``main`` in this process) gives: a success, an argparse error, a refused input."""
    cases = [
        ("extract", bert["base"], bert["ft"], "--rank", "2", "--dry-run"),
        ("extract", bert["base"], bert["ft"], "--rank", "two"),
        ("extract", bert["base"], tmp_path / "missing.safetensors", "--rank", "2", "--dry-run"),
    ]
    codes = set()
    for args in cases:
        code, out, err = run_program(*args)
        assert (code, out, err) == cli(*args), args
        assert "Traceback" not in err
        codes.add(code)
    assert codes == {0, 2}


def one_error_line(code, err):
    """The command failed with one line, ``blocklowrank: error: ...``, and no traceback."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blocklowrank: error: "), err
    return lines[0]


def _low_rank(rng, shape, rank, scale=0.05):
    return scale * rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """Base and fine-tuned checkpoints (float32), every tensor changed: linears by low-rank updates."""
    folder = tmp_path_factory.mktemp("bert")
    rng = np.random.default_rng(0)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in LAYERS.items()}
    tuned = {}
    for k, w in base.items():
        step = (
            _low_rank(rng, w.shape, 3) if w.ndim == 2 and "embeddings" not in k else 0.01 * rng.standard_normal(w.shape)
        )
        tuned[k] = (w + step).astype(np.float32)
    tuned["pooler.dense.weight"] = base["pooler.dense.weight"]  # unchanged, as in a mean-pooled fine-tune
    return {
        "base": save_file(folder / "base.safetensors", base),
        "ft": save_file(folder / "ft.safetensors", tuned),
        "arrays": (base, tuned),
        "folder": folder,
    }


# ---------------------------------------------------------------------------- the command line itself
def test_help_imports_nothing_heavy():
    """``blocklowrank --help`` imports neither NumPy, SciPy nor scikit-learn (its time: benchmarks/bench_cli.py)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "blocklowrank", "--help"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0 and "extract" in proc.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert not imported & {"numpy", "scipy", "sklearn", "matplotlib", "joblib"}, sorted(imported)


def _parser_defaults(command):
    from blocklowrank.cli import build_parser

    sub = build_parser(commands={command})._subparsers._group_actions[0].choices[command]
    return {a.dest: a.default for a in sub._actions if a.dest != "help"}, sub.format_help()


def test_defaults_are_the_python_apis_and_shown_in_help():
    import inspect

    from blocklowrank.cli import _target_modules
    from blocklowrank.extract import extract_adapter
    from blocklowrank.study import run_study

    for command, func, names in (
        ("extract", extract_adapter, ("method", "n_blocks", "peft_type", "svd_solver", "dtype", "cap_rank")),
        ("study", run_study, ("svd_solver", "n_blocks", "budget_rank", "n_jobs")),
    ):
        defaults, text = _parser_defaults(command)
        signature = inspect.signature(func).parameters
        for name in names:
            assert defaults[name] == signature[name].default, (command, name)
        assert _target_modules(defaults["target_modules"]) == signature["target_modules"].default
        assert re.search(r"\(default:\s+auto\)", text) and "(default:\n" not in text, text
    defaults, text = _parser_defaults("study")
    assert defaults["methods"] is None and inspect.signature(run_study).parameters["structures"].default is None
    assert "global diagonal block" in " ".join(text.split())  # what None means, said in --help
    defaults, text = _parser_defaults("approximate")
    assert (defaults["method"], defaults["n_blocks"]) == ("block", 1) and "(default: block)" in text


def test_approximate_fits_what_python_fits_and_saves_the_factors(tmp_path):
    X = np.random.default_rng(1).standard_normal((20, 16))
    np.save(tmp_path / "m.npy", X)
    _, out, _ = cli("approximate", tmp_path / "m.npy", "--rank", "4", "--out", tmp_path / "f.npz", check=0)
    saved = load_factors(tmp_path / "f.npz")
    python = approximate(X, rank=4)  # the Python API's defaults
    assert saved.layout.n_blocks == python.layout.n_blocks == (1, 1)
    np.testing.assert_allclose(saved.to_dense(), python.reconstruction, atol=1e-12)
    U, s, Vt = np.linalg.svd(X)  # independent: the rank-4 truncated SVD
    np.testing.assert_allclose(saved.to_dense(), (U[:, :4] * s[:4]) @ Vt[:4], atol=1e-10)
    assert "global truncated SVD" in out and "factors" in out


def test_approximate_checks_out_before_any_work_and_never_overwrites(tmp_path):
    X = np.random.default_rng(2).standard_normal((8, 8))
    np.save(tmp_path / "m.npy", X)
    (tmp_path / "taken.npy").write_bytes(b"mine")
    # --out is checked first: the missing input file is not even reached
    err = one_error_line(
        *cli("approximate", tmp_path / "missing.npy", "--rank", "1", "--out", tmp_path / "taken.npy")[::2]
    )
    assert "taken.npy exists; pass --overwrite" in err and (tmp_path / "taken.npy").read_bytes() == b"mine"
    err = one_error_line(*cli("approximate", tmp_path / "m.npy", "--rank", "1", "--out", tmp_path / "o.xls")[::2])
    assert "unsupported output type '.xls'" in err
    err = one_error_line(*cli("approximate", tmp_path / "m.npy", "--rank", "1", "--out", tmp_path / "no/o.npy")[::2])
    assert "does not exist; create it first" in err
    cli("approximate", tmp_path / "m.npy", "--rank", "1", "--out", tmp_path / "taken.npy", "--overwrite", check=0)
    np.testing.assert_allclose(np.load(tmp_path / "taken.npy"), approximate(X, rank=1).reconstruction)


def test_budget_says_what_it_leaves_out(tmp_path):
    _, out, _ = cli("budget", "28x28", "224", check=0)
    assert "left out: 2 configurations" in out and "--all lists them" in out
    assert not re.search(r"^diagonal\s+6\s", out, re.M)
    _, out, _ = cli("budget", "28x28", "224", "--all", check=0)
    for N in (6, 7):  # blocks of side 4 at rank 4: valid, but cheaper dense
        row = re.search(rf"^diagonal\s+{N}\s+4\s+224\s+over", out, re.M)
        assert row, out
    # independently: N = 6 cuts 28 into 5,5,5,5,4,4 and N = 7 into sevens of 4; rank 4 equals the side 4
    assert min(len(a) for a in np.array_split(np.arange(28), 6)) == 4 == len(np.array_split(np.arange(28), 7)[0])
    _, out, _ = cli("budget", "28x28", "224", "--json", check=0)
    got = json.loads(out)
    assert [(r["method"], r["n_blocks"]) for r in got["over_parameterised"]] == [("diagonal", 6), ("diagonal", 7)]


# ---------------------------------------------------------------------------- model references
def _hf_cache(root, repo_id, files, commit="0123abcd"):
    """A Hugging Face hub cache holding ``repo_id`` at ``commit`` (refs/main -> snapshots/<commit>, blobs linked)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, source in files.items():
        blob = repo / "blobs" / name.replace(".", "_")
        blob.write_bytes(Path(source).read_bytes())
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    return repo


def test_model_references_cache_folders_ids_and_near_misses(bert, tmp_path):
    hub = tmp_path / "hub"
    repo = _hf_cache(hub, "org/tiny-bert", {"model.safetensors": bert["base"]})
    _hf_cache(hub, "org/tiny-bert-ft", {"model.safetensors": bert["ft"]}, commit="fedc9876")
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    # a model id found in the cache, and a cache repo folder (refs/main -> snapshots/<commit>)
    _, out, _ = cli("extract", "org/tiny-bert", hub / "models--org--tiny-bert-ft", "--out", tmp_path / "a", "--rank", "3",
                    "-q", env=env, check=0)  # fmt: skip
    assert "wrote LORA adapter" in out
    report = json.loads((tmp_path / "a" / "extract_report.json").read_text())
    assert set(report["layers"]) == {
        k[: -len(".weight")] for k, s in LAYERS.items() if len(s) == 2 and "embed" not in k
    } - {"pooler.dense"}
    # the study takes the same forms
    cli("study", "org/tiny-bert", "--out", tmp_path / "s", "--budget-rank", "2", "-q", env=env, check=0)
    assert "models--org--tiny-bert/snapshots/0123abcd" in (tmp_path / "s" / "summary.md").read_text()
    # near misses, offline: the forms accepted, and "did you mean"
    err = one_error_line(*cli("extract", "org/tiny-brt", bert["ft"], "--rank", "1", "--dry-run", env=env)[::2])
    assert "did you mean 'org/tiny-bert'" in err and "HF_HUB_OFFLINE is set" in err and "models--org--name" in err
    typo = str(bert["folder"] / "bse.safetensors")
    err = one_error_line(*cli("extract", typo, bert["ft"], "--rank", "1", "--dry-run", env=env)[::2])
    assert f"did you mean '{bert['folder'] / 'base.safetensors'}'" in err and "a .safetensors file" in err
    # a cache folder without refs/main: which snapshots there are
    (repo / "refs" / "main").unlink()
    (repo / "snapshots" / "other").mkdir()
    err = one_error_line(*cli("extract", repo, bert["ft"], "--rank", "1", "--dry-run", env=env)[::2])
    assert "no refs/main" in err and "0123abcd" in err


def test_an_id_not_in_the_cache_is_downloaded_with_huggingface_hub(monkeypatch, tmp_path, bert):
    """Online, with the hub extra: ``snapshot_download`` with safetensors/JSON patterns only (no pickles)."""
    hub = pytest.importorskip("huggingface_hub")
    from blocklowrank.checkpoints import resolve_model

    seen = {}

    def fake(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        return str(bert["folder"])

    monkeypatch.setattr(hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert resolve_model("org/remote@v1", role="base") == str(bert["folder"])
    assert seen["repo_id"] == "org/remote" and seen["revision"] == "v1"
    assert "*.safetensors" in seen["allow_patterns"] and not any(".bin" in p for p in seen["allow_patterns"])
    # a mistyped local path (its folder exists) is never sent to the hub
    (tmp_path / "models").mkdir()
    seen.clear()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "models" / "bse"), role="base")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model("models/bse", role="base")
    assert seen == {}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set"):
        resolve_model("org/remote", role="base")


# ---------------------------------------------------------------------------- study
def test_study_fast_defaults_roles_summary_and_heatmap(bert, tmp_path):
    code, out, err = cli("study", bert["base"], "--out", tmp_path / "s", "--budget-rank", "2", "-q")
    assert code == 0, err
    with open(tmp_path / "s" / "layers.csv") as f:
        rows = f.read()
    assert {line.split(",")[3] for line in rows.splitlines()[1:]} == {"global", "diagonal", "block"}
    summary = (tmp_path / "s" / "summary.md").read_text()
    header = next(line for line in summary.splitlines() if line.startswith("| structure |"))
    for role in ("query", "attention.output.dense", "intermediate.dense", "output.dense", "pooler.dense"):
        assert f" {role} |" in header, header
    assert "None" not in summary and "fine-tuned: none (one checkpoint)" in summary


def test_study_estimates_the_iterative_structures_before_they_start(bert, tmp_path):
    code, out, err = cli(
        "study", bert["base"], bert["ft"], "--out", tmp_path / "s", "--budget-rank", "4", "--methods", "global",
        "hybrid", "--max-iter", "3", "--n-blocks", "2",
    )  # fmt: skip
    assert code == 0, err
    lines = err.splitlines()
    at = next(i for i, line in enumerate(lines) if "hybrid is iterative" in line)
    found = re.search(r"(\d+) fits of up to 3 alternations.*a whole fit of ([\w.]+) took (\d+) alternations", lines[at])
    assert found, lines[at]
    from blocklowrank.budget import match_budget  # independently: the configurations that spend each budget

    fits = sum(len(match_budget(s, 4 * sum(s), methods=["hybrid"], n_blocks=[2])) for k, s in LAYERS.items()
               if len(s) == 2 and "embed" not in k)  # fmt: skip
    assert int(found.group(1)) == fits and 1 <= int(found.group(3)) <= 3
    started = [i for i, line in enumerate(lines) if line.startswith("[study]") and "runs" in line]
    assert started and at < started[0]  # said before the first layer starts


def test_the_estimate_times_the_iterative_fits_in_the_studys_metric():
    """Claim: in a calibrated study the cost estimate times every fit (the one alternation per layer
    shape and the whole fit of the smallest layer) in that layer's metric, not plain."""
    import dataclasses

    from blocklowrank import GramFactor
    from blocklowrank.checkpoints import LayerPair
    from blocklowrank.structures import get_structure, registered
    from blocklowrank.study._plan import estimate_cost

    hybrid, seen = get_structure("hybrid"), []

    def spy(X, **kw):
        seen.append((X.shape, kw.get("input_gram")))
        return hybrid.fit(X, **kw)

    rng = np.random.default_rng(0)
    pairs = [
        LayerPair(f"l{i}.weight", f"l{i}", shape, "linear") for i, shape in enumerate([(24, 16), (32, 16), (24, 16)])
    ]
    grams = {16: GramFactor(np.cov(rng.standard_normal((16, 64))), 16)}
    with registered(dataclasses.replace(hybrid, name="hybrid_spy", fit=spy)):
        costs = estimate_cost(
            pairs, [8 * sum(p.shape) for p in pairs], ["hybrid_spy"], [2], {"max_iter": 2},
            sample=lambda pair: rng.standard_normal(pair.shape), metric=lambda pair: {"input_gram": grams[pair.shape[1]]},
        )  # fmt: skip
    assert costs[0]["layer"] == "l0" and 1 <= costs[0]["alternations"] <= 2
    assert {shape for shape, _ in seen} == {(24, 16), (32, 16)} and len(seen) == 3  # two shapes timed, l0 fitted whole
    assert all(g is grams[16] for _, g in seen)


def test_heatmap_colours_span_the_data_and_the_title_fits():
    from blocklowrank.checkpoints import PairingReport
    from blocklowrank.study._report import _heatmap_figure

    pytest.importorskip("matplotlib")
    from blocklowrank._extras import pyplot_agg

    plt = pyplot_agg()
    names = ["global", "diagonal", "block"]
    errs = {("a.layer.0.q", "global"): 0.88, ("a.layer.0.q", "diagonal"): 0.97, ("a.layer.0.q", "block"): 0.91}

    class Records(list):
        pass

    records = Records({"layer": k[0], "structure": k[1], "error": e, "best": True} for k, e in errs.items())
    records.layers = [{"layer": "a.layer.0.q"}]
    records.settings = {"structures": names}
    records.pairing = PairingReport([], [], [], [], [], [])
    fig = _heatmap_figure(records, plt)
    lo, hi = fig.axes[0].images[0].get_clim()
    assert lo <= 0.88 and hi >= 0.97 and hi - lo < 0.2  # the data's range, not 0-1
    fig.canvas.draw()
    box, title = fig.bbox, fig.axes[0].title.get_window_extent()
    assert box.x0 <= title.x0 and title.x1 <= box.x1 and title.y1 <= box.y1, (title, box)
    plt.close(fig)


# ---------------------------------------------------------------------------- extract
def test_extract_report_json_sizes_and_the_changes_it_loses(bert, tmp_path):
    out = tmp_path / "a"
    code, text, err = cli("extract", bert["base"], bert["ft"], "--out", out, "--rank", "3")
    assert code == 0, err
    files = {n: (out / n).stat().st_size for n in ("adapter_model.safetensors", "adapter_config.json")}
    report = json.loads((out / "extract_report.json").read_text())
    assert report["files"] == files
    mib = files["adapter_model.safetensors"] / 2**10
    assert f"adapter_model.safetensors {mib:.2f} kB" in text
    # what changed but the adapter does not hold: flagged, with the option that carries it
    lost = "changed, NOT in the adapter"
    assert lost in text and "embeddings.word_embeddings.weight" in text.split(lost)[1].splitlines()[0]
    assert "--modules-to-save word_embeddings LayerNorm" in text
    assert {"embeddings.word_embeddings.weight", "embeddings.LayerNorm.weight",
            "encoder.layer.0.attention.self.query.bias"} == set(report["changed_not_written"])  # fmt: skip
    assert "pooler.dense" in report["unchanged"]
    # --json: the same report on stdout, and nothing else there
    code, text, err = cli("extract", bert["base"], bert["ft"], "--out", tmp_path / "b", "--rank", "3", "--json")
    assert code == 0, err
    printed = json.loads(text)
    assert printed["layers"] == report["layers"]
    assert printed["n_params"] == sum(3 * sum(s) for s in (v["shape"] for v in report["layers"].values()))


def test_extract_progress_bar_in_a_terminal_and_quiet(bert, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    def in_terminal(*args):
        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
        env = {**os.environ, "PYTHONPATH": ROOT}
        proc = subprocess.Popen([sys.executable, "-m", "blocklowrank", *map(str, args)], stdout=subprocess.DEVNULL,
                                stderr=follower, env=env)  # fmt: skip
        os.close(follower)
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        proc.wait(timeout=300)
        os.close(leader)
        return proc.returncode, seen.decode(errors="replace")

    code, seen = in_terminal("extract", bert["base"], bert["ft"], "--out", tmp_path / "a", "--rank", "2")
    assert code == 0 and re.search(r"extract: 100%.*9/9", seen), seen
    code, seen = in_terminal("extract", bert["base"], bert["ft"], "--out", tmp_path / "b", "--rank", "2", "-q")
    assert code == 0 and "extract:" not in seen


def test_dry_run_reads_headers_only_and_predicts_the_file(bert, tmp_path, monkeypatch):
    from blocklowrank.checkpoints import Checkpoint
    from blocklowrank.extract import plan_extraction

    changed = ["--target-modules", r"encoder\..*"]  # every selected layer changed: the plan is the adapter
    for t, extra in enumerate(([], ["--method", "block", "--n-blocks", "2"], ["--modules-to-save", "LayerNorm",
                                                                             "--dtype", "float16"])):  # fmt: skip
        code, text, err = cli("extract", bert["base"], bert["ft"], "--rank", "2", "--dry-run", *changed, *extra)
        assert code == 0 and "nothing is written" in text, err
        plan = json.loads(cli("extract", bert["base"], bert["ft"], "--rank", "2", "--dry-run", "--json", *changed,
                              *extra, check=0)[1])  # fmt: skip
        out = tmp_path / f"a{t}"
        cli("extract", bert["base"], bert["ft"], "--out", out, "--rank", "2", "-q", *changed, *extra, check=0)
        report = json.loads((out / "extract_report.json").read_text())
        assert plan["files"]["adapter_model.safetensors"] == report["files"]["adapter_model.safetensors"]
        assert (plan["n_params"], plan["n_params_written"]) == (report["n_params"], report["n_params_written"])
        assert plan["peft_type"] == report["peft_type"] and plan["dtype"] == report["dtype"]
        assert {k: v["ranks"] for k, v in plan["layers"].items()} == {
            k: v["ranks"] for k, v in report["layers"].items()
        }
    # nothing is read beyond the headers: every way to read tensor data is cut off
    for method in ("get", "_read_into"):
        monkeypatch.setattr(Checkpoint, method, lambda *a, **k: pytest.fail("tensor data read in a dry run"))
    plan = plan_extraction(bert["base"], bert["ft"], rank=2, modules_to_save=["LayerNorm"])
    assert plan.exact and len(plan.layers) == 9
    assert plan.n_params == sum(2 * sum(v["shape"]) for v in plan.layers.values())


def test_errors_name_the_layer_and_the_flag(bert, tmp_path):
    base, ft = bert["base"], bert["ft"]
    # a rank above a block's side: the layer, its block, and --cap-rank (which the command line has)
    err = one_error_line(*cli("extract", base, ft, "--out", tmp_path / "a", "--method", "block", "--n-blocks", "2",
                              "--rank", "13")[::2])  # fmt: skip
    assert (
        re.search(r"layer 'encoder\.layer\.0\.[\w.]+' \(out=24, in=24\): --rank 13 exceeds", err)
        and "--cap-rank" in err
    )
    for python in ("cap_rank=", "GridLowRank", "fit_layout", "peft_type="):
        assert python not in err
    assert not (tmp_path / "a").exists()
    _, out, _ = cli("extract", base, ft, "--out", tmp_path / "a", "--method", "block", "--n-blocks", "2", "--rank",
                    "13", "--cap-rank", "-q", "--target-modules", r"encoder\..*", check=0)  # fmt: skip
    report = json.loads((tmp_path / "a" / "extract_report.json").read_text())
    assert report["layers"]["encoder.layer.0.attention.self.query"]["ranks"] == [[12, 12], [12, 12]]
    # block with the default --n-blocks 1: GraLoRA needs K >= 2; the K that divide every layer are listed
    err = one_error_line(*cli("extract", base, ft, "--out", tmp_path / "b", "--method", "block", "--rank", "2")[::2])
    assert (
        "--n-blocks K (K dividing every selected layer: 2, 3, 4, 6, 8, 12)" in err
    )  # up to 16 and "--peft-type LORA" in err
    # a --target-modules that matches nothing: what exists, and the closest names
    err = one_error_line(*cli("extract", base, ft, "--out", tmp_path / "c", "--rank", "2", "--target-modules",
                              "qeury")[::2])  # fmt: skip
    assert "no layer selected" in err and "Did you mean query" in err and "intermediate.dense" in err
    assert "--target-modules qeury matches none" in err


def test_total_budget_prints_the_ranks_it_chose(bert, tmp_path):
    total = 2000
    code, out, err = cli("extract", bert["base"], bert["ft"], "--out", tmp_path / "a", "--total-budget", total,
                         "--target-modules", r"encoder\..*")  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "a" / "extract_report.json").read_text())
    ranks = {k: v["rank"] for k, v in report["layers"].items()}
    assert report["n_params"] <= total and len(set(ranks.values())) > 1
    first = out.splitlines()[0]
    assert f"rank {min(ranks.values())}-{max(ranks.values())} by layer" in first and not re.search(r"\(r=\d+\)", first)
    for layer, rank in ranks.items():  # every layer's rank is printed
        assert re.search(rf"{re.escape(layer)} \d+x\d+: rank {rank},", out), layer


def test_max_error_gives_each_layer_the_fewest_parameters(bert, tmp_path):
    E = 0.3
    cli("extract", bert["base"], bert["ft"], "--out", tmp_path / "a", "--max-error", E, "-q", check=0)
    report = json.loads((tmp_path / "a" / "extract_report.json").read_text())
    base, tuned = bert["arrays"]
    for layer, rec in report["layers"].items():
        dW = tuned[layer + ".weight"].astype(np.float64) - base[layer + ".weight"]
        s = np.linalg.svd(dW, compute_uv=False)
        tail = np.sqrt(np.maximum(1 - np.cumsum(s**2) / np.sum(s**2), 0))  # error of ranks 1, 2, ...
        fewest = int(np.argmax(tail <= E + 1e-6)) + 1  # independent: the smallest rank reaching E
        assert rec["rank"] == fewest and rec["error"] <= E + 1e-6, layer


def test_grid_search_over_grids_says_single_fit_cv():
    from sklearn.model_selection import GridSearchCV

    from blocklowrank import BlockLowRank, single_fit_cv

    X = np.random.default_rng(0).standard_normal((20, 20))
    with pytest.warns(UserWarning) as caught:
        GridSearchCV(BlockLowRank(rank=1), {"n_blocks": [1, 2]}).fit(X)
    assert any("single_fit_cv" in str(w.message) for w in caught)
    search = GridSearchCV(BlockLowRank(rank=1), {"n_blocks": [1, 2]}, cv=single_fit_cv(len(X))).fit(X)
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))


def test_checkpoint_reads_like_safe_open(bert):
    safetensors = pytest.importorskip("safetensors")
    with open_checkpoint(bert["ft"]) as ours, safetensors.safe_open(bert["ft"], framework="np") as ref:
        assert ours.keys() == list(ref.keys()) or sorted(ours.keys()) == sorted(ref.keys())
        assert len(ours) == len(ref.keys()) and all(k in ours for k in ref.keys()) and "nothing" not in ours
        for key in ref.keys():
            np.testing.assert_array_equal(ours.get_tensor(key), ref.get_tensor(key))
        assert ours.names() == ours.keys()  # the old spelling stays, an alias


def test_every_fit_reports_svd_solver_as_one_type():
    from blocklowrank.structures import get_structure, structure_names

    X = np.random.default_rng(0).standard_normal((24, 20))
    for name in structure_names():
        extra = {k: 1 for k in get_structure(name).extra}
        extra["n_blocks"] = get_structure(name).fixed_blocks or 2
        for solver in ("full", "randomized", "auto"):
            kw = {} if name == "shared_basis" else {"svd_solver": solver}
            rep = approximate(X, method=name, rank=2, **extra, **kw).report
            assert isinstance(rep.svd_solver, dict) and rep.svd_solver, (name, solver)
            for shape, used in rep.svd_solver.items():
                assert isinstance(shape, tuple) and all(isinstance(v, int) for v in shape), (name, shape)
                assert used in ("full", "randomized", "full+randomized"), (name, used)

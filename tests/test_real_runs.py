"""Issue 17, part 2: runs on real files: resumed studies, ``--out``, hangs, tracebacks, unclear errors.

Checkpoints are small safetensors files written here (three 12 x 8 layers,
updates of rank 3 plus noise). Reference errors are NumPy SVDs in the test
(``_real.truncated_error``): the study's 'global' rows at a LoRA-equivalent
rank r must equal the truncation error of the current inputs' ΔW at rank r.
A resumed study may refuse (a clear error) or recompute; it may never return
rows of inputs it is no longer reading. Everything that may be replaced or
renamed lives under the test's temporary folder, which every ``--out`` is
checked to lie in before the command runs.

Each test of a defect of issue 17 asserts the right behaviour (they were
strict xfails on the code they were written against). Hangs run in child
processes, all started at once, with one deadline: a hang fails its test
instead of blocking the suite.
"""

import contextlib
import functools
import json
import math
import multiprocessing
import os
import tempfile
import threading
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from _real import assert_refused, cli, first_line, no_figures, outcome, root_settings, run_study, tree, truncated_error

pytest.importorskip("hypothesis")
from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from blocklowrank.checkpoints import open_checkpoint, save_file  # noqa: E402
from blocklowrank.extract import extract_adapter  # noqa: E402
from blocklowrank.peft import load_peft_adapter  # noqa: E402

NAMES = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(3)]
MODULES = [n.removesuffix(".weight") for n in NAMES]
SHAPE = (12, 8)
STUDY = dict(structures=["global"], n_blocks=[2], progress=False, svd_solver="full")


@pytest.fixture(scope="module", autouse=True)
def _no_figures():
    with no_figures():
        yield


# ---------------------------------------------------------------------------- checkpoints and references
def _weights(seed):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(SHAPE).astype(np.float32) for n in NAMES}


def _tuned(base, seed, names=NAMES):
    """``base`` plus a rank-3 update and noise on each of ``names`` (a different update per seed)."""
    rng = np.random.default_rng(seed)
    out = dict(base)
    for n in names:
        low = rng.standard_normal((SHAPE[0], 3)) @ rng.standard_normal((3, SHAPE[1]))
        out[n] = (base[n] + 0.1 * low + 0.01 * rng.standard_normal(SHAPE)).astype(np.float32)
    return out


def _truth(base, tuned, rank):
    """Per module, the NumPy truncation error of ΔW = tuned - base at ``rank``."""
    return {m: truncated_error(tuned[n].astype(np.float64) - base[n], rank) for m, n in zip(MODULES, NAMES)}


def _errors(records):
    """Per layer, the lowest error of the study's 'global' rows."""
    errors = {}
    for row in records:
        if row["structure"] == "global":
            errors[row["layer"]] = min(errors.get(row["layer"], math.inf), row["error"])
    return errors


def _refused_or_right(result, exc, truth, *words):
    """A resumed study refused with a clear error naming ``words``, or its rows are those of ``truth``."""
    if exc is not None:
        assert_refused(exc, *words)
        return
    assert _errors(result) == pytest.approx(truth, abs=1e-5), "rows of inputs the study is no longer reading"


def _files(folder, base, tuned):
    return save_file(folder / "base.safetensors", base), save_file(folder / "ft.safetensors", tuned)


def _keep_log_lines(out, k):
    """The state a kill after ``k`` finished layers leaves: the log's first ``k`` lines."""
    log = Path(out) / "study.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:k]))


def _log_records(out):
    return {json.loads(line)["id"]: line for line in (Path(out) / "study.jsonl").read_text().splitlines()}


# ---------------------------------------------------------------------------- 1. resume identity
@pytest.mark.parametrize("stop", ["finished", "killed"])
def test_resume_after_finetuned_overwritten(stop, tmp_path):
    base = _weights(0)
    paths = _files(tmp_path, base, _tuned(base, 1))
    run_study(*paths, out=tmp_path / "s", budget_rank=2, **STUDY)
    if stop == "killed":
        _keep_log_lines(tmp_path / "s", 1)
    later = _tuned(base, 2)  # a later training step, saved over the same path
    save_file(paths[1], later)
    result, exc = outcome(run_study, *paths, out=tmp_path / "s", budget_rank=2, **STUDY)
    _refused_or_right(result, exc, _truth(base, later, 2))


def test_resume_without_settings_file(tmp_path):
    base = _weights(0)
    tuned = _tuned(base, 1)
    paths = _files(tmp_path, base, tuned)
    run_study(*paths, out=tmp_path / "s", budget_rank=2, **STUDY)
    (tmp_path / "s" / "study.json").unlink()
    result, exc = outcome(run_study, *paths, out=tmp_path / "s", budget_rank=3, **STUDY)
    _refused_or_right(result, exc, _truth(base, tuned, 3), "study.json")


def test_log_line_from_another_model(tmp_path):
    base = _weights(0)
    tuned_a, tuned_b = _tuned(base, 1), _tuned(base, 2)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    run_study(*_files(a, base, tuned_a), out=a / "s", budget_rank=2, **STUDY)
    paths_b = _files(b, base, tuned_b)
    run_study(*paths_b, out=b / "s", budget_rank=2, **STUDY)
    mine, theirs = _log_records(b / "s"), _log_records(a / "s")
    (b / "s" / "study.jsonl").write_text(mine[NAMES[0]] + "\n" + theirs[NAMES[1]] + "\n")
    result, exc = outcome(run_study, *paths_b, out=b / "s", budget_rank=2, **STUDY)
    _refused_or_right(result, exc, _truth(base, tuned_b, 2))


# ---------------------------------------------------------------------------- 2. tracebacks
@pytest.fixture
def studied(tmp_path):
    """A finished study of a checkpoint pair: (paths, base, tuned, out)."""
    base = _weights(0)
    tuned = _tuned(base, 1)
    paths = _files(tmp_path, base, tuned)
    run_study(*paths, out=tmp_path / "s", budget_rank=2, **STUDY)
    return paths, base, tuned, tmp_path / "s"


def test_log_line_with_only_an_id(studied):
    paths, base, tuned, out = studied
    records = _log_records(out)
    (out / "study.jsonl").write_text(records[NAMES[0]] + "\n" + json.dumps({"id": NAMES[1]}) + "\n")
    result, exc = outcome(run_study, *paths, out=out, budget_rank=2, **STUDY)
    _refused_or_right(result, exc, _truth(base, tuned, 2), "study.jsonl")


def test_truncated_spectra_file(studied):
    paths, base, tuned, out = studied
    spectra = sorted((out / "spectra").glob("*.npz"))[0]
    spectra.write_bytes(spectra.read_bytes()[:40])
    result, exc = outcome(run_study, *paths, out=out, budget_rank=2, **STUDY)
    _refused_or_right(result, exc, _truth(base, tuned, 2), spectra.name)


def test_deeply_nested_adapter_config(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}")
    save_file(tmp_path / "adapter_model.safetensors", {"base_model.model.x.lora_A.weight": np.zeros((1, 2), "f4")})
    _, exc = outcome(load_peft_adapter, tmp_path)
    assert_refused(exc, "adapter_config.json")


# ---------------------------------------------------------------------------- 3. errors that name nothing
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_nonfinite_bf16_layer_named(value, tmp_path):
    base = _weights(0)
    tuned = _tuned(base, 1)
    tuned[NAMES[1]] = tuned[NAMES[1]].copy()
    tuned[NAMES[1]][2, 3] = value
    b = save_file(tmp_path / "b.safetensors", base)
    f = save_file(tmp_path / "f.safetensors", tuned, dtypes="BF16")
    _, exc = outcome(extract_adapter, b, f, tmp_path / "a", rank=1)
    assert_refused(exc, MODULES[1])
    _, exc = outcome(run_study, b, f, budget_rank=1, **STUDY)
    assert_refused(exc, MODULES[1])


def test_overflowing_difference_named(tmp_path):
    base, tuned = _weights(0), _weights(0)
    base[NAMES[1]] = np.full(SHAPE, -3e38, np.float32)
    tuned[NAMES[1]] = np.full(SHAPE, 3e38, np.float32)
    tuned[NAMES[0]] = tuned[NAMES[0]] + np.float32(0.5)
    b, f = _files(tmp_path, base, tuned)
    with np.errstate(over="ignore"):
        _, exc = outcome(extract_adapter, b, f, tmp_path / "a", rank=1)
    assert_refused(exc, MODULES[1])


def test_header_integer_over_4300_digits(tmp_path):
    header = ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + "9" * 5000 + "]}}").encode()
    path = tmp_path / "big.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    _, exc = outcome(open_checkpoint, path)
    assert_refused(exc, str(path))


def test_corrupt_settings_file_named(studied):
    paths, _, _, out = studied
    (out / "study.json").write_text("{corrupt")
    _, exc = outcome(run_study, *paths, out=out, budget_rank=2, **STUDY)
    assert_refused(exc, "study.json")


OPTIONS = {
    "target_modules": dict(target_modules={"q_proj"}),
    "fit_options": dict(fit_options={"max_iter": np.int64(3)}, structures=["global", "hybrid"]),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_options_of_numpy_or_set_type(option, tmp_path):
    base = _weights(0)
    tuned = _tuned(base, 1)
    paths = _files(tmp_path, base, tuned)
    kw = {**STUDY, **OPTIONS[option]}
    result, exc = outcome(run_study, *paths, out=tmp_path / "s", budget_rank=2, **kw)
    _refused_or_right(result, exc, _truth(base, tuned, 2), option)


def test_total_budget_too_small_says_so(tmp_path):
    base = _weights(0)
    paths = _files(tmp_path, base, _tuned(base, 1))
    rc, _, err = cli(["extract", *paths, "--out", tmp_path / "a", "--total-budget", "1"])
    assert rc == 2 and "changed" not in err, err
    assert "--total-budget" in err or "total_budget" in err, err


def test_tuple_target_modules_resumes(tmp_path):
    base = _weights(0)
    tuned = _tuned(base, 1)
    paths = _files(tmp_path, base, tuned)
    kw = dict(out=tmp_path / "s", budget_rank=2, target_modules=("q_proj",), **STUDY)
    run_study(*paths, **kw)
    result, exc = outcome(run_study, *paths, **kw)
    assert exc is None, f"the same study refused on its second run: {first_line(exc)}"
    assert _errors(result) == pytest.approx(_truth(base, tuned, 2), abs=1e-5)


# ---------------------------------------------------------------------------- 4. memory
def test_changed_check_of_a_large_expert_tensor(tmp_path):
    rng = np.random.default_rng(0)
    experts = rng.standard_normal((8, 256, 1024)).astype(np.float32)  # a 3-D MoE tensor: 4 MiB as BF16
    base = {**_weights(0), "model.layers.0.mlp.experts.down_proj": experts}
    tuned = _tuned(base, 1)
    b = save_file(tmp_path / "b.safetensors", base, dtypes="BF16")
    f = save_file(tmp_path / "f.safetensors", tuned, dtypes="BF16")
    extract_adapter(b, f, tmp_path / "warm", rank=1)  # lazy imports and caches before measuring
    tracemalloc.start()
    try:
        report = extract_adapter(b, f, tmp_path / "a", rank=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.changed_not_written == []
    stored = experts.size * 2
    assert peak <= 2 * stored + 2**20, f"peak {peak / stored:.1f} times the tensor's stored size"


# ---------------------------------------------------------------------------- 5. --out never reaches an input
def _workspace(root):
    """``root/home/.profile`` (HOME), ``root/w/data/{base,ft}/`` (model folders) and ``root/w/data/train.py``."""
    root = Path(root)
    data = root / "w" / "data"
    home = root / "home"
    base = _weights(0)
    for folder, tensors in (("base", base), ("ft", _tuned(base, 1))):
        (data / folder).mkdir(parents=True)
        save_file(data / folder / "model.safetensors", tensors)
        (data / folder / "config.json").write_text('{"model_type": "llama"}')
    (data / "train.py").write_text("print('my training script')\n")
    home.mkdir()
    (home / ".profile").write_text("export PATH\n")
    return {"root": root, "data": data, "home": home, "base": data / "base", "ft": data / "ft"}


PROTECTED = ("w/data/base/", "w/data/ft/", "w/data/train.py", "home/.profile")


def _protected(files):
    return {k: v for k, v in files.items() if k.startswith(PROTECTED)}


@contextmanager
def _inside(ws):
    """cwd = the workspace's data folder and HOME = its home, restored afterwards."""
    cwd, home = os.getcwd(), os.environ.get("HOME")
    os.chdir(ws["data"])
    os.environ["HOME"] = str(ws["home"])
    try:
        yield
    finally:
        os.chdir(cwd)
        if home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = home


def _guard(ws, out):
    """Refuse to run a case whose --out could reach outside the test's temporary folder."""
    root = os.path.realpath(ws["root"])
    assert os.path.commonpath([root, os.path.realpath(os.path.abspath(out))]) == root, out


OUT_CASES = {
    "empty": lambda ws: "",
    "cwd": lambda ws: ".",
    "base folder": lambda ws: ws["base"],
    "fine-tuned folder": lambda ws: ws["ft"],
    "folder holding the inputs": lambda ws: ws["data"],
    "home": lambda ws: ws["home"],
}


@pytest.mark.parametrize("case", sorted(OUT_CASES))
def test_out_never_replaces_an_input(case, tmp_path):
    ws = _workspace(tmp_path)
    before = tree(tmp_path)
    with _inside(ws):
        out = OUT_CASES[case](ws)
        _guard(ws, out)
        rc, _, err = cli(["extract", ws["base"], ws["ft"], "--out", out, "--rank", "1", "--overwrite"])
    assert rc == 2, f"--out {str(out)!r} not refused (exit {rc})"
    assert tree(tmp_path) == before, "files changed although the command was refused"


def _forked(target):
    """``target()`` in a forked child (the library already imported: no start-up cost); returns the Process."""
    child = multiprocessing.get_context("fork").Process(target=target, daemon=True)
    child.start()
    return child


def _crash_when_moving_into(out, real):
    def move(src, dst, *args, **kwargs):
        if os.path.abspath(os.fspath(dst)) == os.path.abspath(out):
            os._exit(9)  # killed between moving the old adapter away and moving the new one in: no cleanup runs
        return real(src, dst, *args, **kwargs)

    return move


def _same_adapter(folder, reference):
    """Whether the adapter in ``folder`` holds the same ΔW as ``reference`` (False if none can be read)."""
    got, exc = outcome(load_peft_adapter, folder)
    if exc is not None:
        return False
    want, _ = load_peft_adapter(reference)
    return set(got[0]) == set(want) and all(np.allclose(got[0][m].to_dense(), want[m].to_dense()) for m in want)


def test_crash_while_replacing_an_adapter_leaves_one(tmp_path):
    ws = _workspace(tmp_path)
    out, new = tmp_path / "adapter", tmp_path / "new"
    extract_adapter(ws["base"], ws["ft"], out, rank=1)  # the adapter already there
    extract_adapter(ws["base"], ws["ft"], new, rank=2)  # what the interrupted run writes
    old = tmp_path / "old"
    extract_adapter(ws["base"], ws["ft"], old, rank=1)

    def interrupted_run():
        os.rename = _crash_when_moving_into(out, os.rename)  # in the child only
        os.replace = _crash_when_moving_into(out, os.replace)
        extract_adapter(ws["base"], ws["ft"], out, rank=2, overwrite=True)

    child = _forked(interrupted_run)
    child.join(120)
    assert child.exitcode in (0, 9), f"the interrupted run ended with {child.exitcode}"
    after_crash = sorted(os.listdir(out)) if out.is_dir() else "nothing"
    if not (_same_adapter(out, old) or _same_adapter(out, new)):  # a recovery on the next run is fine too
        outcome(extract_adapter, ws["base"], ws["ft"], out, rank=3)
    assert _same_adapter(out, old) or _same_adapter(out, new), (
        f"after the crash --out held {after_crash}; after the next run neither the old adapter nor the new one "
        f"(the folder holds {sorted(p.name for p in tmp_path.iterdir())})"
    )


# ---------------------------------------------------------------------------- 6. hangs
HANG_SECONDS = 5  # a right answer takes milliseconds


def test_fifo_named_safetensors_refused(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    answer = []
    reader = threading.Thread(target=lambda: answer.append(outcome(run_study, fifo, progress=False)), daemon=True)
    reader.start()
    reader.join(HANG_SECONDS)
    hung = reader.is_alive()
    if hung:  # release the blocked open(): a writer that closes at once (never blocks: O_NONBLOCK)
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(60)
    assert not hung, f"still blocked in open() after {HANG_SECONDS} s"
    _, exc = answer[0]
    assert_refused(exc, str(fifo))


def _regex_adapter(folder, module, config):
    """A LoRA adapter for ``module`` with a forged ``config`` (2 x 2 factors)."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, **config}))
    tensors = {f"base_model.model.{module}.lora_{x}.weight": np.ones((2, 2), "f4") for x in "AB"}
    save_file(folder / "adapter_model.safetensors", tensors)
    return folder


def _read_and_report(folder, pipe):
    """In a child: load_peft_adapter(folder), the outcome sent as one line."""
    try:
        load_peft_adapter(folder)
        pipe.send("read")
    except ValueError as exc:
        pipe.send(f"refused: {first_line(exc)}")
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        pipe.send(f"{type(exc).__name__} escaped: {first_line(exc)}")


@pytest.fixture(scope="module")
def pattern_readers(tmp_path_factory):
    """load_peft_adapter on each forged pattern in a forked child, all started at once with one deadline;
    ``finish(field)`` -> the child's one-line outcome, or None when it was still running at the deadline."""
    d = tmp_path_factory.mktemp("patterns")
    module = "a" * 40 + ".x"  # (a+)+$ against a run of a's that ends in a mismatch: exponential backtracking
    adapters = {
        "target_modules": _regex_adapter(d / "tm", module, {"target_modules": "(a+)+$"}),
        "rank_pattern": _regex_adapter(d / "rp", module, {"target_modules": ["x"], "rank_pattern": {"(a+)+$": 2}}),
    }
    pipes, children = {}, {}
    for field, folder in adapters.items():
        pipes[field], sender = multiprocessing.get_context("fork").Pipe(duplex=False)
        children[field] = _forked(functools.partial(_read_and_report, folder, sender))
    deadline = time.monotonic() + HANG_SECONDS

    def finish(field):
        if not pipes[field].poll(max(0.0, deadline - time.monotonic())):
            return None
        return pipes[field].recv()

    yield finish
    for child in children.values():
        child.kill()
        child.join()


@pytest.mark.parametrize("field", ["target_modules", "rank_pattern"])
def test_backtracking_pattern_cannot_hang_the_reader(pattern_readers, field):
    said = pattern_readers(field)
    assert said is not None, f"load_peft_adapter still matching {field} after {HANG_SECONDS} s"
    assert said.startswith(("read", "refused:")), said


# ---------------------------------------------------------------------------- hypothesis, one per root
CHANGES = (
    "none",
    "fine-tuned overwritten",
    "base overwritten",
    "one layer changed",
    "same bytes rewritten",
    "settings deleted, other budget",
    "budget changed",
    "line from another study",
)


@root_settings(4)
@given(
    change=st.sampled_from(CHANGES), kept=st.integers(0, len(NAMES)), rank=st.integers(1, 2), seed=st.integers(0, 99)
)
@example(change="one layer changed", kept=len(NAMES), rank=1, seed=0)
def test_resume_identity_root(change, kept, rank, seed):
    """Claim: whatever happens to the inputs, the settings or the log between a study stopped after ``kept``
    layers and its resumption, the resumed study refuses (a clear error), or returns exactly the rows of a
    study of the inputs it now reads; with nothing changed it must resume and return them."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = _weights(seed)
        tuned = _tuned(base, seed + 1)
        paths = _files(tmp, base, tuned)
        out = tmp / "s"
        run_study(*paths, out=out, budget_rank=rank, **STUDY)
        if change == "line from another study":
            other = _tuned(base, seed + 2)
            (tmp / "o").mkdir()
            run_study(*_files(tmp / "o", base, other), out=tmp / "o" / "s", budget_rank=rank, **STUDY)
            theirs = _log_records(tmp / "o" / "s")
        _keep_log_lines(out, kept)
        again = rank
        if change == "fine-tuned overwritten":
            tuned = _tuned(base, seed + 3)
            save_file(paths[1], tuned)
        elif change == "base overwritten":
            base = {n: w + np.float32(0.25) for n, w in base.items()}
            save_file(paths[0], base)
        elif change == "one layer changed":
            tuned = {**tuned, NAMES[-1]: _tuned(base, seed + 4)[NAMES[-1]]}
            save_file(paths[1], tuned)
        elif change == "same bytes rewritten":
            save_file(paths[1], tuned)
        elif change in ("settings deleted, other budget", "budget changed"):
            again = 3 - rank
            if change.startswith("settings"):
                (out / "study.json").unlink()
        elif change == "line from another study":
            log = out / "study.jsonl"
            log.write_text(log.read_text() + theirs[NAMES[kept % len(NAMES)]] + "\n")
        result, exc = outcome(run_study, *paths, out=out, budget_rank=again, **STUDY)
    if change == "none":
        assert exc is None, f"an unchanged study refused to resume: {first_line(exc)}"
    _refused_or_right(result, exc, _truth(base, tuned, again))


RELATIONS = {  # name: (--out from the workspace, True: must be refused / False: must be written / None: either)
    "empty": (lambda ws: "", True),
    "dot": (lambda ws: ".", True),
    "base folder": (lambda ws: ws["base"], True),
    "fine-tuned folder": (lambda ws: ws["ft"], True),
    "fine-tuned folder, trailing slash": (lambda ws: str(ws["ft"]) + os.sep, True),
    "fine-tuned folder through ..": (lambda ws: ws["base"] / ".." / "ft", True),
    "base folder, relative": (lambda ws: "base", True),
    "folder holding the inputs": (lambda ws: ws["data"], True),
    "grandparent of the inputs": (lambda ws: ws["data"].parent, True),
    "home": (lambda ws: ws["home"], True),
    "above home and inputs": (lambda ws: ws["root"], True),
    "symbolic link to the base folder": (lambda ws: ws["link"], None),
    "new folder inside the base folder": (lambda ws: ws["base"] / "adapter", None),
    "new sibling folder": (lambda ws: ws["data"].parent / "adapter", False),
    "new folder inside home": (lambda ws: ws["home"] / "adapters" / "a", False),
    "an earlier adapter": (lambda ws: ws["old"], False),
}


@root_settings(12)
@given(relation=st.sampled_from(sorted(RELATIONS)), overwrite=st.booleans())
@example(relation="fine-tuned folder through ..", overwrite=True)
def test_output_path_root(relation, overwrite):
    """Claim: whatever --out names, the inputs, the working directory's other files and $HOME's files are
    intact afterwards; an --out that is, or lies above, an input, the cwd or $HOME is refused; any other
    --out gets the adapter (an earlier adapter is replaced only with overwrite)."""
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        ws = _workspace(tmp)
        ws["link"] = ws["data"].parent / "link"
        ws["link"].symlink_to(ws["base"], target_is_directory=True)
        ws["old"] = ws["data"].parent / "old"
        extract_adapter(ws["base"], ws["ft"], ws["old"], rank=2)
        before = _protected(tree(ws["root"]))
        make, dangerous = RELATIONS[relation]
        with _inside(ws):
            out = make(ws)
            _guard(ws, out)
            _, exc = outcome(extract_adapter, ws["base"], ws["ft"], out, rank=1, overwrite=overwrite)
            target = Path(os.path.abspath(out))
            written = exc is None and _same_adapter_rank(target, 1)
        after = tree(ws["root"])
        lost = sorted(k for k, digest in before.items() if after.get(k) != digest)
        assert not lost, f"--out {str(out)!r} (overwrite={overwrite}) changed or removed {lost}"
    if dangerous:
        assert exc is not None, f"--out {str(out)!r} (overwrite={overwrite}) not refused"
    elif dangerous is False and (overwrite or relation != "an earlier adapter"):
        assert exc is None and written, f"--out {str(out)!r}: {first_line(exc) if exc else 'no adapter written'}"


def _same_adapter_rank(folder, rank):
    read, exc = outcome(load_peft_adapter, folder)
    return exc is None and all(int(sf.layout.ranks.sum()) + sf.global_rank == rank for sf in read[0].values())

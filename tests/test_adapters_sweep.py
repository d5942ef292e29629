"""Resumable sweeps, the joblib path and the Figure 2 protocol on tiny synthetic data."""

import io
import json
import os
import sys
import types

import numpy as np
import pytest

from blocklowrank.adapters import TrainingDivergedError
from blocklowrank.experiments import figure2
from blocklowrank.experiments.figure2 import figure2_configs, plot_figure2, run_figure2, skip_reason
from blocklowrank.sweep import RunLog, epoch_progress, run_sweep


# ---------------------------------------------------------------------------- run log
def test_runlog_append_load_and_torn_last_line(tmp_path):
    log = RunLog(tmp_path / "runs.jsonl")
    assert log.load() == {}
    log.append({"id": "a", "x": np.float32(1.5), "bad": float("nan"), "arr": np.arange(2)})
    log.append({"id": "b", "x": 2})
    assert set(log.load()) == {"a", "b"}
    assert log.load()["a"] == {"id": "a", "x": 1.5, "bad": None, "arr": [0, 1]}
    size = os.path.getsize(log.path)
    with open(log.path, "a") as f:
        f.write('{"id": "c", "x":')  # killed mid-write
    with pytest.warns(RuntimeWarning, match="incomplete"):
        assert set(log.load()) == {"a", "b"}
    assert os.path.getsize(log.path) == size  # torn line removed
    log.append({"id": "c"})
    assert set(log.load()) == {"a", "b", "c"}


def test_runlog_keeps_a_complete_last_line_that_does_not_parse(tmp_path):
    # a line that ends with a newline was written whole: it is not torn, so it
    # must never be deleted, even when it does not parse
    log = RunLog(tmp_path / "runs.jsonl")
    log.append({"id": "a"})
    with open(log.path, "a") as f:
        f.write('{"id": "b", "x\n')
    before = open(log.path, "rb").read()
    with pytest.warns(RuntimeWarning, match=r"runs\.jsonl: line 2 .*not a valid run record.*kept"):
        assert set(log.load()) == {"a"}  # not counted as a finished run
    assert open(log.path, "rb").read() == before  # kept, byte for byte
    # resume appends after it, and it is still there, still reported
    log.append({"id": "b"})
    with pytest.warns(RuntimeWarning, match="line 2"):
        assert set(log.load()) == {"a", "b"}
    assert open(log.path, "rb").read().startswith(before)


def test_runlog_keeps_bad_lines_anywhere_and_reports_each(tmp_path):
    p = tmp_path / "runs.jsonl"
    text = '{"id": "a"}\ngarbage\n\n[1, 2]\n{"no_id": 1}\n{"id": "z"}\n'
    p.write_text(text)
    with pytest.warns(RuntimeWarning) as caught:
        assert set(RunLog(p).load()) == {"a", "z"}  # no ValueError: the good runs still count
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3  # the blank line 3 is not reported
    for lineno, msg in zip((2, 4, 5), messages):
        assert msg.startswith(f"{p}: line {lineno} is not a valid run record")
    assert p.read_text() == text


def test_runlog_empty_file_and_missing_final_newline(tmp_path):
    p = tmp_path / "runs.jsonl"
    p.write_bytes(b"")
    assert RunLog(p).load() == {}
    assert p.read_bytes() == b""
    p.write_text('{"id": "a"}\n{"id": "b"}')  # a whole record that lost its newline: kept
    log = RunLog(p)
    assert set(log.load()) == {"a", "b"}
    assert p.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    log.append({"id": "c"})
    assert set(log.load()) == {"a", "b", "c"}


def test_runlog_append_after_a_torn_line_does_not_glue(tmp_path):
    # append without a load in between: the torn fragment is closed off and kept
    log = RunLog(tmp_path / "runs.jsonl")
    log.append({"id": "a"})
    with open(log.path, "a") as f:
        f.write('{"id": "b", "x":')
    log.append({"id": "c"})
    with pytest.warns(RuntimeWarning, match="line 2 is not a valid run record"):
        assert set(log.load()) == {"a", "c"}
    assert open(log.path).read().splitlines()[1] == '{"id": "b", "x":'


def _append_many(path, worker, n, size):
    log = RunLog(path)
    for i in range(n):
        log.append({"id": f"w{worker}-{i}", "payload": "x" * size})


def test_runlog_concurrent_appends_from_processes_never_interleave(tmp_path):
    # records far larger than a pipe or stdio buffer, four writers at once
    import multiprocessing as mp

    path = tmp_path / "runs.jsonl"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(path, w, 20, 200_000)) for w in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not one bad or torn line
        records = RunLog(path).load()
    assert set(records) == {f"w{w}-{i}" for w in range(4) for i in range(20)}
    assert len(path.read_text().splitlines()) == 80


def test_runlog_duplicates_keep_first(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"id": "a", "v": 1}\n{"id": "a", "v": 2}\n')
    assert RunLog(p).load()["a"]["v"] == 1


# ---------------------------------------------------------------------------- sweeps
class Boom(Exception):
    pass


def _task_fn(task, progress=False, live=False):
    if task.get("explode"):
        raise Boom(task["id"])
    if task.get("diverge"):
        raise TrainingDivergedError("loss became nan at epoch 3 (lr=5)", epoch=3, lr=5.0)
    rng = np.random.default_rng(task["seed"])
    return {"value": float(rng.random())}


def test_sweep_resumes_without_losing_or_duplicating(tmp_path):
    log = RunLog(tmp_path / "runs.jsonl")
    tasks = [{"id": f"t{i}", "seed": i} for i in range(6)]
    bad = [dict(t) for t in tasks]
    bad[3]["explode"] = True  # the sweep is "killed" at the 4th run
    with pytest.raises(Boom):
        run_sweep(bad, _task_fn, log, n_jobs=1, progress=False)
    assert set(log.load()) == {"t0", "t1", "t2"}
    res = run_sweep(tasks, _task_fn, log, n_jobs=1, progress=False)
    assert set(res) == {f"t{i}" for i in range(6)}
    lines = open(log.path).read().splitlines()
    assert len(lines) == 6 and len({json.loads(x)["id"] for x in lines}) == 6
    ref = run_sweep(tasks, _task_fn, RunLog(tmp_path / "fresh.jsonl"), n_jobs=1, progress=False)
    assert {k: v["value"] for k, v in res.items()} == {k: v["value"] for k, v in ref.items()}


def test_sweep_uses_only_records_of_the_same_task(tmp_path):
    """A logged record counts only for the task it was made for and only if the sweep's check accepts it;
    anything else is run again (with a warning) and the new record supersedes the stale one."""
    log = RunLog(tmp_path / "runs.jsonl")
    tasks = [{"id": f"t{i}", "seed": i} for i in range(3)]
    first = run_sweep(tasks, _task_fn, log, n_jobs=1, progress=False)
    other = [{"id": "t0", "seed": 7}, tasks[1], tasks[2]]  # same id, another task (other inputs)
    with pytest.warns(RuntimeWarning, match="'t0' is not used .*another task"):
        res = run_sweep(other, _task_fn, log, n_jobs=1, progress=False)
    assert res["t0"]["task"] == other[0] and res["t1"] == first["t1"]
    again = run_sweep(other, _task_fn, log, n_jobs=1, progress=False)  # the new record is found: nothing rerun
    assert again["t0"] == res["t0"] and len(open(log.path).read().splitlines()) == 4
    assert [r["task"]["seed"] for r in log.history()["t0"]] == [0, 7] and log.load()["t0"]["task"]["seed"] == 0
    with open(log.path, "a") as f:
        f.write(json.dumps({"id": "t1"}) + "\n")  # a line holding only an id
    seen = []
    with pytest.warns(RuntimeWarning, match="'t2' is not used \\(no thanks\\)"):
        run_sweep(other, _task_fn, log, n_jobs=1, progress=False,
                  check=lambda rec, task: seen.append(task["id"]) or ("no thanks" if task["id"] == "t2" else None))  # fmt: skip
    assert set(seen) == {"t0", "t1", "t2"}


def test_diverged_run_is_recorded_as_failed(tmp_path, capsys):
    log = RunLog(tmp_path / "runs.jsonl")
    tasks = [{"id": "ok", "seed": 0}, {"id": "nan", "seed": 1, "diverge": True}]
    res = run_sweep(tasks, _task_fn, log, n_jobs=1, progress=True)
    assert res["nan"]["status"] == "failed" and "epoch 3" in res["nan"]["error"]
    assert res["ok"]["status"] == "ok"
    out, err = capsys.readouterr()
    assert out == ""
    assert "[sweep] 2 runs: 0 already done, 2 to run" in err
    assert "[sweep] nan: FAILED: loss became nan at epoch 3" in err  # a line per run
    assert "2/2" in err and "failed=1" in err  # the bar, with the count of failed runs
    # a failed run counts as done: not rerun
    again = run_sweep(tasks, _task_fn, log, n_jobs=1, progress=False)
    assert again["nan"]["status"] == "failed"
    assert len(open(log.path).read().splitlines()) == 2


def test_sweep_joblib_two_workers_matches_sequential(tmp_path):
    tasks = [{"id": f"t{i}", "seed": i} for i in range(5)]
    a = run_sweep(tasks, _task_fn, RunLog(tmp_path / "a.jsonl"), n_jobs=1, progress=False)
    b = run_sweep(tasks, _task_fn, RunLog(tmp_path / "b.jsonl"), n_jobs=2, progress=False)
    assert {k: v["value"] for k, v in a.items()} == {k: v["value"] for k, v in b.items()}


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_sweep_without_progress_prints_nothing(tmp_path, capsys, n_jobs):
    tasks = [{"id": f"t{i}", "seed": i} for i in range(3)] + [{"id": "nan", "seed": 9, "diverge": True}]
    run_sweep(tasks, _task_fn, RunLog(tmp_path / "a.jsonl"), n_jobs=n_jobs, progress=False)
    assert capsys.readouterr() == ("", "")


def _live_task_fn(task, progress=False, live=False):
    with epoch_progress(task["id"], 4, enabled=live) as cb:
        for epoch in (1, 2, 3):  # early stopping: fewer epochs than the cap
            cb(epoch, types.SimpleNamespace(val_loss=[1.0 / epoch]))
    return {"live": live}


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_epoch_bars_only_for_runs_in_this_process(tmp_path, monkeypatch, n_jobs):
    # a per-epoch bar cannot be drawn below the sweep's bar from a worker process
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    res = run_sweep(
        [{"id": "r0"}, {"id": "r1"}], _live_task_fn, RunLog(tmp_path / f"{n_jobs}.jsonl"), n_jobs=n_jobs, name="demo"
    )
    assert [r["live"] for r in res.values()] == [n_jobs == 1] * 2
    text = term.getvalue()
    assert "[demo] r1: done" in text and "2/2" in text
    assert ("  r1:   0%" in text and "0/4 [" in text) == (n_jobs == 1)  # drawn when it starts


def test_epoch_progress_is_silent_off_a_terminal_or_when_disabled(capsys):
    for enabled in (True, False):  # stderr is captured here: not a terminal
        with epoch_progress("run", 3, enabled=enabled) as cb:
            cb(1, types.SimpleNamespace(val_loss=[]))
    assert capsys.readouterr() == ("", "")


def test_sweep_rejects_duplicate_ids(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        run_sweep([{"id": "a"}, {"id": "a"}], _task_fn, RunLog(tmp_path / "x.jsonl"))


# ---------------------------------------------------------------------------- figure 2
def _synthetic_mnist(n_train=700, n_test=300, seed=0):
    rng = np.random.default_rng(seed)
    protos = np.random.default_rng(42).random((10, 784))

    def make(n):
        y = rng.integers(0, 10, n)
        X = np.clip(protos[y] + 0.35 * rng.standard_normal((n, 784)), 0, 1)
        return (255 * X).astype(np.uint8).reshape(n, 28, 28), y.astype(np.uint8)

    a, b = make(n_train)
    c, d = make(n_test)
    return types.SimpleNamespace(train_images=a, train_labels=b, test_images=c, test_labels=d)


TINY_GRID = {
    "global": [{"n_blocks": 1, "rank": 2}],
    "diagonal": [{"n_blocks": 4, "rank": 2}, {"n_blocks": 16, "rank": 4}],
    "block": [{"n_blocks": 2, "rank": 1}],
}


def test_skip_rule_and_paper_grid():
    kept, skipped = figure2_configs()
    assert skip_reason("block", 16, 4) and skip_reason("block", 16, 2) is None
    assert skip_reason("global", 1, 32) is None  # 32 = 64 / 2
    assert skip_reason("diagonal", 2, 32) and skip_reason("diagonal", 2, 16) is None
    assert len(kept) + len(skipped) == 5 + 20 + 16
    loc = sorted((c["n_blocks"], c["rank"]) for c in kept if c["method"] == "block")
    assert loc == [(2, 2), (2, 4), (2, 8), (2, 16), (4, 2), (4, 4), (4, 8), (8, 2), (8, 4), (16, 2)]
    # budgets are multiples of 64 + 784
    assert all(c["n_params"] % 848 == 0 for c in kept)


def test_run_figure2_tiny_resume_and_determinism(tmp_path):
    data = _synthetic_mnist()
    kw = dict(seeds=2, epochs=2, lrs=(1e-3, 5e-3), grid=TINY_GRID, data=data, progress=False)
    out = tmp_path / "fig2"
    res = run_figure2(out, n_jobs=1, **kw)
    n_runs = (1 + 3) * 2 * 2  # (full + 3 kept configs) x lrs x seeds
    assert len(res.runs) == n_runs and all(r["status"] == "ok" for r in res.runs)
    assert len(res.skipped) == 1 and "min(m_i, n_j)/2" in res.skipped[0]["reason"]
    assert res.full_ft["n_params"] == 50_565
    assert {r["method"] for r in res.selected} == {"global", "diagonal", "block"}
    assert all(r["n_params"] == 1696 for r in res.selected)
    assert {c["other_method"] for c in res.comparisons} == {"LoRA", "MELoRA"}
    assert all(c["verdict"] for c in res.comparisons)
    for name in ("sweep.csv", "figure2_summary.txt", "figure2_runs.jsonl"):
        assert (out / name).exists()
    csv_text = (out / "sweep.csv").read_text()
    assert "skipped" in csv_text and csv_text.count("\n") == 1 + 4 * 2 + 1
    assert "Localized is" in res.summary and "Skip rule" in res.summary
    # a rerun does nothing new and gives the same table
    n_lines = len((out / "figure2_runs.jsonl").read_text().splitlines())
    res2 = run_figure2(out, n_jobs=1, **kw)
    assert len((out / "figure2_runs.jsonl").read_text().splitlines()) == n_lines
    assert [r["test_acc"] for r in res2.runs] == [r["test_acc"] for r in res.runs]
    # determinism: a fresh directory, two joblib workers, same numbers
    res3 = run_figure2(tmp_path / "fig2b", n_jobs=2, **kw)
    key = lambda r: r["id"]  # noqa: E731
    a = {key(r): (r["val_loss"], r["test_acc"]) for r in res.runs}
    b = {key(r): (r["val_loss"], r["test_acc"]) for r in res3.runs}
    assert a == b
    fig = plot_figure2(res, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 1000
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_run_figure2_records_diverged_runs(tmp_path):
    data = _synthetic_mnist(n_train=300, n_test=100)
    res = run_figure2(
        tmp_path, seeds=1, epochs=2, lrs=(1e30,), grid={"global": [{"rank": 2}]}, data=data, progress=False
    )
    assert all(r["status"] == "failed" for r in res.runs)
    assert all("lr=1e+30" in r["error"] for r in res.runs)
    assert res.selected == [] and res.full_ft is None
    assert "failed" in (tmp_path / "sweep.csv").read_text()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seeds=0), "seeds"),
        (dict(epochs=0), "epochs"),
        (dict(lrs=(-1.0,)), "lrs"),
        (dict(subset=3), "subset"),
        (dict(grid={"weird": [{"rank": 1}]}), "unknown method"),
    ],
)
def test_run_figure2_bad_arguments(tmp_path, kwargs, match):
    data = _synthetic_mnist(n_train=100, n_test=50)
    with pytest.raises(ValueError, match=match):
        run_figure2(tmp_path, data=data, progress=False, **kwargs)


def test_run_figure2_bad_data(tmp_path):
    data = _synthetic_mnist(n_train=100, n_test=50)
    data.train_labels = data.train_labels.astype(int) + 5
    with pytest.raises(ValueError, match="digits 0-9"):
        run_figure2(tmp_path, data=data, progress=False)
    data = _synthetic_mnist(n_train=100, n_test=50)
    data.train_images = data.train_images[:, :20]
    with pytest.raises(ValueError, match="images"):
        run_figure2(tmp_path, data=data, progress=False)


def test_pareto_frontier():
    assert figure2._pareto([(1, 5), (2, 3), (3, 4), (4, 1)]) == [(1, 5), (2, 3), (4, 1)]


@pytest.mark.parametrize("backend", ["threading", "multiprocessing"])
def test_sweep_follows_joblib_parallel_config(tmp_path, backend):
    # a cluster backend (dask, ray) is selected the same way; multiprocessing has no
    # result generator, which exercises the chunked fallback
    import joblib

    tasks = [{"id": f"t{i}", "seed": i} for i in range(5)]
    ref = run_sweep(tasks, _task_fn, RunLog(tmp_path / "ref.jsonl"), n_jobs=1, progress=False)
    with joblib.parallel_config(backend=backend):
        got = run_sweep(tasks, _task_fn, RunLog(tmp_path / "b.jsonl"), n_jobs=2, progress=False)
    assert {k: v["value"] for k, v in got.items()} == {k: v["value"] for k, v in ref.items()}
    assert len(open(tmp_path / "b.jsonl").read().splitlines()) == 5


# ---------------------------------------------------------------------------- property: no data lost
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    ids=st.lists(st.text("abc", min_size=1, max_size=3), min_size=1, max_size=5, unique=True),
    tail=st.one_of(st.just(""), st.text(st.characters(codec="utf-8", exclude_characters="\n\r"), max_size=12)),
    complete=st.booleans(),
)
def test_runlog_repair_never_loses_a_complete_line(tmp_path_factory, ids, tail, complete):
    """Claim: load() removes bytes only when the last line is torn (no final newline) and
    does not parse; every complete line survives byte for byte and every valid record counts."""
    import warnings

    p = tmp_path_factory.mktemp("log") / "runs.jsonl"
    good = "".join(json.dumps({"id": i}) + "\n" for i in ids)
    text = good + tail + ("\n" if complete and tail else "")
    p.write_bytes(text.encode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        runs = RunLog(p).load()
    assert set(ids) <= set(runs)
    after = p.read_bytes().decode()
    assert after.startswith(good)
    if complete or not tail:
        assert after == text  # nothing written whole is ever removed
    else:
        try:
            json.loads(tail)
            parses = True
        except ValueError:
            parses = False
        assert after in (good, text, text + "\n") and (parses or after == good)

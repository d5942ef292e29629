"""Resumable, parallel sweeps of training runs.

- :class:`RunLog`: one JSON line per finished run, appended with fsync.
  Reading it drops only a torn last line (a run killed mid-write is simply
  run again), keeps and reports any other line that is not a record, and
  never yields a run twice.
- :func:`run_sweep`: runs the tasks not yet in the log through
  :class:`joblib.Parallel`, appending each result as it arrives. A logged
  record counts as done only when it was made for that very task (its
  ``task`` equals the task, as JSON) and passes the sweep's own ``check``;
  any other (a line copied from another sweep, a record of other inputs, a
  damaged one) is reported and its task run again. Progress shows as a
  ``tqdm`` progress bar (a widget in notebooks) advanced in this process as
  results come back, a line per finished run written through it, and
  per-epoch bars (:func:`epoch_progress`) for runs executed in this
  process. tqdm is optional (the ``progress`` extra): without it a run
  warns once, in one line, and goes on with its lines but no bar.
  Because it only uses ``joblib.Parallel``,
  any joblib backend works without code change, e.g. on a cluster::

      from dask.distributed import Client
      import joblib
      client = Client("scheduler:8786")
      with joblib.parallel_config(backend="dask"):
          run_figure2("results", n_jobs=-1)

  (Ray: ``from ray.util.joblib import register_ray; register_ray()`` then
  ``backend="ray"``.)
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
import warnings

import numpy as np
from joblib import Parallel, delayed, effective_n_jobs

from ._extras import MissingExtraError, require

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["RunLog", "run_sweep", "epoch_progress", "jsonable", "canonical", "RunFailed"]


class RunFailed(FloatingPointError):
    """A run that failed in a way worth recording (e.g. a diverged training loss): the
    sweep stores a 'failed' record with the message and the ``epoch`` attribute."""

    epoch = None


class _NoBar:
    """What a run uses of a ``tqdm`` bar, without drawing one: lines are printed, the rest does nothing."""

    n = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, line, file=None):
        print(line, file=file or sys.stderr, flush=True)

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass


@functools.cache
def _tqdm():
    """``tqdm.auto.tqdm``, or None after one warning line when tqdm is not installed."""
    try:
        return require("tqdm.auto").tqdm
    except MissingExtraError as exc:
        warnings.warn(f"{exc}; running without one", RuntimeWarning, stacklevel=4)
        return None


def _bar(enabled, **kwargs):
    """A ``tqdm.auto`` bar when ``enabled`` and tqdm is installed, else a :class:`_NoBar`."""
    tqdm = _tqdm() if enabled else None
    return _NoBar() if tqdm is None else tqdm(**kwargs)


def jsonable(obj):
    """Plain-JSON version of ``obj``: numpy scalars/arrays to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


class RunLog:
    """An append-only JSON-lines file of finished runs, keyed by ``record["id"]``.

    What :meth:`load` does with each kind of line:

    - a record (a JSON object with an ``"id"``) ending with a newline: a
      finished run; a repeated id keeps the first record (:meth:`history`
      gives them all, in order: :func:`run_sweep` uses the last one made for
      its task);
    - a last line without a final newline that does not parse: torn (a run
      killed while its line was being written). It is the only thing ever
      removed from the file, with a ``RuntimeWarning``; that run is redone;
    - a last record without a final newline that parses: kept and counted
      (a record cannot be a proper prefix of another), and the newline is
      added so that the next append starts a line of its own;
    - any other line ending with a newline that is not a record, wherever
      it stands: kept in the file byte for byte and reported on every load
      with a ``RuntimeWarning`` naming the file and the line number. It is
      not counted as a finished run, so a resumed sweep runs that task again
      and appends its record after it. Fix or delete such a line by hand;
    - blank lines: ignored.

    :meth:`append` never glues a record onto an unterminated last line: it
    starts a new line first, so a torn line left by a killed writer becomes
    a kept, reported line instead of swallowing the new record.

    Reading and appending hold an exclusive ``flock`` on the file (where the
    platform has one), and each record is one ``write`` to a descriptor
    opened with ``O_APPEND``: appends from several processes never
    interleave within a line, and the repair of a torn line cannot cut off
    a record that another process appended meanwhile.

    Parameters
    ----------
    path : str or path-like

    Examples
    --------
    >>> import tempfile, os
    >>> from blocklowrank.sweep import RunLog
    >>> d = tempfile.mkdtemp()
    >>> log = RunLog(os.path.join(d, "runs.jsonl"))
    >>> log.append({"id": "a", "acc": 0.9})
    >>> with open(log.path, "a") as f:
    ...     _ = f.write('{"id": "b", "ac')   # a run killed while writing
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     sorted(log.load())   # the torn line is dropped, with a RuntimeWarning
    ['a']
    >>> len(caught)
    1
    """

    def __init__(self, path):
        self.path = os.fspath(path)

    def load(self):
        """``{id: record}`` of the finished runs; repairs a torn last line (see the class)."""
        return {i: recs[0] for i, recs in self.history().items()}

    def history(self):
        """``{id: [record, ...]}``: every record of each id, in the order of the file (see :meth:`load`)."""
        if not os.path.exists(self.path):
            return {}
        try:
            f = open(self.path, "r+b")
        except OSError:  # a read-only log: read it, repair nothing
            f = open(self.path, "rb")
        with f, _locked(f):
            raw = f.read()
            records, torn_at = self._parse(raw)
            if f.writable() and raw[-1:] not in (b"", b"\n"):
                if torn_at is None:
                    f.write(b"\n")  # a whole record that lost its newline
                else:
                    f.truncate(torn_at)
                f.flush()
                os.fsync(f.fileno())
        return records

    def _parse(self, raw):
        """``(records, torn_at)``: the records, and where a torn last line starts (or None)."""
        records = {}
        lines = raw.split(b"\n")  # the last item is b"" when the file ends with a newline
        pos = 0
        for lineno, line in enumerate(lines, 1):
            last = lineno == len(lines)
            rec = _record(line)
            if rec is not None:
                records.setdefault(rec["id"], []).append(rec)
            elif last and line.strip():
                warnings.warn(
                    f"{self.path}: line {lineno} is incomplete (a run interrupted while being "
                    "written); it is discarded and that run will be redone",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return records, pos
            elif line.strip():
                warnings.warn(
                    f"{self.path}: line {lineno} is not a valid run record; it is kept in the "
                    "file but not counted as a finished run (fix or delete it by hand)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            pos += len(line) + 1
        return records, None

    def append(self, record):
        """Append one record as a JSON line (one ``write``), then fsync."""
        line = json.dumps(jsonable(record), sort_keys=True, allow_nan=False)
        if "\n" in line:  # pragma: no cover - json.dumps never emits raw newlines
            raise ValueError("record serialises with a newline")
        d = os.path.dirname(self.path)
        if d:
            os.makedirs(d, exist_ok=True)
        data = (line + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        with os.fdopen(fd, "r+b", buffering=0) as f, _locked(f):
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    data = b"\n" + data  # never glue a record onto an unterminated line
            view = memoryview(data)
            while view:  # one write, unless the system splits it
                view = view[f.write(view) :]
            os.fsync(fd)


def _record(line):
    """The run record on ``line``, or None if it holds none."""
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)) else None


def canonical(obj):
    """``obj`` as it comes back from a JSON log: :func:`jsonable`, then through ``json`` (tuples become lists).

    Raises TypeError for what JSON cannot hold (a set, an arbitrary object).
    """
    return json.loads(json.dumps(jsonable(obj), sort_keys=True, allow_nan=False))


def _done(history, task, check, path):
    """The last logged record made for ``task`` that passes ``check``, or None (with a warning if any was stale)."""
    want = canonical(task)
    reasons = []
    for rec in reversed(history.get(task["id"], ())):
        if "task" not in rec:
            problem = "it records no task"
        elif rec["task"] != want:
            problem = "it was made for another task: other inputs, settings or paths"
        else:
            problem = check(rec, task) if check else None
        if problem is None:
            return rec
        reasons.append(problem)
    if reasons:
        warnings.warn(
            f"{path}: the record of {task['id']!r} is not used ({reasons[0]}); that run is done again",
            RuntimeWarning,
            stacklevel=3,
        )
    return None


@contextlib.contextmanager
def _locked(f):
    """Hold an exclusive advisory lock on the open file ``f`` (a no-op without ``fcntl``)."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def epoch_progress(label, epochs, *, enabled=True):
    """A per-run progress bar over the epochs; yields ``callback(epoch, history)`` for :func:`train`.

    Meant for a run that executes in the process showing the sweep's bar
    (``live=True`` in :func:`run_sweep`): it is drawn below that bar and
    removed when the run ends (early stopping may end it before
    ``epochs``). Like any ``tqdm`` bar with ``disable=None``, it is not drawn
    when stderr is not a terminal, so logs get no per-epoch lines.

    Parameters
    ----------
    label : str
    epochs : int
        The most epochs the run may take.
    enabled : bool, default=True
        False: the callback does nothing.
    """
    with _bar(enabled, total=epochs, desc=f"  {label}", unit="epoch", leave=False, disable=None) as bar:

        def callback(epoch, hist):
            if hist.val_loss:
                bar.set_postfix(val_loss=f"{hist.val_loss[-1]:.4f}", refresh=False)
            bar.update(epoch - bar.n)

        yield callback


def _outcome(record):
    """One line on a finished run: its summary, or why it failed."""
    if record.get("status") != "ok":
        return "FAILED: " + str(record.get("error", ""))[:80]
    return record.get("summary") or "done"


def _call(fn, task, progress_live, progress):
    """Run one task in a worker; a diverged run becomes a 'failed' record."""
    t0 = time.perf_counter()
    try:
        rec = fn(task, progress=progress, live=progress_live)
        rec.setdefault("status", "ok")
    except RunFailed as exc:
        rec = {"status": "failed", "error": str(exc), "failed_epoch": exc.epoch}
    rec["id"] = task["id"]
    rec["task"] = task
    rec.setdefault("seconds", time.perf_counter() - t0)
    return rec


def run_sweep(tasks, fn, log, *, n_jobs=1, progress=True, name="sweep", label=None, check=None):
    """Run every task not done in ``log``; return ``{id: record}`` for all tasks.

    Parameters
    ----------
    tasks : list of dict
        Each with a unique ``"id"``; passed to ``fn``.
    fn : callable
        ``fn(task, progress=bool, live=bool) -> dict`` (picklable, e.g. a
        module-level function or a ``functools.partial`` of one). ``live``
        is True when the run executes in this process (``n_jobs=1``) with
        progress on: ``fn`` may then draw a per-epoch bar with
        :func:`epoch_progress`; in a worker process it should print nothing
        (the finished run is reported here). It may
        raise :class:`RunFailed` (e.g. a diverged training loss): the run is then recorded with
        ``status="failed"``. Any other exception stops the sweep (runs
        already finished stay in the log).
    log : RunLog
    n_jobs : int, default=1
        Passed to :class:`joblib.Parallel`; the backend comes from
        ``joblib.parallel_config`` (loky processes by default).
    progress : bool, default=True
        A ``tqdm.auto`` bar over the runs on stderr (advanced in this
        process as results come back, with the count of failed runs), and a
        line per finished run written through it. False: nothing is printed.
    name : str, default="sweep"
        The bar's description and the prefix of its lines.
    label : callable, optional
        ``label(task) -> str`` for progress lines.
    check : callable, optional
        ``check(record, task) -> None or str``: why a logged record of the
        task cannot be used (e.g. a missing key, a file it points to that
        changed). A task counts as done when the log holds a record whose
        ``task`` is the task (compared as JSON: :func:`canonical`) and that
        passes ``check``; otherwise it is run again, with a
        ``RuntimeWarning`` naming the log and the task (the stale lines stay
        in the log; a later valid record supersedes them).
    """
    ids = [t["id"] for t in tasks]
    if len(set(ids)) != len(ids):
        raise ValueError("task ids must be unique")
    history = log.history()
    found = {t["id"]: _done(history, t, check, log.path) for t in tasks}
    done = {i: rec for i, rec in found.items() if rec is not None}
    todo = [t for t in tasks if t["id"] not in done]
    label = label or (lambda t: t["id"])
    results = {i: done[i] for i in ids if i in done}
    # Per-epoch bars only where the runs execute in this process, one at a
    # time: a worker process cannot draw below this process's bar.
    live = bool(progress) and n_jobs == 1
    by_id = {t["id"]: t for t in todo}
    bar = _bar(progress, total=len(tasks), initial=len(results), desc=name, unit="run", dynamic_ncols=True)
    if progress:
        bar.write(f"[{name}] {len(tasks)} runs: {len(results)} already done, {len(todo)} to run",
                  file=sys.stderr)  # fmt: skip

    n_failed = sum(r.get("status") != "ok" for r in results.values())

    def _consume(recs):
        nonlocal n_failed
        for rec in recs:
            log.append(rec)
            results[rec["id"]] = rec
            n_failed += rec.get("status") != "ok"
            if progress:
                bar.write(f"[{name}] {label(by_id[rec['id']])}: {_outcome(rec)}", file=sys.stderr)
            if n_failed:
                bar.set_postfix(failed=n_failed, refresh=False)
            bar.update()

    with bar:
        if not todo:
            return results
        jobs = (delayed(_call)(fn, t, live, progress) for t in todo)
        try:
            gen = Parallel(n_jobs=n_jobs, return_as="generator_unordered", batch_size=1)(jobs)
        except ValueError as exc:  # backend without result generators: run in chunks
            if "return_as" not in str(exc):
                raise
            par = Parallel(n_jobs=n_jobs, batch_size=1)
            step = 2 * max(1, effective_n_jobs(n_jobs))
            for s in range(0, len(todo), step):
                _consume(par(delayed(_call)(fn, t, live, progress) for t in todo[s : s + step]))
            return results
        _consume(gen)
    return results

"""Shared helpers of the issue-17 tests (real models, no silent wrong answers).

Every test asserts the right behaviour as a user sees it (each failed, as a
strict xfail, on the code it was written against). A refusal is
judged like a user would: an exception is an answer (:func:`outcome`), a good
one only when it is a clear error naming what is wrong (:func:`assert_refused`).
"""

import contextlib
import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest


def minilm_checkpoint_or_skip(required):
    """all-MiniLM-L6-v2's ``model.safetensors`` (the realweights extra), else a skip; ``required`` (what
    ``make test`` sets): the missing package is a failure, not a skip."""
    from blocklowrank.experiments import realweights as rw

    try:
        return rw.minilm_checkpoint()
    except FileNotFoundError as exc:
        if required:
            raise
        pytest.skip(str(exc))


def run_study(*args, **kwargs):
    """``run_study`` from its home, :mod:`blocklowrank.study` (the one place to change when it moves)."""
    from blocklowrank.study import run_study as study

    return study(*args, **kwargs)


@contextlib.contextmanager
def no_figures():
    """Studies write their tables but draw no figure (matplotlib's ``Figure.savefig`` does nothing).

    The claims here are about a study's rows; drawing its two figures is
    about 90% of a small study's time.
    """
    from matplotlib.figure import Figure

    saved = Figure.savefig
    Figure.savefig = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        Figure.savefig = saved


def root_settings(max_examples):
    """Hypothesis settings of a per-root property: deterministic, few examples, no shrinking (a strict xfail
    must not spend minutes shrinking), the first failure reported."""
    from hypothesis import HealthCheck, Phase, settings

    return settings(
        max_examples=max_examples,
        derandomize=True,
        deadline=None,
        database=None,
        phases=(Phase.explicit, Phase.generate),
        report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow],
    )


def outcome(fn, *args, **kwargs):
    """``(result, None)`` or ``(None, exception)``: an exception is an answer to judge, not a crash."""
    try:
        return fn(*args, **kwargs), None
    except Exception as exc:  # noqa: BLE001 - judged by the caller
        return None, exc


def first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def assert_refused(exc, *words):
    """``exc`` is a clear error (ValueError, TypeError or OSError) whose first line names every word.

    A word may be a tuple of alternatives (any one of them will do); case is ignored.
    """
    assert exc is not None, f"not refused: it ran to the end (expected an error naming {list(words)})"
    assert isinstance(exc, (ValueError, TypeError, OSError)), (
        f"{type(exc).__name__} escaped instead of one clear error: {first_line(exc)}"
    )
    line = first_line(exc).lower()
    missing = [w for w in words if not any(a.lower() in line for a in (w if isinstance(w, tuple) else (w,)))]
    assert not missing, f"the error does not name {missing}: {first_line(exc)}"


def cli(args):
    """``blocklowrank ARGS`` in this process: (exit code, stdout, stderr)."""
    from blocklowrank.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def tree(root):
    """``{relative path: sha256}`` of every file under ``root`` (symbolic links as their target text)."""
    root = Path(root)
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            files[str(path.relative_to(root))] = "-> " + os.readlink(path)
        elif path.is_file():
            files[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def truncated_error(delta, rank):
    """Relative Frobenius error of the best rank-``rank`` approximation of ``delta`` (NumPy SVD)."""
    s = np.linalg.svd(np.asarray(delta, np.float64), compute_uv=False)
    return float(np.sqrt((s[rank:] ** 2).sum() / (s**2).sum()))


def truncated(delta, rank):
    """The best rank-``rank`` approximation of ``delta`` (NumPy SVD, float64)."""
    U, s, Vt = np.linalg.svd(np.asarray(delta, np.float64), full_matrices=False)
    return (U[:, :rank] * s[:rank]) @ Vt[:rank]

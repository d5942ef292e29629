"""Hostile-input pass, part 2 (issue 12): CLI, extreme values, array types, promises, friction.

Same rules as ``test_hostile.py``: each ``xfail(strict=True)`` test asserts the
right behaviour and fails today. The CLI tests never start real work: the
experiment runners are replaced by fakes that raise (or record) when called.
"""

import contextlib
import io
import itertools
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import blocklowrank  # noqa: E402
import blocklowrank._engine as engine  # noqa: E402  (block_spectra)
import blocklowrank.cli as cli  # noqa: E402
from blocklowrank import (  # noqa: E402
    BlockLayout,
    BlockLowRank,
    DiagonalBlockLowRank,
    GlobalLowRank,
    HybridLowRank,
    SharedBasisLowRank,
    approximate,
    compare_at_budget,
    fit_hybrid,
    fit_shared_basis,
    permutations,  # noqa: E402
)

CLEAR = (ValueError, TypeError)
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None)


def _X(m=8, n=8, seed=0):
    return np.random.default_rng(seed).standard_normal((m, n))


def _block_error(X, K, r):
    """Relative error of rank r on every block of an even K x K grid: per-block SVD loop."""
    X = np.asarray(X, np.float64)
    tot = kept = 0.0
    for rows in np.array_split(np.arange(X.shape[0]), K):
        for cols in np.array_split(np.arange(X.shape[1]), K):
            s = np.linalg.svd(X[np.ix_(rows, cols)], compute_uv=False)
            tot += (s**2).sum()
            kept += (s[:r] ** 2).sum()
    return np.sqrt(max(tot - kept, 0) / tot)


def _unit(X):
    """X scaled by an exact power of two so that its largest entry is in [0.5, 1)."""
    X = np.asarray(X, np.float64)
    return np.ldexp(X, -np.frexp(np.abs(X).max())[1])


def _true_error(X, R):
    """||X - R|| / ||X|| without overflow/underflow (both scaled by the same power of two)."""
    e = np.frexp(np.abs(np.asarray(X, np.float64)).max())[1]
    Xs = np.ldexp(np.asarray(X, np.float64), -e)
    Rs = np.ldexp(np.asarray(R, np.float64), -e)
    return np.linalg.norm(Xs - Rs) / np.linalg.norm(Xs)


# =============================================================================
# Class 5: the command line turns nonsense into work
# =============================================================================
class RunnerCalled(Exception):
    """Raised by the fake experiment runners (not caught by the CLI)."""


_RUNNERS = {
    "blocklowrank.experiments.figure2": "run_figure2",
    "blocklowrank.experiments.table1": "run_table1",
    "blocklowrank.experiments.study": "run_study",
    "blocklowrank.experiments.structures": "run_structures",
}


def _patch_runners(mp, record=None):
    """Replace the experiment runners: raise RunnerCalled, or record kwargs and return [] if ``record``."""
    import importlib

    for mod, name in _RUNNERS.items():
        m = importlib.import_module(mod)

        def fake(*args, _name=name, **kw):
            if record is None:
                raise RunnerCalled(f"{_name} started with {kw}")
            record.append((_name, kw))
            return {} if _name == "run_figure2" else []

        mp.setattr(m, name, fake)
    if record is not None:
        mp.setattr(importlib.import_module("blocklowrank.experiments.figure2"), "plot_figure2", lambda *a, **k: None)


def _cli(args):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = cli.main([str(a) for a in args])
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def _assert_cli_error(rc, err, *words):
    assert rc == 2, f"exit code {rc}, stderr {err!r}"
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.match(r"blocklowrank.*: error: ", last), err
    for w in words:
        assert w in last, f"{w!r} not in {last!r}"


@pytest.mark.parametrize(
    "opt",
    [
        ("--epochs", 0),
        ("--epochs", -3),
        ("--seeds", 0),
        ("--seeds", -1),
        ("--subset", 0),
        ("--subset", -5),
        ("--n-jobs", 0),
    ],
    ids=lambda o: f"{o[0]}={o[1]}",
)
def test_figure2_nonsense_counts_refused(tmp_path, monkeypatch, opt):
    _patch_runners(monkeypatch)
    rc, _, err = _cli(["reproduce", "figure2", "--out", tmp_path, opt[0], opt[1]])
    _assert_cli_error(rc, err, opt[0].lstrip("-").split("-")[0])


@pytest.mark.parametrize(
    "args,word",
    [
        (["reproduce", "table1", "--seeds", "5"], "seeds"),
        (["reproduce", "table1", "--epochs", "5"], "epochs"),
        (["reproduce", "study", "--subset", "50"], "subset"),
        (["reproduce", "structures", "--n-jobs", "2"], "n-jobs"),
    ],
)
def test_reproduce_ignored_option_mentioned(tmp_path, monkeypatch, args, word):
    calls = []
    _patch_runners(monkeypatch, record=calls)
    rc, out, err = _cli(args + ["--out", tmp_path])
    assert word in err, f"--{word} silently ignored (rc={rc})"


@pytest.fixture
def npy(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, _X())
    return p


@pytest.mark.parametrize(
    "extra,word",
    [
        (["--method", "global", "--n-blocks", "3"], "n-blocks"),
        (["--key", "a"], "key"),
        (["--svd-solver", "full", "--random-state", "5"], "random-state"),
    ],
)
def test_approximate_ignored_option_mentioned(npy, tmp_path, extra, word):
    rc, out, err = _cli(["approximate", npy, "--rank", "1", "--out", tmp_path / "o.npy"] + extra)
    assert word in err, f"--{word} silently ignored (rc={rc})"


def _forged_npy(path, shape):
    hdr = repr({"descr": "<f8", "fortran_order": False, "shape": shape}).encode()
    hdr = hdr + b" " * (118 - len(hdr)) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(hdr).to_bytes(2, "little") + hdr)
    return path


def _damaged_inputs(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, a=_X())
    raw = good.read_bytes()
    half_npy = tmp_path / "half.npy"
    np.save(half_npy, _X())
    return {
        "half.npz": lambda p: p.write_bytes(raw[: len(raw) // 2]),
        "empty.npy": lambda p: p.write_bytes(b""),
        "terabyte.npy": lambda p: _forged_npy(p, (400000, 400000)),
        "half.npy": lambda p: p.write_bytes(half_npy.read_bytes()[:200]),
        "junk.npz": lambda p: p.write_bytes(b"junkjunkjunk"),
    }


@pytest.mark.parametrize("name", ["half.npz", "empty.npy", "terabyte.npy", "half.npy", "junk.npz"])
def test_approximate_damaged_input(tmp_path, name):
    p = tmp_path / name
    _damaged_inputs(tmp_path)[name](p)
    try:
        rc, _, err = _cli(["approximate", p, "--rank", "1", "--out", tmp_path / "o.npy"])
    except (MemoryError, EOFError, Exception) as exc:  # noqa: B014 - anything escaping main is the defect
        pytest.fail(f"{type(exc).__name__} escaped the CLI: {exc}")
    _assert_cli_error(rc, err, name)


def test_budget_large_shape_shows_progress_or_refuses():
    root = str(Path(blocklowrank.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "blocklowrank", "budget", "100000x100000", "100000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        out, err = proc.communicate(timeout=5)
        return  # finished (or refused) quickly: fine
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert err.strip() or out.strip(), "no output after 5 s of work"


@FUZZ
@given(
    epochs=st.one_of(st.none(), st.integers(-2, 3)),
    seeds=st.one_of(st.none(), st.integers(-2, 3)),
    subset=st.one_of(st.none(), st.sampled_from([-1, 0, 5, 10, 50])),
    n_jobs=st.one_of(st.none(), st.integers(-2, 2)),
)
def test_fuzz_figure2_options(tmp_path_factory, epochs, seeds, subset, n_jobs):
    args = ["reproduce", "figure2", "--out", tmp_path_factory.mktemp("r"), "-q"]
    for opt, v in (("--epochs", epochs), ("--seeds", seeds), ("--subset", subset), ("--n-jobs", n_jobs)):
        if v is not None:
            args += [opt, v]
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        _patch_runners(mp, record=calls)
        rc, _, err = _cli(args)
    if calls:
        kw = calls[0][1]
        assert rc == 0
        assert kw["epochs"] >= 1 and kw["seeds"] >= 1 and kw["n_jobs"] != 0
        assert kw["subset"] is None or kw["subset"] >= 10
        assert epochs is None or kw["epochs"] == epochs, "typed --epochs replaced"
    else:
        _assert_cli_error(rc, err)


def test_cli_plain_errors_are_one_line(npy, tmp_path):
    """Already right today: bad values of approximate/budget give one clear line, exit 2."""
    for args in (
        ["approximate", npy, "--rank", "0"],
        ["approximate", npy, "--max-error", "nan"],
        ["approximate", tmp_path / "nope.npy", "--rank", "1"],
        ["budget", "0x28", "10"],
        ["budget", "28x28", "-5"],
    ):
        rc, _, err = _cli(args)
        _assert_cli_error(rc, err)
        assert len(err.strip().splitlines()) == 1


# =============================================================================
# Class 6: extreme but finite input
# =============================================================================
EXTREME = [
    pytest.param(np.float64, 1000, id="f64-2^1000"),
    pytest.param(np.float64, -1000, id="f64-2^-1000"),
    pytest.param(np.float64, -1050, id="f64-subnormal"),
    pytest.param(np.float32, 126, id="f32-2^126"),
    pytest.param(np.float32, -135, id="f32-subnormal"),
]


def _extreme(dtype, e, m=8, n=8):
    return np.ldexp(_unit(_X(m, n)), e).astype(dtype)


@pytest.mark.parametrize("dtype,e", EXTREME)
def test_approximate_error_extreme(dtype, e):
    X = _extreme(dtype, e)
    a = approximate(X, method="block", n_blocks=2, rank=1)
    rtol = 1e-6 if dtype == np.float64 else 1e-3
    assert a.error == pytest.approx(_block_error(_unit(X), 2, 1), rel=rtol)


@pytest.mark.parametrize("e", [1000, -1000], ids=["huge", "tiny"])
def test_approximate_budget_extreme(e):
    X = _extreme(np.float64, e)
    a = approximate(X, method="block", n_blocks=2, budget=32)
    assert np.isfinite(a.error)
    assert a.error == pytest.approx(_true_error(X, a.reconstruction), rel=1e-6)


@pytest.mark.parametrize("solver", ["full", "randomized"])
def test_float32_near_max_global(solver):
    X = (_X() * 1e38).astype(np.float32)  # finite: largest entry 2.3e38 < 3.4e38
    try:
        a = approximate(X, method="global", rank=1, svd_solver=solver, random_state=0)
    except ValueError:
        return  # a clear refusal is fine
    assert np.all(np.isfinite(a.reconstruction)) and np.isfinite(a.error)
    assert a.error == pytest.approx(_true_error(X, a.reconstruction), rel=1e-3)


@pytest.mark.parametrize("e", [1000, -1000])
def test_tol_extreme_keeps_promise(e):
    X = _extreme(np.float64, e)
    a = approximate(X, method="block", n_blocks=2, max_error=0.3)
    assert _true_error(X, a.reconstruction) <= 0.3 + 1e-9


@pytest.mark.parametrize("dtype,e", [(np.float64, 1000), (np.float64, -1000), (np.float32, 126), (np.float32, -135)])
def test_estimator_error_and_score_extreme(dtype, e):
    X = _extreme(dtype, e)
    ref = _block_error(_unit(X), 2, 1)
    est = BlockLowRank(n_blocks=2, rank=1).fit(X)
    rtol = 1e-6 if dtype == np.float64 else 1e-3
    assert est.error_ == pytest.approx(ref, rel=rtol)
    assert est.score(X) == pytest.approx(-ref, rel=rtol)


@pytest.mark.parametrize("e", [1000, -1000])
def test_block_spectra_extreme(e):
    X = _extreme(np.float64, e)
    assert float(engine.block_spectra(X, BlockLayout.block(np.shape(X)[-2:], 2)).error(1)) == pytest.approx(
        _block_error(_unit(X), 2, 1), rel=1e-6
    )


@pytest.mark.parametrize("e", [1000, -1000])
def test_compare_at_budget_extreme(e):
    X = _extreme(np.float64, e)
    s = np.linalg.svd(_unit(X), compute_uv=False)
    for rec in compare_at_budget(X, 64):
        assert np.isfinite(rec["error"]) and 0 < rec["error"] < 1, rec
        if rec["method"] == "global" and isinstance(rec["rank"], int):
            r = rec["rank"]
            assert rec["error"] == pytest.approx(np.sqrt((s[r:] ** 2).sum() / (s**2).sum()), rel=1e-6)


@pytest.mark.parametrize("e", [1000, -1000, -530])
@pytest.mark.parametrize("which", ["hybrid", "shared"])
def test_hybrid_shared_extreme(which, e):
    X = _extreme(np.float64, e)
    if which == "hybrid":
        f = fit_hybrid(X, BlockLayout.block((8, 8), 2, rank=1), 1, max_iter=5)
    else:
        f = fit_shared_basis(X, 2, 1, max_iter=5)
    assert np.isfinite(f.error)
    assert f.error == pytest.approx(_true_error(X, f.reconstruction), rel=1e-6)


@FUZZ
@given(
    # Subnormal scales (float64 2^-1060, float32 2^-140) are left out here: a dense matrix of
    # subnormal entries holds only ~14 bits, so no reconstruction can match the reported error to
    # 1e-6 there. test_approximate_error_extreme checks the reported error at subnormal scale
    # against the exact best error instead.
    case=st.sampled_from(
        [(np.float64, e) for e in (-1000, -700, 0, 500, 1000, 1020)] + [(np.float32, e) for e in (-126, 0, 100, 126)]
    ),
    entry=st.sampled_from(["rank", "budget", "score"]),
    seed=st.integers(0, 1000),
)
def test_fuzz_extreme_scale(case, entry, seed):
    dtype, e = case
    X = np.ldexp(_unit(_X(6, 8, seed)), e).astype(dtype)
    rtol = 1e-6 if dtype == np.float64 else 1e-3
    try:
        if entry == "score":
            est = BlockLowRank(n_blocks=2, rank=1).fit(X)
            reported, R = -est.score(X), est.reconstruct()
        else:
            a = approximate(X, method="block", n_blocks=2, **({"rank": 1} if entry == "rank" else {"budget": 28}))
            reported, R = a.error, a.reconstruction
    except ValueError:
        return  # refusing extreme input is allowed
    assert reported == pytest.approx(_true_error(X, R), rel=rtol, abs=1e-7)


# =============================================================================
# Class 7: array types that carry meaning
# =============================================================================
def _masked():
    X = _X().copy()
    mask = np.zeros(X.shape, bool)
    mask[0, 0] = True
    X[0, 0] = 1e6  # the masked-out value must not be used
    return np.ma.masked_array(X, mask=mask)


MASK_ENTRIES = {
    "approximate": lambda M: approximate(M, method="block", n_blocks=2, rank=1),
    "BlockLowRank.fit": lambda M: BlockLowRank(n_blocks=2, rank=1).fit(M),
    "GlobalLowRank.fit": lambda M: GlobalLowRank(rank=1).fit(M),
    "HybridLowRank.fit": lambda M: HybridLowRank().fit(M),
    "SharedBasisLowRank.fit": lambda M: SharedBasisLowRank().fit(M),
    "fit_hybrid": lambda M: fit_hybrid(M, BlockLayout.block((8, 8), 2, rank=1), 1, max_iter=2),
    "fit_shared_basis": lambda M: fit_shared_basis(M, 2, 1, max_iter=2),
    "compare_at_budget": lambda M: compare_at_budget(M, 64),
    "block_spectra": lambda M: engine.block_spectra(M, BlockLayout.block(np.shape(M)[-2:], 2)),
    "score": lambda M: GlobalLowRank(rank=1).fit(_X()).score(M),
    "transform": lambda M: GlobalLowRank(rank=1).fit(_X()).transform(M),
    "cluster_permutation": lambda M: permutations.cluster_permutation(M, 2),
}


@pytest.mark.parametrize("entry", sorted(MASK_ENTRIES))
def test_masked_array_refused(entry):
    with pytest.raises(CLEAR, match="mask"):
        MASK_ENTRIES[entry](_masked())


def _dates():
    return np.datetime64("2020-01-01") + np.arange(64).reshape(8, 8).astype("timedelta64[D]")


@pytest.mark.parametrize("kind", ["datetime", "timedelta"])
@pytest.mark.parametrize("entry", ["approximate", "BlockLowRank.fit"])
def test_time_types_refused(kind, entry):
    X = _dates() if kind == "datetime" else np.arange(64).reshape(8, 8).astype("timedelta64[s]")
    with pytest.raises(TypeError, match=kind):
        MASK_ENTRIES[entry](X)


def test_structured_dtype_message():
    X = np.zeros((8, 8), dtype=[("a", "f8")])
    with pytest.raises(TypeError, match="structured|field") as info:
        approximate(X, rank=1)
    assert "string" not in str(info.value)


@pytest.mark.parametrize("entry", ["approximate", "BlockLowRank.fit"])
def test_object_strings_refused_like_string_arrays(entry):
    X = _X().astype(object)
    X[0, 0] = "3"
    with pytest.raises(TypeError, match="string"):
        MASK_ENTRIES[entry](X)


def test_float16_one_rule():
    X = _X().astype(np.float16)
    dtypes = {
        "approximate": approximate(X, method="block", n_blocks=2, rank=1).reconstruction.dtype,
        "BlockLowRank": BlockLowRank(n_blocks=2, rank=1).fit(X).reconstruct().dtype,
        "HybridLowRank": HybridLowRank().fit(X).reconstruct().dtype,
        "fit_hybrid": fit_hybrid(X, BlockLayout.block((8, 8), 2, rank=1), 1, max_iter=2).reconstruction.dtype,
        "fit_shared_basis": fit_shared_basis(X, 2, 1, max_iter=2).reconstruction.dtype,
        "SharedBasisLowRank": SharedBasisLowRank().fit(X).reconstruct().dtype,
    }
    assert len(set(dtypes.values())) == 1, dtypes


@FUZZ
@given(
    kind=st.sampled_from(["masked", "datetime", "timedelta", "object-str"]),
    entry=st.sampled_from(["approximate", "BlockLowRank.fit", "fit_shared_basis", "block_spectra"]),
    seed=st.integers(0, 100),
)
def test_fuzz_meaningful_arrays(kind, entry, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((8, 8))
    if kind == "masked":
        X = np.ma.masked_array(X, mask=rng.random((8, 8)) < 0.2)
    elif kind == "datetime":
        X = np.datetime64("2000-01-01") + rng.integers(0, 9999, (8, 8)).astype("timedelta64[D]")
    elif kind == "timedelta":
        X = rng.integers(0, 9999, (8, 8)).astype("timedelta64[s]")
    else:
        X = X.astype(object)
        X[rng.integers(8), rng.integers(8)] = "1.5"
    if kind == "masked" and not np.ma.getmaskarray(X).any():
        return
    with pytest.raises(CLEAR):
        MASK_ENTRIES[entry](X)


# =============================================================================
# Class 8: promises the code does not keep
# =============================================================================
def _uneven_case(seed):
    rng = np.random.default_rng(seed)
    m, n = (int(v) for v in rng.integers(3, 7, size=2))
    return rng.standard_normal((m, n)) * rng.uniform(0.2, 3, size=(m, 1))


def _blocks_info(X, K=2):
    out = []
    for rows in np.array_split(np.arange(X.shape[0]), K):
        for cols in np.array_split(np.arange(X.shape[1]), K):
            s = np.linalg.svd(X[np.ix_(rows, cols)], compute_uv=False)
            out.append((s**2, len(rows) + len(cols)))
    return out


def _fewest_params(X, tol):
    """Brute force over every rank choice of the 2 x 2 grid."""
    info = _blocks_info(X)
    tot = (X**2).sum()
    best = None
    for ch in itertools.product(*[range(len(s2) + 1) for s2, _ in info]):
        if np.sqrt(sum(s2[r:].sum() for (s2, _), r in zip(info, ch)) / tot) <= tol:
            p = sum(c * r for (_, c), r in zip(info, ch))
            best = p if best is None else min(best, p)
    return best


def test_tol_fewest_params_counterexample():
    X = _uneven_case(6)  # 4 x 5 matrix, 2 x 2 grid of blocks 2x3, 2x2
    a = approximate(X, method="block", n_blocks=2, max_error=0.35)
    assert a.error <= 0.35
    assert a.n_params == _fewest_params(X, 0.35)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 10**6), tol=st.sampled_from([0.2, 0.35, 0.5, 0.65]))
def test_fuzz_tol_fewest_params(seed, tol):
    X = _uneven_case(seed)
    a = approximate(X, method="block", n_blocks=2, max_error=tol)
    assert a.error <= tol + 1e-12
    assert a.n_params == _fewest_params(X, tol)


def test_budget_is_optimal_on_uneven_blocks():
    """Already right today: budget= keeps the most energy (brute force over all rank choices)."""
    for seed in range(8):
        X = _uneven_case(seed)
        info = _blocks_info(X)
        for budget in (12, 20, 27):
            best = max(
                sum(s2[:r].sum() for (s2, _), r in zip(info, ch))
                for ch in itertools.product(*[range(len(s2) + 1) for s2, _ in info])
                if sum(c * r for (_, c), r in zip(info, ch)) <= budget
            )
            try:
                a = approximate(X, method="block", n_blocks=2, budget=budget)
            except ValueError:
                continue
            assert a.n_params <= budget
            assert a.total_energy - a.discarded_energy >= best * (1 - 1e-9)


# =============================================================================
# Friction
# =============================================================================
@pytest.mark.parametrize("Est", [BlockLowRank, DiagonalBlockLowRank, HybridLowRank, SharedBasisLowRank])
def test_default_estimators_cross_validate(Est):
    from sklearn.model_selection import cross_val_score

    scores = cross_val_score(Est(), _X(20, 8), cv=3)
    assert np.all(np.isfinite(scores)), scores


def test_grid_search_default_grid():
    from sklearn.model_selection import GridSearchCV

    gs = GridSearchCV(BlockLowRank(), {"rank": [1, 2]}, cv=3).fit(_X(20, 8))
    assert np.all(np.isfinite(gs.cv_results_["mean_test_score"]))


def test_transform_other_rows_same_count():
    est = BlockLowRank(n_blocks=2, rank=1).fit(_X())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            est.transform(_X(seed=9))
        except ValueError as exc:
            assert "row" in str(exc)
            return
    assert any("row" in str(x.message) for x in w), "no error and no warning"


def test_stack_repr_counts():
    S = np.random.default_rng(0).standard_normal((3, 8, 8))
    a = approximate(S, method="block", n_blocks=2, budget=40)
    per_matrix = {int(c) for c in (np.asarray(a.ranks) * 8).sum(axis=(-2, -1))}  # blocks 4x4: 8 per rank
    claimed = {int(c) for c in re.findall(r"(\d+) parameters", repr(a))}
    assert claimed <= per_matrix, (repr(a), per_matrix)


def test_compare_rank_column_one_type():
    recs = compare_at_budget(_X(), 64)
    types = {type(r["rank"]) for r in recs if r["rank"] is not None}
    assert len(types) == 1, types


def test_adapter_uint8_scaled_or_refused():
    from blocklowrank.adapters import MLP, evaluate

    mlp = MLP.init((16, 8, 3), random_state=0)
    rng = np.random.default_rng(0)
    Xu = rng.integers(0, 256, size=(30, 16)).astype(np.uint8)
    y = rng.integers(0, 3, 30)
    try:
        got = evaluate(mlp, Xu, y)
    except CLEAR as exc:
        assert re.search("uint8|255|scale", str(exc))
        return
    want = evaluate(mlp, Xu.astype(np.float32) / np.float32(255), y)
    assert got == pytest.approx(want, rel=1e-5)


def test_fit_adapter_uint8_scaled_or_refused():
    from blocklowrank.adapters import MLP, StructuredAdapter, fit_adapter

    mlp = MLP.init((16, 8, 3), random_state=0)
    rng = np.random.default_rng(0)
    Xu = rng.integers(0, 256, size=(30, 16)).astype(np.uint8)
    y = rng.integers(0, 3, 30)

    def run(X):
        ad = StructuredAdapter(BlockLayout.global_((8, 16), rank=1), random_state=0)
        return fit_adapter(mlp, X, y, ad, epochs=1, random_state=0).history.train_loss[0]

    try:
        got = run(Xu)
    except CLEAR as exc:
        assert re.search("uint8|255|scale", str(exc))
        return
    assert got == pytest.approx(run(Xu.astype(np.float32) / np.float32(255)), rel=1e-5)

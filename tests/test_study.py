"""The checkpoint study: records against independent SVDs, model-wide allocation, resume, Dask, CLI."""

import csv
import itertools
import json

import numpy as np
import pytest

from blocklowrank import _allocation
from blocklowrank._engine import block_spectra
from blocklowrank.checkpoints import Checkpoint, load_file, save_file
from blocklowrank.cli import main
from blocklowrank.layout import BlockLayout
from blocklowrank.study import _run as study_mod
from blocklowrank.study import allocate_model_wide, effective_rank, run_study

D, F = 24, 40
MODULES = {
    "self_attn.q_proj": (D, D),
    "self_attn.k_proj": (12, D),
    "self_attn.v_proj": (12, D),
    "self_attn.o_proj": (D, D),
    "mlp.up_proj": (F, D),
    "mlp.down_proj": (D, F),
}


def _planted(rng, shape):
    """Low rank plus one block of its own low rank, plus a little noise."""
    m, n = shape
    delta = rng.standard_normal((m, 2)) @ rng.standard_normal((2, n))
    delta[: m // 2, n // 2 :] += 3 * rng.standard_normal((m // 2, 1)) @ rng.standard_normal((1, n - n // 2))
    return 0.01 * (delta + 0.05 * rng.standard_normal(shape))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A fake 2-layer model: base in F32, fine-tuned in BF16 except the MLP (F32)."""
    folder = tmp_path_factory.mktemp("model")
    rng = np.random.default_rng(0)
    base, tuned = {"model.embed_tokens.weight": rng.standard_normal((30, D)).astype(np.float32)}, {}
    for layer, (mod, shape) in itertools.product(range(2), MODULES.items()):
        name = f"model.layers.{layer}.{mod}.weight"
        base[name] = rng.standard_normal(shape).astype(np.float32)
        tuned[name] = (base[name] + _planted(rng, shape)).astype(np.float32)
    tuned["model.embed_tokens.weight"] = base["model.embed_tokens.weight"]
    base["model.layers.0.self_attn.q_proj.bias"] = np.zeros(D, np.float32)  # in base only
    tuned["model.lm_head.weight"] = rng.standard_normal((30, D)).astype(np.float32)  # in tuned only
    base["model.layers.1.mlp.gate_proj.weight"] = np.zeros((F, D), np.float32)  # shape mismatch
    tuned["model.layers.1.mlp.gate_proj.weight"] = np.zeros((F + 2, D), np.float32)
    dtypes = {name: "F32" if "mlp" in name else "BF16" for name in tuned}
    return save_file(folder / "base.safetensors", base), save_file(folder / "tuned.safetensors", tuned, dtypes=dtypes)


def _deltas(base, tuned=None):
    b = load_file(base)
    t = load_file(tuned) if tuned else None
    return {
        k[: -len(".weight")]: (t[k].astype(np.float64) - v if t else v.astype(np.float64))
        for k, v in b.items()
        if v.ndim == 2 and (t is None or (k in t and t[k].shape == v.shape)) and "embed" not in k
    }


def _global_error(X, r):
    s = np.linalg.svd(X, compute_uv=False)
    return np.sqrt(np.sum(s[r:] ** 2) / np.sum(s**2))


def _block_error(X, K, r):
    rows, cols = np.array_split(np.arange(X.shape[0]), K), np.array_split(np.arange(X.shape[1]), K)
    lost = sum(np.sum(np.linalg.svd(X[np.ix_(i, j)], compute_uv=False)[r:] ** 2) for i in rows for j in cols)
    return np.sqrt(lost / np.sum(X**2))


def _row(records, layer, structure, config):
    (row,) = [r for r in records if r["layer"] == layer and r["structure"] == structure and r["config"] == config]
    return row


@pytest.fixture(scope="module")
def studied(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    every = ["global", "diagonal", "block", "hybrid", "shared_basis"]  # the iterative ones only when named
    return run_study(*model, out=out, budget_rank=4, n_blocks=[2, 4], progress=False, structures=every), out


def test_records_match_independent_svds(model, studied):
    records, _ = studied
    deltas = _deltas(*model)
    assert {r["layer"] for r in records} == set(deltas) - {"model.layers.1.mlp.gate_proj"}
    for layer, X in deltas.items():
        if "gate_proj" in layer:
            continue
        m, n = X.shape
        g = _row(records, layer, "global", "K=1 r=4")
        assert g["n_params"] == g["budget"] == 4 * (m + n)
        assert g["error"] == pytest.approx(_global_error(X, 4), rel=1e-4, abs=1e-6)
        assert g["energy"] == pytest.approx(1 - g["error"] ** 2)
        assert g["module_type"] == layer.split(".")[-1] and g["shape"] == f"{m}x{n}"
        blk = _row(records, layer, "block", "K=2 r=2")
        assert blk["error"] == pytest.approx(_block_error(X, 2, 2), rel=1e-4, abs=1e-6)
        s = np.linalg.svd(X, compute_uv=False)
        assert g["effective_rank"] == pytest.approx(effective_rank(s), rel=1e-4)
        for name in ("global", "diagonal", "block", "shared_basis"):
            assert sum(r["best"] for r in records if r["layer"] == layer and r["structure"] == name) == 1


def test_compression_of_one_checkpoint(model, tmp_path):
    records = run_study(
        model[0], budget_fraction=0.25, structures=["global", "block"], n_blocks=[2], progress=False, out=tmp_path
    )
    W = _deltas(model[0])["model.layers.0.self_attn.q_proj"]
    g = _row(records, "model.layers.0.self_attn.q_proj", "global", "K=1 r=3")
    assert g["budget"] == int(0.25 * D * D) and g["error"] == pytest.approx(_global_error(W, 3), rel=1e-5)
    assert "compression" in (tmp_path / "summary.md").read_text()


def test_effective_rank():
    assert effective_rank(np.r_[np.ones(5), np.zeros(3)]) == pytest.approx(5.0)
    assert 1 < effective_rank([10.0, 1.0, 0.1]) < 2
    assert effective_rank(np.zeros(4)) == 0.0


def test_model_wide_never_worse_than_uniform(model):
    for kwargs in ({"budget_rank": 3}, {"total_budget": 5000}):
        res = run_study(*model, structures=["global", "diagonal", "block"], n_blocks=[2, 3], progress=False, **kwargs)
        rows = {(r["structure"], r["n_blocks"], r["allocation"]): r for r in res.model_wide}
        assert {k[0] for k in rows} == {"global", "diagonal", "block"}
        for (name, K, alloc), r in rows.items():
            if alloc == "model-wide":
                u = rows[(name, K, "uniform")]
                assert r["n_params"] <= r["total_budget"] and u["n_params"] <= r["total_budget"]
                assert r["error"] <= u["error"] + 1e-12
                assert r["error_lower_bound"] <= r["error"] + 1e-12
        if "total_budget" in kwargs:
            assert rows[("global", 1, "model-wide")]["total_budget"] == 5000
            sides = [sum(shape) for shape in MODULES.values()] * 2
            assert rows[("global", 1, "uniform")]["total_budget"] == sum(5000 * c // sum(sides) for c in sides)
            assert 5000 - len(sides) < rows[("global", 1, "uniform")]["total_budget"] <= 5000


def _brute_force(spectra, budget):
    """Most energy kept by any per-block ranks within the budget (every combination)."""
    items = [
        (sp, key, int(sp.layout.block_costs[key]), int(sp.layout.max_ranks[key])) for sp in spectra for key in sp.values
    ]
    best = 0.0
    for ranks in itertools.product(*[range(mr + 1) for *_, mr in items]):
        if sum(r * c for r, (_, _, c, _) in zip(ranks, items)) <= budget:
            best = max(best, sum(np.sum(sp.values[key][:r] ** 2) for r, (sp, key, _, _) in zip(ranks, items)))
    return best


def _kept(spectra, ranks):
    return sum(float(sp.total_energy - sp.discarded(r)) for sp, r in zip(spectra, ranks))


def test_model_wide_against_brute_force(monkeypatch):
    """Unequal costs: the DP is exact; the greedy stays within one item's gain (measured gap printed)."""
    rng = np.random.default_rng(3)

    def decaying(shape):
        U, _ = np.linalg.qr(rng.standard_normal((shape[0], shape[0])))
        V, _ = np.linalg.qr(rng.standard_normal((shape[1], shape[1])))
        s = np.exp(-rng.uniform(0.2, 1.5) * np.arange(min(shape))) * rng.uniform(0.5, 3)
        return (U[:, : s.size] * s) @ V[: s.size]

    shapes = [(6, 4), (5, 7), (3, 5)]
    spectra = [block_spectra(decaying(s), BlockLayout.global_(s)) for s in shapes]
    spectra.append(block_spectra(decaying((6, 4)), BlockLayout.block((6, 4), 2)))
    gaps = []
    for budget in range(8, 60, 3):
        opt = _brute_force(spectra, budget)
        ranks, exact, gap = allocate_model_wide(spectra, budget)
        assert exact and _kept(spectra, ranks) == pytest.approx(opt, rel=1e-12, abs=1e-15)
        assert gap >= -1e-12
        with monkeypatch.context() as mp:
            mp.setattr(_allocation, "_DP_LIMIT", -1)  # force the greedy
            g_ranks, g_exact, g_gap = allocate_model_wide(spectra, budget)
        assert not g_exact
        assert sum(int(sp.n_params(r)) for sp, r in zip(spectra, g_ranks)) <= budget
        largest_gain = max(float(v[0] ** 2) for sp in spectra for v in sp.values.values())
        gap = opt - _kept(spectra, g_ranks)
        assert -1e-12 <= gap <= min(largest_gain, g_gap + 1e-12)  # the certificate holds
        gaps.append(gap / opt)
    print(
        f"greedy vs brute force: worst relative shortfall of kept energy {max(gaps):.3%} "
        f"over {len(gaps)} budgets, exact on {sum(g < 1e-12 for g in gaps)}"
    )
    # equal costs: water-filling is exact without the DP
    eq = [block_spectra(decaying((5, 5)), BlockLayout.global_((5, 5))) for _ in range(3)]
    with monkeypatch.context() as mp:
        mp.setattr(_allocation, "_DP_LIMIT", -1)
        ranks, exact, _ = allocate_model_wide(eq, 50)
    assert exact and _kept(eq, ranks) == pytest.approx(_brute_force(eq, 50), rel=1e-12)


@pytest.fixture
def spy(monkeypatch):
    """Counts the per-layer fits (compare_at_budget calls); ``spy.fail_after`` simulates a kill."""

    class Spy:
        calls, fail_after = 0, None

    real = study_mod.compare_at_budget

    def counting(*args, **kwargs):
        if Spy.fail_after is not None and Spy.calls >= Spy.fail_after:
            raise KeyboardInterrupt
        Spy.calls += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(study_mod, "compare_at_budget", counting)
    return Spy


def _log_ids(out):
    return [json.loads(line)["id"] for line in (out / "study.jsonl").read_text().splitlines() if line.strip()]


SMALL = {"structures": ["global", "block"], "n_blocks": [2], "budget_rank": 2, "progress": False}


def test_resume_after_torn_log(model, tmp_path, spy):
    first = run_study(*model, out=tmp_path, **SMALL)
    n = len(first.layers)
    assert spy.calls == n == 12
    log = tmp_path / "study.jsonl"
    lines = log.read_bytes().split(b"\n")
    log.write_bytes(b"\n".join(lines[:4]) + b"\n" + lines[4][: len(lines[4]) // 2])  # torn 5th line
    spy.calls = 0
    with pytest.warns(RuntimeWarning, match="incomplete"):
        again = run_study(*model, out=tmp_path, **SMALL)
    assert spy.calls == n - 4  # the torn layer and those after it, nothing else
    ids = _log_ids(tmp_path)
    assert len(ids) == len(set(ids)) == n
    assert [(r["layer"], r["config"], r["error"]) for r in again] == [
        (r["layer"], r["config"], r["error"]) for r in first
    ]


def test_killed_study_continues(model, tmp_path, spy):
    spy.fail_after = 5
    with pytest.raises(KeyboardInterrupt):
        run_study(*model, out=tmp_path, **SMALL)
    assert len(_log_ids(tmp_path)) == 5
    spy.fail_after, spy.calls = None, 0
    res = run_study(*model, out=tmp_path, **SMALL)
    ids = _log_ids(tmp_path)
    assert spy.calls == 7 and len(ids) == len(set(ids)) == 12 == len(res.layers)


def test_other_settings_refused(model, tmp_path):
    run_study(*model, out=tmp_path, **SMALL)
    with pytest.raises(ValueError, match="other settings.*budget"):
        run_study(*model, out=tmp_path, **{**SMALL, "budget_rank": 3})


def test_reads_one_layer_at_a_time(model, monkeypatch):
    """Each selected weight is read once per checkpoint, and nothing else is read."""
    reads, mapped = [], []
    real = Checkpoint._read_into  # every chunked read; _buffer is the memory-mapped way in
    monkeypatch.setattr(
        Checkpoint, "_read_into", lambda self, name, out, **kw: reads.append(name) or real(self, name, out, **kw)
    )
    monkeypatch.setattr(Checkpoint, "_buffer", lambda self, file: mapped.append(file))
    res = run_study(*model, **SMALL)
    names = [lay["id"] for lay in res.layers]
    assert sorted(reads) == sorted(names * 2) and not mapped


def test_dask_cluster_through_joblib(model, tmp_path):
    distributed = pytest.importorskip("distributed")
    import joblib

    expected = run_study(*model, **SMALL)
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        with joblib.parallel_config(backend="dask"), distributed.get_task_stream(client) as stream:
            got = run_study(*model, out=tmp_path, n_jobs=2, **SMALL)
    assert len(stream.data) >= 12  # the layers ran as Dask tasks
    assert [(r["layer"], r["config"]) for r in got] == [(r["layer"], r["config"]) for r in expected]
    np.testing.assert_allclose([r["error"] for r in got], [r["error"] for r in expected], rtol=1e-6)
    assert len(set(_log_ids(tmp_path))) == 12


def test_cli_end_to_end(model, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "study",
            str(model[0]),
            str(model[1]),
            "--out",
            str(out),
            "--budget-rank",
            "3",
            "--n-blocks",
            "2",
            "4",
            "--structures",
            "global",
            "block",
            "hybrid",
            "-q",
        ]
    )
    assert rc == 0
    for name in ("layers.csv", "model_wide.csv", "summary.md", "error_heatmap.png", "error_vs_budget.png"):
        assert (out / name).stat().st_size > 0
    with open(out / "layers.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["structure"] for r in rows} == {"global", "block", "hybrid"}
    assert {
        "layer",
        "module_type",
        "shape",
        "structure",
        "config",
        "allocation",
        "n_params",
        "budget",
        "error",
        "energy",
    } <= set(rows[0])
    summary = (out / "summary.md").read_text()
    for listed in (
        "model.layers.0.self_attn.q_proj.bias",
        "model.lm_head.weight",
        "model.layers.1.mlp.gate_proj.weight (40, 24) vs (42, 24)",
        "| q_proj |",
        "model-wide",
    ):
        assert listed in summary
    assert "model-wide error" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{tmp}/missing.safetensors"], "no checkpoint at"),
        (["{base}", "{tuned}", "--target-modules", "nothing"], "no layer selected"),
        (["{base}", "--budget-fraction", "2"], "--budget-fraction must be a number in (0, 1)"),
        (["{base}", "--total-budget", "10"], "--total-budget 10 is below"),
        (["{base}", "--n-blocks", "0"], "--n-blocks must be >= 1"),
    ],
)
def test_cli_hostile_inputs(model, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, base=model[0], tuned=model[1]) for a in argv]
    try:
        code = main(["study", *argv, "--out", str(tmp_path / "o"), "-q"])
    except SystemExit as exc:  # refused by the parser, before any file is read
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("blocklowrank: error:") and message in err[0]


def test_budget_too_small_is_a_listed_skip(model, tmp_path, capsys):
    """A budget below every configuration of a layer skips it, with the reason, in the summary."""
    assert (
        main(
            [
                "study",
                str(model[0]),
                str(model[1]),
                "--out",
                str(tmp_path),
                "--budget-fraction",
                "0.02",
                "--structures",
                "block",
                "--n-blocks",
                "4",
                "-q",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "skipped model.layers.0.self_attn.k_proj: budget=5 is below the cheapest" in err
    assert "budget=5 is below the cheapest configuration" in (tmp_path / "summary.md").read_text()

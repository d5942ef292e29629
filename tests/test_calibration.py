"""Calibration statistics: the accumulator, the file format and its refusals, the PyTorch collector.

The accumulator and the file need NumPy only. The collector runs real models:
all-MiniLM-L6-v2 (the ``realweights`` extra) against independent
recomputations of one layer's ``XᵀX`` (from ``output_hidden_states``) and of
one layer's output-gradient second moment (``torch.autograd.grad`` in a
separate pass), and a tiny random GPT-2 (transformers' ``Conv1D``) under its
own language-modelling loss. torch and transformers are required under
``make test`` (``BLOCKLOWRANK_TEST_PEFT=1`` / ``BLOCKLOWRANK_TEST_REAL_DATA=1``),
else the collector tests skip without them.
"""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _real import minilm_checkpoint_or_skip
from hypothesis import given
from hypothesis import strategies as st

from blocklowrank.calibration import (
    CalibrationError,
    CalibrationStats,
    GramAccumulator,
    check_statistics,
    load_statistics,
    save_statistics,
)
from blocklowrank.checkpoints import save_file

REQUIRED = os.environ.get("BLOCKLOWRANK_TEST_PEFT") == "1" or os.environ.get("BLOCKLOWRANK_TEST_REAL_DATA") == "1"


def _reference_sum(X, mask=None):
    """Σ x xᵀ over the kept rows, computed independently (float64 einsum over a boolean selection)."""
    rows = np.asarray(X, dtype=np.float64).reshape(-1, np.shape(X)[-1])
    if mask is not None:
        rows = rows[np.asarray(mask, dtype=bool).reshape(-1)]
    return np.einsum("ti,tj->ij", rows, rows)


def _close(actual, expected, rtol=1e-12):
    """Equal up to float64 rounding relative to the largest entry."""
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(1.0, float(np.abs(expected).max())))


# ---------------------------------------------------------------------------- the accumulator
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 6),
    rows=st.integers(0, 40),
    dtype=st.sampled_from([np.float16, np.float32, np.float64, np.int32]),
    keep=st.floats(0.0, 1.0),
    cuts=st.lists(st.integers(0, 40), max_size=4),
    chunk_bytes=st.sampled_from([8, 64, 1 << 20]),
)
def test_merged_shards_equal_one_pass_and_an_independent_sum(seed, n, rows, dtype, keep, cuts, chunk_bytes):
    """Claim: accumulating disjoint shards (any cut points, any mask, any input type) and merging them
    gives the same float64 sum and count as one pass, and both equal Σ x xᵀ over the kept rows."""
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((rows, n)) * 100).astype(dtype)
    mask = rng.random(rows) < keep
    bounds = [0, *sorted(min(c, rows) for c in cuts), rows]
    parts = [GramAccumulator(n).update(X[a:b], mask=mask[a:b]) for a, b in zip(bounds, bounds[1:])]
    merged = sum(parts)
    whole = GramAccumulator(chunk_bytes=chunk_bytes).update(X, mask=mask)
    reference = _reference_sum(X, mask)
    assert merged.count == whole.count == int(mask.sum())
    _close(merged.sum, reference)
    _close(whole.sum, reference)
    assert np.array_equal(whole.sum, whole.sum.T)
    if mask.any():
        _close(whole.gram, reference / mask.sum())


def test_three_dimensional_blocks_count_the_masked_tokens():
    """Claim: a (batch, seq, n) block with a (batch, seq) 0/1 mask counts exactly the kept tokens."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    acc = GramAccumulator(4).update(X, mask=mask)
    assert acc.count == 9
    _close(acc.gram, _reference_sum(X, mask) / 9)
    _close(GramAccumulator(4).update(X, mask=mask.astype(bool)).sum, acc.sum)
    _close(GramAccumulator(4).update(X[mask.astype(bool)]).sum, acc.sum)


def test_float32_inputs_accumulate_in_float64():
    """Claim: float32 inputs are accumulated in float64. Values of 1e30 have squares (1e60) beyond
    float32's range, and integers up to 2**12 over 4,000 rows have sums beyond float32's 24-bit
    mantissa: both are exact here (the second exactly equal to integer arithmetic), and both
    would be wrong in float32."""
    rng = np.random.default_rng(2)
    huge = (rng.standard_normal((500, 4)) * 1e30).astype(np.float32)
    with np.errstate(all="ignore"):
        assert not np.isfinite(huge.T @ huge).all()  # float32 overflows
    _close(GramAccumulator(4).update(huge).sum, _reference_sum(huge))
    ints = rng.integers(0, 2**12, size=(4000, 3))
    exact = ints.T @ ints  # int64: exact
    as_float32 = ints.astype(np.float32)
    assert not np.array_equal(np.float32(1) * as_float32.T @ as_float32, exact)  # float32 rounds
    np.testing.assert_array_equal(GramAccumulator(3, chunk_bytes=1000).update(as_float32).sum, exact)


def test_mask_and_input_refusals():
    acc = GramAccumulator(3)
    X = np.ones((4, 3))
    for bad_mask, kind in [([1, 0, 2, 1], ValueError), ([1, 0, 1], ValueError), (np.ones((4, 1)), ValueError)]:
        with pytest.raises(kind, match="mask"):
            acc.update(X, mask=bad_mask)
    with pytest.raises(ValueError, match="NaN"):
        acc.update(np.full((2, 3), np.nan))
    with pytest.raises(TypeError, match="real"):
        acc.update(np.ones((2, 3), dtype=complex))
    with pytest.raises(ValueError, match="shape"):
        acc.update(np.ones(3))
    with pytest.raises(ValueError, match="features"):
        acc.update(np.ones((2, 4)))
    with pytest.raises(ValueError, match="features"):
        acc.merge(GramAccumulator(2).update(np.ones((1, 2))))
    assert acc.count == 0  # nothing refused was counted
    empty = GramAccumulator(3).update(X, mask=[0, 0, 0, 0])
    assert empty.count == 0
    with pytest.raises(ValueError, match="count 0"):
        _ = empty.gram


def test_from_gram_round_trips_the_sum():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((7, 3))
    acc = GramAccumulator(3).update(X)
    again = GramAccumulator.from_gram(acc.gram, acc.count)
    _close(again.sum, acc.sum)
    _close((again + acc).gram, acc.gram)


# ---------------------------------------------------------------------------- the file
LAYERS = {"l.q": (4, 4), "l.k": (2, 4), "l.o": (4, 3)}


def _psd(rng, n):
    A = rng.standard_normal((n + 2, n))
    return A.T @ A / (n + 2)


def _stats(seed=0):
    """Statistics of three layers: l.q and l.k share a 4-wide site, l.o reads a 3-wide one; H for two."""
    rng = np.random.default_rng(seed)
    inputs = {"l.q": GramAccumulator(4).update(rng.standard_normal((9, 4))), "l.o": GramAccumulator(3)}
    inputs["l.o"].update(rng.standard_normal((2, 5, 3)), mask=[[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    outputs = {"l.q": GramAccumulator(4).update(rng.standard_normal((9, 4)))}
    outputs["l.k"] = GramAccumulator(2).update(rng.standard_normal((9, 2)))
    sites = {"l.q": "l.q", "l.k": "l.q", "l.o": "l.o"}
    return CalibrationStats.from_accumulators(
        inputs, sites, outputs, model="toy", model_dtype="float32", loss="causal-lm", info={"tokens": 9}
    )


def test_round_trip(tmp_path):
    stats = _stats()
    path = save_statistics(tmp_path / "s.safetensors", stats)
    with load_statistics(path) as loaded:
        check_statistics(loaded, LAYERS, require_output=False)
        assert loaded.layer_sites == stats.layer_sites and loaded.sites == ["l.q", "l.o"]
        assert loaded.input_counts == {"l.q": 9, "l.o": 7} and loaded.output_counts == {"l.q": 9, "l.k": 9}
        for layer in LAYERS:
            np.testing.assert_array_equal(loaded.input_gram(layer), stats.input_gram(layer))
        assert loaded.output_gram("l.o") is None
        np.testing.assert_array_equal(loaded.output_gram("l.k"), stats.output_gram("l.k"))
        assert (loaded.model, loaded.model_dtype, loaded.loss, loaded.info) == (
            "toy",
            "float32",
            "causal-lm",
            {"tokens": 9},
        )
        assert loaded.input_count("l.k") == 9
    with pytest.raises(CalibrationError, match="no output statistics"):
        check_statistics(stats, LAYERS, require_output=True)
    path32 = save_statistics(tmp_path / "s32.safetensors", stats, dtype="float32")
    with load_statistics(path32) as loaded:
        check_statistics(loaded, LAYERS)
        np.testing.assert_array_equal(loaded.input_gram("l.o"), stats.input_gram("l.o").astype(np.float32))
    for flag in ("require_output", "factor"):  # the switches are booleans, not truthy strings
        with pytest.raises(ValueError, match=f"'{flag}' parameter of check_statistics"):
            check_statistics(stats, LAYERS, **{flag: "no"})


def test_the_file_is_what_the_format_says_read_by_the_reference_reader(tmp_path):
    """The documented layout, read by the reference safetensors package rather than our reader."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open

    stats = _stats()
    path = save_statistics(tmp_path / "s.safetensors", stats)
    tensors = safetensors_numpy.load_file(str(path))
    assert sorted(tensors) == ["G.l.o", "G.l.q", "H.l.k", "H.l.q"]
    assert all(t.dtype == np.float64 for t in tensors.values())
    np.testing.assert_array_equal(tensors["G.l.q"], stats.input_gram("l.k"))
    G = tensors["G.l.o"]
    assert np.array_equal(G, G.T)
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    assert meta["format"] == "blocklowrank.calibration" and meta["format_version"] == "1"
    assert json.loads(meta["layer_sites"]) == {"l.q": "l.q", "l.k": "l.q", "l.o": "l.o"}
    assert json.loads(meta["input_counts"]) == {"l.q": 9, "l.o": 7}
    assert json.loads(meta["output_counts"]) == {"l.q": 9, "l.k": 9}
    assert (meta["model"], meta["model_dtype"], meta["loss"]) == ("toy", "float32", "causal-lm")
    assert json.loads(meta["info"]) == {"tokens": 9}
    # The sum/count convention: count * G is the sum of x xᵀ.
    assert np.allclose(G * 7, stats.input_gram("l.o") * 7)


def _forge(path, tensors=None, **meta):
    """A statistics file written with save_file: _stats()'s content, with tensors/metadata replaced."""
    stats = _stats()
    base = {f"G.{s}": stats.site_gram(s) for s in stats.sites}
    base.update({f"H.{layer}": stats.output_gram(layer) for layer in stats.output_layers})
    base.update(tensors or {})
    metadata = {
        "format": "blocklowrank.calibration",
        "format_version": "1",
        "layer_sites": json.dumps(stats.layer_sites),
        "input_counts": json.dumps(stats.input_counts),
        "output_counts": json.dumps(stats.output_counts),
        "info": "{}",
        "model": "toy",
        "model_dtype": "float32",
        "loss": "",
    }
    metadata.update(meta)
    metadata = {key: value for key, value in metadata.items() if value is not None}
    save_file(path, {k: v for k, v in base.items() if v is not None}, metadata=metadata)
    return path


def _not_psd():
    G = np.diag([1.0, 1.0, 1.0, -1e-4])
    return G


HOSTILE = {
    # name: (forge arguments, layers to check against, the entry the message must name)
    "missing layer": ({}, {**LAYERS, "l.v": (4, 4)}, "'l.v'"),
    "wrong input size": ({}, {**LAYERS, "l.o": (4, 5)}, "'G.l.o'"),
    "wrong output size": ({}, {**LAYERS, "l.k": (3, 4)}, "'H.l.k'"),
    "NaN": ({"tensors": {"G.l.q": np.full((4, 4), np.nan)}}, LAYERS, "'G.l.q'"),
    "inf in H": ({"tensors": {"H.l.q": np.diag([np.inf, 1, 1, 1])}}, LAYERS, "'H.l.q'"),
    "not symmetric": ({"tensors": {"G.l.o": np.array([[1, 0.5, 0], [0, 1, 0], [0, 0, 1.0]])}}, LAYERS, "'G.l.o'"),
    "not PSD": ({"tensors": {"G.l.q": _not_psd()}}, LAYERS, "'G.l.q'"),
    "zero samples": ({"input_counts": '{"l.q": 0, "l.o": 7}'}, LAYERS, "'G.l.q'"),
    "negative count": ({"output_counts": '{"l.q": -3, "l.k": 9}'}, LAYERS, "'l.q'"),
    "count not an integer": ({"input_counts": '{"l.q": 9.0, "l.o": 7}'}, LAYERS, "'l.q'"),
    "count a boolean": ({"input_counts": '{"l.q": true, "l.o": 7}'}, LAYERS, "'l.q'"),
    "map to a missing entry": ({"layer_sites": '{"l.q": "l.q", "l.k": "l.x", "l.o": "l.o"}'}, LAYERS, "'l.k'"),
    "metadata not JSON": ({"input_counts": "{'l.q': 9}"}, LAYERS, "'input_counts'"),
    "metadata NaN": ({"info": '{"tokens": NaN}'}, LAYERS, "'info'"),
    "metadata not an object": ({"layer_sites": "[1, 2]"}, LAYERS, "'layer_sites'"),
    "metadata missing": ({"layer_sites": None}, LAYERS, "'layer_sites'"),
    "entry not listed": ({"tensors": {"G.l.extra": np.eye(2)}}, LAYERS, "'G.l.extra'"),
    "count without entry": ({"tensors": {"H.l.k": None}}, LAYERS, "'l.k'"),
    "unknown tensor": ({"tensors": {"W.l.q": np.eye(2)}}, LAYERS, "'W.l.q'"),
    "not the format": ({"format": "pt"}, LAYERS, "'format'"),
    "another version": ({"format_version": "2"}, LAYERS, "'format_version'"),
    "half precision": ({"tensors": {"G.l.o": np.eye(3, dtype=np.float16)}}, LAYERS, "'G.l.o'"),
    "integers": ({"tensors": {"G.l.o": np.eye(3, dtype=np.int64)}}, LAYERS, "'G.l.o'"),
    "not square": ({"tensors": {"G.l.o": np.ones((3, 2))}}, LAYERS, "'G.l.o'"),
    "H of an unknown layer": (
        {"tensors": {"H.l.z": np.eye(2)}, "output_counts": '{"l.q": 9, "l.k": 9, "l.z": 1}'},
        LAYERS,
        "'H.l.z'",
    ),
    "a site no layer reads": ({"layer_sites": '{"l.q": "l.q", "l.k": "l.q", "l.o": "l.q"}'}, LAYERS, "'G.l.o'"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_statistics_are_refused_in_one_line_naming_file_and_entry(tmp_path, case):
    forged, layers, entry = HOSTILE[case]
    path = _forge(tmp_path / "stats.safetensors", **forged)
    with pytest.raises(CalibrationError) as info:
        with load_statistics(path) as stats:
            check_statistics(stats, layers)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path)), message
    assert entry in message, message


def test_a_truncated_file_is_refused_naming_it(tmp_path):
    path = save_statistics(tmp_path / "stats.safetensors", _stats())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CalibrationError) as info:
        load_statistics(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_psd_tolerance_is_rounding_not_data():
    """An eigenvalue of -1e-12 * trace (rounding) passes; -1e-6 * trace (data) is refused."""
    rng = np.random.default_rng(4)
    Q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    for eps, ok in [(1e-12, True), (1e-6, False)]:
        G = Q @ np.diag([1.0, 0.5, 0.1, -eps * 1.6]) @ Q.T
        G = (G + G.T) / 2
        stats = CalibrationStats({"a": G}, {"a": 5}, {"a": "a"})
        if ok:
            check_statistics(stats, {"a": (2, 4)})
        else:
            with pytest.raises(CalibrationError, match="not positive semi-definite"):
                check_statistics(stats, {"a": (2, 4)})


def test_nothing_is_written_by_a_refused_save(tmp_path):
    stats = _stats()
    path = save_statistics(tmp_path / "s.safetensors", stats)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_statistics(path, _stats(seed=1))
    assert path.read_bytes() == before
    bad = CalibrationStats({"a": np.full((2, 2), np.nan)}, {"a": 3}, {"a": "a"})
    with pytest.raises(CalibrationError, match="nothing was written"):
        save_statistics(tmp_path / "bad.safetensors", bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]


def test_inconsistent_statistics_are_refused_when_built():
    with pytest.raises(CalibrationError, match="'G.b'"):
        CalibrationStats({"a": np.eye(2), "b": np.eye(2)}, {"a": 1}, {"x": "a"})
    with pytest.raises(CalibrationError, match="zero samples"):
        CalibrationStats.from_accumulators({"a": GramAccumulator(2)}, {"x": "a"})
    with pytest.raises(CalibrationError, match="must be a string"):
        CalibrationStats({"a": np.eye(2)}, {"a": 1}, {"x": "a"}, model=3)


# ---------------------------------------------------------------------------- the collector, for real
def test_importing_the_package_loads_no_torch():
    code = (
        "import sys, blocklowrank.calibration, blocklowrank.calibration.collect; "
        "print(sorted(m for m in ('torch', 'transformers', 'tqdm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_missing_torch_is_one_line_naming_the_extra(tmp_path):
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from blocklowrank.cli import main\n"
        f"sys.exit(main(['calibrate', {str(tmp_path)!r}, '--texts', {str(tmp_path / 't.txt')!r}, "
        f"'--out', {str(tmp_path / 'o.safetensors')!r}]))"
    )
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "t.txt").write_text("a text\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "blocklowrank[calibrate]" in run.stderr, run.stderr
    assert not (tmp_path / "o.safetensors").exists()


@pytest.fixture(scope="module")
def torch():
    if REQUIRED:
        import torch
    else:
        torch = pytest.importorskip("torch")
        pytest.importorskip("transformers")
    return torch


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Short one.",
    "A dictionary maps hashable keys to arbitrary values, and its views reflect later changes.",
    "Exceptions propagate up the call stack until a matching handler is found.",
    "Yes.",
    "Generators produce values lazily, one at a time, when iterated.",
    "Calibration statistics are second moments of a layer's inputs over real text.",
]


@pytest.fixture(scope="module")
def minilm(torch):
    """all-MiniLM-L6-v2 as a transformers BertModel (built as the fine-tuning experiment builds it), eval mode."""
    from blocklowrank.experiments import _finetune_minilm

    path = minilm_checkpoint_or_skip(REQUIRED)
    model, tokenizer, _ = _finetune_minilm._load(torch, path)
    batches = []
    for start in range(0, len(SENTENCES), 3):  # padded batches of 3, 3 and 1
        ids, mask = _finetune_minilm._batches(tokenizer, SENTENCES[start : start + 3], torch)
        batches.append({"input_ids": ids, "attention_mask": mask})
    assert any(not b["attention_mask"].all() for b in batches)  # padding is there to be ignored
    return model.eval(), batches, path.parent


def _minilm_layer(i, name):
    return f"encoder.layer.{i}.{name}"


def test_minilm_input_grams_equal_an_independent_recomputation(torch, minilm):
    """Claim: G of encoder.layer.1's query is Σ h hᵀ / n over the tokens the attention mask keeps,
    h = encoder layer 0's output (output_hidden_states[1]), padded batches included; q/k/v share
    one input site; the attention output, intermediate and output dense layers have their own."""
    from blocklowrank.calibration.collect import collect_statistics

    model, batches, _ = minilm
    stats = collect_statistics(model, batches, progress=False)
    reference, tokens = 0.0, 0
    with torch.no_grad():
        for b in batches:
            hidden = model(**b, output_hidden_states=True).hidden_states[1]
            reference = reference + _reference_sum(hidden.numpy(), b["attention_mask"].numpy())
            tokens += int(b["attention_mask"].sum())
    query = _minilm_layer(1, "attention.self.query")
    assert stats.input_count(query) == tokens
    _close(stats.input_gram(query), reference / tokens, rtol=1e-10)
    assert {stats.site_of(_minilm_layer(1, f"attention.self.{x}")) for x in ("query", "key", "value")} == {query}
    own = ("attention.output.dense", "intermediate.dense", "output.dense")  # each its own site
    assert [stats.site_of(_minilm_layer(1, x)) for x in own] == [_minilm_layer(1, x) for x in own]
    assert len(stats.layers) == 37 and len(stats.sites) == 25  # 6 x 6 encoder layers + pooler; 6 x 4 sites + pooler
    assert stats.input_count("pooler.dense") == len(SENTENCES)  # one row per sequence
    assert stats.output_layers == [] and stats.loss == ""
    assert stats.info["tokens"] == tokens and stats.model_dtype == "float32"


def test_minilm_output_grams_equal_autograd_under_a_task_loss(torch, minilm):
    """Claim: with a task loss (mean pooling, a seeded linear head, cross-entropy), H of a layer is
    Σ g gᵀ / n of the loss gradient g at that layer's output over the kept tokens, g computed by
    torch.autograd.grad in a separate pass; a frozen model in train mode works and is put back."""
    from blocklowrank.calibration.collect import collect_statistics

    model, batches, _ = minilm
    torch.manual_seed(0)
    head = torch.nn.Linear(384, 4)
    labels = [torch.tensor([0, 1, 2]), torch.tensor([3, 0, 1]), torch.tensor([2])]
    task = [{**b, "labels": y} for b, y in zip(batches, labels)]

    def loss_fn(model, batch):
        states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        weights = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1)
        return torch.nn.functional.cross_entropy(head(pooled), batch["labels"])

    layer = _minilm_layer(1, "intermediate.dense")
    module = model.get_submodule(layer)
    reference, tokens = 0.0, 0
    for b in task:
        captured = []
        handle = module.register_forward_hook(lambda m, args, out: captured.append(out))
        loss = loss_fn(model, b)
        handle.remove()
        (grad,) = torch.autograd.grad(loss, captured[0])
        reference = reference + _reference_sum(grad.numpy(), b["attention_mask"].numpy())
        tokens += int(b["attention_mask"].sum())
    model.train()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        stats = collect_statistics(
            model,
            task,
            target_modules=[layer, _minilm_layer(1, "attention.self.query")],
            output_grams=True,
            loss_fn=loss_fn,
            progress=False,
        )
        assert model.training and not any(p.requires_grad for p in model.parameters())
    finally:
        model.eval()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    assert stats.output_counts[layer] == tokens and stats.loss == "loss_fn:" + loss_fn.__qualname__
    _close(stats.output_gram(layer), reference / tokens, rtol=1e-6)
    assert stats.output_gram(_minilm_layer(1, "attention.self.query")).shape == (384, 384)


@pytest.fixture(scope="module")
def tiny_gpt2(torch, tmp_path_factory):
    """A random GPT-2 (2 layers, width 32) saved with save_pretrained, and padded token batches."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=96, eos_token_id=96
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    rng = np.random.default_rng(0)
    batches = []
    for lengths in ([12, 7], [3, 12], [9]):
        ids = rng.integers(0, 97, size=(len(lengths), 12))
        mask = (np.arange(12) < np.array(lengths)[:, None]).astype(np.int64)
        batches.append({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)})
    return model, batches, folder


def test_gpt2_conv1d_layers_under_the_models_own_causal_lm_loss(torch, tiny_gpt2):
    """Claim: GPT-2's Conv1D layers are collected (lm_head, tied to the embedding, is not); c_attn's
    input site is ln_1's output (G = Σ h hᵀ / n of a forward hook's capture on ln_1); H exists for
    every layer, and for one it equals autograd's gradient of the model's own LM loss."""
    from blocklowrank.calibration.collect import collect_statistics

    model, batches, _ = tiny_gpt2
    stats = collect_statistics(model, batches, output_grams=True, progress=False)
    parts = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    expected = [f"transformer.h.{i}.{part}" for i in range(2) for part in parts]
    assert stats.layers == expected and stats.output_layers == expected and stats.loss == "causal-lm"
    assert stats.site_of("transformer.h.1.attn.c_attn") == "transformer.h.1.attn.c_attn"
    c_fc = model.transformer.h[1].mlp.c_fc
    inputs, outputs, tokens = 0.0, 0.0, 0
    for b in batches:
        captured = []
        handles = [
            model.transformer.h[1].ln_1.register_forward_hook(lambda m, a, out: captured.append(out)),
            c_fc.register_forward_hook(lambda m, a, out: captured.append(out)),
        ]
        mask = b["attention_mask"]
        loss = model(**b, labels=b["input_ids"].masked_fill(mask == 0, -100)).loss
        for h in handles:
            h.remove()
        (grad,) = torch.autograd.grad(loss, captured[1])
        inputs = inputs + _reference_sum(captured[0].detach().numpy(), mask.numpy())
        outputs = outputs + _reference_sum(grad.numpy(), mask.numpy())
        tokens += int(mask.sum())
    _close(stats.input_gram("transformer.h.1.attn.c_attn"), inputs / tokens, rtol=1e-10)
    _close(stats.output_gram("transformer.h.1.mlp.c_fc"), outputs / tokens, rtol=1e-6)
    shapes = {layer: (m.weight.shape[1], m.weight.shape[0]) for layer, m in model.named_modules() if layer in expected}
    check_statistics(stats, shapes, require_output=True)  # Conv1D: (out, in) is the transposed weight


def test_a_token_limit_counts_exactly_that_many_tokens(torch, tiny_gpt2):
    """Claim: max_tokens=25 counts the first 25 kept tokens (row-major, batch after batch) and stops:
    G equals Σ h hᵀ / 25 over exactly those tokens of ln_1's output, the model seeing whole batches."""
    from blocklowrank.calibration.collect import collect_statistics

    model, batches, _ = tiny_gpt2
    stats = collect_statistics(model, batches, max_tokens=25, progress=False)
    assert stats.input_count("transformer.h.0.attn.c_attn") == 25 == stats.info["tokens"]
    assert stats.info["batches"] == 2  # 19 tokens, then 6 of the next 15, then stop
    reference, left = 0.0, 25
    for b in batches[:2]:
        captured = []
        handle = model.transformer.h[0].ln_1.register_forward_hook(lambda m, a, out: captured.append(out))
        with torch.no_grad():
            model(**b)
        handle.remove()
        keep = b["attention_mask"].numpy().astype(bool)
        first = np.flatnonzero(keep)[:left]  # the first kept tokens, row-major
        counted = np.zeros(keep.size, dtype=bool)
        counted[first] = True
        reference = reference + _reference_sum(captured[0].numpy(), counted.reshape(keep.shape))
        left -= first.size
    _close(stats.input_gram("transformer.h.0.attn.c_attn"), reference / 25, rtol=1e-10)


def test_calibrate_folder_on_a_token_stream(torch, tiny_gpt2, tmp_path):
    """The command's library function on a saved GPT-2 and a 1-D token stream: file written, checked."""
    from blocklowrank.calibration.collect import calibrate_folder

    model, _, folder = tiny_gpt2
    tokens = np.random.default_rng(1).integers(0, 97, size=50)
    np.save(tmp_path / "tokens.npy", tokens)
    out = tmp_path / "stats.safetensors"
    stats = calibrate_folder(
        folder, out, tokens=tmp_path / "tokens.npy", max_length=16, output_grams=True, progress=False
    )
    assert stats.info["tokens"] == 50 and stats.info["sequences"] == 4  # windows of 16, 16, 16, 2
    shapes = {layer: (m.weight.shape[1], m.weight.shape[0]) for layer, m in model.named_modules() if "c_" in layer}
    with load_statistics(out) as loaded:
        check_statistics(loaded, shapes, require_output=True)
        assert loaded.layer_sites == stats.layer_sites and loaded.loss == "causal-lm"
        assert loaded.info["tokens"] == 50 and loaded.model_dtype == "float32"
    with pytest.raises(FileExistsError):
        calibrate_folder(folder, out, tokens=tmp_path / "tokens.npy", progress=False)


def test_the_command_refuses_in_one_line_and_writes_nothing(torch, tiny_gpt2, tmp_path, capsys):
    """A model without a language-modelling head has no loss of its own for --output-grams; a
    folder without config.json, bad token files and an existing --out are refused in one line."""
    from blocklowrank.cli import main

    model, _, _ = tiny_gpt2
    base = tmp_path / "gpt2-base"
    model.transformer.save_pretrained(base)  # GPT2Model
    np.save(tmp_path / "tokens.npy", np.arange(20))
    np.save(tmp_path / "floats.npy", np.ones(5))
    np.save(tmp_path / "too-big.npy", np.array([3, 500]))
    capsys.readouterr()
    out = str(tmp_path / "out.safetensors")
    runs = {
        "needs a loss": [str(base), "--tokens", str(tmp_path / "tokens.npy"), "--output-grams"],
        "no config.json": [str(tmp_path), "--tokens", str(tmp_path / "tokens.npy")],
        "integer array": [str(base), "--tokens", str(tmp_path / "floats.npy")],
        "outside the model's vocabulary": [str(base), "--tokens", str(tmp_path / "too-big.npy")],
        "selects no linear layer": [str(base), "--tokens", str(tmp_path / "tokens.npy"), "--target-modules", "zz"],
    }
    for expected, args in runs.items():
        assert main(["calibrate", *args, "--out", out, "-q"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "out.safetensors").exists()
    assert main(["calibrate", str(base), "--tokens", str(tmp_path / "tokens.npy"), "--out", out, "-q"]) == 0
    assert "wrote" in capsys.readouterr().out


def test_masked_lm_gram_comes_from_the_clean_inputs(torch):
    """A masked LM's own loss masks a copy of the batch for H; G is the clean batch's."""
    import transformers

    from blocklowrank.calibration.collect import collect_statistics

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    model = transformers.BertForMaskedLM(config).eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(5, 50, size=(3, 10)))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    clean = collect_statistics(model, [batch], progress=False)
    both = collect_statistics(model, [batch], output_grams=True, mask_token_id=4, progress=False)
    assert both.loss == "masked-lm" and set(both.output_layers) == set(both.layers)
    for layer in clean.layers:
        np.testing.assert_array_equal(both.input_gram(layer), clean.input_gram(layer))
    assert all(np.abs(both.output_gram(layer)).max() > 0 for layer in both.layers if "encoder" in layer)


def test_collector_refusals(torch, tiny_gpt2):
    from blocklowrank.calibration.collect import collect_statistics

    model, batches, _ = tiny_gpt2
    with pytest.raises(CalibrationError, match="selects no linear layer"):
        collect_statistics(model, batches, target_modules=["nothing_here"], progress=False)
    with pytest.raises(ValueError, match="output_grams=True"):
        collect_statistics(model, batches, loss_fn=lambda m, b: 0, progress=False)
    with pytest.raises(CalibrationError, match="no token"):
        collect_statistics(model, [{**batches[0], "attention_mask": batches[0]["attention_mask"] * 0}], progress=False)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.transformer.h[0].attn.c_proj.weight[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="NaN"):
        collect_statistics(broken, batches, progress=False)
    base = model.transformer  # a GPT2Model: no language-modelling head, so no loss of its own
    with pytest.raises(CalibrationError, match="needs a loss"):
        collect_statistics(base, batches, output_grams=True, progress=False)


def test_the_command_on_minilm(torch, minilm, tmp_path):
    """`blocklowrank calibrate` end to end in a subprocess on a few sentences: the file fits the
    checkpoint's layers and holds what the collector gives in-process on the same batches; a run
    that must not overwrite, or has no loss for --output-grams, is refused in one line, writing nothing."""
    from blocklowrank.calibration.collect import collect_statistics
    from blocklowrank.checkpoints import open_checkpoint, pair_layers
    from blocklowrank.cli import main

    model, batches, folder = minilm
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES) + "\n\n", encoding="utf-8")
    out = tmp_path / "stats.safetensors"
    command = [sys.executable, "-m", "blocklowrank", "calibrate", str(folder), "--texts", str(texts)]
    run = subprocess.run([*command, "--out", str(out), "--batch-size", "3", "-q"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"wrote {out}") and "37 layers, 25 input sites" in run.stdout
    with open_checkpoint(folder / "model.safetensors") as ckpt:
        layers = {pair.module: pair.shape for pair in pair_layers(ckpt, None).pairs}
    in_process = collect_statistics(model, batches, progress=False)
    with load_statistics(out) as stats:
        check_statistics(stats, layers)
        assert stats.layer_sites == in_process.layer_sites and stats.input_counts == in_process.input_counts
        for site in stats.sites:
            _close(stats.site_gram(site), in_process.site_gram(site), rtol=1e-6)
    before = out.read_bytes()
    assert main(["calibrate", str(folder), "--texts", str(texts), "--out", str(out), "-q"]) == 2
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors", "texts.txt"]


def test_a_bfloat16_model_is_accumulated_from_its_exact_values(torch, tiny_gpt2):
    """Claim: a model running in bfloat16 gives G = Σ h hᵀ / n of its bfloat16 activations, each
    decoded exactly (to float32, then float64), and its dtype is recorded."""
    from blocklowrank.calibration.collect import collect_statistics

    model = copy.deepcopy(tiny_gpt2[0]).to(torch.bfloat16)
    batches = tiny_gpt2[1]
    stats = collect_statistics(model, batches, target_modules=["mlp.c_fc"], progress=False)
    reference, tokens = 0.0, 0
    for b in batches:
        captured = []
        handle = model.transformer.h[0].ln_2.register_forward_hook(lambda m, a, out: captured.append(out))
        with torch.no_grad():
            model(**b)
        handle.remove()
        assert captured[0].dtype == torch.bfloat16
        reference = reference + _reference_sum(captured[0].float().numpy(), b["attention_mask"].numpy())
        tokens += int(b["attention_mask"].sum())
    assert stats.model_dtype == "bfloat16" and stats.layers == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    _close(stats.input_gram("transformer.h.0.mlp.c_fc"), reference / tokens)


def test_without_tqdm_the_run_goes_on(torch, tiny_gpt2, monkeypatch):
    """The progress bar is the sweeps' (blocklowrank.sweep): without tqdm it is a bar that draws nothing."""
    from blocklowrank import sweep
    from blocklowrank.calibration import collect

    monkeypatch.setattr(sweep, "_tqdm", lambda: None)  # what sweep._tqdm gives, after its warning, without tqdm
    stats = collect.collect_statistics(tiny_gpt2[0], tiny_gpt2[1], progress=True)
    assert stats.info["tokens"] == 43


def test_checked_statistics_are_factored_without_a_second_psd_check(monkeypatch):
    """Claim: a Gram that check_statistics has accepted is factored once (the damped factor), not twice
    (the PSD check at the file's tolerance, then the factor), and to the same factor bit for bit; an
    unchecked one pays both factorisations; an indefinite G is refused either way,
    by check_statistics or by the factor's own check; check_statistics(factor=False) (what extract uses: it
    writes nothing before its fits end) leaves that check to the factor, one factorisation per site in all."""
    from scipy.linalg import lapack

    rng = np.random.default_rng(7)
    X = rng.standard_normal((50, 6))
    G = X.T @ X / 50
    calls = []
    real = lapack.dpotrf
    monkeypatch.setattr(lapack, "dpotrf", lambda *a, **k: calls.append(1) or real(*a, **k))
    unchecked = CalibrationStats({"s": G}, {"s": 50}, {"fc": "s"})
    F0 = unchecked.input_factor("fc")
    n_unchecked, calls[:] = len(calls), []
    checked = CalibrationStats({"s": G}, {"s": 50}, {"fc": "s"})
    check_statistics(checked, {"fc": (4, 6)})
    calls[:] = []
    F1 = checked.input_factor("fc")
    assert (n_unchecked, len(calls)) == (2, 1)
    deferred = CalibrationStats({"s": G}, {"s": 50}, {"fc": "s"})
    calls[:] = []
    check_statistics(deferred, {"fc": (4, 6)}, factor=False)  # no factorisation: the factor will check
    assert len(calls) == 0
    deferred.input_factor("fc")
    assert len(calls) == 2
    np.testing.assert_array_equal(F1.rmul_factor(np.eye(6)), F0.rmul_factor(np.eye(6)))  # the same factor
    np.testing.assert_array_equal(F1.rmul(np.eye(6)), F0.rmul(np.eye(6)))
    bad = G.copy()  # a positive diagonal, an indefinite 2 x 2 minor: only a factorisation finds it
    bad[0, 1] = bad[1, 0] = 1.5 * np.sqrt(G[0, 0] * G[1, 1])
    with pytest.raises(ValueError, match="not positive semi-definite"):
        check_statistics(CalibrationStats({"s": bad}, {"s": 50}, {"fc": "s"}), {"fc": (4, 6)})
    with pytest.raises(ValueError, match="not positive semi-definite"):
        CalibrationStats({"s": bad}, {"s": 50}, {"fc": "s"}).input_factor("fc")
    late = CalibrationStats({"s": bad}, {"s": 50}, {"fc": "s"})
    check_statistics(late, {"fc": (4, 6)}, factor=False)
    with pytest.raises(ValueError, match=r"entry 'G\.s' is not positive semi-definite"):
        late.input_factor("fc")

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

import json
import os

import numpy as np
import pytest
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

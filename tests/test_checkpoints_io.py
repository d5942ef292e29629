"""Tests of blocklowrank.checkpoints.safetensors: format, hostile files, BF16, interop.

Every file is generated here (no binary fixtures). The ``safetensors`` and
``ml_dtypes`` packages, when installed (the ``test`` extra), serve as
independent references; those tests skip without them.
"""

import json
import math
import os
import pickle
from fractions import Fraction

import numpy as np
import pytest

from blocklowrank.checkpoints import (
    MAX_HEADER_BYTES,
    Checkpoint,
    CheckpointError,
    TensorInfo,
    load_file,
    open_checkpoint,
    save_file,
)
from blocklowrank.checkpoints import safetensors as st
from blocklowrank.checkpoints._dtypes import DTYPES, bf16_to_float32, float_to_bf16

# ---------------------------------------------------------------- helpers


def raw_file(path, header, buffer=b"", *, length=None):
    """Write a safetensors file by hand: ``header`` a dict, str or bytes."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    n = len(header) if length is None else length
    path.write_bytes(n.to_bytes(8, "little") + header + buffer)
    return path


def entry(dtype="F32", shape=(1,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def sample_tensors():
    rng = np.random.default_rng(0)
    return {
        "w64": rng.standard_normal((3, 2)),
        "w32": rng.standard_normal((2, 5)).astype(np.float32),
        "w16": rng.standard_normal(4).astype(np.float16),
        "i8": np.arange(-3, 3, dtype=np.int8),
        "u8": np.arange(6, dtype=np.uint8).reshape(2, 3),
        "i16": np.arange(4, dtype=np.int16),
        "u16": np.arange(4, dtype=np.uint16),
        "i32": np.arange(4, dtype=np.int32),
        "u32": np.arange(4, dtype=np.uint32),
        "i64": np.arange(4, dtype=np.int64) - 2**40,
        "u64": np.arange(4, dtype=np.uint64) + 2**63,
        "flags": np.array([True, False, True]),
        "c64": np.array([1 + 2j, -3j], dtype=np.complex64),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------- round trips


def test_round_trip_every_dtype_with_metadata(tmp_path):
    tensors = sample_tensors()
    path = save_file(tmp_path / "all.safetensors", tensors, metadata={"format": "pt", "note": "é"})
    with open_checkpoint(path) as ckpt:
        assert sorted(ckpt.names()) == sorted(tensors)
        assert ckpt.metadata == {"format": "pt", "note": "é"}
        for name, array in tensors.items():
            assert same_bits(ckpt.get(name), array), name
    assert all(same_bits(load_file(path)[k], v) for k, v in tensors.items())


def test_header_aligned_and_sorted_like_the_reference(tmp_path):
    path = save_file(tmp_path / "x.safetensors", sample_tensors())
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert n % 8 == 0 and data[8 + n - 1 : 8 + n] in (b" ", b"}")
    header = json.loads(data[8 : 8 + n])
    names = list(header)
    ranks = [DTYPES[header[k]["dtype"]].rank for k in names]
    assert ranks == sorted(ranks, reverse=True)
    for rank in set(ranks):  # by name within one dtype
        group = [k for k, r in zip(names, ranks) if r == rank]
        assert group == sorted(group)
    with Checkpoint(path) as ckpt:  # storage order is the data order
        assert ckpt.names() == names
        begin, end = header["w64"]["data_offsets"]
        assert ckpt.info("w64").offsets == (8 + n + begin, 8 + n + end) and end - begin == 48


def test_bf16_round_trip_and_forced_dtypes(tmp_path):
    x = np.array([[1.0, -2.5], [3.140625, np.inf]], dtype=np.float32)
    h = np.array([0.1, 0.2], dtype=np.float64)
    path = save_file(tmp_path / "b.safetensors", {"x": x, "h": h}, dtypes={"x": "BF16", "h": "F16"})
    with Checkpoint(path) as ckpt:
        assert ckpt.info("x").dtype == "BF16" and ckpt.info("h").dtype == "F16"
        got = ckpt.get("x")
        assert got.dtype == np.float32 and np.array_equal(got, x)  # all exactly representable
        assert ckpt.get("h").dtype == np.float16
        assert ckpt.get("h", dtype=np.float64).dtype == np.float64
        assert np.array_equal(ckpt.get("h"), h.astype(np.float16))
    path = save_file(tmp_path / "all.safetensors", {"a": x, "b": h}, dtypes="BF16")
    assert {Checkpoint(path).info(k).dtype for k in "ab"} == {"BF16"}


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"metadata": {"epoch": 3}}, TypeError, "metadata keys and values must be strings"),
        ({"metadata": {1: "x"}}, TypeError, "metadata keys and values must be strings"),
        ({"dtypes": "F128"}, ValueError, "cannot write dtype 'F128'"),
        ({"dtypes": "F8_E4M3"}, ValueError, "cannot write dtype 'F8_E4M3'"),
        ({"dtypes": {"nope": "F16"}}, ValueError, "not being saved"),
        ({"dtypes": "I32"}, TypeError, "cannot be stored as I32; cast it first"),
    ],
)
def test_save_file_rejects_bad_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        save_file(tmp_path / "x.safetensors", {"w": np.ones(2)}, **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "tensors, error, match",
    [
        ({"__metadata__": np.ones(1)}, ValueError, "reserved"),
        ({3: np.ones(1)}, TypeError, "names must be strings"),
        ({"o": np.array([object()])}, TypeError, "cannot store"),
        ({"s": np.array(["a"])}, TypeError, "cannot store"),
        ([("w", np.ones(1))], TypeError, "mapping"),
        ({"i": np.arange(3)}, TypeError, "BF16 needs a floating array"),
        ({"bad\ud800": np.ones(1)}, ValueError, "not valid Unicode"),
    ],
)
def test_save_file_rejects_bad_tensors(tmp_path, tensors, error, match):
    dtypes = "BF16" if match.startswith("BF16") else None
    with pytest.raises(error, match=match):
        save_file(tmp_path / "x.safetensors", tensors, dtypes=dtypes)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = save_file(tmp_path / "m.safetensors", {"a": np.ones(3)})
    before = path.read_bytes()
    calls = []

    def failing(array, code):
        calls.append(code)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return np.ascontiguousarray(array)

    monkeypatch.setattr(st, "_encoded", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        save_file(path, {"a": np.zeros(3), "b": np.zeros(2)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left


def test_non_contiguous_and_big_endian_arrays(tmp_path):
    a = np.arange(12, dtype=">f8").reshape(3, 4)[:, ::2]
    path = save_file(tmp_path / "x.safetensors", {"a": a})
    got = Checkpoint(path).get("a")
    assert got.dtype == np.dtype("<f8") and np.array_equal(got, a)


# ---------------------------------------------------------------- lazy reading


def test_listing_reads_only_the_header(tmp_path, monkeypatch):
    path = save_file(tmp_path / "x.safetensors", sample_tensors())

    def no_mmap(*args, **kwargs):
        raise AssertionError("tensor data was mapped")

    monkeypatch.setattr(st.mmap, "mmap", no_mmap)
    with Checkpoint(path) as ckpt:
        info = ckpt.info("w32")
        assert info == TensorInfo("w32", "F32", (2, 5), path, info.offsets)
        assert len(ckpt) == 15 and "w16" in ckpt and "nope" not in ckpt and 3 not in ckpt
        assert list(ckpt) == ckpt.names() and "15 tensors" in repr(ckpt)


def test_large_sparse_file_is_opened_lazily(tmp_path):
    n_rows = 2**14
    header = json.dumps({"big": entry("F32", (n_rows, n_rows), (0, 4 * n_rows**2))}).encode()
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:  # 1 GiB, sparse: nothing is written or read
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 4 * n_rows**2)
    with Checkpoint(path) as ckpt:
        big = ckpt.get("big")
        assert big.shape == (n_rows, n_rows) and not big.flags.owndata and not big.flags.writeable
        assert big[-1, -1] == 0.0


def test_get_returns_memory_mapped_read_only_views(tmp_path):
    path = save_file(tmp_path / "x.safetensors", {"w": np.ones((2, 2), np.float32)})
    ckpt = Checkpoint(path)
    w = ckpt.get("w")
    assert not w.flags.writeable and not w.flags.owndata
    ckpt.close()
    assert w.sum() == 4  # still valid after close
    with pytest.raises(ValueError, match="closed"):
        ckpt.get("w")
    with pytest.raises(KeyError, match="no tensor 'v'"):
        ckpt.info("v")
    writable = load_file(path)["w"]
    writable[0, 0] = 5  # load_file copies


def test_file_changed_after_opening(tmp_path):
    path = save_file(tmp_path / "x.safetensors", {"w": np.ones(4)})
    ckpt = Checkpoint(path)
    with open(path, "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(CheckpointError, match="changed size"):
        ckpt.get("w")


# ---------------------------------------------------------------- hostile files

F4 = entry()  # one float32 at [0, 4)

HOSTILE = {
    "short file": (b"\x01\x02\x03", None, "too few for a safetensors header", None),
    "header past end": ({"a": F4}, b"\0" * 4, "runs past the file", None, 10_000),
    "absurd header length": ({"a": F4}, b"\0" * 4, f"{MAX_HEADER_BYTES}-byte limit", None, 2**63),
    "not utf-8": (b'{"\xff": 1}', b"", "not valid UTF-8", None),
    "not json": ('{"a": ', b"", "not valid JSON", None),
    "json array": ("[1, 2]", b"", "does not start with '{'", None),
    "leading space": (' {"a": ' + json.dumps(F4) + "}", b"\0" * 4, "does not start with '{'", None),
    "NaN constant": ('{"a": NaN}', b"", "contains NaN", None),
    "deep nesting": ('{"a":' + "[" * 100_000 + "]" * 100_000 + "}", b"", "nested too deeply", None),
    "entry not object": ({"a": 3}, b"", "entry must be an object", "a"),
    "missing offsets": ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "lacks data_offsets", "a"),
    "dtype not str": ({"a": entry(dtype=3)}, b"\0" * 4, "unknown dtype 3", "a"),
    "unknown dtype": ({"a": entry(dtype="F128")}, b"\0" * 4, "unknown dtype 'F128'", "a"),
    "negative shape": ({"a": entry(shape=(-1,))}, b"\0" * 4, "non-negative integers", "a"),
    "float shape": ({"a": entry(shape=(1.0,))}, b"\0" * 4, "non-negative integers", "a"),
    "bool shape": ({"a": entry(shape=(True,))}, b"\0" * 4, "non-negative integers", "a"),
    "shape not list": ({"a": {**F4, "shape": "1"}}, b"\0" * 4, "non-negative integers", "a"),
    "three offsets": ({"a": entry(offsets=(0, 2, 4))}, b"\0" * 4, "two non-negative", "a"),
    "negative offset": ({"a": entry(offsets=(-4, 0))}, b"\0" * 4, "two non-negative", "a"),
    "offsets reversed": ({"a": entry(offsets=(4, 0))}, b"\0" * 4, "fall outside", "a"),
    "offsets past buffer": ({"a": entry(offsets=(4, 8))}, b"\0" * 4, "fall outside", "a"),
    "size mismatch": ({"a": entry(shape=(2,))}, b"\0" * 4, "needs 8 bytes", "a"),
    "overflowing shape": ({"a": entry(shape=(2**40, 2**40))}, b"\0" * 4, "needs", "a"),
    "sub-byte leftover": ({"a": entry("F4", (3,), (0, 1))}, b"\0", "needs 1.5 bytes", "a"),
    "overlap": ({"a": F4, "b": F4}, b"\0" * 4, "overlaps tensor 'a'", "b"),
    "gap": ({"a": entry(offsets=(4, 8))}, b"\0" * 8, "4 bytes unused", "a"),
    "trailing bytes": ({"a": F4}, b"\0" * 8, "cover 4 of the 8 bytes", None),
    "duplicate name": ('{"a": %s, "a": %s}' % (json.dumps(F4), json.dumps(F4)), b"\0" * 4, "key 'a' twice", None),
    "duplicate field": ('{"a": {"dtype": "F32", "dtype": "F32"}}', b"", "key 'dtype' twice", None),
    "metadata not map": ({"__metadata__": [1]}, b"", "__metadata__ must be a JSON object", None),
    "metadata value int": ({"__metadata__": {"k": 1}}, b"", r"__metadata__\['k'\] must be a string", None),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_file_raises_checkpoint_error(tmp_path, case):
    header, buffer, match, tensor, *length = HOSTILE[case]
    path = tmp_path / "bad.safetensors"
    if isinstance(header, bytes) and buffer is None:
        path.write_bytes(header)
    else:
        raw_file(path, header, buffer, length=length[0] if length else None)
    with pytest.raises(CheckpointError, match=match) as info:
        Checkpoint(path)
    message = str(info.value)
    assert message.startswith(str(path))
    if tensor is not None:
        assert f"tensor {tensor!r}" in message


def test_bad_bool_byte_and_unreadable_dtype(tmp_path):
    path = raw_file(tmp_path / "x.safetensors", {"b": entry("BOOL", (2,), (0, 2)), "f8": entry("F8_E4M3", (2,), (2, 4))}, b"\x01\x07\0\0")
    with Checkpoint(path) as ckpt:
        assert ckpt.info("f8").dtype == "F8_E4M3"  # listing works
        with pytest.raises(CheckpointError, match="tensor 'b': a BOOL byte is neither 0 nor 1"):
            ckpt.get("b")
        with pytest.raises(CheckpointError, match="tensor 'f8': dtype F8_E4M3 has no NumPy"):
            ckpt.get("f8")


def test_empty_header_and_null_metadata_are_valid(tmp_path):
    assert len(Checkpoint(raw_file(tmp_path / "e.safetensors", "{}  "))) == 0
    ckpt = Checkpoint(raw_file(tmp_path / "n.safetensors", {"__metadata__": None}))
    assert ckpt.metadata == {}


# ---------------------------------------------------------------- pickles and folders


class _Boom:
    """Unpickling this creates a marker file: proof that a file was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "last.ckpt"])
def test_pickle_checkpoints_are_refused_unopened(tmp_path, name):
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(CheckpointError, match="convert it to safetensors"):
        Checkpoint(path)
    with pytest.raises(CheckpointError, match="never opened"):
        Checkpoint(tmp_path)  # a folder with only a pickle checkpoint
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"PK\x03\x04" + b"\0" * 60, pickle.dumps({"w": 1}, protocol=2)])
def test_pickle_content_under_a_safetensors_name_is_recognised(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="pickle-based"):
        Checkpoint(path)


def test_folder_resolution(tmp_path):
    one = np.ones(1, np.float32)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(adapter / "adapter_model.safetensors", {"a": one})
    (adapter / "adapter_config.json").write_text("{}")
    assert Checkpoint(adapter).path.name == "adapter_model.safetensors"

    both = tmp_path / "both"
    both.mkdir()
    save_file(both / "model.safetensors", {"a": one})
    save_file(both / "extra.safetensors", {"a": one})
    (both / "pytorch_model.bin").write_bytes(b"never read")
    assert Checkpoint(both).path.name == "model.safetensors"  # the standard name wins
    (both / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="several candidate checkpoints"):
        Checkpoint(both)

    two = tmp_path / "two"
    two.mkdir()
    save_file(two / "a.safetensors", {"a": one})
    save_file(two / "b.safetensors", {"a": one})
    with pytest.raises(CheckpointError, match=r"several candidate checkpoints \(a.safetensors, b.safetensors\)"):
        Checkpoint(two)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no .safetensors file"):
        Checkpoint(empty)
    with pytest.raises(FileNotFoundError):
        Checkpoint(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------- sharded checkpoints


def write_sharded(folder, weight_map=None, shards=None):
    """Two shards and their index; ``weight_map`` overrides the index's map."""
    folder.mkdir(exist_ok=True)
    shards = shards or {
        "model-00001-of-00002.safetensors": {"a": np.ones((2, 2), np.float32)},
        "model-00002-of-00002.safetensors": {"b": np.arange(3.0), "c": np.zeros(1, np.float16)},
    }
    for i, (shard, tensors) in enumerate(shards.items()):
        save_file(folder / shard, tensors, metadata={"shard": str(i)})
    if weight_map is None:
        weight_map = {name: shard for shard, tensors in shards.items() for name in tensors}
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def test_sharded_checkpoint(tmp_path):
    index = write_sharded(tmp_path / "m")
    for path in (index, tmp_path / "m"):
        with Checkpoint(path) as ckpt:
            assert ckpt.path == index
            assert ckpt.names() == ["a", "b", "c"]
            assert [f.name for f in ckpt.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
            assert ckpt.metadata == {"shard": "0"}
            assert ckpt.info("b").file.name == "model-00002-of-00002.safetensors"
            assert np.array_equal(ckpt.get("b"), np.arange(3.0))
    assert set(load_file(index)) == {"a", "b", "c"}


def test_sharded_subfolder_and_hub_cache_symlinks(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    save_file(blobs / "abc123", {"w": np.ones(2)})
    snapshot = tmp_path / "snapshots" / "rev"
    (snapshot / "sub").mkdir(parents=True)
    (snapshot / "sub" / "w.safetensors").symlink_to(os.path.relpath(blobs / "abc123", snapshot / "sub"))
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "sub/w.safetensors"}}))
    assert np.array_equal(Checkpoint(snapshot).get("w"), np.ones(2))


SHARD_1, SHARD_2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


@pytest.mark.parametrize(
    "weight_map, match",
    [
        ({"a": SHARD_1, "b": SHARD_2, "c": SHARD_2, "d": SHARD_2}, "tensor 'd': the weight_map puts it in"),
        ({"a": SHARD_1, "b": SHARD_2}, "tensor 'c': stored in shard '.*' but is missing from the index"),
        ({"a": SHARD_1, "b": SHARD_2, "c": "model-00003.safetensors"}, "shard 'model-00003.safetensors' named in the weight_map does not exist"),
        ({"a": "../m/" + SHARD_1}, "leaves the checkpoint's folder"),
        ({"a": "/etc/passwd"}, "leaves the checkpoint's folder"),
        ({"a": "sub/../../x.safetensors"}, "leaves the checkpoint's folder"),
        ({"a": "C:\\x.safetensors"}, "leaves the checkpoint's folder"),
        ({"a": 3}, "weight_map\\['a'\\] must be a string"),
        ([1], "weight_map must be a JSON object"),
    ],
)
def test_bad_index(tmp_path, weight_map, match):
    index = write_sharded(tmp_path / "m", weight_map)
    with pytest.raises(CheckpointError, match=match) as info:
        Checkpoint(index)
    assert str(info.value).startswith(str(index))


def test_tensor_in_two_shards(tmp_path):
    shards = {SHARD_1: {"a": np.ones(1)}, SHARD_2: {"a": np.ones(1), "b": np.ones(1)}}
    index = write_sharded(tmp_path / "m", {"a": SHARD_1, "b": SHARD_2}, shards)
    with pytest.raises(CheckpointError, match=f"tensor 'a': stored in shard '{SHARD_2}' but is also in '{SHARD_1}'"):
        Checkpoint(index)


@pytest.mark.parametrize("text", ['{"metadata": {}}', "[]", '{"weight_map": {"a": "x", "a": "y"}}', "{"])
def test_index_without_a_weight_map_or_not_json(tmp_path, text):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(text)
    with pytest.raises(CheckpointError, match="weight_map|twice|not valid JSON"):
        Checkpoint(index)


# ---------------------------------------------------------------- bfloat16 codec

ALL_BF16 = np.arange(2**16, dtype=np.uint32).astype(np.uint16)


def bf16_value(bits):
    """Decode one bfloat16 pattern from its fields, independently of the bit trick."""
    sign = -1.0 if bits >> 15 else 1.0
    exponent, mantissa = (bits >> 7) & 0xFF, bits & 0x7F
    if exponent == 0xFF:
        return sign * math.inf if mantissa == 0 else math.nan
    if exponent == 0:
        return sign * math.ldexp(mantissa, -133)  # subnormal: m * 2**(1 - 127 - 7)
    return sign * math.ldexp(128 + mantissa, exponent - 134)


def test_bf16_decode_all_65536_patterns_bit_for_bit():
    decoded = bf16_to_float32(ALL_BF16)
    expected = np.array([bf16_value(int(b)) for b in ALL_BF16], dtype=np.float64)
    nan = np.isnan(expected)
    assert np.array_equal(decoded[~nan].astype(np.float64), expected[~nan])
    assert np.array_equal(np.signbit(decoded[~nan]), np.signbit(expected[~nan]))  # -0.0 too
    assert np.isnan(decoded[nan]).all()
    assert np.array_equal(decoded.view(np.uint32) >> 16, ALL_BF16)  # NaN payloads kept
    assert np.array_equal(decoded.view(np.uint32) & 0xFFFF, np.zeros(2**16, np.uint32))


def test_bf16_encode_is_exact_on_every_bf16_value():
    decoded = bf16_to_float32(ALL_BF16)
    encoded = float_to_bf16(decoded)
    finite_or_inf = ~np.isnan(decoded)
    assert np.array_equal(encoded[finite_or_inf], ALL_BF16[finite_or_inf])
    assert np.isnan(bf16_to_float32(encoded[~finite_or_inf])).all()
    with np.errstate(invalid="ignore"):  # signalling NaNs
        as_float64 = decoded.astype(np.float64)
    assert np.array_equal(float_to_bf16(as_float64)[finite_or_inf], ALL_BF16[finite_or_inf])


def nearest_even_bf16(x):
    """Round float32/64 values to bfloat16 by search over all finite bf16 values (a reference)."""
    finite = ALL_BF16[np.isfinite(bf16_to_float32(ALL_BF16))]
    values = bf16_to_float32(finite).astype(np.float64)
    order = np.argsort(values, kind="stable")
    values, patterns = values[order], finite[order]
    keep = np.r_[True, values[1:] != values[:-1]]  # drop -0.0 duplicates of +0.0
    values, patterns = values[keep], patterns[keep]
    out = []
    x = np.asarray(x, dtype=np.float64)
    for v, negative in zip(map(Fraction, x), np.signbit(x)):
        hi = int(np.searchsorted(values, float(v)))
        lo = max(hi - 1, 0)
        hi = min(hi, len(values) - 1)
        d_lo, d_hi = abs(v - Fraction(values[lo])), abs(Fraction(values[hi]) - v)
        pick = lo if (d_lo, patterns[lo] & 1) < (d_hi, patterns[hi] & 1) else hi
        if abs(v) >= Fraction(values[-1]) + Fraction(2) ** (127 - 8):  # half an ulp past max: inf
            out.append(0xFF80 if v < 0 else 0x7F80)
        else:
            bits = int(patterns[pick])
            out.append(bits | 0x8000 if negative and bits == 0 else bits)  # keep the sign of zero
    return np.array(out, dtype=np.uint16)


EDGE_FLOAT32_BITS = [
    0x3F808000,  # 1 + 2**-8: tie, rounds down to even 1.0
    0x3F818000,  # tie, rounds up to even
    0x3F808001, 0x3F807FFF,  # just past / just before a tie
    0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF,  # around the overflow threshold
    0xFF7F8000,  # negative overflow
    0x00000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x00800000,  # subnormals and the smallest normal
    0x80008000, 0x80000000, 0x00000000,  # signed zeros
]


def test_bf16_encode_rounding_edge_cases():
    x = np.array(EDGE_FLOAT32_BITS, dtype=np.uint32).view(np.float32)
    assert np.array_equal(float_to_bf16(x), nearest_even_bf16(x))
    assert list(float_to_bf16(x[:4])) == [0x3F80, 0x3F82, 0x3F81, 0x3F80]
    assert list(float_to_bf16(x[4:8])) == [0x7F7F, 0x7F80, 0x7F80, 0xFF80]


def test_bf16_encode_random_float32_matches_reference():
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**32, size=3000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    assert np.array_equal(float_to_bf16(x), nearest_even_bf16(x))


def test_bf16_encode_float64_rounds_once():
    rng = np.random.default_rng(2)
    ties = bf16_to_float32(rng.integers(0, 0x7F7F, size=300).astype(np.uint16)).astype(np.float64)
    ulp = np.ldexp(1.0, np.frexp(ties)[1] - 8)  # one bf16 ulp
    near = ties + ulp / 2 + ulp * rng.choice([-1e-9, 0, 1e-9], size=ties.size)
    x = np.concatenate([near, -near, [1 + 2**-8 + 2**-30, 3.4e38, 1e39, 1e-50, -1e-50]])
    assert np.array_equal(float_to_bf16(x), nearest_even_bf16(x))
    assert float_to_bf16(np.array([1 + 2**-8 + 2**-30]))[0] == 0x3F81  # float32 first would give 0x3F80


def test_bf16_encode_keeps_nan_and_float16_input():
    nan_bits = np.array([0x7FC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FA00000], dtype=np.uint32)
    encoded = float_to_bf16(nan_bits.view(np.float32))
    assert np.isnan(bf16_to_float32(encoded)).all()
    assert np.array_equal(encoded >> 15, (nan_bits >> 31).astype(np.uint16))  # sign kept
    half = np.array([1.0, 65504.0, 6e-8, -0.0], dtype=np.float16)
    assert np.array_equal(bf16_to_float32(float_to_bf16(half)), np.array([1.0, 65536.0, 5.9604645e-08, -0.0], np.float32))
    with pytest.raises(TypeError, match="floating"):
        float_to_bf16(np.arange(3))

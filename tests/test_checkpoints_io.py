"""Tests of the safetensors reader and writer of blocklowrank.checkpoints: round trips, laziness, hostile files, shards.

Every file is generated here (no binary fixtures). The BF16 codec, agreement
with the reference implementation and the property tests are in
``test_checkpoints_reference.py``.
"""

import json
import os
import pickle

import numpy as np
import pytest
from _checkpoint_files import HOSTILE, entry, raw_file, same_bits, sample_tensors, write_hostile

from blocklowrank.checkpoints import Checkpoint, CheckpointError, TensorInfo, load_file, open_checkpoint, save_file
from blocklowrank.checkpoints import _safetensors as st
from blocklowrank.checkpoints._dtypes import DTYPES

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
        group = [k for k, r in zip(names, ranks, strict=True) if r == rank]
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
        ({"metadata": [("k", "v")]}, TypeError, "metadata must be a mapping"),
        ({"dtypes": ["F16"]}, TypeError, "dtypes must be a mapping"),
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
        ([("w", np.ones(1))], TypeError, "tensors must be a mapping"),
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
    with pytest.raises(CheckpointError, match="changed or replaced since it was opened"):
        ckpt.get("w")
    ckpt = Checkpoint(path := save_file(path, {"w": np.ones(4)}))
    save_file(path, {"v": np.ones(4)})  # same size, another file
    with pytest.raises(CheckpointError, match="changed or replaced"):
        ckpt.get("w")


# ---------------------------------------------------------------- hostile files


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_file_raises_checkpoint_error(tmp_path, case):
    path = tmp_path / "bad.safetensors"
    match, tensor = write_hostile(path, case)
    with pytest.raises(CheckpointError, match=match) as info:
        Checkpoint(path)
    message = str(info.value)
    assert message.startswith(str(path))
    if tensor is not None:
        assert f"tensor {tensor!r}" in message


def test_bad_bool_byte_and_unreadable_dtype(tmp_path):
    path = raw_file(
        tmp_path / "x.safetensors",
        {"b": entry("BOOL", (2,), (0, 2)), "f8": entry("F8_E4M3", (2,), (2, 4))},
        b"\x01\x07\0\0",
    )
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
            assert [f.name for f in ckpt.files] == [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
            ]
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
        (
            {"a": SHARD_1, "b": SHARD_2, "c": "model-00003.safetensors"},
            "shard 'model-00003.safetensors' named in the weight_map does not exist",
        ),
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

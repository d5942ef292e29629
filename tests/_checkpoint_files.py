"""Hand-made safetensors files shared by the checkpoint tests (no binary fixtures)."""

import json

import numpy as np

from blocklowrank.checkpoints import MAX_HEADER_BYTES


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
    "duplicate name": (f'{{"a": {json.dumps(F4)}, "a": {json.dumps(F4)}}}', b"\0" * 4, "key 'a' twice", None),
    "duplicate field": ('{"a": {"dtype": "F32", "dtype": "F32"}}', b"", "key 'dtype' twice", None),
    "metadata not map": ({"__metadata__": [1]}, b"", "__metadata__ must be a JSON object", None),
    "metadata value int": ({"__metadata__": {"k": 1}}, b"", r"__metadata__\['k'\] must be a string", None),
}


def write_hostile(path, case):
    """Write the HOSTILE file ``case`` at ``path``; return (message pattern, tensor or None)."""
    header, buffer, match, tensor, *length = HOSTILE[case]
    if buffer is None:
        path.write_bytes(header)
    else:
        raw_file(path, header, buffer, length=length[0] if length else None)
    return match, tensor

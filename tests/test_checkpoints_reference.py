"""The BF16 codec, agreement with the reference implementation, and property tests.

The ``safetensors`` package (the reference reader and writer) and
``ml_dtypes`` (a bfloat16 NumPy type, which the reference needs for BF16)
come with the ``test`` extra; the tests that use them skip without them.
"""

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from _checkpoint_files import HOSTILE, same_bits, sample_tensors, write_hostile

from blocklowrank.checkpoints import Checkpoint, CheckpointError, load_file, save_file
from blocklowrank.checkpoints._dtypes import bf16_to_float32, float_to_bf16

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
    for v, negative in zip(map(Fraction, x), np.signbit(x), strict=True):
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
    0x3F808001,
    0x3F807FFF,  # just past / just before a tie
    0x7F7F7FFF,
    0x7F7F8000,
    0x7F7FFFFF,  # around the overflow threshold
    0xFF7F8000,  # negative overflow
    0x00000001,
    0x00008000,
    0x00018000,
    0x007FFFFF,
    0x00800000,  # subnormals and the smallest normal
    0x80008000,
    0x80000000,
    0x00000000,  # signed zeros
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
    assert np.array_equal(
        bf16_to_float32(float_to_bf16(half)), np.array([1.0, 65536.0, 5.9604645e-08, -0.0], np.float32)
    )
    with pytest.raises(TypeError, match="floating"):
        float_to_bf16(np.arange(3))


# ---------------------------------------------------------------- the reference implementation

#: Files the format's README forbids but the reference reader accepts.
REFERENCE_ACCEPTS = {"leading space", "duplicate name"}


@pytest.fixture
def reference():
    return pytest.importorskip("safetensors.numpy")


def interop_tensors():
    """sample_tensors without complex64, which older reference versions cannot write."""
    return {name: array for name, array in sample_tensors().items() if array.dtype.kind != "c"}


def test_reference_files_read_bit_for_bit(tmp_path, reference):
    tensors = interop_tensors()
    path = tmp_path / "ref.safetensors"
    reference.save_file(tensors, str(path), metadata={"format": "pt"})
    with Checkpoint(path) as ckpt:
        assert ckpt.metadata == {"format": "pt"}
        assert all(same_bits(ckpt.get(name), array) for name, array in tensors.items())


def test_our_files_read_by_the_reference(tmp_path, reference):
    from safetensors import safe_open

    tensors = interop_tensors()
    path = save_file(tmp_path / "ours.safetensors", tensors, metadata={"format": "pt", "b": "2"})
    loaded = reference.load_file(str(path))
    assert all(same_bits(loaded[name], array) for name, array in tensors.items())
    with safe_open(str(path), framework="np") as f:
        assert f.metadata() == {"format": "pt", "b": "2"}


@pytest.mark.parametrize(
    "tensors, metadata",
    [
        (interop_tensors(), None),
        (interop_tensors(), {"format": "pt"}),
        ({}, None),
        ({'é 名 "quoted" \\ \n\x01\x7f\u2028': np.ones(3, np.float32), "a" * 300: np.zeros((2, 0))}, {"k": "ü\t"}),
    ],
    ids=["all-dtypes", "metadata", "empty", "odd-names"],
)
def test_files_are_byte_identical_to_the_reference(tmp_path, reference, tensors, metadata):
    ours = save_file(tmp_path / "ours.safetensors", tensors, metadata=metadata)
    theirs = tmp_path / "theirs.safetensors"
    reference.save_file(tensors, str(theirs), metadata=metadata)
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_reference_rejects_the_same_hostile_files(tmp_path, reference, case):
    from safetensors import safe_open

    path = tmp_path / "bad.safetensors"
    write_hostile(path, case)
    try:
        with safe_open(str(path), framework="np") as f:
            [f.get_tensor(name) for name in f.keys()]
    except Exception:
        assert case not in REFERENCE_ACCEPTS
    else:
        assert case in REFERENCE_ACCEPTS


def test_bf16_agrees_with_the_reference_and_ml_dtypes(tmp_path, reference):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(4)
    x = np.concatenate(
        [rng.standard_normal(500).astype(np.float32), bf16_to_float32(np.arange(0, 2**16, 7, dtype=np.uint16))]
    )
    x = x[~np.isnan(x)]  # NaN payloads: both keep NaN, their bits may differ
    assert np.array_equal(float_to_bf16(x), x.astype(ml_dtypes.bfloat16).view(np.uint16))
    path = save_file(tmp_path / "ours.safetensors", {"w": x.reshape(-1, 1)}, dtypes="BF16")
    theirs = reference.load_file(str(path))["w"]
    assert theirs.dtype == ml_dtypes.bfloat16
    assert np.array_equal(theirs.view(np.uint16).ravel(), float_to_bf16(x))
    reference.save_file({"w": theirs}, str(tmp_path / "theirs.safetensors"))
    assert (tmp_path / "theirs.safetensors").read_bytes() == path.read_bytes()
    assert np.array_equal(Checkpoint(tmp_path / "theirs.safetensors").get("w"), theirs.astype(np.float32))


# ---------------------------------------------------------------- property tests

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as hs  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

DTYPE_CHOICES = ["<f8", "<f4", "<f2", ">f4", "<i8", "<i4", "<i2", "|i1", "<u8", "<u4", "<u2", "|u1", "|b1", "<c8"]
NAMES = hs.text(min_size=1, max_size=12).filter(lambda name: name != "__metadata__")
ARRAYS = hs.sampled_from(DTYPE_CHOICES).flatmap(
    lambda dtype: hnp.arrays(np.dtype(dtype), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
)


@given(
    tensors=hs.dictionaries(NAMES, ARRAYS, max_size=5),
    metadata=hs.none() | hs.dictionaries(hs.text(max_size=8), hs.text(max_size=8), max_size=3),
)
def test_round_trip_property(tmp_path_factory, tensors, metadata):
    path = save_file(tmp_path_factory.mktemp("rt") / "x.safetensors", tensors, metadata=metadata)
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, array in tensors.items():
        assert same_bits(loaded[name], array.astype(array.dtype.newbyteorder("<")))
    assert Checkpoint(path).metadata == (metadata or {})


def _valid_file(folder):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(3, dtype=np.int16), "c": np.ones(2)}
    return save_file(folder / "good.safetensors", tensors, dtypes={"c": "BF16"}, metadata={"k": "v"})


@given(
    edits=hs.lists(hs.tuples(hs.integers(0, 10**6), hs.integers(0, 255)), min_size=1, max_size=4),
    cut=hs.none() | hs.integers(0, 400),
    tail=hs.binary(max_size=16),
)
def test_corrupted_header_gives_the_right_tensors_or_checkpoint_error(tmp_path_factory, edits, cut, tail):
    folder = tmp_path_factory.mktemp("corrupt")
    good = Checkpoint(_valid_file(folder))
    data = bytearray(good.path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    for position, value in edits:  # corrupt the length and the header, never the data
        data[position % header_end] = value
    data = bytes(data[:cut] if cut is not None else data) + tail
    path = folder / "bad.safetensors"
    path.write_bytes(data)
    try:
        with Checkpoint(path) as bad:
            for name in bad:
                info = bad.info(name)
                array = bad.get(name)
                assert array.shape == info.shape
                if name in good and good.info(name)._replace(file=path) == info:
                    assert same_bits(array, good.get(name))
    except CheckpointError:
        pass


@given(edits=hs.lists(hs.tuples(hs.integers(0, 10**6), hs.integers(0, 255)), min_size=1, max_size=3))
def test_corrupted_index_gives_the_right_tensors_or_checkpoint_error(tmp_path_factory, edits):
    folder = tmp_path_factory.mktemp("index")
    tensors = {"a": np.ones((2, 2), np.float32), "b": np.arange(3.0), "c": np.zeros(1, np.int8)}
    save_file(folder / "s1.safetensors", {"a": tensors["a"]})
    save_file(folder / "s2.safetensors", {"b": tensors["b"], "c": tensors["c"]})
    weight_map = {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"}
    text = bytearray(json.dumps({"weight_map": weight_map}).encode())
    for position, value in edits:
        text[position % len(text)] = value
    index = folder / "model.safetensors.index.json"
    index.write_bytes(bytes(text))
    try:
        with Checkpoint(index) as ckpt:  # shards are intact, so an accepted index is exact
            assert sorted(ckpt) == sorted(tensors)
            assert all(same_bits(ckpt.get(name), tensors[name]) for name in ckpt)
    except CheckpointError:
        pass

"""Element types of the safetensors format and the bfloat16 codec.

The format names its element types with short codes (``"F32"``, ``"BF16"``,
...). :data:`DTYPES` maps every code the reference implementation knows to its
width in bits and, where NumPy has one, the little-endian NumPy dtype.
NumPy has no bfloat16: a BF16 tensor is stored as ``uint16`` bit patterns,
decoded exactly to float32 by :func:`bf16_to_float32` and encoded with
round-to-nearest-even by :func:`float_to_bf16`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["DTYPES", "DtypeSpec", "code_of", "bf16_to_float32", "float_to_bf16"]


class DtypeSpec(NamedTuple):
    """One safetensors element type.

    Attributes
    ----------
    bits : int
        Width of one element in bits.
    numpy : numpy.dtype or None
        The little-endian NumPy dtype holding the raw values (``uint16`` for
        BF16); None for the types we can list but not read (FP8, FP4, FP6).
    rank : int
        Position in the reference implementation's ``Dtype`` enum, which its
        writer sorts by (descending) before the tensor names.
    """

    bits: int
    numpy: np.dtype | None
    rank: int


def _table():
    # (code, bits, numpy dtype) in the order of the reference ``Dtype`` enum
    # (safetensors/src/tensor.rs), which is its "increasing alignment" order.
    rows = [
        ("BOOL", 8, "|b1"),
        ("F4", 4, None),
        ("F6_E2M3", 6, None),
        ("F6_E3M2", 6, None),
        ("U8", 8, "|u1"),
        ("I8", 8, "|i1"),
        ("F8_E5M2", 8, None),
        ("F8_E4M3", 8, None),
        ("F8_E8M0", 8, None),
        ("F8_E4M3FNUZ", 8, None),
        ("F8_E5M2FNUZ", 8, None),
        ("I16", 16, "<i2"),
        ("U16", 16, "<u2"),
        ("F16", 16, "<f2"),
        ("BF16", 16, "<u2"),
        ("I32", 32, "<i4"),
        ("U32", 32, "<u4"),
        ("F32", 32, "<f4"),
        ("C64", 64, "<c8"),
        ("F64", 64, "<f8"),
        ("I64", 64, "<i8"),
        ("U64", 64, "<u8"),
    ]
    return {
        code: DtypeSpec(bits, None if np_dtype is None else np.dtype(np_dtype), rank)
        for rank, (code, bits, np_dtype) in enumerate(rows)
    }


#: Every element type of the format, by code.
DTYPES = _table()

_CODE_OF = {
    spec.numpy.newbyteorder("<"): code for code, spec in DTYPES.items() if spec.numpy is not None and code != "BF16"
}


def code_of(dtype):
    """Return the safetensors code of a NumPy dtype, or None if the format has none.

    Examples
    --------
    >>> code_of(np.dtype(np.float32)), code_of(np.dtype(">f8")), code_of(np.dtype(bool))
    ('F32', 'F64', 'BOOL')
    """
    dtype = np.dtype(dtype)
    if dtype.byteorder not in "<>=|":  # pragma: no cover - numpy only has these
        return None
    return _CODE_OF.get(dtype.newbyteorder("<"))


def bf16_to_float32(bits):
    """Decode bfloat16 bit patterns (``uint16``) exactly to float32.

    A bfloat16 is the top half of a float32, so the decoded value is the
    pattern shifted into the high 16 bits; NaN payloads are kept.

    Examples
    --------
    >>> bf16_to_float32(np.array([0x3F80, 0xC000, 0x7F80], dtype=np.uint16))
    array([ 1., -2., inf], dtype=float32)
    """
    bits = np.asarray(bits, dtype=np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _float64_to_float32_round_to_odd(x):
    """Round float64 to float32 *to odd*: exact values stay, inexact ones get an odd last bit.

    Rounding to odd first and to nearest-even afterwards (to a format at least
    two bits narrower, as bfloat16 is) equals one correct rounding, which a
    plain float64 -> float32 -> bfloat16 chain does not (double rounding).
    """
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf; NaN stays NaN
        f = x.astype(np.float32)
        back = f.astype(np.float64)
    inexact = np.isfinite(x) & (back != x)
    bits = f.view(np.uint32).copy()
    bits[inexact & (np.abs(back) > np.abs(x))] -= 1  # rounded away from zero: step back
    bits[inexact] |= np.uint32(1)
    return bits.view(np.float32)


def float_to_bf16(x):
    """Encode a floating array as bfloat16 bit patterns with round-to-nearest-even.

    Finite values too large for bfloat16 round to +-inf; subnormals round like
    any other value; NaN stays NaN (sign and high payload bits kept, the quiet
    bit set, so a NaN whose payload sat in the low bits cannot become inf).
    float64 input is rounded once, correctly (no double rounding via float32).

    Parameters
    ----------
    x : array_like of float16, float32 or float64

    Returns
    -------
    bits : ndarray of uint16, same shape

    Examples
    --------
    >>> float_to_bf16(np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 3.4e38], dtype=np.float32))
    array([16256, 16256, 16258, 32640], dtype=uint16)
    """
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"bfloat16 encoding needs a floating array, got dtype {x.dtype}")
    if x.dtype.itemsize > 4:
        x = _float64_to_float32_round_to_odd(x.astype(np.float64, copy=False))
    with np.errstate(invalid="ignore"):  # signalling NaNs
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    lsb = (bits >> 16) & np.uint32(1)
    with np.errstate(over="ignore"):  # NaN patterns may wrap; they are replaced below
        rounded = ((bits + np.uint32(0x7FFF) + lsb) >> 16).astype(np.uint16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded[nan] = ((bits[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return rounded

"""Data checks shared by every public entry point (the floor of the library).

Each check either returns a clean array or raises a ``TypeError``/``ValueError``
whose message names the argument and says what to do. Public functions call
these once, at their boundary; private functions trust their input. The rules
of the other parameters (ranks, budgets, solver options, ...) are declared in
:mod:`blocklowrank._params`.
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["validate_matrix", "refuse_meaningless", "pow2_scale", "OptionError", "spell_options"]

_OPTION = re.compile(r"«(\w+)(?:=([^»]*))?»")


class OptionError(ValueError):
    """A problem its caller fixes by changing an option, told in the caller's own spelling.

    The message is a template in which ``«name»`` or ``«name=value»`` stands
    for an option: ``str(exc)`` spells them as Python keywords
    (``peft_type='LORA'``, ``n_blocks``), :meth:`spelled` ``("cli")`` as the
    command line's flags (``--peft-type LORA``, ``--n-blocks``). A value of
    ``True`` is a switch (``cap_rank=True``, ``--cap-rank``); a value with
    spaces is a list (``modules_to_save=['a', 'b']``, ``--modules-to-save a b``).

    Examples
    --------
    >>> exc = OptionError("layer 'fc' is 10x10: use «peft_type=LORA» or another «n_blocks»")
    >>> str(exc)
    "layer 'fc' is 10x10: use peft_type='LORA' or another n_blocks"
    >>> exc.spelled("cli")
    "layer 'fc' is 10x10: use --peft-type LORA or another --n-blocks"
    """

    def __init__(self, template):
        self.template = template
        super().__init__(self.spelled("python"))

    def spelled(self, style="python"):
        """The message with each option in ``style``: "python" (keywords) or "cli" (flags)."""
        if style not in ("python", "cli"):
            raise ValueError(f"style must be 'python' or 'cli', got {style!r}")
        return _OPTION.sub(lambda m: _spell(m.group(1), m.group(2), style), self.template)

    def with_context(self, prefix):
        """The same error with ``prefix`` (e.g. the layer it concerns) in front of the message."""
        return OptionError(prefix + self.template)


def _spell(name, value, style):
    if style == "cli":
        flag = "--" + name.replace("_", "-")
        return flag if value in (None, "True") else f"{flag} {value}"
    if value is None:
        return name
    if " " in value.strip():  # several values: a list in Python
        return f"{name}={value.split()!r}"
    literal = value in ("True", "False", "None") or re.fullmatch(r"-?\d+(\.\d*)?", value)
    return f"{name}={value if literal else repr(value)}"


def spell_options(template, style="python"):
    """``template`` with each ``«name»`` / ``«name=value»`` spelled for ``style`` (see :class:`OptionError`)."""
    return OptionError(template).spelled(style)


def refuse_meaningless(X, name="X"):
    """Refuse inputs whose meaning NumPy would silently drop, with what to do instead.

    Sparse matrices (densify), masked arrays (their mask cannot be honoured),
    and arrays of strings, records, dates or times (not numbers).
    """
    if hasattr(X, "tocsr") or type(X).__module__.startswith("scipy.sparse"):
        raise TypeError(
            f"{name} is a sparse matrix; blocklowrank works on dense arrays. "
            "Convert it with X.toarray() (dense blocks are needed for the SVD)."
        )
    if isinstance(X, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a masked array; its mask cannot be honoured by a low-rank fit. "
            "Fill the masked entries explicitly (X.filled(value)) or impute them first."
        )
    dt = getattr(X, "dtype", None)
    if dt is None and isinstance(X, (list, tuple)):
        dt = np.asarray(X).dtype
    if not isinstance(dt, np.dtype):
        return
    if dt.names is not None:
        raise TypeError(f"{name} holds records (structured dtype {dt}), not numbers; pass one numeric field")
    if dt.kind in "USV":
        raise TypeError(
            f"{name} holds strings (dtype {dt}), not numbers; convert it to a numeric array "
            "explicitly (e.g. X.astype(float)) if the strings are numbers"
        )
    if dt.kind in "Mm":
        raise TypeError(f"{name} holds dates or times (dtype {dt}), not numbers; convert them explicitly")
    if dt.kind == "O":
        flat = np.asarray(X, dtype=object).ravel()
        if any(isinstance(v, (str, bytes)) for v in flat[:1000]):
            raise TypeError(f"{name} holds strings inside an object array, not numbers; convert it explicitly")


def validate_matrix(X, *, name="X", min_ndim=2, max_ndim=None):
    """``X`` as a finite float array: float32 kept, float16 to float32, other numbers to float64.

    Raises a ValueError/TypeError that names the problem for sparse, masked,
    complex, non-numeric, empty, NaN/inf or wrongly-shaped input. The caller's
    array is never modified (converted arrays are new; others are used read-only).
    """
    refuse_meaningless(X, name)
    try:
        arr = np.asarray(X)
    except Exception as exc:
        raise TypeError(f"{name} could not be converted to an array: {exc}") from None
    refuse_meaningless(arr, name)
    if arr.dtype == object:
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}") from None
    if np.iscomplexobj(arr):
        raise TypeError(f"{name} is complex; only real matrices are supported")
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    elif arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    if arr.ndim < min_ndim or (max_ndim is not None and arr.ndim > max_ndim):
        want = f"{min_ndim}-D" if max_ndim == min_ndim else f"at least {min_ndim}-D"
        raise ValueError(f"{name} must be {want} (a matrix or a stack of matrices), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        bad = "NaN" if np.isnan(arr).any() else "inf"
        raise ValueError(f"{name} contains {bad}; remove or impute non-finite values first")
    return arr


def pow2_scale(X):
    """Per-matrix power-of-two factors that keep sums of squares in range, or None.

    Energies (sums of squares) of entries near the top of the float range
    overflow, and of tiny entries underflow, while the relative error they
    feed is scale-free. Multiplying a matrix by a power of two is exact, so a
    fit on ``ldexp(X, k)`` with its left factors brought back by
    ``ldexp(B, -k)`` is the fit of ``X``. Returns the exponents ``k`` (int32)
    of shape ``X.shape[:-2] + (1, 1)``, or None when every matrix is already
    safe (the common case: no copy is made).
    """
    fi = np.finfo(X.dtype)
    # max |x| without a full-size np.abs(X) temporary (the input is finite)
    amax = np.maximum(np.max(X, axis=(-2, -1), keepdims=True), -np.min(X, axis=(-2, -1), keepdims=True))
    # sums of m*n squares must stay below max and the smallest ones above tiny
    hi = np.sqrt(fi.max) / (4 * np.sqrt(X.shape[-1] * X.shape[-2]))
    lo = np.sqrt(fi.tiny) * 2.0**20
    bad = (amax > hi) | ((amax < lo) & (amax > 0))
    if not np.any(bad):
        return None
    _, e = np.frexp(np.where(amax > 0, amax, 1.0))
    return np.where(bad, -e, 0).astype(np.int32)

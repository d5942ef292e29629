"""A streaming, mergeable float64 accumulator of second moments ``Σ x xᵀ``."""

from __future__ import annotations

import numbers

import numpy as np
from scipy.linalg.blas import dsyrk

from .._params import Int, check
from .._validation import refuse_meaningless

__all__ = ["GramAccumulator"]


def _as_rows(X, name):
    """``X`` as a real numeric array of shape (..., n) with at least 2 dimensions (never copied here)."""
    refuse_meaningless(X, name)
    X = np.asarray(X)
    if X.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {X.dtype}")
    if X.ndim not in (2, 3):
        raise ValueError(f"{name} must be (tokens, n) or (batch, seq, n), got shape {X.shape}")
    return X


def _as_mask(mask, shape):
    """``mask`` as a flat bool array over the rows of a block whose leading shape is ``shape``."""
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask must have shape {shape} (the leading dimensions of X), got {mask.shape}")
    if mask.dtype != bool:
        if mask.dtype.kind not in "iu" or (mask.size and not np.isin(mask, (0, 1)).all()):
            raise ValueError(f"mask must be boolean or hold only 0 and 1 (an attention mask), got dtype {mask.dtype}")
        mask = mask.astype(bool)
    return mask.reshape(-1)


class GramAccumulator:
    """Streaming sum of second moments ``S = Σ_t x_t x_tᵀ`` over rows, in float64, with its count.

    Feed it blocks of rows (a layer's inputs, or the gradients at its
    output); ``gram`` is the uncentred second moment ``S / count``.
    Partial accumulators over disjoint shards of the rows merge exactly
    (``a + b``, ``a.merge(b)``, ``sum(parts)``), so joblib or Dask workers can
    each take a shard and the results add up.

    Parameters
    ----------
    n_features : int, optional
        Length ``n`` of a row; taken from the first block when omitted.
    chunk_bytes : int, default=16 MiB
        Rows are upcast to float64 in chunks of about this many bytes: memory
        is the ``n × n`` sum plus one chunk, whatever the block's size.

    Attributes
    ----------
    n_features : int or None
    count : int
        Rows accumulated.

    Notes
    -----
    Exact in float64 whatever the input's type: every chunk of rows is
    converted to float64 (exactly, for float16/float32 and bfloat16 decoded to
    float32) before BLAS ``dsyrk`` adds its ``chunkᵀ chunk`` to the upper
    triangle of the sum; the lower triangle is mirrored from it on reading, so
    ``sum`` and ``gram`` are exactly symmetric. Only the float64 additions
    round (relative error of order ``count · 2⁻⁵³`` at worst).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.arange(12.0).reshape(4, 3)
    >>> acc = GramAccumulator(3).update(X[:1]) + GramAccumulator(3).update(X[1:])
    >>> acc.count, np.allclose(acc.gram, X.T @ X / 4)
    (4, True)
    >>> mask = np.array([True, False, True, True])
    >>> np.allclose(GramAccumulator().update(X, mask=mask).gram, X[mask].T @ X[mask] / 3)
    True
    """

    def __init__(self, n_features=None, *, chunk_bytes=1 << 24):
        self.n_features = None if n_features is None else check(n_features, "n_features", [Int(1)])
        self.chunk_bytes = check(chunk_bytes, "chunk_bytes", [Int(1)])
        self.count = 0
        self._upper = None if n_features is None else np.zeros((self.n_features, self.n_features), order="F")

    def _start(self, n):
        if self.n_features is None:
            self.n_features = n
            self._upper = np.zeros((n, n), order="F")
        elif n != self.n_features:
            raise ValueError(f"rows have {n} features but this accumulator holds {self.n_features}")

    def update(self, X, mask=None):
        """Add the rows of ``X`` (those ``mask`` keeps) to the sum; return ``self``.

        Parameters
        ----------
        X : array_like of shape (tokens, n) or (batch, seq, n)
            Real numbers of any precision; integers must be exact in float64.
        mask : array_like of shape X.shape[:-1], optional
            True (or 1) for the rows to count, e.g. an attention mask; other
            rows are skipped. Without it every row counts.

        Returns
        -------
        self : GramAccumulator
        """
        X = _as_rows(X, "X")
        rows = X.reshape(-1, X.shape[-1])
        keep = None if mask is None else _as_mask(mask, X.shape[:-1])
        self._start(rows.shape[1])
        step = max(1, self.chunk_bytes // (8 * rows.shape[1]))
        for start in range(0, rows.shape[0], step):
            chunk = rows[start : start + step]
            if keep is not None:
                chunk = chunk[keep[start : start + step]]
            if not chunk.shape[0]:
                continue
            chunk = np.ascontiguousarray(chunk, dtype=np.float64)  # exact upcast of this chunk only
            if not np.isfinite(chunk).all():
                raise ValueError("X holds NaN or infinite values; its second moment would be meaningless")
            dsyrk(1.0, chunk.T, beta=1.0, c=self._upper, trans=0, overwrite_c=1)  # upper += chunkᵀ chunk
            self.count += chunk.shape[0]
        return self

    @property
    def sum(self):
        """The symmetric float64 sum ``Σ x xᵀ`` (a new array)."""
        if self._upper is None:
            raise ValueError("the accumulator has seen no rows yet, so its size is unknown")
        total = np.triu(self._upper)
        total += np.triu(total, 1).T
        return total

    @property
    def gram(self):
        """The second moment ``Σ x xᵀ / count`` (float64, symmetric, a new array)."""
        if not self.count:
            raise ValueError("no rows were accumulated (count 0): the second moment is undefined")
        total = self.sum
        total /= self.count
        return total

    @classmethod
    def from_gram(cls, gram, count):
        """An accumulator holding ``count`` rows whose second moment is ``gram`` (sum = gram · count)."""
        gram = np.asarray(gram, dtype=np.float64)
        if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or not gram.shape[0]:
            raise ValueError(f"gram must be a non-empty square matrix, got shape {gram.shape}")
        acc = cls(gram.shape[0])
        acc.count = check(count, "count", [Int(0)])
        acc._upper[...] = np.triu(gram) * acc.count
        return acc

    def merge(self, other):
        """Add the rows of ``other`` (an accumulator over other rows) to ``self``; return ``self``."""
        if not isinstance(other, GramAccumulator):
            raise TypeError(f"can only merge a GramAccumulator, got {type(other).__name__}")
        if other.n_features is None:
            return self
        self._start(other.n_features)
        self._upper += np.triu(other._upper)
        self.count += other.count
        return self

    def copy(self):
        """An independent copy."""
        new = GramAccumulator(self.n_features, chunk_bytes=self.chunk_bytes)
        if self._upper is not None:
            new._upper[...] = self._upper
        new.count = self.count
        return new

    def __iadd__(self, other):
        return self.merge(other)

    def __add__(self, other):
        if isinstance(other, numbers.Number) and other == 0:  # sum(parts) starts from 0
            return self.copy()
        if not isinstance(other, GramAccumulator):
            return NotImplemented
        return self.copy().merge(other)

    __radd__ = __add__

    def __repr__(self):
        return f"GramAccumulator(n_features={self.n_features}, count={self.count})"

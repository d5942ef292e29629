"""Gram matrices of a data metric: validation once, one factor, products and sub-Grams.

A :class:`GramFactor` is built once per input site (every layer that reads the
same input shares it) and gives the fits what they need without n x n
temporaries per layer: a factor ``F`` with ``F F^T = G_delta``, products
``X @ F``, ``X @ F^T``, ``X @ G``, solves ``X @ F^{-T}`` and ``X @ F^{-1}``, and
the sub-Grams of column blocks with their own factors. :class:`IdentityGram`
is the absent side (``G = I``) with the same interface, at no cost.

Every product takes a *row stack* ``X`` of shape ``(rows, size)``; left
products follow by transposition (``F^T Y = (Y^T F)^T``).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from scipy.linalg import blas, lapack

from .._params import Float, check
from .._validation import refuse_meaningless, validate_matrix

__all__ = ["GramFactor", "IdentityGram", "as_gram", "GRAM_DAMPING"]

#: The damping ``delta`` of every fit in a data metric unless told otherwise: the fits use
#: ``G + delta * mean(diag G) * I`` (and the same rule on ``H``). GPTQ's 1 %, confirmed on
#: held-out data by :mod:`blocklowrank.experiments.damping` (the README's *Choosing
#: gram_damping*: the least summed held-out output error of 0 ... 1); change it here only
#: (every default of ``gram_damping`` and of :class:`GramFactor` reads this constant).
GRAM_DAMPING = 1e-2

#: Allowance for rounding in the symmetry check: ``max |G - G^T| <= sqrt(eps) max |G|``
#: (eps of the dtype the Gram was given in: 1.5e-8 for float64, 3.5e-4 for float32).
#: Negative eigenvalues are rounding when ``lambda_min >= -_PSD_ROUNDING * eps * trace(G)``:
#: an entry of an accumulated ``X^T X / n`` is off by about ``eps`` times the sum of
#: ``|x_i| |x_j|``, and the spectral norm of that error is below its Frobenius norm,
#: below ``eps * trace`` times the growth of the summation (allowed: 32).
_PSD_ROUNDING = 32


def _rcond(size, dtype):
    """Relative cutoff below which an eigenvalue of a Gram is treated as zero when it must be
    inverted: ``max(size, 16) * eps`` (NumPy's ``matrix_rank`` rule), eps of the given dtype."""
    return max(int(size), 16) * float(np.finfo(dtype).eps)


class GramFactor:
    """A validated PSD Gram matrix (second moment of a layer's inputs, or an output weight) and its factor.

    Build one per input site and pass it as ``input_gram`` to every layer
    reading that input (q/k/v, gate/up): the validation and the factorisation
    are paid once. An array passed as ``input_gram``/``output_gram`` is turned
    into one at each fit.

    Parameters
    ----------
    gram : array-like of shape (size, size)
        Real, dense, finite, symmetric within rounding and positive
        semi-definite (negative eigenvalues only within rounding): the
        uncentred second moment ``X^T X / n_samples`` of a layer's inputs, or
        an output-side weight. float16/32/64; integers, booleans, complex,
        sparse and masked arrays are refused. Not modified.
    size : int, optional
        Expected side (the layer's ``n_in`` for ``input_gram``).
    damping : float, optional
        ``delta >= 0`` (default :data:`blocklowrank.GRAM_DAMPING`, 0.01, measured):
        the fits use ``G_delta = G + delta * mean(diag(G)) * I``
        (GPTQ's rule). Their objective is then the data objective plus
        ``delta * mean(diag(G))`` times the Frobenius one, so directions the
        calibration never saw (dead inputs, a handful of samples) fall back
        to the plain fit instead of being left to rounding; ``delta = 0`` keeps
        the data objective exactly (a positive definite ``G`` needs no
        damping; a singular one is handled in its range, see Notes).
    name : str, default="input_gram"
        The argument's name in error messages (``"output_gram"`` for ``H``).
    psd_tol : float, optional
        Negative eigenvalues down to ``-psd_tol * trace(G)`` are rounding
        (default ``32 eps`` of the dtype ``gram`` is given in). Statistics
        stored in a lower precision than they are given in (float32 files read
        as float64) carry that precision's rounding: pass it (e.g. the tolerance
        :mod:`blocklowrank.calibration` checked them with). Given, it is also
        the relative cutoff ``rcond`` below which an eigenvalue counts as zero
        where ``G`` must be inverted.
    psd_checked : bool, default=False
        The caller has already checked ``G >= -psd_tol * trace(G)`` (as
        :func:`blocklowrank.calibration.check_statistics` does): with damping,
        the factorisation that checks it is skipped (one Cholesky of ``n x n``
        less; without damping the factor itself is the check).
    copy : bool, default=True
        False: a writeable C- or Fortran-ordered float64 ``gram`` is factored
        in its own memory and overwritten, also when it is refused
        (scikit-learn's ``copy``): building the factor then holds no ``n x n``
        array besides ``gram``. Any other ``gram`` is copied as with True.

    Attributes
    ----------
    size : int
    damping : float
    shift : float
        ``delta * mean(diag(G))`` in the normalised units (see ``log2_scale``).
    log2_scale : int
        ``G`` is stored as ``G / 2**log2_scale`` (a power of two near its
        mean diagonal, an exact rescaling): the fits do not depend on the
        scale of ``G``, and energies are unscaled by ``ldexp``.
    kind : {"cholesky", "eigen"}
        ``F`` is the lower Cholesky factor of ``G_delta`` (n x n), or, when
        that is singular to working precision (``delta = 0`` and ``G``
        singular), ``Q_+ Lambda_+^{1/2}`` over the eigenvalues above
        ``rcond * lambda_max`` (n x p).
    rank : int
        Columns of ``F``.
    rcond : float
        ``max(size, 16) * eps`` of the given dtype: the documented cutoff of
        the pseudo-inverse (solves act in the range of ``G_delta``).
    nbytes : int
        Memory held: the factor (float64), a float32 copy once float32
        products were asked for, and the factors of sub-Grams used by block fits.

    Notes
    -----
    Only the factor is kept (float64; plus a float32 copy for float32 layers):
    every product with ``G_delta`` goes through it (``X G = (X F) F^T``, the
    same multiply-adds as with ``G``), and so do the rows and diagonal blocks
    of ``G_delta`` that block fits need. At ``n = 11008`` that is 0.97 GB
    (1.45 GB with the float32 copy) instead of twice that with ``G`` kept.
    Building it holds one ``n x n`` float64 array besides ``gram`` (every
    factorisation runs in place), none with ``copy=False``.

    Validation costs one Cholesky factorisation of ``G + 32 eps tr(G) I`` (the
    PSD check, which the damping would otherwise hide) when ``delta > 0``, plus
    the factorisation of ``G_delta``; with ``delta = 0`` the factorisation is
    the check. An eigendecomposition runs only when ``G_delta`` is singular
    (``delta = 0``). A singular ``G`` with ``delta = 0`` is exact for the
    global fit (no inverse is needed there); block fits solve in the range of
    each sub-Gram, so ``M`` has no component on directions the calibration
    never saw (never NaN or inf).

    Examples
    --------
    >>> import numpy as np
    >>> from blocklowrank import GramFactor
    >>> X = np.random.default_rng(0).standard_normal((50, 6))
    >>> gf = GramFactor(X.T @ X / 50, 6, damping=0.0)
    >>> gf.kind, gf.rank
    ('cholesky', 6)
    >>> F = gf.rmul_factor(np.eye(6))
    >>> bool(np.allclose(np.ldexp(F @ F.T, gf.log2_scale), X.T @ X / 50))
    True
    """

    is_identity = False

    def __init__(self, gram, size=None, *, damping=None, name="input_gram", psd_tol=None, psd_checked=False, copy=True):
        self.name = name
        copy = check(copy, "copy", ["boolean"], caller="GramFactor")
        G, in_dtype = _check_gram(gram, size, name, copy=copy)
        self.damping = GRAM_DAMPING if damping is None else check(damping, "gram_damping", caller="GramFactor")
        self.size = G.shape[0]
        self.rcond = _rcond(self.size, in_dtype)
        trace = float(np.trace(G))
        if not trace > 0:
            raise ValueError(
                f"{name} is zero (its diagonal sums to {trace:g}): no calibration signal; "
                "check that the statistics were accumulated"
            )
        self.log2_scale = int(np.round(np.log2(trace / self.size)))
        np.ldexp(G, -self.log2_scale, out=G)  # exact (G is our own copy, or given to us: copy=False)
        self._trace = float(np.trace(G))
        self._shape_info(G)
        if psd_tol is None:
            psd_tol = _PSD_ROUNDING * float(np.finfo(in_dtype).eps)
        else:  # the statistics' own rounding: also what counts as zero when G must be inverted
            psd_tol = check(psd_tol, "psd_tol", [Float(0, 1, closed="left")], caller="GramFactor")
            self.rcond = max(self.rcond, psd_tol)
        allow = psd_tol * self._trace
        self.shift = self.damping * self._trace / self.size
        # Every factorisation runs in G's own memory (no n x n copy): LAPACK overwrites the lower
        # triangle only, and G is rebuilt from the upper one and the diagonal where needed.
        if self.shift > 0 and not psd_checked:  # the PSD check needs its own factorisation: damping hides negatives
            Gf = G.T if G.flags.c_contiguous else G  # symmetric: the same matrix in Fortran order
            G[np.diag_indices_from(G)] += allow
            _, info = lapack.dpotrf(Gf, lower=1, clean=0, overwrite_a=1)
            _refill_lower(Gf, self._diag)
            if info != 0:
                self._refuse_indefinite(G, allow)
        G[np.diag_indices_from(G)] += self.shift
        # without damping the factorisation is the PSD check; a singular G_delta (no or tiny damping)
        # falls back on the eigenvectors of G (rebuilt)
        self._factor = _factorize(G, self.rcond, consume=True, restore=self._diag, shift=self.shift)
        w = self._factor.eigvals
        if w is not None and w.size and w[0] < -allow:
            self._refuse_indefinite(G, allow, w[0])
        self._factor.eigvals = None
        self._cache = {}

    # ------------------------------------------------------------------ construction helpers
    def _shape_info(self, G):
        """What the fits ask of ``G`` besides its factor, read once (O(n^2)): the column extent
        of every row's nonzeros (block-diagonality), the diagonal, ``||G||_F^2``."""
        n = self.size
        self._lo, self._hi = np.arange(n), np.arange(n)
        fro = 0.0
        for a in range(0, n, 1024):
            rows = G[a : a + 1024]
            fro += float(np.einsum("ij,ij->", rows, rows))
            nz = rows != 0
            has = nz.any(axis=1)
            lo, hi = np.argmax(nz, axis=1), n - 1 - np.argmax(nz[:, ::-1], axis=1)
            idx = np.arange(a, a + len(rows))
            self._lo[idx] = np.where(has, np.minimum(lo, idx), idx)
            self._hi[idx] = np.where(has, np.maximum(hi, idx), idx)
        self._diag = np.diagonal(G).copy()
        self._fro2 = fro

    def _refuse_indefinite(self, G, allow, lmin=None):
        if lmin is None:
            lmin = float(scipy.linalg.eigh(G, eigvals_only=True, subset_by_index=[0, 0], check_finite=False)[0])
        s = 2.0**self.log2_scale
        raise ValueError(
            f"{self.name} is not positive semi-definite: its smallest eigenvalue is {lmin * s:.4g}, beyond "
            f"rounding (-{allow * s:.3g}); a second moment X^T X / n has no negative eigenvalue"
        )

    @classmethod
    def _trusted(cls, gram, parent, shift=None):
        """A GramFactor of a damped Gram taken from a validated one (a sub-Gram, a permutation,
        another damping): same units; ``gram`` is consumed."""
        self = cls.__new__(cls)
        self.name, self.size, self.rcond = parent.name, gram.shape[0], parent.rcond
        self.damping, self.shift, self.log2_scale = parent.damping, parent.shift, parent.log2_scale
        if shift is not None:
            self.shift = shift
        self._shape_info(gram)
        self._diag -= self.shift  # _shape_info read the damped diagonal
        self._fro2 = float(np.sum(self._diag**2)) + (self._fro2 - float(np.sum((self._diag + self.shift) ** 2)))
        self._trace = float(np.sum(self._diag))
        self._factor = _factorize(gram, self.rcond, consume=False)
        self._factor.eigvals = None
        self._cache = {}
        return self

    # ------------------------------------------------------------------ the factor
    @property
    def kind(self):
        return "cholesky" if self._factor.L is not None else "eigen"

    @property
    def rank(self):
        f = self._factor
        return self.size if f.L is not None else f.Q.shape[1]

    @property
    def is_scalar(self):
        """Whether ``G`` is a multiple of the identity (then a fit in it is the plain fit)."""
        return bool(np.all(self._lo == self._hi) and np.all(self._diag == self._diag[0]))

    def scalar(self):
        """``a`` when ``G_delta = a I`` (caller's units; see :attr:`is_scalar`), else None."""
        return float(np.ldexp(self._diag[0] + self.shift, self.log2_scale)) if self.is_scalar else None

    @property
    def nbytes(self):
        f, held = self._factor, 0
        for a in (f.L, f.Q, f.sqrt_w):
            held += 0 if a is None else a.nbytes
        for v in self._cache.values():
            held += (
                v.nbytes if isinstance(v, GramFactor) else sum(a.nbytes for a in (v.L, v.Q, v.sqrt_w) if a is not None)
            )
        return held

    def _arrays(self, dtype):
        """The factor's arrays in ``dtype`` (float32 copies cached for float32 products)."""
        dtype = np.dtype(dtype)
        f = self._factor
        if dtype == np.float64:
            return f
        if dtype not in self._cache:
            self._cache[dtype] = _Factor(
                *(None if a is None else np.asarray(a, dtype=dtype, order="F") for a in (f.L, f.Q, f.sqrt_w)), None
            )
        return self._cache[dtype]

    def _tri(self, X, trans, solve):
        """``X @ op(L)`` or ``X @ op(L)^{-1}`` for a row stack X through BLAS trmm/trsm (no copy of L)."""
        X = _rows(X)
        f = self._arrays(X.dtype)
        fn = {(False, "f"): blas.strmm, (False, "d"): blas.dtrmm, (True, "f"): blas.strsm, (True, "d"): blas.dtrsm}
        # row stack X (r, n) is X^T (n, r) in Fortran order; Y = X op(L) <=> Y^T = op(L)^T X^T
        out = fn[(solve, X.dtype.char)](1.0, f.L, X.T, side=0, lower=1, trans_a=trans)
        return out.T

    def rmul_factor(self, X):
        """``X @ F``: (rows, size) -> (rows, rank)."""
        if self._factor.L is not None:
            return self._tri(X, 1, False)  # X L: Y^T = L^T X^T
        X = _rows(X)
        f = self._arrays(X.dtype)
        return (X @ f.Q) * f.sqrt_w

    def rmul_factor_t(self, X):
        """``X @ F^T``: (rows, rank) -> (rows, size)."""
        if self._factor.L is not None:
            return self._tri(X, 0, False)
        X = _rows(X)
        f = self._arrays(X.dtype)
        return (X * f.sqrt_w) @ f.Q.T

    def rsolve_factor_t(self, X):
        """``X @ F^{+T}`` (``X F^{-T}``; in the range of ``G_delta`` when singular): (rows, size) -> (rows, rank)."""
        if self._factor.L is not None:
            return self._tri(X, 0, True)
        X = _rows(X)
        f = self._arrays(X.dtype)
        return (X @ f.Q) / f.sqrt_w

    def rsolve_factor(self, X):
        """``X @ F^{+}`` (``X F^{-1}``): (rows, rank) -> (rows, size)."""
        if self._factor.L is not None:
            return self._tri(X, 1, True)
        X = _rows(X)
        f = self._arrays(X.dtype)
        return (X / f.sqrt_w) @ f.Q.T

    def rmul(self, X, *, damped=True):
        """``X @ G_delta`` (or ``X @ G`` with ``damped=False``), normalised units, float64:
        ``(X F) F^T`` through the factor (the multiply-adds of one product with ``G``)."""
        X = np.asarray(X, dtype=np.float64)
        out = self.rmul_factor_t(self.rmul_factor(X))
        if not damped and self.shift:
            out -= self.shift * X
        return out

    def _factor_rows(self, start, stop):
        """``F[start:stop]`` and the number of its leading columns that can be nonzero."""
        f = self._factor
        if f.L is not None:
            return f.L[start:stop, :stop], stop
        return f.Q[start:stop] * f.sqrt_w, f.Q.shape[1]

    def rmul_rows(self, X, start, stop):
        """``X @ G_delta[start:stop, :]`` for ``X`` of shape (rows, stop - start): float64 (rows, size)."""
        Fr, c = self._factor_rows(start, stop)
        Y = np.asarray(X, np.float64) @ Fr  # (rows, c)
        f = self._factor
        return Y @ (f.L[:, :c].T if f.L is not None else (f.Q * f.sqrt_w).T)

    # ------------------------------------------------------------------ blocks and bounds
    def sub(self, start, stop):
        """The sub-Gram ``G_delta[start:stop, start:stop]`` with its own factor (cached)."""
        key = ("sub", int(start), int(stop))
        if key not in self._cache:
            Fr, _ = self._factor_rows(start, stop)
            self._cache[key] = GramFactor._trusted(Fr @ Fr.T, self)
        return self._cache[key]

    def _dense(self):
        """``G_delta`` formed from the factor (``n^3`` multiply-adds): for the rare operations that
        need all of it (a permutation, another damping)."""
        f = self._factor
        F = f.L if f.L is not None else f.Q * f.sqrt_w
        return F @ F.T

    def permuted(self, perm):
        """The Gram of the permuted coordinates ``G[perm][:, perm]``: ``G_delta`` is formed from the
        factor and factorised again (``n^3 + n^3 / 3`` multiply-adds)."""
        perm = np.asarray(perm)
        return GramFactor._trusted(self._dense()[np.ix_(perm, perm)], self)

    def with_damping(self, damping):
        """The same Gram with another ``gram_damping`` (formed from the factor and factorised
        again, ``n^3 + n^3 / 3`` multiply-adds; no new PSD check is needed)."""
        damping = check(damping, "gram_damping", caller="GramFactor")
        shift = damping * self._trace / self.size
        G = self._dense()
        G[np.diag_indices_from(G)] += shift - self.shift
        out = GramFactor._trusted(G, self, shift)
        out.damping = damping
        return out

    def is_block_diagonal(self, edges):
        """Whether every entry outside the diagonal blocks cut at ``edges`` is exactly zero."""
        for a, b in zip(edges[:-1], edges[1:]):
            if b > a and (self._lo[a:b].min() < a or self._hi[a:b].max() >= b):
                return False
        return True

    def lambda_max(self, n_iter=30, seed=0):
        """``(estimate, upper)`` of the largest eigenvalue of ``G_delta`` (normalised units).

        ``estimate`` is a block power iteration's Rayleigh quotient (a lower
        bound, usually tight); ``upper = min(trace, ||G||_F)`` is a guaranteed
        upper bound for a PSD matrix. For a diagonal ``G`` both are exact.
        """
        if np.all(self._lo == self._hi):
            v = float(self._diag.max()) + self.shift
            return v, v
        n, s = self.size, self.shift
        upper = min(self._trace + n * s, float(np.sqrt(self._fro2 + 2 * s * self._trace + n * s * s)))
        V = np.random.default_rng(seed).standard_normal((n, min(4, n)))
        for _ in range(n_iter):
            V, _ = np.linalg.qr(self.rmul(V.T).T)
        est = float(np.linalg.eigvalsh(V.T @ self.rmul(V.T).T)[-1])
        return min(est, upper), upper


class IdentityGram:
    """The absent side of a metric (``G = I``): the interface of :class:`GramFactor` at no cost."""

    is_identity = True
    is_scalar = True
    kind = "identity"
    shift = 0.0
    log2_scale = 0
    damping = 0.0
    nbytes = 0

    def __init__(self, size, name="output_gram"):
        self.size = self.rank = int(size)
        self.name = name

    def rmul_factor(self, X):
        return np.array(_rows(X))  # a new array, like GramFactor's products

    rmul_factor_t = rsolve_factor_t = rsolve_factor = rmul_factor

    def rmul(self, X, *, damped=True):
        return np.array(X, dtype=np.float64)  # a new array, like GramFactor.rmul

    def scalar(self):
        return 1.0

    def rmul_rows(self, X, start, stop):
        out = np.zeros((np.shape(X)[0], self.size))
        out[:, start:stop] = X
        return out

    def sub(self, start, stop):
        return IdentityGram(stop - start, self.name)

    def permuted(self, perm):
        return self

    def with_damping(self, damping):
        return self

    def is_block_diagonal(self, edges):
        return True

    def lambda_max(self, n_iter=30, seed=0):
        return 1.0, 1.0


def as_gram(gram, size, *, damping=None, name="input_gram"):
    """A :class:`GramFactor` (or :class:`IdentityGram` for None) of side ``size``.

    ``damping`` None: :data:`GRAM_DAMPING` for an array, the damping a
    GramFactor was built with for a GramFactor (built earlier, shared by the
    layers of one input site, reused as is after a size check). A GramFactor
    given with another ``damping`` is re-damped
    (:meth:`GramFactor.with_damping`: a new factorisation).
    """
    if gram is None:
        return IdentityGram(size, name)
    if isinstance(gram, (GramFactor, IdentityGram)):
        if gram.size != size:
            raise ValueError(f"{name} is a Gram of side {gram.size}, but the layer needs side {size}")
        if damping is not None and not gram.is_identity and gram.damping != damping:
            return gram.with_damping(damping)
        return gram
    return GramFactor(gram, size, damping=damping, name=name)


# ---------------------------------------------------------------------------- internals
class _Factor:
    """``L`` (lower Cholesky, Fortran order) or ``Q``, ``sqrt_w`` (eigen-factor); ``eigvals`` when
    an eigendecomposition was run (ascending, for the PSD check)."""

    __slots__ = ("L", "Q", "sqrt_w", "eigvals")

    def __init__(self, L, Q, sqrt_w, eigvals):
        self.L, self.Q, self.sqrt_w, self.eigvals = L, Q, sqrt_w, eigvals


def _factorize(A, rcond, *, consume, restore=None, shift=0.0):
    """Cholesky of a symmetric PSD ``A`` when every pivot is above ``rcond * max(diag)``,
    else the eigen-factor over eigenvalues above ``rcond * lambda_max``.

    ``consume``: factorise ``A`` in place (no copy); the eigen-factor then
    comes from ``A`` rebuilt (its strict upper triangle is left intact) with
    the diagonal ``restore``, whose eigenvalues plus ``shift`` are ``A``'s
    (the undamped Gram of a damped ``A``).
    """
    dmax = float(np.max(np.diagonal(A)))
    Af = A.T if A.flags.c_contiguous else A  # symmetric: the same matrix in Fortran order
    L, info = lapack.dpotrf(Af, lower=1, clean=int(not consume), overwrite_a=int(consume))
    if info == 0 and float(np.min(np.diagonal(L) ** 2)) > rcond * dmax:
        if consume:
            _clean_upper(L)
        return _Factor(L, None, None, None)
    del L
    if consume:
        _refill_lower(Af, restore)
    w, Q = scipy.linalg.eigh(A, check_finite=False)
    w = w + shift
    keep = w > rcond * max(float(w[-1]), 0.0)
    return _Factor(None, np.asfortranarray(Q[:, keep]), np.sqrt(w[keep]), w)


def _refill_lower(A, diag, tile=512):
    """A symmetric ``A`` again after a factorisation overwrote its lower triangle: the strict lower
    triangle from the strict upper one (left intact), the diagonal from ``diag``; by tiles, in place."""
    n = A.shape[0]
    for a in range(0, n, tile):
        b = min(a + tile, n)
        A[b:, a:b] = A[a:b, b:].T
        block, low = A[a:b, a:b], np.tril_indices(b - a, -1)
        block[low] = block.T[low]
    A[np.diag_indices(n)] = diag


def _clean_upper(L, tile=512):
    """Zero the strict upper triangle of ``L`` in place (what LAPACK's ``clean`` does), by tiles."""
    n = L.shape[0]
    for a in range(0, n, tile):
        b = min(a + tile, n)
        L[a:b, b:] = 0
        L[a:b, a:b][np.triu_indices(b - a, 1)] = 0


def _rows(X):
    """A C-contiguous float row stack (float32 kept, anything else float64)."""
    X = np.asarray(X)
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    return np.ascontiguousarray(X)


def _check_gram(gram, size, name, copy=True):
    """``gram`` as a symmetric float64 array (a copy; ``gram`` itself when ``copy`` is False and it
    is a writeable contiguous float64 array) and the dtype it came in, or one clear error."""
    refuse_meaningless(gram, name)
    dt = getattr(gram, "dtype", None)
    if isinstance(dt, np.dtype) and dt.kind in "biu":
        raise TypeError(
            f"{name} has dtype {dt}; a second moment is a float matrix: pass it as "
            "float64 (e.g. G.astype(np.float64)) if these numbers are meant"
        )
    arr = validate_matrix(gram, name=name, max_ndim=2)  # sparse, masked, complex, NaN/inf, ... refused
    want = "(size, size)" if size is None else f"({size}, {size})"
    if arr.shape[0] != arr.shape[1] or (size is not None and arr.shape[0] != size):
        raise ValueError(f"{name} must be a square matrix of shape {want} (one row per feature), got {arr.shape}")
    own = (
        not copy
        and arr.dtype == np.float64
        and arr.flags.writeable
        and (arr.flags.c_contiguous or arr.flags.f_contiguous)
    )
    G = arr if own else np.array(arr, dtype=np.float64)
    _symmetrize_checked(G, arr.dtype, name)
    return G, arr.dtype


def max_asymmetry(G, *, symmetrize=False, tile=128):
    """``max |G - G^T|`` of a square ``G``, by pairs of square tiles (cache-friendly; no ``n x n``
    temporary); ``symmetrize``: also ``G <- (G + G^T) / 2`` in place (exactly symmetric after)."""
    n = G.shape[0]
    worst = 0.0
    for a in range(0, n, tile):
        for c in range(a, n, tile):
            A, B = G[a : a + tile, c : c + tile], G[c : c + tile, a : a + tile]
            worst = max(worst, float(np.max(np.abs(A - B.T))))
            if symmetrize:
                S = 0.5 * (A + B.T)
                A[...] = S
                B[...] = S.T
    return worst


def _symmetrize_checked(G, dtype, name):
    """``G <- (G + G^T) / 2`` in place after checking ``max |G - G^T| <= sqrt(eps) max |G|`` (eps of
    ``dtype``): exactly symmetric."""
    tol = np.sqrt(np.finfo(dtype).eps) * max(float(np.max(G)), -float(np.min(G)))  # no n x n |G| temporary
    worst = max_asymmetry(G, symmetrize=True)
    if worst > tol:
        raise ValueError(
            f"{name} is not symmetric (max |G - G^T| = {worst:.3g}, above rounding {tol:.3g}); "
            "a second moment X^T X / n is symmetric"
        )

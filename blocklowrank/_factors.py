"""Small helpers shared by the structures that go beyond one layout + one SVD.

Dense assembly of per-block factors, a pseudo-inverse solve for the normal
equations of exact least-squares steps, and the estimator base for
structures whose codes are "per block-row linear": a row ``x`` in block-row
``i`` has codes ``z = x @ E_i`` and decodes to ``z @ D_i``.
"""

from __future__ import annotations

import numpy as np
from sklearn.utils.validation import check_is_fitted, validate_data

from .estimators import BaseBlockLowRank

__all__ = ["assemble_block_factors", "psd_solve", "LinearCodesBase", "STEP_TOL"]

#: Largest rise of the *relative* error ``||X - X_hat||_F / ||X||_F`` that a
#: fitting step may show and still count as "not increasing" (floating-point
#: rounding, i.e. ``1e-12 ||X||_F`` in the residual norm). A step that raises
#: the error by more is discarded and iteration stops
#: (``stop_reason="increase"``).
STEP_TOL = 1e-12


def assemble_block_factors(layout, factors, dtype=np.float64):
    """Dense ``m x n`` matrix with block ``(i, j)`` equal to ``B_ij @ A_ij``.

    ``factors`` is ``{(i, j): (B_ij, A_ij)}``; blocks not in it are zero.
    One matmul per block: this is for assembling a result once, not for a
    hot loop.
    """
    out = np.zeros(layout.shape, dtype=dtype)
    for (i, j), (B, A) in factors.items():
        if B.shape[-1] == 0:
            continue
        rs, cs = layout.block_slice(i, j)
        out[rs, cs] = B @ A
    return out


def psd_solve(G, rhs, rtol=1e-12):
    """Minimum-norm solution of ``G x = rhs`` for stacks of symmetric PSD ``G``.

    ``G`` is ``(..., r, r)``, ``rhs`` is ``(..., r, k)``. This is
    ``pinv(G) @ rhs`` through an eigendecomposition, with eigenvalues below
    ``rtol * max eigenvalue`` treated as zero. For the normal equations of a
    least-squares problem (``G = W W^T``, ``rhs = W y``, so ``rhs`` lies in
    the range of ``G``) this is an exact minimiser, also when ``W`` is rank
    deficient; when ``G`` is well conditioned it equals ``solve(G, rhs)``.
    No ridge is added, so the step stays an exact minimisation.
    """
    w, Q = np.linalg.eigh(G)
    wmax = np.max(w, axis=-1, keepdims=True)
    keep = w > rtol * np.where(wmax > 0, wmax, 1.0)
    inv = np.where(keep, 1.0 / np.where(keep, w, 1.0), 0.0)
    return Q @ (inv[..., :, None] * (Q.swapaxes(-1, -2) @ rhs))


class LinearCodesBase(BaseBlockLowRank):
    """Estimator base for structures with per-block-row linear codes.

    Subclasses implement ``_fit(X)`` which must set the fitted attributes,
    ``self._encoders`` (``K_rows x n x n_codes_``), ``self._decoders``
    (``K_rows x n_codes_ x n``), ``self._fit_codes`` (``m x n_codes_``, the
    codes of the fitted rows) and ``self._reconstruction`` (the dense
    approximation, equal to the fitted codes decoded), and return
    ``self._fit_codes``.

    transform(X) gives least-squares codes ``x @ E_i`` with ``E_i =
    pinv(D_i)``; the fits end with an exact least-squares step for the codes,
    so on the fitted X these equal the fitted codes (up to rounding).
    """

    def fit(self, X, y=None):
        """Fit the structure to ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        self : object
        """
        self._fit(X)
        return self

    def fit_transform(self, X, y=None):
        """Fit and return the codes of the fitted rows.

        ``reconstruct(fit_transform(X))`` is the fitted approximation.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        Z : ndarray of shape (n_samples, n_codes_)
        """
        return self._fit(X).copy()

    def _store_codes(self, encoders, decoders, codes, reconstruction, dtype):
        self._encoders = np.ascontiguousarray(encoders, dtype=dtype)
        self._decoders = np.ascontiguousarray(decoders, dtype=dtype)
        self._fit_codes = np.ascontiguousarray(codes, dtype=dtype)
        self._reconstruction = np.ascontiguousarray(reconstruction, dtype=dtype)
        self.n_codes_ = int(self._encoders.shape[-1])
        self.n_samples_fit_ = int(self._reconstruction.shape[0])

    def transform(self, X):
        """Least-squares codes of each row of ``X`` for its block-row's decoder.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            With several block-rows, ``n_samples`` must be the fitted number
            of rows (each row's block-row is fixed by its position).

        Returns
        -------
        Z : ndarray of shape (n_samples, n_codes_)
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        X = X.astype(self._encoders.dtype, copy=False)
        edges = self._row_blocks(X.shape[0], "transform")
        if edges is None:
            return X @ self._encoders[0]
        Z = np.empty((X.shape[0], self.n_codes_), dtype=self._encoders.dtype)
        for i in range(len(edges) - 1):
            Z[edges[i] : edges[i + 1]] = X[edges[i] : edges[i + 1]] @ self._encoders[i]
        return Z

    def inverse_transform(self, Z):
        """The dense rows that codes ``Z`` encode.

        Parameters
        ----------
        Z : array-like of shape (n_samples, n_codes_)

        Returns
        -------
        X_hat : ndarray of shape (n_samples, n_features_in_)
        """
        check_is_fitted(self)
        from sklearn.utils import check_array

        Z = check_array(Z, dtype=[np.float64, np.float32], input_name="Z")
        if Z.shape[1] != self.n_codes_:
            raise ValueError(f"Z has {Z.shape[1]} columns, expected n_codes_ = {self.n_codes_}")
        Z = Z.astype(self._decoders.dtype, copy=False)
        edges = self._row_blocks(Z.shape[0], "inverse_transform")
        if edges is None:
            return Z @ self._decoders[0]
        out = np.empty((Z.shape[0], self.n_features_in_), dtype=self._decoders.dtype)
        for i in range(len(edges) - 1):
            out[edges[i] : edges[i + 1]] = Z[edges[i] : edges[i + 1]] @ self._decoders[i]
        return out

    def reconstruct(self, Z=None):
        """Dense approximation: of the fitted ``X`` (no argument) or encoded by ``Z``.

        Parameters
        ----------
        Z : array-like of shape (n_samples, n_codes_), optional

        Returns
        -------
        X_hat : ndarray of shape (n_samples, n_features_in_)
        """
        check_is_fitted(self)
        if Z is None:
            return self._reconstruction.copy()
        return self.inverse_transform(Z)

"""The one scikit-learn base of every structure's estimator.

:class:`StructuredEstimator` owns validation, ``transform``,
``inverse_transform``, ``reconstruct``, ``score`` and the output feature names,
all over the fitted :class:`~blocklowrank.factors.StructuredFactors`
(``factors_``). A structure's estimator (in :mod:`blocklowrank.structures`) only
declares its parameters, their constraints and how it fits
(``_fit_structure``), in the way ``sklearn.decomposition._base._BasePCA``
serves ``PCA`` and its relatives.

Codes. A row of ``X`` in block-row ``i`` has codes ``z`` with ``z @ D_i``
its approximation, ``D_i`` the block-row's decoder
(:meth:`~blocklowrank.factors.StructuredFactors.decoders`): the global
codes (hybrid) then the codes of each active block of the block-row (their
coordinates in the block's right factor), or the shared basis' codes (BLAST).
:meth:`~StructuredEstimator.transform` returns the least-squares codes
``x @ pinv(D_i)``; every fit ends with that least-squares step (for the SVD
structures it is the projection ``x @ D_i^T``), so ``fit_transform`` and
``transform`` of the fitted X agree.

Fits in a data metric. Every estimator's ``fit`` (and ``fit_transform``)
takes ``input_gram`` and ``output_gram`` (arrays, or a
:class:`~blocklowrank.GramFactor` built once per input site): data, like
``sample_weight``, so they are fit parameters, routed by scikit-learn's
metadata routing (``est.set_fit_request(input_gram=True)`` inside a
``Pipeline`` or ``GridSearchCV`` with ``sklearn.set_config(enable_metadata_routing=True)``);
``gram_damping`` is a hyper-parameter. The fitted ``output_error_`` is the
relative output error in that metric (``error_`` when no Gram is given);
``error_`` stays the Frobenius error. The Grams are not stored.
``fit_transform`` returns the fitted codes (the metric's); ``transform`` codes
rows by Frobenius least squares for the fitted decoders and ``score`` stays
minus the relative Frobenius reconstruction error (new rows have no metric):
to choose ``gram_damping``, score held-out output errors yourself (see
:func:`blocklowrank.output_error`).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from ._params import check_params, estimator_constraints
from ._validation import refuse_meaningless

__all__ = ["StructuredEstimator", "single_fit_cv"]


def single_fit_cv(n_samples):
    """A ``cv`` for :class:`~sklearn.model_selection.GridSearchCV` that fits and scores one matrix.

    The structures approximate *one* matrix: a row's block-row is fixed by
    its position, so held-out rows have no meaning for a grid of several
    block-rows. ``GridSearchCV(est, grid, cv=single_fit_cv(len(X)))`` fits
    every candidate on all of ``X`` and scores it there (``score`` is minus the
    relative error), which is the tuning question for one matrix.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.model_selection import GridSearchCV
    >>> from blocklowrank import BlockLowRank
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> search = GridSearchCV(BlockLowRank(budget=224), {"n_blocks": [1, 2, 4]},
    ...                       cv=single_fit_cv(len(X))).fit(X)
    >>> search.best_params_
    {'n_blocks': 4}
    """
    idx = np.arange(int(n_samples))
    return [(idx, idx)]


def _set_params(est, values):
    """``__init__`` bodies: store every parameter as given (scikit-learn's rule)."""
    for name, value in values.items():
        if name not in ("self", "__class__"):
            setattr(est, name, value)


def _by_block_rows(M, edges, mats, n_out):
    """``M @ mats[i]`` for the rows of each block-row ``i`` (``edges``: row cut points;
    None for a single block-row)."""
    if edges is None:
        return M @ mats[0]
    out = np.empty((M.shape[0], n_out), dtype=mats.dtype)
    for i in range(len(edges) - 1):
        out[edges[i] : edges[i + 1]] = M[edges[i] : edges[i + 1]] @ mats[i]
    return out


class StructuredEstimator(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Shared base of the structures' estimators (see the module docstring).

    Subclasses store their parameters in ``__init__`` and implement
    ``_fit_structure(X, **metric) -> Approximation`` (``metric``:
    ``input_gram``, ``output_gram`` and ``gram_damping``, given only when a
    Gram is); the base does everything else.
    ``_parameter_constraints`` is built from ``__init__``'s signature and the
    library's one table of parameter rules, by parameter name; ``_param_rules``
    maps a parameter to another rule of the table (its key) where its name does
    not pick the rule meant, or to its own rule (a list of constraints) for a
    parameter the table does not know.
    ``_orthonormal_codes = True`` declares that the decoders' rows are
    orthonormal (SVD fits), so the encoders are ``D_i^T``.
    """

    _orthonormal_codes = False
    _parameter_constraints: dict = {}
    _param_rules: dict = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:  # the parameters are __init__'s (scikit-learn's rule)
            cls._parameter_constraints = estimator_constraints(cls, **cls._param_rules)

    def _validate_params(self):
        """Check the parameters against their rules (the functions' rules: one table)."""
        check_params(self._parameter_constraints, self.get_params(deep=False), type(self).__name__)

    def _fit_structure(self, X, **metric):  # pragma: no cover - abstract
        raise NotImplementedError

    def _grid(self):
        """``(K_rows, K_cols)`` asked for, checked against X before the fit."""
        return (1, 1)

    # ------------------------------------------------------------------ fitting
    def _validate_X(self, X, *, reset):
        """One input check for every estimator: finite real numbers, float32 or float64.

        float16 becomes float32, as in :func:`blocklowrank.approximate`.
        """
        refuse_meaningless(X)
        if getattr(X, "dtype", None) == np.float16:
            X = np.asarray(X, dtype=np.float32)
        kw = {"ensure_min_samples": 1} if reset else {}
        return validate_data(self, X, dtype=[np.float64, np.float32], reset=reset, **kw)

    def fit(self, X, y=None, *, input_gram=None, output_gram=None):
        """Fit the structure to ``X``, in the Frobenius norm or in a data metric.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            The matrix to approximate (a layer's weight: outputs x inputs).
        y : Ignored
        input_gram : array-like of shape (n_features, n_features) or GramFactor, optional
            ``G``, the second moment of the layer's inputs: fit in the metric
            ``||H^{1/2} (X - X_hat) G^{1/2}||_F`` (see :func:`blocklowrank.approximate`).
        output_gram : array-like of shape (n_samples, n_samples) or GramFactor, optional
            ``H``, an output-side weight.

        Returns
        -------
        self : object
        """
        self._fit(X, input_gram, output_gram)
        return self

    def fit_transform(self, X, y=None, *, input_gram=None, output_gram=None):
        """Fit and return the codes of the fitted rows.

        ``inverse_transform(fit_transform(X))`` is the fitted approximation.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : Ignored
        input_gram, output_gram : optional
            As in :meth:`fit`.

        Returns
        -------
        Z : ndarray of shape (n_samples, n_codes_)
        """
        return self._fit(X, input_gram, output_gram).copy()

    def _fit(self, X, input_gram=None, output_gram=None):
        before = dict(vars(self))
        try:
            return self._fit_checked(X, input_gram, output_gram)
        except BaseException:  # a refused fit leaves the estimator as it was (not fitted by this call)
            vars(self).clear()
            vars(self).update(before)
            raise

    def _fit_checked(self, X, input_gram, output_gram):
        self._validate_params()
        X = self._validate_X(X, reset=True)
        kr, kc = self._grid()
        for k, side, what in ((kr, X.shape[0], "block-rows"), (kc, X.shape[1], "block-columns")):
            if k > side:
                axis = "n_samples" if what == "block-rows" else "n_features"
                raise ValueError(f"n_blocks asks for {k} {what} but X has {axis} = {side}; use at most {side} {what}")
        metric = input_gram is not None or output_gram is not None
        if metric:
            gd = getattr(self, "gram_damping", None)
            res = self._fit_structure(X, input_gram=input_gram, output_gram=output_gram, gram_damping=gd)
        else:
            res = self._fit_structure(X)
        self._store(res, X.dtype, metric)
        self._fit_rows = np.linalg.norm(X, axis=1)
        return self._fit_codes

    _OPTIONAL = ("error_trace", "n_iter", "stop_reason", "singular_values", "exact_allocation", "objective")

    def _store(self, res, dtype, metric=False):
        f, rep = res.factors, res.report
        self.factors_ = f
        self.layout_ = f.layout
        self.ranks_ = f.layout.ranks.copy()
        self.n_params_ = int(f.n_params)
        self.error_ = float(rep.error)
        self.output_error_ = float(rep.output_error)
        for name in self._OPTIONAL:  # a refit must not keep what the previous fit reported
            self.__dict__.pop(name + "_", None)
            if getattr(rep, name) is not None and (metric or name != "objective"):
                setattr(self, name + "_", getattr(rep, name))
        if "n_iter_" not in vars(self) and "max_iter" in self.get_params(deep=False):
            self.n_iter_ = 1  # a fit in one pass (scikit-learn's rule: max_iter comes with n_iter_)
        D = np.ascontiguousarray(f.decoders(), dtype=dtype)
        self._decoders = D
        orthonormal = self._orthonormal_codes and not metric  # in a metric A G A^T = I, not A A^T = I
        self._encoders = np.ascontiguousarray(D.swapaxes(1, 2) if orthonormal else np.linalg.pinv(D))
        self.n_codes_ = int(D.shape[1])
        self.n_samples_fit_ = int(f.shape[0])
        Z = np.ascontiguousarray(f.codes(), dtype=dtype)
        rp = f.layout.row_perm
        self._fit_codes = Z if rp is None else Z[np.argsort(rp)]

    @property
    def _n_features_out(self):
        return self.n_codes_

    # ------------------------------------------------------------------ codes
    def _row_blocks(self, n_rows, what):
        lay = self.layout_
        kr = lay.n_blocks[0]
        if kr == 1:
            return None
        if n_rows != lay.shape[0]:
            raise ValueError(
                f"{what} got {n_rows} rows but this {type(self).__name__} was fitted on "
                f"{lay.shape[0]} rows cut into {kr} block-rows: a row's block-row is fixed by "
                f"its position, so {what} needs exactly {lay.shape[0]} rows. To tune n_blocks > 1 with "
                "GridSearchCV or cross_val_score on one matrix, pass cv=blocklowrank.single_fit_cv(len(X)) "
                "(every fold scores the whole matrix); the default cv holds rows out and scores NaN"
            )
        return lay.row_edges

    def _validate_codes(self, Z):
        """Codes ``Z`` checked like ``X`` (finite, 2-D, numeric) with ``n_codes_`` columns."""
        from sklearn.utils import check_array

        refuse_meaningless(Z, "Z")
        Z = check_array(Z, dtype=[np.float64, np.float32], input_name="Z")
        if Z.shape[1] != self.n_codes_:
            raise ValueError(f"Z has {Z.shape[1]} columns, expected n_codes_ = {self.n_codes_}")
        return Z.astype(self._decoders.dtype, copy=False)

    def transform(self, X):
        """Least-squares codes of each row of ``X`` for its block-row's decoder.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            With several block-rows, ``n_samples`` must be the fitted number
            of rows (each row's block-row is fixed by its position); other
            rows than the fitted ones give a warning, since they are coded in
            the block-rows of the fitted rows at their positions.

        Returns
        -------
        Z : ndarray of shape (n_samples, n_codes_)
        """
        check_is_fitted(self)
        X = self._validate_X(X, reset=False).astype(self._encoders.dtype, copy=False)
        lay = self.layout_
        edges = self._row_blocks(X.shape[0], "transform")
        if edges is not None and not np.allclose(np.linalg.norm(X, axis=1), self._fit_rows, rtol=1e-5, atol=0):
            warnings.warn(
                f"transform got rows other than the {X.shape[0]} fitted ones: with {lay.n_blocks[0]} "
                "block-rows each row is coded in the block-row of its position, which means "
                "something only for the fitted matrix (use n_blocks=1 rows-wise to code new rows)",
                UserWarning,
                stacklevel=2,
            )
        if lay.col_perm is not None:
            X = X[:, lay.col_perm]
        perm = lay.row_perm if edges is not None else None  # one block-row: order is irrelevant
        if perm is not None:
            X = X[perm]
        Z = _by_block_rows(X, edges, self._encoders, self.n_codes_)
        return Z if perm is None else Z[np.argsort(perm)]

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
        Z = self._validate_codes(Z)
        lay = self.layout_
        edges = self._row_blocks(Z.shape[0], "inverse_transform")
        perm = lay.row_perm if edges is not None else None
        if perm is not None:
            Z = Z[perm]
        out = _by_block_rows(Z, edges, self._decoders, self.n_features_in_)
        if perm is not None:
            out = out[np.argsort(perm)]
        if lay.col_perm is not None:
            out = out[:, np.argsort(lay.col_perm)]
        return out

    def reconstruct(self, Z=None):
        """Dense approximation: of the fitted ``X`` (no argument) or encoded by codes ``Z``.

        Parameters
        ----------
        Z : array-like of shape (n_samples, n_codes_), optional

        Returns
        -------
        X_hat : ndarray of shape (n_samples, n_features_in_)
        """
        check_is_fitted(self)
        if Z is None:
            return self.factors_.to_dense()
        return self.inverse_transform(Z)

    def score(self, X, y=None):
        """Minus the relative Frobenius error of reconstructing ``X`` from its codes.

        ``-||X - inverse_transform(transform(X))||_F / ||X||_F`` (0 for X = 0),
        so that greater is better and model selection works without labels.
        On the fitted ``X`` this is ``-error_`` (up to rounding) after a plain
        fit. After a fit in a data metric it is still this Frobenius score (the
        Grams describe the fitted layer's inputs, not new rows; compare
        ``output_error_``, or score held-out output errors with
        :func:`blocklowrank.output_error`).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            The rows to code and decode (the fitted ones, with several block-rows).
        y : Ignored

        Returns
        -------
        score : float
        """
        check_is_fitted(self)
        X = self._validate_X(X, reset=False)
        R = X - self.inverse_transform(self.transform(X))
        c = float(np.max(np.abs(X)))
        if c == 0:
            return 0.0
        return -float(np.linalg.norm(R / c)) / float(np.linalg.norm(X / c))  # scaled: no overflow

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        tags.input_tags.sparse = False
        return tags

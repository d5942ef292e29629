"""scikit-learn estimators for the three structures (and a shared base class).

The functional core is :func:`blocklowrank.approximate`; these classes
validate input, call it and store the fitted factors.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from ._engine import approximate
from .layout import BlockLayout, _normalize_n_blocks
from .permutations import resolve_permutation

__all__ = ["GlobalLowRank", "DiagonalBlockLowRank", "BlockLowRank", "BaseBlockLowRank"]


def _reject_strings(X, name="X"):
    """scikit-learn's rule for dtype="numeric": arrays of strings are not numbers."""
    dt = getattr(X, "dtype", None)
    if dt is None and isinstance(X, (list, tuple)):
        dt = np.asarray(X).dtype
    if dt is not None and isinstance(dt, np.dtype) and dt.kind in "USV":
        raise TypeError(
            f"{name} holds strings (dtype {dt}), not numbers; convert it to a numeric "
            "array explicitly (e.g. X.astype(float)) if the strings are numbers"
        )


def _by_block_rows(M, edges, mats, n_out):
    """``M @ mats[i]`` for the rows of each block-row ``i`` (``edges``: row cut points;
    None for a single block-row)."""
    if edges is None:
        return M @ mats[0]
    out = np.empty((M.shape[0], n_out), dtype=mats.dtype)
    for i in range(len(edges) - 1):
        out[edges[i] : edges[i + 1]] = M[edges[i] : edges[i + 1]] @ mats[i]
    return out


class BaseBlockLowRank(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Shared base: fit a block layout by truncated SVD; transform to per-block codes.

    Subclasses only say which layout they use (:meth:`_make_layout`).

    Codes. For a row of ``X`` lying in block-row ``i``, its codes are the
    concatenation over the active blocks ``(i, j)`` (in column order) of
    ``x[cols_j] @ A_ij.T``: the coordinates of that piece of the row in the
    block's right-singular basis. Block-rows with fewer codes than
    ``n_codes_`` (the largest count over block-rows) are padded with zeros.
    For a fitted row the codes are the corresponding rows of the ``B_ij``
    factors, so ``inverse_transform(fit_transform(X))`` is the approximation.
    """

    _parameter_constraints: dict = {
        "rank": [Interval(Integral, 1, None, closed="left"), "array-like", None],
        "budget": [Interval(Integral, 1, None, closed="left"), None],
        "tol": [Interval(Real, 0, 1, closed="neither"), None],
        "svd_solver": [StrOptions({"auto", "full", "randomized"})],
        "n_oversamples": [Interval(Integral, 0, None, closed="left")],
        "n_iter": [Interval(Integral, 0, None, closed="left"), StrOptions({"auto"})],
        "random_state": ["random_state"],
        "cap_rank": ["boolean"],
        "n_jobs": [Integral, None],
    }

    # ------------------------------------------------------------------ hooks
    def _make_layout(self, shape):  # pragma: no cover - abstract
        raise NotImplementedError

    def _n_blocks_pair(self):
        return (1, 1)

    def _check_grid(self, shape):
        """Readable errors for grids that do not fit the data (before the layout)."""
        kr, kc = self._n_blocks_pair()
        m, n = shape
        if kr > m:
            raise ValueError(
                f"n_blocks asks for {kr} block-rows but X has n_samples = {m} row(s) "
                f"({m} sample(s)); use at most {m} block-rows"
            )
        if kc > n:
            raise ValueError(
                f"n_blocks asks for {kc} block-columns but X has n_features = {n} "
                f"({n} feature(s)); use at most {n} block-columns"
            )

    # ------------------------------------------------------------------ fitting
    def _validate_X(self, X, *, reset):
        """One input check for every estimator: numbers only (no strings), finite, 2-D."""
        _reject_strings(X)
        if reset:
            return validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=1)
        return validate_data(self, X, dtype=[np.float64, np.float32], reset=False)

    def _rank_arguments(self):
        given = [k for k in ("rank", "budget", "tol") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of rank, budget and tol; got {', '.join(given)}")
        if not given:
            return {"rank": 1}
        return {given[0]: getattr(self, given[0])}

    def fit(self, X, y=None):
        """Fit the structured approximation of ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            The matrix to approximate.
        y : Ignored

        Returns
        -------
        self : object
        """
        self._fit(X)
        return self

    def fit_transform(self, X, y=None):
        """Fit and return the codes of ``X`` (the rows of the ``B`` factors).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        Z : ndarray of shape (n_samples, n_codes_)
        """
        approx = self._fit(X)
        return self._codes_from_factors(approx)

    def _fit(self, X):
        self._validate_params()
        X = self._validate_X(X, reset=True)
        self._check_grid(X.shape)
        layout = self._make_layout(X.shape)
        rps, cps = getattr(self, "row_perm", None), getattr(self, "col_perm", None)
        diag = layout.pattern == "diagonal"
        rp = resolve_permutation(rps, X, layout.n_blocks[0], 0, other=cps, diagonal=diag)
        cp = resolve_permutation(cps, X, layout.n_blocks[1], 1, other=rps, diagonal=diag)
        if rp is not None or cp is not None:
            layout = layout.with_permutation(rp, cp)
        kwargs = self._rank_arguments()
        approx = approximate(
            X,
            layout,
            svd_solver=self.svd_solver,
            n_oversamples=self.n_oversamples,
            n_iter=self.n_iter,
            random_state=self.random_state,
            cap_rank=self.cap_rank,
            n_jobs=self.n_jobs,
            **kwargs,
        )
        self._store(approx, X.dtype)
        return approx

    def _store(self, approx, dtype):
        lay = approx.layout
        self.layout_ = lay
        self.ranks_ = lay.ranks.copy()
        self.n_params_ = int(approx.n_params)
        self.error_ = float(approx.error)
        self.factors_ = approx.factors
        self.singular_values_ = approx.singular_values
        self.n_samples_fit_ = lay.shape[0]
        self._approx = approx
        # one projection per block-row: P_i (n, n_codes) holding A_ij^T at cols_j
        kr, _ = lay.n_blocks
        per_row = [int(lay.ranks[i].sum()) for i in range(kr)]
        self.n_codes_ = max(max(per_row), 1)
        n = lay.shape[1]
        P = np.zeros((kr, n, self.n_codes_), dtype=dtype)
        for (i, j), (_, A) in self.factors_.items():
            r = A.shape[0]
            if r == 0:
                continue
            off = int(lay.ranks[i, :j].sum())
            cs = lay.block_slice(i, j)[1]
            P[i, cs, off : off + r] = A.T
        self._proj = P

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
                f"its position, so {what} needs exactly {lay.shape[0]} rows"
            )
        return lay.row_edges

    def _validate_codes(self, Z, dtype):
        """Codes ``Z`` checked like ``X`` (finite, 2-D, numeric) with ``n_codes_`` columns."""
        from sklearn.utils import check_array

        Z = check_array(Z, dtype=[np.float64, np.float32], input_name="Z")
        if Z.shape[1] != self.n_codes_:
            raise ValueError(f"Z has {Z.shape[1]} columns, expected n_codes_ = {self.n_codes_}")
        return Z.astype(dtype, copy=False)

    def _codes_from_factors(self, approx):
        lay = approx.layout
        m = lay.shape[0]
        Z = np.zeros((m, self.n_codes_), dtype=self._proj.dtype)
        for (i, j), (B, _) in approx.factors.items():
            r = B.shape[1]
            if r == 0:
                continue
            off = int(lay.ranks[i, :j].sum())
            rs = lay.block_slice(i, j)[0]
            Z[rs, off : off + r] = B
        if lay.row_perm is not None:
            Z = Z[np.argsort(lay.row_perm)]
        return Z

    def transform(self, X):
        """Codes of each row of ``X`` in the right-singular bases of its block-row.

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
        X = self._validate_X(X, reset=False)
        X = X.astype(self._proj.dtype, copy=False)
        lay = self.layout_
        if lay.col_perm is not None:
            X = X[:, lay.col_perm]
        edges = self._row_blocks(X.shape[0], "transform")
        perm = lay.row_perm if edges is not None else None  # one block-row: order is irrelevant
        if perm is not None:
            X = X[perm]
        Z = _by_block_rows(X, edges, self._proj, self.n_codes_)
        return Z if perm is None else Z[np.argsort(perm)]

    def inverse_transform(self, Z):
        """The dense matrix that codes ``Z`` encode (same as :meth:`reconstruct`).

        Parameters
        ----------
        Z : array-like of shape (n_samples, n_codes_)

        Returns
        -------
        X_hat : ndarray of shape (n_samples, n_features_in_)
        """
        check_is_fitted(self)
        Z = self._validate_codes(Z, self._proj.dtype)
        lay = self.layout_
        edges = self._row_blocks(Z.shape[0], "inverse_transform")
        perm = lay.row_perm if edges is not None else None
        if perm is not None:
            Z = Z[perm]
        out = _by_block_rows(Z, edges, self._proj.swapaxes(1, 2), self.n_features_in_)
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
            return self._approx.reconstruction.copy()
        return self.inverse_transform(Z)

    def score(self, X, y=None):
        """Minus the relative Frobenius error of reconstructing ``X`` from its codes.

        ``-||X - inverse_transform(transform(X))||_F / ||X||_F`` (0 for X = 0),
        so that greater is better and model selection works without labels.
        On the fitted ``X`` this is ``-error_`` (up to rounding with the exact
        solver).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        score : float
        """
        check_is_fitted(self)
        X = self._validate_X(X, reset=False)
        R = X - self.inverse_transform(self.transform(X))
        nx = float(np.linalg.norm(X))
        return 0.0 if nx == 0 else -float(np.linalg.norm(R)) / nx

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        tags.input_tags.sparse = False
        return tags


_COMMON_PARAMS_DOC = """
    svd_solver : {"auto", "full", "randomized"}, default="auto"
        "full" is the exact LAPACK SVD; "randomized" a batched randomized SVD
        (knobs as in :func:`sklearn.utils.extmath.randomized_svd`); "auto"
        picks per block shape by the rule of
        :func:`blocklowrank._engine.choose_solver` (exact for ``budget`` and
        ``tol``).
    n_oversamples : int, default=10
        Extra sketch columns for the randomized solver.
    n_iter : int or "auto", default="auto"
        Power iterations for the randomized solver.
    random_state : int, RandomState instance or None, default=None
        Seeds the randomized solver.
    cap_rank : bool, default=False
        Lower a rank above a block's smaller side to that side instead of
        raising ValueError.
    n_jobs : int, default=None
        Worker threads over each stack of equal-shaped blocks.
"""

_PERM_DOC = """    row_perm, col_perm : None, array-like of int, "strided" or "cluster", default=None
        Cut ``X[row_perm][:, col_perm]`` into blocks instead of ``X``; applied
        transparently in fit, transform and reconstruct (codes and
        reconstructions are in the original order). "strided" groups index
        ``t`` with ``t mod K`` (Monarch-style blocks); "cluster" orders by a
        k-means clustering of the fitted X
        (:func:`blocklowrank.permutations.cluster_permutation`). For image
        tiles pass :func:`blocklowrank.permutations.image_patch_permutation`.
"""

_COMMON_ATTRS_DOC = """
    n_params_ : int
        Exact number of parameters of the fitted factors.
    error_ : float
        Relative Frobenius error ``||X - X_hat||_F / ||X||_F`` on the fitted X.
    ranks_ : ndarray of int, shape (K_rows, K_cols)
        Per-block ranks (0 where a block is inactive).
    factors_ : dict
        ``{(i, j): (B_ij, A_ij)}`` with ``B = U_r S_r`` and ``A = V_r^T``.
    singular_values_ : dict
        ``{(i, j): sigma}``, the singular values computed for each block.
    layout_ : BlockLayout
        Block cuts, active blocks and ranks.
    n_codes_ : int
        Number of code columns produced by :meth:`transform`.
    n_samples_fit_ : int
        Number of rows of the fitted X.
    n_features_in_ : int
        Number of columns seen during fit.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Defined only when X has feature names that are all strings.
"""


class GlobalLowRank(BaseBlockLowRank):
    __doc__ = (
        """Global low-rank approximation (LoRA structure): ``X ~ B A`` of rank ``r``.

    ``r (m + n)`` parameters. This is the uncentred truncated SVD: with the
    exact solver, :meth:`transform` equals
    ``sklearn.decomposition.TruncatedSVD(algorithm="arpack")``.

    Parameters
    ----------
    rank : int, default=None
        Rank ``r``. If ``rank``, ``budget`` and ``tol`` are all None, 1.
    budget : int, default=None
        Largest number of parameters; the rank is ``floor(budget / (m + n))``.
    tol : float in (0, 1), default=None
        Smallest rank whose relative error is ``<= tol``.
"""
        + _COMMON_PARAMS_DOC
        + """
    Attributes
    ----------"""
        + _COMMON_ATTRS_DOC
        + """
    components_ : ndarray of shape (rank, n_features)
        ``A``, the right singular vectors (as in TruncatedSVD).

    See Also
    --------
    DiagonalBlockLowRank : MELoRA structure.
    BlockLowRank : Localized LoRA (full K x K block) structure.
    sklearn.decomposition.TruncatedSVD : the same model, global only.

    References
    ----------
    .. [1] Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
       ICLR 2022.
    .. [2] Eckart and Young, "The approximation of one matrix by another of
       lower rank", Psychometrika 1936.

    Examples
    --------
    >>> import numpy as np
    >>> from blocklowrank import GlobalLowRank
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> est = GlobalLowRank(rank=4).fit(X)
    >>> est.n_params_
    224
    >>> Z = est.transform(X)
    >>> Z.shape
    (28, 4)
    >>> bool(np.allclose(est.reconstruct(Z), est.reconstruct()))
    True
    """
    )

    _parameter_constraints = dict(BaseBlockLowRank._parameter_constraints)

    def __init__(
        self,
        *,
        rank=None,
        budget=None,
        tol=None,
        svd_solver="auto",
        n_oversamples=10,
        n_iter="auto",
        random_state=None,
        cap_rank=False,
        n_jobs=None,
    ):
        self.rank = rank
        self.budget = budget
        self.tol = tol
        self.svd_solver = svd_solver
        self.n_oversamples = n_oversamples
        self.n_iter = n_iter
        self.random_state = random_state
        self.cap_rank = cap_rank
        self.n_jobs = n_jobs

    def _make_layout(self, shape):
        return BlockLayout.global_(shape)

    def _store(self, approx, dtype):
        super()._store(approx, dtype)
        self.components_ = self.factors_[(0, 0)][1]


class _GridLowRank(BaseBlockLowRank):
    """Shared parameters of the estimators on a grid of blocks (diagonal and full)."""

    _parameter_constraints = {
        **BaseBlockLowRank._parameter_constraints,
        "n_blocks": [Interval(Integral, 1, None, closed="left"), "array-like"],
        "row_perm": [None, "array-like", StrOptions({"strided", "cluster"})],
        "col_perm": [None, "array-like", StrOptions({"strided", "cluster"})],
    }

    def __init__(
        self,
        *,
        n_blocks=2,
        rank=None,
        budget=None,
        tol=None,
        svd_solver="auto",
        n_oversamples=10,
        n_iter="auto",
        random_state=None,
        cap_rank=False,
        n_jobs=None,
        row_perm=None,
        col_perm=None,
    ):
        self.row_perm = row_perm
        self.col_perm = col_perm
        self.n_blocks = n_blocks
        self.rank = rank
        self.budget = budget
        self.tol = tol
        self.svd_solver = svd_solver
        self.n_oversamples = n_oversamples
        self.n_iter = n_iter
        self.random_state = random_state
        self.cap_rank = cap_rank
        self.n_jobs = n_jobs


class DiagonalBlockLowRank(_GridLowRank):
    __doc__ = (
        """Diagonal-block low-rank approximation (MELoRA structure).

    The matrix is cut into an ``N x N`` grid (``np.array_split`` cuts, uneven
    sizes allowed); the ``N`` diagonal blocks each get a rank-``r`` truncated
    SVD and the off-diagonal blocks are zero. ``sum_i r (m_i + n_i)``
    parameters (``2 d r`` for a d x d matrix, whatever N).

    Parameters
    ----------
    n_blocks : int or (int, int), default=2
        Number of diagonal blocks ``N`` (a pair must have equal entries).
    rank : int or array-like of shape (N, N), default=None
        Rank of every diagonal block (``r_diag``), or per block. If ``rank``,
        ``budget`` and ``tol`` are all None, 1.
    budget : int, default=None
        Parameter budget; the per-block ranks minimise the error under it.
    tol : float in (0, 1), default=None
        Fewest parameters whose relative error is ``<= tol`` (an error
        when the off-diagonal blocks alone exceed it).
"""
        + _COMMON_PARAMS_DOC
        + _PERM_DOC
        + """
    Attributes
    ----------"""
        + _COMMON_ATTRS_DOC
        + """
    See Also
    --------
    GlobalLowRank : LoRA structure.
    BlockLowRank : Localized LoRA (full K x K block) structure.

    Notes
    -----
    With ``N`` block-rows, a row's codes depend on which block-row it is in,
    so :meth:`transform` needs exactly the fitted number of rows.

    References
    ----------
    .. [1] Ren et al., "MELoRA: Mini-Ensemble Low-Rank Adapters for
       Parameter-Efficient Fine-Tuning", ACL 2024.

    Examples
    --------
    >>> import numpy as np
    >>> from blocklowrank import DiagonalBlockLowRank
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> est = DiagonalBlockLowRank(n_blocks=4, rank=4).fit(X)
    >>> est.n_params_, est.ranks_.diagonal().tolist()
    (224, [4, 4, 4, 4])
    >>> est.reconstruct().shape
    (28, 28)
    """
    )


    def _n_blocks_pair(self):
        kr, kc = _normalize_n_blocks(self.n_blocks)
        if kr != kc:
            raise ValueError(f"DiagonalBlockLowRank needs a square grid, got n_blocks={self.n_blocks!r}")
        return kr, kc

    def _make_layout(self, shape):
        return BlockLayout.from_blocks(shape, self._n_blocks_pair(), pattern="diagonal")


class BlockLowRank(_GridLowRank):
    __doc__ = (
        """Full block low-rank approximation (Localized LoRA / GraLoRA structure).

    The matrix is cut into a ``K_rows x K_cols`` grid (``np.array_split``
    cuts, uneven sizes allowed) and every block ``(i, j)`` gets its own
    rank-``r`` truncated SVD ``B_ij A_ij`` (optimal per block by
    Eckart-Young). ``sum_ij r (m_i + n_j)`` parameters (``2 d r K`` for a
    d x d matrix and a K x K grid).

    Parameters
    ----------
    n_blocks : int or (int, int), default=2
        ``K`` (a K x K grid) or ``(K_rows, K_cols)``.
    rank : int or array-like of shape (K_rows, K_cols), default=None
        Rank of every block (``r_block``), or per block. If ``rank``,
        ``budget`` and ``tol`` are all None, 1.
    budget : int, default=None
        Parameter budget; the per-block ranks minimise the error under it
        (water-filling over the blocks' spectra, see
        :func:`blocklowrank.allocate_ranks`).
    tol : float in (0, 1), default=None
        Fewest parameters whose relative error is ``<= tol``.
"""
        + _COMMON_PARAMS_DOC
        + _PERM_DOC
        + """
    Attributes
    ----------"""
        + _COMMON_ATTRS_DOC
        + """
    See Also
    --------
    GlobalLowRank : LoRA structure (``n_blocks=1``).
    DiagonalBlockLowRank : MELoRA structure (only the diagonal blocks).

    Notes
    -----
    With several block-rows, a row's codes depend on which block-row it is
    in, so :meth:`transform` needs exactly the fitted number of rows.

    References
    ----------
    .. [1] Barazandeh et al., "Localized LoRA: A Structured Low-Rank
       Approximation for Efficient Fine-Tuning", arXiv:2506.00236, 2025.
    .. [2] Jung et al., "GraLoRA: Granular Low-Rank Adaptation for
       Parameter-Efficient Fine-Tuning", arXiv:2505.20355, 2025.

    Examples
    --------
    >>> import numpy as np
    >>> from blocklowrank import BlockLowRank
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> est = BlockLowRank(n_blocks=2, rank=2).fit(X)
    >>> est.n_params_
    224
    >>> est.ranks_.tolist()
    [[2, 2], [2, 2]]
    >>> opt = BlockLowRank(n_blocks=2, budget=224).fit(X)
    >>> bool(opt.error_ <= est.error_)
    True
    """
    )


    def _n_blocks_pair(self):
        return _normalize_n_blocks(self.n_blocks)

    def _make_layout(self, shape):
        return BlockLayout.from_blocks(shape, self._n_blocks_pair(), pattern="full")

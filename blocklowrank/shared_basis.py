"""Block low rank with shared bases (BLAST; Lee et al., NeurIPS 2024).

The matrix is cut into a ``K_rows x K_cols`` grid and block ``(i, j)`` is
``U_i diag(s_ij) V_j^T``: the left basis ``U_i`` (``m_i x r``) is shared by
every block of block-row ``i``, the right basis ``V_j`` (``n_j x r``) by
every block of block-column ``j``, and only the ``r`` diagonal couplings
``s_ij`` are specific to a block. Parameters:
``r (m + n) + r K_rows K_cols``.

Functional core :func:`fit_shared_basis`; estimator :class:`SharedBasisLowRank`.

Implementation: blocks are handled as one zero-padded tensor of shape
``(K_rows, K_cols, max m_i, max n_j)`` so that every step is a handful of
einsums and batched ``r x r`` solves, without a Python loop over blocks.
Padded rows of ``U_i`` / ``V_j`` stay exactly zero (their rows of the data
are zero), so padding does not change the problem.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import validate_data

from ._engine import batched_svd, validate_matrix
from ._factors import STEP_TOL, LinearCodesBase, psd_solve
from .layout import BlockLayout, _check_int, _normalize_n_blocks

__all__ = [
    "fit_shared_basis",
    "SharedBasisFit",
    "SharedBasisLowRank",
    "shared_basis_params",
    "shared_basis_rank_for_budget",
]

INITS = ("svd", "random")


# ---------------------------------------------------------------------------- counting
def shared_basis_params(shape, n_blocks, rank):
    """Exact parameter count ``r (m + n) + r K_rows K_cols`` of the shared-basis structure.

    ``r (m + n)`` for the bases ``U_i``, ``V_j`` and ``r`` couplings per block.

    Examples
    --------
    >>> shared_basis_params((28, 28), 2, 3)
    180
    >>> shared_basis_params((256, 256), 4, 15)
    7920
    """
    m, n = _shape(shape)
    kr, kc = _normalize_n_blocks(n_blocks)
    r = _check_int(rank, "rank", minimum=0)
    return int(r * (m + n) + r * kr * kc)


def shared_basis_rank_for_budget(shape, n_blocks, budget):
    """Largest rank ``r`` with ``shared_basis_params(shape, n_blocks, r) <= budget``.

    Capped at the smallest block side (0 if even rank 1 does not fit).

    Examples
    --------
    >>> shared_basis_rank_for_budget((28, 28), 2, 224)
    3
    """
    m, n = _shape(shape)
    kr, kc = _normalize_n_blocks(n_blocks)
    budget = _check_int(budget, "budget", minimum=0)
    lay = BlockLayout.from_blocks((m, n), (kr, kc))
    cap = min(min(lay.row_sizes), min(lay.col_sizes))
    return int(min(budget // (m + n + kr * kc), cap))


def _shape(shape):
    try:
        m, n = shape
    except (TypeError, ValueError):
        raise ValueError(f"shape must be a pair (m, n), got {shape!r}") from None
    return _check_int(m, "shape[0]", minimum=1), _check_int(n, "shape[1]", minimum=1)


# ---------------------------------------------------------------------------- result
@dataclass(eq=False)
class SharedBasisFit:
    """Result of :func:`fit_shared_basis`.

    Attributes
    ----------
    layout : BlockLayout
        The grid (full pattern, nominal rank ``r`` on every block). Its
        ``n_params`` counts independent per-block factors, *not* this
        structure; use :attr:`n_params`.
    rank : int
    U : list of ndarray
        ``U_i``, shape ``(m_i, r)``: the least-squares codes of the rows of
        block-row ``i`` (the last step of the fit).
    V : list of ndarray
        ``V_j``, shape ``(n_j, r)``, columns of unit norm.
    S : ndarray of shape (K_rows, K_cols, r)
        Couplings ``s_ij``.
    error : float
    error_trace : ndarray
        Relative error after the initialisation and after every sweep.
    n_iter : int
        Passes run, the initialisation counted as the first.
    stop_reason : str
        "tol", "max_iter" or "increase" (a sweep would have raised the
        error beyond rounding; it is discarded).
    n_params : int
    """

    layout: BlockLayout
    rank: int
    U: list
    V: list
    S: np.ndarray
    error: float
    error_trace: np.ndarray
    n_iter: int
    stop_reason: str
    n_params: int
    dtype: np.dtype
    _reconstruction: object = field(default=None, repr=False)

    @property
    def factors(self):
        """``{(i, j): (B_ij, A_ij)}`` with ``B_ij = U_i diag(s_ij)`` and ``A_ij = V_j^T``."""
        return {
            (i, j): (self.U[i] * self.S[i, j][None, :], np.ascontiguousarray(self.V[j].T))
            for i in range(len(self.U))
            for j in range(len(self.V))
        }

    @property
    def reconstruction(self):
        """Dense approximation (cached)."""
        if self._reconstruction is None:
            self._reconstruction = _dense(self.layout, self.U, self.V, self.S, self.dtype)
        return self._reconstruction

    def decoders(self):
        """Per block-row decoders ``W_i = [diag(s_i1) V_1^T, ..., diag(s_iK) V_K^T]``,
        stacked as ``(K_rows, r, n)``; the codes of a row of block-row ``i`` are
        its row of ``U_i``."""
        kr = len(self.U)
        n = self.layout.shape[1]
        W = np.zeros((kr, self.rank, n), dtype=np.float64)
        for j, V in enumerate(self.V):
            cs = self.layout.block_slice(0, j)[1]
            W[:, :, cs] = self.S[:, j, :, None] * np.asarray(V, np.float64).T[None]
        return W


def _dense(layout, U, V, S, dtype):
    out = np.zeros(layout.shape, dtype=np.float64)
    for i, Ui in enumerate(U):
        for j, Vj in enumerate(V):
            rs, cs = layout.block_slice(i, j)
            out[rs, cs] = (np.asarray(Ui, np.float64) * S[i, j]) @ np.asarray(Vj, np.float64).T
    return out.astype(dtype, copy=False)


# ---------------------------------------------------------------------------- padded tensors
def _pad(X, layout):
    """X -> T of shape (K_rows, K_cols, mb, nb), zero-padded blocks."""
    kr, kc = layout.n_blocks
    mb, nb = max(layout.row_sizes), max(layout.col_sizes)
    T = np.zeros((kr, kc, mb, nb))
    for r0, r1, c0, c1, bi0, bj0, nr, nc, (h, w) in layout.regions():
        T[bi0 : bi0 + nr, bj0 : bj0 + nc, :h, :w] = (
            X[r0:r1, c0:c1].reshape(nr, h, nc, w).swapaxes(1, 2)
        )
    return T


def _residual_sq(T, U, V, S):
    Xh = np.einsum("iar,ijr,jbr->ijab", U, S, V, optimize=True)
    R = T - Xh
    return float(np.einsum("ijab,ijab->", R, R))


def _normalise(F, S, axis):
    """Unit-norm columns of F (K, rows, r); the norms move into S along ``axis``."""
    nrm = np.linalg.norm(F, axis=1)  # (K, r)
    nrm = np.where(nrm > 0, nrm, 1.0)
    F /= nrm[:, None, :]
    if axis == 0:
        S *= nrm[:, None, :]
    else:
        S *= nrm[None, :, :]


def _s_step(T, U, V):
    """Exact least squares for every s_ij: ((U_i^T U_i) o (V_j^T V_j)) s = diag(U_i^T X_ij V_j)."""
    UU = np.einsum("iar,ias->irs", U, U)
    VV = np.einsum("jbr,jbs->jrs", V, V)
    M = UU[:, None] * VV[None, :]  # (kr, kc, r, r)
    TV = np.einsum("ijab,jbr->ijar", T, V)
    rhs = np.einsum("iar,ijar->ijr", U, TV)
    return psd_solve(M, rhs[..., None])[..., 0], TV


def _u_step(TV, V, S):
    """Exact least squares for every U_i given V and s: U_i W_i ~ X_i."""
    VV = np.einsum("jbr,jbs->jrs", V, V)
    G = np.einsum("ijr,ijs,jrs->irs", S, S, VV)  # W_i W_i^T
    rhs = np.einsum("ijar,ijr->iar", TV, S)  # X_i W_i^T
    return psd_solve(G, rhs.swapaxes(1, 2)).swapaxes(1, 2)


def _v_step(T, U, S):
    """Exact least squares for every V_j given U and s (the transpose of the U step)."""
    UU = np.einsum("iar,ias->irs", U, U)
    G = np.einsum("ijr,ijs,irs->jrs", S, S, UU)
    UT = np.einsum("ijab,iar->ijbr", T, U)
    rhs = np.einsum("ijbr,ijr->jbr", UT, S)
    return psd_solve(G, rhs.swapaxes(1, 2)).swapaxes(1, 2)


# ---------------------------------------------------------------------------- core
def fit_shared_basis(
    X,
    n_blocks,
    rank,
    *,
    max_iter=100,
    tol=1e-6,
    init="svd",
    random_state=None,
    row_sizes=None,
    col_sizes=None,
):
    """Fit ``X_ij ~ U_i diag(s_ij) V_j^T`` by exact alternating least squares.

    Initialisation (``init="svd"``): ``U_i`` = top-``r`` left singular
    vectors of block-row ``i`` (``m_i x n``), ``V_j`` = top-``r`` right
    singular vectors of block-column ``j`` (``m x n_j``), then the exact
    ``s`` step. ``init="random"``: Gaussian ``U_i``, ``V_j`` (seeded by
    ``random_state``), then the exact ``s`` step.

    One sweep = three exact block-coordinate steps:

    - ``V`` step: each ``V_j`` solves the linear least-squares problem
      ``X_{:,j}^T ~ V_j [diag(s_1j) U_1^T, ..., diag(s_Kj) U_K^T]``
      (normal equations with Gram ``sum_i (s_ij s_ij^T) o (U_i^T U_i)``);
    - ``s`` step: each ``s_ij`` solves ``((U_i^T U_i) o (V_j^T V_j)) s_ij =
      diag(U_i^T X_ij V_j)`` (``o`` is the Hadamard product);
    - ``U`` step: each ``U_i`` solves ``X_i ~ U_i W_i`` with ``W_i =
      [diag(s_i1) V_1^T, ..., diag(s_iK) V_K^T]``.

    Between steps the columns of ``U`` (before the ``V`` step) and of ``V``
    (before the ``U`` step) are scaled to unit norm, the scale moving into
    ``s``; this leaves the approximation unchanged and keeps the Gram
    matrices well conditioned. The ``U`` step comes last, so ``U_i`` are the
    least-squares codes of the rows of block-row ``i`` for the decoder
    ``W_i``: :meth:`SharedBasisLowRank.transform` of the fitted X gives them
    back.

    Normal equations are solved with :func:`~blocklowrank._factors.psd_solve`
    (pseudo-inverse through an eigendecomposition, eigenvalues below
    ``1e-12`` of the largest treated as zero): for a singular Gram (e.g. a
    coupling ``s_ij = 0`` or a rank above what the data supports) this is
    the minimum-norm exact minimiser; no ridge is added, because a ridge
    would make a step inexact and break the monotone decrease.

    **The error trace never increases**: every step is an exact
    minimisation over its variables with the others fixed (block-coordinate
    descent), so in exact arithmetic the error cannot go up. A sweep that
    raises the relative error by more than ``1e-12`` (rounding; ``STEP_TOL``)
    is discarded and iteration stops with ``stop_reason="increase"``.

    Parameters
    ----------
    X : array-like of shape (m, n)
    n_blocks : int or (int, int)
        ``K`` or ``(K_rows, K_cols)``; ``np.array_split`` cuts.
    rank : int
        ``r``, at most the smallest block side.
    max_iter : int, default=100
        Largest number of passes, the initialisation counted as the first
        (so ``max_iter - 1`` sweeps at most).
    tol : float, default=1e-6
        Stop when a sweep improves the relative error by a fraction
        ``<= tol`` of its value.
    init : {"svd", "random"}, default="svd"
    random_state : int, RandomState instance or None, default=None
        Used by ``init="random"`` only.
    row_sizes, col_sizes : sequence of int, optional
        Explicit block heights / widths.

    Returns
    -------
    SharedBasisFit

    Examples
    --------
    >>> import numpy as np
    >>> from blocklowrank.shared_basis import fit_shared_basis
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> res = fit_shared_basis(X, 2, 3)
    >>> res.n_params
    180
    >>> bool(np.all(np.diff(res.error_trace) <= 1e-12))
    True
    """
    X = validate_matrix(X, max_ndim=2)
    dtype = X.dtype
    Xd = np.asarray(X, dtype=np.float64)
    m, n = Xd.shape
    r = _check_int(rank, "rank", minimum=1)
    layout = BlockLayout.from_blocks(
        (m, n), n_blocks, rank=0, pattern="full", row_sizes=row_sizes, col_sizes=col_sizes
    )
    side = min(min(layout.row_sizes), min(layout.col_sizes))
    if r > side:
        raise ValueError(
            f"rank={r} exceeds the smallest block side ({side}) of the "
            f"{layout.n_blocks[0]}x{layout.n_blocks[1]} grid of a {m}x{n} matrix; lower the "
            "rank or use fewer blocks"
        )
    layout = layout.with_ranks(r)
    max_iter = _check_int(max_iter, "max_iter", minimum=1)
    if not isinstance(tol, numbers.Real) or isinstance(tol, bool) or not tol >= 0:
        raise ValueError(f"tol must be a float >= 0, got {tol!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    kr, kc = layout.n_blocks
    mb, nb = max(layout.row_sizes), max(layout.col_sizes)
    T = _pad(Xd, layout)
    total = float(np.einsum("ij,ij->", Xd, Xd))

    def rel(sq):
        return 0.0 if total == 0 else float(np.sqrt(max(sq, 0.0) / total))

    U = np.zeros((kr, mb, r))
    V = np.zeros((kc, nb, r))
    re, ce = layout.row_edges, layout.col_edges
    if init == "svd":
        for i in range(kr):
            Ui, _, _ = batched_svd(Xd[re[i] : re[i + 1]], r)
            U[i, : layout.row_sizes[i]] = Ui
        for j in range(kc):
            _, _, Vt = batched_svd(Xd[:, ce[j] : ce[j + 1]], r)
            V[j, : layout.col_sizes[j]] = Vt.T
    else:
        from sklearn.utils import check_random_state

        rng = check_random_state(random_state)
        for i in range(kr):
            U[i, : layout.row_sizes[i]] = rng.standard_normal((layout.row_sizes[i], r))
        for j in range(kc):
            V[j, : layout.col_sizes[j]] = rng.standard_normal((layout.col_sizes[j], r))
        _normalise(U, np.ones((kr, kc, r)), 0)
        _normalise(V, np.ones((kr, kc, r)), 1)
    S, TV = _s_step(T, U, V)
    U = _u_step(TV, V, S)  # U always ends as the least-squares codes
    trace = [rel(_residual_sq(T, U, V, S))]
    stop = "max_iter"
    n_done = 1  # the initialisation (SVD bases, s step, U step) is the first pass
    for _ in range(max_iter - 1):
        before = trace[-1]
        if before <= STEP_TOL:
            stop = "tol"
            break
        U1, S1 = U.copy(), S.copy()
        _normalise(U1, S1, 0)
        V1 = _v_step(T, U1, S1)
        _normalise(V1, S1, 1)
        S1, TV = _s_step(T, U1, V1)
        U1 = _u_step(TV, V1, S1)
        e = rel(_residual_sq(T, U1, V1, S1))
        if e > before + STEP_TOL:
            stop = "increase"
            break
        U, V, S = U1, V1, S1
        trace.append(e)
        n_done += 1
        if before - e <= tol * before:
            stop = "tol"
            break

    cast = lambda a: np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    Ul = [cast(U[i, : layout.row_sizes[i]]) for i in range(kr)]
    Vl = [cast(V[j, : layout.col_sizes[j]]) for j in range(kc)]
    S = cast(S)
    return SharedBasisFit(
        layout=layout,
        rank=r,
        U=Ul,
        V=Vl,
        S=S,
        error=trace[-1],
        error_trace=np.asarray(trace),
        n_iter=n_done,
        stop_reason=stop,
        n_params=shared_basis_params((m, n), (kr, kc), r),
        dtype=dtype,
    )


# ---------------------------------------------------------------------------- estimator
class SharedBasisLowRank(LinearCodesBase):
    """Block low rank with bases shared along block-rows and block-columns (BLAST).

    Block ``(i, j)`` of a ``K_rows x K_cols`` grid is ``U_i diag(s_ij)
    V_j^T``: ``U_i`` (``m_i x r``) is shared by block-row ``i``, ``V_j``
    (``n_j x r``) by block-column ``j``. ``r (m + n) + r K_rows K_cols``
    parameters (:func:`shared_basis_params`), against ``r K (m + n)`` for
    independent rank-``r`` blocks. Fitted by exact alternating least squares
    from an SVD initialisation (:func:`fit_shared_basis`); the error never
    increases from one sweep to the next (``error_trace_``).

    Codes. A row in block-row ``i`` is coded by its row of ``U_i`` (``r``
    numbers) and decoded by ``W_i = [diag(s_i1) V_1^T, ..., diag(s_iK)
    V_K^T]`` (``r x n``). :meth:`transform` returns the least-squares codes
    ``x @ pinv(W_i)``; the fit ends with the exact ``U`` step, so on the
    fitted rows these are the rows of ``U_i`` and
    ``reconstruct(fit_transform(X))`` is the fitted approximation.

    Parameters
    ----------
    n_blocks : int or (int, int), default=2
        ``K`` (a K x K grid) or ``(K_rows, K_cols)``.
    rank : int, default=1
        Shared rank ``r`` (at most the smallest block side).
    max_iter : int, default=100
        Largest number of passes, the initialisation counted as the first.
    tol : float, default=1e-6
        Stop when a sweep improves the relative error by a fraction
        ``<= tol`` (a convergence tolerance, not a target error).
    init : {"svd", "random"}, default="svd"
    random_state : int, RandomState instance or None, default=None
        Seeds ``init="random"``.

    Attributes
    ----------
    n_params_ : int
        ``r (m + n) + r K_rows K_cols``.
    error_ : float
    error_trace_ : ndarray
        Relative error after the initialisation and each sweep;
        non-increasing.
    n_iter_ : int
        Passes run, the initialisation counted as the first.
    stop_reason_ : str
    ranks_ : ndarray of int, shape (K_rows, K_cols)
        Nominal rank ``r`` of every block.
    factors_ : dict
        ``{(i, j): (B_ij, A_ij)}`` with ``B_ij = U_i diag(s_ij)``,
        ``A_ij = V_j^T`` (for interoperability with the other structures).
    U_ : list of ndarray
    V_ : list of ndarray
    S_ : ndarray of shape (K_rows, K_cols, r)
    layout_ : BlockLayout
        The grid; its ``n_params`` counts independent blocks, not this
        structure.
    n_codes_ : int
    n_samples_fit_ : int
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Defined only when X has feature names that are all strings.

    See Also
    --------
    BlockLowRank : independent factors per block.
    HybridLowRank : blocks plus a global term.

    Notes
    -----
    With several block-rows, a row's codes depend on which block-row it is
    in, so :meth:`transform` needs exactly the fitted number of rows.

    References
    ----------
    .. [1] Lee, Kwon, Kang, Wang and Lee, "BLAST: Block-Level Adaptive
       Structured Matrices for Efficient Deep Neural Network Inference",
       NeurIPS 2024, arXiv:2410.21262.

    Examples
    --------
    >>> import numpy as np
    >>> from blocklowrank.shared_basis import SharedBasisLowRank
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> est = SharedBasisLowRank(n_blocks=2, rank=3).fit(X)
    >>> est.n_params_
    180
    >>> Z = est.fit_transform(X)
    >>> Z.shape
    (28, 3)
    >>> bool(np.allclose(est.reconstruct(Z), est.reconstruct()))
    True
    """

    _parameter_constraints: dict = {
        "n_blocks": [Interval(Integral, 1, None, closed="left"), "array-like"],
        "rank": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "init": [StrOptions(set(INITS))],
        "random_state": ["random_state"],
    }

    def __init__(self, *, n_blocks=2, rank=1, max_iter=100, tol=1e-6, init="svd", random_state=None):
        self.n_blocks = n_blocks
        self.rank = rank
        self.max_iter = max_iter
        self.tol = tol
        self.init = init
        self.random_state = random_state

    def _n_blocks_pair(self):
        return _normalize_n_blocks(self.n_blocks)

    def _fit(self, X):
        self._validate_params()
        X = validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=1)
        self._check_grid(X.shape)
        res = fit_shared_basis(
            X,
            self._n_blocks_pair(),
            self.rank,
            max_iter=self.max_iter,
            tol=self.tol,
            init=self.init,
            random_state=self.random_state,
        )
        self.layout_ = res.layout
        self.ranks_ = res.layout.ranks.copy()
        self.U_, self.V_, self.S_ = res.U, res.V, res.S
        self.factors_ = res.factors
        self.n_params_ = res.n_params
        self.error_ = res.error
        self.error_trace_ = res.error_trace
        self.n_iter_ = res.n_iter
        self.stop_reason_ = res.stop_reason
        self._result = res
        W = res.decoders()
        Z = np.concatenate(res.U, axis=0)
        self._store_codes(np.linalg.pinv(W), W, Z, res.reconstruction, X.dtype)
        return self._fit_codes

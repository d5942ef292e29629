"""The registry of structures, and :func:`approximate`, the one entry that fits any of them.

Each structure is declared once, as a :class:`Structure` (name, literature
label, layout builder, exact count, budget rule, fit function, estimator,
PEFT target) and registered; the budget tools, the converters, the command
line, ``blocklowrank.testing`` and the experiments iterate over the registry.

Built in, in this order: ``"global"`` (LoRA), ``"diagonal"`` (MELoRA),
``"block"`` (Localized LoRA / GraLoRA), ``"hybrid"`` (blocks plus a global
term) and ``"shared_basis"`` (BLAST).

Adding a structure
------------------
A pure layout pattern is one call (see :func:`layout_structure`)::

    import numpy as np
    from blocklowrank.structures import layout_structure, register
    register(layout_structure("upper", "Upper blocks", "blocks on and above the diagonal",
                              lambda kr, kc: np.triu(np.ones((kr, kc), bool))))

Any other structure is one module that defines its fit function (returning an
:class:`~blocklowrank.Approximation` around a
:class:`~blocklowrank.factors.StructuredFactors`), its count, its budget rule
and a thin :class:`~blocklowrank.estimators.StructuredEstimator`, and ends with
``register(Structure(...))``. :func:`blocklowrank.testing.conformance.check_structure`
then runs the shared checks (scikit-learn compliance, counts against the
fitted factors, budget matching, save/load round trip) on it.
"""

from .._engine import fit_layout
from .._params import validate_params
from ._grid import BlockLowRank, DiagonalBlockLowRank, GlobalLowRank, GridLowRank, layout_structure
from ._hybrid import HybridLowRank, fit_hybrid, hybrid_params
from ._registry import Structure, get_structure, register, registered, structure_names, structures, unregister
from ._shared_basis import SharedBasisLowRank, fit_shared_basis, shared_basis_params

__all__ = [
    "Structure",
    "register",
    "unregister",
    "registered",
    "get_structure",
    "structure_names",
    "structures",
    "layout_structure",
    "approximate",
    "GlobalLowRank",
    "DiagonalBlockLowRank",
    "BlockLowRank",
    "GridLowRank",
    "HybridLowRank",
    "SharedBasisLowRank",
    "fit_hybrid",
    "fit_shared_basis",
    "hybrid_params",
    "shared_basis_params",
]


@validate_params()  # the structure's fit checks its arguments; its errors name approximate
def approximate(X, layout=None, *, method=None, **kwargs):
    """Structured low-rank approximation of a matrix or a stack of matrices.

    With a layout structure (global, diagonal, block) every active block is
    replaced by its truncated SVD (optimal per block by Eckart-Young); blocks
    of equal shape go through one batched SVD call. Any registered structure
    can be named: its keyword arguments are those of its fit function.

    Parameters
    ----------
    X : array-like of shape (m, n) or (..., m, n)
        Matrix, or stack of matrices fitted with one configuration. float32
        stays float32, float16 becomes float32, integers and booleans become
        float64. Not modified.
    layout : BlockLayout, optional
        The structure, for layout structures. Its ranks are used unless
        ``rank``, ``budget`` or ``max_error`` is given.
    method : str, default="block"
        A registered structure (:func:`structure_names`); not with a layout.
        With the default ``n_blocks=1`` the three layout structures are all
        the global truncated SVD.
    n_blocks : int or (int, int), default=1
        Block-rows and block-columns (``np.array_split`` cuts).
    rank : int or array-like of shape (K_rows, K_cols), optional
        Rank of every active block, or of each block.
    budget : int, optional
        Parameter budget: per-block ranks that minimise the error under it
        (see :func:`~blocklowrank.allocate_ranks`), per matrix. In a data
        metric, on the blocks' metric spectra (exact where the blocks decouple;
        ``exact_allocation`` says so).
    max_error : float in (0, 1), optional
        Fewest parameters with relative error ``<= max_error`` (exactly the
        fewest when ``exact_allocation`` is True). **With a Gram it bounds the
        output error** (``report.output_error``, undamped), not the Frobenius
        error; for a Frobenius target give no Gram.
    svd_solver : {"auto", "full", "randomized"}, default="auto"
        "full": exact LAPACK SVD; "randomized": batched randomized SVD with
        ``n_oversamples``, ``iterated_power`` and ``random_state`` as in
        :func:`sklearn.utils.extmath.randomized_svd`; "auto": the randomized
        solver where a computed certificate shows its error within
        sqrt(1 + 1e-6) of the optimum, else the exact one (details:
        :class:`~blocklowrank.structures.GridLowRank`).
    n_oversamples : int, default=10
    iterated_power : int or "auto", default="auto"
    random_state : int, RandomState instance or None, default=None
    cap_rank : bool, default=False
        Lower a rank above a block's smaller side to that side instead of raising.
    n_jobs : int, optional
        Worker threads over each stack of blocks (BLAS held to one thread
        each); -1 means all cores. Results agree to rounding whatever ``n_jobs``.
    row_perm, col_perm : array-like of int, optional
        Cut ``X[row_perm][:, col_perm]`` into blocks (layout structures).
    input_gram : array-like of shape (n, n) or GramFactor, optional
        Fit in a data metric: ``G``, the (uncentred) second moment
        ``X_in^T X_in / N`` of the layer's inputs (``X`` is the layer's
        weight, outputs x inputs). The fit then minimises
        ``f(M) = ||H^{1/2} (X - M) G^{1/2}||_F^2 = tr(H (X - M) G (X - M)^T)``
        instead of ``||X - M||_F^2``: with ``H`` absent, the error of the
        layer's outputs on its calibration inputs. Build a
        :class:`~blocklowrank.GramFactor` once per input site and pass it to
        every layer reading that input (the factorisation is paid once).
        Global: the exact optimum (Eckart-Young in the metric). Diagonal with
        ``H`` absent, or Grams block-diagonal over the cuts: exact in one step.
        Other grids: block-coordinate descent (never increases the objective,
        starts no worse than the plain fit; ``error_trace``, ``n_iter``,
        ``stop_reason``, ``max_iter``, ``tol``). Hybrid: exact alternating
        steps in the metric; shared basis: majorisation-minimisation (see
        their fit functions). A metric that is a multiple of the identity is
        the plain fit.
    output_gram : array-like of shape (m, m) or GramFactor, optional
        ``H``, an output-side weight (e.g. the second moment of the loss
        gradient at the layer's output); absent: ``H = I``.
    gram_damping : float, optional
        ``delta >= 0``: the fits use ``G + delta mean(diag G) I`` (and ``H``
        likewise), so directions the calibration never saw follow the plain
        fit. None: :data:`~blocklowrank.GRAM_DAMPING` for arrays (0.01, chosen
        on held-out data), a GramFactor's own damping.
        ``gram_damping=0`` minimises the data objective exactly (a singular
        ``G`` is then handled in its range).
    max_iter, tol : optional
        Iterative fits: passes (the start counted) and the stopping tolerance.

    Returns
    -------
    Approximation
        ``.factors`` (a :class:`~blocklowrank.factors.StructuredFactors`:
        ``factors[(i, j)]`` is ``(B_ij, A_ij)`` with ``B = U_r S_r`` and
        ``A = V_r^T``; in a data metric ``B = K^{-T} U_r S_r``, ``A = V_r^T L^{-1}``
        from the SVD of the block's target in its metric) and ``.report``
        (:class:`~blocklowrank.FitReport`); ``error``, ``output_error``,
        ``n_params``, ``ranks``, ``layout``, ``reconstruction`` read as attributes.

    Notes
    -----
    Signs: for every block and component, the largest-magnitude entry of the
    right singular vector is positive (``svd_flip(u_based_decision=False)``,
    the convention of ``TruncatedSVD``). Entries near the top or bottom of the
    float range are rescaled by a power of two (exact) before any sum of
    squares, so the error never overflows.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> res = approximate(X, method="block", n_blocks=2, rank=2)
    >>> res.n_params, res.reconstruction.shape
    (224, (28, 28))
    >>> g = approximate(X, method="global", rank=4)
    >>> bool(np.isclose(g.error, np.linalg.norm(X - g.reconstruction) / np.linalg.norm(X)))
    True
    >>> approximate(X, method="hybrid", n_blocks=2, rank=1, global_rank=2).n_params
    224

    In a data metric (``G`` from 100 input samples ``X_in``, one row per sample):

    >>> from blocklowrank import output_error
    >>> X_in = np.random.default_rng(1).standard_normal((100, 28)) * np.linspace(0.1, 3, 28)
    >>> G = X_in.T @ X_in / 100
    >>> res = approximate(X, method="global", rank=4, input_gram=G, gram_damping=0.0)
    >>> out = np.linalg.norm((X - res.reconstruction) @ X_in.T) / np.linalg.norm(X @ X_in.T)
    >>> bool(np.isclose(res.output_error, out))
    True
    >>> bool(res.output_error < output_error(X, g.reconstruction, G))  # the plain fit, in the same metric
    True
    """
    if layout is not None:
        if method is not None or "n_blocks" in kwargs:
            raise ValueError("give a layout or a method with n_blocks, not both: the layout has its own grid")
        return fit_layout(X, layout, **kwargs)
    method = "block" if method is None else method
    if not isinstance(method, str) or method not in structure_names():
        raise ValueError(f"method must be a registered structure {structure_names()}, got {method!r}")
    s = get_structure(method)
    if not s.metric and any(k in kwargs for k in ("input_gram", "output_gram", "gram_damping")):
        raise ValueError(f"the {method!r} structure has no fit in a data metric: give no input_gram/output_gram")
    return s.fit(X, **kwargs)

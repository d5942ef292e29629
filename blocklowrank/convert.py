"""Conversions between structured factors and the layouts other tools use.

Every fitted object of the library (an :class:`~blocklowrank.Approximation`,
a fitted estimator, a :class:`~blocklowrank.factors.StructuredFactors`) converts
to the one container (:func:`as_factors`), and from there to

- GraLoRA's tensors as PEFT stores them (:func:`to_gralora` /
  :func:`from_gralora`, :func:`gralora_delta_weight`);
- MELoRA's list of per-block pairs (:func:`to_melora` / :func:`from_melora`);
- a dense update (:func:`to_dense`) and its refit as a global LoRA of rank r
  (:func:`refit_global`);
- a rank report (:func:`rank_report`);
- an ``.npz`` file (:func:`save_factors`; read back with
  :func:`blocklowrank.factors.load_factors`), no pickle.

Every conversion round-trips exactly or refuses: a permuted layout densifies
and saves in the original order, but cannot be GraLoRA or MELoRA tensors (their
blocks are contiguous), so those refuse it.

Weight convention. Our matrices are ``W`` of shape ``(m, n)``; for a
PyTorch ``nn.Linear`` layer that is ``(out_features, in_features)``: rows
are outputs, columns inputs, and ``y = x @ W.T``. Block ``(i, j)`` maps
input block ``j`` to output block ``i``.
"""

from __future__ import annotations

import numpy as np

from ._engine import Approximation, fit_layout
from ._params import validate_params
from .factors import StructuredFactors
from .layout import BlockLayout

__all__ = [
    "as_factors",
    "to_dense",
    "refit_global",
    "rank_report",
    "to_gralora",
    "from_gralora",
    "gralora_delta_weight",
    "to_melora",
    "from_melora",
    "save_factors",
]


def as_factors(obj):
    """The :class:`~blocklowrank.factors.StructuredFactors` of any fitted object of the library.

    Accepts the container itself, an :class:`~blocklowrank.Approximation`
    of one matrix, a fitted estimator, or a ``(layout, {(i, j): (B, A)})`` pair.
    """
    if isinstance(obj, StructuredFactors):
        return obj
    if isinstance(obj, Approximation):
        if obj.factors.batch_shape:
            raise ValueError("as_factors takes the approximation of one matrix, not of a stack")
        return obj.factors
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], BlockLayout):
        return StructuredFactors(obj[0], obj[1])
    if hasattr(obj, "get_params") and hasattr(obj, "fit"):
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(obj)
        if isinstance(getattr(obj, "factors_", None), StructuredFactors):
            return obj.factors_
    raise TypeError(
        "expected StructuredFactors, an Approximation, a fitted blocklowrank estimator or a "
        f"(layout, factors) pair; got {type(obj).__name__}"
    )


def save_factors(path, obj):
    """Save the factors of any fitted object to an ``.npz`` file (see
    :meth:`~blocklowrank.factors.StructuredFactors.save`); returns the path written."""
    return as_factors(obj).save(path)


def _contiguous(sf, what):
    """Refuse layouts whose blocks are not contiguous in the original coordinates."""
    if sf.layout.permuted:
        raise ValueError(
            f"{what} holds contiguous blocks, but this layout permutes rows or columns; convert "
            "the dense update (to_dense) instead, or fit without a permutation"
        )


def to_dense(obj, dtype=None):
    """The dense update ``Delta W`` (``m x n``) of any fitted structure.

    Examples
    --------
    >>> from blocklowrank import approximate
    >>> X = np.random.default_rng(0).standard_normal((8, 6))
    >>> a = approximate(X, method="block", n_blocks=2, rank=1)
    >>> bool(np.allclose(to_dense(a), a.reconstruction))
    True
    """
    return as_factors(obj).to_dense(dtype)


@validate_params("rank", "cap_rank")
def refit_global(obj, rank, *, cap_rank=False):
    """Best global LoRA of rank ``rank`` for the assembled update (truncated SVD).

    Returns the :class:`~blocklowrank.Approximation` of ``to_dense(obj)`` by
    the global structure; its ``error`` is relative to the assembled update,
    so it tells how much a structured update loses when forced to global
    low rank.
    """
    D = to_dense(obj)
    return fit_layout(D, BlockLayout.global_(D.shape), rank=rank, svd_solver="full", cap_rank=cap_rank)


@validate_params("rtol")
def rank_report(obj, *, rtol=None):
    """Nominal ranks next to the numerical rank of the assembled update.

    Block structures reach a higher total rank than their per-block ranks:
    a K x K grid of rank-``r`` blocks can have rank up to ``min(m, n, K^2
    r)``, not ``r``.

    Parameters
    ----------
    obj : fitted structure (see :func:`as_factors`)
    rtol : float, optional
        Singular values below ``rtol * sigma_max`` count as zero; default
        ``max(m, n) * eps`` of the factors' dtype (as
        :func:`numpy.linalg.matrix_rank`).

    Returns
    -------
    dict
        ``kind``, ``shape``, ``n_blocks``, ``nominal_ranks`` (per block,
        nested lists), ``global_rank``, ``total_nominal_rank`` (sum of the
        per-block ranks plus the global rank, the bound on the rank by
        subadditivity),
        ``rank_bound`` (the largest rank the structure can reach: the total
        capped per block-row, per block-column and by ``min(m, n)``; for a
        shared basis ``r`` per block-row/column), ``numerical_rank`` of the
        dense update, ``n_params``.

    Examples
    --------
    >>> from blocklowrank import approximate
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> rep = rank_report(approximate(X, method="block", n_blocks=2, rank=2))
    >>> rep["nominal_ranks"], rep["total_nominal_rank"], rep["numerical_rank"]
    ([[2, 2], [2, 2]], 8, 8)
    """
    sf = as_factors(obj)
    lay = sf.layout
    m, n = lay.shape
    D = sf.to_dense(np.float64)
    s = np.linalg.svd(D, compute_uv=False)
    eps = np.finfo(sf.dtype).eps
    tol = (max(m, n) * eps if rtol is None else float(rtol)) * (s[0] if s.size else 0.0)
    num = int(np.sum(s > tol)) if s.size and s[0] > 0 else 0
    ranks = lay.ranks
    rg = sf.global_rank
    total = int(ranks.sum()) + rg
    if sf.shared is not None:
        r = sf.shared[2].shape[-1]
        row_bound = sum(min(mi, r) for mi in lay.row_sizes)
        col_bound = sum(min(nj, r) for nj in lay.col_sizes)
    else:
        row_bound = sum(min(mi, int(ranks[i].sum())) for i, mi in enumerate(lay.row_sizes))
        col_bound = sum(min(nj, int(ranks[:, j].sum())) for j, nj in enumerate(lay.col_sizes))
    bound = int(min(m, n, row_bound + rg, col_bound + rg, total))
    return {
        "kind": sf.kind,
        "shape": [m, n],
        "n_blocks": list(lay.n_blocks),
        "nominal_ranks": ranks.tolist(),
        "global_rank": rg,
        "total_nominal_rank": total,
        "rank_bound": bound,
        "numerical_rank": num,
        "n_params": sf.n_params,
    }


# ---------------------------------------------------------------------------- GraLoRA
def _gralora_grid(sf):
    lay = sf.layout
    kr, kc = lay.n_blocks
    if kr != kc or not lay.active.all():
        raise ValueError(f"GraLoRA needs a full K x K grid; this layout is {lay.pattern} {kr}x{kc}")
    if len(set(lay.row_sizes)) != 1 or len(set(lay.col_sizes)) != 1:
        raise ValueError(
            "GraLoRA needs equal blocks (out_features and in_features divisible by K); "
            f"got row sizes {lay.row_sizes} and column sizes {lay.col_sizes}"
        )
    r = lay.uniform_rank
    if r is None:
        raise ValueError("GraLoRA needs the same rank on every block; got " + str(lay.ranks.tolist()))
    return kr, r


@validate_params("scaling")
def to_gralora(obj, *, scaling=1.0):
    """Tensors of a PEFT GraLoRA adapter whose update equals our block structure.

    A Localized LoRA layout (a full ``K x K`` grid of equal blocks, rank
    ``r_block`` each) is a GraLoRA adapter with ``gralora_k = K`` and
    ``r = K * r_block``; a hybrid (global rank ``r_g`` added) is Hybrid
    GraLoRA with ``hybrid_r = r_g``.

    Layout (checked against PEFT 0.21.2, ``peft/tuners/gralora/layer.py``;
    the test suite assembles ``Delta W`` with a NumPy transcription of that
    file's ``forward`` and ``get_delta_weight``): with ``N = gralora_k``,
    ``s = r / N`` and ``fan_in_fan_out=False`` (``nn.Linear``),

    - ``gralora_A`` has shape ``[N, in_features // N, r]``;
    - ``gralora_B`` has shape ``[N, r, out_features // N]``;
    - the forward pass is ``x.view(..., N, in/N)`` contracted with
      ``gralora_A`` to ``[..., N(in block n), r]``, viewed as
      ``[..., N(n), N(j), s]``, permuted to ``[..., j, n, s]``, reshaped to
      ``[..., N(j), N*s]`` and contracted with ``gralora_B`` (``j`` is the
      output block); plus ``gralora_B_general(gralora_A_general(x))`` when
      ``hybrid_r > 0``; everything times ``scaling = alpha / (r + hybrid_r)``.

    Hence block ``(j, n)`` of ``Delta W`` (output block ``j``, input block
    ``n``, PyTorch shape ``(out, in)``) is

    ``Delta W_jn = scaling * gralora_B[j, n*s:(n+1)*s, :].T @ gralora_A[n, :, j*s:(j+1)*s].T``

    i.e. our ``B_jn = gralora_B[j, n*s:(n+1)*s, :].T`` (``out/N x s``) and
    ``A_jn = gralora_A[n, :, j*s:(j+1)*s].T`` (``s x in/N``), and
    ``Delta W += scaling * B_general.weight @ A_general.weight`` for the
    hybrid part. For a ``Conv1D`` base layer (``fan_in_fan_out=True``) PEFT
    transposes the delta: pass ``obj`` fitted to ``W.T``.

    Parameters
    ----------
    obj : fitted structure (see :func:`as_factors`)
        Full K x K grid with equal blocks and one rank, optionally with a
        global term.
    scaling : float, default=1.0
        PEFT's ``alpha / (r + hybrid_r)``; the ``B`` tensors are divided by
        it so that PEFT's scaled update equals ours.

    Returns
    -------
    dict
        ``gralora_A``, ``gralora_B``, ``gralora_A_general`` (``[hybrid_r,
        in]``, the ``weight`` of PEFT's ``nn.Linear``) and
        ``gralora_B_general`` (``[out, hybrid_r]``) when ``hybrid_r > 0``,
        and the config values ``r``, ``gralora_k``, ``hybrid_r``.

    Examples
    --------
    >>> from blocklowrank import approximate
    >>> X = np.random.default_rng(0).standard_normal((8, 6))
    >>> a = approximate(X, method="block", n_blocks=2, rank=1)
    >>> t = to_gralora(a)
    >>> t["gralora_A"].shape, t["gralora_B"].shape, t["r"], t["gralora_k"]
    ((2, 3, 2), (2, 2, 4), 2, 2)
    >>> bool(np.allclose(gralora_delta_weight(t["gralora_A"], t["gralora_B"]), a.reconstruction))
    True
    """
    sf = as_factors(obj)  # a shared basis converts through its per-block factors
    _contiguous(sf, "GraLoRA")
    K, rb = _gralora_grid(sf)
    lay = sf.layout
    mb, nb = lay.row_sizes[0], lay.col_sizes[0]
    dtype = sf.dtype
    Bs = np.empty((K, K, mb, rb), dtype=dtype)  # [j (out), n (in), out/K, s]
    As = np.empty((K, K, rb, nb), dtype=dtype)  # [j, n, s, in/K]
    for (j, n_), (B, A) in sf.factors.items():
        Bs[j, n_] = B
        As[j, n_] = A
    # gralora_A[n, c, j*s + t] = A_jn[t, c]; gralora_B[j, n*s + t, o] = B_jn[o, t]
    gA = np.ascontiguousarray(As.transpose(1, 3, 0, 2).reshape(K, nb, K * rb))
    gB = np.ascontiguousarray((Bs / scaling).transpose(0, 1, 3, 2).reshape(K, K * rb, mb))
    out = {"gralora_A": gA, "gralora_B": gB, "r": K * rb, "gralora_k": K, "hybrid_r": sf.global_rank}
    if sf.global_rank:
        Bg, Ag = sf.global_factors
        out["gralora_A_general"] = np.ascontiguousarray(Ag)
        out["gralora_B_general"] = np.ascontiguousarray(np.asarray(Bg) / scaling).astype(dtype)
    return out


@validate_params("scaling")
def from_gralora(gralora_A, gralora_B, *, gralora_A_general=None, gralora_B_general=None, scaling=1.0):
    """Our factors from PEFT GraLoRA tensors (inverse of :func:`to_gralora`).

    Parameters
    ----------
    gralora_A : array-like of shape (N, in_features // N, r)
    gralora_B : array-like of shape (N, r, out_features // N)
    gralora_A_general : array-like of shape (hybrid_r, in_features), optional
    gralora_B_general : array-like of shape (out_features, hybrid_r), optional
        The ``weight`` of PEFT's hybrid ``nn.Linear`` layers.
    scaling : float, default=1.0
        PEFT's ``alpha / (r + hybrid_r)``, folded into the ``B`` factors.

    Returns
    -------
    StructuredFactors
        A full ``N x N`` layout of shape ``(out_features, in_features)`` with
        rank ``r / N`` per block (plus the global term).
    """
    gA = np.asarray(gralora_A)
    gB = np.asarray(gralora_B)
    if gA.ndim != 3 or gB.ndim != 3:
        raise ValueError(f"gralora_A and gralora_B must be 3-D, got {gA.shape} and {gB.shape}")
    K, nb, r = gA.shape
    if gB.shape[0] != K or gB.shape[1] != r:
        raise ValueError(f"gralora_B must have shape [N={K}, r={r}, out/N], got {gB.shape} (gralora_A is {gA.shape})")
    if r % K:
        raise ValueError(f"r={r} must be divisible by gralora_k={K}")
    mb = gB.shape[2]
    rb = r // K
    dtype = np.result_type(gA.dtype, gB.dtype, np.float32)
    As = gA.reshape(K, nb, K, rb).transpose(2, 0, 3, 1)  # [j, n, s, in/K]
    Bs = (gB * scaling).reshape(K, K, rb, mb).transpose(0, 1, 3, 2)  # [j, n, out/K, s]
    lay = BlockLayout.block((K * mb, K * nb), K, rank=rb)
    factors = {
        (j, n_): (np.ascontiguousarray(Bs[j, n_], dtype=dtype), np.ascontiguousarray(As[j, n_], dtype=dtype))
        for j in range(K)
        for n_ in range(K)
    }
    gf = None
    if (gralora_A_general is None) != (gralora_B_general is None):
        raise ValueError("give both gralora_A_general and gralora_B_general, or neither")
    if gralora_A_general is not None:
        Ag = np.asarray(gralora_A_general)
        Bg = np.asarray(gralora_B_general)
        if Ag.ndim != 2 or Bg.ndim != 2 or Ag.shape[1] != K * nb or Bg.shape[0] != K * mb or Ag.shape[0] != Bg.shape[1]:
            raise ValueError(
                f"hybrid weights must be [hybrid_r, {K * nb}] and [{K * mb}, hybrid_r], got {Ag.shape} and {Bg.shape}"
            )
        gf = (np.ascontiguousarray(Bg * scaling, dtype=dtype), np.ascontiguousarray(Ag, dtype=dtype))
    return StructuredFactors(lay, factors, global_factors=gf)


@validate_params("scaling")
def gralora_delta_weight(gralora_A, gralora_B, *, gralora_A_general=None, gralora_B_general=None, scaling=1.0):
    """``Delta W`` (``out x in``) of PEFT GraLoRA tensors, assembled through our factors."""
    return from_gralora(
        gralora_A, gralora_B, gralora_A_general=gralora_A_general, gralora_B_general=gralora_B_general, scaling=scaling
    ).to_dense()


# ---------------------------------------------------------------------------- MELoRA
def to_melora(obj):
    """MELoRA's list form: ``[(B_i, A_i), ...]``, one pair per diagonal block.

    ``Delta W = blockdiag(B_1 A_1, ..., B_N A_N)`` with ``B_i`` of shape
    ``(m_i, r_i)`` and ``A_i`` of shape ``(r_i, n_i)``. Needs a layout whose
    active blocks are exactly the diagonal of a square grid.
    """
    sf = as_factors(obj)
    _contiguous(sf, "MELoRA")
    lay = sf.layout
    kr, kc = lay.n_blocks
    if kr != kc or not np.array_equal(lay.active, np.eye(kr, dtype=bool)) or sf.global_rank:
        raise ValueError(
            f"MELoRA's form needs a diagonal layout without a global term; got {lay.pattern} "
            f"{kr}x{kc}" + (f" with global rank {sf.global_rank}" if sf.global_rank else "")
        )
    return [tuple(np.array(f) for f in sf.factors[(i, i)]) for i in range(kr)]


def from_melora(pairs):
    """Our factors from MELoRA's list of ``(B_i, A_i)`` (inverse of :func:`to_melora`).

    Block sizes and ranks are read from the shapes (``B_i`` is ``m_i x r_i``,
    ``A_i`` is ``r_i x n_i``).
    """
    pairs = [(np.asarray(B), np.asarray(A)) for B, A in pairs]
    if not pairs:
        raise ValueError("MELoRA needs at least one (B, A) pair")
    for t, (B, A) in enumerate(pairs):
        if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"pair {t}: B must be (m_i, r) and A (r, n_i), got {B.shape}, {A.shape}")
    rs = [B.shape[0] for B, _ in pairs]
    cs = [A.shape[1] for _, A in pairs]
    N = len(pairs)
    ranks = np.diag([B.shape[1] for B, _ in pairs]).astype(np.int64)
    lay = BlockLayout((sum(rs), sum(cs)), tuple(rs), tuple(cs), np.eye(N, dtype=bool), ranks)
    return StructuredFactors(lay, {(i, i): pairs[i] for i in range(N)})

"""Conversions between structured factors and the layouts other tools use; saving/loading.

Every fitted object of the library (an :class:`~blocklowrank.Approximation`,
a fitted estimator, a :class:`~blocklowrank.hybrid.HybridFit`, a
:class:`~blocklowrank.shared_basis.SharedBasisFit`) converts to one small
container, :class:`StructuredFactors` (:func:`as_factors`), and from there to

- GraLoRA's tensors as PEFT stores them (:func:`to_gralora` /
  :func:`from_gralora`, :func:`gralora_delta_weight`);
- MELoRA's list of per-block pairs (:func:`to_melora` / :func:`from_melora`);
- a dense update (:func:`to_dense`) and its refit as a global LoRA of rank r
  (:func:`refit_global`);
- a rank report (:func:`rank_report`): nominal ranks against the numerical
  rank of the assembled update;
- an ``.npz`` file (:func:`save_factors` / :func:`load_factors`), no pickle.

Weight convention. Our matrices are ``W`` of shape ``(m, n)``; for a
PyTorch ``nn.Linear`` layer that is ``(out_features, in_features)``: rows
are outputs, columns inputs, and ``y = x @ W.T``. Block ``(i, j)`` maps
input block ``j`` to output block ``i``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from ._engine import Approximation, approximate
from ._factors import assemble_block_factors
from .layout import BlockLayout

__all__ = [
    "StructuredFactors",
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
    "load_factors",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IncompatibleFactorsFile",
]

#: Value of the ``format`` field of files written by :func:`save_factors`.
FORMAT_NAME = "blocklowrank-factors"
#: Version of the file layout; bumped on any incompatible change of the keys.
FORMAT_VERSION = 1

KINDS = ("blocks", "hybrid", "shared_basis")


class IncompatibleFactorsFile(ValueError):
    """A factors file that this version of blocklowrank cannot read."""


# ---------------------------------------------------------------------------- container
@dataclass(eq=False)
class StructuredFactors:
    """Factors of a structured low-rank matrix, independent of how they were fitted.

    Attributes
    ----------
    layout : BlockLayout
        Cuts, active blocks and per-block ranks.
    factors : dict
        ``{(i, j): (B_ij, A_ij)}`` with ``B_ij`` of shape ``(m_i, r_ij)`` and
        ``A_ij`` of shape ``(r_ij, n_j)``, for every active block.
    global_factors : (ndarray, ndarray) or None
        ``(B_g, A_g)`` of a global term (hybrid structures).
    shared : (list, list, ndarray) or None
        ``(U, V, S)`` of a shared-basis structure; ``factors`` then holds
        ``B_ij = U_i diag(s_ij)``, ``A_ij = V_j^T``.
    meta : dict
        Free JSON-serialisable information (error, estimator, ...).
    """

    layout: BlockLayout
    factors: dict
    global_factors: tuple = None
    shared: tuple = None
    meta: dict = field(default_factory=dict)

    @property
    def kind(self):
        """"shared_basis", "hybrid" or "blocks"."""
        if self.shared is not None:
            return "shared_basis"
        if self.global_factors is not None and self.global_rank > 0:
            return "hybrid"
        return "blocks"

    @property
    def shape(self):
        return self.layout.shape

    @property
    def global_rank(self):
        return 0 if self.global_factors is None else int(self.global_factors[0].shape[1])

    @property
    def n_params(self):
        """Exact parameter count of the structure."""
        m, n = self.layout.shape
        if self.shared is not None:
            U, V, S = self.shared
            r = S.shape[-1]
            return int(r * (m + n) + S.shape[0] * S.shape[1] * r)
        return int(self.layout.n_params + self.global_rank * (m + n))

    @property
    def dtype(self):
        for B, _ in self.factors.values():
            return B.dtype
        return self.global_factors[0].dtype

    def to_dense(self, dtype=None):
        """The dense ``m x n`` matrix (``Delta W``)."""
        out = assemble_block_factors(self.layout, self.factors, np.float64)
        if self.global_rank:
            Bg, Ag = self.global_factors
            out += np.asarray(Bg, np.float64) @ np.asarray(Ag, np.float64)
        return out.astype(self.dtype if dtype is None else dtype, copy=False)

    def __repr__(self):
        g = f", global_rank={self.global_rank}" if self.global_rank else ""
        return f"StructuredFactors({self.kind}: {self.layout.describe()}{g}, n_params={self.n_params})"


def _factors_dict(layout, factors):
    out = {}
    for i, j in zip(*np.nonzero(layout.active)):
        key = (int(i), int(j))
        if key not in factors:
            raise ValueError(f"factors are missing active block {key}")
        B, A = factors[key]
        B, A = np.asarray(B), np.asarray(A)
        mi, nj = layout.block_shape(*key)
        r = int(layout.ranks[key])
        if B.shape != (mi, r) or A.shape != (r, nj):
            raise ValueError(
                f"block {key}: expected B of shape {(mi, r)} and A of shape {(r, nj)}, "
                f"got {B.shape} and {A.shape}"
            )
        out[key] = (B, A)
    return out


def as_factors(obj):
    """Convert any fitted object of the library to :class:`StructuredFactors`.

    Accepts a :class:`StructuredFactors`, an :class:`~blocklowrank.Approximation`
    (single matrix), a fitted estimator (``GlobalLowRank``,
    ``DiagonalBlockLowRank``, ``BlockLowRank``, ``HybridLowRank``,
    ``SharedBasisLowRank``), a ``HybridFit``, a ``SharedBasisFit`` or a
    ``(layout, {(i, j): (B, A)})`` pair.
    """
    from .hybrid import HybridFit
    from .shared_basis import SharedBasisFit

    if isinstance(obj, StructuredFactors):
        return obj
    if isinstance(obj, Approximation):
        if obj.batch_shape:
            raise ValueError("as_factors takes the approximation of one matrix, not of a stack")
        return StructuredFactors(obj.layout, obj.factors, meta={"error": float(obj.error)})
    if isinstance(obj, HybridFit):
        return StructuredFactors(
            obj.layout, obj.factors, global_factors=obj.global_factors, meta={"error": obj.error}
        )
    if isinstance(obj, SharedBasisFit):
        return StructuredFactors(
            obj.layout, obj.factors, shared=(obj.U, obj.V, obj.S), meta={"error": obj.error}
        )
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], BlockLayout):
        return StructuredFactors(obj[0], _factors_dict(obj[0], obj[1]))
    if hasattr(obj, "get_params") and hasattr(obj, "fit"):
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(obj)
        res = getattr(obj, "_result", None)
        if isinstance(res, (HybridFit, SharedBasisFit)):
            sf = as_factors(res)
        elif hasattr(obj, "layout_") and hasattr(obj, "factors_"):
            sf = StructuredFactors(obj.layout_, obj.factors_, meta={"error": float(obj.error_)})
        else:
            raise TypeError(f"cannot read factors from {type(obj).__name__}")
        sf.meta = {**sf.meta, "estimator": type(obj).__name__}
        return sf
    raise TypeError(
        "expected StructuredFactors, an Approximation, a fitted blocklowrank estimator, a "
        f"HybridFit/SharedBasisFit or a (layout, factors) pair; got {type(obj).__name__}"
    )


def to_dense(obj, dtype=None):
    """The dense update ``Delta W`` (``m x n``) of any fitted structure.

    Examples
    --------
    >>> import numpy as np
    >>> from blocklowrank import approximate
    >>> X = np.random.default_rng(0).standard_normal((8, 6))
    >>> a = approximate(X, method="block", n_blocks=2, rank=1)
    >>> bool(np.allclose(to_dense(a), a.reconstruction))
    True
    """
    return as_factors(obj).to_dense(dtype)


def refit_global(obj, rank, *, cap_rank=False):
    """Best global LoRA of rank ``rank`` for the assembled update (truncated SVD).

    Returns the :class:`~blocklowrank.Approximation` of ``to_dense(obj)`` by
    the global structure; its ``error`` is relative to the assembled update,
    so it tells how much a structured update loses when forced to global
    low rank.
    """
    return approximate(
        to_dense(obj), method="global", rank=rank, svd_solver="full", cap_rank=cap_rank
    )


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
    >>> import numpy as np
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
    eps = np.finfo(sf.dtype).eps if np.issubdtype(sf.dtype, np.floating) else np.finfo(float).eps
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
        raise ValueError(
            f"GraLoRA needs a full K x K grid; this layout is {lay.pattern} {kr}x{kc}"
        )
    if len(set(lay.row_sizes)) != 1 or len(set(lay.col_sizes)) != 1:
        raise ValueError(
            "GraLoRA needs equal blocks (out_features and in_features divisible by K); "
            f"got row sizes {lay.row_sizes} and column sizes {lay.col_sizes}"
        )
    r = lay.uniform_rank
    if r is None:
        raise ValueError("GraLoRA needs the same rank on every block; got " + str(lay.ranks.tolist()))
    return kr, r


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
    >>> import numpy as np
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
    K, rb = _gralora_grid(sf)
    scaling = float(scaling)
    if scaling == 0:
        raise ValueError("scaling must be non-zero")
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
        raise ValueError(
            f"gralora_B must have shape [N={K}, r={r}, out/N], got {gB.shape} "
            f"(gralora_A is {gA.shape})"
        )
    if r % K:
        raise ValueError(f"r={r} must be divisible by gralora_k={K}")
    mb = gB.shape[2]
    rb = r // K
    scaling = float(scaling)
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
        if Ag.shape[1] != K * nb or Bg.shape[0] != K * mb or Ag.shape[0] != Bg.shape[1]:
            raise ValueError(
                f"hybrid weights must be [hybrid_r, {K * nb}] and [{K * mb}, hybrid_r], "
                f"got {Ag.shape} and {Bg.shape}"
            )
        gf = (np.ascontiguousarray(Bg * scaling, dtype=dtype), np.ascontiguousarray(Ag, dtype=dtype))
    return StructuredFactors(lay, factors, global_factors=gf)


def gralora_delta_weight(gralora_A, gralora_B, *, gralora_A_general=None, gralora_B_general=None, scaling=1.0):
    """``Delta W`` (``out x in``) of PEFT GraLoRA tensors, assembled through our factors."""
    return from_gralora(
        gralora_A,
        gralora_B,
        gralora_A_general=gralora_A_general,
        gralora_B_general=gralora_B_general,
        scaling=scaling,
    ).to_dense()


# ---------------------------------------------------------------------------- MELoRA
def to_melora(obj):
    """MELoRA's list form: ``[(B_i, A_i), ...]``, one pair per diagonal block.

    ``Delta W = blockdiag(B_1 A_1, ..., B_N A_N)`` with ``B_i`` of shape
    ``(m_i, r_i)`` and ``A_i`` of shape ``(r_i, n_i)``. Needs a layout whose
    active blocks are exactly the diagonal of a square grid.
    """
    sf = as_factors(obj)
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


# ---------------------------------------------------------------------------- files
def _library_version():
    from . import __version__

    return __version__


def _major(version):
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def save_factors(path, obj):
    """Save fitted factors to an ``.npz`` file (no pickle).

    The file holds the layout (JSON of :meth:`BlockLayout.to_dict`), the
    kind of structure, the library version, a format name and version, the
    factor arrays and a JSON ``meta`` (error, estimator name). Keys:
    ``B_i_j``/``A_i_j`` per active block (kinds "blocks" and "hybrid"),
    ``global_B``/``global_A`` (hybrid), ``U_i``, ``V_j``, ``S`` (shared
    basis).

    Parameters
    ----------
    path : str or path-like or file
        NumPy appends ``.npz`` to a name without it.
    obj : fitted structure (see :func:`as_factors`)
    """
    sf = as_factors(obj)
    arrays = {
        "format": np.array(FORMAT_NAME),
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "library_version": np.array(_library_version()),
        "kind": np.array(sf.kind),
        "layout": np.array(json.dumps(sf.layout.to_dict())),
        "meta": np.array(json.dumps(sf.meta, default=float)),
    }
    if sf.shared is not None:
        U, V, S = sf.shared
        for i, Ui in enumerate(U):
            arrays[f"U_{i}"] = np.asarray(Ui)
        for j, Vj in enumerate(V):
            arrays[f"V_{j}"] = np.asarray(Vj)
        arrays["S"] = np.asarray(S)
    else:
        for (i, j), (B, A) in sf.factors.items():
            arrays[f"B_{i}_{j}"] = np.asarray(B)
            arrays[f"A_{i}_{j}"] = np.asarray(A)
        if sf.global_rank:
            arrays["global_B"] = np.asarray(sf.global_factors[0])
            arrays["global_A"] = np.asarray(sf.global_factors[1])
    np.savez(path, **arrays)


def load_factors(path):
    """Load factors saved by :func:`save_factors`.

    Raises
    ------
    IncompatibleFactorsFile
        (a ValueError) if the file is not a blocklowrank factors file, was
        written with another format version, or by a library of another
        major version.

    Returns
    -------
    StructuredFactors
        ``meta`` gains ``library_version`` (of the writer).
    """
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        if "format" not in keys or str(z["format"]) != FORMAT_NAME:
            raise IncompatibleFactorsFile(
                f"{path!s} is not a blocklowrank factors file (no format field "
                f"'{FORMAT_NAME}'); write one with blocklowrank.convert.save_factors"
            )
        missing = {"format_version", "library_version", "kind", "layout", "meta"} - keys
        if missing:
            raise IncompatibleFactorsFile(
                f"{path!s} is a damaged blocklowrank factors file: missing {sorted(missing)}"
            )
        fv = int(z["format_version"])
        wrote = str(z["library_version"])
        ours = _library_version()
        if fv != FORMAT_VERSION:
            raise IncompatibleFactorsFile(
                f"{path!s} uses factors format version {fv} (written by blocklowrank {wrote}); "
                f"this blocklowrank {ours} reads format version {FORMAT_VERSION} only"
            )
        if _major(wrote) != _major(ours):
            raise IncompatibleFactorsFile(
                f"{path!s} was written by blocklowrank {wrote}, whose major version differs "
                f"from this blocklowrank {ours}; load it with a {_major(wrote)}.x release"
            )
        kind = str(z["kind"])
        if kind not in KINDS:
            raise IncompatibleFactorsFile(f"{path!s}: unknown kind of structure {kind!r}")
        lay = BlockLayout.from_dict(json.loads(str(z["layout"])))
        meta = json.loads(str(z["meta"]))
        meta["library_version"] = wrote
        if kind == "shared_basis":
            kr, kc = lay.n_blocks
            U = [z[f"U_{i}"] for i in range(kr)]
            V = [z[f"V_{j}"] for j in range(kc)]
            S = z["S"]
            factors = {
                (i, j): (U[i] * S[i, j][None, :], np.ascontiguousarray(V[j].T))
                for i in range(kr)
                for j in range(kc)
            }
            return StructuredFactors(lay, factors, shared=(U, V, S), meta=meta)
        factors = {}
        for i, j in zip(*np.nonzero(lay.active)):
            factors[(int(i), int(j))] = (z[f"B_{i}_{j}"], z[f"A_{i}_{j}"])
        factors = _factors_dict(lay, factors)
        gf = (z["global_B"], z["global_A"]) if kind == "hybrid" else None
        return StructuredFactors(lay, factors, global_factors=gf, meta=meta)

"""Row and column orderings for block layouts.

A layout may cut ``X[row_perm][:, col_perm]`` instead of ``X``
(:meth:`BlockLayout.with_permutation`); the estimators take ``row_perm`` and
``col_perm`` and apply them transparently in fit, transform and reconstruct.

- :func:`strided_permutation`: index ``t`` goes to group ``t mod K`` -- the
  strided grouping of Monarch matrices (Dao et al., ICML 2022).
- :func:`image_patch_permutation`: the pixels of a flattened ``h x w`` image
  grouped into 2-D tiles instead of row stripes.
- :func:`cluster_permutation`: a cheap data-driven ordering (k-means on the
  rows' or columns' leading singular coordinates) that tries to gather
  energy into blocks.
"""

from __future__ import annotations

import numpy as np

from ._params import PARAMS, validate_params
from ._validation import validate_matrix
from .layout import split_sizes

__all__ = [
    "strided_permutation",
    "image_patch_permutation",
    "cluster_permutation",
    "cocluster_permutations",
    "resolve_permutation",
]


@validate_params("length", "n_groups")
def strided_permutation(length, n_groups):
    """Order ``0..length-1`` by residue modulo ``n_groups`` (Monarch-style blocks).

    With ``length`` divisible by ``n_groups`` the first block holds indices
    ``0, K, 2K, ...``, the second ``1, K+1, ...`` and so on.

    Examples
    --------
    >>> strided_permutation(8, 4).tolist()
    [0, 4, 1, 5, 2, 6, 3, 7]
    """
    return np.argsort(np.arange(length) % n_groups, kind="stable")


@validate_params("height", "width", "tile")
def image_patch_permutation(height, width, tile):
    """Order the pixels of a flattened ``height x width`` image tile by tile.

    Parameters
    ----------
    height, width : int
        Image size; pixel ``(y, x)`` has flat index ``y * width + x``.
    tile : int or (int, int)
        Tile height and width. Tiles at the right/bottom edge are smaller
        when the sizes do not divide.

    Returns
    -------
    perm : ndarray of int, shape (height * width,)
        Tiles in row-major order, pixels row-major inside each tile. With
        ``col_sizes`` equal to the tile areas (or ``np.array_split`` cuts
        when all tiles have equal area), each block-column is one tile.

    Examples
    --------
    >>> image_patch_permutation(4, 4, 2).tolist()
    [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    """
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    yy, xx = np.divmod(np.arange(height * width), width)
    tile_id = (yy // th) * (-(-width // tw)) + (xx // tw)
    within = (yy % th) * tw + (xx % tw)
    return np.lexsort((within, tile_id))


@validate_params("n_groups", "axis", "n_components", "random_state")
def cluster_permutation(X, n_groups, *, axis=0, n_components=None, random_state=0):
    """Data-driven ordering: group similar rows (axis=0) or columns (axis=1).

    Rows are embedded by their leading singular coordinates (``U_k S_k``),
    clustered with k-means into ``n_groups`` clusters of free sizes, then
    ordered cluster by cluster (largest first). Cutting the ordered matrix
    with ``np.array_split`` puts similar rows in the same block-row, which
    can concentrate energy into blocks. Cheap: one truncated SVD and a
    k-means with a few restarts.

    Parameters
    ----------
    X : array-like of shape (m, n)
    n_groups : int
    axis : {0, 1}
    n_components : int, optional
        Embedding dimension, default ``min(8, min(m, n))``.
    random_state : int or None

    Returns
    -------
    perm : ndarray of int
    """
    from sklearn.cluster import KMeans

    X = validate_matrix(X, min_ndim=2, max_ndim=2)
    M = X if axis == 0 else X.T
    if n_groups > M.shape[0]:
        split_sizes(M.shape[0], n_groups)  # raises the usual message
    if n_groups == 1:
        return np.arange(M.shape[0])
    k = min(8, min(M.shape)) if n_components is None else n_components
    U, s, _ = np.linalg.svd(M.astype(np.float64), full_matrices=False)
    emb = U[:, :k] * s[:k]
    labels = KMeans(n_clusters=n_groups, n_init=4, random_state=random_state).fit_predict(emb)
    sizes = np.bincount(labels, minlength=n_groups)
    rank_of = np.empty(n_groups, dtype=int)
    rank_of[np.argsort(-sizes, kind="stable")] = np.arange(n_groups)
    return np.argsort(rank_of[labels], kind="stable")


@validate_params("random_state", n_groups="n_blocks")
def cocluster_permutations(X, n_groups, *, random_state=0):
    """Row and column orderings whose clusters line up along the diagonal.

    Rows and columns are clustered separately (:func:`cluster_permutation`);
    column clusters are then matched to row clusters so that the energy on
    the diagonal blocks is largest (Hungarian assignment,
    :func:`scipy.optimize.linear_sum_assignment`). This is the ordering that
    suits the diagonal (MELoRA) structure, whose off-diagonal blocks are zero.

    Returns
    -------
    row_perm, col_perm : ndarray of int
    """
    from scipy.optimize import linear_sum_assignment

    X = validate_matrix(X, min_ndim=2, max_ndim=2)
    kr, kc = (n_groups, n_groups) if isinstance(n_groups, int) else n_groups
    rp = cluster_permutation(X, kr, axis=0, random_state=random_state)
    cp = cluster_permutation(X, kc, axis=1, random_state=random_state)
    if kr != kc:
        return rp, cp
    rs, cs = split_sizes(X.shape[0], kr), split_sizes(X.shape[1], kc)
    re, ce = np.cumsum([0, *rs]), np.cumsum([0, *cs])
    Xp = X[rp][:, cp] ** 2
    E = np.array([[Xp[re[a] : re[a + 1], ce[b] : ce[b + 1]].sum() for b in range(kc)] for a in range(kr)])
    _, match = linear_sum_assignment(-E)
    col_groups = [cp[ce[b] : ce[b + 1]] for b in range(kc)]
    if len(set(cs)) == 1:
        cp = np.concatenate([col_groups[b] for b in match])
    return rp, cp


@validate_params("n_groups", "axis", spec=[*PARAMS["row_perm"], None])
def resolve_permutation(spec, X, n_groups, axis, *, other=None, diagonal=False):
    """Turn an estimator's ``row_perm``/``col_perm`` value into an index array or None.

    ``spec`` is None, an array of indices, ``"strided"`` or ``"cluster"``.
    """
    if spec is None:
        return None
    length = X.shape[axis]
    if isinstance(spec, str):  # "strided" or "cluster"
        if spec == "strided":
            return strided_permutation(length, n_groups)
        if diagonal and other == "cluster":
            return cocluster_permutations(X, n_groups)[axis]
        return cluster_permutation(X, n_groups, axis=axis)
    arr = np.asarray(spec)
    if arr.ndim != 1 or arr.shape[0] != length:
        what = "rows" if axis == 0 else "columns"
        raise ValueError(f"a permutation of the {what} needs {length} indices, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) or not np.array_equal(np.sort(arr), np.arange(length)):
        what = "rows" if axis == 0 else "columns"
        raise ValueError(f"a permutation of the {what} must hold each index 0..{length - 1} exactly once")
    return arr

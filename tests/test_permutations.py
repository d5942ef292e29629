"""Permuted layouts: strided (Monarch) grouping, image tiles, data-driven ordering."""

import numpy as np
import pytest

from blocklowrank import BlockLayout, BlockLowRank, DiagonalBlockLowRank, approximate
from blocklowrank.permutations import cluster_permutation, image_patch_permutation, strided_permutation


def _blockwise_svd(Xp, rows, cols, r):
    """Independent reference: loop of np.linalg.svd over the blocks of Xp."""
    out = np.zeros_like(Xp)
    re = np.concatenate([[0], np.cumsum(rows)])
    ce = np.concatenate([[0], np.cumsum(cols)])
    for i in range(len(rows)):
        for j in range(len(cols)):
            B = Xp[re[i] : re[i + 1], ce[j] : ce[j + 1]]
            U, s, Vt = np.linalg.svd(B, full_matrices=False)
            out[re[i] : re[i + 1], ce[j] : ce[j + 1]] = (U[:, :r] * s[:r]) @ Vt[:r]
    return out


def test_strided_permutation_is_monarch_grouping():
    """Strided grouping: block-column j holds the original columns t with t mod K == j."""
    p = strided_permutation(12, 3)
    assert sorted(p.tolist()) == list(range(12))
    groups = np.array_split(p, 3)
    for j, g in enumerate(groups):
        assert set(g.tolist()) == {t for t in range(12) if t % 3 == j}


def test_strided_layout_recovers_strided_planted_structure():
    """A matrix that is block-low-rank after a strided permutation is recovered exactly
    by the strided layout and not by the natural one."""
    rng = np.random.default_rng(0)
    m, n, K, r = 24, 24, 3, 1
    Xp = np.zeros((m, n))
    for i in range(K):
        for j in range(K):
            Xp[8 * i : 8 * i + 8, 8 * j : 8 * j + 8] = np.outer(rng.standard_normal(8), rng.standard_normal(8))
    rp, cp = strided_permutation(m, K), strided_permutation(n, K)
    X = np.empty_like(Xp)
    X[np.ix_(rp, cp)] = Xp  # so that X[rp][:, cp] == Xp
    assert np.allclose(X[rp][:, cp], Xp)
    est = BlockLowRank(n_blocks=K, rank=r, row_perm="strided", col_perm="strided").fit(X)
    assert est.error_ < 1e-12
    assert np.allclose(est.reconstruct(), X)
    plain = BlockLowRank(n_blocks=K, rank=r).fit(X)
    assert plain.error_ > 0.1


def test_image_patches_group_tiles():
    """Image patches: each block-column of the permuted layout is one 2-D tile of the image."""
    h = w = 4
    p = image_patch_permutation(h, w, 2)
    tiles = np.array_split(p, 4)
    for t, tile in enumerate(tiles):
        ys, xs = np.divmod(tile, w)
        assert np.ptp(ys) == 1 and np.ptp(xs) == 1  # a 2x2 square
        assert (ys.min() // 2, xs.min() // 2) == divmod(t, 2)


def test_image_patch_layout_on_images():
    """Columns of flattened 8x8 images grouped into 4x4 tiles: the fit equals an
    independent per-block SVD of the permuted matrix, and reconstruct puts it back."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((20, 64))
    cp = image_patch_permutation(8, 8, 4)
    est = BlockLowRank(n_blocks=(2, 4), rank=2, col_perm=cp).fit(X)
    ref = _blockwise_svd(X[:, cp], [10, 10], [16] * 4, 2)
    back = np.empty_like(ref)
    back[:, cp] = ref
    assert np.allclose(est.reconstruct(), back)
    assert np.allclose(est.inverse_transform(est.transform(X)), back)
    assert np.allclose(est.inverse_transform(est.fit_transform(X)), back)


@pytest.mark.parametrize("Est", [BlockLowRank, DiagonalBlockLowRank])
def test_permuted_transform_roundtrip(Est):
    """reconstruct(transform(X)) equals the approximation with row and column permutations."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((17, 13))
    rp, cp = rng.permutation(17), rng.permutation(13)
    est = Est(n_blocks=3, rank=2, row_perm=rp, col_perm=cp).fit(X)
    lay = BlockLayout.from_blocks((17, 13), 3, pattern="full" if Est is BlockLowRank else "diagonal")
    res = approximate(X, lay.with_permutation(rp, cp), rank=2)
    assert np.allclose(est.reconstruct(), res.reconstruction)
    assert np.allclose(est.reconstruct(est.transform(X)), res.reconstruction)
    assert np.isclose(est.error_, np.linalg.norm(X - res.reconstruction) / np.linalg.norm(X))


def test_cluster_permutation_is_a_permutation_and_helps_on_shuffled_blocks():
    """Data-driven ordering on a block-diagonal matrix whose rows/columns were shuffled:
    the clustered order brings back blocks, so the error at equal budget drops."""
    rng = np.random.default_rng(3)
    K, b = 4, 10
    Xc = np.zeros((K * b, K * b))
    for i in range(K):
        Xc[i * b : (i + 1) * b, i * b : (i + 1) * b] = rng.standard_normal((b, b)) + 3
    sr, sc = rng.permutation(K * b), rng.permutation(K * b)
    X = Xc[sr][:, sc]
    rp = cluster_permutation(X, K, axis=0)
    assert sorted(rp.tolist()) == list(range(K * b))
    plain = DiagonalBlockLowRank(n_blocks=K, rank=1).fit(X)
    clus = DiagonalBlockLowRank(n_blocks=K, rank=1, row_perm="cluster", col_perm="cluster").fit(X)
    assert clus.n_params_ == plain.n_params_
    assert clus.error_ < 0.5 * plain.error_
    # the full block structure needs no alignment: independent orderings suffice
    cp = cluster_permutation(X, K, axis=1)
    blk = BlockLowRank(n_blocks=K, rank=1, row_perm=rp, col_perm=cp).fit(X)
    assert blk.error_ < 0.5 * BlockLowRank(n_blocks=K, rank=1).fit(X).error_


def test_bad_permutation():
    X = np.zeros((6, 6))
    with pytest.raises(ValueError, match="permutation"):
        BlockLowRank(n_blocks=2, rank=1, row_perm=[0, 0, 1, 2, 3, 4]).fit(X)
    with pytest.raises(ValueError, match="6 indices"):
        BlockLowRank(n_blocks=2, rank=1, col_perm=[0, 1, 2]).fit(X)

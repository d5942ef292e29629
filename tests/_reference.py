"""Independent reference computations for the property tests.

Nothing here imports blocklowrank: blocks are cut with ``np.array_split``
(or from explicit sizes given by the test) and every block goes through
``np.linalg.svd`` in a plain Python loop.
"""

import itertools

import numpy as np


def cuts(length, k):
    """``np.array_split`` cut points of ``range(length)`` into ``k`` parts, as slices."""
    parts = np.array_split(np.arange(length), k)
    return [slice(int(p[0]), int(p[-1]) + 1) for p in parts]


def cuts_from_sizes(sizes):
    edges = np.concatenate([[0], np.cumsum(sizes)])
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def full_mask(kr, kc):
    return np.ones((kr, kc), dtype=bool)


def diag_mask(k):
    return np.eye(k, dtype=bool)


def block_svd_loop(X, rcuts, ccuts, active, ranks):
    """Plain-loop structured approximation of one matrix.

    Returns ``(X_hat, spectra)`` with ``X_hat`` in float64 and
    ``spectra[(i, j)]`` all singular values of active block ``(i, j)``.
    ``ranks`` is an int or a (K_rows, K_cols) array.
    """
    X = np.asarray(X, dtype=np.float64)
    ranks = np.broadcast_to(np.asarray(ranks), np.shape(active))
    out = np.zeros_like(X)
    spectra = {}
    for i, rs in enumerate(rcuts):
        for j, cs in enumerate(ccuts):
            if not active[i, j]:
                continue
            U, s, Vt = np.linalg.svd(X[rs, cs], full_matrices=False)
            r = int(ranks[i, j])
            out[rs, cs] = (U[:, :r] * s[:r]) @ Vt[:r]
            spectra[(i, j)] = s
    return out, spectra


def rel_error(X, X_hat):
    X = np.asarray(X, dtype=np.float64)
    nx = np.linalg.norm(X)
    return 0.0 if nx == 0 else float(np.linalg.norm(X - X_hat) / nx)


def spectra_and_energies(X, rcuts, ccuts, active):
    """Per-active-block squared singular values, the inactive energy and ``||X||^2``."""
    X = np.asarray(X, dtype=np.float64)
    gains = {}
    inactive = 0.0
    for i, rs in enumerate(rcuts):
        for j, cs in enumerate(ccuts):
            blk = X[rs, cs]
            if active[i, j]:
                gains[(i, j)] = np.linalg.svd(blk, compute_uv=False) ** 2
            else:
                inactive += float(np.sum(blk * blk))
    return gains, inactive, float(np.sum(X * X))


def error_from_spectra(gains, inactive, total, ranks):
    """Relative error of per-block ranks ``ranks`` ({(i, j): r}) from the spectra."""
    if total == 0:
        return 0.0
    lost = inactive + sum(float(g[ranks[b] :].sum()) for b, g in gains.items())
    return float(np.sqrt(max(lost, 0.0) / total))


def n_params(rcuts, ccuts, ranks):
    """``sum r_ij (m_i + n_j)`` over the blocks of ``ranks`` ({(i, j): r})."""
    return sum(
        int(r) * ((rcuts[i].stop - rcuts[i].start) + (ccuts[j].stop - ccuts[j].start)) for (i, j), r in ranks.items()
    )


def all_rank_tuples(rcuts, ccuts, active):
    """Every assignment of a rank in ``0..min(m_i, n_j)`` to every active block."""
    blocks = [(i, j) for i in range(len(rcuts)) for j in range(len(ccuts)) if active[i, j]]
    sides = [min(rcuts[i].stop - rcuts[i].start, ccuts[j].stop - ccuts[j].start) for i, j in blocks]
    for combo in itertools.product(*(range(s + 1) for s in sides)):
        yield dict(zip(blocks, combo))


def hostile_grams(n):
    """Matrices that are not a usable Gram of side ``n``, by what is wrong with them."""
    import scipy.sparse

    G = np.eye(n)
    neg = np.eye(n)
    neg[0, 0] = -0.5
    nonsym = np.eye(n)
    nonsym[0, 1] = 0.3
    return {
        "wrong shape": np.eye(n + 1),
        "not square": np.ones((n, n + 1)),
        "3-D": np.ones((2, n, n)),
        "NaN": np.where(np.eye(n) > 0, np.nan, 0.0),
        "inf": np.where(G > 0, np.inf, 0.0),
        "negative eigenvalue": neg,
        "complex": G.astype(complex),
        "sparse": scipy.sparse.csr_matrix(G),
        "masked": np.ma.masked_array(G, mask=np.zeros_like(G, bool)),
        "integer": np.eye(n, dtype=int),
        "bool": np.eye(n, dtype=bool),
        "non-symmetric": nonsym,
        "zero": np.zeros((n, n)),
        "strings": np.full((n, n), "1"),
    }


# ---------------------------------------------------------------------------- fits in a data metric
def sample_gram(rng, n, n_samples=None, spread=1.0):
    """Samples X (rows) with correlated, unevenly scaled features and ``G = X^T X / N``."""
    N = 3 * n + 5 if n_samples is None else n_samples
    mix = np.eye(n) + 0.4 * rng.standard_normal((n, n))
    X = rng.standard_normal((N, n)) @ mix * np.exp(spread * rng.uniform(-1, 1, n))
    return X, X.T @ X / N


def f_ref(W, M, G, H=None):
    """``tr(H (W - M) G (W - M)^T)`` directly."""
    D = np.asarray(W, np.float64) - M
    HD = D if H is None else H @ D
    return float(np.sum(HD * (D @ G)))


def truncate(A, r):
    """The rank-r truncation of A and all its singular values."""
    U, s, Vt = np.linalg.svd(A, full_matrices=False)
    return (U[:, :r] * s[:r]) @ Vt[:r], s


def whitened(W, G, r, H=None):
    """SVD-LLM's ``[W L]_r L^{-1}`` (and ``K^{-T} [K^T W L]_r L^{-1}`` with H), L = chol(G)."""
    L = np.linalg.cholesky(G)
    K = np.eye(W.shape[0]) if H is None else np.linalg.cholesky(H)
    Y, s = truncate(K.T @ W @ L, r)
    return np.linalg.solve(K.T, Y) @ np.linalg.inv(L), s

"""The numerical engine: batched truncated SVD over the blocks of a layout.

Every active block of a :class:`~blocklowrank.layout.BlockLayout` is cut out
of the matrix (or of every matrix of a stack) without a Python loop over
blocks: consecutive equal-sized block-rows/columns form rectangular regions
that reshape into stacks of blocks, and all blocks of one shape go through
one batched SVD call.
"""

from __future__ import annotations

import math
import numbers
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .layout import BlockLayout, _check_int

__all__ = [
    "approximate",
    "Approximation",
    "allocate_ranks",
    "batched_svd",
    "svd_flip_v",
    "validate_matrix",
    "SVD_SOLVERS",
    "choose_solver",
]

SVD_SOLVERS = ("auto", "full", "randomized")
METHODS = ("global", "diagonal", "block")

# Exact DP allocation is used for unequal block costs while
# n_batch * sum(max ranks) * (budget units) stays below this many cell updates.
_DP_LIMIT = 3e7


# ---------------------------------------------------------------------------- input
def validate_matrix(X, *, name="X", min_ndim=2, max_ndim=None, copy=False):
    """Return ``X`` as a finite float array (float32 kept, other types to float64).

    Raises a ValueError/TypeError that names the problem for sparse, complex,
    non-numeric, empty, NaN/inf or wrongly-shaped input. The caller's array is
    never modified (a copy is made when a conversion is needed or ``copy``).
    """
    if hasattr(X, "tocsr") or type(X).__module__.startswith("scipy.sparse"):
        raise TypeError(
            f"{name} is a sparse matrix; blocklowrank works on dense arrays. "
            "Convert it with X.toarray() (dense blocks are needed for the SVD)."
        )
    try:
        arr = np.asarray(X)
    except Exception as exc:
        raise TypeError(f"{name} could not be converted to an array: {exc}") from None
    if arr.dtype.kind in "USV":
        raise TypeError(
            f"{name} holds strings (dtype {arr.dtype}), not numbers; convert it to a "
            "numeric array explicitly (e.g. X.astype(float)) if the strings are numbers"
        )
    if arr.dtype == object or arr.dtype.kind in "OMm":
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}") from None
    if np.iscomplexobj(arr):
        raise TypeError(f"{name} is complex; only real matrices are supported")
    if arr.dtype.kind == "b" or arr.dtype.kind in "iu":
        arr = arr.astype(np.float64)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    elif arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    if arr.ndim < min_ndim or (max_ndim is not None and arr.ndim > max_ndim):
        want = f"{min_ndim}-D" if max_ndim == min_ndim else f"at least {min_ndim}-D"
        raise ValueError(f"{name} must be {want} (a matrix or a stack of matrices), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        bad = "NaN" if np.isnan(arr).any() else "inf"
        raise ValueError(f"{name} contains {bad}; remove or impute non-finite values first")
    if copy and np.shares_memory(arr, X if isinstance(X, np.ndarray) else arr):
        arr = arr.copy()
    return arr


# ---------------------------------------------------------------------------- SVD kernels
def svd_flip_v(U, Vt):
    """Deterministic signs: the largest-magnitude entry of every row of ``Vt`` is positive.

    This is the convention of ``sklearn.utils.extmath.svd_flip(...,
    u_based_decision=False)`` (used by ``TruncatedSVD`` and ``PCA``), applied
    to stacks: ``U`` is ``(..., m, k)`` and ``Vt`` is ``(..., k, n)``. Works in
    place and returns ``(U, Vt)``.
    """
    if Vt.shape[-2] == 0:
        return U, Vt
    idx = np.argmax(np.abs(Vt), axis=-1)
    signs = np.sign(np.take_along_axis(Vt, idx[..., None], axis=-1))[..., 0]
    signs[signs == 0] = 1
    Vt *= signs[..., :, None]
    U *= signs[..., None, :]
    return U, Vt


def _auto_n_iter(k, m, n):
    # same rule as sklearn.utils.extmath.randomized_svd
    return 7 if k < 0.1 * min(m, n) else 4


def _exact_svd(A):
    U, s, Vt = np.linalg.svd(A, full_matrices=False)
    return U, s, Vt


def _randomized_svd(A, k, n_oversamples, n_iter, omega):
    """Batched randomized SVD (Halko et al.) of ``A`` (N, m, n) with QR normalisation.

    Subspace iteration on ``A A^T`` with one Householder QR per power
    iteration (``n_iter + 1`` in all). sklearn normalises (LU) after every
    product; for a stack of small blocks the QR calls cost as much as the
    products, and halving them keeps the captured energy unchanged on flat
    and decaying spectra (benchmarks/bench_engine.py): only directions with
    ``sigma_i < sqrt(eps) sigma_1``, whose energy is below rounding, could be
    lost between two normalisations. numpy has no batched LU.
    """
    transpose = A.shape[-2] < A.shape[-1]
    if transpose:
        A = A.swapaxes(-1, -2)
    At = A.swapaxes(-1, -2)
    Y = A @ omega
    for _ in range(n_iter):
        Q, _ = np.linalg.qr(Y)
        Y = A @ (At @ Q)
    Q, _ = np.linalg.qr(Y)
    Bm = Q.swapaxes(-1, -2) @ A
    Uh, s, Vt = np.linalg.svd(Bm, full_matrices=False)
    U = Q @ Uh
    U, s, Vt = U[..., :k], s[..., :k], Vt[..., :k, :]
    if transpose:
        U, Vt = Vt.swapaxes(-1, -2), U.swapaxes(-1, -2)
    return np.ascontiguousarray(U), s, np.ascontiguousarray(Vt)


# ``n_jobs=None`` splits a stack over threads only when it holds at least this
# much work. Work is counted per matrix as m*n*min(m, n) + 1e4 for the exact
# SVD and m*n*(k + n_oversamples)*(2 n_iter + 2)/16 + 1e4 (n_iter + 1) for the
# randomized one; on the benchmark machine a unit is about 3 ns, so the
# threshold is ~3 ms of single-thread work. Below it the fixed cost of the
# workers (~0.3 ms: the pool and the BLAS limit) eats the gain. Measured by
# benchmarks/bench_engine.py.
_THREAD_MIN_WORK = 1e6
# Chunks handed out per worker: a few, so that a worker slowed down by
# another process does not hold the others back.
_CHUNKS_PER_WORKER = 4
# Chunks hold at most about this many input elements (8 MB of float64), with
# or without threads: the whole-stack outputs of a big stack (all singular
# vectors of every block) cost page faults and cache misses; measured 10-15%
# on one thread for 256 blocks of 256 x 256.
_CHUNK_ELEMS = 1 << 20
_BLAS_CONTROLLER = []  # threadpoolctl controller of the BLAS libraries, made on first use
# Calls running concurrently from several user threads share one BLAS limit:
# the first sets it, the last restores it (else an early exit could restore
# a limit of 1 set by another call, for good).
_BLAS_LIMIT = {"lock": threading.Lock(), "users": 0, "limiter": None}


def _blas_controller():
    """Controller of the BLAS libraries loaded when first needed (numpy's, which
    runs every kernel here), or None when threadpoolctl cannot inspect them."""
    if not _BLAS_CONTROLLER:
        try:
            from threadpoolctl import ThreadpoolController

            ctl = ThreadpoolController().select(user_api="blas")
        except Exception:
            ctl = None
        _BLAS_CONTROLLER.append(ctl)
    return _BLAS_CONTROLLER[0]


def _resolve_n_jobs(n_jobs, n_tasks=None, work=None):
    """Number of worker threads for a stack of ``n_tasks`` matrices.

    An int is used as given; a negative one counts back from the usable
    CPUs as in joblib (-1: all of them). ``None`` is the number of threads
    the BLAS would use anyway (all cores by default, 1 inside
    ``threadpool_limits(1)`` or with ``OMP_NUM_THREADS=1``) when the stack has
    two or more matrices and at least ``_THREAD_MIN_WORK`` of ``work``, and
    1 otherwise (also when ``n_tasks`` is not given). The same cores are
    busy either way; splitting the stack over them is faster than BLAS's
    own threads, which do not speed up many small SVDs.
    """
    import os

    try:
        cpus = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    if n_jobs is None:
        if n_tasks is None or n_tasks < 2 or (work is not None and work < _THREAD_MIN_WORK):
            return 1
        ctl = _blas_controller()  # the threads BLAS would use now (honours threadpool_limits)
        blas = [lib.num_threads for lib in ctl.lib_controllers] if ctl is not None else []
        return max(1, min(max(blas, default=1), cpus, int(n_tasks)))
    n_jobs = _check_int(n_jobs, "n_jobs")
    if n_jobs == 0:
        raise ValueError("n_jobs must be a non-zero integer (or None)")
    return max(1, cpus + 1 + n_jobs) if n_jobs < 0 else n_jobs


def _run_chunked(fn, arrays, n_jobs):
    """Run ``fn(*chunk)`` over chunks of the leading axis in worker threads.

    BLAS is held to one thread per worker so the workers do not oversubscribe
    the cores; NumPy's linalg kernels release the GIL. The stack is cut into
    ``_CHUNKS_PER_WORKER`` chunks per worker (handed out on demand), and
    into chunks of at most about ``_CHUNK_ELEMS`` input elements even on one
    thread; the results are concatenated in order. Each matrix goes through
    the same kernel whatever the chunking.
    """
    N = arrays[0].shape[0]
    n_jobs = max(1, min(n_jobs, N))
    size = N * max(1, int(np.prod(arrays[0].shape[1:])))
    n_chunks = max(1 if n_jobs == 1 else n_jobs * _CHUNKS_PER_WORKER, -(-size // _CHUNK_ELEMS))
    n_chunks = min(N, n_chunks)
    if n_chunks == 1:
        return fn(*arrays)
    bounds = np.linspace(0, N, n_chunks + 1).astype(int)
    chunks = [tuple(a[bounds[t] : bounds[t + 1]] for a in arrays) for t in range(n_chunks)]
    if n_jobs == 1:
        parts = [fn(*c) for c in chunks]
        return tuple(np.concatenate([p[t] for p in parts], axis=0) for t in range(len(parts[0])))
    ctl = _blas_controller()
    lim = _BLAS_LIMIT
    with lim["lock"]:
        if lim["users"] == 0 and ctl is not None:
            lim["limiter"] = ctl.limit(limits=1)
        lim["users"] += 1
    try:
        with ThreadPoolExecutor(max_workers=n_jobs) as ex:
            parts = list(ex.map(lambda c: fn(*c), chunks))
    finally:
        with lim["lock"]:
            lim["users"] -= 1
            if lim["users"] == 0 and lim["limiter"] is not None:
                lim["limiter"].restore_original_limits()
                lim["limiter"] = None
    return tuple(np.concatenate([p[t] for p in parts], axis=0) for t in range(len(parts[0])))


def batched_svd(
    A,
    k=None,
    *,
    svd_solver="full",
    n_oversamples=10,
    n_iter="auto",
    random_state=None,
    n_jobs=None,
    full_spectrum=False,
):
    """Truncated SVD of every matrix of a stack ``A`` of shape ``(..., m, n)``.

    Parameters
    ----------
    A : ndarray of shape (..., m, n)
        Float32 or float64 stack.
    k : int, optional
        Number of components; all ``min(m, n)`` when None (exact solver only).
    svd_solver : {"full", "randomized"}
        "full" is LAPACK ``gesdd`` through :func:`numpy.linalg.svd`;
        "randomized" is a batched version of
        :func:`sklearn.utils.extmath.randomized_svd` (same knobs).
    n_oversamples, n_iter, random_state
        As in ``randomized_svd``; ``n_iter="auto"`` is 7 when
        ``k < 0.1 min(m, n)``, else 4.
    n_jobs : int, optional
        Worker threads over the stack (BLAS held to one thread each); -1
        means all CPUs. None (default): as many workers as the BLAS has
        threads when the stack holds two or more matrices and enough work
        to pay for the threads, else 1 (see ``_resolve_n_jobs``). Every
        matrix goes through the same kernel whatever ``n_jobs``: results
        agree to rounding (bit for bit at equal BLAS thread counts).
    full_spectrum : bool, default=False
        With the exact solver, return all ``min(m, n)`` singular values in
        ``s`` (``U`` and ``Vt`` are still truncated to ``k``).

    Returns
    -------
    U : ndarray (..., m, k)
    s : ndarray (..., k)
    Vt : ndarray (..., k, n)
        With the sign convention of :func:`svd_flip_v`.
    """
    A = validate_matrix(A, name="A")
    batch = A.shape[:-2]
    m, n = A.shape[-2:]
    L = min(m, n)
    if k is None:
        k = L
    k = int(k)
    flat = A.reshape((-1, m, n))
    N = flat.shape[0]
    if svd_solver == "randomized":
        from sklearn.utils import check_random_state

        ell = min(k + int(n_oversamples), L)
        if ell >= L:  # the sketch would be the whole space: exact is cheaper and exact
            svd_solver = "full"
        else:
            rng = check_random_state(random_state)
            it = _auto_n_iter(k, m, n) if n_iter == "auto" else int(n_iter)
            inner = min(m, n)  # the sketch acts on the smaller side (after any transpose)
            # drawn for the whole stack before any split: the result does not depend on n_jobs
            omega = rng.standard_normal((N, inner, ell)).astype(flat.dtype, copy=False)
            work = N * (m * n * ell * (2 * it + 2) / 16 + 1e4 * (it + 1))
            jobs = _resolve_n_jobs(n_jobs, N, work)
            U, s, Vt = _run_chunked(
                lambda a, o: _randomized_svd(a, k, n_oversamples, it, o), (flat, omega), jobs
            )
    if svd_solver == "full":

        def exact_k(a):  # truncate inside the worker: only k vectors are copied and joined
            U, s, Vt = _exact_svd(a)
            return (
                np.ascontiguousarray(U[..., :k]),
                s if full_spectrum else np.ascontiguousarray(s[..., :k]),
                np.ascontiguousarray(Vt[..., :k, :]),
            )

        jobs = _resolve_n_jobs(n_jobs, N, N * (float(m) * n * L + 1e4))
        U, s, Vt = _run_chunked(exact_k, (flat,), jobs)
    elif svd_solver != "randomized":
        raise ValueError(f"svd_solver must be 'full' or 'randomized' here, got {svd_solver!r}")
    svd_flip_v(U, Vt)
    return (
        U.reshape(batch + U.shape[-2:]),
        s.reshape(batch + s.shape[-1:]),
        Vt.reshape(batch + Vt.shape[-2:]),
    )


def choose_solver(block_shape, k, n_oversamples=10):
    """The rule behind ``svd_solver="auto"`` for one group of blocks: the exact SVD.

    "auto" may pick the randomized solver only where it is *safe* -- the
    energy its rank-``k`` factors capture falls short of the exact
    (Eckart-Young) optimum by less than 1e-3 relative, on a flat spectrum
    (Gaussian blocks) as on a decaying one -- and faster than LAPACK.
    ``benchmarks/bench_engine.py`` measures both. With the sklearn knobs
    (``n_oversamples=10``, ``n_iter="auto"``) the deficit on a decaying
    spectrum is at rounding level, but on a flat one it grows with the block
    side: about 1e-7 at side 32, 1e-4 to 1e-3 at 64, 2e-3 at 128, 1e-2 at 256,
    2e-2 at 512 and 3e-2 to 5e-2 at 1024-2048 (k = 2 and 8), while the
    randomized solver beats LAPACK only from side ~64 up. The only pairs both
    safe and faster are a narrow band around side 64 with ``k < 0.1 side``,
    for a gain under 2x; so "auto" always picks "full". The rule used before
    (side >= 512 and ``10 (k + n_oversamples) <= side``) lost 2-5% of the
    captured energy on flat spectra. Pass ``svd_solver="randomized"`` when
    the spectrum is known to decay: there it is 3-50x faster on blocks of
    side >= 256 at no measurable loss. The arguments are kept so that the
    rule can depend on them again.
    """
    return "full"


# ---------------------------------------------------------------------------- allocation
def _check_budget(budget):
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, numbers.Integral):
        raise TypeError(f"budget must be an integer number of parameters, got {budget!r}")
    budget = int(budget)
    if budget < 1:
        raise ValueError(f"budget must be >= 1 parameter, got {budget}")
    return budget


def _check_tol(tol):
    if isinstance(tol, (bool, np.bool_)) or not isinstance(tol, numbers.Real):
        raise TypeError(f"tol must be a float in (0, 1), got {tol!r}")
    tol = float(tol)
    if not (0.0 < tol < 1.0):
        raise ValueError(f"tol must be in the open interval (0, 1), got {tol}")
    return tol


def allocate_ranks(gains, costs, max_ranks, *, budget=None, tol=None, fixed_loss=None, total=None):
    """Choose per-block ranks from the blocks' spectra.

    Parameters
    ----------
    gains : list of ndarray, each (B, L_b)
        ``sigma_k^2`` of block ``b`` (descending) for ``B`` matrices.
    costs : sequence of int
        Parameters per rank of each block, ``m_i + n_j``.
    max_ranks : sequence of int
        Largest rank allowed per block.
    budget : int, optional
        Spend at most this many parameters, maximising the captured energy.
    tol : float, optional
        Use the fewest parameters for which the relative error is ``<= tol``.
        Needs ``fixed_loss`` (energy no rank can capture, e.g. inactive
        blocks), shape (B,), and ``total`` (``||X||_F^2``), shape (B,).

    Returns
    -------
    ranks : ndarray of int, shape (B, n_blocks)
    exact : bool
        Whether the allocation is provably optimal (see Notes).

    Notes
    -----
    The error of a layout is ``sum`` of the energies the blocks discard, and
    block ``b`` at rank ``r`` keeps ``sigma_1^2 + ... + sigma_r^2`` (Eckart-
    Young) for ``r (m_i + n_j)`` parameters. Choosing ranks is therefore a
    knapsack over *components*: component ``k`` of block ``b`` gains
    ``sigma_k^2`` and costs ``c_b``, and a block's components must be taken
    as a prefix. Because each block's gains are sorted in decreasing order,
    any set of components formed by thresholding the gain-per-parameter
    ``sigma_k^2 / c_b`` is automatically a union of prefixes.

    *Equal-sized blocks* (all ``c_b = c``): a budget ``P`` buys exactly
    ``t = floor(P / c)`` components whatever the blocks, so the best choice
    keeps the ``t`` largest ``sigma^2`` over all blocks. Exchange argument:
    any feasible choice with a component smaller than an unchosen one is
    improved (or tied) by swapping them, at equal cost. So water-filling by
    gain per parameter is exactly optimal, and this function uses it.

    *Unequal blocks* (uneven splits): the problem is a multiple-choice
    knapsack; gain-per-parameter greedy can leave parameters unused. When
    the dynamic programme over the budget is small (``B * sum(max ranks) *
    budget`` below about 3e7 cell updates) it is solved exactly; otherwise
    greedy water-filling is used and then every remaining component that
    still fits is added (``exact`` is False then).
    """
    costs = np.asarray(costs, dtype=np.int64)
    nb = len(gains)
    B = gains[0].shape[0]
    Ls = [int(min(g.shape[1], mr)) for g, mr in zip(gains, max_ranks)]
    gains = [np.maximum(g[:, :L], 0.0).astype(np.float64) for g, L in zip(gains, Ls)]
    block_id = np.concatenate([np.full(L, b) for b, L in enumerate(Ls)]).astype(np.int64)
    G = np.concatenate(gains, axis=1) if block_id.size else np.zeros((B, 0))
    item_cost = costs[block_id]
    equal = bool(np.all(costs == costs[0]))
    if budget is not None:
        if equal:
            return _take_top(G, block_id, nb, budget // int(costs[0])), True
        units = int(np.gcd.reduce(costs))
        cells = B * sum(min(L, budget // int(c)) for L, c in zip(Ls, costs)) * (budget // units + 1)
        if cells <= _DP_LIMIT:
            return _dp_budget(gains, costs, budget, units), True
        return _greedy_budget(G, block_id, item_cost, nb, budget), False
    # tol: minimal cost so that fixed_loss + discarded <= tol^2 * total
    target = tol * tol * total  # allowed discarded energy, (B,)
    if equal:
        order = np.argsort(-G, axis=1, kind="stable")
        Gs = np.take_along_axis(G, order, axis=1)
        # tail[t] = energy discarded when the first t sorted components are kept
        tail = np.concatenate([np.cumsum(Gs[:, ::-1], axis=1)[:, ::-1], np.zeros((B, 1))], axis=1)
        ok = fixed_loss[:, None] + tail <= target[:, None] * (1 + 1e-12)
        t = np.argmax(ok, axis=1)
        ranks = np.zeros((B, nb), dtype=np.int64)
        sel_mask = np.arange(G.shape[1])[None, :] < t[:, None]
        chosen_block = block_id[order]
        for b in range(nb):
            ranks[:, b] = np.sum(sel_mask & (chosen_block == b), axis=1)
        return ranks, True
    ratio = G / item_cost[None, :]
    order = np.argsort(-ratio, axis=1, kind="stable")
    Gs = np.take_along_axis(G, order, axis=1)
    tail = np.concatenate([np.cumsum(Gs[:, ::-1], axis=1)[:, ::-1], np.zeros((B, 1))], axis=1)
    ok = fixed_loss[:, None] + tail <= target[:, None] * (1 + 1e-12)
    t = np.argmax(ok, axis=1)
    sel_mask = np.arange(G.shape[1])[None, :] < t[:, None]
    chosen_block = block_id[order]
    ranks = np.zeros((B, nb), dtype=np.int64)
    for b in range(nb):
        ranks[:, b] = np.sum(sel_mask & (chosen_block == b), axis=1)
    return ranks, False


def _take_top(G, block_id, nb, t):
    """Ranks that keep the ``t`` largest positive gains (items grouped by block, in order).

    Selection by threshold instead of a sort: the t-th largest gain ``v``
    (``np.partition``), every gain above ``v``, then ties at ``v`` in item
    order until ``t`` are taken. Each block's gains are descending, so the
    result is a prefix of every block.
    """
    B, n_items = G.shape
    ranks = np.zeros((B, nb), dtype=np.int64)
    t = min(int(t), n_items)
    if t <= 0:
        return ranks
    starts = np.flatnonzero(np.r_[True, block_id[1:] != block_id[:-1]])
    owners = block_id[starts]
    v = -np.partition(-G, t - 1, axis=1)[:, t - 1 : t]  # (B, 1) t-th largest
    above = G > v
    need = t - above.sum(axis=1, keepdims=True)
    ties = (G == v) & (v > 0)  # never pay for a zero gain
    take = above | (ties & (np.cumsum(ties, axis=1) <= need))
    ranks[:, owners] = np.add.reduceat(take, starts, axis=1)
    return ranks


def _dp_budget(gains, costs, budget, units):
    """Exact multiple-choice knapsack over blocks, vectorised over the batch."""
    B = gains[0].shape[0]
    P = budget // units
    dp = np.zeros((B, P + 1))
    choices = []
    for g, c in zip(gains, costs):
        cu = int(c) // units
        R = min(g.shape[1], P // cu) if cu > 0 else 0
        cum = np.concatenate([np.zeros((B, 1)), np.cumsum(g[:, :R], axis=1)], axis=1)
        best = dp.copy()
        arg = np.zeros((B, P + 1), dtype=np.int32)
        for r in range(1, R + 1):
            cand = np.full((B, P + 1), -np.inf)
            cand[:, r * cu :] = dp[:, : P + 1 - r * cu] + cum[:, r : r + 1]
            # a strictly larger energy is needed to spend more (ties keep the cheaper rank)
            better = cand > best + 1e-300
            better &= cum[:, r : r + 1] > cum[:, r - 1 : r]
            best = np.where(better, cand, best)
            arg = np.where(better, r, arg)
        dp = best
        choices.append((arg, cu))
    ranks = np.zeros((B, len(gains)), dtype=np.int64)
    p = np.full(B, P)
    rows = np.arange(B)
    for b in range(len(gains) - 1, -1, -1):
        arg, cu = choices[b]
        r = arg[rows, p]
        ranks[:, b] = r
        p = p - r * cu
    return ranks


def _greedy_budget(G, block_id, item_cost, nb, budget):
    B, n_items = G.shape
    ratio = G / item_cost[None, :]
    order = np.argsort(-ratio, axis=1, kind="stable")
    cost_sorted = item_cost[order]
    pos = np.take_along_axis(G, order, axis=1) > 0
    ranks = np.zeros((B, nb), dtype=np.int64)
    remaining = np.full(B, budget, dtype=np.int64)
    for t in range(n_items):  # items in a block share one cost, so "fits" keeps prefixes
        c = cost_sorted[:, t]
        take = (c <= remaining) & pos[:, t]
        remaining -= np.where(take, c, 0)
        np.add.at(ranks, (np.nonzero(take)[0], block_id[order[take, t]]), 1)
        if not np.any(remaining >= item_cost.min()):
            break
    return ranks


# ---------------------------------------------------------------------------- result
@dataclass
class _Group:
    shape: tuple  # (m_i, n_j)
    rows: np.ndarray  # block-row index of each block in the group
    cols: np.ndarray
    B: np.ndarray  # (batch..., g, m_i, k) = U_k diag(s_k), made once (zero columns beyond a block's rank)
    s: np.ndarray  # (batch..., g, k) kept singular values (zeros beyond each block's rank)
    Vt: np.ndarray  # (batch..., g, k, n_j)
    spectrum: np.ndarray  # (batch..., g, L) computed singular values
    solver: str


@dataclass(eq=False)
class Approximation:
    """The result of :func:`approximate`.

    Attributes
    ----------
    layout : BlockLayout
        The structure; its ranks are those of the single matrix, or the
        largest over the stack when ranks differ between matrices.
    ranks : ndarray of int, shape (..., K_rows, K_cols)
        Rank of every block of every matrix (0 where inactive).
    n_params : int or ndarray of int, shape (...)
        Exact parameter count ``sum r_ij (m_i + n_j)``.
    error : float or ndarray, shape (...)
        Relative Frobenius error ``||X - X_hat||_F / ||X||_F`` (0.0 for X = 0).
    discarded_energy : float or ndarray
        ``||X - X_hat||_F^2``.
    total_energy : float or ndarray
        ``||X||_F^2``.
    svd_solver : dict
        Solver used for each block shape.
    exact_allocation : bool or None
        For ``budget``/``tol``: whether the rank allocation is provably
        optimal (see :func:`allocate_ranks`); None for given ranks.
    """

    layout: BlockLayout
    ranks: np.ndarray
    n_params: object
    error: object
    discarded_energy: object
    total_energy: object
    svd_solver: dict
    exact_allocation: object
    dtype: np.dtype
    batch_shape: tuple
    _groups: list = field(repr=False)
    _reconstruction: object = field(default=None, repr=False)

    def _group_of(self, i, j):
        for g in self._groups:
            hit = np.nonzero((g.rows == i) & (g.cols == j))[0]
            if hit.size:
                return g, int(hit[0])
        raise KeyError(f"block ({i}, {j}) is not active in this layout")

    def block_factors(self, i, j):
        """``(B_ij, A_ij)`` with ``B = U_r S_r`` (m_i x r) and ``A = V_r^T`` (r x n_j).

        With a permuted layout the factors are in the permuted coordinates:
        block ``(i, j)`` covers original rows ``row_perm[rows_i]`` and
        columns ``col_perm[cols_j]``.

        For a stack whose ranks differ between matrices, factors are padded
        with zero columns/rows to the largest rank (the product is unchanged).
        """
        g, t = self._group_of(i, j)
        r = int(self.ranks[(...,) + (i, j)].max()) if self.ranks.size else 0
        return g.B[..., t, :, :r].copy(), g.Vt[..., t, :r, :].copy()

    @property
    def factors(self):
        """``{(i, j): (B_ij, A_ij)}`` for every active block."""
        out = {}
        for g in self._groups:
            for i, j in zip(g.rows.tolist(), g.cols.tolist()):
                out[(i, j)] = self.block_factors(i, j)
        return out

    @property
    def singular_values(self):
        """``{(i, j): sigma}``: the singular values computed for each active block
        (all of them with the exact solver, the leading ones with randomized)."""
        out = {}
        for g in self._groups:
            for t, (i, j) in enumerate(zip(g.rows.tolist(), g.cols.tolist())):
                out[(i, j)] = g.spectrum[..., t, :].copy()
        return out

    @property
    def reconstruction(self):
        """The dense approximation ``X_hat`` (built on first access, then cached)."""
        if self._reconstruction is None:
            Xp = _assemble(self.layout, self._groups, self.batch_shape, self.dtype)
            self._reconstruction = self.layout.unpermute(Xp) if self.layout.permuted else Xp
        return self._reconstruction

    def to_dense(self):
        """Alias of :attr:`reconstruction`."""
        return self.reconstruction

    def __repr__(self):
        err = self.error if np.ndim(self.error) == 0 else f"array{np.shape(self.error)}"
        return f"Approximation({self.layout.describe()}, error={err})"


def _gather(X, layout, groups_idx):
    """Stacks ``(..., g, m_i, n_j)`` of the active blocks of each shape group."""
    batch = X.shape[:-2]
    parts = {shp: [] for shp in groups_idx}
    for r0, r1, c0, c1, bi0, bj0, kr, kc, shp in layout.regions():
        sub = layout.active[bi0 : bi0 + kr, bj0 : bj0 + kc]
        ii, jj = np.nonzero(sub)
        if ii.size == 0:
            continue
        h, w = shp
        reg = X[..., r0:r1, c0:c1].reshape(batch + (kr, h, kc, w)).swapaxes(-3, -2)
        parts[shp].append(reg[..., ii, jj, :, :])
    return {shp: (np.concatenate(p, axis=-3) if len(p) > 1 else p[0]) for shp, p in parts.items()}


def _block_energies(X, layout):
    """``||X_ij||_F^2`` for every block, shape (..., K_rows, K_cols), float64."""
    batch = X.shape[:-2]
    E = np.zeros(batch + layout.n_blocks)
    for r0, r1, c0, c1, bi0, bj0, kr, kc, (h, w) in layout.regions():
        reg = X[..., r0:r1, c0:c1].reshape(batch + (kr, h, kc, w))
        sq = np.einsum("...ahbw,...ahbw->...ab", reg, reg, dtype=np.float64)
        E[..., bi0 : bi0 + kr, bj0 : bj0 + kc] = sq
    return E


def _assemble(layout, groups, batch, dtype):
    """Dense ``X_hat`` from the factors, written region by region into one array.

    A region whose blocks are all active gets ``B_ij A_ij`` straight from
    ``np.matmul(B, A, out=view)``, where ``view`` is the region of the output
    seen as a (k_r, k_c, m_i, n_j) stack: one call per region, no temporary
    stack of blocks, no scatter, no zero fill. Regions larger than
    ``_ASSEMBLE_ROWS`` output elements are cut into row bands so that each call's
    output stays in cache. Other regions (the diagonal pattern) are zeroed
    and get their active blocks assigned.
    """
    m, n = layout.shape
    out = np.empty(batch + (m, n), dtype=dtype)
    by_shape = {g.shape: g for g in groups}
    nbatch = int(np.prod(batch)) if batch else 1
    for r0, r1, c0, c1, bi0, bj0, kr, kc, shp in layout.regions():
        h, w = shp
        view = out[..., r0:r1, c0:c1].reshape(batch + (kr, h, kc, w)).swapaxes(-3, -2)
        g = by_shape.get(shp)
        nblk = kr * kc
        if g is not None and g.rows.size == nblk and g.rows[0] == bi0 and g.cols[0] == bj0 \
                and g.rows[-1] == bi0 + kr - 1 and g.cols[-1] == bj0 + kc - 1:
            # the group is exactly this region, in row-major order (see BlockLayout.groups)
            sel = None
        else:
            sel = np.zeros(0, dtype=int)
            if g is not None:
                inreg = (g.rows >= bi0) & (g.rows < bi0 + kr) & (g.cols >= bj0) & (g.cols < bj0 + kc)
                sel = np.nonzero(inreg)[0]
        if sel is None or sel.size == nblk:  # every block active
            B = g.B if sel is None else g.B[..., sel, :, :]
            A = g.Vt if sel is None else g.Vt[..., sel, :, :]
            B = B.reshape(batch + (kr, kc, h, B.shape[-1]))
            A = A.reshape(batch + (kr, kc, A.shape[-2], w))
            size = nbatch * nblk * h * w
            if size <= _ASSEMBLE_ROWS:
                np.matmul(B, A, out=view)
            else:
                step = max(1, (_ASSEMBLE_ROWS * h) // size)
                for i in range(0, h, step):
                    np.matmul(B[..., i : i + step, :], A, out=view[..., i : i + step, :])
            continue
        out[..., r0:r1, c0:c1] = 0
        if sel.size == 0:
            continue
        blocks = np.matmul(g.B[..., sel, :, :], g.Vt[..., sel, :, :])
        view[..., g.rows[sel] - bi0, g.cols[sel] - bj0, :, :] = blocks
    return out


#: Output elements per ``np.matmul`` call in :func:`_assemble` (about 2 MB of float64).
_ASSEMBLE_ROWS = 1 << 18


# ---------------------------------------------------------------------------- public entry
def _resolve_layout(shape, layout, method, n_blocks, cap_rank):
    if layout is not None:
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        if tuple(layout.shape) != tuple(shape):
            raise ValueError(f"layout is for shape {layout.shape} but X has shape {tuple(shape)}")
        return layout
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "global":
        return BlockLayout.global_(shape)
    pattern = "diagonal" if method == "diagonal" else "full"
    return BlockLayout.from_blocks(shape, n_blocks, pattern=pattern)


def approximate(
    X,
    layout=None,
    *,
    method="block",
    n_blocks=1,
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
    """Structured low-rank approximation of a matrix or a stack of matrices.

    Every active block of the layout is replaced by its truncated SVD
    (optimal per block by Eckart-Young); blocks of equal shape go through
    one batched SVD call.

    Parameters
    ----------
    X : array-like of shape (m, n) or (..., m, n)
        Matrix, or stack of matrices sharing one layout. float32 stays
        float32; integers and booleans become float64. Not modified.
    layout : BlockLayout, optional
        The structure. Its ranks are used unless ``rank``, ``budget`` or
        ``tol`` is given. If None, built from ``method`` and ``n_blocks``.
    method : {"global", "diagonal", "block"}, default="block"
        Global LoRA (1 block), MELoRA (diagonal blocks) or Localized LoRA
        (every block of the grid). With the default ``n_blocks=1`` all three
        are the global truncated SVD.
    n_blocks : int or (int, int), default=1
        Block-rows and block-columns (``np.array_split`` cuts; uneven sizes
        are fine).
    rank : int or array-like of shape (K_rows, K_cols), optional
        Rank of every active block (uniform) or of each block.
    budget : int, optional
        Parameter budget: per-block ranks that minimise the error under it
        (see :func:`allocate_ranks`), per matrix of a stack.
    tol : float in (0, 1), optional
        Fewest parameters with relative error ``<= tol``.
    svd_solver : {"auto", "full", "randomized"}, default="auto"
        "full": exact LAPACK SVD. "randomized": batched randomized SVD with
        ``n_oversamples``, ``n_iter`` and ``random_state`` as in
        :func:`sklearn.utils.extmath.randomized_svd`. "auto": the rule of
        :func:`choose_solver`, which is currently always the exact SVD (the
        benchmark found the randomized solver unsafe on flat spectra wherever
        it is faster); pass "randomized" when the spectrum is known to decay.
    n_oversamples : int, default=10
    n_iter : int or "auto", default="auto"
    random_state : int, RandomState instance or None, default=None
    cap_rank : bool, default=False
        Lower a rank above a block's smaller side to that side instead of
        raising ValueError.
    n_jobs : int, optional
        Worker threads that split each stack of blocks (BLAS limited to one
        thread per worker); -1 means all cores. None (default): as many
        workers as the BLAS has threads (the cores it would use anyway; 1
        inside ``threadpool_limits(1)``) for stacks of two or more blocks
        with enough work, else 1. Results agree to rounding whatever ``n_jobs``
        (the random sketch is drawn before the stack is split).

    Returns
    -------
    Approximation

    Notes
    -----
    Signs: for every block and component, the largest-magnitude entry of the
    right singular vector is positive (``svd_flip(u_based_decision=False)``,
    the convention of ``TruncatedSVD``). The error is computed from the
    discarded spectrum for the exact solver and from the residual for the
    randomized one.

    Examples
    --------
    >>> import numpy as np
    >>> from blocklowrank import approximate
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> res = approximate(X, method="block", n_blocks=2, rank=2)
    >>> res.n_params, res.reconstruction.shape
    (224, (28, 28))
    >>> g = approximate(X, method="global", rank=4)
    >>> bool(np.isclose(g.error, np.linalg.norm(X - g.reconstruction) / np.linalg.norm(X)))
    True
    """
    X = validate_matrix(X)
    batch = X.shape[:-2]
    m, n = X.shape[-2:]
    lay = _resolve_layout((m, n), layout, method, n_blocks, cap_rank)
    if lay.permuted:  # work in the permuted coordinates; the reconstruction is put back
        X = lay.permute(X)
    given = [p for p, v in (("rank", rank), ("budget", budget), ("tol", tol)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give only one of rank, budget and tol (got {', '.join(given)})")
    if svd_solver not in SVD_SOLVERS:
        raise ValueError(f"svd_solver must be one of {SVD_SOLVERS}, got {svd_solver!r}")
    if not given:
        if layout is None or layout.n_params == 0:
            raise ValueError("give one of rank, budget or tol (or a layout with ranks)")
        mode = "layout"
    else:
        mode = given[0]
    if mode == "rank":
        if np.ndim(rank) == 0:
            r = _check_int(rank, "rank", minimum=1)
        else:
            r = rank
        over = None
        if not cap_rank:
            rr = np.where(lay.active, np.broadcast_to(np.asarray(r), lay.active.shape), 0)
            over = np.argwhere(rr > lay.max_ranks)
        if over is not None and over.size:
            i, j = (int(v) for v in over[0])
            raise ValueError(
                f"rank {int(np.asarray(rr)[i, j])} exceeds the smaller side of block ({i}, {j}), "
                f"which is {lay.row_sizes[i]}x{lay.col_sizes[j]} (max rank "
                f"{int(lay.max_ranks[i, j])}); lower the rank, use fewer blocks, or pass "
                "cap_rank=True to cap each block's rank at its smaller side"
            )
        lay = lay.with_ranks(r, cap_rank=cap_rank)
        if np.ndim(rank) != 0 and np.any(lay.ranks[lay.active] < 1) and lay.n_params == 0:
            raise ValueError("per-block ranks are all zero")
    elif mode == "budget":
        budget = _check_budget(budget)
        cheapest = int(lay.block_costs[lay.active].min())
        if budget < cheapest:
            raise ValueError(
                f"budget={budget} is below the cheapest configuration of this layout: one "
                f"rank-1 block costs {cheapest} parameters"
            )
    elif mode == "tol":
        tol = _check_tol(tol)

    groups_idx = lay.groups()
    # how many components each group needs, and with which solver
    plan = {}
    for shp, (ii, jj) in groups_idx.items():
        L = min(shp)
        if mode in ("rank", "layout"):
            k = int(lay.ranks[ii, jj].max())
        elif mode == "budget":
            k = min(L, budget // (shp[0] + shp[1]))
        else:
            k = L
        if svd_solver == "auto":
            solver = "full" if mode == "tol" or mode == "budget" else choose_solver(shp, k, n_oversamples)
        else:
            solver = svd_solver
        if solver == "randomized" and mode == "tol":
            raise ValueError("tol needs every singular value: use svd_solver='full' or 'auto'")
        if solver == "randomized" and k + int(n_oversamples) >= L:
            solver = "full"
        plan[shp] = (max(k, 0), solver)

    blocks = _gather(X, lay, groups_idx)
    from sklearn.utils import check_random_state

    rng = check_random_state(random_state)
    computed = {}
    for shp, (ii, jj) in groups_idx.items():
        k, solver = plan[shp]
        A = blocks[shp]
        if k == 0:
            g = A.shape[:-2]
            computed[shp] = (
                np.zeros(g + (shp[0], 0), X.dtype),
                np.zeros(g + (0,), X.dtype),
                np.zeros(g + (0, shp[1]), X.dtype),
                solver,
            )
            continue
        kk = None if (solver == "full" and mode in ("budget", "tol")) else k
        U, s, Vt = batched_svd(
            A,
            kk,
            full_spectrum=True,
            svd_solver=solver,
            n_oversamples=n_oversamples,
            n_iter=n_iter,
            random_state=rng,
            n_jobs=n_jobs,
        )
        computed[shp] = (U, s, Vt, solver)

    # ranks per matrix
    ranks = np.broadcast_to(lay.ranks, batch + lay.n_blocks).copy()
    exact_alloc = None
    E = _block_energies(X, lay)
    total = E.sum(axis=(-2, -1))
    if mode in ("budget", "tol"):
        B = int(np.prod(batch)) if batch else 1
        shapes = list(groups_idx)
        gains, costs, maxr, where = [], [], [], []
        for shp in shapes:
            ii, jj = groups_idx[shp]
            s = computed[shp][1].reshape((B, len(ii), -1)).astype(np.float64)
            for t in range(len(ii)):
                gains.append(s[:, t, :] ** 2)
                costs.append(shp[0] + shp[1])
                maxr.append(min(shp))
                where.append((int(ii[t]), int(jj[t])))
        inactive_loss = (E * ~lay.active).sum(axis=(-2, -1)).reshape(B)
        if mode == "tol":
            tot = total.reshape(B)
            best = inactive_loss
            bad = best > tol * tol * tot * (1 + 1e-12)
            if np.any(bad):
                worst = float(np.sqrt(best[bad] / np.where(tot[bad] > 0, tot[bad], 1)).max())
                raise ValueError(
                    f"tol={tol} cannot be reached with this structure: its inactive blocks alone "
                    f"leave a relative error of {worst:.4g}"
                )
            alloc, exact_alloc = allocate_ranks(
                gains, costs, maxr, tol=tol, fixed_loss=inactive_loss, total=tot
            )
        else:
            alloc, exact_alloc = allocate_ranks(gains, costs, maxr, budget=budget)
            if not exact_alloc:
                alloc = _no_worse_than_uniform(alloc, gains, costs, maxr, budget)
        flat_ranks = ranks.reshape((B,) + lay.n_blocks)
        for t, (i, j) in enumerate(where):
            flat_ranks[:, i, j] = alloc[:, t]
        ranks = flat_ranks.reshape(batch + lay.n_blocks)
        lay = lay.with_ranks(ranks.reshape((B,) + lay.n_blocks).max(axis=0))

    # truncate each group to its largest rank, zero singular values past each block's rank
    groups = []
    discarded = (E * ~lay.active).sum(axis=(-2, -1))
    for shp, (ii, jj) in groups_idx.items():
        U, s, Vt, solver = computed[shp]
        r_blocks = ranks[..., ii, jj]  # (batch..., g)
        k = int(r_blocks.max()) if r_blocks.size else 0
        keep = np.arange(k) < r_blocks[..., None]
        s_k = np.where(keep, s[..., :k], 0).astype(X.dtype)
        g = _Group(
            shp,
            ii,
            jj,
            U[..., :k] * s_k[..., None, :],
            s_k,
            np.ascontiguousarray(Vt[..., :k, :]),
            s,
            solver,
        )
        groups.append(g)
        Eb = E[..., ii, jj]
        if s.shape[-1] == 0:  # no component computed (rank 0 everywhere): all energy lost
            discarded = discarded + Eb.sum(axis=-1)
        elif solver == "full":
            s64 = s.astype(np.float64)
            drop = np.where(np.arange(s.shape[-1]) >= r_blocks[..., None], s64 * s64, 0.0)
            discarded = discarded + drop.sum(axis=(-2, -1))
        else:
            discarded = discarded + _randomized_residual(blocks[shp], g, Eb).sum(axis=-1)
        del Eb
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.where(total > 0, np.sqrt(np.maximum(discarded, 0) / np.where(total > 0, total, 1)), 0.0)
    n_params = (ranks * lay.block_costs).sum(axis=(-2, -1))
    scalar = not batch
    return Approximation(
        layout=lay,
        ranks=ranks if not scalar else lay.ranks.copy(),
        n_params=int(n_params) if scalar else n_params,
        error=float(err) if scalar else err,
        discarded_energy=float(discarded) if scalar else discarded,
        total_energy=float(total) if scalar else total,
        svd_solver={shp: computed[shp][3] for shp in groups_idx},
        exact_allocation=exact_alloc,
        dtype=X.dtype,
        batch_shape=batch,
        _groups=groups,
    )


def _randomized_residual(A, g, Eb):
    """``||A_b - B_b V_b^T||_F^2`` of every block ``b`` of a randomized group, shape (..., g).

    The randomized factors are a projection: ``U_k = Q U~_k`` has orthonormal
    columns and ``S_k V_k^T = U_k^T A`` (see :func:`_randomized_svd`), so
    ``X_hat = U_k U_k^T A`` and the residual energy is ``||A||^2 - sum s_k^2``
    without a pass over the block. The subtraction loses about ``eps ||A||^2``
    to rounding, which moves the relative error ``e`` of the block by about
    ``eps / e``; where ``e^2 < 100 sqrt(eps)`` (``e`` below 1.2e-3 in float64,
    0.19 in float32) the residual is computed from the block itself, so the
    reported error stays within about 1e-12 of the true one in float64.
    """
    s64 = g.s.astype(np.float64)
    d = Eb - np.einsum("...k,...k->...", s64, s64)
    tiny = d <= 100 * np.sqrt(np.finfo(g.s.dtype).eps) * Eb
    if np.any(tiny):
        R = A[tiny] - np.matmul(g.B[tiny], g.Vt[tiny])
        d[tiny] = np.einsum("bij,bij->b", R, R, dtype=np.float64)
    return np.maximum(d, 0.0)


def _no_worse_than_uniform(alloc, gains, costs, maxr, budget):
    """Replace a greedy allocation by the best uniform one where that is better."""
    costs = np.asarray(costs)
    total_cost = int(costs.sum())
    r_u = budget // total_cost
    if r_u < 1:
        return alloc
    B = alloc.shape[0]
    kept_alloc = np.zeros(B)
    kept_unif = np.zeros(B)
    unif = np.zeros_like(alloc)
    for b, g in enumerate(gains):
        cs = np.concatenate([np.zeros((B, 1)), np.cumsum(g, axis=1)], axis=1)
        kept_alloc += cs[np.arange(B), np.minimum(alloc[:, b], g.shape[1])]
        ru = min(r_u, maxr[b], g.shape[1])
        unif[:, b] = ru
        kept_unif += cs[:, ru]
    better = kept_unif > kept_alloc
    alloc = alloc.copy()
    alloc[better] = unif[better]
    return alloc


# ---------------------------------------------------------------------------- spectra only
@dataclass(eq=False)
class BlockSpectra:
    """Singular values of every active block of a layout, for one matrix or a stack.

    Cheaper than :func:`approximate` when only errors are needed (no singular
    vectors are computed), and enough to evaluate any rank choice exactly:
    by Eckart-Young the error of rank ``r`` on a block is the energy of its
    singular values past ``r``.

    Attributes
    ----------
    layout : BlockLayout
    values : dict
        ``{(i, j): sigma}`` with ``sigma`` of shape ``(..., min(m_i, n_j))``.
    block_energy : ndarray, shape (..., K_rows, K_cols)
        ``||X_ij||_F^2`` of every block (active or not).
    total_energy : ndarray, shape (...)
    """

    layout: BlockLayout
    values: dict
    block_energy: np.ndarray
    total_energy: np.ndarray

    def _tails(self):
        """(..., n_active, L_max + 1): energy past rank r of each active block."""
        if getattr(self, "_tail_cache", None) is None:
            keys = list(self.values)
            batch = self.total_energy.shape
            L = max(v.shape[-1] for v in self.values.values())
            T = np.zeros(batch + (len(keys), L + 1))
            for t, k in enumerate(keys):
                s2 = self.values[k].astype(np.float64) ** 2
                tail = np.cumsum(s2[..., ::-1], axis=-1)[..., ::-1]
                T[..., t, : tail.shape[-1]] = tail
            ii = np.array([k[0] for k in keys])
            jj = np.array([k[1] for k in keys])
            self._tail_cache = (T, ii, jj)
        return self._tail_cache

    def discarded(self, ranks):
        """Energy left out by per-block ranks (int, (K_rows, K_cols) or (..., K_rows, K_cols))."""
        lay = self.layout
        batch = self.total_energy.shape
        R = np.broadcast_to(np.where(lay.active, ranks, 0), batch + lay.n_blocks)
        out = (self.block_energy * ~lay.active).sum(axis=(-2, -1))
        T, ii, jj = self._tails()
        r = np.minimum(R[..., ii, jj], T.shape[-1] - 1)
        return out + np.take_along_axis(T, r[..., None], axis=-1)[..., 0].sum(axis=-1)

    def error(self, ranks):
        """Relative Frobenius error for the given per-block ranks (0 for X = 0)."""
        d = self.discarded(ranks)
        tot = self.total_energy
        return np.where(tot > 0, np.sqrt(np.maximum(d, 0) / np.where(tot > 0, tot, 1)), 0.0)

    def n_params(self, ranks):
        lay = self.layout
        batch = self.total_energy.shape
        R = np.broadcast_to(np.where(lay.active, ranks, 0), batch + lay.n_blocks)
        return (R * lay.block_costs).sum(axis=(-2, -1))

    def allocate(self, budget):
        """Budget-optimal per-block ranks, shape (..., K_rows, K_cols), and the exactness flag."""
        lay = self.layout
        budget = _check_budget(budget)
        batch = self.total_energy.shape
        B = int(np.prod(batch)) if batch else 1
        keys = list(self.values)
        if getattr(self, "_gain_cache", None) is None:
            self._gain_cache = [self.values[k].reshape(B, -1).astype(np.float64) ** 2 for k in keys]
        gains = self._gain_cache
        costs = [int(lay.block_costs[k]) for k in keys]
        maxr = [int(lay.max_ranks[k]) for k in keys]
        alloc, exact = allocate_ranks(gains, costs, maxr, budget=budget)
        if not exact:
            alloc = _no_worse_than_uniform(alloc, gains, costs, maxr, budget)
        R = np.zeros((B,) + lay.n_blocks, dtype=np.int64)
        for t, (i, j) in enumerate(keys):
            R[:, i, j] = alloc[:, t]
        return R.reshape(batch + lay.n_blocks), exact


def block_spectra(X, layout=None, *, method="block", n_blocks=1, n_jobs=None):
    """Singular values of every active block, batched like :func:`approximate`.

    Parameters
    ----------
    X : array-like of shape (m, n) or (..., m, n)
    layout : BlockLayout, optional
        Structure (ranks ignored); else built from ``method`` and ``n_blocks``.
    method, n_blocks, n_jobs
        As in :func:`approximate`.

    Returns
    -------
    BlockSpectra

    Examples
    --------
    >>> import numpy as np
    >>> from blocklowrank._engine import block_spectra, approximate
    >>> X = np.random.default_rng(0).standard_normal((3, 12, 12))
    >>> sp = block_spectra(X, method="block", n_blocks=2)
    >>> bool(np.allclose(sp.error(2), approximate(X, method="block", n_blocks=2, rank=2).error))
    True
    """
    X = validate_matrix(X)
    m, n = X.shape[-2:]
    lay = _resolve_layout((m, n), layout, method, n_blocks, False)
    if lay.permuted:
        X = lay.permute(X)
    lay = lay.with_ranks(0)
    groups_idx = lay.groups()
    blocks = _gather(X, lay, groups_idx)
    values = {}
    for shp, (ii, jj) in groups_idx.items():
        A = blocks[shp]
        flat = A.reshape((-1,) + shp)
        (s,) = _run_chunked(lambda a: (np.linalg.svd(a, compute_uv=False),), (flat,), _resolve_n_jobs(n_jobs))
        s = s.reshape(A.shape[:-2] + (min(shp),))
        for t, (i, j) in enumerate(zip(ii.tolist(), jj.tolist())):
            values[(i, j)] = s[..., t, :]
    E = _block_energies(X, lay)
    return BlockSpectra(lay, values, E, E.sum(axis=(-2, -1)))

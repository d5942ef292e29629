"""Rank allocation: per-block ranks from the blocks' spectra, at a budget or a target error.

Water-filling by gain per parameter (exact for equal block costs) and an exact
dynamic programme where block costs differ (uneven splits), with a greedy
fallback for problems too large for the programme, which says so.
"""

from __future__ import annotations

import numpy as np

from ._params import validate_params

__all__ = ["allocate_ranks", "no_worse_than_uniform"]

# Exact DP allocation is used for unequal block costs while
# n_batch * sum(max ranks) * (budget units) stays below this many cell updates.
_DP_LIMIT = 3e7


@validate_params("costs", "max_ranks", "budget", "max_error")
def allocate_ranks(gains, costs, max_ranks, *, budget=None, max_error=None, fixed_loss=None, total=None):
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
    max_error : float, optional
        Use the fewest parameters for which the relative error is
        ``<= max_error``. Needs ``fixed_loss`` (energy no rank can capture,
        e.g. inactive blocks), shape (B,), and ``total`` (``||X||_F^2``), shape (B,).

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
    keeps the ``t`` largest ``sigma^2`` over all blocks (exchange argument:
    any feasible choice with a component smaller than an unchosen one is
    improved or tied by swapping them, at equal cost). Water-filling is
    exactly optimal, for a budget and for a target error alike.

    *Unequal blocks* (uneven splits): the problem is a multiple-choice
    knapsack. While the dynamic programme over the parameter count is small
    (``B * sum(max ranks) * (count / gcd of costs)`` below about 3e7 cell
    updates) it is solved exactly: for a budget, the most energy within it;
    for a target error, the smallest count whose best allocation reaches it.
    Beyond that, greedy water-filling by gain per parameter is used and
    ``exact`` is False: for a budget every remaining component that still fits
    is added; for a target error the error is still ``<= max_error`` but the
    count may exceed the minimum.
    """
    gains, costs, max_ranks = _check_inputs(gains, costs, max_ranks)
    if (budget is None) == (max_error is None):
        raise ValueError("give exactly one of budget and max_error")
    if budget is not None:
        return _allocate(gains, costs, max_ranks, budget=budget)
    B = gains[0].shape[0]
    if fixed_loss is None or total is None:
        raise ValueError("max_error needs fixed_loss and total (energy no rank can keep, and ||X||^2)")
    try:
        fixed_loss = np.broadcast_to(np.asarray(fixed_loss, dtype=np.float64), (B,))
        total = np.broadcast_to(np.asarray(total, dtype=np.float64), (B,))
    except (TypeError, ValueError):
        raise ValueError(f"max_error needs fixed_loss and total, one number per matrix ({B})") from None
    return _allocate(gains, costs, max_ranks, max_error=max_error, fixed_loss=fixed_loss, total=total)


def _check_inputs(gains, costs, max_ranks):
    """Gains: non-empty list of finite, non-negative (B, L) arrays, each non-increasing; one
    cost and one max rank per block (their entries are checked by the decorator)."""
    if not isinstance(gains, (list, tuple)) or not gains:
        raise ValueError("gains must be a non-empty list of (B, L) arrays, one per block")
    gains = [np.asarray(g, dtype=np.float64) for g in gains]
    if any(g.ndim != 2 or g.shape[0] != gains[0].shape[0] for g in gains):
        raise ValueError("gains must be 2-D arrays (B, L) with the same B (matrices) for every block")
    for g in gains:
        if not np.all(np.isfinite(g)) or np.any(g < 0):
            raise ValueError("gains must be finite and non-negative (squared singular values)")
        if np.any(np.diff(g, axis=1) > 0):
            raise ValueError("each block's gains must be sorted in decreasing order")
    if not (len(costs) == len(max_ranks) == len(gains)):
        raise ValueError(
            f"gains, costs and max_ranks need one entry per block, got lengths "
            f"{len(gains)}, {len(costs)} and {len(max_ranks)}"
        )
    return gains, costs, max_ranks


def _allocate(gains, costs, max_ranks, *, budget=None, max_error=None, fixed_loss=None, total=None):
    """:func:`allocate_ranks` on validated input (the engine calls this directly)."""
    costs = np.asarray(costs, dtype=np.int64)
    nb = len(gains)
    B = gains[0].shape[0]
    Ls = [int(min(g.shape[1], mr)) for g, mr in zip(gains, max_ranks)]
    gains = [np.maximum(g[:, :L], 0.0).astype(np.float64) for g, L in zip(gains, Ls)]
    block_id = np.concatenate([np.full(L, b) for b, L in enumerate(Ls)]).astype(np.int64)
    G = np.concatenate(gains, axis=1) if block_id.size else np.zeros((B, 0))
    item_cost = costs[block_id]
    equal = bool(np.all(costs == costs[0]))
    units = int(np.gcd.reduce(costs))
    if budget is not None:
        if equal:
            return _take_top(G, block_id, nb, budget // int(costs[0])), True
        cells = B * sum(min(L, budget // int(c)) for L, c in zip(Ls, costs)) * (budget // units + 1)
        if cells <= _DP_LIMIT:
            dp, choices = _dp_tables(gains, costs, budget // units, units)
            return _dp_backtrack(choices, np.full(B, budget // units)), True
        return _greedy_budget(G, block_id, item_cost, nb, budget), False
    # target error: minimal cost so that fixed_loss + discarded <= max_error^2 * total
    allowed = max_error * max_error * total * (1 + 1e-12) - fixed_loss  # (B,) block energy we may drop
    if not equal:
        P = int(sum(L * int(c) for L, c in zip(Ls, costs))) // units
        if B * sum(Ls) * (P + 1) <= _DP_LIMIT:
            dp, choices = _dp_tables(gains, costs, P, units)
            need = G.sum(axis=1) - allowed  # energy the blocks must keep
            ok = dp >= need[:, None] * (1 - 1e-15)
            p = np.where(ok.any(axis=1), np.argmax(ok, axis=1), P)  # full rank if rounding denies all
            return _dp_backtrack(choices, p), True
    ratio = G / item_cost[None, :]
    order = np.argsort(-ratio, axis=1, kind="stable")
    Gs = np.take_along_axis(G, order, axis=1)
    # tail[t] = energy discarded when the first t sorted components are kept
    tail = np.concatenate([np.cumsum(Gs[:, ::-1], axis=1)[:, ::-1], np.zeros((B, 1))], axis=1)
    t = np.argmax(tail <= allowed[:, None], axis=1)
    sel_mask = np.arange(G.shape[1])[None, :] < t[:, None]
    chosen_block = block_id[order]
    ranks = np.zeros((B, nb), dtype=np.int64)
    for b in range(nb):
        ranks[:, b] = np.sum(sel_mask & (chosen_block == b), axis=1)
    return ranks, equal


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


def _dp_tables(gains, costs, P, units):
    """Multiple-choice knapsack over blocks, vectorised over the batch.

    ``dp[:, p]`` is the most energy any allocation of at most ``p * units``
    parameters keeps; ``choices`` lets :func:`_dp_backtrack` recover it.
    """
    B = gains[0].shape[0]
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
    return dp, choices


def _dp_backtrack(choices, p):
    """Per-block ranks of the DP's best allocation within ``p`` units (per matrix)."""
    B = p.shape[0]
    ranks = np.zeros((B, len(choices)), dtype=np.int64)
    p = p.copy()
    rows = np.arange(B)
    for b in range(len(choices) - 1, -1, -1):
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


def no_worse_than_uniform(alloc, gains, costs, maxr, budget):
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

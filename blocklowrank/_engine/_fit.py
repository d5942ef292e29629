"""The engine's public entry: :func:`fit_layout` checks its arguments and dispatches (plain or in a data metric)."""

from __future__ import annotations

import numpy as np
from sklearn.utils import check_random_state

from .._metric import BCD_TOL
from .._params import SVD_OPTIONS, validate_params
from .._validation import OptionError, validate_matrix
from ..layout import BlockLayout
from ._metric import fit_layout_metric
from ._plain import _fit_layout

__all__ = ["fit_layout"]


def _rank_mode(layout, rank, budget, max_error, cap_rank):
    """The one rank rule given (``("rank" | "budget" | "max_error" | "layout", value)``), checked
    against the layout (the values' own rules are checked by :func:`fit_layout`'s decorator)."""
    given = [p for p, v in (("rank", rank), ("budget", budget), ("max_error", max_error)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give only one of rank, budget and max_error (got {', '.join(given)})")
    if not given:
        if layout.n_params == 0:
            raise ValueError("give one of rank, budget or max_error (or a layout with ranks)")
        return "layout", None
    if given[0] == "budget":
        cheapest = int(layout.block_costs[layout.active].min())
        if budget < cheapest:
            raise ValueError(
                f"budget={budget} is below the cheapest configuration of this layout: one "
                f"rank-1 block costs {cheapest} parameters"
            )
        return "budget", budget
    if given[0] == "max_error":
        return "max_error", max_error
    r = rank if np.ndim(rank) == 0 else np.asarray(rank)
    if np.ndim(r) and r.shape != layout.n_blocks:
        raise ValueError(f"per-block rank must have shape {layout.n_blocks} (the grid), got {r.shape}")
    rr = np.where(layout.active, np.broadcast_to(np.asarray(r), layout.active.shape), 0)
    over = np.argwhere(rr > layout.max_ranks)
    if over.size and not cap_rank:
        i, j = (int(v) for v in over[0])
        raise OptionError(
            f"rank {int(rr[i, j])} exceeds the smaller side of block ({i}, {j}), which is "
            f"{layout.row_sizes[i]}x{layout.col_sizes[j]} (max rank {int(layout.max_ranks[i, j])}); lower "
            "«rank», use fewer blocks («n_blocks»), or pass «cap_rank=True» to cap each block's rank at its "
            "smaller side"
        )
    lay = layout.with_ranks(r, cap_rank=cap_rank)
    if lay.n_params == 0:
        raise ValueError("per-block ranks are all zero")
    return "layout", lay


@validate_params(
    "rank", "budget", "max_error", "cap_rank", "gram_damping", "max_iter", "tol", *SVD_OPTIONS, layout=[BlockLayout]
)
def fit_layout(
    X, layout, *, rank=None, budget=None, max_error=None,
    svd_solver="auto", n_oversamples=10, iterated_power="auto", random_state=None, cap_rank=False, n_jobs=None,
    input_gram=None, output_gram=None, gram_damping=None, max_iter=100, tol=BCD_TOL, structure=None,
):  # fmt: skip
    """Fit every active block of ``layout`` by its truncated SVD (the engine's public entry).

    Parameters and result as :func:`blocklowrank.approximate`, with the layout
    given (use ``approximate`` to name a structure instead). ``max_iter`` and
    ``tol`` only serve the block-coordinate descent of a fit in a data metric
    whose blocks do not decouple.
    """
    X = validate_matrix(X)
    if tuple(layout.shape) != tuple(X.shape[-2:]):
        raise ValueError(f"layout is for shape {layout.shape} but X has shape {tuple(X.shape[-2:])}")
    mode, value = _rank_mode(layout, rank, budget, max_error, cap_rank)
    if mode == "layout":
        layout, value = (value or layout), None
    svd = (svd_solver, n_oversamples, iterated_power)
    if svd_solver == "randomized" and mode == "max_error":
        raise ValueError("max_error needs every singular value: use svd_solver='full' or 'auto'")
    rng = check_random_state(random_state)
    if input_gram is None and output_gram is None:
        return _fit_layout(X, layout, mode, value, svd, rng, n_jobs, structure)
    metric = (input_gram, output_gram, gram_damping)
    return fit_layout_metric(X, layout, mode, value, svd, rng, n_jobs, structure, metric, (max_iter, tol))

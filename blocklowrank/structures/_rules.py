"""Budget -> configuration rules shared by the structures.

A rule answers, for a matrix shape and the grid sizes ``ks`` to try: which
configurations spend a budget (exactly, or the nearest below), which is the
cheapest one, which is the largest one below full rank, and which counts are
reachable at all (the points where structures compare at equal counts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LinearBudget", "allowed_ranks", "record"]


def allowed_ranks(ranks, rmax):
    """Ranks 1..rmax, or those of ``ranks`` (a sorted list) that are <= rmax."""
    return range(1, rmax + 1) if ranks is None else [r for r in ranks if r <= rmax]


def record(name, K, rank, n_params, budget, **extra):
    """One configuration record (the columns of :func:`~blocklowrank.budget.match_budget`)."""
    return {
        "method": name,
        "n_blocks": K,
        "rank": rank,
        "n_params": int(n_params),
        "budget": budget,
        "exact": int(n_params) == budget,
        **extra,
    }


@dataclass(frozen=True)
class LinearBudget:
    """Counts linear in one uniform rank: ``rank * unit(shape, K)`` for ``1 <= rank <= rmax(shape, K)``.

    ``rmax`` is the largest rank that is not over-parameterised: below the
    smallest side of an active block (such a block would be cheaper dense).
    """

    unit: Callable
    rmax: Callable

    def parts(self, shape, ks):
        return [(K, self.unit(shape, K), self.rmax(shape, K)) for K in ks]

    def records(self, name, shape, budget, ks, ranks):
        out = []
        for K, unit, rmax in self.parts(shape, ks):  # the rank that spends the budget, if valid
            r = budget // unit if ranks is None else max([r for r in ranks if r * unit <= budget], default=0)
            if 1 <= r <= rmax:
                out.append(record(name, K, r, r * unit, budget))
        return out

    def over(self, name, shape, budget, ks, ranks):
        """Records that spend the budget at rank ``rmax + 1``: a rank equal to an active block's
        smallest side, valid but over-parameterised (the records :meth:`records` leaves out)."""
        out = []
        for K, unit, rmax in self.parts(shape, ks):
            r = budget // unit if ranks is None else max([r for r in ranks if r * unit <= budget], default=0)
            if r == rmax + 1:
                out.append({**record(name, K, r, r * unit, budget), "over": True})
        return out

    def cheapest(self, shape, ks, ranks):
        """``(count, K, rank)`` of the cheapest valid configuration, or None."""
        best = None
        for K, unit, rmax in self.parts(shape, ks):
            r = next(iter(allowed_ranks(ranks, rmax)), None)
            if r is not None and (best is None or r * unit < best[0]):
                best = (r * unit, K, r)
        return best

    def largest(self, shape, ks, ranks, budget):
        """``(count, K)`` of the largest valid configuration within the budget."""
        best = (0, None)
        for K, unit, rmax in self.parts(shape, ks):
            r = (
                min(rmax, budget // unit)
                if ranks is None
                else max([r for r in ranks if r <= rmax and r * unit <= budget], default=0)
            )
            if r >= 1 and r * unit > best[0]:
                best = (r * unit, K)
        return best

    def reachable(self, shape, ks, ranks):
        return {r * unit for K, unit, rmax in self.parts(shape, ks) for r in allowed_ranks(ranks, rmax)}

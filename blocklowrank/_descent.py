"""The one stopping loop of every iterative fit: a monotone descent over a stack of problems.

:func:`descend` is block-coordinate descent over a stack of N problems, each
with its own trace and stopping rule. A *pass* runs a sequence of steps; a
step proposes new values for some of its variables and returns the objective
(a relative error) each problem would have with them. The loop accepts a
proposal unless it raises that problem's objective by more than rounding
(``STEP_TOL``): the objective then never increases, and a problem whose step
would raise it stops with ``"increase"`` (the previous iterate is kept). A
problem stops with ``"tol"`` when a pass improves its objective by a fraction
``<= tol`` (or the objective is zero to rounding), with ``"max_iter"`` after
``max_iter`` passes. **The initial pass, run by the caller, counts as the
first**: ``n_iter`` is the number of passes, the start included, so
``max_iter=1`` keeps the start.

It serves the hybrid and shared-basis fits (plain and in a data metric), the
block-coordinate descent of block structures in a data metric and the
majorisation-minimisation of the shared basis there. numpy and ``STEP_TOL``
only: it sits in the layout layer, below everything that iterates.
"""

from __future__ import annotations

import numpy as np

from ._linalg import STEP_TOL

__all__ = ["Trace", "descend"]


class Trace:
    """The record of an iterative fit of N problems: every matrix's objective after each accepted step.

    Attributes
    ----------
    errors : ndarray of shape (N, width)
        NaN past each matrix's last entry.
    length : ndarray of int, shape (N,)
        Entries recorded per matrix.
    n_iter : ndarray of int, shape (N,)
        Passes run per matrix, the initial one counted.
    stop : ndarray of str, shape (N,)
        Why each matrix stopped ("max_iter" until a rule fires).
    """

    def __init__(self, n, width):
        self.errors = np.full((n, width), np.nan)
        self.length = np.zeros(n, dtype=np.int64)
        self.n_iter = np.ones(n, dtype=np.int64)
        self.stop = np.full(n, "max_iter", dtype="<U8")

    def record(self, ids, errors):
        """Append ``errors`` to the traces of the matrices ``ids``."""
        self.errors[ids, self.length[ids]] = errors
        self.length[ids] += 1

    def last(self, ids):
        """The last recorded objective of the matrices ``ids``."""
        return self.errors[ids, self.length[ids] - 1]

    def replace_last(self, errors):
        """Overwrite every matrix's last entry (e.g. with an objective recomputed more accurately)."""
        self.errors[np.arange(len(self.length)), self.length - 1] = errors

    def arrays(self):
        """``(errors, n_iter, stop)``: arrays over the stack (to join the traces of chunks)."""
        return self.errors, self.n_iter, self.stop

    @classmethod
    def from_arrays(cls, errors, n_iter, stop):
        """The trace of :meth:`arrays` (e.g. joined over chunks of a stack)."""
        trace = cls(len(n_iter), errors.shape[1])
        trace.errors, trace.n_iter, trace.stop = errors, n_iter, stop
        trace.length = np.sum(~np.isnan(errors), axis=1)
        return trace


def descend(trace, steps, *, max_iter, tol):
    """Passes 2 to ``max_iter`` of a monotone descent, each matrix stopping on its own rule.

    Parameters
    ----------
    trace : Trace
        Holds the objective after the initial pass; updated in place.
    steps : sequence of callable
        One pass runs them in order. ``step(ids) -> (objective, commit)``:
        the objective of each matrix of ``ids`` (int array, ascending) with the
        step's proposal, and ``commit(accepted)`` to store the proposal for the
        matrices ``ids[accepted]``. A matrix whose step is refused takes no
        further step in the pass and stops.
    max_iter : int
    tol : float
        Stop a matrix when a pass improves its objective by a fraction ``<= tol``.
    """
    active = np.arange(len(trace.n_iter))
    for _ in range(max_iter - 1):
        done = trace.last(active) <= STEP_TOL  # exact to rounding: nothing left to improve
        trace.stop[active[done]] = "tol"
        active = active[~done]
        if active.size == 0:
            break
        before = trace.last(active)
        ok = np.ones(active.size, dtype=bool)
        for step in steps:
            ids = active[ok]
            if ids.size == 0:
                break
            objective, commit = step(ids)
            up = objective > trace.last(ids) + STEP_TOL
            commit(~up)
            trace.record(ids[~up], objective[~up])
            ok[np.flatnonzero(ok)[up]] = False
        trace.stop[active[~ok]] = "increase"
        good, before = active[ok], before[ok]
        trace.n_iter[good] += 1
        converged = (before - trace.last(good)) <= tol * before
        trace.stop[good[converged]] = "tol"
        active = good[~converged]

"""What every fit returns: the container of its factors and a report of how it went."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["FitReport", "Approximation"]


@dataclass(frozen=True, eq=False)
class FitReport:
    """How a fit went, beside its factors (for a stack, arrays over the stack).

    Attributes
    ----------
    error : float or ndarray
        Relative Frobenius error ``||X - X_hat||_F / ||X||_F`` (0.0 for X = 0),
        also for fits in a data metric.
    output_error : float or ndarray
        The relative output error ``sqrt(f(X_hat) / f(0))`` in the data metric
        ``f(M) = tr(H (X - M) G (X - M)^T)`` of the fit (``input_gram`` ``G``,
        ``output_gram`` ``H``; undamped): with ``G = X_in^T X_in / N`` and ``H``
        absent, ``||(X - X_hat) X_in^T|| / ||X X_in^T||``, the error of the
        layer's outputs on its calibration inputs. Without a Gram it **equals**
        ``error`` (the plain metric, ``G = H = I``).
    discarded_energy, total_energy : float or ndarray
        ``||X - X_hat||_F^2`` and ``||X||_F^2``.
    objective, total_objective : float or ndarray or None
        With a Gram: the damped objective ``f_delta(X_hat)`` the fit minimised
        and ``f_delta(0)`` (``G + delta mean(diag G) I``, ``H`` likewise);
        None without one.
    gram_damping : float or None
        The damping ``delta`` used (None without a Gram).
    svd_solver : dict
        Always a dict, in every fit: the shape ``(rows, columns)`` of the
        matrices a fit decomposed (its blocks; for the hybrid, also the whole
        matrix of its global steps; for shared bases, the block-rows and
        block-columns of its SVD start) -> the solver that ran on them,
        "full" or "randomized" ("auto" resolved to the one it kept;
        "full+randomized" when the steps of an iterative fit used both).
        Empty when no SVD ran (shared bases from a random start).
    exact_allocation : bool or None
        For a budget or a target error: whether the rank allocation is provably
        optimal (see :func:`~blocklowrank.allocate_ranks`); None otherwise.
    singular_values : dict or None
        ``{(i, j): sigma}`` computed for each active block (SVD structures; in a
        data metric, the spectrum of the block's target in its metric).
    error_trace, n_iter, stop_reason
        Iterative fits: the relative error after every accepted step (in a
        data metric, the damped ``sqrt(f_delta / f_delta(0))``), passes run
        (the start counted as the first) and why they stopped; None for the
        one-pass fits.
    """

    error: object
    discarded_energy: object = None
    total_energy: object = None
    svd_solver: dict = field(default_factory=dict)
    exact_allocation: object = None
    singular_values: dict = None
    error_trace: object = None
    n_iter: object = None
    stop_reason: object = None
    output_error: object = None
    objective: object = None
    total_objective: object = None
    gram_damping: object = None

    def __post_init__(self):
        if self.output_error is None:  # no Gram: the plain metric
            object.__setattr__(self, "output_error", self.error)


class Approximation:
    """What every fit returns: its :class:`~blocklowrank.factors.StructuredFactors`
    (``.factors``) and its :class:`FitReport` (``.report``).

    The report's fields (``error``, ``output_error``, ``error_trace``, ...) and
    the container's (``layout``, ``ranks``, ``n_params``, ``global_factors``,
    ``shared``, ...) read as attributes of the result. ``reconstruction`` is
    the dense approximation, built on first access.
    """

    def __init__(self, factors, report):
        self.factors = factors
        self.report = report
        self._dense = None

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        for src in (self.__dict__.get("report"), self.__dict__.get("factors")):
            if src is not None and hasattr(src, name):
                return getattr(src, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def ranks(self):
        return self.factors.ranks.copy() if self.factors.batch_shape else self.factors.layout.ranks.copy()

    @property
    def reconstruction(self):
        if self._dense is None:
            self._dense = self.factors.to_dense()
        return self._dense

    def to_dense(self):
        """The dense approximation (same as :attr:`reconstruction`)."""
        return self.reconstruction

    def block_factors(self, i, j):
        """``(B_ij, A_ij)`` of block ``(i, j)``."""
        return self.factors[(i, j)]

    def __repr__(self):
        err = self.error if np.ndim(self.error) == 0 else f"array{np.shape(self.error)}"
        return f"Approximation({self.factors!r}, error={err})"

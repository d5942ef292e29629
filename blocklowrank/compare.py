"""Fit every candidate configuration at a parameter budget and rank them by error."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ._engine import BlockSpectra, _block_energies, block_spectra, fit_layout
from ._metric import as_gram
from ._params import SVD_OPTIONS, validate_params
from ._validation import validate_matrix
from .budget import RecordList, check_methods, match_budget
from .structures import get_structure

__all__ = ["compare_at_budget", "COMPARE_COLUMNS"]

#: Columns of the records returned by :func:`compare_at_budget` (plus the structures' extra keys).
COMPARE_COLUMNS = (
    "method",
    "n_blocks",
    "rank",
    "allocation",
    "n_params",
    "budget",
    "exact",
    "error",
    "errors",
    "output_error",
    "output_errors",
    "n_params_each",
    "block_ranks",
    "proven_optimal",
)


@validate_params(
    "budget",
    "exact",
    "include_optimal",
    "fit_options",
    "gram_damping",
    *SVD_OPTIONS,
    n_blocks="grid_sizes",
    ranks="ranks",
)
def compare_at_budget(
    X, budget, *, methods=None, n_blocks=None, ranks=None, exact=False, include_optimal=True,
    svd_solver="auto", n_oversamples=10, iterated_power="auto", random_state=None, n_jobs=None,
    fit_options=None, spectra=None, input_gram=None, output_gram=None, gram_damping=None,
):  # fmt: skip
    """Fit every configuration at a parameter budget and rank them by error.

    The configurations are those of :func:`~blocklowrank.budget.match_budget`.
    With ``include_optimal``, every partition of a layout structure (global,
    diagonal, block) is also fitted with budget-optimal per-block ranks. Layout
    structures with the exact solver need only singular values (Eckart-Young):
    one batched spectrum per partition serves its uniform rows and its optimal
    row. Other structures are fitted with their own fit function on the whole
    stack at once.

    Parameters
    ----------
    X : array-like of shape (m, n) or (..., m, n)
    budget : int
        Number of parameters (per matrix).
    methods, n_blocks, ranks, exact
        Select configurations, as in :func:`~blocklowrank.budget.match_budget`.
    include_optimal : bool, default=True
    svd_solver, n_oversamples, iterated_power, random_state, n_jobs
        Passed to every fit.
    fit_options : dict, optional
        ``max_iter`` and/or ``tol`` for the iterative fits.
    spectra : iterable of BlockSpectra, optional
        Spectra of ``X`` already computed (e.g. by the checkpoint study), used
        where their layout is the one a partition needs (ranks ignored) with
        ``svd_solver`` "auto" or "full"; checked against ``X``'s block energies
        (the spectra of another matrix are refused). Each partition's spectrum is computed
        once in any case: two structures with the same layout (global and a
        1 x 1 block grid) share it. Not with a Gram.
    input_gram, output_gram, gram_damping : optional
        Compare in a data metric (see :func:`blocklowrank.approximate`): every
        configuration is fitted in it (the Grams are factorised once), rows
        carry ``output_error`` beside the Frobenius ``error`` and are ranked by
        ``output_error``; the optimal rows allocate on the metric spectra.

    Returns
    -------
    records : RecordList of dict
        Sorted by ``output_error`` (without a Gram: ``error``; ties by
        ``n_params``, structure, ``n_blocks``, uniform before optimal). Keys:
        ``method``, ``n_blocks``; ``rank``, the
        uniform rank (None on an allocation row, whose ranks are in
        ``block_ranks``); ``allocation`` ("uniform" or "optimal");
        ``n_params`` (for a stack, the largest); ``budget``; ``exact`` (count
        equals the budget for every matrix); ``error`` (for a stack, the
        mean); ``errors`` and ``n_params_each`` (per matrix); ``output_error``
        and ``output_errors`` (in the data metric; equal to ``error`` and
        ``errors`` without a Gram); ``block_ranks``;
        ``proven_optimal`` (allocation rows: see
        :func:`~blocklowrank.allocate_ranks`; None otherwise);
        plus the structures' extra keys (``global_rank``).

    Notes
    -----
    With the exact solver, an allocation row is never worse than a uniform
    row of the same partition: the uniform ranks are one of the allocations
    the optimiser considers.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).standard_normal((28, 28))
    >>> for r in compare_at_budget(X, 224, n_blocks=[2, 4])[:4]:
    ...     print(r["method"], r["n_blocks"], r["rank"], r["allocation"], r["n_params"], f"{r['error']:.3f}")
    block 4 None optimal 224 0.754
    block 4 1 uniform 224 0.766
    global 1 4 uniform 224 0.767
    global 1 None optimal 224 0.767
    >>> S = np.random.default_rng(1).standard_normal((5, 28, 28))
    >>> res = compare_at_budget(S, 224, methods=["global", "hybrid", "shared_basis"], n_blocks=[2])
    >>> [(r["method"], r["rank"], r["global_rank"], r["n_params"]) for r in res]  # doctest: +NORMALIZE_WHITESPACE
    [('hybrid', 1, 2, 224), ('global', 4, None, 224), ('global', None, None, 224),
     ('shared_basis', 3, None, 180)]
    """
    X = validate_matrix(X)
    metric = _metric_options(X, input_gram, output_gram, gram_damping, spectra)
    methods = check_methods(methods)
    matched = match_budget(X.shape[-2:], budget, methods=methods, n_blocks=n_blocks, ranks=ranks, exact=exact)
    svd = dict(zip(SVD_OPTIONS, (svd_solver, n_oversamples, iterated_power, random_state, n_jobs), strict=True))
    cmp = _Comparison(X, matched, matched[0]["budget"] if matched else budget, svd, fit_options or {}, spectra, metric)
    rows, partitions = [], {}
    for rec in matched:
        s = get_structure(rec["method"])
        rows.append(cmp.uniform(s, rec))
        if s.spectral:
            partitions.setdefault((s.name, rec["n_blocks"]), rec)
    if include_optimal:
        rows += [cmp.optimal(get_structure(name), rec) for (name, _), rec in partitions.items()]
    order = {mth: t for t, mth in enumerate(methods)}
    rows.sort(
        key=lambda d: (
            d["output_error"],
            d["error"],
            d["n_params"],
            order[d["method"]],
            d["n_blocks"],
            d["allocation"] == "optimal",
        )
    )
    return RecordList(rows, columns=COMPARE_COLUMNS + cmp.extra)


class _Comparison:
    """The fits of :func:`compare_at_budget` on one X: rows, and the spectra shared by equal layouts."""

    def __init__(self, X, matched, budget, svd, fit_options, spectra, metric):
        self.X, self.batch, self.budget, self.svd, self.fit_options = X, X.shape[:-2], budget, svd, fit_options
        self.extra = tuple(k for k in matched.columns if k not in COMPARE_COLUMNS)
        self.metric = metric  # {} (plain) or the Grams as GramFactors: every row is fitted in the metric
        self.spectral = svd["svd_solver"] in ("auto", "full") and not metric  # exact spectra: errors without factors
        self.cache = _known_spectra(X, spectra)  # (layout without ranks, BlockSpectra), matched by layout

    def spectra_of(self, lay):
        lay0 = lay.with_ranks(0)
        for known, sp in self.cache:
            if known == lay0:
                return sp
        self.cache.append((lay0, block_spectra(self.X, lay, n_jobs=self.svd["n_jobs"])))
        return self.cache[-1][1]

    def row(self, rec, rank, allocation, n_each, err_each, block_ranks, proven, out_each=None):
        out_each = err_each if out_each is None else out_each
        if self.batch:
            n_each = np.broadcast_to(n_each, self.batch).copy()
        else:
            n_each, err_each, out_each = int(n_each), float(err_each), float(out_each)
        return {
            "method": rec["method"],
            "n_blocks": rec["n_blocks"],
            "rank": rank,
            "allocation": allocation,
            "n_params": int(np.max(n_each)),
            "budget": self.budget,
            "exact": bool(np.all(np.asarray(n_each) == self.budget)),
            "error": float(np.mean(err_each)),
            "errors": err_each,
            "output_error": float(np.mean(out_each)),
            "output_errors": out_each,
            "n_params_each": n_each,
            "block_ranks": block_ranks,
            "proven_optimal": proven,
            **{k: rec.get(k) for k in self.extra},
        }

    def uniform(self, s, rec):
        """The row of a matched configuration: from the spectra, or fitted."""
        if not s.spectral:
            opts = {k: v for k, v in {**self.svd, **self.fit_options}.items() if k in s.options}
            config = {k: rec[k] for k in s.extra}
            res = s.fit(self.X, n_blocks=rec["n_blocks"], rank=rec["rank"], **config, **opts, **self.metric)
            ranks = np.array(res.layout.ranks)
            return self.row(rec, rec["rank"], "uniform", res.factors.n_params, res.error, ranks, None, res.output_error)
        lay = s.layout(self.X.shape[-2:], rec["n_blocks"])
        lay_r = lay.with_ranks(rec["rank"])
        if self.spectral:
            err = out = self.spectra_of(lay).error(lay_r.ranks)
        else:
            res = fit_layout(self.X, lay_r, **self.svd, **self._iters(s), **self.metric)
            err, out = res.error, res.output_error
        return self.row(rec, rec["rank"], "uniform", lay_r.n_params, err, np.array(lay_r.ranks), None, out)

    def _iters(self, s):
        return {k: v for k, v in self.fit_options.items() if k in s.options} if self.metric else {}

    def optimal(self, s, rec):
        """The row of a partition of a layout structure with budget-optimal per-block ranks."""
        lay = s.layout(self.X.shape[-2:], rec["n_blocks"])
        if self.spectral:
            sp = self.spectra_of(lay)
            R, proven = sp.allocate(self.budget)
            return self.row(rec, None, "optimal", sp.n_params(R), sp.error(R), R, bool(proven))
        res = fit_layout(self.X, lay, budget=self.budget, **self.svd, **self._iters(s), **self.metric)
        proven = bool(res.exact_allocation)
        return self.row(rec, None, "optimal", res.n_params, res.error, res.ranks, proven, res.output_error)


def _metric_options(X, input_gram, output_gram, gram_damping, spectra):
    """The fits' metric options: the Grams factorised once (``{}`` without a Gram)."""
    if input_gram is None and output_gram is None:
        return {}
    if spectra is not None:
        raise ValueError("spectra= serves plain comparisons: give no spectra with input_gram/output_gram")
    m, n = X.shape[-2:]
    out = {"input_gram": as_gram(input_gram, n, damping=gram_damping, name="input_gram")}
    if output_gram is not None:
        out["output_gram"] = as_gram(output_gram, m, damping=gram_damping, name="output_gram")
    return out


def _known_spectra(X, spectra):
    """``[(layout without ranks, BlockSpectra)]`` of the spectra given, each checked to be X's."""
    batch, shape = X.shape[:-2], X.shape[-2:]
    if spectra is not None and not isinstance(spectra, Iterable):
        raise TypeError(f"spectra must be an iterable of BlockSpectra, got {spectra!r}")
    known = []
    for sp in () if spectra is None else spectra:
        if (
            not isinstance(sp, BlockSpectra)
            or tuple(sp.layout.shape) != tuple(shape)
            or sp.block_energy.shape[:-2] != batch
        ):
            raise ValueError(f"spectra must hold BlockSpectra of matrices shaped like X {X.shape}, got {sp!r}")
        # the spectra of another matrix would give wrong errors silently: its block energies tell
        Xp = sp.layout.permute(X) if sp.layout.permuted else X
        if not np.allclose(
            sp.block_energy,
            _block_energies(Xp, sp.layout),
            rtol=1e-5,
            atol=1e-5 * float(np.max(sp.total_energy, initial=0.0)),
        ):
            raise ValueError("spectra must be those of X: the block energies of a given BlockSpectra differ from X's")
        known.append((sp.layout.with_ranks(0), sp))
    return known

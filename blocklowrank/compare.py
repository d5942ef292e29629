"""Fit every candidate configuration at a parameter budget and rank them by error."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ._engine import BlockSpectra, _block_energies, block_spectra, fit_layout
from ._svd import check_svd_options
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
    "n_params_each",
    "block_ranks",
    "proven_optimal",
)

#: Options of the iterative fits that compare_at_budget passes on (fit_options).
_FIT_OPTIONS = ("max_iter", "tol")


def compare_at_budget(
    X,
    budget,
    *,
    methods=None,
    n_blocks=None,
    ranks=None,
    exact=False,
    include_optimal=True,
    svd_solver="auto",
    n_oversamples=10,
    iterated_power="auto",
    random_state=None,
    n_jobs=None,
    fit_options=None,
    spectra=None,
):
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
        1 x 1 block grid) share it.

    Returns
    -------
    records : RecordList of dict
        Sorted by ``error`` (ties by ``n_params``, structure, ``n_blocks``,
        uniform before optimal). Keys: ``method``, ``n_blocks``; ``rank``, the
        uniform rank (None on an allocation row, whose ranks are in
        ``block_ranks``); ``allocation`` ("uniform" or "optimal");
        ``n_params`` (for a stack, the largest); ``budget``; ``exact`` (count
        equals the budget for every matrix); ``error`` (for a stack, the
        mean); ``errors`` and ``n_params_each`` (per matrix); ``block_ranks``;
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
    batch, shape = X.shape[:-2], X.shape[-2:]
    if not isinstance(include_optimal, (bool, np.bool_)):
        raise TypeError(f"include_optimal must be a bool, got {include_optimal!r}")
    fit_options = {} if fit_options is None else fit_options
    if not isinstance(fit_options, dict) or set(fit_options) - set(_FIT_OPTIONS):
        raise ValueError(f"fit_options must be a dict with keys among {_FIT_OPTIONS}, got {fit_options!r}")
    check_svd_options(svd_solver, n_oversamples, iterated_power)
    methods = check_methods(methods)
    matched = match_budget(shape, budget, methods=methods, n_blocks=n_blocks, ranks=ranks, exact=exact)
    extra = tuple(k for k in matched.columns if k not in COMPARE_COLUMNS)
    budget = matched[0]["budget"] if matched else int(budget)
    svd = dict(
        svd_solver=svd_solver,
        n_oversamples=n_oversamples,
        iterated_power=iterated_power,
        random_state=random_state,
        n_jobs=n_jobs,
    )
    spectral = svd_solver in ("auto", "full")

    def each(value):
        return np.broadcast_to(value, batch).copy() if batch else value

    def row(rec, rank, allocation, n_each, err_each, block_ranks, proven):
        if not batch:
            n_each, err_each = int(n_each), float(err_each)
        return {
            "method": rec["method"],
            "n_blocks": rec["n_blocks"],
            "rank": rank,
            "allocation": allocation,
            "n_params": int(np.max(n_each)),
            "budget": budget,
            "exact": bool(np.all(np.asarray(n_each) == budget)),
            "error": float(np.mean(err_each)),
            "errors": err_each,
            "n_params_each": n_each,
            "block_ranks": block_ranks,
            "proven_optimal": proven,
            **{k: rec.get(k) for k in extra},
        }

    cache = []  # (layout without ranks, BlockSpectra): matched by layout equality
    if spectra is not None and not isinstance(spectra, Iterable):
        raise TypeError(f"spectra must be an iterable of BlockSpectra, got {spectra!r}")
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
        cache.append((sp.layout.with_ranks(0), sp))

    def spectra_of(lay):
        lay0 = lay.with_ranks(0)
        for known, sp in cache:
            if known == lay0:
                return sp
        cache.append((lay0, block_spectra(X, lay, n_jobs=n_jobs)))
        return cache[-1][1]

    rows, partitions = [], []
    for rec in matched:
        s, K = get_structure(rec["method"]), rec["n_blocks"]
        config = {k: rec[k] for k in s.extra}
        if not s.spectral:
            opts = {k: v for k, v in {**svd, **fit_options}.items() if k in s.options}
            res = s.fit(X, n_blocks=K, rank=rec["rank"], **config, **opts)
            rows.append(
                row(
                    rec, rec["rank"], "uniform", each(res.factors.n_params), res.error, np.array(res.layout.ranks), None
                )
            )
            continue
        lay = s.layout(shape, K)
        lay_r = lay.with_ranks(rec["rank"])
        if spectral:
            sp = spectra_of(lay)
            rows.append(
                row(
                    rec,
                    rec["rank"],
                    "uniform",
                    each(lay_r.n_params),
                    sp.error(lay_r.ranks),
                    np.array(lay_r.ranks),
                    None,
                )
            )
        else:
            res = fit_layout(X, lay_r, **svd)
            rows.append(row(rec, rec["rank"], "uniform", res.n_params, res.error, np.array(lay_r.ranks), None))
        if (s.name, K) not in [p[:2] for p in partitions]:
            partitions.append((s.name, K, lay, rec))
    for _name, _K, lay, rec in partitions if include_optimal else ():
        if spectral:
            sp = spectra_of(lay)
            R, proven = sp.allocate(budget)
            rows.append(row(rec, None, "optimal", sp.n_params(R), sp.error(R), R, bool(proven)))
        else:
            res = fit_layout(X, lay, budget=budget, **svd)
            rows.append(row(rec, None, "optimal", res.n_params, res.error, res.ranks, bool(res.exact_allocation)))
    order = {mth: t for t, mth in enumerate(methods)}
    rows.sort(
        key=lambda d: (d["error"], d["n_params"], order[d["method"]], d["n_blocks"], d["allocation"] == "optimal")
    )
    return RecordList(rows, columns=COMPARE_COLUMNS + extra)

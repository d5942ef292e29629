"""The checks every registered structure passes: :func:`check_structure`.

A new structure (see :mod:`blocklowrank.structures`) is checked with one call,
``check_structure("name")``. :func:`structure_estimators` and
:func:`expected_failed_checks` give scikit-learn's ``parametrize_with_checks``
the estimators of every structure and the checks that cannot apply to them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ..budget import count_params, match_budget
from ..factors import load_factors
from ..structures import get_structure
from .generators import _rng

__all__ = ["check_structure", "expected_failed_checks", "structure_estimators"]

_ROW_POSITION = (
    "with several block-rows a row's block-row is fixed by its position, so transform "
    "needs all fitted rows in their fitted order"
)


def expected_failed_checks(estimator):
    """scikit-learn checks that cannot apply to ``estimator``, each with its reason.

    With several block-rows a row's codes depend on its position, so the
    checks that transform held-out or reordered rows cannot pass; everything
    else must.
    """
    nb = getattr(estimator, "n_blocks", 1)
    kr = nb[0] if isinstance(nb, (tuple, list)) else nb
    if kr > 1:
        return {
            "check_methods_subset_invariance": _ROW_POSITION,
            "check_methods_sample_order_invariance": _ROW_POSITION,
            "check_fit_idempotent": _ROW_POSITION + " (it transforms held-out rows)",
        }
    return {}


def structure_estimators(structure):
    """Estimators of a structure for the shared checks: its defaults, a 2 x 2 and a 1 x 2 grid."""
    s = get_structure(structure)
    out = [s.estimator()]
    if "n_blocks" in s.estimator().get_params() and s.fixed_blocks is None:
        out.append(s.estimator(n_blocks=2))
        try:
            s.layout((4, 4), (1, 2))
            out.append(s.estimator(n_blocks=(1, 2)))
        except ValueError:  # square grids only (e.g. diagonal blocks)
            pass
    return out


def check_structure(structure, *, shape=(12, 10), random_state=0, sklearn=True):
    """The checks every registered structure passes (raises AssertionError on the first failure).

    1. scikit-learn compliance of its estimator (``check_estimator``, with
       :func:`expected_failed_checks`), on its defaults and on small grids;
    2. budget: every configuration :func:`~blocklowrank.budget.match_budget`
       lists for it is counted by its ``count`` as the record says, within the
       budget, and fitting it gives factors holding exactly that many numbers'
       worth of parameters (``factors.n_params``);
    3. round trip: the fit's dense matrix survives save/load exactly, the
       estimator's ``inverse_transform(fit_transform(X))`` equals its
       reconstruction, and the fitted error is the error of that reconstruction.

    Parameters
    ----------
    structure : str or Structure
    shape : (int, int), default=(12, 10)
        Shape of the random test matrix (uneven splits on purpose).
    random_state : int, default=0
    sklearn : bool, default=True
        Run the scikit-learn checks (the slow part).

    Examples
    --------
    >>> check_structure("diagonal", sklearn=False)
    """
    s = get_structure(structure)
    X = _rng(random_state).standard_normal(shape)
    if sklearn:
        from sklearn.utils.estimator_checks import check_estimator  # scikit-learn's test kit, loaded only here

        for est in structure_estimators(s):
            check_estimator(est, expected_failed_checks=expected_failed_checks(est))
    cheapest = s.budget_rule.cheapest(shape, [s.fixed_blocks or 2], None)
    assert cheapest is not None, f"{s.name}: no configuration below full rank on {shape}"
    recs = match_budget(shape, 2 * cheapest[0], methods=[s.name], n_blocks=[s.fixed_blocks or 2])
    assert recs, f"{s.name}: match_budget found no configuration at twice its cheapest count"
    for rec in recs:
        config = {k: rec[k] for k in ("n_blocks", "rank", *s.extra)}
        assert count_params(s.name, shape, **config) == rec["n_params"] <= rec["budget"]
        res = s.fit(X, **config)
        f = res.factors
        assert f.n_params == rec["n_params"], (s.name, f.n_params, rec)
        dense = f.to_dense()
        err = np.linalg.norm(X - dense) / np.linalg.norm(X)
        assert abs(err - res.error) <= 1e-8 * max(1.0, err), (s.name, err, res.error)
        with tempfile.TemporaryDirectory() as tmp:
            back = load_factors(f.save(Path(tmp) / "f"))
        assert back.n_params == f.n_params and np.array_equal(back.to_dense(), dense)
        params = set(s.estimator().get_params())
        est = s.estimator(**{k: v for k, v in config.items() if k in params})
        Z = est.fit_transform(X)
        np.testing.assert_allclose(est.inverse_transform(Z), est.reconstruct(), atol=1e-10)
        assert est.n_params_ == est.factors_.n_params

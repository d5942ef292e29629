"""Scores of the verdicts: accuracy with its uncertainty, paired comparisons, output errors.

A test set of a few hundred examples gives accuracies a few points wide, so
the MiniLM verdicts (:mod:`~blocklowrank.experiments.minilm_metric`) report:

- :func:`wilson_interval`: the 95 % Wilson score interval of one accuracy
  (Wilson 1927; better coverage than the normal interval near 0 and 1);
- :func:`mcnemar_exact`: the exact (binomial) McNemar test of two models
  scored on the same examples, from the discordant pairs only;
- :func:`paired_bootstrap`: a percentile interval of the difference of two
  accuracies, resampling the examples (paired: one resample for both).

And :func:`relative_output_error`, the measured error of a layer's outputs
on inputs whose second moment is given (no factorisation: the experiments
score many fits on the same held-out statistics, singular ones included).

NumPy and SciPy only.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binom

__all__ = [
    "wilson_interval",
    "mcnemar_exact",
    "paired_bootstrap",
    "compare_paired",
    "relative_output_error",
    "quadratic_energy",
]

#: Two-sided 95 % normal quantile.
Z95 = 1.959963984540054


def _correct(x, name):
    a = np.asarray(x)
    if a.ndim != 1 or not a.size:
        raise ValueError(f"{name} must be a non-empty 1-D array of per-example correctness, got shape {a.shape}")
    if not np.isin(a, (0, 1)).all():
        raise ValueError(f"{name} must hold 0/1 (or bool) per example")
    return a.astype(bool)


def wilson_interval(k, n, z=Z95):
    """The Wilson score interval ``(low, high)`` of a proportion ``k / n``.

    Examples
    --------
    >>> low, high = wilson_interval(283, 352)
    >>> round(low, 4), round(high, 4)
    (0.7593, 0.8421)
    """
    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    low = 0.0 if k == 0 else max(0.0, centre - half)  # exactly 0 and 1 at the ends (rounding would miss them)
    high = 1.0 if k == n else min(1.0, centre + half)
    return float(low), float(high)


def mcnemar_exact(a, b):
    """Exact two-sided McNemar test of two classifiers' per-example correctness ``a``, ``b``.

    Returns
    -------
    dict
        ``only_a`` (examples ``a`` gets right and ``b`` wrong), ``only_b``,
        and ``p``: twice the binomial tail ``P(X <= min) `` with ``X ~
        Bin(only_a + only_b, 1/2)``, at most 1 (1 when they never disagree).

    Examples
    --------
    >>> mcnemar_exact([1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1])["p"]
    0.21875
    """
    a, b = _correct(a, "a"), _correct(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must score the same examples, got {a.size} and {b.size}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = only_a + only_b
    p = 1.0 if n == 0 else float(min(1.0, 2 * binom.cdf(min(only_a, only_b), n, 0.5)))
    return {"only_a": only_a, "only_b": only_b, "p": p}


def paired_bootstrap(a, b, *, n_boot=4000, seed=0, level=0.95):
    """Percentile interval of ``mean(b) - mean(a)`` over paired resamples of the examples.

    Returns
    -------
    (diff, low, high) : tuple of float
    """
    a, b = _correct(a, "a").astype(np.float64), _correct(b, "b").astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a and b must score the same examples, got {a.size} and {b.size}")
    rng = np.random.default_rng(seed)
    d = b - a
    idx = rng.integers(0, d.size, size=(int(n_boot), d.size))
    boots = d[idx].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(boots, [tail, 1 - tail])
    return float(d.mean()), float(low), float(high)


def compare_paired(reference, other, **kw):
    """McNemar and the paired bootstrap of ``other`` against ``reference`` in one dict.

    Keys: ``diff``, ``diff_low``, ``diff_high`` (bootstrap, accuracy points as
    fractions), ``p_mcnemar``, ``only_reference``, ``only_other``.
    """
    diff, low, high = paired_bootstrap(reference, other, **kw)
    test = mcnemar_exact(reference, other)
    return {
        "diff": diff,
        "diff_low": low,
        "diff_high": high,
        "p_mcnemar": test["p"],
        "only_reference": test["only_a"],
        "only_other": test["only_b"],
    }


def relative_output_error(W, M, gram, total=None):
    """``sqrt(tr(E G Eᵀ) / tr(W G Wᵀ))`` with ``E = W - M``: ``‖(W - M) Xᵀ‖ / ‖W Xᵀ‖`` for ``G = XᵀX / n``.

    ``G`` is used as given (a float32 copy makes the products cheap; the sums
    are float64). ``total``: ``tr(W G Wᵀ)`` when the caller has it.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> W, M, X = rng.standard_normal((4, 6)), rng.standard_normal((4, 6)), rng.standard_normal((50, 6))
    >>> e = relative_output_error(W, M, X.T @ X / 50)
    >>> bool(np.isclose(e, np.linalg.norm((W - M) @ X.T) / np.linalg.norm(W @ X.T), rtol=1e-5))
    True
    """
    G = np.asarray(gram, dtype=np.float32)
    W64 = np.asarray(W, dtype=np.float64)
    if total is None:
        total = quadratic_energy(W64, G)
    return float(np.sqrt(max(quadratic_energy(W64 - M, G), 0.0) / total)) if total > 0 else 0.0


def quadratic_energy(E, G):
    """``tr(E G Eᵀ)`` (float32 products, float64 sum)."""
    E = np.asarray(E, dtype=np.float32)
    return float(np.sum((E @ G) * E, dtype=np.float64))

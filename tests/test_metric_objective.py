"""The undamped objective of a damped fit, from its factors (``output_error``): each test states its claim.

References are independent: the optimum of the damped objective is SVD-LLM's whitened truncation
in ``G_delta`` (and ``H_delta``) computed with NumPy (``tests/_reference.py``), and the undamped
objective of any ``M`` is the direct ``tr(H (W - M) G (W - M)^T)``.
"""

import _reference as ref
import numpy as np
import pytest

from blocklowrank._metric import fit_global, fit_majorize, output_error


def _damped(G, delta):
    return G + delta * np.trace(G) / len(G) * np.eye(len(G))


@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rank", [1, 3, 6])
def test_damped_global_fit_reports_the_undamped_objective_of_the_whitened_optimum(seed, two_sided, rank):
    """Claim: a global fit with gram_damping=delta is the whitened truncation in G_delta (H_delta),
    its objective the damped value and its output_error sqrt(f(M) / f(0)) with the undamped Grams,
    computed directly -- also at rank 6, where W has rank 6 plus a tiny tail and f(M) nearly
    cancels (the residual route)."""
    rng = np.random.default_rng(seed)
    m, n, delta = 9, 11, 0.05
    W = rng.standard_normal((m, 6)) @ rng.standard_normal((6, n)) + 1e-7 * rng.standard_normal((m, n))
    _, G = ref.sample_gram(rng, n, n_samples=5)  # singular: the damping matters
    H = ref.sample_gram(rng, m, n_samples=4)[1] if two_sided else None
    Gd, Hd = _damped(G, delta), None if H is None else _damped(H, delta)
    res = fit_global(W, rank, G, H, gram_damping=delta)
    B, A = res.factors[(0, 0)]
    M = B @ A
    M_ref, _ = ref.whitened(W, Gd, rank, Hd)
    scale = np.linalg.norm(W)
    np.testing.assert_allclose(M, M_ref, atol=1e-7 * scale)
    np.testing.assert_allclose(res.objective, ref.f_ref(W, M, Gd, Hd), rtol=1e-7, atol=1e-12 * ref.f_ref(W, 0, Gd, Hd))
    f0, f = ref.f_ref(W, 0, G, H), ref.f_ref(W, M, G, H)
    np.testing.assert_allclose(res.output_error, np.sqrt(f / f0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(output_error(W, (B, A), G, H), np.sqrt(f / f0), rtol=1e-6, atol=1e-9)


def _lora(r):
    """A plain rank-r fitter for fit_majorize: (B, A) of the truncated SVD (NumPy)."""

    def fit(Z, state):
        U, s, Vt = np.linalg.svd(Z, full_matrices=False)
        return (U[:, :r] * s[:r], Vt[:r]), None

    return fit


@pytest.mark.parametrize("seed", range(3))
def test_damped_majorize_fit_reports_the_undamped_objective_of_its_factors(seed):
    """Claim: the majorisation fit with damping, given factors (B, A) by its plain fitter, reports
    as output_error the undamped sqrt(f(M) / f(0)) of the M it returns, computed directly."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((8, 10))
    _, G = ref.sample_gram(rng, 10, n_samples=6)
    res = fit_majorize(W, G, plain_fit=_lora(2), gram_damping=0.1, max_iter=30)
    B, A = res.approx
    M = B @ A
    np.testing.assert_allclose(res.output_error, np.sqrt(ref.f_ref(W, M, G) / ref.f_ref(W, 0, G)), rtol=1e-8)

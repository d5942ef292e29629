"""GramFactor's factorisation in the Gram's own memory: each test states its claim (references: NumPy)."""

import numpy as np
import pytest

from blocklowrank import GramFactor


def _grams(rng, n):
    """A positive definite Gram, a singular one (fewer samples than features), each in C and F order."""
    out = {}
    for kind, n_samples in (("definite", 3 * n), ("singular", n // 3)):
        X = rng.standard_normal((n_samples, n)) * np.exp(rng.uniform(-2, 2, n))
        G = X.T @ X / n_samples
        out[kind + ", C"], out[kind + ", F"] = G, np.asfortranarray(G)
    return out


@pytest.mark.parametrize("damping", [0.0, 1e-300, 1e-2])
@pytest.mark.parametrize("n", [7, 600, 1100])  # one tile, and several of the 512-wide tiles
def test_factor_reproduces_the_damped_gram_and_leaves_the_callers_alone(n, damping):
    """Claim: F F^T = G + damping mean(diag G) I (to rounding) whatever the order of G, singular or
    not (a singular G_delta falls back on G's eigenvectors), F is lower triangular when Cholesky,
    the diagonal blocks of G_delta (sub-Grams, built from F's rows) are G_delta's own, and the
    caller's G is not modified."""
    rng = np.random.default_rng(n)
    for label, G in _grams(rng, n).items():
        before = G.copy()
        gf = GramFactor(G, n, damping=damping)
        Gd = G + damping * np.trace(G) / n * np.eye(n)
        F = np.ldexp(gf.rmul_factor(np.eye(n)), gf.log2_scale // 2) * 2.0 ** ((gf.log2_scale % 2) / 2)
        np.testing.assert_allclose(F @ F.T, Gd, atol=1e-12 * np.abs(G).max(), err_msg=label)
        if gf.kind == "cholesky":
            assert not np.any(np.triu(gf._factor.L, 1)), label
        a, b = n // 3, n // 3 + max(2, n // 4)
        sub = np.ldexp(gf.sub(a, b).rmul(np.eye(b - a)), gf.log2_scale)
        np.testing.assert_allclose(sub, Gd[a:b, a:b], atol=1e-12 * np.abs(G).max(), err_msg=label)
        np.testing.assert_array_equal(G, before)
        assert (gf.kind == "eigen") == (label.startswith("singular") and damping < 1e-100), label


@pytest.mark.parametrize("damping", [0.0, 1e-2])
@pytest.mark.parametrize("order", ["C", "F"])
def test_an_indefinite_gram_is_refused_with_and_without_damping(damping, order):
    """Claim: a symmetric G with an eigenvalue below -rounding is refused, damped or not (the
    damping does not hide it), with its smallest eigenvalue in the message."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((700, 600))
    w, V = np.linalg.eigh(X.T @ X / 700)
    G = (V * np.concatenate([[-0.5], w[1:]])) @ V.T  # its smallest eigenvalue moved to -0.5
    G = np.asarray((G + G.T) / 2, order=order)
    with pytest.raises(ValueError, match=r"not positive semi-definite: its smallest eigenvalue is -0\.5\b"):
        GramFactor(G, 600, damping=damping)


@pytest.mark.parametrize("damping", [0.0, 1e-2])
@pytest.mark.parametrize("n", [7, 600])
def test_copy_false_takes_over_the_gram_and_factors_it_the_same(n, damping):
    """Claim: ``copy=False`` gives bit-for-bit the factor ``copy=True`` gives, overwriting a
    writeable float64 ``G`` (C or F order) instead of copying it; a float32, a read-only or a
    strided ``G`` is copied (the caller's array unchanged)."""
    rng = np.random.default_rng(n + 1)
    Y = rng.standard_normal((5, n))
    for label, G in _grams(rng, n).items():
        ref = GramFactor(G, n, damping=damping).rmul(Y)
        taken = G.copy(order="K")
        np.testing.assert_array_equal(GramFactor(taken, n, damping=damping, copy=False).rmul(Y), ref, err_msg=label)
        assert not np.array_equal(taken, G), label  # its memory held the factorisation
        readonly = G.copy(order="K")
        readonly.setflags(write=False)
        for other in (G.astype(np.float32), readonly, np.repeat(G, 2, axis=1)[:, ::2]):
            before = other.copy()
            GramFactor(other, n, damping=damping, copy=False)
            np.testing.assert_array_equal(other, before, err_msg=label)


def test_copy_must_be_a_boolean():
    with pytest.raises(ValueError, match="'copy' parameter of GramFactor"):
        GramFactor(np.eye(3), copy="no")

"""Closed-form gradients against central finite differences (float64).

Every trainable array of every mode is checked entry by entry on a small
MLP (13 -> 10 -> 4, so the block splits are uneven), and on a random
sample of entries at the paper's size (784 -> 64 -> 5). ``B`` is set
non-zero so that the gradient of ``A`` is not trivially zero.
"""

import numpy as np
import pytest

from blocklowrank import BlockLayout
from blocklowrank.adapters import MLP, StructuredAdapter, loss_and_grad
from blocklowrank.adapters._training import _Data, _loss_grad, _Model, _shadow

#: Fail when ||g_fd - g|| / ||g_fd|| exceeds this (float64, step 1e-6).
RTOL = 1e-6
EPS = 1e-6


def _fd_check(mlp, X, y, adapter, mode, train_head=True, sample=None, seed=0):
    loss, grads = loss_and_grad(mlp, X, y, adapter=adapter, mode=mode, train_head=train_head)
    ad = _shadow(adapter, np.float64) if adapter is not None else None
    model = _Model(mlp, ad, mode, train_head, np.float64)
    data = _Data(model, np.asarray(X, np.float64), np.asarray(y))
    theta = model.store.theta
    idx = np.arange(theta.size)
    if sample is not None:
        idx = np.random.default_rng(seed).choice(theta.size, size=sample, replace=False)
    sl = slice(0, len(y))
    fd = np.empty(idx.size)
    for t, k in enumerate(idx):
        old = theta[k]
        theta[k] = old + EPS
        lp, _ = _loss_grad(model, data, sl, need_grad=False)
        theta[k] = old - EPS
        lm, _ = _loss_grad(model, data, sl, need_grad=False)
        theta[k] = old
        fd[t] = (lp - lm) / (2 * EPS)
    cf = np.concatenate([grads[name].ravel() for name in model.store.grads])[idx]
    assert set(grads) == set(model.store.grads)
    rel = np.linalg.norm(fd - cf) / max(np.linalg.norm(fd), 1e-300)
    assert np.linalg.norm(fd) > 0
    assert rel < RTOL, f"relative gradient error {rel:.3g} > {RTOL} ({mode}, {adapter})"
    return rel


def _small_problem(seed=0, n_in=13, n_hidden=10, n_out=4, n=9):
    rng = np.random.default_rng(seed)
    mlp = MLP.init((n_in, n_hidden, n_out), random_state=seed + 1, dtype=np.float64)
    X = rng.standard_normal((n, n_in))
    y = rng.integers(0, n_out, n)
    # keep pre-activations away from the ReLU kink so finite differences are valid
    H = X @ mlp.W1.T + mlp.b1
    mlp.b1 = mlp.b1 + np.where(np.abs(H).min(axis=0) < 1e-2, 0.05, 0.0)
    return mlp, X, y


LAYOUTS = {
    "global": lambda s: BlockLayout.global_(s, 3),
    "diagonal-even": lambda s: BlockLayout.diagonal(s, 2, 2),  # 10 = 5+5, 13 = 7+6
    "diagonal-uneven": lambda s: BlockLayout.diagonal(s, 3, 2),  # 4,3,3 x 5,4,4
    "block-even": lambda s: BlockLayout.block(s, (2, 1), 2),
    "block-uneven": lambda s: BlockLayout.block(s, 3, 2),
    "block-rect-grid": lambda s: BlockLayout.block(s, (2, 4), 1),
    "block-per-block-ranks": lambda s: BlockLayout.from_blocks(s, 3, rank=np.array([[1, 2, 3], [2, 1, 1], [3, 3, 1]])),
    "custom-pattern": lambda s: BlockLayout(
        s,
        (4, 3, 3),
        (5, 4, 4),
        np.array([[1, 0, 1], [1, 1, 0], [0, 0, 1]], bool),
        np.array([[2, 0, 1], [1, 2, 0], [0, 0, 3]]),
    ),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("train_head", [True, False])
def test_adapter_gradients(name, train_head):
    mlp, X, y = _small_problem()
    ad = StructuredAdapter(LAYOUTS[name]((10, 13)), random_state=0, dtype=np.float64)
    ad.randomize_B(1, scale=0.5)
    _fd_check(mlp, X, y, ad, "adapter", train_head=train_head)


@pytest.mark.parametrize("mode", ["full", "head"])
def test_full_and_head_gradients(mode):
    mlp, X, y = _small_problem(seed=3)
    _fd_check(mlp, X, y, None, mode)


@pytest.mark.parametrize(
    "make",
    [
        lambda: StructuredAdapter.lora((64, 784), 4, random_state=0, dtype=np.float64),
        lambda: StructuredAdapter.melora((64, 784), 3, 2, random_state=0, dtype=np.float64),
        lambda: StructuredAdapter.localized((64, 784), 3, 2, random_state=0, dtype=np.float64),
        lambda: StructuredAdapter.localized((64, 784), 16, 2, random_state=0, dtype=np.float64),
        None,
    ],
    ids=["lora", "melora-N3", "localized-K3", "localized-K16", "full"],
)
def test_gradients_at_paper_size(make):
    rng = np.random.default_rng(5)
    mlp = MLP.init((784, 64, 5), random_state=2, dtype=np.float64)
    X = rng.random((6, 784))
    y = rng.integers(0, 5, 6)
    ad = None if make is None else make()
    if ad is not None:
        ad.randomize_B(3, scale=0.2)
    _fd_check(mlp, X, y, ad, "full" if ad is None else "adapter", sample=120)


def test_gradient_of_A_is_zero_when_B_is_zero():
    mlp, X, y = _small_problem()
    ad = StructuredAdapter.localized((10, 13), 2, 2, random_state=0, dtype=np.float64)
    _, g = loss_and_grad(mlp, X, y, adapter=ad)
    assert np.all(g["A0"] == 0) and np.any(g["B0"] != 0)


def test_loss_and_grad_does_not_modify_inputs():
    mlp, X, y = _small_problem()
    ad = StructuredAdapter.localized((10, 13), 3, 2, random_state=0, dtype=np.float64)
    ad.randomize_B(1)
    before = {k: v.copy() for k, v in ad.params.items()}
    W1 = mlp.W1.copy()
    loss_and_grad(mlp, X, y, adapter=ad)
    assert all(np.array_equal(before[k], ad.params[k]) for k in before)
    assert np.array_equal(W1, mlp.W1)

"""Adapters, training loop, optimisers, determinism and input errors (synthetic data)."""

import numpy as np
import pytest

from blocklowrank import BlockLayout
from blocklowrank.adapters import (
    MLP,
    StructuredAdapter,
    TrainingDivergedError,
    evaluate,
    fine_tune,
    fit_adapter,
    pretrain,
    train,
)


def _toy(n=300, n_in=20, n_out=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_out, n_in)) * 2
    y = rng.integers(0, n_out, n)
    X = (centers[y] + rng.standard_normal((n, n_in))).astype(np.float32)
    return X, y


# ---------------------------------------------------------------------------- adapter structure
@pytest.mark.parametrize(
    "layout",
    [
        BlockLayout.global_((64, 784), 8),
        BlockLayout.diagonal((64, 784), 4, 8),
        BlockLayout.block((64, 784), 4, 2),
        BlockLayout.block((64, 784), 3, 2),  # uneven: 22,21,21 x 262,261,261
        BlockLayout.diagonal((64, 784), 5, 3),
        BlockLayout.block((10, 13), (3, 4), np.arange(12).reshape(3, 4) % 3 + 1),
    ],
    ids=["lora", "melora", "localized", "localized-uneven", "melora-uneven", "per-block-ranks"],
)
def test_adapter_matches_dense_update(layout):
    ad = StructuredAdapter(layout, random_state=0, dtype=np.float64)
    assert ad.n_params == layout.n_params
    assert np.all(ad.delta_weight() == 0)  # B = 0 at start
    ad.randomize_B(1)
    X = np.random.default_rng(2).standard_normal((7, layout.shape[1]))
    D = ad.delta_weight()
    np.testing.assert_allclose(ad.apply(X), X @ D.T, rtol=1e-10, atol=1e-12)
    # the dense update is zero outside the active blocks and B_ij A_ij inside
    f = ad.factors()
    assert set(f) == {tuple(map(int, ij)) for ij in np.argwhere(layout.active)}
    for (i, j), (B, A) in f.items():
        rs, cs = layout.block_slice(i, j)
        assert B.shape == (layout.row_sizes[i], layout.ranks[i, j])
        assert A.shape == (layout.ranks[i, j], layout.col_sizes[j])
        np.testing.assert_allclose(D[rs, cs], B @ A, atol=1e-12)
    mask = np.zeros(layout.shape, bool)
    for i, j in np.argwhere(layout.active):
        rs, cs = layout.block_slice(i, j)
        mask[rs, cs] = True
    assert np.all(D[~mask] == 0)


def test_set_factors_roundtrip_and_init_bounds():
    lay = BlockLayout.block((64, 784), 4, 2)
    ad = StructuredAdapter(lay, random_state=0)
    f = ad.factors()
    for (_i, _j), (B, A) in f.items():
        assert np.abs(A).max() <= 1 / np.sqrt(196) + 1e-7  # Kaiming-uniform from the block width
        assert np.abs(A).max() > 0.5 / np.sqrt(196)
        assert np.all(B == 0)
    ad2 = StructuredAdapter(lay, random_state=1)
    ad2.set_factors(f)
    for k in ad.params:
        np.testing.assert_array_equal(ad.params[k], ad2.params[k])
    with pytest.raises(ValueError, match="block"):
        ad2.set_factors({(0, 0): (np.zeros((3, 3)), np.zeros((3, 3)))} | dict(list(f.items())[1:]))


def test_paper_parameter_counts():
    assert MLP.init((784, 64, 5)).n_params == 50_565
    assert StructuredAdapter.lora((64, 784), 4).n_params == 4 * (64 + 784)
    assert StructuredAdapter.melora((64, 784), 4, 4).n_params == 4 * (64 + 784)
    assert StructuredAdapter.localized((64, 784), 2, 2).n_params == 4 * (64 + 784)
    assert StructuredAdapter.localized((64, 784), 3, 2).n_params == BlockLayout.block((64, 784), 3, 2).n_params


def test_adapter_configuration_errors():
    with pytest.raises(ValueError, match="rank"):
        StructuredAdapter(BlockLayout.block((64, 784), 4))  # no ranks
    with pytest.raises(ValueError, match="exceeds"):
        StructuredAdapter.localized((64, 784), 16, 5)  # blocks are 4 x 49
    with pytest.raises(ValueError, match="more blocks"):
        StructuredAdapter.melora((64, 784), 65, 1)
    with pytest.raises(TypeError):
        StructuredAdapter("not a layout")
    with pytest.raises(ValueError, match="method"):
        StructuredAdapter.from_method("weird", (4, 4), rank=1)


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind", ["global", "diagonal", "block"])
def test_adapter_training_lowers_loss(kind):
    X, y = _toy()
    mlp = MLP.init((20, 8, 3), random_state=0)
    ad = StructuredAdapter.from_method(kind, (8, 20), rank=1, n_blocks=1 if kind == "global" else 2, random_state=0)
    W1 = mlp.W1.copy()
    res = fit_adapter(mlp, X[:200], y[:200], ad, lr=1e-2, epochs=15, X_val=X[200:], y_val=y[200:], random_state=0)
    h = res.history
    assert len(h) == 15 and len(h.val_loss) == 15 and len(h.train_acc) == 15
    assert h.train_loss[-1] < h.train_loss[0]
    assert min(h.val_loss) < h.val_loss[0]
    assert np.array_equal(res.mlp.W1, W1) and np.array_equal(mlp.W1, W1)  # frozen, input untouched
    assert np.abs(ad.delta_weight()).max() > 0
    assert res.best_epoch == int(np.argmin(h.val_loss)) + 1
    assert res.evaluate(X[200:], y[200:])[0] == pytest.approx(min(h.val_loss), rel=1e-4)
    assert res.n_trainable == ad.n_params + 8 * 3 + 3


def test_frozen_head_option_and_head_mode():
    X, y = _toy()
    mlp = MLP.init((20, 8, 3), random_state=0)
    ad = StructuredAdapter.lora((8, 20), 2, random_state=0)
    res = train(mlp, X, y, adapter=ad, train_head=False, lr=1e-2, epochs=3, random_state=0)
    assert np.array_equal(res.mlp.W2, mlp.W2) and res.n_trainable == ad.n_params
    res = train(mlp, X, y, mode="head", lr=1e-2, epochs=3, random_state=0)
    assert np.array_equal(res.mlp.W1, mlp.W1) and not np.array_equal(res.mlp.W2, mlp.W2)
    assert res.n_trainable == 27


def test_full_fine_tuning_and_sgd():
    X, y = _toy()
    pre = pretrain(X, y, sizes=(20, 8, 3), epochs=10, random_state=0, lr=1e-2)
    assert pre.score(X, y) > 0.9
    res = fine_tune(pre.mlp, X, y, optimizer="sgd", lr=0.05, epochs=3, random_state=0)
    assert not np.array_equal(res.mlp.W1, pre.mlp.W1)
    assert res.n_trainable == pre.mlp.n_params
    res2 = fine_tune(pre.mlp, X, y, optimizer="sgd", lr=0.05, epochs=3, random_state=0, optimizer_kw={"momentum": 0.9})
    assert not np.array_equal(res2.mlp.W1, res.mlp.W1)


def test_same_seed_same_numbers_float32_and_float64():
    X, y = _toy()
    mlp = MLP.init((20, 8, 3), random_state=0)
    for dtype in (np.float32, np.float64):
        runs = []
        for _ in range(2):
            ad = StructuredAdapter.localized((8, 20), 2, 1, random_state=3, dtype=dtype)
            runs.append(train(mlp, X, y, adapter=ad, lr=1e-2, epochs=4, random_state=7, dtype=dtype))
        assert runs[0].history.train_loss == runs[1].history.train_loss
        for k in runs[0].adapter.params:
            np.testing.assert_array_equal(runs[0].adapter.params[k], runs[1].adapter.params[k])
        other = train(
            mlp,
            X,
            y,
            adapter=StructuredAdapter.localized((8, 20), 2, 1, random_state=3, dtype=dtype),
            lr=1e-2,
            epochs=4,
            random_state=8,
            dtype=dtype,
        )
        assert other.history.train_loss != runs[0].history.train_loss


def test_adam_matches_reference_formula():
    from blocklowrank.adapters import Adam

    theta = np.array([1.0, -2.0])
    grad = np.zeros(2)
    opt = Adam(theta, grad, lr=0.1)
    m = v = np.zeros(2)
    ref = np.array([1.0, -2.0])
    for t in range(1, 4):
        g = np.array([0.5, -1.5]) * t
        grad[...] = g
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        ref = ref - 0.1 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        np.testing.assert_allclose(theta, ref, rtol=1e-12)


# ---------------------------------------------------------------------------- failures
def test_divergence_names_epoch_and_lr():
    X, y = _toy()
    mlp = MLP.init((20, 8, 3), random_state=0)
    with pytest.raises(TrainingDivergedError, match=r"epoch \d+ .*lr=1e\+30") as info:
        train(mlp, X, y, mode="full", optimizer="sgd", lr=1e30, epochs=5, random_state=0)
    assert info.value.epoch >= 1 and info.value.lr == 1e30


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(X=np.zeros((10, 19))), ValueError, "19 features"),
        (dict(y=np.zeros(9, int)), ValueError, "one per row"),
        (dict(y=np.full(10, 3)), ValueError, r"labels in \[3, 3\].*3 classes"),
        (dict(y=np.full(10, -1)), ValueError, "labels"),
        (dict(y=np.full(10, 0.5)), TypeError, "integer"),
        (dict(X=np.full((10, 20), np.nan)), ValueError, "NaN"),
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(epochs=0), ValueError, "epochs"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(optimizer="rmsprop"), ValueError, "optimizer"),
        (dict(mode="lora"), ValueError, "mode"),
        (dict(X_val=np.zeros((4, 20))), ValueError, "both"),
        (dict(X_val=np.zeros((4, 20)), y_val=np.zeros(3, int)), ValueError, "y_val"),
        (dict(adapter=StructuredAdapter.lora((20, 8), 1)), ValueError, "first layer W1 is 8x20"),
        (dict(adapter=None), ValueError, "needs an adapter"),
    ],
)
def test_bad_input_fails_before_training(kwargs, exc, match):
    mlp = MLP.init((20, 8, 3), random_state=0)
    args = dict(
        X=np.zeros((10, 20), np.float32),
        y=np.zeros(10, int),
        adapter=StructuredAdapter.lora((8, 20), 1),
        lr=1e-3,
        epochs=1,
    )
    args.update(kwargs)
    calls = []
    with pytest.raises(exc, match=match):
        train(mlp, args.pop("X"), args.pop("y"), callback=lambda e, h: calls.append(e), **args)
    assert not calls


def test_evaluate_and_images_input():
    X, y = _toy(n_in=16)
    mlp = MLP.init((16, 8, 3), random_state=0)
    loss, acc = evaluate(mlp, X.reshape(-1, 4, 4), y)
    assert 0 <= acc <= 1 and loss > 0
    assert acc == pytest.approx(mlp.score(X, y))

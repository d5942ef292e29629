"""Real-data check of the adaptation protocol.

Runs whenever MNIST is available offline (data dir or cache; `make test` fetches it first) and
is required when BLOCKLOWRANK_TEST_REAL_DATA=1; skipped otherwise.
"""

import os

import numpy as np
import pytest

from blocklowrank.datasets import MNISTNotAvailableError, load_mnist


def _mnist():
    if os.environ.get("BLOCKLOWRANK_TEST_REAL_DATA") == "1":
        return load_mnist()
    try:
        return load_mnist(download=False)
    except MNISTNotAvailableError:
        pytest.skip("MNIST not available offline (set BLOCKLOWRANK_TEST_REAL_DATA=1 to fetch)")


def test_localized_adapter_learns_digits_5_to_9():
    from blocklowrank.adapters import StructuredAdapter, fit_adapter, pretrain

    d = _mnist()
    X = d.train_images.reshape(-1, 784).astype(np.float32) / 255
    y = d.train_labels.astype(int)
    Xt = d.test_images.reshape(-1, 784).astype(np.float32) / 255
    yt = d.test_labels.astype(int)
    lo, hi, th = np.nonzero(y < 5)[0][:3000], np.nonzero(y >= 5)[0][:3000], yt >= 5
    pre = pretrain(X[lo], y[lo], epochs=3, random_state=0)
    assert pre.score(Xt[yt < 5], yt[yt < 5]) > 0.9
    ad = StructuredAdapter.localized((64, 784), 2, 2, random_state=0)
    res = fit_adapter(pre.mlp, X[hi], y[hi] - 5, ad, lr=2e-3, epochs=5, random_state=0)
    assert res.score(Xt[th], yt[th] - 5) > 0.8

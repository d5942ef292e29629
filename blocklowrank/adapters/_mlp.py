"""A dense two-layer MLP with hand-derived forward and backward passes.

``x (n_in) -> h = W1 x + b1 -> ReLU -> z = W2 a + b2 -> log-softmax``.
The paper's model is ``784 -> 64 -> 5`` (50,565 parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._io import atomic_write

__all__ = ["MLP", "log_softmax", "nll_and_grad"]


def log_softmax(Z):
    """Row-wise log-softmax, stable for large logits."""
    Z = Z - Z.max(axis=1, keepdims=True)
    return Z - np.log(np.exp(Z).sum(axis=1, keepdims=True))


def nll_and_grad(Z, y):
    """Mean negative log-likelihood of ``log_softmax(Z)`` and its gradient in ``Z``.

    Returns ``(loss, n_correct, dZ)``. ``Z`` is overwritten (it becomes
    ``dZ``) to save allocations in the training loop. A sample counts as
    correct when its true class attains the largest logit.
    """
    n = Z.shape[0]
    rows = np.arange(n)
    Z -= Z.max(axis=1, keepdims=True)
    zy = Z[rows, y]  # fancy indexing copies; 0 where the true class has the top logit
    n_correct = int(np.count_nonzero(zy == 0))
    np.exp(Z, out=Z)
    S = Z.sum(axis=1, keepdims=True)
    loss = (float(np.log(S).sum()) - float(zy.sum())) / n
    Z /= S
    Z[rows, y] -= 1.0
    Z *= 1.0 / n
    return loss, n_correct, Z


def _uniform(rng, bound, shape, dtype):
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


@dataclass
class MLP:
    """Weights of a ``n_in -> n_hidden (ReLU) -> n_out`` classifier.

    Parameters
    ----------
    W1 : ndarray of shape (n_hidden, n_in)
    b1 : ndarray of shape (n_hidden,)
    W2 : ndarray of shape (n_out, n_hidden)
    b2 : ndarray of shape (n_out,)

    Examples
    --------
    >>> import numpy as np
    >>> from blocklowrank.adapters import MLP
    >>> mlp = MLP.init((784, 64, 5), random_state=0)
    >>> mlp.n_params
    50565
    >>> mlp.log_proba(np.zeros((2, 784), np.float32)).shape
    (2, 5)
    """

    W1: np.ndarray
    b1: np.ndarray
    W2: np.ndarray
    b2: np.ndarray

    def __post_init__(self):
        self.W1 = np.asarray(self.W1)
        self.b1 = np.asarray(self.b1)
        self.W2 = np.asarray(self.W2)
        self.b2 = np.asarray(self.b2)
        h, d = self.W1.shape if self.W1.ndim == 2 else (None, None)
        if self.W1.ndim != 2 or self.b1.shape != (h,):
            raise ValueError(f"W1 must be (n_hidden, n_in) and b1 (n_hidden,), got {self.W1.shape}, {self.b1.shape}")
        if self.W2.ndim != 2 or self.W2.shape[1] != h or self.b2.shape != (self.W2.shape[0],):
            raise ValueError(f"W2 must be (n_out, {h}) and b2 (n_out,), got {self.W2.shape}, {self.b2.shape}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def init(cls, sizes=(784, 64, 5), *, random_state=None, dtype=np.float32):
        """PyTorch ``nn.Linear`` default initialisation.

        Weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (Kaiming-uniform
        with ``a = sqrt(5)``).
        """
        n_in, n_hidden, n_out = (int(s) for s in sizes)
        rng = np.random.default_rng(random_state)
        b_in, b_h = 1 / np.sqrt(n_in), 1 / np.sqrt(n_hidden)
        return cls(
            _uniform(rng, b_in, (n_hidden, n_in), dtype),
            _uniform(rng, b_in, (n_hidden,), dtype),
            _uniform(rng, b_h, (n_out, n_hidden), dtype),
            _uniform(rng, b_h, (n_out,), dtype),
        )

    @property
    def sizes(self):
        return (self.W1.shape[1], self.W1.shape[0], self.W2.shape[0])

    @property
    def n_params(self):
        return int(self.W1.size + self.b1.size + self.W2.size + self.b2.size)

    @property
    def dtype(self):
        return self.W1.dtype

    def astype(self, dtype):
        return MLP(*(np.array(p, dtype=dtype) for p in (self.W1, self.b1, self.W2, self.b2)))

    def copy(self):
        return self.astype(self.dtype)

    def to_dict(self):
        return {"W1": self.W1, "b1": self.b1, "W2": self.W2, "b2": self.b2}

    def save(self, path):
        """Save to ``.npz``, whole or not at all (a temporary file renamed into place)."""
        with atomic_write(path) as f:
            np.savez(f, **self.to_dict())

    @classmethod
    def load(cls, path):
        with np.load(path) as f:
            return cls(f["W1"], f["b1"], f["W2"], f["b2"])

    # ------------------------------------------------------------------ inference
    def pre_activation(self, X, delta_weight=None):
        """``X W1^T + b1`` (plus ``X dW^T`` when ``delta_weight`` is given)."""
        W = self.W1 if delta_weight is None else self.W1 + delta_weight
        return X @ W.T + self.b1

    def log_proba(self, X, delta_weight=None):
        """Log-probabilities, shape (n, n_out)."""
        H = self.pre_activation(np.asarray(X, dtype=self.dtype), delta_weight)
        np.maximum(H, 0, out=H)
        return log_softmax(H @ self.W2.T + self.b2)

    def predict(self, X, delta_weight=None):
        return self.log_proba(X, delta_weight).argmax(axis=1)

    def score(self, X, y, delta_weight=None):
        """Accuracy on ``(X, y)``."""
        return float(np.mean(self.predict(X, delta_weight) == np.asarray(y)))

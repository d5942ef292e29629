"""Optimisers acting on one flat parameter vector (one vectorised update per step)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["Adam", "SGD", "make_optimizer", "OPTIMIZERS"]

OPTIMIZERS = ("adam", "sgd")


class Adam:
    """Adam (Kingma and Ba, 2015) with PyTorch's ``torch.optim.Adam`` arithmetic.

    ``theta -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)``.
    """

    def __init__(self, theta, grad, lr, *, betas=(0.9, 0.999), eps=1e-8):
        self.theta, self.grad = theta, grad
        self.lr = float(lr)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.m = np.zeros_like(theta)
        self.v = np.zeros_like(theta)
        self._tmp = np.empty_like(theta)
        self.t = 0

    def step(self):
        b1, b2 = self.beta1, self.beta2
        g, m, v, tmp = self.grad, self.m, self.v, self._tmp
        self.t += 1
        m *= b1
        np.multiply(g, 1.0 - b1, out=tmp)
        m += tmp
        v *= b2
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - b2
        v += tmp
        bc1 = 1.0 - b1**self.t
        bc2 = 1.0 - b2**self.t
        np.sqrt(v, out=tmp)
        tmp *= 1.0 / math.sqrt(bc2)
        tmp += self.eps
        np.divide(m, tmp, out=tmp)
        tmp *= self.lr / bc1
        self.theta -= tmp


class SGD:
    """Plain stochastic gradient descent, optionally with (heavy-ball) momentum."""

    def __init__(self, theta, grad, lr, *, momentum=0.0):
        self.theta, self.grad = theta, grad
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.buf = np.zeros_like(theta) if self.momentum else None
        self._tmp = np.empty_like(theta)

    def step(self):
        if self.buf is not None:
            self.buf *= self.momentum
            self.buf += self.grad
            d = self.buf
        else:
            d = self.grad
        np.multiply(d, self.lr, out=self._tmp)
        self.theta -= self._tmp


def make_optimizer(name, theta, grad, lr, **kw):
    """The optimizer ``name`` (one of :data:`OPTIMIZERS`) stepping ``theta`` in place along ``grad``."""
    if name == "adam":
        return Adam(theta, grad, lr, **kw)
    if name == "sgd":
        return SGD(theta, grad, lr, **kw)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")

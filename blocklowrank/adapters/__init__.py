"""Structured adapters and a NumPy trainer with closed-form gradients.

- :class:`MLP`: the paper's ``784 -> 64 (ReLU) -> 5`` classifier (any sizes).
- :class:`StructuredAdapter`: trainable ``B_ij A_ij`` factors on a
  :class:`~blocklowrank.BlockLayout` (global = LoRA, diagonal = MELoRA,
  full K x K = Localized LoRA), added to the first layer before the ReLU.
- :func:`train` (and :func:`pretrain`, :func:`fine_tune`, :func:`fit_adapter`):
  Adam or SGD on minibatches, per-epoch history, NaN detection.
- :func:`loss_and_grad`: the closed-form gradients (checked against finite
  differences in the tests); :func:`nll_and_grad` and :func:`log_softmax`,
  the classifier's loss; :func:`make_optimizer` (:data:`OPTIMIZERS`).

Resumable, parallel (joblib) sweeps of such runs: :mod:`blocklowrank.sweep`.
"""

from ._mlp import MLP, log_softmax, nll_and_grad
from ._optim import OPTIMIZERS, SGD, Adam, make_optimizer
from ._structured import StructuredAdapter
from ._training import (
    MODES,
    History,
    TrainingDivergedError,
    TrainResult,
    evaluate,
    fine_tune,
    fit_adapter,
    loss_and_grad,
    pretrain,
    train,
)

__all__ = [
    "MLP",
    "StructuredAdapter",
    "Adam",
    "SGD",
    "MODES",
    "History",
    "TrainingDivergedError",
    "TrainResult",
    "evaluate",
    "fine_tune",
    "fit_adapter",
    "loss_and_grad",
    "pretrain",
    "train",
    "log_softmax",
    "nll_and_grad",
    "make_optimizer",
    "OPTIMIZERS",
]

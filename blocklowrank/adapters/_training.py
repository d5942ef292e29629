"""Training with closed-form gradients: pretraining, full fine-tuning and adapters.

The trainable numbers live in one flat vector (with named views), so an
optimiser step is a handful of vectorised operations whatever the number
of parameter arrays. In adapter and head-only modes the first layer is
frozen, so its pre-activation ``X W1^T + b1`` is computed once per data
set and each step only adds the adapter's ``X dW^T``.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from .._params import Float, Int, StrOptions, validate_params
from ..sweep import RunFailed
from ._mlp import MLP, nll_and_grad
from ._optim import OPTIMIZERS, make_optimizer
from ._structured import StructuredAdapter

__all__ = [
    "TrainingDivergedError",
    "History",
    "TrainResult",
    "train",
    "pretrain",
    "fine_tune",
    "fit_adapter",
    "loss_and_grad",
    "evaluate",
    "MODES",
]

#: What is trained: an adapter on W1 (plus the head if ``train_head``), every
#: parameter of the MLP, or the output layer alone.
MODES = ("adapter", "full", "head")

_EVAL_CHUNK = 8192


class TrainingDivergedError(RunFailed):
    """The training loss became NaN or infinite."""

    def __init__(self, message, *, epoch=None, lr=None):
        super().__init__(message)
        self.epoch = epoch
        self.lr = lr


# ---------------------------------------------------------------------------- parameters
class _ParamStore:
    """Named views into one flat parameter vector and one flat gradient vector."""

    def __init__(self, specs, dtype):
        sizes = [int(np.prod(shape)) for _, shape in specs]
        total = int(sum(sizes))
        self.theta = np.zeros(total, dtype)
        self.grad = np.zeros(total, dtype)
        self.views, self.grads = {}, {}
        off = 0
        for (name, shape), s in zip(specs, sizes):
            self.views[name] = self.theta[off : off + s].reshape(shape)
            self.grads[name] = self.grad[off : off + s].reshape(shape)
            off += s


class _Model:
    """Frozen MLP parts + trainable parts bound to a flat store."""

    def __init__(self, mlp, adapter, mode, train_head, dtype):
        self.mode = mode
        self.dtype = np.dtype(dtype)
        self.W1 = np.array(mlp.W1, dtype=dtype)
        self.b1 = np.array(mlp.b1, dtype=dtype)
        W2 = np.array(mlp.W2, dtype=dtype)
        b2 = np.array(mlp.b2, dtype=dtype)
        self.adapter = adapter
        self.train_head = bool(train_head) or mode in ("full", "head")
        specs = []
        if mode == "full":
            specs += [("W1", self.W1.shape), ("b1", self.b1.shape)]
        if adapter is not None:
            specs += adapter.param_specs()
        if self.train_head:
            specs += [("W2", W2.shape), ("b2", b2.shape)]
        self.store = _ParamStore(specs, self.dtype)
        v = self.store.views
        if mode == "full":
            v["W1"][...] = self.W1
            v["b1"][...] = self.b1
            self.W1, self.b1 = v["W1"], v["b1"]
        if adapter is not None:
            if adapter.dtype != self.dtype:
                raise TypeError(f"adapter dtype {adapter.dtype} differs from the training dtype {self.dtype}")
            adapter._bind({name: v[name] for name, _ in adapter.param_specs()})
        if self.train_head:
            v["W2"][...] = W2
            v["b2"][...] = b2
            self.W2, self.b2 = v["W2"], v["b2"]
        else:
            self.W2, self.b2 = W2, b2

    @property
    def n_trainable(self):
        n = 0
        if self.mode == "full":
            n += self.W1.size + self.b1.size
        if self.adapter is not None:
            n += self.adapter.n_params
        if self.train_head:
            n += self.W2.size + self.b2.size
        return int(n)

    def frozen_preactivation(self, X):
        """``X W1^T + b1`` in chunks (the frozen part, computed once per data set)."""
        P = np.empty((X.shape[0], self.W1.shape[0]), dtype=self.dtype)
        for s in range(0, X.shape[0], _EVAL_CHUNK):
            np.matmul(X[s : s + _EVAL_CHUNK], self.W1.T, out=P[s : s + _EVAL_CHUNK])
        P += self.b1
        return P

    def to_mlp(self):
        return MLP(self.W1.copy(), self.b1.copy(), self.W2.copy(), self.b2.copy())


class _Data:
    def __init__(self, model, X, y):
        self.X, self.y = X, y
        self.n = X.shape[0]
        self.P = None if model.mode == "full" else model.frozen_preactivation(X)


def _loss_grad(model, data, idx, need_grad=True):
    """Loss and #correct on rows ``idx`` (index array or slice); gradients into the store."""
    need_X = model.mode == "full" or model.adapter is not None
    if isinstance(idx, slice):
        X = data.X[idx] if need_X else None
        y = data.y[idx]
        H = None if model.mode == "full" else data.P[idx].copy()
    else:  # a minibatch: take() gathers rows faster than fancy indexing
        X = data.X.take(idx, axis=0) if need_X else None
        y = data.y.take(idx)
        H = None if model.mode == "full" else data.P.take(idx, axis=0)
    if model.mode == "full":
        H = X @ model.W1.T
        H += model.b1
    cache = model.adapter.forward(X, H) if model.adapter is not None else None
    np.maximum(H, 0, out=H)
    Z = H @ model.W2.T
    Z += model.b2
    loss, n_correct, dZ = nll_and_grad(Z, y)
    if not need_grad:
        return loss, n_correct
    g = model.store.grads
    if model.train_head:
        np.matmul(dZ.T, H, out=g["W2"])
        dZ.sum(axis=0, out=g["b2"])
    if model.mode != "head":
        dH = dZ @ model.W2
        dH *= H > 0
        if model.mode == "full":
            np.matmul(dH.T, X, out=g["W1"])
            dH.sum(axis=0, out=g["b1"])
        else:
            model.adapter.backward(dH, cache, g)
    return loss, n_correct


def _evaluate(model, data):
    """Mean loss and accuracy over a whole data set."""
    tot_loss, tot_correct = 0.0, 0
    for s in range(0, data.n, _EVAL_CHUNK):
        sl = slice(s, min(s + _EVAL_CHUNK, data.n))
        loss, nc = _loss_grad(model, data, sl, need_grad=False)
        tot_loss += loss * (sl.stop - sl.start)
        tot_correct += nc
    return tot_loss / data.n, tot_correct / data.n


# ---------------------------------------------------------------------------- validation
def _check_data(X, y, n_in, n_out, dtype, name="X"):
    X = np.asarray(X)
    if X.ndim == 3:
        X = X.reshape(X.shape[0], -1)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, {n_in}) or 3-D images, got shape {X.shape}")
    if X.shape[1] != n_in:
        raise ValueError(f"{name} has {X.shape[1]} features but the model expects {n_in}")
    if X.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if X.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be numeric, got dtype {X.dtype}")
    if X.dtype == np.uint8:  # 8-bit images: pixels to [0, 1], as the experiments do
        X = X.astype(dtype) / np.dtype(dtype).type(255)
    X = np.ascontiguousarray(X, dtype=dtype)
    if not np.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    y = np.asarray(y)
    yname = "y" if name == "X" else "y" + name[1:]
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(f"{yname} must be 1-D with {X.shape[0]} labels (one per row of {name}), got shape {y.shape}")
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise TypeError(f"{yname} must hold integer class labels, got dtype {y.dtype}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= n_out:
        raise ValueError(
            f"{yname} has labels in [{lo}, {hi}] but the model has {n_out} classes (labels 0..{n_out - 1}); "
            "remap the labels first (e.g. digits 5-9 -> y - 5)"
        )
    return X, y.astype(np.intp)


#: The rules of the training options (see :mod:`blocklowrank._params`).
_TRAIN_PARAMS = {
    "mode": [StrOptions(set(MODES))],
    "optimizer": [StrOptions(set(OPTIMIZERS))],
    "lr": [Float(0, None, closed="neither")],
    "epochs": [Int(1)],
    "batch_size": [Int(1)],
    "patience": [Int(1)],
    "callback": [callable],
}


def _check_setup(mlp, adapter, mode):
    """The network and the adapter agree with ``mode`` (a valid mode)."""
    if not isinstance(mlp, MLP):
        raise TypeError(f"mlp must be an MLP, got {type(mlp).__name__}")
    if mode == "adapter":
        if adapter is None:
            raise ValueError("mode='adapter' needs an adapter (or use mode='head' or 'full')")
        if not isinstance(adapter, StructuredAdapter):
            raise TypeError(f"adapter must be a StructuredAdapter, got {type(adapter).__name__}")
        if tuple(adapter.shape) != tuple(mlp.W1.shape):
            raise ValueError(
                f"the adapter is for a {adapter.shape[0]}x{adapter.shape[1]} weight but the "
                f"first layer W1 is {mlp.W1.shape[0]}x{mlp.W1.shape[1]}"
            )
    elif adapter is not None:
        raise ValueError(f"mode={mode!r} trains no adapter; pass adapter=None or mode='adapter'")


# ---------------------------------------------------------------------------- results
@dataclass
class History:
    """Per-epoch metrics. Train metrics average the epoch's minibatches (as
    they were seen while the parameters moved); validation metrics are
    computed on the whole validation set at the end of each epoch."""

    epoch: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)
    train_acc: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    val_acc: list = field(default_factory=list)
    seconds: list = field(default_factory=list)

    def to_dict(self):
        return {k: list(getattr(self, k)) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d):
        return cls(**{k: list(d.get(k, [])) for k in cls.__dataclass_fields__})

    def __len__(self):
        return len(self.epoch)


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes
    ----------
    mlp : MLP
        The network after training (for adapters, ``W1`` and ``b1`` are the
        frozen pretrained ones; the update lives in ``adapter``).
    adapter : StructuredAdapter or None
    history : History
    best_epoch : int
        Epoch (1-based) whose parameters were kept: lowest validation loss
        when ``restore_best`` and a validation set were given, else the last.
    n_trainable : int
    seconds : float
    """

    mlp: MLP
    adapter: object
    history: History
    best_epoch: int
    n_trainable: int
    mode: str
    seconds: float

    def delta_weight(self):
        return None if self.adapter is None else self.adapter.delta_weight()

    def log_proba(self, X):
        return self.mlp.log_proba(np.asarray(X).reshape(len(X), -1), self.delta_weight())

    def predict(self, X):
        return self.log_proba(X).argmax(axis=1)

    def score(self, X, y):
        return float(np.mean(self.predict(X) == np.asarray(y)))

    def evaluate(self, X, y):
        """``(mean loss, accuracy)`` on ``(X, y)``."""
        return evaluate(self.mlp, X, y, adapter=self.adapter)


# ---------------------------------------------------------------------------- public functions
def _blas_limit(blas_threads):
    if blas_threads is None:
        return nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=int(blas_threads), user_api="blas")


def _check_diverged(which, loss, epoch, epochs, optimizer, lr):
    if not math.isfinite(loss):
        raise TrainingDivergedError(
            f"{which} loss became {loss} at epoch {epoch} of {epochs} "
            f"(optimizer={optimizer}, lr={lr:g}); lower the learning rate",
            epoch=epoch,
            lr=lr,
        )


@validate_params(**_TRAIN_PARAMS)
def train(
    mlp, X, y, *, adapter=None, mode="adapter", train_head=True,
    optimizer="adam", lr=1e-3, epochs=100, batch_size=64, X_val=None, y_val=None, random_state=None,
    restore_best=True, callback=None, dtype=np.float32, blas_threads=1, optimizer_kw=None, patience=None,
):  # fmt: skip
    """Train an adapter on the first layer, the whole MLP, or its head.

    Parameters
    ----------
    mlp : MLP
        Starting (pretrained) network; not modified.
    X : array-like of shape (n_samples, n_in) or (n_samples, h, w)
    y : array-like of int, shape (n_samples,)
        Labels in ``0 .. n_out - 1``.
    adapter : StructuredAdapter, optional
        Required for ``mode="adapter"``; trained in place (its arrays are
        replaced by the trained ones).
    mode : {"adapter", "full", "head"}, default="adapter"
        "adapter": ``h = W1 x + b1 + dW x`` with ``W1, b1`` frozen;
        "full": every parameter of the MLP; "head": ``W2, b2`` only.
    train_head : bool, default=True
        In adapter mode, also train the output layer ``W2, b2``.
    optimizer : {"adam", "sgd"}, default="adam"
    lr : float, default=1e-3
    epochs, batch_size : int
        The last minibatch of an epoch may be smaller (not dropped).
    X_val, y_val : array-like, optional
        Validation set, evaluated after every epoch.
    random_state : int, Generator or None
        Seeds the minibatch shuffling.
    restore_best : bool, default=True
        Keep the parameters of the epoch with the lowest validation loss.
    callback : callable, optional
        ``callback(epoch, history)`` after every epoch.
    dtype : float32 or float64, default=float32
    blas_threads : int or None, default=1
        BLAS threads during training (threadpoolctl); 1 is fastest for
        these small matmuls and makes results independent of the machine's
        core count. None leaves BLAS alone.
    optimizer_kw : dict, optional
        Extra arguments of the optimiser (``betas``, ``eps``; ``momentum``).
    patience : int, optional
        Early stopping: end training once the validation loss has not
        improved for ``patience`` epochs (needs a validation set). ``epochs``
        is then an upper bound; ``len(history)`` tells where it stopped.

    Returns
    -------
    TrainResult

    Raises
    ------
    TrainingDivergedError
        If the training or validation loss becomes NaN or infinite; the
        message names the epoch and the learning rate.

    Examples
    --------
    >>> import numpy as np
    >>> from blocklowrank.adapters import MLP, StructuredAdapter, train
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((200, 20)).astype(np.float32)
    >>> y = (X[:, 0] > 0).astype(int)
    >>> mlp = MLP.init((20, 8, 2), random_state=0)
    >>> ad = StructuredAdapter.localized((8, 20), n_blocks=2, rank=1, random_state=0)
    >>> res = train(mlp, X, y, adapter=ad, lr=1e-2, epochs=5, random_state=0)
    >>> len(res.history), res.n_trainable == ad.n_params + 8 * 2 + 2
    (5, True)
    """
    dtype, X, y, X_val, y_val = _check_inputs(mlp, adapter, mode, X, y, X_val, y_val, dtype, patience)
    t_start = time.perf_counter()
    # overflow is reported as TrainingDivergedError below, not as warnings
    with _blas_limit(blas_threads), np.errstate(over="ignore", invalid="ignore"):
        model = _Model(mlp, adapter, mode, train_head, dtype)
        data = _Data(model, X, y)
        val = _Data(model, X_val, y_val) if X_val is not None else None
        opt = make_optimizer(optimizer, model.store.theta, model.store.grad, lr, **(optimizer_kw or {}))
        hist, best_epoch = _train_epochs(
            model,
            opt,
            data,
            val,
            np.random.default_rng(random_state),
            t_start,
            epochs=epochs,
            batch_size=batch_size,
            restore_best=restore_best,
            callback=callback,
            patience=patience,
            what=(optimizer, lr),
        )
        out_mlp = model.to_mlp()
        if adapter is not None:
            # give the adapter its own arrays again (out of the flat store)
            adapter.params = {k: v.copy() for k, v in adapter.params.items()}
    return TrainResult(
        mlp=out_mlp,
        adapter=adapter,
        history=hist,
        best_epoch=best_epoch,
        n_trainable=model.n_trainable,
        mode=mode,
        seconds=time.perf_counter() - t_start,
    )


def _check_inputs(mlp, adapter, mode, X, y, X_val, y_val, dtype, patience):
    """:func:`train`'s checks that depend on the data: ``(dtype, X, y, X_val, y_val)`` ready to use."""
    _check_setup(mlp, adapter, mode)
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    n_in, _, n_out = mlp.sizes
    X, y = _check_data(X, y, n_in, n_out, dtype)
    if (X_val is None) != (y_val is None):
        raise ValueError("give both X_val and y_val, or neither")
    if X_val is not None:
        X_val, y_val = _check_data(X_val, y_val, n_in, n_out, dtype, name="X_val")
    elif patience is not None:
        raise ValueError("patience (early stopping) needs a validation set: give X_val and y_val")
    return dtype, X, y, X_val, y_val


def _train_epochs(model, opt, data, val, rng, t_start, *, epochs, batch_size, restore_best, callback, patience, what):
    """The epochs of :func:`train`: ``(history, best epoch)``, the best parameters restored
    (``what``: the optimiser and learning rate, named if the loss diverges)."""
    store, hist = model.store, History()
    best = (math.inf, None, epochs)
    for epoch in range(1, epochs + 1):
        tr_loss, tr_acc = _one_epoch(model, opt, data, rng.permutation(data.n), batch_size)
        _check_diverged("training", tr_loss, epoch, epochs, *what)
        hist.epoch.append(epoch)
        hist.train_loss.append(tr_loss)
        hist.train_acc.append(tr_acc)
        if val is not None:
            v_loss, v_acc = _evaluate(model, val)
            _check_diverged("validation", v_loss, epoch, epochs, *what)
            hist.val_loss.append(v_loss)
            hist.val_acc.append(v_acc)
            if v_loss < best[0]:
                best = (v_loss, store.theta.copy() if restore_best else None, epoch)
        hist.seconds.append(time.perf_counter() - t_start)
        if callback is not None:
            callback(epoch, hist)
        if patience is not None and epoch - best[2] >= patience:
            break
    if restore_best and best[1] is not None:
        store.theta[...] = best[1]
        return hist, best[2]
    return hist, len(hist.epoch)


def _one_epoch(model, opt, data, perm, batch_size):
    """One pass of minibatch steps in the order ``perm``: mean training loss and accuracy."""
    loss_sum, correct = 0.0, 0
    for b in range(-(-data.n // batch_size)):
        idx = perm[b * batch_size : (b + 1) * batch_size]
        loss, nc = _loss_grad(model, data, idx)
        opt.step()
        loss_sum += loss * idx.size
        correct += nc
    return loss_sum / data.n, correct / data.n


@validate_params()  # train checks the options; errors name this function
def pretrain(X, y, *, sizes=(784, 64, 5), random_state=None, lr=1e-3, epochs=20, batch_size=64, **kw):
    """Train an MLP from PyTorch-default initialisation (all parameters, Adam).

    ``random_state`` seeds both the initialisation and the shuffling.
    """
    if isinstance(random_state, np.random.SeedSequence):
        ss = random_state
    elif isinstance(random_state, np.random.Generator):
        ss = np.random.SeedSequence(int(random_state.integers(2**63)))
    else:
        ss = np.random.SeedSequence(random_state)
    init_seed, shuffle_seed = ss.spawn(2)
    mlp = MLP.init(sizes, random_state=np.random.default_rng(init_seed))
    return train(
        mlp,
        X,
        y,
        mode="full",
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        random_state=np.random.default_rng(shuffle_seed),
        **kw,
    )


@validate_params()  # train checks the options; errors name this function
def fine_tune(mlp, X, y, **kw):
    """Full fine-tuning: every parameter of ``mlp`` (``train(..., mode="full")``)."""
    return train(mlp, X, y, mode="full", **kw)


@validate_params()  # train checks the options; errors name this function
def fit_adapter(mlp, X, y, adapter, **kw):
    """Train ``adapter`` on the frozen first layer (``train(..., mode="adapter")``)."""
    return train(mlp, X, y, adapter=adapter, mode="adapter", **kw)


def evaluate(mlp, X, y, *, adapter=None, dtype=None):
    """``(mean negative log-likelihood, accuracy)`` of ``mlp`` (+ ``adapter``) on ``(X, y)``."""
    dtype = np.dtype(dtype or mlp.dtype)
    n_in, _, n_out = mlp.sizes
    X, y = _check_data(X, y, n_in, n_out, dtype)
    mode = "adapter" if adapter is not None else "head"
    if adapter is not None:
        _check_setup(mlp, adapter, "adapter")
        adapter = _shadow(adapter, dtype)
    model = _Model(mlp, adapter, mode, False, dtype)
    return _evaluate(model, _Data(model, X, y))


def _shadow(adapter, dtype):
    """A copy of ``adapter`` (so binding it to a store leaves the original alone)."""
    import copy

    sh = copy.copy(adapter)
    sh.dtype = np.dtype(dtype)
    sh.params = {k: np.array(v, dtype=dtype) for k, v in adapter.params.items()}
    return sh


@validate_params(mode=_TRAIN_PARAMS["mode"])
def loss_and_grad(mlp, X, y, *, adapter=None, mode="adapter", train_head=True, dtype=np.float64):
    """Mean loss and closed-form gradients of the trainable parameters.

    Returns ``(loss, grads)`` with ``grads`` a dict named like the stored
    parameters: ``"W1", "b1"`` (full mode), the adapter's ``"A<k>", "B<k>"``
    (see :meth:`StructuredAdapter.param_specs`) and ``"W2", "b2"``. Neither
    ``mlp`` nor ``adapter`` is modified. Used by the gradient tests.
    """
    _check_setup(mlp, adapter, mode)
    n_in, _, n_out = mlp.sizes
    X, y = _check_data(X, y, n_in, n_out, dtype)
    if adapter is not None:
        adapter = _shadow(adapter, dtype)
    model = _Model(mlp, adapter, mode, train_head, dtype)
    data = _Data(model, X, y)
    loss, _ = _loss_grad(model, data, slice(0, data.n))
    return loss, {k: v.copy() for k, v in model.store.grads.items()}

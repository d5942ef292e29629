"""The collector's hook state: input sites by tensor identity, masked rows, float64 sums (torch passed in).

Private to :mod:`blocklowrank.calibration.collect`, which imports torch and
hands it in: this module imports neither torch nor transformers.
"""

from __future__ import annotations

import weakref

from ._stats import CalibrationError


class Sum:
    """``Σ x xᵀ`` over kept rows in float64 on the tensors' device, with the count (see Precision)."""

    def __init__(self, n, device, torch):
        self.torch, self.count = torch, 0
        self.total = torch.zeros((n, n), dtype=torch.float64, device=device)

    def add(self, x, rows, layer):
        """Add the rows of ``x`` (a layer tensor, rows = its leading dimensions) that ``rows`` keeps."""
        torch = self.torch
        x = x.detach().reshape(-1, x.shape[-1])
        if not rows.all():
            x = x[torch.from_numpy(rows).to(x.device)]
        step = max(1, (1 << 24) // (8 * x.shape[1]))
        for start in range(0, x.shape[0], step):
            chunk = x[start : start + step].to(torch.float64)  # exact for float16, bfloat16, float32
            if not torch.isfinite(chunk).all():
                raise CalibrationError(f"layer {layer!r}: a tensor holds NaN or infinite values")
            self.total.addmm_(chunk.T, chunk)
        self.count += x.shape[0]

    def merge(self, other):
        self.total += other.total
        self.count += other.count
        return self

    def mean(self):
        """``Σ x xᵀ / count`` as a NumPy float64 array, the upper triangle mirrored (exactly symmetric)."""
        total = self.torch.triu(self.total)
        total += self.torch.triu(total, 1).T
        return (total / max(self.count, 1)).cpu().numpy()


class Collector:
    """Forward hooks' shared state: the batch's token mask, the input sites, the accumulators."""

    def __init__(self, layers, torch):
        self.torch = torch
        self.order = {name: i for i, name in enumerate(layers)}
        self.site_of, self.members = {}, {}  # layer -> site; site -> frozenset of its layers
        self.inputs, self.pending, self.outputs = {}, {}, {}  # site / first reader / layer -> Sum
        self.mask = None  # numpy bool (batch, seq): the tokens counted in this pass
        self.seen = {}  # id(tensor) -> (weak reference, its readers) of the live tensors of this pass
        self.readers = []  # the readers of every tensor of this pass (an id may be reused by a later tensor)
        self.captured = []  # (layer, output tensor, row mask) awaiting the backward pass
        self.on_inputs, self.on_outputs = True, False

    def hook(self, layer):
        def record(module, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()))
            if self.on_inputs:
                self._input(layer, x)
            if self.on_outputs:
                if not (self.torch.is_tensor(output) and output.requires_grad):
                    raise CalibrationError(
                        f"layer {layer!r}: its output has no gradient; the loss must run the model with autograd on"
                    )
                self.captured.append((layer, output, self._rows(layer, output.shape[:-1])))

        return record

    def _rows(self, layer, lead):
        """The flat boolean mask over the rows of a layer tensor whose leading shape is ``lead``."""
        mask, lead = self.mask, tuple(lead)
        if lead == mask.shape:
            return mask.reshape(-1)
        if len(lead) == 1 and lead[0] == mask.size:
            return mask.reshape(-1)
        if len(lead) == 1 and lead[0] == mask.shape[0]:
            return mask.any(axis=1)  # one row per sequence (pooler, classification head)
        raise CalibrationError(
            f"layer {layer!r}: a tensor of leading shape {lead} does not line up with the batch's tokens "
            f"{mask.shape}; its rows cannot be matched to the attention mask"
        )

    def _input(self, layer, x):
        entry = self.seen.get(id(x))
        if entry is not None and entry[0]() is x:
            entry[1].append(layer)  # another reader of a tensor already counted in this pass
            return
        self.seen[id(x)] = (weakref.ref(x), [layer])
        self.readers.append(self.seen[id(x)][1])
        site = self.site_of.get(layer)
        store, key = (self.inputs, site) if site is not None else (self.pending, layer)
        if key not in store:
            store[key] = Sum(x.shape[-1], x.device, self.torch)
        store[key].add(x, self._rows(layer, x.shape[:-1]), layer)

    def end_pass(self):
        """Group this pass's layers into sites by the tensors they read; check the grouping holds."""
        groups = {}
        for readers in self.readers:
            group = frozenset(readers)
            for layer in group:
                if groups.setdefault(layer, group) != group:
                    raise CalibrationError(
                        f"layer {layer!r} reads one tensor with {sorted(groups[layer])} and another with "
                        f"{sorted(group)}: its inputs have no single input site"
                    )
        for group in set(groups.values()):
            known = {self.site_of.get(layer) for layer in group}
            if known == {None}:
                site = min(group, key=self.order.get)
                self.members[site] = group
                self.site_of.update(dict.fromkeys(group, site))
            elif len(known) != 1 or self.members[known.pop()] != group:
                raise CalibrationError(
                    f"layers {sorted(group)} shared one input in this batch but not in an earlier one; "
                    "the input sites change from batch to batch"
                )
        for owner, acc in self.pending.items():
            site = self.site_of[owner]
            self.inputs[site] = self.inputs[site].merge(acc) if site in self.inputs else acc
        self.pending, self.seen, self.readers = {}, {}, []

    def backward(self, loss):
        """Accumulate ``H`` of every captured output from the gradient of ``loss``."""
        torch = self.torch
        if not (torch.is_tensor(loss) and loss.numel() == 1 and loss.is_floating_point() and loss.requires_grad):
            raise CalibrationError(f"the loss must be a scalar tensor with a gradient, got {loss!r:.80}")
        if self.captured:
            grads = torch.autograd.grad(loss.reshape(()), [t for _, t, _ in self.captured], allow_unused=True)
            for (layer, out, rows), g in zip(self.captured, grads):
                g = torch.zeros_like(out) if g is None else g  # the loss does not depend on this output
                if layer not in self.outputs:
                    self.outputs[layer] = Sum(out.shape[-1], out.device, torch)
                self.outputs[layer].add(g, rows, layer)
        self.captured = []


def drain(store, keys):
    """(grams, counts) of the accumulators ``store[key]``, each dropped once converted: the matrices are held once."""
    grams, counts = {}, {}
    for key in keys:
        acc = store.pop(key)
        grams[key], counts[key] = acc.mean(), acc.count  # a count of 0 is refused by CalibrationStats
    return grams, counts

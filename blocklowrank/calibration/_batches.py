"""Batches for the collector: model inputs, the tokens an attention mask keeps, token files.

Private to :mod:`blocklowrank.calibration.collect`; torch, where needed, is handed in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._stats import CalibrationError


def as_inputs(batch, device, torch):
    """A batch as keyword arguments of the model, tensors on its device."""
    if torch.is_tensor(batch) or isinstance(batch, np.ndarray):
        batch = {"input_ids": batch}
    if not hasattr(batch, "items"):
        raise TypeError(f"a batch must be a mapping of model inputs or a tensor of input ids, got {type(batch)}")
    out = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        out[key] = value.to(device) if torch.is_tensor(value) else value
    return out


def token_mask(inputs):
    """The tokens of a batch the attention mask keeps, as a NumPy bool (batch, seq) array."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        return mask.detach().cpu().numpy().astype(bool)
    for key in ("input_ids", "inputs_embeds"):
        if key in inputs:
            shape = tuple(inputs[key].shape[:2])
            return np.ones(shape, dtype=bool)
    raise CalibrationError("a batch needs attention_mask, input_ids or inputs_embeds to know its tokens")


def trim(mask, budget):
    """Keep only the first ``budget`` kept tokens of ``mask`` (row-major): a token limit that is exact."""
    flat = mask.reshape(-1).copy()
    flat[np.flatnonzero(flat)[budget:]] = False
    return flat.reshape(mask.shape)


def masked_copy(inputs, keep, mask_token_id, probability, generator, torch):
    """The batch with a share ``probability`` of its kept tokens masked, and labels at those tokens."""
    ids = inputs["input_ids"]
    keep = torch.from_numpy(keep).to(ids.device)
    pick = (torch.rand(ids.shape, generator=generator) < probability).to(ids.device) & keep
    if not pick.any():
        pick.view(-1)[keep.view(-1).nonzero()[0]] = True
    return {**inputs, "input_ids": ids.masked_fill(pick, mask_token_id), "labels": ids.masked_fill(~pick, -100)}


def padded(rows, pad_id=0):
    """Token id lists -> input_ids and attention_mask (int64), right-padded to the longest."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return {"input_ids": ids, "attention_mask": mask}


def read_texts(path):
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    texts = [line for line in lines if line]
    if not texts:
        raise ValueError(f"{path}: no text (one text per line; blank lines are skipped)")
    return texts


def read_tokens(path, max_length, vocab_size):
    """Rows of token ids from a .npy file: 1-D (a stream, cut into windows) or 2-D (negative = padding)."""
    try:
        ids = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{path}: not a NumPy .npy array of token ids ({exc})") from None
    if ids.dtype.kind not in "iu" or ids.ndim not in (1, 2) or not ids.size:
        raise ValueError(f"{path}: token ids must be a non-empty 1-D or 2-D integer array, got {ids.dtype} {ids.shape}")
    if vocab_size is not None and ids.max() >= vocab_size:
        raise ValueError(f"{path}: token id {int(ids.max())} is outside the model's vocabulary ({vocab_size})")
    if ids.ndim == 1:
        if ids.min() < 0:
            raise ValueError(f"{path}: a 1-D token stream holds a negative id")
        return [ids[i : i + max_length].tolist() for i in range(0, ids.size, max_length)]
    if ids.shape[1] > max_length:
        raise ValueError(f"{path}: rows of {ids.shape[1]} tokens are longer than --max-length {max_length}")
    rows = []
    for i, row in enumerate(ids):
        n = int((row >= 0).sum())
        if (row[:n] < 0).any():
            raise ValueError(f"{path}: row {i}: padding (negative ids) must come after the row's tokens")
        if n:
            rows.append(row[:n].tolist())
    if not rows:
        raise ValueError(f"{path}: every row is padding")
    return rows

"""The torch side of the MiniLM verdicts: the models, calibration, adapters through PEFT, scoring.

Private to :mod:`blocklowrank.experiments.minilm_metric`. torch,
transformers, tokenizers and peft are imported inside the functions (the
``realweights`` and ``peft`` extras), so importing this module loads none of
them.

- :class:`MiniLMTask`: the base all-MiniLM-L6-v2 as a transformers
  ``BertModel``, its pydoc-topics fine-tune (encoder and linear head, as
  :mod:`~blocklowrank.experiments._finetune_minilm` saved them) and the
  task's sentences, tokenized once.
- calibration: :meth:`MiniLMTask.collect` runs
  :func:`blocklowrank.calibration.collect.collect_statistics` on a model
  (``G`` per input site over the tokens the attention mask keeps; ``H`` per
  layer from the task loss, the cross-entropy of the fine-tuned head on the
  mean-pooled embedding, summed over sentences so that a sentence's gradient
  does not depend on its batch).
- adapters: :meth:`MiniLMTask.adapter_model` writes fitted layers with
  :func:`blocklowrank.peft.save_peft_adapter`, loads them with
  ``peft.PeftModel.from_pretrained`` on a fresh base ``BertModel``, merges,
  and checks every merged weight against ``W_base + M`` (a wrong key would
  otherwise leave the layer at the base silently).
- :meth:`MiniLMTask.sequential`: calibration on the already-compressed
  model's own inputs, layer by layer (AA-SVD's remedy for errors that
  compound): the hidden states of the training sentences are carried from
  layer to layer, so each layer's statistics cost one layer's forward pass.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .._extras import require
from ..checkpoints import open_checkpoint, select_names
from ..peft import save_peft_adapter
from .realweights import MINILM_TARGETS, minilm_checkpoint, pydoc_topic_sentences

__all__ = ["MiniLMTask"]

#: Sentences per forward pass (sorted by length within a split, so padding stays small).
BATCH = 64


def _read(path):
    with open_checkpoint(path) as ck:
        return {name: np.array(ck.get(name)) for name in ck.names()}


class MiniLMTask:
    """The base model, the fine-tune and the task's data, on the CPU.

    Parameters
    ----------
    finetuned : path-like
        Folder of the fine-tune: ``model.safetensors`` (the encoder under the
        base's tensor names), ``head.safetensors``, ``finetune.json``.
    base : path-like, optional
        The base ``model.safetensors`` (``config.json`` and ``tokenizer.json``
        beside it); default :func:`minilm_checkpoint`.
    subset : int, optional
        Only ``subset`` training and test sentences, chosen at random (seeded; quick checks).
    """

    def __init__(self, finetuned, *, base=None, subset=None):
        torch = require("torch")
        from ._finetune_minilm import _load

        self.torch = torch
        folder = Path(finetuned)
        self.record = json.loads((folder / "finetune.json").read_text())
        settings = self.record["settings"]
        self.base_model, self.tokenizer, self.base = _load(torch, base or minilm_checkpoint())
        self.base_model.eval()
        self.tokenizer.enable_truncation(settings["max_length"])
        self.tuned = _read(folder / "model.safetensors")
        self.head = torch.nn.Linear(self.base_model.config.hidden_size, len(self.record["topics"]))
        self.head.load_state_dict({k: torch.from_numpy(v) for k, v in _read(folder / "head.safetensors").items()})
        self.head.eval()
        self.layers = [n.removesuffix(".weight") for n in select_names(list(self.base), MINILM_TARGETS)]
        data = pydoc_topic_sentences(settings["n_topics"], seed=settings["seed"])
        self.texts, self.labels, self.ids = {}, {}, {}
        for split in ("train", "test"):
            text, y = data[f"{split}_text"], data[f"{split}_y"]
            if subset is not None:  # a seeded random subset (the splits are ordered by topic)
                keep = np.sort(np.random.default_rng(0).permutation(len(y))[:subset])
                text, y = [text[i] for i in keep], y[keep]
            self.texts[split], self.labels[split] = text, y
            self.ids[split] = [e.ids for e in self.tokenizer.encode_batch(list(text))]

    # ------------------------------------------------------------------ models
    def model_with(self, weights=None, *, tuned=False):
        """A copy of the base ``BertModel`` (or of the whole fine-tune) with ``weights`` (name -> array) set."""
        torch = self.torch
        model = copy.deepcopy(self.base_model)
        state = dict(self.tuned) if tuned else {}
        state.update(weights or {})
        state.pop("embeddings.position_ids", None)  # a buffer of older checkpoints, not a weight
        if state:
            missing = set(state) - set(model.state_dict())
            if missing:
                raise KeyError(f"no such tensors in the model: {sorted(missing)[:3]}")
            model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=False)
        return model.eval()

    def exact_weights(self):
        """``W_base + ΔW`` of the 36 linears, i.e. the fine-tune's weights of those layers only."""
        return {f"{layer}.weight": self.tuned[f"{layer}.weight"] for layer in self.layers}

    def adapter_model(self, fits, *, check=True):
        """The base with ``fits`` (layer -> fitted structure of ΔW) written as a PEFT adapter, loaded by PEFT, merged.

        Returns ``(model, written)``: the merged ``BertModel`` and
        :func:`save_peft_adapter`'s report. Raises ``RuntimeError`` when a
        merged weight is not ``W_base + M`` (to float32 rounding).
        """
        peft = require("peft")
        with tempfile.TemporaryDirectory(prefix="minilm_adapter_") as tmp:
            written = save_peft_adapter(os.path.join(tmp, "adapter"), fits, base_model_name_or_path="all-MiniLM-L6-v2")
            model = peft.PeftModel.from_pretrained(copy.deepcopy(self.base_model), os.path.join(tmp, "adapter"))
            model = model.merge_and_unload().eval()
        if check:
            self._check_merged(model, fits)
        return model, written

    def _check_merged(self, model, fits):
        for layer, fit in fits.items():
            want = self.base[f"{layer}.weight"].astype(np.float64) + fit.reconstruction.astype(np.float64)
            got = model.get_submodule(layer).weight.detach().numpy().astype(np.float64)
            scale = float(np.abs(want).max())
            if not np.allclose(got, want, rtol=0, atol=1e-5 * scale):
                worst = float(np.abs(got - want).max())
                raise RuntimeError(f"PEFT merged {layer} differs from W_base + M by {worst:.3g} (max |W| {scale:.3g})")

    # ------------------------------------------------------------------ batches
    def _order(self, split):
        return np.argsort([len(i) for i in self.ids[split]], kind="stable")

    def _batches(self, split, order, labels=False):
        """Padded batches of ``split`` in ``order``: dicts of ``input_ids``, ``attention_mask`` (and ``labels``)."""
        torch = self.torch
        out = []
        for start in range(0, len(order), BATCH):
            idx = order[start : start + BATCH]
            rows = [self.ids[split][i] for i in idx]
            ids = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int64)
            for row, r in zip(ids, rows):
                row[: len(r)] = r
            batch = {
                "input_ids": torch.from_numpy(ids),
                "attention_mask": torch.from_numpy((ids != 0).astype(np.int64)),
            }
            if labels:
                batch["labels"] = torch.from_numpy(self.labels[split][idx])
            out.append(batch)
        return out

    def logits(self, model, split="test"):
        """The head's logits on every sentence of ``split`` (NumPy, in the split's order)."""
        torch = self.torch
        order = self._order(split)
        parts = []
        with torch.inference_mode():
            for batch in self._batches(split, order):
                parts.append(self.head(_pooled(model, batch)).numpy())
        out = np.empty((len(order), self.head.out_features), dtype=np.float32)
        out[order] = np.concatenate(parts)
        return out

    # ------------------------------------------------------------------ calibration
    def loss_fn(self, model, batch):
        """The task loss for ``H``: cross-entropy of the head on mean-pooled states, summed over sentences."""
        logits = self.head(_pooled(model, batch))
        return self.torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")

    def collect(self, model, split, *, output=False, rows=None, progress=False):
        """Calibration statistics of the 36 linears on ``split`` (rows ``rows`` of it, default all).

        ``output``: also ``H`` from :meth:`loss_fn`.
        """
        from ..calibration.collect import collect_statistics

        order = self._order(split)
        if rows is not None:
            order = order[np.isin(order, rows)]
        return collect_statistics(
            model,
            self._batches(split, order, labels=output),
            target_modules=MINILM_TARGETS,
            output_grams=output,
            loss_fn=self.loss_fn if output else None,
            progress=progress,
        )

    def sequential(self, fit_group, *, output=False, progress=False):
        """Fit layer by layer on the inputs of the model compressed so far (AA-SVD's calibration).

        The model starts as the base with the fine-tune's 36 linears (the
        reference every adapter approximates); for each encoder layer in
        turn, its statistics are collected on the training sentences'
        hidden states *as the already-replaced earlier layers produce them*,
        ``fit_group(layers, stats) -> {layer: fit}`` fits its linears, and
        their weights become ``W_base + M``.

        Returns ``{layer: fit}`` for the 36 linears.
        """
        from ..calibration.collect import collect_statistics

        torch = self.torch
        model = self.model_with(self.exact_weights())
        batches = self._batches("train", self._order("train"), labels=output)
        with torch.no_grad():  # not inference_mode: the states enter autograd when H is collected
            states = [model.embeddings(input_ids=b["input_ids"]) for b in batches]
        n_layers = len(model.encoder.layer)
        fits = {}
        for index in range(n_layers):
            mine = [layer for layer in self.layers if layer.startswith(f"encoder.layer.{index}.")]
            runner = _Layers(model, index, n_layers if output else index + 1)
            inputs = [{"hidden_states": s, "attention_mask": b["attention_mask"]} for s, b in zip(states, batches)]
            if output:
                inputs = [{**x, "labels": b["labels"]} for x, b in zip(inputs, batches)]
            stats = collect_statistics(
                runner,
                inputs,
                target_modules=[f"{layer}" for layer in mine],
                output_grams=output,
                loss_fn=self.loss_fn if output else None,
                progress=progress,
            )
            fits.update(fit_group(mine, stats))
            with torch.no_grad():
                for layer in mine:
                    new = self.base[f"{layer}.weight"].astype(np.float64) + fits[layer].reconstruction
                    model.get_submodule(layer).weight.copy_(torch.from_numpy(new.astype(np.float32)))
            step = _Layers(model, index, index + 1)
            with torch.no_grad():
                states = [step(s, b["attention_mask"]) for s, b in zip(states, batches)]
        return fits


def _pooled(model, batch):
    """Mean of the token states over the attention mask (the fine-tune's pooling)."""
    if "hidden_states" in batch:
        states = model(batch["hidden_states"], batch["attention_mask"])
    else:
        states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    weights = batch["attention_mask"].unsqueeze(-1).to(states.dtype)  # (batch, tokens, 1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # (batch, hidden)


def _layers_module():
    torch = require("torch")
    masking = require("transformers.masking_utils")

    class Layers(torch.nn.Module):
        """Encoder layers ``start .. stop - 1`` of a ``BertModel`` on given hidden states.

        It holds the model's ``encoder`` under that name, so module paths
        (``encoder.layer.3.attention.self.query``) are the model's own.
        """

        def __init__(self, bert, start, stop):
            super().__init__()
            self.encoder, self.config, self.start, self.stop = bert.encoder, bert.config, start, stop

        def forward(self, hidden_states, attention_mask):
            mask = masking.create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
            )
            for layer in self.encoder.layer[self.start : self.stop]:
                hidden_states = layer(hidden_states, mask)
            return hidden_states

    return Layers


def _Layers(bert, start, stop):  # noqa: N802  (a class built on first use: torch is imported lazily)
    return _layers_module()(bert, start, stop)

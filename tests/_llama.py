"""Shared helpers of the PEFT tests: a tiny random Llama, warning capture, structured updates.

torch, transformers and peft are test-only dependencies (the ``peft``
extra): with ``BLOCKLOWRANK_TEST_PEFT=1`` (``make test``) they are required,
otherwise a test module that imports this one is skipped without them.
"""

import contextlib
import logging
import os
import warnings

import numpy as np
import pytest

if os.environ.get("BLOCKLOWRANK_TEST_PEFT") == "1":  # make test: required, never skipped
    import peft
    import torch
    import transformers
else:  # a bare pytest without the peft extra
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

ATTN = "model.layers.{}.self_attn.{}"
MLP = "model.layers.{}.mlp.{}"


def tiny_llama(seed=0):
    """A random ``LlamaForCausalLM``: vocabulary 96, hidden 64, MLP 128, 2 layers, 4 heads."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tokens(seed=1):
    """A (2, 12) batch of token ids."""
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed))


def weight(model, module):
    """The weight of ``model``'s module ``module`` as a NumPy array."""
    return model.get_submodule(module).weight.detach().numpy()


def structured_delta(shape, seed, K=2, rank=2):
    """A 'fine-tuning' update: K x K blocks of rank ``rank`` plus a global rank-1 term and noise."""
    rng = np.random.default_rng(seed)
    m, n = shape
    dW = np.zeros(shape)
    for rows in np.array_split(np.arange(m), K):
        for cols in np.array_split(np.arange(n), K):
            dW[np.ix_(rows, cols)] = rng.standard_normal((rows.size, rank)) @ rng.standard_normal((rank, cols.size))
    dW += np.outer(rng.standard_normal(m), rng.standard_normal(n)) + 0.05 * rng.standard_normal(shape)
    return 0.01 * dW


@contextlib.contextmanager
def captured():
    """Every warning and every log record of WARNING or above, as strings."""
    seen = []

    class Grab(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Grab(logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("", "transformers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
        seen.extend(str(w.message) for w in caught)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def key_problems(seen):
    """The captured messages about missing or unexpected keys."""
    return [s for s in seen if "missing" in s.lower() or "unexpected" in s.lower()]

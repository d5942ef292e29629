"""A tiny random GPT-2 and adapters made by PEFT itself, for the issue-17 tests.

GPT-2's linear layers are transformers' ``Conv1D``: the weight is stored as
``(in_features, out_features)``, the transpose of ``nn.Linear``. With
``n_embd=32, n_inner=64`` one layer of each kind is present: ``attn.c_proj``
is square (32 x 32), ``attn.c_attn`` (32 x 96), ``mlp.c_fc`` (32 x 64) and
``mlp.c_proj`` (64 x 32) are not. Models are saved with transformers' own
``save_pretrained`` (``model.safetensors`` + ``config.json``), adapters with
PEFT's ``get_peft_model`` + ``save_pretrained`` (unconverted).

Everything returned in "stored orientation" is laid out as the checkpoint
stores the weight (what ``merged.weight - base.weight`` gives).
"""

import contextlib
import copy
import io

import numpy as np
from _llama import peft, torch, transformers

CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
SQUARE = ("attn.c_proj",)


def tiny_gpt2(seed=0, *, n_embd=32, n_inner=64, n_layer=2, n_head=2, vocab=96):
    """A random ``GPT2LMHeadModel`` (eval mode)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=16,
        n_embd=n_embd,
        n_inner=n_inner,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def conv1d_modules(model, kinds=CONV1D):
    """Module paths of the model's ``Conv1D`` layers whose path ends with one of ``kinds``."""
    Conv1D = transformers.pytorch_utils.Conv1D
    return [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, Conv1D) and any(name.endswith("." + k) for k in kinds)
    ]


def weight(model, module):
    """The stored weight of ``model``'s module ``module`` (float64 NumPy)."""
    return model.get_submodule(module).weight.detach().numpy().astype(np.float64)


def update(shape, seed, rank=3):
    """A 'fine-tuning' update: rank ``rank`` plus a small full-rank part (so fits are not exact)."""
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))
    return 0.02 * low + 0.002 * rng.standard_normal(shape)


def finetuned(model, modules, seed=1):
    """A copy of ``model`` with :func:`update` added to each module's stored weight."""
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for t, module in enumerate(modules):
            w = tuned.get_submodule(module).weight
            w += torch.from_numpy(update(tuple(w.shape), seed * 1000 + t).astype(np.float32))
    return tuned


def save(model, folder):
    """``model.save_pretrained(folder)`` without its progress bar; returns ``folder``."""
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(folder)
    return folder


def peft_adapter(model, folder, config, *, seed=5, scale=0.05, prepare=None):
    """An adapter made by PEFT: ``get_peft_model`` on a copy of ``model``, 'trained', ``save_pretrained``.

    Training is simulated by adding Gaussian noise to every LoRA parameter
    (so B is not zero). The adapter is saved unconverted, as PEFT does by
    default. ``prepare(peft_model)`` runs after ``get_peft_model`` (EVA's
    data-driven initialisation).

    Returns
    -------
    merged_minus_base : dict of str to ndarray
        Per adapted module, what PEFT applies to the original ``model``:
        the in-memory PEFT model's ``merge_and_unload()`` weight minus the
        original weight, in stored orientation (inits that rewrite the base,
        such as PiSSA, are included: this is the fine-tune's real update).
    delta_weight : dict of str to ndarray
        Per adapted module, PEFT's own ``get_delta_weight`` (stored
        orientation; equal to the above when the init leaves the base alone).
    """
    tuned = peft.get_peft_model(copy.deepcopy(model), config)
    if prepare is not None:
        prepare(tuned)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_" in name:
                p += scale * torch.randn(p.shape, generator=gen)
    with contextlib.redirect_stderr(io.StringIO()):
        tuned.save_pretrained(folder)
    deltas = {
        name.removeprefix("base_model.model."): mod.get_delta_weight("default").detach().numpy().astype(np.float64)
        for name, mod in tuned.named_modules()
        if hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer")
    }
    merged = tuned.merge_and_unload()
    applied = {module: weight(merged, module) - weight(model, module) for module in deltas}
    return applied, deltas

"""Our adapter files against real PEFT, and PEFT's files read back.

A tiny random ``LlamaForCausalLM`` (hidden 64, 2 layers) gets structured
updates on some linear layers; every structure is fitted with the library,
written with :func:`blocklowrank.peft.save_peft_adapter` and loaded with
``PeftModel.from_pretrained``. The merged weights must equal base + our
reconstruction and the logits those of a model holding those weights; no
adapter key may be missing or unexpected. The other way, adapters made by
PEFT (LoRA with rank/alpha patterns, GraLoRA with ``hybrid_r``) must read back
to PEFT's own ``get_delta_weight``.

torch, transformers and peft are test-only dependencies (the ``peft`` extra,
installed by ``make test``); the library never imports them.
"""

import copy
import json
import os

import numpy as np
import pytest
from _llama import ATTN, MLP, peft, tiny_llama, torch
from _llama import captured as _captured
from _llama import structured_delta as _delta
from _llama import tokens as _tokens
from _llama import weight as _weight

from blocklowrank import BlockLayout, approximate, fit_hybrid
from blocklowrank.convert import as_factors
from blocklowrank.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_peft_adapter, save_peft_adapter

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokens():
    return _tokens()


FITS = {
    "global": lambda dW: approximate(dW, method="global", rank=4),
    "diagonal": lambda dW: approximate(dW, method="diagonal", n_blocks=4, rank=2),
    "diagonal_r1": lambda dW: approximate(dW, method="diagonal", n_blocks=2, rank=1),
    "block": lambda dW: approximate(dW, method="block", n_blocks=2, rank=2),
    "block_k4": lambda dW: approximate(dW, method="block", n_blocks=4, rank=1),
    "block_budget": lambda dW: approximate(dW, method="block", n_blocks=2, budget=int(3.5 * sum(dW.shape))),
    "hybrid": lambda dW: fit_hybrid(dW, BlockLayout.block(dW.shape, 2, rank=2), global_rank=2, max_iter=10),
}

# name -> ({module: fit}, save_peft_adapter keywords, expected peft_type)
CASES = {
    "lora_global": ({ATTN.format(0, "q_proj"): "global", ATTN.format(1, "v_proj"): "global"}, {}, "LORA"),
    "lora_melora_rank_pattern": (
        {
            ATTN.format(0, "q_proj"): "global",
            MLP.format(0, "up_proj"): "diagonal",
            MLP.format(1, "down_proj"): "diagonal_r1",
        },
        {},
        "LORA",
    ),
    "gralora": ({ATTN.format(0, "q_proj"): "block", MLP.format(1, "gate_proj"): "block"}, {}, "GRALORA"),
    "gralora_k4": ({ATTN.format(1, "o_proj"): "block_k4"}, {}, "GRALORA"),
    "gralora_padded_ranks": (
        {ATTN.format(0, "k_proj"): "block_budget", MLP.format(0, "down_proj"): "block"},
        {},
        "GRALORA",
    ),
    "gralora_hybrid": ({ATTN.format(0, "v_proj"): "hybrid", MLP.format(1, "up_proj"): "block"}, {}, "GRALORA"),
    "gralora_forced_mixed": (
        {
            ATTN.format(0, "q_proj"): "global",
            MLP.format(0, "up_proj"): "diagonal_r1",
            MLP.format(1, "down_proj"): "hybrid",
        },
        {"peft_type": "GRALORA"},
        "GRALORA",
    ),
    "lora_forced_blocks": (
        {ATTN.format(1, "q_proj"): "block", MLP.format(0, "gate_proj"): "hybrid"},
        {"peft_type": "LORA"},
        "LORA",
    ),
}


# ---------------------------------------------------------------------------- ours -> PEFT
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_loads_our_adapter(case, base_model, tokens, tmp_path):
    spec, kwargs, expected_type = CASES[case]
    fits = {}
    for t, (module, fit) in enumerate(spec.items()):
        dW = _delta(_weight(base_model, module).shape, seed=t)
        fits[module] = FITS[fit](dW)
    report = save_peft_adapter(tmp_path / "adapter", fits, **kwargs)
    assert report["peft_type"] == expected_type
    assert report["n_params_written"] >= report["n_params_effective"]

    with _captured() as seen:
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "adapter")
    bad = [s for s in seen if "missing" in s.lower() or "unexpected" in s.lower()]
    assert not bad, bad
    # the adapter's parameters and the file's tensors are the same set of keys (nothing dropped either way)
    saved = set(peft.utils.get_peft_model_state_dict(model))
    from safetensors.numpy import load_file

    assert saved == set(load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS))

    with torch.no_grad():
        adapted_logits = model(tokens).logits.numpy()
    merged = model.merge_and_unload()
    reference = copy.deepcopy(base_model)
    for module, fit in fits.items():
        ours = as_factors(fit).to_dense(np.float64)
        want = _weight(base_model, module).astype(np.float64) + ours
        np.testing.assert_allclose(_weight(merged, module), want, rtol=0, atol=2e-7, err_msg=module)
        with torch.no_grad():
            reference.get_submodule(module).weight += torch.from_numpy(ours.astype(np.float32))
    others = [n for n, _ in base_model.named_parameters() if n.removesuffix(".weight") not in fits]
    for name in others:  # every other weight untouched
        assert torch.equal(merged.get_parameter(name), base_model.get_parameter(name)), name
    with torch.no_grad():
        ref_logits = reference(tokens).logits.numpy()
        merged_logits = merged(tokens).logits.numpy()
    np.testing.assert_allclose(merged_logits, ref_logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(adapted_logits, ref_logits, rtol=0, atol=1e-5)


def test_a_wrong_key_is_caught(base_model, tmp_path):
    """Negative control: PEFT only warns about a missing key, and the capture above sees it."""
    from safetensors.numpy import load_file, save_file

    fit = approximate(_delta((64, 64), 0), method="global", rank=2)
    save_peft_adapter(tmp_path / "a", {ATTN.format(0, "q_proj"): fit})
    path = tmp_path / "a" / ADAPTER_WEIGHTS
    tensors = {k.replace("lora_B", "lora_b"): v for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    with _captured() as seen:
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "a")
    assert any("missing adapter keys" in s for s in seen), seen
    merged = model.merge_and_unload()  # B stayed at its initial zeros: the update is lost
    np.testing.assert_array_equal(
        _weight(merged, ATTN.format(0, "q_proj")), _weight(base_model, ATTN.format(0, "q_proj"))
    )


def test_rank_pattern_picks_one_module(tmp_path):
    """Modules that differ only in their first component (encoder/decoder) get their own ranks."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.ModuleDict({"proj": torch.nn.Linear(12, 8)})
            self.decoder = torch.nn.ModuleDict({"proj": torch.nn.Linear(12, 8)})

        def forward(self, x):
            return self.encoder["proj"](x) + self.decoder["proj"](x)

    torch.manual_seed(0)
    net = Net()
    fits = {
        "encoder.proj": approximate(_delta((8, 12), 0), method="global", rank=1),
        "decoder.proj": approximate(_delta((8, 12), 1), method="global", rank=3),
    }
    save_peft_adapter(tmp_path / "a", fits)
    with _captured() as seen:
        merged = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path / "a").merge_and_unload()
    assert not [s for s in seen if "missing" in s.lower() or "unexpected" in s.lower()]
    for module, fit in fits.items():
        want = _weight(net, module) + fit.reconstruction
        np.testing.assert_allclose(_weight(merged, module), want, rtol=0, atol=2e-7, err_msg=module)


def test_write_and_read_back_are_exact(tmp_path, base_model):
    fits = {
        module: FITS[fit](_delta(_weight(base_model, module).shape, seed=3))
        for module, fit in CASES["gralora_hybrid"][0].items()
    }
    save_peft_adapter(tmp_path / "a", fits, dtype=np.float64)
    layers, config = load_peft_adapter(tmp_path / "a")
    assert config["hybrid_r"] == 2 and config["alpha"] == config["r"] + config["hybrid_r"]
    for module, fit in fits.items():
        np.testing.assert_allclose(layers[module].to_dense(), as_factors(fit).to_dense(), rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------- PEFT -> ours
def _peft_made(base_model, config, tmp_path, dtype=None):
    base = copy.deepcopy(base_model).to(dtype or torch.float32)
    model = peft.get_peft_model(base, config, autocast_adapter_dtype=False)  # adapter in the model's dtype
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "gralora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(tmp_path / "peft")
    model.float()  # bfloat16 values are float32 values: the deltas below are exact float32 ones
    deltas = {
        name.removeprefix("base_model.model."): mod.get_delta_weight("default").detach().numpy()
        for name, mod in model.named_modules()
        if hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer")
    }
    return deltas, load_peft_adapter(tmp_path / "peft")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_read_lora_made_by_peft(base_model, tmp_path, dtype):
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"up_proj": 6},
        alpha_pattern={"v_proj": 3},
    )
    deltas, (layers, saved) = _peft_made(base_model, config, tmp_path, getattr(torch, dtype))
    raw = (tmp_path / "peft" / ADAPTER_WEIGHTS).read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16" if dtype == "bfloat16" else "F32"}
    assert saved["peft_type"] == "LORA" and len(deltas) == 6 and set(layers) == set(deltas)
    for module, dW in deltas.items():
        assert layers[module].layout.ranks[0, 0] == (6 if "up_proj" in module else 4)
        np.testing.assert_allclose(layers[module].to_dense(), dW, rtol=1e-6, atol=1e-7, err_msg=module)


@pytest.mark.parametrize("hybrid_r", [0, 2])
def test_read_gralora_made_by_peft(base_model, tmp_path, hybrid_r):
    config = peft.GraloraConfig(r=4, alpha=12, gralora_k=2, hybrid_r=hybrid_r, target_modules=["k_proj", "down_proj"])
    deltas, (layers, saved) = _peft_made(base_model, config, tmp_path)
    assert saved["peft_type"] == "GRALORA" and len(deltas) == 4 and set(layers) == set(deltas)
    for module, dW in deltas.items():
        sf = layers[module]
        assert sf.layout.n_blocks == (2, 2) and sf.global_rank == hybrid_r
        np.testing.assert_allclose(sf.to_dense(), dW, rtol=1e-6, atol=1e-7, err_msg=module)


# ---------------------------------------------------------------------------- refusals
def test_peft_rejects_what_we_refuse_to_write(base_model, tmp_path):
    """A shape PEFT would reject (64 x 64 with gralora_k=3) is refused before any file exists."""
    dW = _delta((64, 64), 0)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj'.*not divisible by gralora_k=3"):
        save_peft_adapter(tmp_path / "x", {ATTN.format(0, "q_proj"): approximate(dW, n_blocks=3, rank=1)})
    assert os.listdir(tmp_path) == []
    # and PEFT itself does reject that configuration
    with pytest.raises(ValueError, match="divisible"):
        peft.get_peft_model(copy.deepcopy(base_model), peft.GraloraConfig(r=3, gralora_k=3, target_modules=["q_proj"]))


def test_config_is_minimal(base_model, tmp_path):
    fit = approximate(_delta((64, 64), 0), method="global", rank=3)
    save_peft_adapter(tmp_path / "a", {ATTN.format(0, "q_proj"): fit})
    with open(tmp_path / "a" / ADAPTER_CONFIG) as f:
        config = json.load(f)
    assert set(config) == {"peft_type", "base_model_name_or_path", "target_modules", "r", "lora_alpha"}
    assert peft.PeftConfig.from_pretrained(tmp_path / "a").r == 3
    fit = approximate(_delta((64, 64), 0), method="block", n_blocks=2, rank=1)
    save_peft_adapter(tmp_path / "g", {ATTN.format(0, "q_proj"): fit})
    with open(tmp_path / "g" / ADAPTER_CONFIG) as f:
        config = json.load(f)
    assert set(config) == {
        "peft_type",
        "base_model_name_or_path",
        "target_modules",
        "r",
        "alpha",
        "gralora_k",
        "hybrid_r",
    }
    assert peft.PeftConfig.from_pretrained(tmp_path / "g").gralora_k == 2

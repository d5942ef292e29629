"""Issue 18 with PEFT itself: what ``extract --dtype`` and ``--modules-to-save`` write, loaded by PEFT.

A tiny random Llama is the base; its "fine-tune" changes the q/v/up layers by
structured updates and the embedding, the head and the final norm by small
dense steps (changes no adapter layer can hold). The command line runs in a
child process, as a user runs it; the files are read back with the reference
``safetensors`` reader and loaded with ``PeftModel.from_pretrained``: no
missing or unexpected keys, merged weights equal base + the stored factors'
product, the modules carried whole equal the fine-tune exactly.
"""

import copy
import json

import numpy as np
import pytest
from _llama import ATTN, MLP, captured, key_problems, peft, structured_delta, tiny_llama, torch, weight
from test_newcomer import cli

from blocklowrank import approximate
from blocklowrank.checkpoints import load_file, save_file
from blocklowrank.peft import adapter_deltas, load_peft_adapter

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
safetensors_torch = pytest.importorskip("safetensors.torch")

TUNED = [ATTN.format(i, p) for i in (0, 1) for p in ("q_proj", "v_proj")] + [MLP.format(i, "up_proj") for i in (0, 1)]
WHOLE = ["model.embed_tokens", "lm_head", "model.norm"]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def ckpts(llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    base = {k: v.detach().numpy().copy() for k, v in llama.state_dict().items()}
    tuned = dict(base)
    rng = np.random.default_rng(5)
    for t, module in enumerate(TUNED):
        key = module + ".weight"
        tuned[key] = (base[key] + structured_delta(base[key].shape, seed=t)).astype(np.float32)
    for module in WHOLE:
        key = module + ".weight"
        tuned[key] = (base[key] + 0.01 * rng.standard_normal(base[key].shape)).astype(np.float32)
    return {
        "base": save_file(folder / "base.safetensors", base),
        "ft": save_file(folder / "ft.safetensors", tuned),
        "bf16": save_file(folder / "ft_bf16.safetensors", tuned, dtypes="BF16"),
        "arrays": (base, tuned),
    }


def _load(llama, directory):
    with captured() as seen:
        model = peft.PeftModel.from_pretrained(copy.deepcopy(llama), str(directory))
    assert not key_problems(seen), seen
    return model.merge_and_unload()


def _stored(directory):
    """The adapter's tensors as the reference reader returns them (torch), and their dtypes."""
    tensors = safetensors_torch.load_file(str(directory / "adapter_model.safetensors"))
    return {k: v.double().numpy() for k, v in tensors.items()}, {k: v.dtype for k, v in tensors.items()}


@pytest.mark.parametrize(
    "dtype, torch_dtype, rounding", [("bfloat16", "bfloat16", 2**-7), ("float16", "float16", 2**-10)]
)
def test_dtype_is_stored_and_peft_merges_the_stored_factors(llama, ckpts, tmp_path, dtype, torch_dtype, rounding):
    out = tmp_path / "a"
    cli("extract", ckpts["base"], ckpts["ft"], "--out", out, "--rank", "4", "--dtype", dtype, "-q",
        "--target-modules", "q_proj", "v_proj", "up_proj", check=0)  # fmt: skip
    stored, dtypes = _stored(out)
    assert set(dtypes.values()) == {getattr(torch, torch_dtype)}
    merged = _load(llama, out)
    base, tuned = ckpts["arrays"]
    report = json.loads((out / "extract_report.json").read_text())
    for module in TUNED:
        A = stored[f"base_model.model.{module}.lora_A.weight"]
        B = stored[f"base_model.model.{module}.lora_B.weight"]
        np.testing.assert_allclose(weight(merged, module), base[module + ".weight"] + B @ A, rtol=0, atol=2e-6)
        dW = tuned[module + ".weight"].astype(np.float64) - base[module + ".weight"]
        fit = approximate(dW, method="global", rank=4).reconstruction  # what the factors round
        assert np.linalg.norm(B @ A - fit) <= 4 * rounding * np.linalg.norm(fit), module
        stored_error = np.linalg.norm(dW - B @ A) / np.linalg.norm(dW)
        assert report["layers"][module]["error_stored"] == pytest.approx(stored_error, rel=1e-4, abs=1e-6)
    assert report["dtype"] == dtype


def test_the_default_dtype_is_the_checkpoints_own(ckpts, tmp_path):
    for ft, want in (("ft", torch.float32), ("bf16", torch.bfloat16)):
        out = tmp_path / ft
        cli("extract", ckpts["base"], ckpts[ft], "--out", out, "--rank", "2", "-q", check=0)
        _, dtypes = _stored(out)
        assert set(dtypes.values()) == {want}, ft


def test_modules_to_save_are_carried_whole_and_peft_loads_them(llama, ckpts, tmp_path):
    out = tmp_path / "a"
    code, text, err = cli("extract", ckpts["base"], ckpts["ft"], "--out", out, "--rank", "4", "--dtype", "bfloat16")
    assert code == 0, err
    suggested = next(line for line in text.splitlines() if "--modules-to-save" in line)  # the changes it loses ...
    assert sorted(suggested.split("--modules-to-save")[1].split()) == ["embed_tokens", "lm_head", "norm"]  # ... kept
    cli("extract", ckpts["base"], ckpts["ft"], "--out", out, "--rank", "4", "--dtype", "bfloat16", "--overwrite",
        "-q", "--modules-to-save", "embed_tokens", "lm_head", "norm", check=0)  # fmt: skip
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == sorted(WHOLE)
    stored, dtypes = _stored(out)
    for module in WHOLE:  # PEFT's key names, the fine-tune's own dtype (never rounded to --dtype)
        assert dtypes[f"base_model.model.{module}.weight"] == torch.float32
    merged = _load(llama, out)
    base, tuned = ckpts["arrays"]
    for module in WHOLE:
        np.testing.assert_array_equal(weight(merged, module), tuned[module + ".weight"])
    for module in TUNED:
        A = stored[f"base_model.model.{module}.lora_A.weight"]
        B = stored[f"base_model.model.{module}.lora_B.weight"]
        np.testing.assert_allclose(weight(merged, module), base[module + ".weight"] + B @ A, rtol=0, atol=2e-6)
    report = json.loads((out / "extract_report.json").read_text())
    assert report["changed_not_written"] == [] and sorted(report["modules_to_save"]) == sorted(WHOLE)
    # our own reader takes the adapter back (the modules carried whole are not updates)
    layers, _ = load_peft_adapter(out)
    assert sorted(layers) == sorted(TUNED)
    assert sorted(n for n, _ in adapter_deltas(ckpts["base"], out)) == sorted(m + ".weight" for m in TUNED)
    # a name that would wrap a LoRA layer is refused before anything is written
    code, _, err = cli("extract", ckpts["base"], ckpts["ft"], "--out", tmp_path / "b", "--rank", "2",
                       "--modules-to-save", "self_attn")  # fmt: skip
    assert code == 2 and "--modules-to-save" in err and "--target-modules" in err and not (tmp_path / "b").exists()


def test_a_peft_made_adapter_with_modules_to_save_reads_back(llama, ckpts, tmp_path):
    model = peft.get_peft_model(
        copy.deepcopy(llama), peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p))
    model.save_pretrained(tmp_path / "peft")
    layers, config = load_peft_adapter(tmp_path / "peft")
    assert config["modules_to_save"] == ["lm_head"] and sorted(layers) == [ATTN.format(i, "q_proj") for i in (0, 1)]
    merged = model.merge_and_unload()
    base = load_file(ckpts["base"])
    for name, dW in adapter_deltas(ckpts["base"], tmp_path / "peft"):
        np.testing.assert_allclose(base[name] + dW, weight(merged, name[: -len(".weight")]), rtol=0, atol=1e-6)

"""Issue 17, part 1: real models and PEFT-made adapters, no silent wrong answers.

A tiny random GPT-2 (transformers' ``Conv1D`` layers, weights stored as
``(in, out)``) and a tiny random Llama (``nn.Linear``) are saved with
``save_pretrained``; adapters are made by PEFT itself (``get_peft_model`` +
``save_pretrained``). Every check goes through the real consumer: PEFT loads
what ``extract`` writes and merges it; what we read from a PEFT adapter is
compared with PEFT's own ``get_delta_weight`` or with the in-memory PEFT
model's ``merge_and_unload()`` minus the original base. Reference fits are
NumPy SVDs in the test (``_real.truncated``, ``_reference.block_svd_loop``).

Each test of a defect of issue 17 asserts the right behaviour (they were
strict xfails on the code they were written against). Roots: orientation of a
layer's weight, what a PEFT adapter applies (its config fields), what a layer
may be (its dtype). CorDA, LoRA-GA and LoftQ adapters cannot be built here
(PEFT needs ``attrs`` for CorDA, gradients for LoRA-GA, ``bitsandbytes`` for
LoftQ): their configs are forged on a PEFT-made adapter, and for them only a
refusal is right. PiSSA, PiSSA with ``niter``, OLoRA and EVA are built by PEFT.
"""

import copy
import csv
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from _gpt2 import CONV1D, SQUARE, conv1d_modules, finetuned, peft_adapter, save, tiny_gpt2, weight
from _llama import captured, key_problems, peft, tiny_llama, torch, transformers
from _real import (
    assert_refused,
    cli,
    first_line,
    no_figures,
    outcome,
    root_settings,
    run_study,
    truncated,
    truncated_error,
)
from _reference import block_svd_loop, cuts, full_mask

pytest.importorskip("hypothesis")
from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from blocklowrank.checkpoints import save_file  # noqa: E402
from blocklowrank.extract import extract_adapter  # noqa: E402
from blocklowrank.peft import ADAPTER_CONFIG, adapter_deltas, load_peft_adapter  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set:UserWarning"),
    pytest.mark.filterwarnings("ignore:lora with eva initialization:UserWarning"),
]

LLAMA_TARGETS = ["q_proj", "v_proj", "up_proj"]
WTE = "transformer.wte"


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _no_figures():
    with no_figures():
        yield


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def gpt2_tuned(gpt2):
    """The 'fine-tuned' GPT-2: every Conv1D layer and the token embedding updated."""
    return finetuned(gpt2, conv1d_modules(gpt2) + [WTE])


@pytest.fixture(scope="module")
def gpt2_files(gpt2, gpt2_tuned, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    return {"base": save(gpt2, folder / "base"), "ft": save(gpt2_tuned, folder / "ft")}


@pytest.fixture(scope="module")
def gpt2_peft(gpt2, tmp_path_factory):
    """A LoRA adapter made by PEFT on every Conv1D layer (fan_in_fan_out=True), random A and B."""
    folder = tmp_path_factory.mktemp("gpt2_peft") / "adapter"
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, init_lora_weights=False
    )
    applied, deltas = peft_adapter(gpt2, folder, config)
    return folder, applied, deltas


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def llama_base(llama, tmp_path_factory):
    """The Llama's base checkpoint (our writer, as in test_extract)."""
    folder = tmp_path_factory.mktemp("llama")
    state = {k: v.detach().numpy().copy() for k, v in llama.state_dict().items()}
    return save_file(folder / "model.safetensors", state)


def _lora(init=False, **kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=init, **kw)


def _peft_merge(model, adapter):
    """PEFT loads ``adapter`` into a copy of ``model`` (no missing or unexpected key) and merges it."""
    with captured() as seen:
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), adapter)
    assert not key_problems(seen), key_problems(seen)
    return loaded.merge_and_unload()


def _best_fit(dW, method, rank):
    """The reference fit in the weight's stored orientation: truncated SVD ("global"), or rank ``rank`` on every
    block of a 2 x 2 grid ("block"); both commute with transposition, so the orientation of the fit is moot."""
    if method == "global":
        return truncated(dW, rank)
    return block_svd_loop(dW, cuts(dW.shape[0], 2), cuts(dW.shape[1], 2), full_mask(2, 2), rank)[0]


def _global_errors(study_folder):
    """Per layer, the lowest error of the 'global' rows of ``layers.csv``."""
    errors = {}
    with open(Path(study_folder) / "layers.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["structure"] == "global":
                errors[row["layer"]] = min(errors.get(row["layer"], math.inf), float(row["error"]))
    return errors


# ---------------------------------------------------------------------------- 1. orientation: extract
def test_extract_square_conv1d_merges_in_gpt2_orientation(gpt2, gpt2_tuned, gpt2_files, tmp_path):
    report = extract_adapter(
        gpt2_files["base"], gpt2_files["ft"], tmp_path / "a", rank=3, target_modules=["attn.c_proj"]
    )
    merged = _peft_merge(gpt2, tmp_path / "a")
    for module in conv1d_modules(gpt2, SQUARE):
        dW = weight(gpt2_tuned, module) - weight(gpt2, module)
        got = weight(merged, module) - weight(gpt2, module)
        np.testing.assert_allclose(got, truncated(dW, 3), rtol=0, atol=2e-6, err_msg=module)
    assert report.config.get("fan_in_fan_out") is True


def test_extract_every_conv1d_layer_loads_and_merges_in_peft(gpt2, gpt2_tuned, gpt2_files, tmp_path):
    report = extract_adapter(gpt2_files["base"], gpt2_files["ft"], tmp_path / "a", rank=3)
    assert sorted(report.layers) == sorted(conv1d_modules(gpt2))
    merged, exc = outcome(_peft_merge, gpt2, tmp_path / "a")
    assert exc is None, f"PEFT cannot load the extracted adapter: {first_line(exc)}"
    for module in conv1d_modules(gpt2):
        dW = weight(gpt2_tuned, module) - weight(gpt2, module)
        got = weight(merged, module) - weight(gpt2, module)
        np.testing.assert_allclose(got, truncated(dW, 3), rtol=0, atol=2e-6, err_msg=module)
    assert report.config.get("fan_in_fan_out") is True


# ---------------------------------------------------------------------------- 2. orientation: reading
KINDS = {"square": SQUARE, "non-square": tuple(k for k in CONV1D if k not in SQUARE)}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_load_peft_adapter_gives_peft_delta_weight(gpt2, gpt2_peft, kind):
    """ΔW in the orientation of PEFT's ``get_delta_weight``: the module's stored weight (what merge adds)."""
    folder, _, deltas = gpt2_peft
    layers, _ = load_peft_adapter(folder)
    for module in conv1d_modules(gpt2, KINDS[kind]):
        got, want = layers[module].to_dense(), deltas[module]
        assert got.shape == want.shape, f"{module}: ΔW of shape {got.shape}; PEFT's get_delta_weight is {want.shape}"
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=module)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_adapter_deltas_equal_peft_merge(gpt2, gpt2_files, gpt2_peft, kind):
    folder, applied, _ = gpt2_peft
    got, exc = outcome(lambda: dict(adapter_deltas(gpt2_files["base"], folder)))
    assert exc is None, f"a valid PEFT adapter refused: {first_line(exc)}"
    for module in conv1d_modules(gpt2, KINDS[kind]):
        np.testing.assert_allclose(got[module + ".weight"], applied[module], rtol=1e-6, atol=1e-7, err_msg=module)


def test_study_of_fan_in_fan_out_adapter(gpt2_files, gpt2_peft, tmp_path):
    folder, applied, _ = gpt2_peft
    args = ["study", gpt2_files["base"], folder, "--out", tmp_path / "s", "--structures", "global"]
    rc, _, err = cli(args + ["--budget-rank", "2", "--n-blocks", "2", "-q"])
    assert rc == 0, err
    errors = _global_errors(tmp_path / "s")
    assert sorted(errors) == sorted(applied)
    for module, dW in applied.items():
        assert errors[module] == pytest.approx(truncated_error(dW, 2), abs=1e-4), module


# ---------------------------------------------------------------------------- 3. inits that rewrite the base
WAY_OUT = "path_initial_model_for_weight_conversion"


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_base_rewriting_init_refused_or_read_as_peft_applies(init, llama, llama_base, tmp_path):
    applied, _ = peft_adapter(llama, tmp_path / "a", _lora(init))
    read, exc = outcome(load_peft_adapter, tmp_path / "a")
    if exc is not None:
        assert_refused(exc, "init_lora_weights", init, WAY_OUT)
    else:
        for module, want in applied.items():
            np.testing.assert_allclose(read[0][module].to_dense(), want, rtol=1e-5, atol=1e-6, err_msg=module)
    got, exc = outcome(lambda: dict(adapter_deltas(llama_base, tmp_path / "a")))
    if exc is not None:
        assert_refused(exc, "init_lora_weights", init, WAY_OUT)
    else:
        for module, want in applied.items():
            np.testing.assert_allclose(got[module + ".weight"], want, rtol=1e-5, atol=1e-6, err_msg=module)


@pytest.mark.parametrize("init", ["corda", "lora_ga", "loftq"])
def test_base_rewriting_init_that_cannot_be_rebuilt_is_refused(init, llama, llama_base, tmp_path):
    peft_adapter(llama, tmp_path / "a", _lora(False))
    path = tmp_path / "a" / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "init_lora_weights": init}))
    _, exc = outcome(load_peft_adapter, tmp_path / "a")
    assert_refused(exc, "init_lora_weights", init)
    _, exc = outcome(lambda: dict(adapter_deltas(llama_base, tmp_path / "a")))
    assert_refused(exc, "init_lora_weights", init)


def _eva(model):
    from peft import initialize_lora_eva_weights

    x = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        initialize_lora_eva_weights(model, dataloader=[{"input_ids": x}] * 2, show_progress_bar=False)


KEEP_BASE = {"gaussian": ({}, None), "orthogonal": ({}, None), "eva": ({"eva_config": peft.EvaConfig(rho=1.0)}, _eva)}


@pytest.mark.parametrize("init", sorted(KEEP_BASE))
def test_inits_that_keep_the_base_are_read_as_peft_applies(init, llama, llama_base, tmp_path):
    """Not a defect: these inits leave the base alone, so ΔW = s·B·A and refusing them would be wrong."""
    extra, prepare = KEEP_BASE[init]
    applied, deltas = peft_adapter(llama, tmp_path / "a", _lora(init, **extra), prepare=prepare)
    layers, _ = load_peft_adapter(tmp_path / "a")
    got = dict(adapter_deltas(llama_base, tmp_path / "a"))
    for module, want in applied.items():
        np.testing.assert_allclose(deltas[module], want, rtol=1e-5, atol=1e-7)  # PEFT: the base is untouched
        np.testing.assert_allclose(layers[module].to_dense(), want, rtol=1e-5, atol=1e-7, err_msg=module)
        np.testing.assert_allclose(got[module + ".weight"], want, rtol=1e-5, atol=1e-7, err_msg=module)


def test_study_of_pissa_adapter_refuses_or_reads_it(llama, llama_base, tmp_path):
    applied, _ = peft_adapter(llama, tmp_path / "a", _lora("pissa"))
    args = ["study", llama_base, tmp_path / "a", "--out", tmp_path / "s", "--structures", "global"]
    rc, _, err = cli(args + ["--budget-rank", "2", "--n-blocks", "2", "-q"])
    if rc != 0:
        assert "init_lora_weights" in err, err
        return
    errors = _global_errors(tmp_path / "s")
    for module, dW in applied.items():
        assert errors[module] == pytest.approx(truncated_error(dW, 2), abs=1e-4), module


# ---------------------------------------------------------------------------- 4. embeddings
@pytest.mark.parametrize(
    "method, target", [("global", ["wte"]), ("block", r".*\.wte")], ids=["lora-suffix", "gralora-regex"]
)
def test_embedding_written_in_peft_layout_or_refused(method, target, gpt2, gpt2_tuned, gpt2_files, tmp_path):
    out = tmp_path / "a"
    _, exc = outcome(
        extract_adapter,
        gpt2_files["base"],
        gpt2_files["ft"],
        out,
        method=method,
        n_blocks=2,
        rank=2,
        target_modules=target,
    )
    if exc is not None:
        assert_refused(exc, WTE)
        assert not out.exists(), "refused after writing"
        return
    merged, exc = outcome(_peft_merge, gpt2, out)
    assert exc is None, f"PEFT does not apply the embedding adapter: {first_line(exc)}"
    want = _best_fit(weight(gpt2_tuned, WTE) - weight(gpt2, WTE), method, 2)
    np.testing.assert_allclose(weight(merged, WTE) - weight(gpt2, WTE), want, rtol=0, atol=2e-6)


# ---------------------------------------------------------------------------- 5. what a layer may be
LAYER = "model.layers.0.self_attn.q_proj"


def _dtype_pair(folder, kind):
    """Base and fine-tuned checkpoints where LAYER's weight is integer codes, bool or complex on one side."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    other = {"model.layers.0.mlp.up_proj.weight": rng.standard_normal((8, 8)).astype(np.float32)}
    tuned_other = {k: v + np.float32(0.1) for k, v in other.items()}
    base, tuned = {**other, LAYER + ".weight": w}, {**tuned_other, LAYER + ".weight": w + np.float32(0.1)}
    if kind == "int8":  # a quantized base: int8 codes and their scale
        base[LAYER + ".weight"] = np.round(w * 40).astype(np.int8)
        base[LAYER + ".weight_scale"] = tuned[LAYER + ".weight_scale"] = np.array([1 / 40], np.float32)
    elif kind == "bool":
        tuned[LAYER + ".weight"] = w > 0
    else:  # complex, its real part changed too
        tuned[LAYER + ".weight"] = (w + 0.1) + 1j * w
    return save_file(folder / "base.safetensors", base), save_file(folder / "ft.safetensors", tuned)


DTYPE_WORDS = {"int8": ("I8", "int8"), "bool": ("BOOL", "bool"), "complex": ("C64", "complex")}


@pytest.mark.parametrize("kind", sorted(DTYPE_WORDS))
def test_non_float_layer_refused_by_name(kind, tmp_path):
    base, tuned = _dtype_pair(tmp_path, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NumPy's ComplexWarning is not a refusal
        _, exc = outcome(extract_adapter, base, tuned, tmp_path / "a", rank=1)
    assert_refused(exc, LAYER, DTYPE_WORDS[kind])
    assert not (tmp_path / "a").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, exc = outcome(run_study, base, tuned, structures=["global"], budget_rank=1, n_blocks=[2], progress=False)
    assert_refused(exc, LAYER, DTYPE_WORDS[kind])


# ---------------------------------------------------------------------------- 6. forged config fields
@pytest.fixture(scope="module")
def llama_peft(llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama_peft") / "adapter"
    peft_adapter(llama, folder, _lora(False))
    return folder


FORGED = {
    "alpha-nan": ("lora_alpha", math.nan),
    "alpha-inf": ("lora_alpha", math.inf),
    "alpha-minus-inf": ("lora_alpha", -math.inf),
    "alpha-zero": ("lora_alpha", 0),
    "alpha-negative": ("lora_alpha", -8),
    "alpha-pattern-nan": ("alpha_pattern", {"q_proj": math.nan}),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_forged_alpha_refused_by_name(case, llama_peft, tmp_path):
    field, value = FORGED[case]
    folder = tmp_path / "a"
    folder.mkdir()
    for name in os.listdir(llama_peft):
        (folder / name).write_bytes((llama_peft / name).read_bytes())
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**config, field: value}))  # NaN/Infinity as Python writes them
    _, exc = outcome(load_peft_adapter, folder)
    assert_refused(exc, field)


def test_lora_rank_above_the_layer_side_is_read(tmp_path):
    """Found by the adapter-fields property: PEFT makes such an adapter; its ΔW is still s·B·A (of rank <= min)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(3, 2))
    _, deltas = peft_adapter(net, tmp_path / "a", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    read, exc = outcome(load_peft_adapter, tmp_path / "a")
    assert exc is None, f"a valid PEFT adapter refused: {first_line(exc)}"
    np.testing.assert_allclose(read[0]["proj"].to_dense(), deltas["proj"], rtol=1e-6, atol=1e-7)


def test_unchanged_nan_tensor_not_reported_changed(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    norm = np.array([1.0, np.nan, 2.0, np.nan], np.float32)
    base = {LAYER + ".weight": w, "model.norm.weight": norm, "model.layers.0.self_attn.q_proj.bias": np.zeros(8, "f4")}
    tuned = {**base, LAYER + ".weight": w + np.float32(0.1), "model.layers.0.self_attn.q_proj.bias": np.ones(8, "f4")}
    report = extract_adapter(
        save_file(tmp_path / "b.safetensors", base),
        save_file(tmp_path / "f.safetensors", tuned),
        tmp_path / "a",
        rank=1,
    )
    assert report.changed_not_written == ["model.layers.0.self_attn.q_proj.bias"]


# ---------------------------------------------------------------------------- hypothesis, one per root
def _llama_of(width, inner, seed):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=16,
        hidden_size=width,
        intermediate_size=inner,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _linear_modules(model):
    kinds = (torch.nn.Linear, transformers.pytorch_utils.Conv1D)
    return [n for n, m in model.named_modules() if isinstance(m, kinds) and not n.endswith("lm_head")]


@root_settings(4)
@given(
    family=st.sampled_from(["gpt2", "llama"]),
    width=st.sampled_from([8, 12, 16]),
    inner=st.sampled_from([8, 16, 24]),
    method=st.sampled_from(["global", "block"]),
    seed=st.integers(0, 3),
)
@example(family="gpt2", width=12, inner=8, method="block", seed=0)
def test_orientation_root(family, width, inner, method, seed):
    """Claim: for any layer shape, square or not, Conv1D or Linear, and a LoRA or GraLoRA structure, PEFT's merge
    of the extracted adapter equals base + the structure's best fit of ΔW (per-block truncated SVD, which
    commutes with transposition, computed here on the stored weight)."""
    model = tiny_gpt2(seed, n_embd=width, n_inner=inner, n_layer=1, vocab=16) if family == "gpt2" else None
    model = model if model is not None else _llama_of(width, inner, seed)
    modules = _linear_modules(model)
    tuned = finetuned(model, modules, seed=seed + 1)
    size = {"rank": 2} if method == "global" else {"n_blocks": 2, "rank": 1}
    with tempfile.TemporaryDirectory() as tmp:
        base, ft, out = save(model, Path(tmp) / "b"), save(tuned, Path(tmp) / "f"), Path(tmp) / "a"
        extract_adapter(base, ft, out, method=method, **size)
        merged, exc = outcome(_peft_merge, model, out)
    assert exc is None, f"{family} {width}/{inner} {method}: PEFT cannot load the adapter: {first_line(exc)}"
    for module in modules:
        want = _best_fit(weight(tuned, module) - weight(model, module), method, 2 if method == "global" else 1)
        np.testing.assert_allclose(weight(merged, module) - weight(model, module), want, rtol=0, atol=2e-6)


BAD_ALPHAS = st.sampled_from([math.nan, math.inf, -math.inf, 0, 0.0, -2.0, -0.5])
ALPHAS = st.one_of(BAD_ALPHAS, st.floats(0.25, 64), st.integers(1, 64))
KEEP_INITS = [True, False, "gaussian", "eva", "orthogonal"]
REWRITING_INITS = ["pissa", "pissa_niter_3", "olora", "corda", "loftq", "lora_ga"]


def _bad_alpha(value):
    return not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0)


@root_settings(30)
@given(
    shape=st.tuples(st.integers(2, 9), st.integers(2, 9)),
    r=st.integers(1, 4),
    alpha=ALPHAS,
    pattern=st.one_of(st.none(), ALPHAS),
    rslora=st.booleans(),
    init=st.sampled_from(KEEP_INITS + REWRITING_INITS),
    fan_in_fan_out=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(shape=(3, 5), r=2, alpha=8, pattern=-1.0, rslora=False, init=True, fan_in_fan_out=False, seed=0)
def test_adapter_fields_root(shape, r, alpha, pattern, rslora, init, fan_in_fan_out, seed):
    """Claim: a LoRA adapter is read as exactly what PEFT applies, ``s (B A)`` (transposed to the stored
    orientation under ``fan_in_fan_out``) with ``s = alpha / r`` (``/ sqrt(r)`` with rslora, ``alpha`` from
    ``alpha_pattern`` when it names the module), or refused naming the field that makes that impossible:
    a non-finite or non-positive alpha, or an init that rewrote the base."""
    from safetensors.numpy import save_file as reference_save  # an independent writer

    n_out, n_in = shape
    rng = np.random.default_rng(seed)
    A, B = rng.standard_normal((r, n_in)).astype(np.float32), rng.standard_normal((n_out, r)).astype(np.float32)
    module = "model.layers.0.mlp.up_proj"
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": ["up_proj"],
        "use_rslora": rslora,
        "init_lora_weights": init,
        "fan_in_fan_out": fan_in_fan_out,
    }
    if pattern is not None:
        config["alpha_pattern"] = {"up_proj": pattern}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
        tensors = {f"base_model.model.{module}.lora_A.weight": A, f"base_model.model.{module}.lora_B.weight": B}
        reference_save(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        read, exc = outcome(load_peft_adapter, folder)
    reasons = [f for f, v in (("lora_alpha", alpha), ("alpha_pattern", pattern)) if v is not None and _bad_alpha(v)]
    reasons += ["init_lora_weights"] if init in REWRITING_INITS else []
    if reasons:
        assert_refused(exc, tuple(reasons))
        return
    assert exc is None, f"a valid adapter refused: {first_line(exc)}"
    s = (pattern if pattern is not None else alpha) / (math.sqrt(r) if rslora else r)
    want = s * (B.astype(np.float64) @ A)
    want = want.T if fan_in_fan_out else want
    np.testing.assert_allclose(read[0][module].to_dense(), want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- beyond the list
def test_peft_made_embedding_adapter_is_read_as_peft_applies(gpt2, gpt2_files, tmp_path):
    """PEFT's own lora_embedding_A/B (an embedding and Conv1D layers in one adapter) are read as PEFT applies
    them: load_peft_adapter gives get_delta_weight (stored orientation), adapter_deltas the merge, and the study
    the truncation errors of the applied update."""
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["wte", "c_fc"], init_lora_weights=False)
    applied, deltas = peft_adapter(gpt2, tmp_path / "a", config)
    assert WTE in applied and any(m.endswith("mlp.c_fc") for m in applied)
    layers, _ = load_peft_adapter(tmp_path / "a")
    got = dict(adapter_deltas(gpt2_files["base"], tmp_path / "a"))
    for module in applied:
        np.testing.assert_allclose(layers[module].to_dense(), deltas[module], rtol=1e-6, atol=1e-7, err_msg=module)
        np.testing.assert_allclose(got[module + ".weight"], applied[module], rtol=1e-6, atol=1e-7, err_msg=module)
    out_in = dict(adapter_deltas(gpt2_files["base"], tmp_path / "a", stored=False))
    np.testing.assert_allclose(out_in[WTE + ".weight"], applied[WTE].T, rtol=1e-6, atol=1e-7)
    res = run_study(
        gpt2_files["base"], tmp_path / "a", target_modules=["wte", "c_fc"], structures=["global"], budget_rank=2,
        n_blocks=[2], progress=False, svd_solver="full",
    )  # fmt: skip
    errors = {r["layer"]: r["error"] for r in res if r["structure"] == "global" and r["best"]}
    assert errors == pytest.approx({m: truncated_error(dW, 2) for m, dW in applied.items()}, abs=1e-5)


def test_conv1d_names_without_config_json_need_an_orientation(gpt2, gpt2_tuned, gpt2_files, tmp_path):
    """Without config.json, GPT-2's module names cannot tell Conv1D from nn.Linear (GPT-Neo and StarCoder use the
    same names for nn.Linear): refused, naming the layer and the way out; with --orientation in_out, PEFT merges
    the extracted adapter into GPT-2 exactly as the fit."""
    for side in ("base", "ft"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "model.safetensors").write_bytes((gpt2_files[side] / "model.safetensors").read_bytes())
    args = ["extract", tmp_path / "base", tmp_path / "ft", "--out", tmp_path / "a", "--rank", "2"]
    rc, _, err = cli(args)
    assert rc == 2 and "config.json" in err and "--orientation" in err and "c_attn" in err, err
    assert not (tmp_path / "a").exists()
    rc, _, err = cli(args + ["--orientation", "in_out"])
    assert rc == 0, err
    merged = _peft_merge(gpt2, tmp_path / "a")
    for module in conv1d_modules(gpt2):
        want = truncated(weight(gpt2_tuned, module) - weight(gpt2, module), 2)
        np.testing.assert_allclose(weight(merged, module) - weight(gpt2, module), want, rtol=0, atol=2e-6)


def test_linear_and_conv1d_layers_are_not_mixed_in_one_adapter(tmp_path):
    """CLVP mixes Conv1D (decoder MLP) and nn.Linear (attention) layers; one adapter has one fan_in_fan_out."""
    rng = np.random.default_rng(0)
    base = {"decoder.h.0.mlp.c_fc.weight": rng.standard_normal((4, 8)), "decoder.h.0.attn.q_proj.weight": np.eye(4)}
    for side, tensors in (("b", base), ("f", {k: v + 0.1 for k, v in base.items()})):
        (tmp_path / side).mkdir()
        save_file(tmp_path / side / "model.safetensors", tensors)
        (tmp_path / side / "config.json").write_text(json.dumps({"model_type": "clvp"}))
    _, exc = outcome(extract_adapter, tmp_path / "b", tmp_path / "f", tmp_path / "a", rank=1)
    assert_refused(exc, "fan_in_fan_out", "decoder.h.0.attn.q_proj", "decoder.h.0.mlp.c_fc")
    assert not (tmp_path / "a").exists()
    report = extract_adapter(tmp_path / "b", tmp_path / "f", tmp_path / "a", rank=1, target_modules=["c_fc"])
    assert report.config["fan_in_fan_out"] is True and report.layers["decoder.h.0.mlp.c_fc"]["shape"] == (8, 4)

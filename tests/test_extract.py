"""Adapter extraction from a full fine-tune, checked with real PEFT.

A tiny random ``LlamaForCausalLM`` is saved with our ``save_file`` as the base
checkpoint; the "fine-tuned" one has structured updates on the q/v/up layers
(and a changed norm, which an adapter cannot hold), also stored in BF16.
Each extraction is loaded with ``PeftModel.from_pretrained``: no missing or
unexpected keys, merged weights equal base + our own fit of ΔW, logits agree.
"""

import copy
import os

import numpy as np
import pytest
from _llama import ATTN, MLP, captured, key_problems, peft, structured_delta, tiny_llama, tokens, torch, weight

from blocklowrank import approximate
from blocklowrank.checkpoints import load_file, save_file
from blocklowrank.cli import main
from blocklowrank.extract import extract_adapter
from blocklowrank.peft import adapter_deltas, adapter_pairs, load_peft_adapter

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

TUNED = [ATTN.format(i, p) for i in (0, 1) for p in ("q_proj", "v_proj")] + [MLP.format(i, "up_proj") for i in (0, 1)]
TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def ckpts(llama, tmp_path_factory):
    """Base, fine-tuned (F32) and fine-tuned (BF16) checkpoint files."""
    folder = tmp_path_factory.mktemp("ckpts")
    base = {k: v.detach().numpy().copy() for k, v in llama.state_dict().items()}
    tuned = dict(base)
    for t, module in enumerate(TUNED):
        key = module + ".weight"
        tuned[key] = (base[key] + structured_delta(base[key].shape, seed=t)).astype(np.float32)
    tuned["model.norm.weight"] = base["model.norm.weight"] + np.float32(0.01)
    return {
        "base": save_file(folder / "base.safetensors", base),
        "ft": save_file(folder / "ft.safetensors", tuned),
        "bf16": save_file(folder / "ft_bf16.safetensors", tuned, dtypes="BF16"),
    }


def _check_with_peft(llama, report, ckpts, ft, fit):
    """PEFT loads the adapter cleanly; merged = base + ``fit(ΔW)`` of each layer; logits agree."""
    with captured() as seen:
        model = peft.PeftModel.from_pretrained(copy.deepcopy(llama), report.directory)
    assert not key_problems(seen), seen
    x = tokens()
    with torch.no_grad():
        adapted = model(x).logits.numpy()
    merged = model.merge_and_unload()
    base, tuned = load_file(ckpts["base"]), load_file(ckpts[ft])
    for module in report.layers:
        key = module + ".weight"
        want = base[key].astype(np.float64) + fit(tuned[key].astype(np.float64) - base[key]).reconstruction
        np.testing.assert_allclose(weight(merged, module), want, rtol=0, atol=1e-6, err_msg=module)
    with torch.no_grad():
        np.testing.assert_allclose(merged(x).logits.numpy(), adapted, rtol=0, atol=1e-5)
    return merged


CASES = {  # name -> (extract_adapter keywords, approximate keywords per layer, peft_type)
    "global": (dict(method="global", rank=4), lambda s: dict(method="global", rank=4), "LORA"),
    "diagonal": (
        dict(method="diagonal", n_blocks=2, rank=3),
        lambda s: dict(method="diagonal", n_blocks=2, rank=3),
        "LORA",
    ),
    "block": (dict(method="block", n_blocks=2, rank=2), lambda s: dict(method="block", n_blocks=2, rank=2), "GRALORA"),
    "block_budget": (
        dict(method="block", n_blocks=4, budget_rank=3),
        lambda s: dict(method="block", n_blocks=4, budget=3 * sum(s)),
        "GRALORA",
    ),
    "block_as_lora": (
        dict(method="block", n_blocks=2, rank=1, peft_type="LORA"),
        lambda s: dict(method="block", n_blocks=2, rank=1),
        "LORA",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_extract_loads_in_peft(case, llama, ckpts, tmp_path):
    kwargs, fit_kwargs, kind = CASES[case]
    report = extract_adapter(ckpts["base"], ckpts["ft"], tmp_path / "a", target_modules=TARGETS, **kwargs)
    assert report.peft_type == kind and sorted(report.layers) == sorted(TUNED)
    assert report.changed_not_written == ["model.norm.weight"]
    _check_with_peft(llama, report, ckpts, "ft", lambda dW: approximate(dW, **fit_kwargs(dW.shape)))


def test_hybrid_and_bf16(llama, ckpts, tmp_path):
    """A hybrid fit (Python API: the CLI offers the spectral structures) of a BF16 fine-tune."""
    kw = dict(method="hybrid", n_blocks=2, rank=1, global_rank=2, max_iter=5)
    # float32 factors (a BF16 fine-tune gives a bfloat16 adapter by default; tests/test_newcomer_peft.py checks that)
    report = extract_adapter(
        ckpts["base"], ckpts["bf16"], tmp_path / "h", target_modules=TARGETS, dtype="float32", **kw
    )
    assert report.peft_type == "GRALORA" and report.config["hybrid_r"] == 2
    _check_with_peft(llama, report, ckpts, "bf16", lambda dW: approximate(dW, **kw))


def test_all_linear_report(ckpts, tmp_path):
    """Embeddings and head are excluded, unchanged layers left out, both listed in the summary."""
    report = extract_adapter(ckpts["base"], ckpts["ft"], tmp_path / "a", rank=2)
    assert sorted(report.layers) == sorted(TUNED)
    assert set(report.pairing.excluded) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert MLP.format(0, "down_proj") in report.unchanged and len(report.unchanged) == 8
    text = report.summary()
    for part in ("excluded by target_modules", "lm_head.weight", "unchanged", "model.norm.weight"):
        assert part in text, text
    assert report.n_params == sum(2 * sum(v["shape"]) for v in report.layers.values())


def test_cli_end_to_end(ckpts, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "extract",
        str(ckpts["base"]),
        str(ckpts["ft"]),
        "--out",
        str(out),
        "--method",
        "block",
        "--n-blocks",
        "2",
        "--budget-rank",
        "4",
        "--target-modules",
        r".*\.(q|v)_proj",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "wrote GRALORA adapter" in printed and "lm_head.weight" in printed
    layers, config = load_peft_adapter(out)
    assert sorted(layers) == sorted(m for m in TUNED if "proj" in m and "up_proj" not in m)
    assert config["gralora_k"] == 2
    assert main(argv) == 2  # not empty: refused ...
    assert "not empty" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0  # ... unless asked


def _one_line_error(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    return err


def test_cli_hostile_inputs(ckpts, tmp_path, capsys):
    base, ft, out = str(ckpts["base"]), str(ckpts["ft"]), str(tmp_path / "x")
    _one_line_error(
        ["extract", base, str(tmp_path / "missing.safetensors"), "--out", out, "--rank", "1"], capsys, "does not exist"
    )
    pickled = tmp_path / "pytorch_model.bin"
    pickled.write_bytes(b"\x80\x04\x95" + bytes(64))
    _one_line_error(["extract", base, str(pickled), "--out", out, "--rank", "1"], capsys, "pickle")
    _one_line_error(
        ["extract", base, ft, "--out", out, "--rank", "1", "--target-modules", "nothing_here"],
        capsys,
        "no layer selected",
    )
    err = _one_line_error(
        ["extract", base, ft, "--out", out, "--method", "block", "--n-blocks", "3", "--rank", "1"],
        capsys,
        "not divisible by gralora_k=3",
    )
    assert "layer 'model.layers.0." in err and "--peft-type LORA" in err and "--n-blocks" in err  # the CLI's spelling
    assert "peft_type" not in err
    _one_line_error(["extract", base, base, "--out", out, "--rank", "1"], capsys, "no selected layer changed")
    assert not os.path.exists(out)  # nothing written by any of them
    with pytest.raises(SystemExit, match="2"):  # argparse: --rank or --budget-rank is required
        main(["extract", base, ft, "--out", out])
    assert "one of the arguments --rank --budget-rank --total-budget --max-error is required" in capsys.readouterr().err


def test_adapter_deltas(ckpts, tmp_path):
    """An adapter read back as (base weight name, ΔW): what the model study takes."""
    report = extract_adapter(
        ckpts["base"], ckpts["ft"], tmp_path / "a", method="block", n_blocks=2, rank=2, target_modules=TARGETS
    )
    layers, _ = load_peft_adapter(report.directory)
    seen = dict(adapter_deltas(ckpts["base"], report.directory))
    assert sorted(seen) == sorted(m + ".weight" for m in TUNED)
    for name, dW in seen.items():
        assert dW.dtype == np.float32
        np.testing.assert_allclose(dW, layers[name[: -len(".weight")]].to_dense(), rtol=0, atol=1e-7)
    pairs = adapter_pairs(ckpts["base"], report.directory)
    assert {p.name: p.shape for p in pairs} == {name: dW.shape for name, dW in seen.items()}
    ((name, dW),) = adapter_deltas(ckpts["base"], report.directory, names=[pairs[1].name])
    assert name == pairs[1].name and np.array_equal(dW, seen[name])
    with pytest.raises(ValueError, match="has no layer 'lm_head.weight'"):
        adapter_deltas(ckpts["base"], report.directory, names=["lm_head.weight"])
    other = save_file(tmp_path / "other.safetensors", {TUNED[0] + ".weight": np.zeros((8, 8), np.float32)})
    with pytest.raises(ValueError, match="has no weight|the base.s"):
        adapter_deltas(other, report.directory)


def test_model_wide_total_budget(tmp_path):
    """A total over all layers, spread by the study's model-wide allocation: the adapter spends at
    most the total, puts rank where ΔW's energy is, and reads back to the fitted update."""
    from blocklowrank.checkpoints import save_file
    from blocklowrank.extract import extract_adapter
    from blocklowrank.peft import load_peft_adapter

    rng = np.random.default_rng(3)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    base = {n: rng.standard_normal((16, 16)).astype(np.float32) for n in names}
    big = rng.standard_normal((16, 4)) @ rng.standard_normal((4, 16)) * 10  # the large update
    small = rng.standard_normal((16, 16)) * 0.01
    ft = {names[0]: (base[names[0]] + big).astype(np.float32), names[1]: (base[names[1]] + small).astype(np.float32)}
    save_file(tmp_path / "b.safetensors", base)
    save_file(tmp_path / "f.safetensors", ft)
    total = 4 * 32
    rep = extract_adapter(tmp_path / "b.safetensors", tmp_path / "f.safetensors", tmp_path / "a", total_budget=total)
    assert rep.n_params <= total
    assert rep.layers["model.layers.0.self_attn.q_proj"]["ranks"] == [[4]]  # all of it to the rank-4 update
    assert "model.layers.0.self_attn.v_proj" in rep.unchanged  # no rank left: listed, not written
    read, _ = load_peft_adapter(tmp_path / "a")
    dW = ft[names[0]].astype(np.float64) - base[names[0]]
    assert np.linalg.norm(read["model.layers.0.self_attn.q_proj"].to_dense() - dW) <= 1e-4 * np.linalg.norm(dW)
    with pytest.raises(ValueError, match="exactly one"):
        extract_adapter(tmp_path / "b.safetensors", tmp_path / "f.safetensors", tmp_path / "x", rank=2, total_budget=64)

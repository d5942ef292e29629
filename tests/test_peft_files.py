"""PEFT adapter files without torch: choices, refusals, atomic writes, hostile directories.

PEFT itself loads these files in ``test_peft_interop.py``; here every check
is on the files and on our read-back, so it runs with NumPy alone.
"""

import json
import os
import struct

import numpy as np
import pytest

from blocklowrank import BlockLayout, approximate, fit_hybrid, fit_shared_basis
from blocklowrank.checkpoints import load_file, save_file
from blocklowrank.convert import as_factors
from blocklowrank.factors import StructuredFactors
from blocklowrank.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_peft_adapter, save_peft_adapter

Q, U = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"


def _X(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def _roundtrip(tmp_path, layers, **kwargs):
    rep = save_peft_adapter(tmp_path / "a", layers, dtype=np.float64, **kwargs)
    read, config = load_peft_adapter(tmp_path / "a")
    for name, fit in layers.items():
        np.testing.assert_allclose(read[name].to_dense(), _dense(fit), rtol=0, atol=1e-13, err_msg=name)
    return rep, config


def _dense(fit):
    """Our Delta W in original coordinates (the container applies a layout's permutation)."""
    return as_factors(fit).to_dense(np.float64)


# ---------------------------------------------------------------------------- which format
def test_lora_ranks_go_to_patterns(tmp_path):
    layers = {
        Q: approximate(_X((16, 12)), method="global", rank=3),
        "model.layers.1.self_attn.q_proj": approximate(_X((16, 12), 1), method="global", rank=3),
        U: approximate(_X((20, 12), 2), method="diagonal", n_blocks=4, rank=2),  # uneven blocks: rank 8
    }
    rep, config = _roundtrip(tmp_path, layers)
    assert rep["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 3
    assert config["rank_pattern"] == config["alpha_pattern"] == {r"layers\.0\.mlp\.up_proj": 8}
    effective = as_factors(layers[U]).n_params  # 2 * (5 + 3) * 4 blocks: a quarter of the stacked LoRA
    assert rep["layers"][U] == {"rank": 8, "n_params_effective": effective, "n_params_written": 8 * (20 + 12)}
    assert effective == 64


def test_pattern_keys_stay_unique(tmp_path):
    """A shortened path that would also match another module falls back to the whole path."""
    layers = {
        "encoder.layers.0.q": approximate(_X((8, 6)), method="global", rank=1),
        "decoder.layers.0.q": approximate(_X((8, 6), 1), method="global", rank=2),
        "x.layers.0.q": approximate(_X((8, 6), 2), method="global", rank=1),
        "fc": approximate(_X((8, 6), 3), method="global", rank=3),
    }
    rep, config = _roundtrip(tmp_path, layers)
    assert config["rank_pattern"] == {r"(?<=^decoder\.)layers\.0\.q": 2, "fc": 3}
    assert {n: v["rank"] for n, v in rep["layers"].items()} == {n: f.layout.ranks[0, 0] for n, f in layers.items()}


def test_gralora_pads_ranks_and_hybrid(tmp_path):
    X = _X((16, 12))
    budget = approximate(X, BlockLayout.block((16, 12), 2).with_ranks(np.array([[3, 1], [0, 2]])))
    assert budget.layout.uniform_rank is None  # as an allocation at a budget may give
    layers = {Q: budget, U: fit_hybrid(_X((16, 12), 1), BlockLayout.block((16, 12), 2, rank=1), global_rank=2)}
    rep, config = _roundtrip(tmp_path, layers)
    rho = int(budget.layout.ranks.max())
    assert config == {
        **config,
        "peft_type": "GRALORA",
        "gralora_k": 2,
        "r": 2 * rho,
        "hybrid_r": 2,
        "alpha": 2 * rho + 2,
    }
    assert rep["layers"][Q]["n_params_written"] == (2 * rho + 2) * (16 + 12) > rep["layers"][Q]["n_params_effective"]


def test_forced_types_hold_every_structure(tmp_path):
    layers = {
        Q: approximate(_X((16, 12)), method="global", rank=2),
        U: approximate(_X((16, 12), 1), method="diagonal", n_blocks=2, rank=1),
        "m.block": approximate(_X((16, 12), 2), method="block", n_blocks=2, rank=1),
        "m.hybrid": fit_hybrid(_X((16, 12), 3), BlockLayout.block((16, 12), 2, rank=1), global_rank=1),
        "m.shared": fit_shared_basis(_X((16, 12), 4), 2, 2, random_state=0),
    }
    with pytest.raises(ValueError, match=r"one adapter holds one peft_type.*'model.layers.0.mlp.up_proj'"):
        save_peft_adapter(tmp_path / "a", layers)
    assert _roundtrip(tmp_path, layers, peft_type="GRALORA")[0]["peft_type"] == "GRALORA"
    assert _roundtrip(tmp_path, layers, peft_type="LORA", overwrite=True)[0]["peft_type"] == "LORA"


def test_gralora_needs_k(tmp_path):
    layers = {Q: approximate(_X((16, 12)), method="global", rank=2)}
    with pytest.raises(ValueError, match="needs gralora_k"):
        save_peft_adapter(tmp_path / "a", layers, peft_type="GRALORA")
    assert _roundtrip(tmp_path, layers, peft_type="GRALORA", gralora_k=4)[1]["gralora_k"] == 4
    two = {Q: approximate(_X((16, 12)), n_blocks=2, rank=1), U: approximate(_X((16, 12)), n_blocks=4, rank=1)}
    with pytest.raises(ValueError, match=r"one gralora_k; the layers ask for \[2, 4\]"):
        save_peft_adapter(tmp_path / "b", two)


def test_permutations(tmp_path):
    rng = np.random.default_rng(0)
    rp, cp = rng.permutation(16), rng.permutation(12)
    X = _X((16, 12))
    diag = approximate(X, BlockLayout.diagonal((16, 12), 2, rank=2).with_permutation(rp, cp))
    glob = approximate(X, BlockLayout.global_((16, 12), rank=2).with_permutation(rp, cp))
    np.testing.assert_allclose(_dense(diag), diag.reconstruction)
    _roundtrip(tmp_path, {Q: diag, U: glob})  # stacked LoRA, exact
    _roundtrip(tmp_path, {U: glob}, peft_type="GRALORA", gralora_k=2, overwrite=True)
    block = approximate(X, BlockLayout.block((16, 12), 2, rank=1).with_permutation(rp, cp))
    with pytest.raises(ValueError, match=f"layer '{Q}' has a row/column permutation.*peft_type='LORA'"):
        save_peft_adapter(tmp_path / "b", {Q: block})
    _roundtrip(tmp_path, {Q: block}, peft_type="LORA", overwrite=True)
    hybrid = StructuredFactors(block.layout, block.factors, global_factors=(_X((16, 1)), _X((1, 12))))
    with pytest.raises(ValueError, match="a hybrid layout with a row/column permutation has no PEFT form"):
        save_peft_adapter(tmp_path / "b", {Q: hybrid}, peft_type="LORA")


def test_library_never_imports_torch():
    import subprocess
    import sys

    code = "import sys, blocklowrank.peft; sys.exit('torch' in sys.modules or 'peft' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------------------- refusals and writes
def test_shape_not_divisible_names_layer_and_options(tmp_path):
    layers = {Q: approximate(_X((15, 12)), n_blocks=2, rank=1)}  # uneven rows: PEFT would reject it
    with pytest.raises(
        ValueError,
        match=rf"layer '{Q}' of shape \(out=15, in=12\) is not divisible by "
        r"gralora_k=2.*another K or write it as LoRA",
    ):
        save_peft_adapter(tmp_path / "a", layers)
    assert os.listdir(tmp_path) == []
    _roundtrip(tmp_path, layers, peft_type="LORA")


def test_refuses_non_empty_directory_and_overwrites_atomically(tmp_path, monkeypatch):
    fit = {Q: approximate(_X((8, 6)), method="global", rank=1)}
    (tmp_path / "a").mkdir()
    save_peft_adapter(tmp_path / "a", fit)  # an empty directory is fine
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        save_peft_adapter(tmp_path / "a", fit)
    before = (tmp_path / "a" / ADAPTER_WEIGHTS).read_bytes()

    import blocklowrank.peft._write as mod  # where the writer calls save_file

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mod, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_peft_adapter(tmp_path / "a", {Q: approximate(_X((8, 6), 1), method="global", rank=2)}, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no temporary directory left behind
    assert (tmp_path / "a" / ADAPTER_WEIGHTS).read_bytes() == before
    monkeypatch.undo()
    save_peft_adapter(tmp_path / "a", {Q: approximate(_X((8, 6), 1), method="global", rank=2)}, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["a"] and load_peft_adapter(tmp_path / "a")[1]["r"] == 2


@pytest.mark.parametrize("name", ["", "a..b", ".a", "a b", 3])
def test_bad_module_paths(tmp_path, name):
    with pytest.raises(ValueError, match="must be a dotted name"):
        save_peft_adapter(tmp_path / "a", {name: approximate(_X((8, 6)), method="global", rank=1)})


def test_safetensors_file_is_standard(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    fit = approximate(_X((8, 6)), n_blocks=2, rank=1)
    save_peft_adapter(tmp_path / "a", {Q: fit})
    theirs = safetensors_numpy.load_file(tmp_path / "a" / ADAPTER_WEIGHTS)
    assert {k: v.shape for k, v in theirs.items()} == {
        f"base_model.model.{Q}.gralora_A": (2, 3, 2),
        f"base_model.model.{Q}.gralora_B": (2, 2, 4),
    }
    assert all(v.dtype == np.float32 for v in theirs.values())
    safetensors_numpy.save_file(theirs, tmp_path / "a" / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    np.testing.assert_allclose(load_peft_adapter(tmp_path / "a")[0][Q].to_dense(), fit.reconstruction, atol=1e-6)


# ---------------------------------------------------------------------------- hostile directories
@pytest.fixture
def lora_dir(tmp_path):
    save_peft_adapter(tmp_path / "a", {Q: approximate(_X((8, 6)), method="global", rank=2)}, dtype=np.float64)
    return tmp_path / "a"


def _edit_config(d, **changes):
    config = json.loads((d / ADAPTER_CONFIG).read_text())
    config.update(changes)
    (d / ADAPTER_CONFIG).write_text(json.dumps(config))


def _rewrite(d, rename=None, drop=None, reshape=None):
    tensors = {n: v for n, v in load_file(d / ADAPTER_WEIGHTS).items() if n != drop}
    if rename:
        tensors[rename[1]] = tensors.pop(rename[0])
    if reshape:
        tensors[reshape] = np.zeros((1,) + tensors[reshape].shape[1:])
    save_file(d / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})


def _raw_header(d, header, n_data=0):
    text = json.dumps(header).encode()
    (d / ADAPTER_WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + b"\x00" * n_data)


KEY_A, KEY_B = f"base_model.model.{Q}.lora_A.weight", f"base_model.model.{Q}.lora_B.weight"


@pytest.mark.parametrize(
    "damage, error, match",
    [
        (lambda d: os.remove(d / ADAPTER_CONFIG), FileNotFoundError, "adapter_config.json is missing"),
        (lambda d: os.remove(d / ADAPTER_WEIGHTS), FileNotFoundError, "adapter_model.safetensors is missing"),
        (lambda d: (d / ADAPTER_CONFIG).write_text("{"), ValueError, "adapter_config.json is not valid JSON"),
        (lambda d: _edit_config(d, peft_type="IA3"), ValueError, "peft_type 'IA3' is not one of"),
        (lambda d: _edit_config(d, r=0), ValueError, "'r' must be a positive integer"),
        (
            lambda d: _edit_config(d, r=3),
            ValueError,
            rf"tensor '{KEY_A}' has shape \[2, 6\], the config implies \[3, \*\]",
        ),
        (lambda d: _edit_config(d, rank_pattern={"q_proj": 1}), ValueError, "has shape .2, 6., the config implies .1,"),
        (lambda d: _edit_config(d, use_dora=True), ValueError, "DoRA"),
        (lambda d: _edit_config(d, rank_pattern=[2]), ValueError, "'rank_pattern' must map module patterns to numbers"),
        (lambda d: _edit_config(d, alpha_pattern={"(": 2}), ValueError, "'alpha_pattern' key '\\(' is not a regular"),
        (lambda d: _edit_config(d, target_modules="("), ValueError, "target_modules '\\(' is not a regular expression"),
        (lambda d: _edit_config(d, target_modules=3), ValueError, "target_modules must be a string or a list"),
        (lambda d: _edit_config(d, target_modules=["k_proj"]), ValueError, "outside the config's target_modules"),
        (lambda d: _edit_config(d, peft_type="GRALORA", gralora_k=2), ValueError, "is not a gralora_A/"),
        (
            lambda d: _edit_config(d, peft_type="GRALORA", gralora_k=3),
            ValueError,
            "r=2 is not divisible by gralora_k=3",
        ),
        (lambda d: _rewrite(d, drop=KEY_B), ValueError, f"module '{Q}' has no lora_B.weight"),
        (lambda d: _rewrite(d, rename=(KEY_B, KEY_B + "x")), ValueError, "is not a lora_A.weight/lora_B.weight"),
        (lambda d: _rewrite(d, rename=(KEY_B, KEY_B[len("base_model.model.") :])), ValueError, "is not a lora_A"),
        (
            lambda d: _rewrite(d, reshape=KEY_A),
            ValueError,
            rf"'{KEY_A}' has shape \[1, 6\], the config implies \[2, \*\]",
        ),
        (lambda d: (d / ADAPTER_WEIGHTS).write_bytes(b"\x00" * 4), ValueError, "too few for a safetensors header"),
        (lambda d: _raw_header(d, {KEY_A: 3}), ValueError, f"tensor '{KEY_A}': its header entry must be an object"),
        (
            lambda d: _raw_header(
                d,
                {
                    KEY_A: {"dtype": "I8", "shape": [2, 6], "data_offsets": [0, 12]},
                    KEY_B: {"dtype": "I8", "shape": [8, 2], "data_offsets": [12, 28]},
                },
                28,
            ),
            ValueError,
            f"tensor '{KEY_A}' has dtype int8, not a floating type",
        ),
        (lambda d: (d / ADAPTER_WEIGHTS).write_bytes(struct.pack("<Q", 4) + b"abcd"), ValueError, "header"),
        (
            lambda d: (d / ADAPTER_WEIGHTS).write_bytes((d / ADAPTER_WEIGHTS).read_bytes()[:-8]),
            ValueError,
            f"{ADAPTER_WEIGHTS}, tensor '.*': data_offsets .* fall outside",
        ),
    ],
)
def test_hostile_lora_dirs(lora_dir, damage, error, match):
    damage(lora_dir)
    with pytest.raises(error, match=match):
        load_peft_adapter(lora_dir)


def test_hostile_gralora_dirs(tmp_path):
    fit = fit_hybrid(_X((8, 6)), BlockLayout.block((8, 6), 2, rank=1), global_rank=1)
    save_peft_adapter(tmp_path / "a", {Q: fit})
    general = f"base_model.model.{Q}.gralora_A_general.weight"
    _edit_config(tmp_path / "a", hybrid_r=0, alpha=2)
    with pytest.raises(ValueError, match=f"key '{general}' is unexpected with hybrid_r=0"):
        load_peft_adapter(tmp_path / "a")
    _edit_config(tmp_path / "a", hybrid_r=1, alpha=3)
    _rewrite(tmp_path / "a", drop=general)
    with pytest.raises(ValueError, match="has no base_model.model.*gralora_A_general"):
        load_peft_adapter(tmp_path / "a")


def test_zero_rank_layer_is_written_as_zeros(tmp_path):
    lay = BlockLayout((8, 6), (8,), (6,), [[True]], [[0]])
    sf = StructuredFactors(lay, {(0, 0): (np.zeros((8, 0)), np.zeros((0, 6)))})
    rep, config = _roundtrip(tmp_path, {Q: sf})
    assert config["r"] == 1 and rep["layers"][Q]["n_params_effective"] == 0


# ---------------------------------------------------------------------------- config fields and patterns
REFUSED_FIELDS = {
    "use_dora": True,
    "lora_bias": True,
    "bias": "all",
    "alora_invocation_tokens": [5, 6],
    "use_qalora": True,
    "layer_replication": [[0, 2]],
    "target_parameters": ["experts.down_proj"],
    "use_bdlora": {"nblocks": 2},
    "arrow_config": {"top_k": 2},
    "kasa_config": {"beta": 1.0},
    "monteclora_config": {"num_samples": 2},
}


@pytest.mark.parametrize("field", sorted(REFUSED_FIELDS))
def test_fields_that_change_the_update_are_refused_by_name(lora_dir, field):
    """Each of PEFT's LoraConfig fields that make the update something other than s·B·A is refused, named."""
    _edit_config(lora_dir, **{field: REFUSED_FIELDS[field]})
    with pytest.raises(ValueError, match=f"{ADAPTER_CONFIG}: '{field}' is .*not supported"):
        load_peft_adapter(lora_dir)


@pytest.mark.parametrize("field", ["use_dora", "bias", "alora_invocation_tokens", "layer_replication"])
def test_their_defaults_are_read(lora_dir, field):
    want = load_peft_adapter(lora_dir)[0][Q].to_dense()
    default = {"use_dora": False, "bias": "none", "alora_invocation_tokens": None, "layer_replication": None}
    _edit_config(lora_dir, **{field: default[field]}, lora_dropout=0.1, layers_to_transform=[0])
    np.testing.assert_array_equal(load_peft_adapter(lora_dir)[0][Q].to_dense(), want)


@pytest.mark.parametrize("init", ["loftq", "pissa_niter_16", "foo", 1])
def test_unknown_or_rewriting_inits_are_refused(lora_dir, init):
    _edit_config(lora_dir, init_lora_weights=init)
    with pytest.raises(ValueError, match=f"'init_lora_weights' is {init!r}"):
        load_peft_adapter(lora_dir)


def _regex(draw, st, depth):
    """A random regular expression over module-path characters (Python syntax)."""
    atoms = ["a", "b", "1", "_", r"\.", ".", "[ab]", "[^a.]", r"\d", r"\w", "[a-b1]"]
    kind = draw(st.integers(0, 7 if depth < 3 else 0))
    if kind == 0:
        return draw(st.sampled_from(atoms))
    if kind in (1, 2):
        return _regex(draw, st, depth + 1) + _regex(draw, st, depth + 1)
    if kind == 3:
        return f"({_regex(draw, st, depth + 1)}|{_regex(draw, st, depth + 1)})"
    if kind == 4:
        quantifier = draw(st.sampled_from(["?", "*", "+", "{0,2}", "{2}", "*?", "{1,}"]))
        return f"({_regex(draw, st, depth + 1)}){quantifier}"
    if kind == 5:
        return draw(st.sampled_from(["^", "$", r"\b", r"\B"])) + _regex(draw, st, depth + 1)
    if kind == 6:
        return draw(st.sampled_from(["(?=a)", "(?!b)", r"(?<=a\.)", "(?<!1)"])) + _regex(draw, st, depth + 1)
    return _regex(draw, st, depth + 1) + draw(st.sampled_from(["$", r"\Z", ""]))


def test_patterns_match_as_re_and_peft_do():
    """Claim: a pattern read from an adapter config selects exactly the module paths it selects for PEFT: the
    non-backtracking matcher agrees with ``re.fullmatch`` (``target_modules``) and with PEFT's
    ``re.match(rf"(.*\\.)?({key})$", module)`` (``rank_pattern``/``alpha_pattern`` keys), both Python's ``re``
    (the reference), on random patterns (groups, alternations, repeats, anchors, lookarounds) and paths."""
    pytest.importorskip("hypothesis")
    import re

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from blocklowrank.peft._patterns import Pattern

    @settings(max_examples=400, derandomize=True, database=None, deadline=None)
    @given(data=st.data(), texts=st.lists(st.text("ab1_.", max_size=7), min_size=1, max_size=6))
    def check(data, texts):
        pattern = _regex(data.draw, st, 0)
        compiled = Pattern(pattern)
        for text in texts:
            assert compiled.fullmatch(text) == (re.fullmatch(pattern, text) is not None), (pattern, text)
            peft = re.match(rf"(.*\.)?({pattern})$", text) is not None
            assert compiled.suffix_match(text) == peft, (pattern, text)

    check()


@pytest.mark.parametrize("pattern", [r"(a)\1", "(?i)q_proj", "a++", "(?>a)", "(?(1)a|b)", "a{100000}"])
def test_patterns_an_automaton_cannot_run_are_refused(lora_dir, pattern):
    _edit_config(lora_dir, rank_pattern={pattern: 2})
    with pytest.raises(ValueError, match="'rank_pattern' key .* is not a regular expression this reader can match"):
        load_peft_adapter(lora_dir)

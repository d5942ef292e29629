"""Tests of the layer selection of blocklowrank.checkpoints: target_modules, pairing, ΔW streaming.

The checkpoints are small, generated here: a Llama-like base, a fine-tuned
version (sharded, BF16, resized vocabulary, a layer dropped, a new head) and
PEFT-adapter-like names.
"""

import gc
import json
import subprocess
import sys
import weakref

import numpy as np
import pytest

from blocklowrank.checkpoints import (
    CheckpointError,
    LayerPair,
    PairingReport,
    changed_tensors,
    iter_deltas,
    layer_kinds,
    module_of,
    open_checkpoint,
    pair_layers,
    save_file,
    select_names,
)

D, FF, VOCAB = 8, 12, 16


def llama_like(rng, *, n_layers=2, vocab=VOCAB, dtype=np.float32):
    """Tensors of a tiny Llama-style model, in the usual naming."""
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((vocab, D)),
        "model.norm.weight": np.ones(D),
        "lm_head.weight": rng.standard_normal((vocab, D)),
    }
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for proj in "qkvo":
            tensors[f"{p}self_attn.{proj}_proj.weight"] = rng.standard_normal((D, D))
        tensors[f"{p}self_attn.q_proj.bias"] = rng.standard_normal(D)
        tensors[f"{p}mlp.gate_proj.weight"] = rng.standard_normal((FF, D))
        tensors[f"{p}mlp.up_proj.weight"] = rng.standard_normal((FF, D))
        tensors[f"{p}mlp.down_proj.weight"] = rng.standard_normal((D, FF))
        tensors[f"{p}input_layernorm.weight"] = np.ones(D)
    return {name: array.astype(dtype) for name, array in tensors.items()}


def shapes_of(tensors):
    return {name: array.shape for name, array in tensors.items()}


@pytest.fixture
def models(tmp_path):
    """A float32 base file and a sharded BF16 fine-tuned version with a resized vocabulary."""
    rng = np.random.default_rng(0)
    base = llama_like(rng)
    tuned = {
        name: array + np.float32(0.01) * rng.standard_normal(array.shape).astype(np.float32)
        for name, array in base.items()
    }
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # vocabulary grown by 4
        tuned[name] = np.concatenate([tuned[name], np.zeros((4, D), np.float32)])
    del tuned["model.layers.1.mlp.down_proj.weight"]
    tuned["score.weight"] = np.ones((3, D), np.float32)
    save_file(tmp_path / "base.safetensors", base)
    folder = tmp_path / "tuned"
    folder.mkdir()
    names = sorted(tuned)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, part in shards.items():
        save_file(folder / shard, {name: tuned[name] for name in part}, dtypes="BF16")
    weight_map = {name: shard for shard, part in shards.items() for name in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with open_checkpoint(tmp_path / "base.safetensors") as b, open_checkpoint(folder) as t:
        yield b, t, base, tuned


# ---------------------------------------------------------------- select_names

LLAMA = shapes_of(llama_like(np.random.default_rng(0), n_layers=1))
GPT2 = {
    "transformer.wte.weight": (50, 8),
    "transformer.wpe.weight": (16, 8),
    "transformer.h.0.attn.c_attn.weight": (8, 24),
    "transformer.h.0.attn.c_proj.weight": (8, 8),
    "transformer.h.0.mlp.c_fc.weight": (8, 32),
    "transformer.h.0.ln_1.weight": (8,),
    "lm_head.weight": (50, 8),
}
BERT = {
    "bert.embeddings.word_embeddings.weight": (50, 8),
    "bert.embeddings.position_embeddings.weight": (16, 8),
    "bert.embeddings.token_type_embeddings.weight": (2, 8),
    "bert.embeddings.LayerNorm.weight": (8,),
    "bert.encoder.layer.0.attention.self.query.weight": (8, 8),
    "bert.encoder.layer.0.attention.output.dense.weight": (8, 8),
    "bert.pooler.dense.weight": (8, 8),
    "classifier.weight": (2, 8),
}
T5 = {
    "shared.weight": (50, 8),
    "encoder.block.0.layer.0.SelfAttention.q.weight": (8, 8),
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 2),
    "decoder.embed_tokens.weight": (50, 8),
    "lm_head.weight": (50, 8),
}
META_LLAMA = {
    "tok_embeddings.weight": (50, 8),
    "layers.0.attention.wq.weight": (8, 8),
    "output.weight": (50, 8),
    "norm.weight": (8,),
}
GPT_NEOX = {
    "gpt_neox.embed_in.weight": (50, 8),
    "gpt_neox.layers.0.attention.query_key_value.weight": (24, 8),
    "embed_out.weight": (50, 8),
}
ADAPTER = {
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (2, 8),
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (8, 2),
}


@pytest.mark.parametrize(
    "shapes, expected",
    [
        (LLAMA, [n for n in LLAMA if "proj.weight" in n]),
        (
            GPT2,
            [
                "transformer.h.0.attn.c_attn.weight",
                "transformer.h.0.attn.c_proj.weight",
                "transformer.h.0.mlp.c_fc.weight",
            ],
        ),
        (
            BERT,
            [
                "bert.encoder.layer.0.attention.self.query.weight",
                "bert.encoder.layer.0.attention.output.dense.weight",
                "bert.pooler.dense.weight",
                "classifier.weight",
            ],
        ),
        (T5, ["encoder.block.0.layer.0.SelfAttention.q.weight"]),
        (META_LLAMA, ["layers.0.attention.wq.weight"]),
        (GPT_NEOX, ["gpt_neox.layers.0.attention.query_key_value.weight"]),
        (ADAPTER, []),
    ],
    ids=["llama", "gpt2", "bert", "t5", "meta-llama", "gpt-neox", "adapter"],
)
def test_all_linear(shapes, expected):
    assert select_names(shapes, "all-linear", shapes=shapes) == expected
    assert select_names(list(shapes), "ALL-LINEAR", shapes=shapes) == expected


def test_suffix_list_and_regex():
    names = list(LLAMA)
    q = ["model.layers.0.self_attn.q_proj.weight"]
    assert select_names(names, ["q_proj"]) == q  # the bias is not a layer
    assert select_names(names, ("self_attn.q_proj",)) == q
    assert select_names(names, ["_proj"]) == []  # a suffix is a whole name part
    assert select_names(names, "q_proj") == []  # a regex must match the whole module path
    assert select_names(names, r".*\.q_proj") == q
    assert select_names(names, r"model\.layers\.\d+\.mlp\.(up|down)_proj") == [
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    ]
    assert select_names(names, ["input_layernorm"]) == ["model.layers.0.input_layernorm.weight"]
    assert select_names(names, ["input_layernorm"], shapes=LLAMA) == []  # shapes: 2-D only
    adapter = list(ADAPTER)
    assert select_names(adapter, ["q_proj"]) == []
    assert select_names(adapter, r".*q_proj\.lora_A") == adapter[:1]
    assert select_names([], ["q_proj"]) == []


@pytest.mark.parametrize(
    "target, kwargs, error, match",
    [
        ("all-linear", {}, ValueError, "needs the shapes"),
        ("(", {}, ValueError, "not a valid regular expression"),
        (3, {}, TypeError, "target_modules must be"),
        ({"q_proj": 1}, {}, TypeError, "target_modules must be"),
        (["q_proj", 3], {}, TypeError, "non-empty module names"),
        ([""], {}, TypeError, "non-empty module names"),
        (["q_proj"], {"shapes": {}}, ValueError, "shapes has no entry"),
    ],
)
def test_select_names_errors(target, kwargs, error, match):
    with pytest.raises(error, match=match):
        select_names(["a.q_proj.weight"], target, **kwargs)


def test_module_of():
    assert module_of("a.b.weight") == "a.b"
    assert module_of(".weight") is None and module_of("weight") is None and module_of("a.gralora_A") is None


# ---------------------------------------------------------------- pair_layers


def test_pair_layers_reports_everything(models):
    base, tuned, base_arrays, tuned_arrays = models
    report = pair_layers(base, tuned)
    assert report.only_in_base == ["model.layers.1.mlp.down_proj.weight"]
    assert report.only_in_finetuned == ["score.weight"]
    assert report.shape_mismatch == [
        (name, (VOCAB, D), (VOCAB + 4, D))
        for name in base.names()
        if name in ("model.embed_tokens.weight", "lm_head.weight")
    ]
    assert sorted(report.not_2d) == sorted(n for n, a in base_arrays.items() if a.ndim == 1)
    assert report.excluded == []  # embeddings and head already in shape_mismatch
    expected = [n for n in base.names() if "proj.weight" in n and n != "model.layers.1.mlp.down_proj.weight"]
    assert [p.name for p in report.pairs] == expected  # checkpoint order
    assert report.pairs[0] == LayerPair(expected[0], module_of(expected[0]), base.info(expected[0]).shape)
    # every tensor lands in exactly one group
    grouped = (
        [p.name for p in report.pairs]
        + report.only_in_base
        + report.only_in_finetuned
        + [m[0] for m in report.shape_mismatch]
        + report.not_2d
        + report.excluded
    )
    assert sorted(grouped) == sorted(set(base_arrays) | set(tuned_arrays))
    text = report.summary(max_names=2)
    assert text.startswith(f"{len(expected)} layer pairs") and "only in base (1)" in text
    assert "shape mismatch (2)" in text and "(16, 8) vs (20, 8)" in text and "... and" in text


def test_pair_layers_with_a_target_list_and_without_finetuned(models):
    base, tuned, _, _ = models
    report = pair_layers(base, tuned, ["q_proj", "v_proj"])
    assert [p.module for p in report.pairs] == [f"model.layers.{i}.self_attn.{x}_proj" for i in range(2) for x in "qv"]
    assert "model.layers.0.mlp.up_proj.weight" in report.excluded
    alone = pair_layers(base, None)
    assert alone.only_in_base == alone.only_in_finetuned == alone.shape_mismatch == []
    assert alone.excluded == [n for n in base.names() if n in ("model.embed_tokens.weight", "lm_head.weight")]
    assert len(alone.pairs) == 14


def test_pairing_an_adapter_file_explains_itself(tmp_path, models):
    base, _, _, _ = models
    adapter = {name: np.zeros(shape, np.float32) for name, shape in ADAPTER.items()}
    with open_checkpoint(save_file(tmp_path / "adapter_model.safetensors", adapter)) as lora:
        report = pair_layers(base, lora)
    assert report.pairs == [] and report.only_in_finetuned == list(ADAPTER)
    assert "looks like a PEFT adapter" in report.summary()


# ---------------------------------------------------------------- iter_deltas


def test_iter_deltas_values_and_dtypes(models):
    base, tuned, base_arrays, _ = models
    report = pair_layers(base, tuned)
    seen = []
    for pair, delta in iter_deltas(base, tuned, report):
        assert isinstance(pair, LayerPair) and delta.shape == pair.shape and delta.dtype == np.float32
        exact = tuned.get(pair.name).astype(np.float64) - base_arrays[pair.name].astype(np.float64)
        assert np.array_equal(delta, exact.astype(np.float32))  # one rounding, in float32
        seen.append(pair)
    assert seen == report.pairs
    pair, delta = next(iter_deltas(base, tuned, report.pairs[:1], dtype=np.float64))
    assert delta.dtype == np.float64
    for pair, w in iter_deltas(base, None, report):  # the weights themselves
        assert w.dtype == np.float32 and np.array_equal(w, base_arrays[pair.name])


def test_iter_deltas_uses_float64_when_a_checkpoint_is_f64(tmp_path):
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((4, 3)).astype(np.float32)
    base = open_checkpoint(save_file(tmp_path / "a.safetensors", {"l.weight": a}))
    tuned = open_checkpoint(save_file(tmp_path / "b.safetensors", {"l.weight": b}))
    ((_, delta),) = iter_deltas(base, tuned, pair_layers(base, tuned))
    assert delta.dtype == np.float64 and np.array_equal(delta, b.astype(np.float64) - a)


def test_iter_deltas_checks_shapes_and_arguments(models):
    base, tuned, _, _ = models
    stale = [LayerPair("lm_head.weight", "lm_head", (VOCAB, D))]
    deltas = iter_deltas(base, tuned, stale)
    with pytest.raises(CheckpointError, match=r"tensor 'lm_head.weight': shape \(20, 8\) differs"):
        next(deltas)
    with pytest.raises(ValueError, match="float32 or float64"):
        iter_deltas(base, tuned, stale, dtype=np.float16)  # raised at the call, not at first next()
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        next(iter_deltas(base, tuned, [LayerPair("nope", "nope", (1, 1))]))


@pytest.mark.parametrize("with_finetuned", [True, False])
def test_iter_deltas_holds_one_layer_at_a_time(models, monkeypatch, with_finetuned):
    base, tuned, _, _ = models
    finetuned = tuned if with_finetuned else None
    report = pair_layers(base, finetuned)
    alive = []

    reads = []

    def checked(original):
        def read(name, out, **kwargs):
            if any(ref() is not None for ref in alive):
                gc.collect()  # only cycles could keep it; refcounting frees the rest
            assert all(ref() is None for ref in alive), "an earlier layer is still held"
            reads.append(name)
            return original(name, out, **kwargs)

        return read

    for ckpt in (base, tuned):  # every read of a layer goes through _read_into
        monkeypatch.setattr(ckpt, "_read_into", checked(ckpt._read_into))
    count = 0
    for _, delta in iter_deltas(base, finetuned, report):
        alive.append(weakref.ref(delta))
        del delta
        count += 1
    assert count == len(report.pairs) > 1
    assert len(reads) == count * (2 if with_finetuned else 1)  # the check above really ran


@pytest.mark.parametrize("code", ["BF16", "F16", "F32", "F64"])
@pytest.mark.parametrize("chunk_bytes", [1, 6, 10, 4096, 1 << 24])
def test_chunked_read_equals_the_whole_tensor(tmp_path, code, chunk_bytes):
    """Claim: reading in chunks of any size (not a multiple of the item size, or
    larger than the tensor) decodes exactly what the memory-mapped tensor holds,
    and subtracting chunk by chunk equals one NumPy subtraction of the whole."""
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((2, 13, 7))
    ckpt = open_checkpoint(save_file(tmp_path / "c.safetensors", {"a": a, "b": b}, dtypes=code))
    raw = {  # the stored values, decoded independently of the reader
        name: (
            (
                np.frombuffer(ckpt._buffer(ckpt.info(name).file), np.uint16, 91, ckpt.info(name).offsets[0]).astype(
                    np.uint32
                )
                << 16
            )
            .view(np.float32)
            .reshape(13, 7)
            if code == "BF16"
            else np.frombuffer(
                ckpt._buffer(ckpt.info(name).file),
                {"F16": np.float16, "F32": np.float32, "F64": np.float64}[code],
                91,
                ckpt.info(name).offsets[0],
            ).reshape(13, 7)
        )
        for name in ("a", "b")
    }
    for dtype in (np.float32, np.float64):
        out = ckpt._read_into("b", np.empty((13, 7), dtype), chunk_bytes=chunk_bytes)
        assert np.array_equal(out, raw["b"].astype(dtype))
        ckpt._read_into("a", out, subtract=True, chunk_bytes=chunk_bytes)
        # out -= a as NumPy computes it (in the wider of the two types), rounded to out's
        assert np.array_equal(out, (raw["b"].astype(dtype) - raw["a"]).astype(dtype))
    with pytest.raises(ValueError, match="C-contiguous array of shape"):
        ckpt._read_into("a", np.empty((7, 13)))
    ckpt.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_streaming_keeps_no_file_pages_resident(tmp_path):
    """Claim: streaming every layer of a checkpoint that stays open adds no file
    pages to the resident set (a memory map would keep every page it touched):
    peak memory stays at a layer's worth whatever the checkpoint's size. The
    control reads the same layers through memory-mapped views and sees them."""

    def rss_file_mib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssFile:")) / 1024

    rng = np.random.default_rng(0)
    layers = {f"l{i}.weight": rng.standard_normal((512, 512), dtype=np.float32) for i in range(16)}
    path = save_file(tmp_path / "big.safetensors", layers)  # 16 MiB
    with open_checkpoint(path) as ckpt:
        before = rss_file_mib()
        for _, w in iter_deltas(ckpt, None, pair_layers(ckpt, None)):
            w.sum()
        streamed = rss_file_mib() - before
        views = [ckpt.get(name) for name in layers]  # memory-mapped: the control
        touched = sum(float(v.sum()) for v in views)
        mapped = rss_file_mib() - before
        del views
    assert np.isfinite(touched) and mapped > 12, f"the control saw only {mapped:.1f} MiB"
    assert streamed < 2, f"streaming left {streamed:.1f} MiB of the file resident"


def test_pairing_report_is_a_plain_record():
    report = PairingReport([], [], [], [], [], [])
    assert report.summary() == "0 layer pairs (0 weights) selected by target_modules='all-linear'"


def test_the_package_never_imports_torch():
    code = "import sys, blocklowrank.checkpoints; sys.exit('torch' in sys.modules or 'safetensors' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---------------------------------------------------------------------------- what a layer is
GPT2_NAMES = ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj", "wte", "score"]


def test_layer_kinds_from_the_models_config():
    gpt2 = [("config.json", {"model_type": "gpt2"})]
    kinds = layer_kinds(GPT2_NAMES, gpt2)
    assert kinds == {**dict.fromkeys(GPT2_NAMES[:4], "conv1d"), "wte": "embedding", "score": "linear"}
    by_architecture = layer_kinds(GPT2_NAMES[:1], [("c", {"architectures": ["GPT2LMHeadModel"]})])
    assert by_architecture == {"h.0.attn.c_attn": "conv1d"}
    # the same names are nn.Linear in GPT-Neo and StarCoder: only the model's description can tell
    for model_type in ("gpt_neo", "gpt_bigcode", "llama"):
        assert set(layer_kinds(GPT2_NAMES[:4], [("c", {"model_type": model_type})]).values()) == {"linear"}
    clvp = layer_kinds(["decoder.h.0.mlp.c_fc", "decoder.h.0.attn.c_proj", "q_proj"], [("c", {"model_type": "clvp"})])
    assert clvp == {"decoder.h.0.mlp.c_fc": "conv1d", "decoder.h.0.attn.c_proj": "conv1d", "q_proj": "linear"}


def test_layer_kinds_refuse_what_nothing_decides():
    with pytest.raises(ValueError, match=r"'h.0.attn.c_proj'.*config.json.*orientation='in_out'"):
        layer_kinds(["h.0.attn.c_proj"])  # square: the shape cannot decide either
    assert layer_kinds(["h.0.attn.c_proj"], orientation="in_out") == {"h.0.attn.c_proj": "conv1d"}
    assert layer_kinds(["h.0.attn.c_proj"], fallback="out_in") == {"h.0.attn.c_proj": "linear"}
    assert layer_kinds(["q_proj"]) == {"q_proj": "linear"}  # not a Conv1D name: nn.Linear
    with pytest.raises(ValueError, match="contradicts the model's config.json"):
        layer_kinds(["h.0.attn.c_attn"], [("c", {"model_type": "gpt2"})], orientation="out_in")
    with pytest.raises(ValueError, match="different models"):
        layer_kinds(["q_proj"], [("a", {"model_type": "gpt2"}), ("b", {"model_type": "llama"})])
    with pytest.raises(ValueError, match="'my_embedding' is an embedding .* or a linear layer"):
        layer_kinds(["my_embedding"])
    with pytest.raises(ValueError, match="orientation must be one of"):
        layer_kinds(["q_proj"], orientation="conv1d")


def test_conv1d_pairs_stream_out_in(tmp_path):
    """A Conv1D layer (stored (in, out)) is paired with its (out, in) shape and streamed as the transpose."""
    rng = np.random.default_rng(0)
    w = {"h.0.attn.c_attn.weight": rng.standard_normal((4, 12)), "h.0.attn.c_proj.weight": rng.standard_normal((4, 4))}
    tuned = {k: v + rng.standard_normal(v.shape) for k, v in w.items()}
    for name, tensors in (("base", w), ("ft", tuned)):
        (tmp_path / name).mkdir()
        save_file(tmp_path / name / "model.safetensors", tensors)
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    base, ft = open_checkpoint(tmp_path / "base"), open_checkpoint(tmp_path / "ft")
    report = pair_layers(base, ft)
    assert [(p.module, p.shape, p.kind, p.stored_shape) for p in report.pairs] == [
        ("h.0.attn.c_attn", (12, 4), "conv1d", (4, 12)),
        ("h.0.attn.c_proj", (4, 4), "conv1d", (4, 4)),
    ]
    digests = {}
    for pair, delta in iter_deltas(base, ft, report, dtype=np.float64, digests=digests):
        np.testing.assert_allclose(delta, (tuned[pair.name] - w[pair.name]).T, rtol=1e-6, atol=1e-6)
        assert set(digests) == {"base", "finetuned"} and all(len(d) == 64 for d in digests.values())
    (tmp_path / "base" / "config.json").unlink()
    (tmp_path / "ft" / "config.json").unlink()
    with pytest.raises(ValueError, match="cannot tell how the weight of 'h.0.attn.c_attn' is stored"):
        pair_layers(open_checkpoint(tmp_path / "base"), open_checkpoint(tmp_path / "ft"))
    assert pair_layers(open_checkpoint(tmp_path / "base"), None, orientation="in_out").pairs[0].shape == (12, 4)


@pytest.mark.parametrize("dtype", ["I32", "U8", "BOOL", "C64", "F8_E4M3"])
def test_a_layer_that_is_not_float_is_refused_when_paired(tmp_path, dtype):
    from blocklowrank.checkpoints._dtypes import DTYPES

    size = 4 * DTYPES[dtype].bits // 8
    text = json.dumps({"q_proj.weight": {"dtype": dtype, "shape": [2, 2], "data_offsets": [0, size]}}).encode()
    (tmp_path / "m.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + b"\0" * size)
    with pytest.raises(
        CheckpointError, match=rf"m.safetensors, tensor 'q_proj.weight': dtype {dtype} .*not a floating"
    ):
        pair_layers(open_checkpoint(tmp_path / "m.safetensors"), None)


def test_changed_tensors_compares_stored_values(tmp_path):
    nan = np.array([1.0, np.nan, -0.0], np.float32)
    base = {"a": nan, "b": np.arange(4, dtype=np.float32), "c": np.ones(3, np.float32), "d": np.zeros(2, np.int64)}
    tuned = {"a": nan.copy(), "b": np.arange(4, dtype=np.float32), "c": np.ones(3, np.float32) * 2, "d": base["d"]}
    b = open_checkpoint(save_file(tmp_path / "b.safetensors", base))
    f = open_checkpoint(save_file(tmp_path / "f.safetensors", tuned, dtypes={"b": "F64"}))  # same values, other dtype
    assert changed_tensors(b, f, ["a", "b", "c", "d"]) == ["c"]  # NaN unchanged where its bits are
    f = open_checkpoint(save_file(tmp_path / "g.safetensors", {**tuned, "b": np.array([0, 1, 2, np.nan], "f8")}))
    assert changed_tensors(b, f, ["b"], chunk_bytes=8) == ["b"]

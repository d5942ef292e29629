"""Issue 19, item 3: extraction and the checkpoint study in each layer's data metric (``calibration``).

Real models, made here: a tiny random BERT (``nn.Linear``) and a tiny random
GPT-2 (transformers' ``Conv1D``, weights stored (in, out)), each 'fine-tuned'
by a low-rank update plus noise and saved with ``save_pretrained``; their
statistics are collected by the real collector
(:func:`blocklowrank.calibration.collect.collect_statistics`, or
``blocklowrank calibrate`` in a subprocess) on padded token batches. The
references are independent: PEFT loads the adapters and merges them; a
layer's inputs X are recaptured by a torch forward pre-hook (padding dropped,
as the collector drops it) and its output error is computed from them with
NumPy; the global fit in a metric is SVD-LLM's whitened SVD
(``_reference.whitened``) on the Gram read back from the file.
"""

import copy
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
from _gpt2 import conv1d_modules, save, tiny_gpt2
from _llama import captured, key_problems, peft, torch, transformers
from _real import cli, no_figures
from _reference import whitened

from blocklowrank.calibration import CalibrationError, load_statistics, save_statistics
from blocklowrank.calibration.collect import collect_statistics
from blocklowrank.checkpoints import save_file
from blocklowrank.extract import extract_adapter
from blocklowrank.structures import approximate

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set:UserWarning"),
]

BERT_LAYERS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
BERT_LAYERS += ("intermediate.dense", "output.dense")
SEQ = 12


# ---------------------------------------------------------------------------- models and statistics
def _batches(vocab, seed, lengths=((12, 7), (3, 12), (9, 12, 5))):
    """Right-padded batches of random token ids with their attention masks (padding is there to be dropped)."""
    rng = np.random.default_rng(seed)
    out = []
    for lens in lengths:
        ids = rng.integers(1, vocab, size=(len(lens), SEQ))
        mask = (np.arange(SEQ) < np.array(lens)[:, None]).astype(np.int64)
        out.append({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)})
    return out


def _tuned(model, modules, seed):
    """A copy of ``model`` with a rank-3 update plus noise on each module's stored weight."""
    tuned = copy.deepcopy(model)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for module in modules:
            w = tuned.get_submodule(module).weight
            m, n = w.shape
            low = rng.standard_normal((m, 3)) @ rng.standard_normal((3, n))
            w += torch.from_numpy((0.05 * low + 0.01 * rng.standard_normal((m, n))).astype(np.float32))
    return tuned


def _setup(model, modules, batches, folder, **collect):
    base, tuned = model, _tuned(model, modules, seed=7)
    stats = collect_statistics(tuned, batches, progress=False, **collect)
    path = save_statistics(folder / "stats.safetensors", stats)
    return {
        "base": base,
        "tuned": tuned,
        "modules": modules,
        "batches": batches,
        "base_dir": save(base, folder / "base"),
        "ft_dir": save(tuned, folder / "ft"),
        "stats": path,
    }


@pytest.fixture(scope="module", autouse=True)
def _no_figures():
    with no_figures():
        yield


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A random BertModel (hidden 32, MLP 64, 2 layers), its fine-tune and G-only statistics of the fine-tune."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.BertModel(config).eval()
    modules = [f"encoder.layer.{i}.{name}" for i in range(2) for name in BERT_LAYERS]
    return _setup(model, modules, _batches(60, 1), tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A random GPT-2 (width 32, Conv1D layers), its fine-tune, and statistics with H (its own LM loss)."""
    model = tiny_gpt2()
    folder = tmp_path_factory.mktemp("gpt2")
    setup = _setup(model, conv1d_modules(model), _batches(96, 2), folder, output_grams=True)
    stats = collect_statistics(setup["tuned"], setup["batches"], progress=False)
    setup["stats_g"] = save_statistics(folder / "stats_g.safetensors", stats)  # G only
    return setup


def _weight_out_in(model, module):
    """The layer's weight as (out, in) in float64, whatever its storage (Conv1D stores (in, out))."""
    mod = model.get_submodule(module)
    w = mod.weight.detach().numpy().astype(np.float64)
    return w.T if isinstance(mod, transformers.pytorch_utils.Conv1D) else w


def _delta(setup, module):
    return _weight_out_in(setup["tuned"], module) - _weight_out_in(setup["base"], module)


def _peft_deltas(setup, adapter):
    """PEFT loads the adapter on a copy of the base (no missing or unexpected key) and merges it: each
    module's merged weight minus the base's, (out, in)."""
    with captured() as seen:
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(setup["base"]), adapter)
    assert not key_problems(seen), key_problems(seen)
    merged = loaded.merge_and_unload()
    return {m: _weight_out_in(merged, m) - _weight_out_in(setup["base"], m) for m in setup["modules"]}


def _inputs(setup, modules):
    """Each layer's inputs X (rows: the tokens the attention mask keeps) on the calibration batches, captured
    by forward pre-hooks on the fine-tuned model, independently of the collector."""
    seen = {m: [] for m in modules}
    hooks = [
        setup["tuned"].get_submodule(m).register_forward_pre_hook(lambda mod, args, m=m: seen[m].append(args[0]))
        for m in modules
    ]
    try:
        for batch in setup["batches"]:
            keep = batch["attention_mask"].numpy().astype(bool)
            for m in modules:
                seen[m].append(keep)
            with torch.no_grad():
                setup["tuned"](**batch)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for m, items in seen.items():  # [keep, x, keep, x, ...]
        rows = [x.detach().numpy().astype(np.float64)[keep] for keep, x in zip(items[::2], items[1::2])]
        out[m] = np.concatenate(rows)
    return out


def _output_error(dW, M, X):
    """``||(ΔW - M) Xᵀ|| / ||ΔW Xᵀ||`` directly."""
    return float(np.linalg.norm((dW - M) @ X.T) / np.linalg.norm(dW @ X.T))


def _gram(path, module):
    """G of ``module``'s input site, read back from the file by the reference safetensors reader."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), framework="numpy") as f:
        site = json.loads(f.metadata()["layer_sites"])[module]
    return load_file(str(path))[f"G.{site}"]


def _damped(G, delta):
    return G + delta * np.mean(np.diag(G)) * np.eye(len(G))


# ---------------------------------------------------------------------------- (a) PEFT loads what is fitted
@pytest.mark.parametrize("method", ["global", "block"])
def test_peft_merges_the_calibrated_adapter_to_base_plus_the_metric_fit(bert, tmp_path, method):
    """Claim: the calibrated adapter (LoRA for global, GraLoRA for a 2 x 2 grid) loads in PEFT without a key
    problem and its merged weights are base + the fit of ΔW in the layer's metric (G of its site, read back
    from the file); for global that fit is SVD-LLM's whitened SVD of the damped G."""
    kw = {"rank": 2} if method == "global" else {"rank": 1, "n_blocks": 2}
    report = extract_adapter(
        bert["base_dir"], bert["ft_dir"], tmp_path / "a", method=method, calibration=bert["stats"], metric="input", **kw
    )
    assert report.peft_type == ("LORA" if method == "global" else "GRALORA")
    merged = _peft_deltas(bert, tmp_path / "a")
    delta = report.calibration["gram_damping"]
    assert delta == 0.01
    for module in bert["modules"]:
        dW, G = _delta(bert, module), _gram(bert["stats"], module)
        if method == "global":
            want = whitened(dW, _damped(G, delta), 2)[0]
        else:
            want = approximate(dW, method="block", n_blocks=2, rank=1, input_gram=G).reconstruction
        scale = np.abs(dW).max()
        np.testing.assert_allclose(merged[module], want, rtol=0, atol=2e-5 * scale, err_msg=module)
        assert np.abs(merged[module] - approximate(dW, method=method, **kw).reconstruction).max() > 1e-3 * scale
    sites = {load_statistics(bert["stats"]).site_of(m) for m in bert["modules"]}
    assert report.calibration["sites_factored"] == len(sites) == 8  # q/k/v share one site per layer


# ---------------------------------------------------------------------------- (b), (c), (d): the output error
@pytest.mark.parametrize("model", ["bert", "gpt2"])
def test_reported_output_error_is_the_error_of_the_outputs_and_no_worse_than_plain(request, tmp_path, model):
    """Claims: (b) the report's output_error of each layer equals ||(ΔW - M) Xᵀ|| / ||ΔW Xᵀ|| with X the
    layer's inputs recaptured by a forward pre-hook (padding dropped) and M what PEFT merges; (c) it is at
    most the plain fit's output error at the same rank (gram_damping=0: the global fit in the metric is
    the optimum); without calibration output_error is None."""
    setup = request.getfixturevalue(model)
    stats = setup["stats"] if model == "bert" else setup["stats_g"]
    cal = extract_adapter(setup["base_dir"], setup["ft_dir"], tmp_path / "c", rank=2, calibration=stats,
                          gram_damping=0.0, metric="input")  # fmt: skip
    plain = extract_adapter(setup["base_dir"], setup["ft_dir"], tmp_path / "p", rank=2)
    M_cal, M_plain = _peft_deltas(setup, tmp_path / "c"), _peft_deltas(setup, tmp_path / "p")
    X = _inputs(setup, setup["modules"])
    on_disk = json.loads((tmp_path / "c" / "extract_report.json").read_text())
    better = 0
    for module in setup["modules"]:
        dW = _delta(setup, module)
        direct = _output_error(dW, M_cal[module], X[module])
        reported = cal.layers[module]["output_error"]
        assert reported == pytest.approx(direct, rel=1e-4), module
        assert on_disk["layers"][module]["output_error"] == reported
        plain_error = _output_error(dW, M_plain[module], X[module])
        assert reported <= plain_error * (1 + 1e-5), module
        better += reported < plain_error * 0.99
        assert plain.layers[module]["output_error"] is None
    assert better >= len(setup["modules"]) // 2  # the metric matters on these layers
    assert on_disk["calibration"]["file"] == str(stats) and plain.calibration is None
    assert "output error" in cal.summary() and "output error" not in plain.summary()


def test_gpt2_conv1d_gram_is_on_the_input_side(gpt2, tmp_path):
    """Claim: a Conv1D layer (stored (in, out)) is fitted with G on its input features: the merged update of
    the square attn.c_proj is the whitened fit of ΔW (out, in) with G on its columns, which differs from the
    fit with G on the stored weight's columns (the output side) by far more than the tolerance."""
    extract_adapter(gpt2["base_dir"], gpt2["ft_dir"], tmp_path / "a", rank=2, calibration=gpt2["stats_g"],
                    target_modules=["attn.c_proj"], gram_damping=0.0, metric="input")  # fmt: skip
    merged = _peft_deltas(gpt2, tmp_path / "a")
    for module in conv1d_modules(gpt2["base"], ("attn.c_proj",)):
        dW, G = _delta(gpt2, module), _gram(gpt2["stats_g"], module)
        assert dW.shape[0] == dW.shape[1]  # square: a transposition would not fail on shapes
        right = whitened(dW, G, 2)[0]
        wrong = whitened(dW.T, G, 2)[0].T  # G on the stored (in, out) weight's columns
        scale = np.abs(dW).max()
        np.testing.assert_allclose(merged[module], right, rtol=0, atol=2e-5 * scale)
        assert np.abs(right - wrong).max() > 100 * 2e-5 * scale


def test_output_grams_weight_the_fit_where_the_file_has_them(gpt2, tmp_path):
    """Claim: with H in the file, each layer's fit is the two-sided optimum K^{-T} [Kᵀ ΔW L]_r L^{-1}
    (H = K Kᵀ, G = L Lᵀ, both damped), and output_error is sqrt(tr(H E G Eᵀ) / tr(H ΔW G ΔWᵀ)) with the
    undamped Grams (E = ΔW - M), computed here with NumPy from the file's matrices."""
    from safetensors.numpy import load_file

    report = extract_adapter(gpt2["base_dir"], gpt2["ft_dir"], tmp_path / "a", rank=2, calibration=gpt2["stats"],
                             metric="both")  # fmt: skip
    assert report.calibration["output_grams"] == len(gpt2["modules"])
    merged, tensors = _peft_deltas(gpt2, tmp_path / "a"), load_file(str(gpt2["stats"]))
    for module in gpt2["modules"]:
        dW, G, H = _delta(gpt2, module), _gram(gpt2["stats"], module), tensors[f"H.{module}"]
        want = whitened(dW, _damped(G, 0.01), 2, H=_damped(H, 0.01))[0]
        np.testing.assert_allclose(merged[module], want, rtol=0, atol=2e-5 * np.abs(dW).max())
        E = dW - merged[module]
        direct = math.sqrt(np.sum((H @ E) * (E @ G)) / np.sum((H @ dW) * (dW @ G)))
        assert report.layers[module]["output_error"] == pytest.approx(direct, rel=1e-4)


# ---------------------------------------------------------------------------- metric: which Grams a fit uses
def test_metric_auto_fits_lora_plain_and_blocks_in_both_grams(gpt2, tmp_path):
    """Claim (metric="auto", the default): a global adapter of a given rank is ΔW's plain truncated SVD, a
    K x K adapter is the fit in G and H (the file has both); every layer's output_error is measured in the
    file's whole metric, sqrt(tr(H E G Eᵀ) / tr(H ΔW G ΔWᵀ)) with the undamped Grams, whichever way it
    was fitted, and its record says which."""
    from safetensors.numpy import load_file

    tensors = load_file(str(gpt2["stats"]))
    for method, kw, fitted in (("global", {"rank": 2}, "plain"), ("block", {"rank": 1, "n_blocks": 2}, "both")):
        out = tmp_path / method
        report = extract_adapter(gpt2["base_dir"], gpt2["ft_dir"], out, method=method, calibration=gpt2["stats"], **kw)
        assert report.settings["metric"] == "auto"
        merged = _peft_deltas(gpt2, out)
        for module in gpt2["modules"]:
            dW, G, H = _delta(gpt2, module), _gram(gpt2["stats"], module), tensors[f"H.{module}"]
            if method == "global":
                U, s, Vt = np.linalg.svd(dW)
                want = (U[:, :2] * s[:2]) @ Vt[:2]
            else:
                want = approximate(dW, method="block", n_blocks=2, rank=1, input_gram=G, output_gram=H).reconstruction
            np.testing.assert_allclose(merged[module], want, rtol=0, atol=2e-5 * np.abs(dW).max(), err_msg=module)
            E = dW - merged[module]
            direct = math.sqrt(np.sum((H @ E) * (E @ G)) / np.sum((H @ dW) * (dW @ G)))
            assert report.layers[module]["output_error"] == pytest.approx(direct, rel=1e-4), module
            assert report.layers[module]["metric"] == fitted
        assert f"{len(gpt2['modules'])} {'plain' if fitted == 'plain' else 'in both'}" in report.summary()


def test_metric_choices_are_refused_where_they_cannot_apply(bert, gpt2, tmp_path):
    """Claims: a metric needs calibration; "output"/"both" need an H for every layer (bert's file has none):
    one line naming the file, before anything is written; an unknown metric is refused by Python and by
    the command line (exit 2); "input" on a file with H fits in G alone."""
    cases = [
        (dict(metric="input"), "metric='input' fits in the data metric of calibration: pass calibration too"),
        (dict(metric="both", calibration=bert["stats"]), f"{bert['stats']}: metric='both' needs an output Gram H"),
        (dict(metric="output", calibration=bert["stats"]), "needs an output Gram H for every layer"),
        (dict(metric="whitened", calibration=bert["stats"]), "metric must be one of auto, plain, input"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            extract_adapter(bert["base_dir"], bert["ft_dir"], tmp_path / "a", rank=2, **kw)
        assert "\n" not in str(info.value)
        assert not (tmp_path / "a").exists()
    rc, _, err = cli(["extract", bert["base_dir"], bert["ft_dir"], "--out", tmp_path / "a", "--rank", "2",
                      "--calibration", bert["stats"], "--metric", "both"])  # fmt: skip
    assert rc == 2 and "--metric both" in err and err.count("\n") == 1, err
    rc, _, err = cli(["extract", bert["base_dir"], bert["ft_dir"], "--out", tmp_path / "a", "--metric", "x"])
    assert rc == 2 and "--metric" in err and not (tmp_path / "a").exists()
    report = extract_adapter(gpt2["base_dir"], gpt2["ft_dir"], tmp_path / "g", rank=2, calibration=gpt2["stats"],
                             metric="input")  # fmt: skip
    merged = _peft_deltas(gpt2, tmp_path / "g")
    for module in gpt2["modules"]:
        dW, G = _delta(gpt2, module), _gram(gpt2["stats"], module)
        want = whitened(dW, _damped(G, 0.01), 2)[0]  # the default damping: this file's G is singular
        np.testing.assert_allclose(merged[module], want, rtol=0, atol=2e-5 * np.abs(dW).max())
        assert report.layers[module]["metric"] == "input"


# ---------------------------------------------------------------------------- (e) one budget over the model
def test_model_wide_budget_by_output_error_is_no_worse_in_the_metric(gpt2, tmp_path):
    """Claim: with calibration, --total-budget minimises the sum of the layers' relative squared output
    errors: evaluated directly on the recaptured inputs (a layer left out counts 1), that sum is at most
    the plain allocation's (gram_damping=0, global fits: the allocation is exact, and so are the fits)."""
    total = 3 * sum(sum(_delta(gpt2, m).shape) for m in gpt2["modules"])
    cal = extract_adapter(gpt2["base_dir"], gpt2["ft_dir"], tmp_path / "c", total_budget=total,
                          calibration=gpt2["stats_g"], gram_damping=0.0)  # fmt: skip
    plain = extract_adapter(gpt2["base_dir"], gpt2["ft_dir"], tmp_path / "p", total_budget=total)
    assert cal.allocation["exact"] is True and "output errors" in cal.allocation["rule"]
    assert "Frobenius" in plain.allocation["rule"]
    assert cal.n_params <= total and plain.n_params <= total
    X = _inputs(gpt2, gpt2["modules"])
    sums = {}
    for name, rep, folder in (("cal", cal, tmp_path / "c"), ("plain", plain, tmp_path / "p")):
        merged = _peft_deltas(gpt2, folder)
        sums[name] = 0.0
        for module in gpt2["modules"]:
            M = merged[module] if module in rep.layers else 0.0
            sums[name] += _output_error(_delta(gpt2, module), M, X[module]) ** 2
            if module in rep.layers and name == "cal":
                assert rep.layers[module]["output_error"] ** 2 == pytest.approx(
                    _output_error(_delta(gpt2, module), M, X[module]) ** 2, rel=1e-4
                )
    assert sums["cal"] <= sums["plain"] * (1 + 1e-6), sums
    assert [v["ranks"] for v in cal.layers.values()] != [v["ranks"] for v in plain.layers.values()]


# ---------------------------------------------------------------------------- (f) statistics that do not fit
def _read(path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), framework="numpy") as f:
        return load_file(str(path)), dict(f.metadata())


def _forged(src, dst, edit):
    """``src``'s tensors and metadata, changed by ``edit(tensors, metadata)``, written to ``dst``."""
    tensors, meta = _read(src)
    edit(tensors, meta)
    return save_file(dst, tensors, metadata=meta)


def _first_site(meta):
    return next(iter(json.loads(meta["input_counts"])))


def _set(tensors, meta, value):
    tensors[f"G.{_first_site(meta)}"] = value


def _meta(key, change):
    def edit(tensors, meta):
        meta[key] = change(meta)

    return edit


def _counts(change):
    def apply(meta):
        counts = json.loads(meta["input_counts"])
        change(counts)
        return json.dumps(counts)

    return apply


SITE = "encoder.layer.0.attention.self.query"


def _h_counted_apart(tensors, meta):
    """An H for the query layer counted over one token more than its site's G."""
    tensors[f"H.{SITE}"] = np.eye(32)
    meta["output_counts"] = json.dumps({SITE: json.loads(meta["input_counts"])[SITE] + 1})


HOSTILE = {
    # case: (how the file is made from the good one, words the one-line message must hold)
    "wrong shape": (lambda t, m: _set(t, m, np.eye(33)), ["'G.", "33"]),
    "NaN": (lambda t, m: _set(t, m, np.full((32, 32), np.nan)), ["'G.", "NaN"]),
    "inf": (lambda t, m: _set(t, m, np.diag([np.inf] + [1.0] * 31)), ["'G.", "infinite"]),
    "not PSD": (lambda t, m: _set(t, m, np.diag([1.0] * 31 + [-0.5])), ["'G.", "positive semi-definite"]),
    "all zero": (lambda t, m: _set(t, m, np.zeros((32, 32))), ["'G.", "zero"]),
    "zero samples": (_meta("input_counts", _counts(lambda c: c.update({SITE: 0}))), ["'G.", "zero samples"]),
    "count missing": (_meta("input_counts", _counts(lambda c: c.pop(SITE))), ["'G.", "not listed"]),
    "count without entry": (_meta("input_counts", _counts(lambda c: c.update({"x": 3}))), ["'x'", "no entry"]),
    "count not an integer": (_meta("input_counts", _counts(lambda c: c.update({SITE: 2.5}))), [SITE, "integer"]),
    "bad JSON": (_meta("layer_sites", lambda m: "{'a': 1"), ["layer_sites"]),
    "layer mapped to no site": (
        _meta("layer_sites", lambda m: json.dumps({**json.loads(m["layer_sites"]), f"{SITE[:-5]}value": "nowhere"})),
        ["layer_sites", "G.nowhere"],
    ),
    "another format": (_meta("format", lambda m: "pt"), ["'format'"]),
    "H counts disagree": (_h_counted_apart, ["'output_counts'", SITE, "same tokens"]),
}


def _hostile_file(bert, folder, case):
    path = folder / "stats.safetensors"
    if case == "missing layer":  # collected on q/k/v only
        stats = collect_statistics(bert["tuned"], bert["batches"], target_modules=["query", "key", "value"],
                                   progress=False)  # fmt: skip
        return save_statistics(path, stats), ["layer 'encoder.layer.0.attention.output.dense'", "no input statistics"]
    if case == "not safetensors":
        path.write_text("G = [[1, 0], [0, 1]]\n")
        return path, []
    if case == "dtype lie":  # a float64 entry whose header says float32: its bytes and its shape disagree
        raw = bert["stats"].read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = raw[8 : 8 + n].replace(b'"dtype":"F64"', b'"dtype":"F32"', 1)
        path.write_bytes(raw[:8] + header + raw[8 + n :])
        return path, ["'G.", "bytes"]
    edit, words = HOSTILE[case]
    return _forged(bert["stats"], path, edit), words


CASES = list(HOSTILE) + ["missing layer", "not safetensors", "dtype lie"]


@pytest.mark.parametrize("case", CASES)
def test_statistics_that_do_not_fit_are_refused_in_one_line_before_anything_is_written(bert, tmp_path, case):
    """Claim: extract (and its dry run) and the study refuse such a file with a CalibrationError of one
    line that starts with the file and names the entry, and write nothing: no adapter, no report, no
    study folder."""
    path, words = _hostile_file(bert, tmp_path, case)
    for name, run in {
        "extract": lambda: extract_adapter(bert["base_dir"], bert["ft_dir"], tmp_path / "a", rank=2, calibration=path),
        "study": lambda: _study(bert, tmp_path / "s", path),
    }.items():
        with pytest.raises(CalibrationError) as info:
            run()
        message = str(info.value)
        assert "\n" not in message and message.startswith(str(path)), (name, message)
        for word in words:
            assert word in message, (name, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]
    rc, out, err = cli(["extract", bert["base_dir"], bert["ft_dir"], "--rank", "2", "--calibration", path, "--dry-run"])
    assert rc == 2 and err.count("\n") == 1 and str(path) in err, err


def test_an_embedding_or_a_damping_without_statistics_is_refused_by_name(gpt2, tmp_path):
    from blocklowrank import OptionError

    with pytest.raises(OptionError, match="transformer.wte.*embedding"):
        extract_adapter(gpt2["base_dir"], gpt2["ft_dir"], tmp_path / "a", rank=2, calibration=gpt2["stats"],
                        target_modules=["wte", "c_fc"])  # fmt: skip
    with pytest.raises(OptionError, match="gram_damping.*calibration"):
        extract_adapter(gpt2["base_dir"], gpt2["ft_dir"], tmp_path / "a", rank=2, gram_damping=0.1)
    rc, _, err = cli(["study", gpt2["base_dir"], gpt2["ft_dir"], "--out", tmp_path / "s", "--gram-damping", "0.1"])
    assert rc == 2 and "--gram-damping" in err and "--calibration" in err and err.count("\n") == 1, err
    rc, _, err = cli(["extract", gpt2["base_dir"], gpt2["ft_dir"], "--out", tmp_path / "a", "--rank", "2",
                      "--calibration", gpt2["stats"], "--gram-damping", "-1"])  # fmt: skip
    assert rc == 2 and "--gram-damping" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- the study
def _study(setup, out, stats, **kw):
    from blocklowrank.study import run_study

    kw = {"structures": ["global", "block"], "n_blocks": [2], "budget_rank": 2, "progress": False, **kw}
    return run_study(setup["base_dir"] / "model.safetensors", setup["ft_dir"] / "model.safetensors", out=out,
                     calibration=stats, **kw)  # fmt: skip


def _metric_error(dW, M, G):
    """sqrt(tr(E G Eᵀ) / tr(ΔW G ΔWᵀ)), E = ΔW - M: the relative output error from G, directly."""
    E = dW - M
    return math.sqrt(np.sum(E * (E @ G)) / np.sum(dW * (dW @ G)))


def test_the_study_fits_every_configuration_in_the_metric(bert, tmp_path):
    """Claims: layers.csv carries output_error beside error; the global row at rank 2 has the output error
    of the whitened fit (damped G, error measured in the undamped one) and the Frobenius error of that fit;
    ``best`` is the least output error of its layer and structure; the model-wide allocation is by output
    error (measure "output"), exact for global and never worse than uniform there; a plain study leaves
    output_error blank."""
    import csv

    res = _study(bert, tmp_path / "s", bert["stats"])
    with open(tmp_path / "s" / "layers.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["output_error"] not in ("", None) for r in rows)
    for module in bert["modules"]:
        dW, G = _delta(bert, module), _gram(bert["stats"], module)
        M = whitened(dW, _damped(G, 0.01), 2)[0]
        (row,) = [r for r in res if r["layer"] == module and r["structure"] == "global" and r["rank"] == 2]
        assert row["output_error"] == pytest.approx(_metric_error(dW, M, G), rel=1e-4)
        assert row["error"] == pytest.approx(np.linalg.norm(dW - M) / np.linalg.norm(dW), rel=1e-4)
        for structure in ("global", "block"):
            mine = [r for r in res if r["layer"] == module and r["structure"] == structure]
            (best,) = [r for r in mine if r["best"]]
            assert best["output_error"] == min(r["output_error"] for r in mine)
    wide = {(r["structure"], r["allocation"]): r for r in res.model_wide}
    assert {r["measure"] for r in res.model_wide} == {"output"}
    assert wide[("global", "model-wide")]["exact"] is True
    assert wide[("global", "model-wide")]["error"] <= wide[("global", "uniform")]["error"] + 1e-12
    summary = (tmp_path / "s" / "summary.md").read_text()
    assert "relative output error" in summary and str(bert["stats"]) in summary
    plain = _study(bert, tmp_path / "p", None)
    assert all(r["output_error"] is None for r in plain) and {r["measure"] for r in plain.model_wide} == {"frobenius"}
    with open(tmp_path / "p" / "layers.csv", newline="") as f:
        assert {r["output_error"] for r in csv.DictReader(f)} == {""}


def test_a_resume_with_other_statistics_or_damping_is_refused(bert, tmp_path):
    """Claim: study.json records the statistics file (hashed among the inputs) and gram_damping: the same
    run resumes; other statistics in the same file, or another damping, are refused in one line and the
    study folder is left as it was."""
    from _real import tree

    stats = tmp_path / "stats.safetensors"
    stats.write_bytes(bert["stats"].read_bytes())
    _study(bert, tmp_path / "s", stats)
    settings = json.loads((tmp_path / "s" / "study.json").read_text())
    assert settings["calibration"] == str(stats.resolve()) and settings["gram_damping"] == 0.01
    assert any(f["path"] == str(stats.resolve()) and "sha256" in f for f in settings["inputs"])
    _study(bert, tmp_path / "s", stats)  # the same inputs and settings: resumed
    before = tree(tmp_path / "s")
    with pytest.raises(ValueError, match="other settings.*gram_damping"):
        _study(bert, tmp_path / "s", stats, gram_damping=0.1)
    other = collect_statistics(bert["base"], bert["batches"], progress=False)  # the base model's statistics
    save_statistics(stats, other, overwrite=True)
    with pytest.raises(ValueError, match="other inputs") as info:
        _study(bert, tmp_path / "s", stats)
    assert str(stats.resolve()) in str(info.value) and "\n" not in str(info.value)
    assert tree(tmp_path / "s") == before


# ---------------------------------------------------------------------------- (g) the command line
def test_calibrate_then_extract_and_study_on_the_command_line(gpt2, tmp_path):
    """`blocklowrank calibrate` then `extract --calibration` in subprocesses, `study --calibration` in
    process: the adapter's report holds output_error for every layer and the file it was fitted in; the
    study prints output errors; --help says what the flags do."""
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.random.default_rng(3).integers(0, 96, size=60))
    stats, adapter = tmp_path / "stats.safetensors", tmp_path / "adapter"
    run = [sys.executable, "-m", "blocklowrank"]
    done = subprocess.run([*run, "calibrate", str(gpt2["ft_dir"]), "--tokens", str(tokens), "--max-length", "12",
                           "--out", str(stats), "-q"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = subprocess.run([*run, "extract", str(gpt2["base_dir"]), str(gpt2["ft_dir"]), "--rank", "2", "--calibration",
                           str(stats), "--gram-damping", "0.05", "--out", str(adapter), "--json", "-q"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["calibration"]["file"] == str(stats) and report["calibration"]["gram_damping"] == 0.05
    assert sorted(report["layers"]) == sorted(gpt2["modules"])
    assert all(0 < v["output_error"] < 1 for v in report["layers"].values())
    assert json.loads((adapter / "extract_report.json").read_text())["calibration"] == report["calibration"]
    rc, out, err = cli(["study", gpt2["base_dir"], gpt2["ft_dir"], "--out", tmp_path / "s", "--calibration", stats,
                        "--structures", "global", "--n-blocks", "2", "--budget-rank", "2", "-q"])  # fmt: skip
    assert rc == 0, err
    assert "model-wide output error" in out
    for command in ("extract", "study"):
        rc, out, _ = cli([command, "--help"])
        assert rc == 0 and "--calibration" in out and "--gram-damping" in out
    assert "relative output error" in " ".join(cli(["extract", "--help"])[1].split())


def test_max_error_targets_the_output_error_when_calibrated(bert, tmp_path):
    """Claim: with calibration, --max-error E gives every layer an output error of at most E (the undamped
    one, measured here from the file's G), with a Frobenius error above E on some layer (it is not the
    Frobenius target)."""
    report = extract_adapter(bert["base_dir"], bert["ft_dir"], tmp_path / "a", max_error=0.3,
                             calibration=bert["stats"])  # fmt: skip
    merged = _peft_deltas(bert, tmp_path / "a")
    for module in bert["modules"]:
        dW, G = _delta(bert, module), _gram(bert["stats"], module)
        assert _metric_error(dW, merged[module], G) <= 0.3 * (1 + 1e-4), module
    assert max(v["error"] for v in report.layers.values()) > 0.3


@pytest.mark.parametrize("method, kw", [("block", {"rank": 1, "n_blocks": 2}), ("hybrid", {"rank": 1, "n_blocks": 2,
                                                                                            "global_rank": 1})])  # fmt: skip
def test_a_plain_fit_s_output_error_is_measured_in_the_whole_metric_from_its_factors(gpt2, tmp_path, method, kw):
    """Claim: with metric="plain", a K x K (block factors) or hybrid (dense) adapter's output_error is
    sqrt(tr(H E G Eᵀ) / tr(H ΔW G ΔWᵀ)) of what PEFT merges, with the file's undamped G and H."""
    from safetensors.numpy import load_file

    tensors = load_file(str(gpt2["stats"]))
    report = extract_adapter(gpt2["base_dir"], gpt2["ft_dir"], tmp_path / "a", method=method, calibration=gpt2["stats"],
                             metric="plain", **kw)  # fmt: skip
    merged = _peft_deltas(gpt2, tmp_path / "a")
    for module in gpt2["modules"]:
        dW, G, H = _delta(gpt2, module), _gram(gpt2["stats"], module), tensors[f"H.{module}"]
        E = dW - merged[module]
        direct = math.sqrt(np.sum((H @ E) * (E @ G)) / np.sum((H @ dW) * (dW @ G)))
        assert report.layers[module]["output_error"] == pytest.approx(direct, rel=1e-4), module
        assert report.layers[module]["metric"] == "plain"

"""The MiniLM verdicts' code paths, on a tiny random BERT standing in for all-MiniLM-L6-v2.

The stand-in (2 layers, hidden 32, MiniLM's tokenizer) and a made-up
"fine-tune" that changes only the 12 encoder linears, by a rank-2 update
each. What is claimed:

- adapters are written, loaded through PEFT and merged (the experiment checks
  every merged weight against ``W_base + M``), and a global fit that holds the
  exact update scores exactly like the fine-tune (same predictions, KL 0);
- the training statistics merged from the two calibration parts equal one
  collection over all training sentences (a count-weighted mean, up to the
  float32 rounding of batches padded differently);
- the sequential (layer-by-layer) calibration runs with and without ``H``;
- the run is resumable and writes its tables and figure;
- every structure spends ``r (m + n)`` parameters per layer.

torch, transformers and peft are required with ``BLOCKLOWRANK_TEST_PEFT=1``
(``make test``), else the torch tests are skipped without them.
"""

import json
import os
import shutil

import numpy as np
import pytest
from _real import minilm_checkpoint_or_skip

from blocklowrank.checkpoints import save_file
from blocklowrank.experiments import minilm_metric as mm
from blocklowrank.experiments import realweights as rw

REQUIRED = os.environ.get("BLOCKLOWRANK_TEST_PEFT") == "1" or os.environ.get("BLOCKLOWRANK_TEST_REAL_DATA") == "1"
TOPICS = 4


def test_every_structure_spends_the_lora_budget():
    """Claim: at LoRA-equivalent rank r every structure's fit has exactly r (m + n) parameters per layer."""
    rng = np.random.default_rng(0)
    deltas = {
        "a": rng.standard_normal((128, 64)),
        "b": rng.standard_normal((64, 128)),
        "c": rng.standard_normal((64, 64)),
    }
    for structure in mm.STRUCTURES:
        for r in (4, 8):
            fits = mm.fit_layers(deltas, structure, r, n_jobs=1)
            for layer, fit in fits.items():
                assert fit.n_params == r * sum(deltas[layer].shape), (structure, r, layer)
    with pytest.raises(ValueError, match="multiple of K=4"):
        mm.block_rank("block4", 6)
    with pytest.raises(ValueError, match="needs calibration statistics"):
        mm.fit_layers(deltas, "global", 4, "input")


def test_default_specs():
    specs = mm.default_specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names)) == 3 * 4 * 4 + 5
    assert "global-r16-both-sequential" in names and "block2-r16-input-test" in names


def _modules():
    if REQUIRED:
        import peft  # noqa: F401
        import torch
        import transformers
    else:
        torch = pytest.importorskip("torch")
        transformers = pytest.importorskip("transformers")
        pytest.importorskip("peft")
        pytest.importorskip("tokenizers")
    return torch, transformers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(base model.safetensors, fine-tune folder) of a tiny random BERT with MiniLM's tokenizer."""
    torch, transformers = _modules()
    minilm = minilm_checkpoint_or_skip(REQUIRED)
    root = tmp_path_factory.mktemp("tiny_bert")
    base_dir, tuned_dir = root / "base", root / "finetuned"
    base_dir.mkdir()
    tuned_dir.mkdir()
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = transformers.BertModel(config, add_pooling_layer=True)
    base = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    save_file(base_dir / "model.safetensors", base)
    config.to_json_file(str(base_dir / "config.json"))
    shutil.copy(minilm.parent / "tokenizer.json", base_dir / "tokenizer.json")
    rng = np.random.default_rng(1)
    tuned = dict(base)
    for name in base:
        if name.startswith("encoder.layer.") and name.endswith(".weight") and base[name].ndim == 2:
            m, n = base[name].shape
            update = rng.standard_normal((m, 2)) @ rng.standard_normal((2, n)) * 0.05  # rank 2
            tuned[name] = (base[name] + update).astype(np.float32)
    save_file(tuned_dir / "model.safetensors", tuned)
    head = {"weight": rng.standard_normal((TOPICS, 32)).astype(np.float32), "bias": np.zeros(TOPICS, np.float32)}
    save_file(tuned_dir / "head.safetensors", head)
    topics = rw.pydoc_topic_sentences(TOPICS)["topics"]
    record = {"settings": {"max_length": 16, "n_topics": TOPICS, "seed": 0}, "topics": topics}
    (tuned_dir / "finetune.json").write_text(json.dumps(record))
    return base_dir / "model.safetensors", tuned_dir


SPECS = [
    mm.Spec("global", 4, "plain"),
    mm.Spec("global", 4, "input"),
    mm.Spec("block2", 4, "input"),
    mm.Spec("diagonal", 4, "output"),
    mm.Spec("block4", 4, "both"),
    mm.Spec("global", 4, "input", "sequential"),
    mm.Spec("block2", 4, "both", "sequential"),
    mm.Spec("global", 4, "input", "test"),
]


def test_run_on_a_tiny_bert(tiny, tmp_path):
    base, tuned = tiny
    res = mm.run_minilm_metric(tmp_path, tuned, specs=SPECS, subset=24, base=base, progress=False)
    runs = res["runs"]
    assert set(runs) == {"finetuned", "base", "exact"} | {s.name for s in SPECS}
    # only the 12 linears changed: base + exact ΔW is the fine-tune, and a rank-4 LoRA holds each rank-2 update
    assert runs["exact"]["pred"] == runs["finetuned"]["pred"] and runs["exact"]["kl"] < 1e-8
    lora = runs["global-r4-plain"]
    assert lora["pred"] == runs["finetuned"]["pred"] and lora["kl"] < 1e-6 and lora["peft_type"] == "LORA"
    assert max(v["error"] for v in lora["layers"].values()) < 1e-5
    assert runs["block2-r4-input"]["peft_type"] == "GRALORA"
    for spec in SPECS:
        rec = runs[spec.name]
        assert rec["n_params"] == sum(4 * (m + n) for m, n in [(32, 32)] * 8 + [(64, 32), (32, 64)] * 2)
        assert 0 <= rec["accuracy"] <= 1 and len(rec["layers"]) == 12
    for name in ("minilm_metric.csv", "minilm_layers.csv", "minilm_metric_summary.txt", "minilm_metric.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "minilm_metric.png").stat().st_size > 10_000
    assert "calibrated layer by layer" in res["summary"] and "calibrated on the test sentences" in res["summary"]
    assert [v["id"] for v in res["diagnostics"]["sequential"]] == ["global-r4-input-sequential"]
    lines = (tmp_path / "runs.jsonl").read_text().count("\n")
    again = mm.run_minilm_metric(tmp_path, tuned, specs=SPECS[:2], subset=24, base=base, progress=False)
    assert (tmp_path / "runs.jsonl").read_text().count("\n") == lines  # resumed: nothing refitted
    assert set(again["runs"]) == {"finetuned", "base", "exact", SPECS[0].name, SPECS[1].name}


def test_merged_calibration_parts_equal_one_collection(tiny, tmp_path):
    from blocklowrank.calibration import load_statistics
    from blocklowrank.experiments._minilm_torch import MiniLMTask

    base, tuned = tiny
    mm.run_minilm_metric(tmp_path, tuned, specs=[], subset=24, base=base, progress=False)
    task = MiniLMTask(tuned, base=base, subset=24)
    whole = task.collect(task.model_with(tuned=True), "train", output=True)
    with (
        load_statistics(tmp_path / "calibration" / "cal.safetensors") as cal,
        load_statistics(tmp_path / "calibration" / "val.safetensors") as val,
    ):
        merged = mm.merge_statistics(cal, val)
        for site in whole.sites:
            assert merged.input_counts[site] == whole.input_counts[site]
            np.testing.assert_allclose(merged.site_gram(site), whole.site_gram(site), rtol=1e-5, atol=1e-7)
        for layer in whole.output_layers:
            want = whole.output_gram(layer)
            np.testing.assert_allclose(merged.output_gram(layer), want, rtol=1e-5, atol=1e-7 * np.abs(want).max())


def test_versus_lora_pairs_each_block_fit_with_lora_plain_at_its_rank():
    """Claim: each block structure's fit (plain and both metrics) is compared with LoRA's plain fit of the same
    rank on the same sentences: the difference of accuracies and the exact McNemar p-value of the discordant
    pairs (recomputed here with SciPy's binomial test)."""
    from scipy.stats import binomtest

    from blocklowrank.experiments._minilm_report import versus_lora

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)

    def rec(structure, rank, metric, calibration="train"):
        pred = np.where(rng.random(200) < 0.6, y, (y + 1) % 4)
        return {"kind": "adapter", "structure": structure, "rank": rank, "metric": metric,
                "calibration": calibration, "pred": pred.tolist(), "accuracy": float(np.mean(pred == y))}  # fmt: skip

    specs = [("global", 8, "plain"), ("global", 8, "both"), ("block2", 8, "both"), ("block2", 8, "input")]
    specs += [("diagonal", 16, "plain"), ("global", 16, "plain"), ("block2", 8, "input", "sequential")]
    runs = {mm.Spec(*s).name: rec(*s) for s in specs}
    got = {v["id"]: v for v in versus_lora(runs, y)}
    assert set(got) == {"block2-r8-both", "diagonal-r16-plain"}
    for rid, v in got.items():
        lora = np.asarray(runs[f"global-r{runs[rid]['rank']}-plain"]["pred"]) == y
        mine = np.asarray(runs[rid]["pred"]) == y
        assert v["diff"] == pytest.approx(mine.mean() - lora.mean())
        b, c = int(np.sum(lora & ~mine)), int(np.sum(mine & ~lora))
        assert v["p_mcnemar"] == pytest.approx(binomtest(b, b + c, 0.5).pvalue)

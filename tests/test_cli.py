"""The command line: every subcommand, its --help, files in and out, one-line errors."""

import subprocess
import sys

import numpy as np
import pytest

from blocklowrank.cli import main


def run(args, capsys):
    """Exit code, stdout and stderr of the command line (argparse's own refusals included)."""
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("sub", [[], ["reproduce"], ["approximate"], ["budget"]])
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as exc:
        main(sub + ["--help"])
    assert exc.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_python_dash_m_runs():
    proc = subprocess.run([sys.executable, "-m", "blocklowrank", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "blocklowrank" in proc.stdout


@pytest.mark.parametrize("suffix", [".npy", ".csv", ".npz"])
def test_approximate_files(tmp_path, capsys, suffix):
    X = np.random.default_rng(0).standard_normal((12, 10))
    src = tmp_path / f"m{suffix}"
    if suffix == ".npy":
        np.save(src, X)
    elif suffix == ".csv":
        np.savetxt(src, X, delimiter=",")
    else:
        np.savez(src, W=X)
    out = tmp_path / "rec.npy"
    code, text, _ = run(
        ["approximate", str(src), "--method", "block", "--n-blocks", "2", "--rank", "2", "--out", str(out)], capsys
    )
    assert code == 0
    assert "parameters  88" in text  # 2 * 2 * (12 + 10)
    rec = np.load(out)
    # independent reference: per-block truncated SVD
    ref = np.zeros_like(X)
    for rs in (slice(0, 6), slice(6, 12)):
        for cs in (slice(0, 5), slice(5, 10)):
            U, s, Vt = np.linalg.svd(X[rs, cs])
            ref[rs, cs] = (U[:, :2] * s[:2]) @ Vt[:2]
    assert np.allclose(rec, ref)
    err = np.linalg.norm(X - ref) / np.linalg.norm(X)
    assert f"{err:.6f}" in text


def test_approximate_image_and_budget(tmp_path, capsys):
    import matplotlib.pyplot as plt

    img = np.random.default_rng(1).random((16, 16))
    src = tmp_path / "img.png"
    plt.imsave(src, img, cmap="gray")
    code, text, _ = run(
        [
            "approximate",
            str(src),
            "--method",
            "block",
            "--n-blocks",
            "2",
            "--budget",
            "128",
            "--out",
            str(tmp_path / "o.png"),
        ],
        capsys,
    )
    assert code == 0 and (tmp_path / "o.png").exists()
    assert "ranks" in text


def test_approximate_tol_and_global(tmp_path, capsys):
    X = np.random.default_rng(2).standard_normal((10, 10))
    np.save(tmp_path / "a.npy", X)
    code, text, _ = run(
        [
            "approximate",
            str(tmp_path / "a.npy"),
            "--method",
            "global",
            "--max-error",
            "0.5",
            "--out",
            str(tmp_path / "b.npy"),
        ],
        capsys,
    )
    assert code == 0 and "structure   global, 1x1 blocks" in text


@pytest.mark.parametrize(
    "args, needle",
    [
        (["approximate", "nope.npy", "--rank", "1"], "no such file"),
        (["approximate", "{bad}", "--rank", "99"], "exceeds"),
        (["approximate", "{bad}", "--rank", "1", "--n-blocks", "50"], "n_blocks"),
        (["approximate", "{bad}", "--max-error", "1.5"], "--max-error must be a number in (0, 1)"),
        (["approximate", "{bad}", "--budget", "3"], "budget"),
        (["budget", "28x", "224"], "SHAPE"),
    ],
)
def test_errors_are_one_line(args, needle, tmp_path, capsys):
    bad = tmp_path / "x.npy"
    np.save(bad, np.ones((8, 8)))
    args = [a.replace("{bad}", str(bad)) for a in args]
    code, _, err = run(args, capsys)
    assert code == 2
    assert err.startswith("blocklowrank: error:")
    assert needle in err
    assert "Traceback" not in err


def test_nan_file_is_a_clear_error(tmp_path, capsys):
    X = np.ones((5, 5))
    X[0, 0] = np.nan
    np.save(tmp_path / "n.npy", X)
    code, _, err = run(["approximate", str(tmp_path / "n.npy"), "--rank", "1"], capsys)
    assert code == 2 and "NaN" in err


def test_budget_paper_example(capsys):
    code, text, _ = run(["budget", "28x28", "224"], capsys)
    assert code == 0
    lines = [l.split() for l in text.splitlines()]
    assert ["global", "1", "4", "224", "yes"] in lines
    assert ["diagonal", "4", "4", "224", "yes"] in lines
    assert ["block", "2", "2", "224", "yes"] in lines


def test_reproduce_defaults_use_every_core_and_converge(tmp_path, monkeypatch):
    """`make reproduce` runs `reproduce all` with no options: the adapter sweep must use every
    core (one BLAS thread per run), three seeds and the protocol's own epoch cap (early stopping)."""
    import blocklowrank.experiments.figure2 as f2

    seen = {}
    monkeypatch.setattr(f2, "run_figure2", lambda out, **kw: seen.update(kw) or {})
    monkeypatch.setattr(f2, "plot_figure2", lambda *a, **k: None)
    assert main(["reproduce", "figure2", "--out", str(tmp_path), "-q"]) == 0
    assert seen["n_jobs"] == -1 and seen["epochs"] == f2.DEFAULT_EPOCHS and seen["seeds"] == 3
    with pytest.raises(SystemExit):  # the part must be named: no 25-minute default
        main(["reproduce"])


@pytest.mark.parametrize(
    "opt",
    [["--n-jobs", "0"], ["--budget-rank", "-2"], ["--total-budget", "0"], ["--max-iter", "0"], ["--max-iter", "-3"]],
)
def test_study_options_are_validated(tmp_path, opt, capsys):
    """Nonsense counts are refused in one line before any checkpoint is read."""
    with pytest.raises(SystemExit) as exc:
        main(["study", str(tmp_path / "base.safetensors"), "--out", str(tmp_path / "o"), *opt])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and opt[0] in err[0]

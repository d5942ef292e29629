"""Execute notebooks/02_adapters.ipynb on a small subset (no Jupyter kernel needed)."""

import json
from pathlib import Path

import pytest

NB = Path(__file__).resolve().parent.parent / "notebooks" / "02_adapters.ipynb"


def test_notebook_has_no_outputs():
    nb = json.loads(NB.read_text())
    assert nb["nbformat"] == 4
    assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")


def test_notebook_02_adapters_runs(monkeypatch, tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setenv("BLOCKLOWRANK_NB_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    nb = json.loads(NB.read_text())
    ns = {"__name__": "__main__"}
    try:
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] != "code":
                continue
            src = "".join(cell["source"])
            exec(compile(src, f"{NB.name}[cell {i}]", "exec"), ns)
    finally:
        plt.close("all")
    assert set(ns["results"]) == {"LoRA r=4", "MELoRA N=4, r=4", "Localized K=2, r=2", "Full FT"}
    assert len({ad.n_params for ad in ns["adapters"].values()}) == 1
    assert ns["sweep"].selected

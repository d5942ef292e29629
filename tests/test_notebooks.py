"""Execute every notebook in notebooks/ with Jupyter's own executor, so that API drift breaks the build.

Each notebook runs in a fresh IPython kernel (``nbclient`` with ``ipykernel``,
the ``notebooks`` extra) in a temporary directory, with the Agg backend and
``BLOCKLOWRANK_NB_FAST=1`` so the notebooks shrink their data. A failing cell
fails the test with the cell's traceback.
"""

import json
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= {"01_structured_approximation.ipynb", "02_adapters.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_has_no_outputs(path):
    """Notebooks are committed without outputs (they are built by notebooks/build_*.py)."""
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4
    assert all(
        not c.get("outputs") and c.get("execution_count") is None for c in nb["cells"] if c["cell_type"] == "code"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    """Every cell runs in a kernel; no cell writes an error, and a progress bar is a widget (ipywidgets)."""
    monkeypatch.setenv("BLOCKLOWRANK_NB_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert outputs, "the notebook produced no output at all"
    assert not [o for o in outputs if o.output_type == "error"]
    stderr = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stderr")
    assert "IProgress not found" not in stderr, stderr[-2000:]
    if "progress=True" in path.read_text():  # the sweep's bar is a widget, not a warning
        assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)

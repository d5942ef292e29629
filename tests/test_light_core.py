"""A light core: the library loads no optional dependency, and a missing extra costs one line.

The core needs NumPy, SciPy, scikit-learn, joblib and threadpoolctl. Figures
(matplotlib, the ``plots`` extra), the MNIST download (pooch, ``data``),
progress bars (tqdm, ``progress``) and the Hugging Face cache
(huggingface_hub, ``hub``) are extras; torch and transformers only ever run
in the experiments' own processes and the tests. Each check runs in a fresh
interpreter, so that what this test process has imported does not count.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import blocklowrank
from blocklowrank._extras import EXTRAS

ROOT = str(Path(blocklowrank.__file__).resolve().parent.parent)
OPTIONAL = ("matplotlib", "pooch", "tqdm", "torch", "transformers", "pandas", "hypothesis", "huggingface_hub")
#: Every core and file-I/O module a user of the library (not of the experiments) imports.
LIBRARY = (
    "blocklowrank",
    "blocklowrank.checkpoints",
    "blocklowrank.peft",
    "blocklowrank.study",
    "blocklowrank.extract",
    "blocklowrank.estimators",
    "blocklowrank.structures",
    "blocklowrank.budget",
    "blocklowrank.compare",
    "blocklowrank.convert",
    "blocklowrank.adapters",
    "blocklowrank.sweep",
)
#: Makes ``import NAME`` (and its submodules) fail in the child process as when NAME is not installed.
BLOCK = """
import sys

class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {names!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
"""


def _run(code, blocked=()):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = BLOCK.format(names=tuple(blocked)) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)


def test_the_library_loads_no_optional_dependency():
    # scikit-learn imports pandas itself when it is installed (sklearn.utils.fixes): what the core
    # dependencies load before the library is imported is not the library's doing
    proc = _run(
        f"""
        import importlib, sys
        import joblib, scipy.linalg, scipy.optimize, sklearn.base, sklearn.cluster, sklearn.utils.validation
        import threadpoolctl
        before = set(sys.modules)
        import blocklowrank
        for module in {LIBRARY!r}:
            importlib.import_module(module)
        for name in blocklowrank.__all__:  # the root's lazy exports, every one of them
            getattr(blocklowrank, name)
        print(" ".join(sorted(m for m in {OPTIONAL!r} if m in set(sys.modules) - before)))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"loaded by the library: {proc.stdout.strip()}"


def test_import_blocklowrank_loads_no_submodule_and_no_scikit_learn():
    proc = _run(
        """
        import sys, blocklowrank
        print(sorted(m for m in sys.modules if m.startswith(("blocklowrank.", "sklearn", "scipy"))))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['blocklowrank._version']"


def test_the_library_works_without_any_extra():
    proc = _run(
        """
        import numpy as np
        from blocklowrank import approximate, compare_at_budget
        X = np.random.default_rng(0).standard_normal((12, 12))
        print(approximate(X, method="block", n_blocks=2, rank=1).n_params, len(compare_at_budget(X, 48)) > 0)
        """,
        blocked=OPTIONAL,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["48", "True"]


def _one_line_error(proc, extra, error="blocklowrank._extras.MissingExtraError"):
    """The child stopped with ``error``, whose message is one line naming ``extra``."""
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{error}: "), proc.stderr[-2000:]
    assert f"pip install 'blocklowrank[{extra}]'" in last


def test_the_study_needs_the_plots_extra_for_its_figures_and_says_so_first(tmp_path):
    proc = _run(
        f"""
        import numpy as np
        from blocklowrank.checkpoints import save_file
        from blocklowrank.study import run_study
        rng = np.random.default_rng(0)
        base = save_file({str(tmp_path / "base.safetensors")!r}, {{"l.q_proj.weight": rng.standard_normal((8, 8))}})
        run_study(base, structures=["global"], budget_rank=1, n_blocks=[2], progress=False, out={str(tmp_path / "s")!r})
        """,
        blocked=("matplotlib",),
    )
    _one_line_error(proc, "plots")
    assert not (tmp_path / "s").exists()  # refused before any work


def test_the_study_report_without_matplotlib_says_which_extra(tmp_path):
    proc = _run(
        f"""
        from blocklowrank.study import plot_error_heatmap
        plot_error_heatmap(None, {str(tmp_path / "h.png")!r})
        """,
        blocked=("matplotlib",),
    )
    _one_line_error(proc, "plots")


def test_load_mnist_without_pooch_says_which_extra(tmp_path):
    # no data directory and an empty cache: only a download could help, and it needs the data extra
    proc = _run(
        f"""
        import os
        os.environ["BLOCKLOWRANK_DATA"] = {str(tmp_path / "data")!r}
        from blocklowrank.datasets import load_mnist
        load_mnist(cache_dir={str(tmp_path / "cache")!r})
        """,
        blocked=("pooch",),
    )
    _one_line_error(proc, "data", error="blocklowrank.datasets.MNISTNotAvailableError")


def test_a_sweep_without_tqdm_warns_once_and_finishes(tmp_path):
    proc = _run(
        f"""
        from blocklowrank.sweep import RunLog, epoch_progress, run_sweep

        def task(t, progress=False, live=False):
            with epoch_progress(t["id"], 3, enabled=live) as callback:
                pass
            return {{"value": t["x"] ** 2, "summary": "ok"}}

        tasks = [{{"id": str(x), "x": x}} for x in range(3)]
        done = run_sweep(tasks, task, RunLog({str(tmp_path / "log.jsonl")!r}), progress=True)
        print(sorted(r["value"] for r in done.values()))
        """,
        blocked=("tqdm",),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[0, 1, 4]"
    warnings = [line for line in proc.stderr.splitlines() if "MissingExtra" in line or "tqdm" in line]
    assert len(warnings) == 1, proc.stderr
    assert "pip install 'blocklowrank[progress]'" in warnings[0] and "without one" in warnings[0]
    assert "[sweep] 3 runs: 0 already done, 3 to run" in proc.stderr  # the run's own lines still appear


def test_the_core_dependencies_are_five_and_the_extras_are_declared():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((Path(ROOT) / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]}
    assert core == {"numpy", "scipy", "scikit-learn", "joblib", "threadpoolctl"}
    extras = project["optional-dependencies"]
    for module in ("matplotlib", "pooch", "tqdm", "huggingface_hub"):  # what require() tells users to install
        extra = EXTRAS[module][0]
        assert any(dep.lower().startswith(module.lower()) for dep in extras[extra]), (module, extra)
    assert extras["experiments"] == ["blocklowrank[plots,data,progress]"]  # what `blocklowrank reproduce` needs


def test_the_command_line_help_imports_no_scikit_learn():
    proc = _run(
        """
        import contextlib, io, sys
        from blocklowrank.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
            main(["--help"])
        assert "approximate" in out.getvalue()
        print(sorted({m.split(".")[0] for m in sys.modules} & {"sklearn", "scipy", "matplotlib"}))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"

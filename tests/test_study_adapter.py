"""The study takes a PEFT adapter directory in place of a fine-tuned checkpoint."""

import numpy as np
import pytest

from blocklowrank import approximate
from blocklowrank.checkpoints import save_file
from blocklowrank.peft import save_peft_adapter
from blocklowrank.study import run_study

MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj")


def test_study_of_an_adapter_equals_the_study_of_base_plus_its_update(tmp_path):
    rng = np.random.default_rng(0)
    base = {m + ".weight": rng.standard_normal((16, 12)).astype(np.float32) for m in MODULES}
    fits = {m: approximate(rng.standard_normal((16, 12)), method="global", rank=3) for m in MODULES}
    ft = {name: (w + fits[name[: -len(".weight")]].reconstruction).astype(np.float32) for name, w in base.items()}
    save_file(tmp_path / "base.safetensors", base)
    save_file(tmp_path / "ft.safetensors", ft)
    save_peft_adapter(tmp_path / "adapter", fits, dtype=np.float32)
    kw = dict(structures=["global", "block"], budget_rank=2, n_blocks=[2], progress=False, svd_solver="full")
    via_adapter = run_study(tmp_path / "base.safetensors", tmp_path / "adapter", out=tmp_path / "s1", **kw)
    via_ckpt = run_study(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", out=tmp_path / "s2", **kw)
    key = lambda r: (r["layer"], r["structure"], r["config"], r["allocation"])  # noqa: E731
    a, b = sorted(via_adapter, key=key), sorted(via_ckpt, key=key)
    assert [key(r) for r in a] == [key(r) for r in b] and len(a) >= 4
    for ra, rb in zip(a, b):  # the same ΔW up to float32 rounding of the fine-tuned weights
        assert ra["error"] == pytest.approx(rb["error"], abs=1e-5)

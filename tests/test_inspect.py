"""`remap inspect`: names the layout of every fixture; refuses to guess on anything else."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from fixtures.generate import FIXTURES
from tests.test_convert import remap
from tests.test_fixture_conversions import FIXTURES as FIXTURE_DIR


@pytest.mark.parametrize("name", list(FIXTURES))
def test_inspect_names_the_layout_of_every_fixture(name):
    run = remap("inspect", FIXTURE_DIR / name, "--json")
    summary = json.loads(run.stdout)
    assert (summary["layout"], summary["variant"]) == (FIXTURES[name].layout, FIXTURES[name].variant)
    assert summary["tensors"] == len(summary["tensor_list"]) > 0


def test_inspect_rejects_a_non_deepseek_checkpoint_with_the_reason(tmp_path):
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight"]
    save_file({n: np.zeros((4, 4), np.float32) for n in names}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    run = remap("inspect", tmp_path, check=False)
    assert run.returncode == 2
    assert "not a DeepSeek checkpoint" in run.stdout and "model_type" in run.stdout
    assert "Traceback" not in run.stderr

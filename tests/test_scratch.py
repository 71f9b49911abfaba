"""The `scratch` layout is the state dict the from-scratch DeepSeek-V3's trainer saves, read as users
hold it (a bare `.pt`, no config.json), and the reference model written here from its facts.

The model's facts (docs/layouts/scratch.md) are pinned by the README config's exact count (638
tensors, 136,892,248 numbers) and by the reference model's `state_dict()`; the conversions are
checked in tests/test_scratch_conversions.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from remap import api
from remap.errors import RemapError
from remap.layouts.hf import CONFIG_KEYS
from remap.layouts.scratch import LAYOUT, UPSTREAM_DEFAULTS, infer_config
from remap.parity.scratch_model import ScratchModel

ROOT = Path(__file__).resolve().parents[1]

# The upstream README's config (its DeepSeekConfig fields).
README = dict(vocab_size=50257, block_size=1024, n_layer=8, n_embd=512, n_head=8, kv_lora_rank=128, q_lora_rank=192,
              rope_dim=32, n_experts=8, n_experts_per_token=2, expert_intermediate_size=512,
              shared_expert_intermediate_size=768, mtp_num_heads=1)
SMALL = dict(vocab_size=96, block_size=16, n_layer=2, n_embd=32, n_head=4, kv_lora_rank=16, q_lora_rank=24, rope_dim=4,
             n_experts=4, n_experts_per_token=2, expert_intermediate_size=12, shared_expert_intermediate_size=20,
             mtp_num_heads=1)
CONFIGS = {
    "small": SMALL,
    "no-bias-no-mtp": {**SMALL, "bias": False, "mtp_num_heads": 0},
    "two-mtp-top1": {**SMALL, "mtp_num_heads": 2, "n_experts_per_token": 1},
    "no-shared-expert": {**SMALL, "use_shared_expert": False},
    "upstream-defaults": {},
}


def fresh(config: dict, seed: int = 0) -> ScratchModel:
    """A freshly initialised model, as the upstream code initialises it: linears and embeddings
    N(0, 0.02), biases zero, norms one, expert_bias zero."""
    torch.manual_seed(seed)
    model = ScratchModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.zero_()
            elif param.dim() == 2:
                param.normal_(0.0, 0.02)
    return model.eval()


def remap(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "remap.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)


# --- the layout ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_layout_is_what_the_reference_model_holds(name):
    config = LAYOUT.read_config(CONFIGS[name])
    held = {key: tuple(value.shape) for key, value in ScratchModel(CONFIGS[name]).state_dict().items()}
    assert {key: e.shape for key, e in LAYOUT.expected(config).items()} == held


def test_the_readme_config_holds_638_tensors_of_136892248_numbers():
    expected = LAYOUT.expected(LAYOUT.read_config(README))
    assert len(expected) == 638
    assert sum(math.prod(e.shape) for e in expected.values()) == 136_892_248


@pytest.mark.parametrize("name", ["small", "no-bias-no-mtp", "two-mtp-top1", "no-shared-expert"])
def test_the_config_is_read_off_the_shapes(name):
    state = ScratchModel(CONFIGS[name]).state_dict()
    inferred = infer_config({k: (tuple(v.shape), "F32") for k, v in state.items()})
    wanted = {**UPSTREAM_DEFAULTS, **CONFIGS[name], "n_experts_per_token": UPSTREAM_DEFAULTS["n_experts_per_token"]}
    if not wanted["use_shared_expert"]:
        wanted["shared_expert_intermediate_size"] = inferred["shared_expert_intermediate_size"]  # no tensor says
    assert inferred == wanted


def test_config_speaks_the_shared_deepseek_namespace():
    config = LAYOUT.read_config(SMALL)
    assert set(CONFIG_KEYS) <= set(config)
    assert (config["qk_nope_head_dim"], config["v_head_dim"], config["head_dim"]) == (8, 8, 8)  # n_embd / n_head


@pytest.mark.parametrize("change, key", [
    ({"model_type": "deepseek_v3"}, "model_type"),
    ({"n_head": 5}, "n_head"),
    ({"rope_dim": 5}, "rope_dim"),
    ({"n_experts_per_token": 5}, "n_experts_per_token"),
    ({"n_embd": 0}, "n_embd"),
    ({"bias": "yes"}, "bias"),
])
def test_read_config_refuses_what_the_model_cannot_be(change, key):
    with pytest.raises(RemapError) as error:
        LAYOUT.read_config({**SMALL, **change})
    assert key in str(error.value)


# --- the reference model -----------------------------------------------------------------------


def test_the_head_is_tied_and_mtp_heads_do_not_touch_the_logits():
    model = fresh(SMALL)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 10))
    assert model.lm_head.weight is model.wte.weight
    with torch.no_grad():
        before = model(ids).logits
        for param in model.mtp_heads.parameters():
            param.normal_(0, 1.0)
        assert torch.equal(model(ids).logits, before)


def test_expert_bias_steers_the_choice_and_a_uniform_one_changes_nothing():
    model = fresh(SMALL)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 10))
    with torch.no_grad():
        before = model(ids).logits
        for block in model.h:
            block.mlp.expert_bias.fill_(0.7)
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-6)
        for block in model.h:
            block.mlp.expert_bias.copy_(torch.tensor([5.0, 0.0, 0.0, 5.0]))  # always experts 0 and 3
        assert (model(ids).logits - before).abs().max() > 1e-4


# --- the trainer's bare .pt --------------------------------------------------------------------


def test_the_trainers_bare_pt_inspects_as_scratch(tmp_path):
    torch.save(fresh(SMALL).state_dict(), tmp_path / "best_deepseek_v3.pt")
    run = remap("inspect", tmp_path / "best_deepseek_v3.pt", "--json")
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    assert (shown["layout"], shown["config_source"], shown["assumed"]) == ("scratch", "tensor shapes", ["n_experts_per_token"])
    assert shown["config"]["hidden_size"] == SMALL["n_embd"] and shown["tensors"] == len(fresh(SMALL).state_dict())
    text = remap("inspect", tmp_path / "best_deepseek_v3.pt")
    assert "read off the tensors' shapes" in text.stdout and "n_experts_per_token=2" in text.stdout


def test_set_overrides_what_the_shapes_cannot_tell(tmp_path):
    torch.save(fresh({**SMALL, "n_experts_per_token": 3}).state_dict(), tmp_path / "model.pt")
    plan, source = api.plan(tmp_path / "model.pt", "scratch-to-hf", settings={"n_experts_per_token": 3})
    assert plan.target_config["num_experts_per_tok"] == 3 and source.config["n_experts_per_token"] == 3
    assert plan.recipe.settings == (("n_experts_per_token", 3),)


def test_a_pt_that_is_no_known_model_says_so(tmp_path):
    torch.save({"encoder.weight": torch.zeros(4, 4)}, tmp_path / "other.pt")
    with pytest.raises(RemapError, match="no config.json beside the weights"):
        api.plan(tmp_path / "other.pt", "scratch-to-hf")


def test_every_tensor_of_the_readme_config_pt_is_accounted_for(tmp_path):
    """The file users hold at the upstream README's config: 638 entries, about 445 MB (lm_head
    shares wte's storage). Header-only planning accounts for each one in the report's JSON."""
    model_state = {name: torch.empty(e.shape) for name, e in LAYOUT.expected(LAYOUT.read_config(README)).items()}
    model_state["lm_head.weight"] = model_state["wte.weight"]  # tied, as the trainer saves it
    torch.save(model_state, tmp_path / "best_deepseek_v3.pt")
    del model_state
    out = tmp_path / "report.json"
    run = remap("report", tmp_path / "best_deepseek_v3.pt", "--spec", "scratch-to-mlx", "--no-check-data", "--json", out)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr
    report = json.loads(out.read_text())
    coverage = report["coverage"]
    assert coverage["source_tensors"] == 638
    assert coverage["used"] + coverage["dropped"] == 638 and coverage["unmatched"] == 0

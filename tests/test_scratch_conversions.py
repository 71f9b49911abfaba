"""The from-scratch model's checkpoints, as its users hold them, through every scratch spec.

The oracle is the model itself (remap's reference of it, tests/test_scratch.py; as the user's own
code through --torch-model) against transformers' and mlx-lm's own model classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from remap import api
from remap.io.checkpoint import open_checkpoint
from remap.parity import run_parity, runtimes
from remap.parity.scratch_model import ScratchModel

ROOT = Path(__file__).resolve().parent.parent
USER_MODEL = ROOT / "tests/scratch_torch_model.py"
CONFIG = dict(vocab_size=320, block_size=64, n_layer=2, n_embd=64, n_head=4, kv_lora_rank=32, q_lora_rank=48,
              rope_dim=8, n_experts=4, n_experts_per_token=2, expert_intermediate_size=32,
              shared_expert_intermediate_size=48, mtp_num_heads=1)


def fresh(seed: int = 0) -> ScratchModel:
    """Freshly initialised as the upstream code does it: linears and embeddings N(0, 0.02), biases
    and expert_bias zero, norms one; the rope-key heads therefore differ, and wpe is not zero."""
    torch.manual_seed(seed)
    model = ScratchModel(CONFIG)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.zero_() if name.endswith(".bias") else param.normal_(0.0, 0.02) if param.dim() == 2 else None
    return model.eval()


def compatible(seed: int = 0) -> ScratchModel:
    """A model every claim holds for: zero wpe and MLP biases, one rope key for every head, a uniform
    router bias; weights scaled so the logits are far from zero (a test on tiny logits proves nothing)."""
    model = fresh(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, param.shape[1] ** -0.5)
            elif not name.endswith(".bias"):
                param.copy_(1 + 0.1 * torch.randn_like(param))  # norms
            elif name.endswith("o_proj.bias"):
                param.normal_(0.0, 0.1)  # kept as attention_bias: need not be zero
        model.wpe.weight.zero_()
        for block in model.h:
            rope = block.attn.k_rope_proj.weight
            rope.copy_(rope[:CONFIG["rope_dim"]].repeat(CONFIG["n_head"], 1))
            block.mlp.expert_bias.fill_(0.3)
    return model


def save(model: ScratchModel, path: Path) -> Path:
    """What the upstream trainer writes: torch.save(model.state_dict()), no config.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def remap(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "remap.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT)


IDS = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], size=(2, 40))


def reference_logits(model: ScratchModel) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(IDS)).logits.numpy()


def test_check_data_on_a_fresh_model_names_wpe_and_the_rope_heads(tmp_path):
    pt = save(fresh(), tmp_path / "best_deepseek_v3.pt")
    out = tmp_path / "report.json"
    run = remap("report", pt, "--spec", "scratch-to-mlx", "--check-data", "--json", out)
    assert run.returncode == 1, run.stderr
    broken = {loss["rule"].split("] ", 1)[1]: loss["magnitude"] for loss in json.loads(out.read_text())["losses"]
              if loss["holds"] is False}
    assert set(broken) == {"learned positions", "kv_a_proj_with_mqa = kv_proj + the first head's rope key (pairs interleaved)"}
    assert all(size > 0.01 for size in broken.values())  # N(0, 0.02) weights: each claim's size is shown
    assert "learned positions" in run.stdout and "NOT OK" in run.stdout
    assert "wpe.weight" in run.stdout and "k_rope_proj" in run.stdout  # the tensors behind each broken claim


def test_scratch_to_mlx_writes_what_mlx_lm_loads_and_runs(tmp_path):
    import mlx.core as mx
    from mlx_lm.utils import load_model

    pt = save(compatible(), tmp_path / "model.pt")
    run = remap("convert", pt, tmp_path / "mlx", "--spec", "scratch-to-mlx", "--quiet")
    assert run.returncode == 0, run.stderr
    model, config = load_model(tmp_path / "mlx")  # strict: a missing or extra weight fails
    model.set_dtype(mx.float32)
    logits = np.array(model(mx.array(IDS)))
    assert config["model_type"] == "deepseek_v3" and logits.shape == (*IDS.shape, CONFIG["vocab_size"])
    assert np.isfinite(logits).all() and logits.std() > 0.1


@pytest.mark.parametrize("spec, runtime", [("scratch-to-hf-exact", runtimes.transformers_runtime),
                                           ("scratch-to-mlx-exact", runtimes.mlx_runtime)])
def test_the_exact_specs_give_the_models_logits(tmp_path, spec, runtime):
    model = compatible()
    pt = save(model, tmp_path / "model.pt")
    plan, source = api.plan(pt, spec)
    assert api.report(plan, source, check=True).ok
    api.convert(plan, source, tmp_path / "out")
    theirs = runtime(open_checkpoint(tmp_path / "out"), "float32").forward(IDS).logits
    ours = reference_logits(model)
    assert np.abs(ours).max() > 2
    assert np.abs(theirs - ours).max() / np.abs(ours).max() < 1e-4


def test_parity_with_the_users_own_model_code(tmp_path):
    fresh_pt = save(fresh(), tmp_path / "fresh/model.pt")
    good_pt = save(compatible(), tmp_path / "good/model.pt")
    failing = remap("parity", fresh_pt, "--spec", "scratch-to-mlx-exact", "--torch-model", USER_MODEL)
    assert failing.returncode == 1, failing.stderr
    assert "scratch_torch_model.py (your model code" in failing.stdout and "learned positions" in failing.stdout
    passing = remap("parity", good_pt, "--spec", "scratch-to-mlx-exact", "--torch-model", USER_MODEL)
    assert passing.returncode == 0, passing.stdout[-3000:] + passing.stderr
    result = run_parity(good_pt, spec="scratch-to-mlx-exact", torch_model=USER_MODEL)
    assert list(result.hidden) == ["embedding", "layer 0", "layer 1"]  # layers(model) localises


def test_a_broken_torch_model_file_is_one_line(tmp_path):
    pt = save(compatible(), tmp_path / "model.pt")
    bad = tmp_path / "bad.py"
    bad.write_text("def build(config, state_dict):\n    raise ValueError('no such layer')\n\ndef forward(m, ids):\n    pass\n")
    run = remap("parity", pt, "--spec", "scratch-to-mlx-exact", "--torch-model", bad)
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "bad.py" in run.stderr and "build(config, state_dict) failed: ValueError: no such layer" in run.stderr


def test_a_model_fine_tuned_in_mlx_returns_to_the_training_code(tmp_path):
    """mlx -> scratch: the inverse of scratch-to-mlx-exact gives a state dict the model loads strictly
    (wpe and MLP biases as zeros, the rope key on every head, its buffers) computing the same logits."""
    model = compatible()
    pt = save(model, tmp_path / "model.pt")
    plan, source = api.plan(pt, "scratch-to-mlx-exact")
    api.convert(plan, source, tmp_path / "mlx")
    back, mlx = api.plan(tmp_path / "mlx", "scratch-to-mlx-exact", inverse=True)
    assert api.report(back, mlx).ok
    api.convert(back, mlx, tmp_path / "scratch")
    with open_checkpoint(tmp_path / "scratch") as returned:
        config = json.loads((tmp_path / "scratch/config.json").read_text())
        assert {k: config[k] for k in CONFIG} == CONFIG | {"mtp_num_heads": 0}
        again = ScratchModel(config)
        again.load_state_dict({n: torch.from_numpy(np.array(returned.read(n))) for n in returned.tensors}, strict=True)
    ours, theirs = reference_logits(model), reference_logits(again.eval())
    assert np.abs(theirs - ours).max() / np.abs(ours).max() < 1e-5


def test_claims_are_measured_by_default_and_a_loss_is_converted_only_when_asked(tmp_path):
    """Without --check-data, report and convert still measure the claims data can break (zero,
    redundant): a trained model's report fails, convert refuses, and --allow-lossy converts it
    with every break recorded. --no-check-data reads headers only and says so."""
    trained = ROOT / "fixtures/scratch-trained"
    assert remap("report", trained, "--spec", "scratch-to-mlx-exact").returncode == 1
    headers_only = remap("report", trained, "--spec", "scratch-to-mlx-exact", "--no-check-data")
    assert headers_only.returncode == 0 and "claims not measured (--check-data)" in headers_only.stdout
    refused = remap("convert", trained, tmp_path / "out", "--spec", "scratch-to-mlx-exact", "--quiet")
    assert refused.returncode == 1 and "--allow-lossy" in refused.stderr and not (tmp_path / "out").exists()
    done = remap("convert", trained, tmp_path / "out", "--spec", "scratch-to-mlx-exact", "--quiet", "--allow-lossy")
    assert done.returncode == 0, done.stderr
    recorded = json.loads((tmp_path / "out/remap-report.json").read_text())
    assert not recorded["ok"] and recorded["measured"] == ["zero", "redundant"]
    assert any(loss["holds"] is False and loss["rule"].endswith("learned positions") for loss in recorded["losses"])

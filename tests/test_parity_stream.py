"""Layer-streamed parity (`remap parity --stream`, or over --memory-budget) on the bundled fixtures.

Streamed, each side still runs its own runtime's modules (transformers', mlx-lm's), one decoder
layer at a time with only the routed experts its router picks: for a model that fits, its
metrics must equal whole-model parity's up to float32 rounding, a broken expert must be found in
its layer, and two routers that pick different experts on the same input must be reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from safetensors.numpy import load_file, save_file

from remap import api
from remap.parity import run_parity
from tests.test_parity import EXPERTS_OFF_BY_ONE

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
SCHEMA = json.loads((ROOT / "schemas/parity.schema.json").read_text())


def _same_metrics(whole: dict, streamed: dict) -> None:
    """Equal up to float32 rounding: each metric within 1e-6 of the whole-model one (absolute, or
    relative for the large errors of a lossy target)."""
    assert whole.keys() == streamed.keys()
    for key, value in whole.items():
        assert streamed[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("src, options", [
    ("hf-bf16", dict(spec="hf-to-mlx", variant="kv_b_proj")),
    ("hf-bf16", dict(spec="hf-to-mlx", quantize=4, group_size=32)),
    ("mlx", dict(spec="mlx-to-hf")),
    ("hf-fp8-mtp", dict(spec="hf-fp8-to-hf")),
], ids=["hf-to-mlx", "hf-to-mlx-4bit", "mlx-to-hf", "hf-fp8-to-hf"])
def test_streamed_and_whole_model_parity_measure_the_same(src, options):
    whole = run_parity(FIXTURES / src, **options)
    streamed = run_parity(FIXTURES / src, stream=True, **options)
    assert whole.streamed is None and streamed.streamed.reason == "--stream"
    assert streamed.target.runtime == whole.target.runtime and streamed.source.runtime == whole.source.runtime
    if src == "hf-fp8-mtp":
        # transformers' own FP8 loading reads the fixture's partial 80-row blocks wrongly
        # (docs/parity.md); streamed, both sides get remap's dequantization, so they agree exactly
        assert streamed.ok and streamed.logits["max_abs"] == 0 and whole.logits["max_rel"] > 1e-3
        return
    _same_metrics(whole.logits, streamed.logits)
    assert whole.hidden.keys() == streamed.hidden.keys()
    for name in whole.hidden:
        _same_metrics(whole.hidden[name], streamed.hidden[name])
    assert [c.ok for c in whole.checks] == [c.ok for c in streamed.checks]
    assert streamed.divergence == whole.divergence
    assert set(streamed.streamed.experts) == {"layer 1", "layer 2"}  # the fixture's MoE layers
    jsonschema.validate(json.loads(_render_json(streamed)), SCHEMA)


def test_experts_loaded_a_chunk_at_a_time_measure_what_whole_model_parity_does(monkeypatch):
    """A layer whose picked experts outgrow EXPERT_CHUNK_BYTES runs them a chunk at a time (at
    DeepSeek-V3's widths, ~5 experts a chunk); here every expert is a chunk of its own, on both
    sides, and the metrics must still be whole-model parity's."""
    from remap.parity import stream_side

    whole = run_parity(FIXTURES / "hf-bf16", spec="hf-to-mlx")
    monkeypatch.setattr(stream_side, "EXPERT_CHUNK_BYTES", 1)
    chunked = run_parity(FIXTURES / "hf-bf16", spec="hf-to-mlx", stream=True)
    assert chunked.ok and all(ours > 1 for ours, _ in chunked.streamed.experts.values())
    _same_metrics(whole.logits, chunked.logits)
    for name in whole.hidden:
        _same_metrics(whole.hidden[name], chunked.hidden[name])


def _render_json(result) -> str:
    from remap.render.parity import render_json

    return render_json(result)


def test_a_streamed_run_reads_only_the_picked_experts(tmp_path):
    """One token picks 2 of the fixture's 4 experts in each MoE layer: each side loads those two,
    and reads less than the source's tensors without half its experts."""
    result = run_parity(FIXTURES / "hf-bf16", spec="hf-to-mlx", stream=True, tokens=1, batch=1)
    assert result.ok
    for layer, (ours, theirs) in result.streamed.experts.items():
        assert ours == theirs == 2, layer  # 1 token, num_experts_per_tok 2: 2 of the 4 experts
    expert_bytes = sum(i.nbytes for n, i in api.open_source(FIXTURES / "hf-bf16").tensors.items() if ".experts." in n)
    everything = sum(i.nbytes for i in api.open_source(FIXTURES / "hf-bf16").tensors.values())
    assert result.streamed.bytes_read[0] < everything - expert_bytes / 2


def _mlx_copy(tmp_path: Path, change) -> Path:
    """fixtures/hf-bf16 converted by hf-to-mlx, then `change(tensors)` applied to its files."""
    plan, checkpoint = api.plan(FIXTURES / "hf-bf16", "hf-to-mlx")
    out = tmp_path / "mlx"
    api.convert(plan, checkpoint, out, checksums=False)
    for file in out.glob("*.safetensors"):
        tensors = load_file(file)
        if change(tensors):
            save_file(tensors, file, metadata={"format": "mlx"})
    return out


def test_a_perturbed_expert_is_found_in_its_layer_and_rule(tmp_path):
    def perturb(tensors):
        name = "model.layers.2.mlp.switch_mlp.down_proj.weight"
        if name not in tensors:
            return False
        tensors[name] = tensors[name].copy()
        tensors[name][1] *= 1.5  # expert 1 of layer 2
        return True

    target = _mlx_copy(tmp_path, perturb)
    result = run_parity(FIXTURES / "hf-bf16", target, spec="hf-to-mlx", stream=True)
    assert not result.ok and result.divergence == "layer 2"
    assert all(result.hidden[name]["max_rel"] < 1e-5 for name in ("embedding", "layer 0", "layer 1"))
    stacked = [ref for ref in result.rules if "model.layers.2.mlp.switch_mlp.down_proj.weight" in ref.tensors]
    assert stacked and stacked[0].rule.endswith("routed experts stacked")
    assert result.streamed.local["layer 2"]["max_rel"] > 1e-3  # layer 2 itself, on the source's input


def test_experts_read_from_each_other_are_named_streamed(tmp_path):
    spec = tmp_path / "experts.yaml"
    spec.write_text(EXPERTS_OFF_BY_ONE)
    result = run_parity(FIXTURES / "hf-bf16", spec=spec, stream=True)
    assert not result.ok and result.divergence == "layer 2"
    rules = {ref.rule.split("] ", 1)[1]: ref.tensors for ref in result.rules}
    assert rules["layer 2 expert 1 read from expert 2"] == ("model.layers.2.mlp.experts.1.down_proj.weight",
                                                            "model.layers.2.mlp.experts.1.gate_proj.weight",
                                                            "model.layers.2.mlp.experts.1.up_proj.weight")


def test_a_failing_streamed_run_measures_only_the_claims_the_bytes_can_break(monkeypatch):
    """On failure, whole-model parity measures every claim of the spec on the source, which reads
    and rebuilds every tensor (a rounding or quantization step, experts stacked whole); a streamed run measures only zero and redundant claims, which read
    little, and still lists the steps that lose by design. The 4-bit conversion fails here only
    because its hidden-state tolerance is set below what 4 bits keep."""
    from remap import check

    asked = []
    measure = check.check_data
    monkeypatch.setattr(api, "check_data", lambda plan, read, claims=None, progress=None:
                        asked.append(claims) or measure(plan, read, claims, progress))
    runs = [run_parity(FIXTURES / "hf-fp8-mtp", spec="hf-fp8-to-mlx", quantize=4, group_size=32, stream=stream,
                       tolerances={"max_hidden_error": 1e-9}) for stream in (False, True)]
    assert not runs[0].ok and not runs[1].ok and runs[0].divergence == runs[1].divergence
    assert asked == [None, check.BREAKABLE]  # every claim, then the breakable ones
    assert [(c.rule, c.claim) for c in runs[0].claims] == [(c.rule, c.claim) for c in runs[1].claims]
    assert any(c.claim == "rounding" for c in runs[1].claims)


def test_a_routing_disagreement_is_reported_with_its_experts(tmp_path):
    """The target's layer-1 router has its two groups of experts swapped ({0, 1} and {2, 3}: rows
    and score biases). The fixture routes to one group of two experts (n_group 2, topk_group 1,
    2 experts a token), so on the same input every token picks the other group."""
    def swap(tensors):
        prefix = "model.layers.1.mlp.gate."
        if prefix + "weight" not in tensors:
            return False
        for name in (prefix + "weight", prefix + "e_score_correction_bias"):
            tensors[name] = tensors[name][[2, 3, 0, 1]].copy()
        return True

    target = _mlx_copy(tmp_path, swap)
    result = run_parity(FIXTURES / "hf-bf16", target, spec="hf-to-mlx", stream=True)
    assert not result.ok and result.divergence == "layer 1"
    (found,) = [r for r in result.streamed.routing if r["layer"] == 1]
    assert found["tokens"] == found["of"] == 2 * 32
    assert found["source_only"] == found["target_only"] == [0, 1, 2, 3]
    assert [r["layer"] for r in result.streamed.routing][0] == 1  # layers 0 (dense) and before: nothing


def _remap(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "remap.cli", *map(str, args)], capture_output=True, text=True, env=env)


def test_the_command_streams_over_its_memory_budget_and_says_so(tmp_path):
    done = _remap("parity", FIXTURES / "hf-bf16", "--spec", "hf-to-mlx", "--memory-budget", "1KB", "--json", "-")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    jsonschema.validate(result, SCHEMA)
    assert "over the memory budget of 1 KB" in result["streamed"]["reason"] and result["peak_rss"] > 0
    shown = _remap("parity", FIXTURES / "hf-bf16", "--spec", "hf-to-mlx", "--stream")
    assert shown.returncode == 0 and "streamed one decoder layer at a time (--stream)" in shown.stdout


@pytest.mark.parametrize("args, message", [
    (["--memory-budget", "lots"], "bad memory budget 'lots'"),
    (["--stream", "--torch-model", str(ROOT / "tests/scratch_torch_model.py")], "no --stream with --torch-model"),
])
def test_the_command_refuses_bad_streaming_options(args, message):
    done = _remap("parity", FIXTURES / "hf-bf16", "--spec", "hf-to-mlx", *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_a_layout_without_a_streamed_runtime_is_refused():
    done = _remap("parity", FIXTURES / "scratch-compatible", "--spec", "scratch-to-mlx", "--stream")
    assert done.returncode == 2 and "layer-streamed parity runs hf and mlx checkpoints, not scratch" in done.stderr


def test_the_peak_memory_is_measured_for_every_run():
    result = run_parity(FIXTURES / "hf-bf16", spec="hf-to-mlx")
    assert result.streamed is None and result.peak_rss >= 10 << 20  # torch and mlx alone take more

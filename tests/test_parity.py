"""`remap parity` against the real runtimes: transformers and remap's ScratchModel on the torch
side, mlx-lm (or transformers) on the target side, on the bundled fixtures.

Correct conversions pass at float32 tolerances; broken ones fail, and the report names the first
diverging layer and the rule that broke it: a lossy scratch checkpoint, k and v swapped inside
kv_b_proj, two experts off by one, a final norm replaced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml

from remap import api
from remap.errors import RemapError
from remap.io.hashing import sha256_file
from remap.parity import run_parity, token_ids
from remap.parity.compare import PROFILES, checks, logit_metrics, profile_for, weight_precision
from tests.helpers import TINY_DEEPSEEK_V2, TINY_MISTRAL4

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
SCHEMA = json.loads((ROOT / "schemas/parity.schema.json").read_text())
LAYERS = ["embedding", "layer 0", "layer 1", "layer 2"]


def _broken_hf_to_mlx(tmp_path: Path, rule_name: str, replacement: list[dict], name: str) -> Path:
    """hf-to-mlx with the rule called `rule_name` replaced by `replacement` rules."""
    document = yaml.safe_load((ROOT / "mappings/hf-to-mlx.yaml").read_text())
    index = next(k for k, rule in enumerate(document["rules"]) if rule.get("name", rule.get("to")) == rule_name)
    document["rules"][index:index + 1] = replacement
    document["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _remap(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "remap.cli", *map(str, args)], capture_output=True, text=True, env=env)


def _check_junit(path: Path, expected_failures: int, total: int) -> None:
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites" and int(root.get("tests")) == total and int(root.get("failures")) == expected_failures
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == int(suite.get("tests")) == total
    assert all(case.get("name") and case.get("classname") and float(case.get("time")) >= 0 for case in cases)
    assert sum(len(case.findall("failure")) for case in cases) == int(suite.get("failures")) == expected_failures


# -- correct conversions pass --------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["embed_q", "kv_b_proj"])
def test_hf_to_mlx_passes_in_both_variants(variant):
    result = run_parity(FIXTURES / "hf-bf16", spec="hf-to-mlx", variant=variant)
    assert result.ok, [c.describe() for c in result.failures]
    assert (result.source.runtime.split()[0], result.target.runtime.split()[0]) == ("transformers", "mlx-lm")
    assert (result.target.layout, result.target.variant, result.profile) == ("mlx", variant, "fp32")
    assert list(result.hidden) == LAYERS and result.divergence is None
    assert result.logits["top1"] == 1.0 and result.logits["max_rel"] < 1e-5
    # bf16 weights upcast on both sides: the embedding lookups are the same numbers
    assert result.hidden["embedding"]["max_abs"] == 0.0


def test_fp8_to_mlx_passes_against_transformers_on_the_dequantized_weights(tmp_path):
    """The FP8 fixture straight to MLX computes what transformers computes on the same weights
    dequantized by hf-fp8-to-hf (transformers itself cannot load FP8 here without `accelerate`)."""
    for spec, out in (("hf-fp8-to-hf", "hf"), ("hf-fp8-to-mlx", "mlx")):
        plan, ckpt = api.plan(FIXTURES / "hf-fp8-mtp", spec)
        api.convert(plan, ckpt, tmp_path / out)
    result = run_parity(tmp_path / "hf", tmp_path / "mlx")
    assert result.ok, [c.describe() for c in result.failures]
    assert result.logits["max_rel"] < 1e-5 and result.profile == "fp32"


def test_fp8_parity_runs_transformers_on_the_fp8_checkpoint():
    """`remap parity fixtures/hf-fp8-mtp --spec hf-fp8-to-mlx`: transformers loads the FP8 files
    itself (with accelerate; without a GPU it dequantizes them to bf16) against mlx-lm on remap's
    conversion."""
    done = _remap("parity", FIXTURES / "hf-fp8-mtp", "--spec", "hf-fp8-to-mlx")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = run_parity(FIXTURES / "hf-fp8-mtp", spec="hf-fp8-to-mlx")
    assert result.ok and result.source.runtime.startswith("transformers") and result.source.weights == "F8_E4M3"
    assert result.profile == "bf16" and "UNEXPECTED" not in done.stdout  # transformers' load report is kept quiet


def test_transformers_dequantizes_fp8_like_remap_but_for_partial_blocks(tmp_path):
    """Why FP8 parity drifts by a few percent, not float32 rounding: transformers 5.23 on the CPU
    derives the block size from the scale grid (rows / scale rows), which is wrong where a
    dimension ends in a partial block (160 rows in 2 blocks of 128 read as 2 blocks of 80). Every
    other weight equals remap's dequantization (DeepSeek's fp8_cast_bf16 arithmetic) to one bf16
    rounding. When this fails after an upgrade, transformers changed: update docs/parity.md."""
    import torch
    from transformers import AutoModelForCausalLM

    plan, ckpt = api.plan(FIXTURES / "hf-fp8-mtp", "hf-fp8-to-hf")
    api.convert(plan, ckpt, tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(FIXTURES / "hf-fp8-mtp", dtype=torch.float32).state_dict()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).state_dict()
    differ = set()
    for name, weight in ours.items():
        error = (theirs[name].float() - weight.float()).abs()
        if (error > weight.abs() * 2.0**-8 + 1e-30).any():  # more than one bf16 rounding
            differ.add(name)
    assert differ == {"model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"}
    assert ours["model.layers.0.mlp.up_proj.weight"].shape[0] == 160


@pytest.mark.parametrize("spec, variant, runtime", [("scratch-to-mlx-exact", "embed_q", "mlx-lm"),
                                                    ("scratch-to-mlx-exact", "kv_b_proj", "mlx-lm"),
                                                    ("scratch-to-hf-exact", None, "transformers")])
def test_compatible_scratch_passes(spec, variant, runtime):
    result = run_parity(FIXTURES / "scratch-compatible", spec=spec, variant=variant, tokens=48, batch=2)
    assert result.ok, [c.describe() for c in result.failures]
    assert result.source.runtime.startswith("remap ScratchModel") and result.target.runtime.startswith(runtime)
    assert result.logits["kl"] < 1e-9 and result.logits["top1"] == 1.0


@pytest.mark.parametrize("spec", ["mlx-to-hf", "mlx-dequantize"])
def test_mlx_sources_pass(spec):
    """mlx-lm as the source side: its own checkpoint against the conversion of it."""
    result = run_parity(FIXTURES / "mlx", spec=spec)
    assert result.ok, [c.describe() for c in result.failures]
    assert result.source.runtime.startswith("mlx-lm") and result.logits["max_rel"] < 1e-5


def test_a_quantized_target_is_judged_by_the_quantized_profile():
    result = run_parity(FIXTURES / "hf-bf16", spec="hf-to-mlx", quantize=8, group_size=32)
    assert (result.profile, result.target.weights, result.spec) == ("quantized", "quantized", "hf-to-mlx+8bit")
    assert result.ok, [c.describe() for c in result.failures]
    assert 0 < result.logits["kl"] < PROFILES["quantized"].max_kl and result.logits["max_rel"] > PROFILES["fp32"].max_error


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_mistral4_hf_to_mlx_passes(tiny_mistral4, name):
    """transformers' Mistral4ForCausalLM against mlx-lm's mistral4 on remap's conversion, layer by layer.
    "untied" has llama-4 query scaling on within the 32 tokens (original context 8), "tied" off."""
    result = run_parity(tiny_mistral4(name), spec="hf-to-mlx")
    assert result.ok, [c.describe() for c in result.failures]
    assert result.source.runtime.endswith("Mistral4ForCausalLM") and result.target.runtime.endswith("mistral4.Model")
    layers = TINY_MISTRAL4[name]["num_hidden_layers"]
    assert list(result.hidden) == ["embedding", *(f"layer {i}" for i in range(layers))] and result.profile == "fp32"
    assert result.hidden["embedding"]["max_abs"] == 0.0
    assert result.logits["top1"] == 1.0 and result.logits["max_rel"] < 1e-5


def test_mistral4_layers_are_stepped_with_mlx_lms_own_query_scale(tiny_mistral4, monkeypatch):
    """The scale matters: stepping mlx-lm's layers without it (ones) diverges at layer 0, while the
    logits, from mlx-lm's own forward, still agree."""
    import mlx.core as mx

    from remap.parity import runtimes

    stepped = runtimes._mlx_layer_args

    def unscaled(model, h):
        scale, mask = stepped(model, h)
        assert not np.allclose(np.array(scale), 1.0)  # beta 0.1, 32 tokens past an original context of 8
        return mx.ones_like(scale), mask

    monkeypatch.setattr(runtimes, "_mlx_layer_args", unscaled)
    result = run_parity(tiny_mistral4("untied"), spec="hf-to-mlx")
    assert not result.ok and result.divergence == "layer 0"
    logits = [c for c in result.checks if c.section == "logits"]
    assert logits and all(c.ok for c in logits)


@pytest.mark.parametrize("name, hub", [("v2", True), ("lite", True), ("lite", False), ("plain", False)])
def test_deepseek_v2_hf_to_mlx_passes(tiny_deepseek_v2, name, hub):
    """transformers' DeepseekV2ForCausalLM against mlx-lm's deepseek_v2 on remap's conversion, layer by
    layer: from the releases' config.json (hub), and from one transformers 5 saved, whose
    rope_parameters remap writes as the rope_scaling mlx-lm reads ("plain": no yarn, factor 1)."""
    result = run_parity(tiny_deepseek_v2(name, hub), spec="hf-to-mlx")
    assert result.ok, [c.describe() for c in result.failures]
    assert result.source.runtime.endswith("DeepseekV2ForCausalLM")
    assert result.target.runtime.endswith("deepseek_v2.Model")
    layers = TINY_DEEPSEEK_V2[name]["num_hidden_layers"]
    assert list(result.hidden) == ["embedding", *(f"layer {i}" for i in range(layers))] and result.profile == "fp32"
    assert result.hidden["embedding"]["max_abs"] == 0.0
    assert result.logits["top1"] == 1.0 and result.logits["max_rel"] < 1e-5


# -- broken conversions fail, localised -----------------------------------------------------------


def test_trained_scratch_fails_and_names_the_lossy_rules():
    result = run_parity(FIXTURES / "scratch-trained", spec="scratch-to-mlx-exact")
    assert not result.ok
    assert result.divergence == "embedding"  # non-zero wpe: the very first state already differs
    assert any(ref.rule.endswith("learned positions") and ref.tensors == ("wpe.weight",) for ref in result.rules)
    assert [claim.rule.split("] ", 1)[1] for claim in result.starts_in] == ["learned positions"]  # where it starts
    broken = {claim.rule.split("] ", 1)[1] for claim in result.claims if claim.holds is False}
    assert broken == {"learned positions", "shared expert biases", "routed expert gate biases", "routed expert up biases",
                      "routed expert down biases", "router load-balancing bias",
                      "kv_a_proj_with_mqa = kv_proj + the first head's rope key (pairs interleaved)"}


def test_the_deepseek_v3_target_of_a_compatible_scratch_model_drifts_by_its_routing():
    """scratch-to-mlx writes DeepSeek-V3 (what seed 003 targeted): every claim holds on the compatible
    fixture, and parity still fails, at the first MoE layer, naming the router's lossy rule."""
    result = run_parity(FIXTURES / "scratch-compatible", spec="scratch-to-mlx")
    assert not result.ok and result.divergence == "layer 0"
    assert result.hidden["embedding"]["max_abs"] == 0.0
    assert not any(claim.holds is False for claim in result.claims)
    assert any(claim.claim == "lossy" and "router" in claim.rule for claim in result.claims)


def test_k_and_v_swapped_inside_kv_b_proj_is_caught_in_layer_0(tmp_path):
    whole = "model.layers.{i}.self_attn.kv_b_proj.weight"
    heads = {"heads": "num_attention_heads"}
    swapped = {
        "name": "kv_b_proj with v rows before k rows",
        "to": whole,
        "from": [whole, whole],
        "when": "i < num_hidden_layers and target_variant == 'kv_b_proj'",
        "ops": [  # per head: the v rows of one copy, then the k rows of the other
            {"op": "split_heads", "input": 0, **heads},
            {"op": "slice", "input": 0, "axis": 1, "start": "qk_nope_head_dim", "claim": "lossy", "reason": "v rows"},
            {"op": "split_heads", "input": 1, **heads},
            {"op": "slice", "input": 1, "axis": 1, "stop": "qk_nope_head_dim", "claim": "lossy", "reason": "k rows"},
            {"op": "concat", "axis": 1},
            {"op": "merge_heads", **heads},
        ],
    }
    spec = _broken_hf_to_mlx(tmp_path, "kv_b_proj kept whole (exo shards it)", [swapped], "hf-to-mlx-kv-swapped")
    result = run_parity(FIXTURES / "hf-bf16", spec=spec, variant="kv_b_proj")
    assert not result.ok and result.divergence == "layer 0"
    assert result.hidden["embedding"]["max_abs"] == 0.0
    assert "kv_b_proj with v rows before k rows" in [ref.rule.split("] ", 1)[1] for ref in result.rules]
    assert all(ref.tensors[0].startswith("model.layers.0.") for ref in result.rules)


EXPERTS_OFF_BY_ONE = """
remap: 1
name: hf-experts-off-by-one
from: hf
to: hf
rules:
  - {to: "model.{w}.weight", from: "model.{w:embed_tokens|norm}.weight"}
  - {to: lm_head.weight, from: lm_head.weight}
  - to: model.layers.{i}.{part}.{rest*}
    from: model.layers.{i}.{part:input_layernorm|post_attention_layernorm|self_attn}.{rest*}
  - to: model.layers.{i}.mlp.{part}.{rest*}
    from: model.layers.{i}.mlp.{part:gate_proj|up_proj|down_proj|gate|shared_experts}.{rest*}
  - to: model.layers.{i}.mlp.experts.{e}.{rest*}
    from: model.layers.{i}.mlp.experts.{e}.{rest*}
    when: i != 2 or e == 0 or e == 3
  - name: layer 2 expert 1 read from expert 2
    to: model.layers.2.mlp.experts.1.{rest*}
    from: model.layers.2.mlp.experts.2.{rest*}
  - name: layer 2 expert 2 read from expert 1
    to: model.layers.2.mlp.experts.2.{rest*}
    from: model.layers.2.mlp.experts.1.{rest*}
"""


def test_experts_off_by_one_are_caught_in_their_layer(tmp_path):
    spec = tmp_path / "experts.yaml"
    spec.write_text(EXPERTS_OFF_BY_ONE)
    result = run_parity(FIXTURES / "hf-bf16", spec=spec)
    assert result.target.runtime.startswith("transformers")
    assert not result.ok and result.divergence == "layer 2"
    assert all(result.hidden[name]["max_abs"] == 0.0 for name in LAYERS[:3])  # same code, same weights
    rules = [ref.rule.split("] ", 1)[1] for ref in result.rules]
    assert {"layer 2 expert 1 read from expert 2", "layer 2 expert 2 read from expert 1"} <= set(rules)


def test_a_replaced_final_norm_diverges_at_the_head(tmp_path):
    replacement = [
        {"name": "final norm replaced by ones", "fill": "ones", "to": "model.norm.weight", "shape": ["hidden_size"],
         "dtype": "bf16"},
        {"name": "final norm dropped", "drop": "model.norm.weight", "claim": "lossy", "reason": "test", "inverse": "omit"},
    ]
    spec = _broken_hf_to_mlx(tmp_path, "model.norm.weight", replacement, "hf-to-mlx-no-final-norm")
    result = run_parity(FIXTURES / "hf-bf16", spec=spec)
    assert not result.ok and result.divergence == "head"
    assert all(c.ok for c in result.checks if c.section != "logits")
    assert {"final norm replaced by ones", "final norm dropped"} <= {ref.rule.split("] ", 1)[1] for ref in result.rules}
    assert any(claim.claim == "lossy" and claim.rule.endswith("final norm dropped") for claim in result.claims)


# -- round trip -----------------------------------------------------------------------------------


def test_hf_mlx_hf_round_trip_is_bit_exact_and_parity_identical(tmp_path):
    original = FIXTURES / "hf-bf16"
    plan, checkpoint = api.plan(original, "hf-to-mlx")
    api.convert(plan, checkpoint, tmp_path / "mlx")
    inverted = _remap("convert", tmp_path / "mlx", tmp_path / "hf", "--spec", "hf-to-mlx", "--inverse", "--quiet")
    assert inverted.returncode == 0, inverted.stderr
    assert sha256_file(tmp_path / "hf/model.safetensors") == sha256_file(original / "model.safetensors")

    forward = run_parity(original, tmp_path / "mlx")
    back = run_parity(tmp_path / "hf", tmp_path / "mlx")
    assert forward.ok and back.ok
    assert forward.spec == "hf-to-mlx"  # read from the manifest of a conversion of this source
    assert back.spec is None  # that manifest names another source: no rules to blame
    assert (back.logits, back.hidden) == (forward.logits, forward.hidden)
    same = run_parity(original, tmp_path / "hf")
    assert same.ok and same.logits["max_abs"] == 0.0 and same.logits["kl"] == 0.0
    assert all(metrics["max_abs"] == 0.0 for metrics in same.hidden.values())


# -- the command ----------------------------------------------------------------------------------


def test_command_writes_json_junit_markdown_and_exits_1_on_drift(tmp_path):
    out = {kind: tmp_path / f"parity.{kind}" for kind in ("json", "xml", "md")}
    run = _remap("parity", FIXTURES / "scratch-trained", "--spec", "scratch-to-mlx", "--tokens", 16, "--batch", 3, "--seed", 7,
                 "--json", out["json"], "--junit", out["xml"], "--markdown", out["md"])
    assert run.returncode == 1, run.stderr
    assert "first divergence: embedding" in run.stdout and "learned positions" in run.stdout
    data = json.loads(out["json"].read_text())
    jsonschema.validate(data, SCHEMA)
    assert (data["ok"], data["divergence"], data["tokens"], data["batch"], data["seed"]) == (False, "embedding", 16, 3, 7)
    failed = sum(not c["ok"] for c in data["checks"])
    _check_junit(out["xml"], failed, len(data["checks"]))
    markdown = out["md"].read_text()
    assert markdown.startswith("## remap parity: FAIL") and "**First divergence: embedding.**" in markdown
    assert "routed expert biases" in markdown and "does not hold" in markdown


def test_command_exits_0_on_parity_and_tolerances_are_flags(tmp_path):
    run = _remap("parity", FIXTURES / "hf-bf16", FIXTURES / "mlx", "--spec", "hf-to-mlx", "--json", tmp_path / "p.json",
                 "--junit", tmp_path / "p.xml")
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads((tmp_path / "p.json").read_text())
    jsonschema.validate(data, SCHEMA)
    assert data["ok"] and data["profile"] == "fp32" and data["target"]["path"].endswith("mlx")
    _check_junit(tmp_path / "p.xml", 0, len(data["checks"]))
    # an impossible KL limit: everything else passes, so the drift is in the head
    strict = _remap("parity", FIXTURES / "hf-bf16", FIXTURES / "mlx", "--spec", "hf-to-mlx", "--max-kl", 0, "--json", tmp_path / "s.json")
    assert strict.returncode == 1
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["tolerances"]["max_kl"] == 0 and data["divergence"] == "head"
    assert any(rule["rule"].endswith("lm_head.weight") for rule in data["rules"])


def test_command_exits_2_on_bad_input():
    run = _remap("parity", FIXTURES / "hf-bf16")
    assert run.returncode == 2 and "--spec" in run.stderr and "Traceback" not in run.stderr


def test_the_example_workflow_step_runs_and_fills_the_job_summary(tmp_path):
    """The `remap parity` step of examples/github-actions-parity.yml, run as GitHub runs a step
    (bash -e) with the job's default inputs."""
    workflow = yaml.safe_load((ROOT / "examples/github-actions-parity.yml").read_text())
    (job,) = workflow["jobs"].values()
    (step,) = [s for s in job["steps"] if s.get("name") == "remap parity"]
    env = {**os.environ, "CHECKPOINT": str(FIXTURES / "hf-bf16"), "SPEC": "hf-to-mlx", "VARIANT": "", "TOKENS": "16",
           "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "summary.md").read_text().startswith("## remap parity: PASS")
    data = json.loads((tmp_path / "parity.json").read_text())
    jsonschema.validate(data, SCHEMA)
    assert data["tokens"] == 16
    _check_junit(tmp_path / "parity.xml", 0, len(data["checks"]))


def test_a_checkpoint_missing_a_weight_is_bad_input_not_a_random_model(tmp_path):
    """transformers would fill the gap with random values and run: refused, as mlx-lm refuses."""
    from safetensors.numpy import load_file, save_file

    incomplete = {}
    for fixture, fmt in (("hf-bf16", "pt"), ("mlx", "mlx")):
        incomplete[fixture] = tmp_path / fixture
        incomplete[fixture].mkdir()
        (incomplete[fixture] / "config.json").write_bytes((FIXTURES / fixture / "config.json").read_bytes())
        tensors = load_file(FIXTURES / fixture / "model.safetensors")
        del tensors["model.layers.1.mlp.gate.weight"]
        save_file(tensors, incomplete[fixture] / "model.safetensors", metadata={"format": fmt})
    with pytest.raises(RemapError, match="transformers finds no weights .* model.layers.1.mlp.gate.weight"):
        run_parity(incomplete["hf-bf16"], FIXTURES / "mlx", spec="hf-to-mlx")
    with pytest.raises(RemapError, match="mlx-lm cannot load it: Missing 1 parameters: model.layers.1.mlp.gate.weight"):
        run_parity(FIXTURES / "hf-bf16", incomplete["mlx"], spec="hf-to-mlx")


# -- metrics and tolerances -----------------------------------------------------------------------


def test_metrics_see_each_kind_of_difference():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 8, 50))
    same = logit_metrics(logits, logits.copy())
    assert (same["max_abs"], same["kl"], same["top1"], same["top5"]) == (0.0, 0.0, 1.0, 1.0)
    assert same["cosine"] == pytest.approx(1.0)
    swapped = logits.copy()
    top = logits[0, 0].argmax()
    swapped[0, 0, top] = logits[0, 0].min() - 1  # the best token of one position becomes the worst
    moved = logit_metrics(logits, swapped)
    assert moved["top1"] == 1 - 1 / 16 and moved["kl"] > 0 and moved["max_abs"] > 0
    results = checks(moved, {}, PROFILES["fp32"])
    assert {c.metric for c in results if not c.ok} == {"max_rel", "top1", "top5", "kl", "cosine"}


def test_profile_follows_weight_precision_and_compute_dtype():
    assert weight_precision({"a": "BF16", "b": "F32"}) == "BF16"
    assert weight_precision({"a": "U32", "b": "BF16"}) == "quantized"
    assert profile_for("BF16", "BF16", "float32") == "fp32"
    assert profile_for("BF16", "F32", "float32") == "fp32"  # widening is exact
    assert profile_for("F32", "BF16", "float32") == "bf16"
    assert profile_for("F8_E4M3", "BF16", "float32") == "bf16"
    assert profile_for("F32", "F32", "bfloat16") == "bf16"
    assert profile_for("BF16", "quantized", "float32") == "quantized"


def test_token_ids_are_seeded_and_in_the_vocabulary():
    ids = token_ids(320, 32, 2, seed=3)
    assert ids.shape == (2, 32) and ids.min() >= 0 and ids.max() < 320
    assert np.array_equal(ids, token_ids(320, 32, 2, seed=3)) and not np.array_equal(ids, token_ids(320, 32, 2, seed=4))


# -- a recorded recipe, replayed ------------------------------------------------------------------


SHARED_SWAPPED = [
    {"to": "model.layers.{i}.mlp.shared_experts.{proj}.weight",
     "from": "model.layers.{i}.mlp.shared_experts.{proj:gate_proj|up_proj|down_proj}.weight",
     "when": "i != 1 and i < num_hidden_layers"},
    {"to": "model.layers.1.mlp.shared_experts.down_proj.weight", "from": "model.layers.1.mlp.shared_experts.down_proj.weight"},
    {"name": "layer 1 shared gate read from up", "to": "model.layers.1.mlp.shared_experts.gate_proj.weight",
     "from": "model.layers.1.mlp.shared_experts.up_proj.weight"},
    {"name": "layer 1 shared up read from gate", "to": "model.layers.1.mlp.shared_experts.up_proj.weight",
     "from": "model.layers.1.mlp.shared_experts.gate_proj.weight"},
]


def test_parity_of_a_finished_quantized_conversion_replays_its_recipe(tmp_path):
    """`remap convert --quantize 4` records the whole recipe in the manifest; `remap parity SRC DST`
    plans it again from there (the spec file, the quantization, the variant) and names the rules
    behind a planted drift, in both stages."""
    spec = _broken_hf_to_mlx(tmp_path, "model.layers.{i}.mlp.shared_experts.{proj}.weight", SHARED_SWAPPED,
                             "hf-to-mlx-shared-swapped")
    out = tmp_path / "out"
    done = _remap("convert", FIXTURES / "hf-bf16", out, "--spec", spec, "--quantize", "4", "--q-group-size", "32",
                  "--variant", "embed_q", "--quiet")
    assert done.returncode == 0, done.stderr
    recipe = json.loads((out / "remap-manifest.json").read_text())["recipe"]
    assert recipe == {"source": str((FIXTURES / "hf-bf16").resolve()), "spec": str(spec.resolve()), "inverse": False,
                      "variant": "embed_q", "params": {}, "settings": {}, "quantize": 4, "group_size": 32, "dtype": None,
                      "max_shard_size": "5GB", "revision": None, "allow_nonfinite": False}
    result = run_parity(FIXTURES / "hf-bf16", out)
    assert result.spec == "hf-to-mlx-shared-swapped+4bit" and result.profile == "quantized"
    assert not result.ok and result.divergence == "layer 1", [c.describe() for c in result.failures]
    rules = {(ref.stage, ref.rule.split("] ", 1)[1]) for ref in result.rules}
    assert {("hf-to-mlx-shared-swapped", "layer 1 shared gate read from up"),
            ("hf-to-mlx-shared-swapped", "layer 1 shared up read from gate")} <= rules
    assert any(stage == "mlx-quantize" for stage, _ in rules)
    shown = _remap("parity", FIXTURES / "hf-bf16", out)
    assert shown.returncode == 1 and "layer 1 shared gate read from up" in shown.stdout


def test_a_drift_with_a_lossless_conversion_is_put_on_the_runtimes(monkeypatch):
    """hf-to-mlx only moves bytes: if the runtimes then disagree (here mlx-lm is made to, by a
    planted shift of its logits), parity says the runtimes differ by themselves, not the spec."""
    from remap.parity import runtimes
    from remap.render.parity import _verdict

    real = runtimes.mlx_runtime

    def shifted(checkpoint, dtype):
        runtime = real(checkpoint, dtype)
        forward = runtime.forward
        runtime.forward = lambda ids: runtimes.Forward(forward(ids).logits + 0.5, forward(ids).hidden)
        return runtime

    monkeypatch.setattr(runtimes, "mlx_runtime", shifted)
    result = run_parity(FIXTURES / "hf-bf16", spec="hf-to-mlx")
    assert not result.ok and result.runtimes_disagree and result.divergence == "head"
    assert "compute this model differently by themselves" in _verdict(result)
    lossy = run_parity(FIXTURES / "scratch-trained", spec="scratch-to-mlx-exact")
    assert not lossy.ok and not lossy.runtimes_disagree  # claims break: the spec is to blame

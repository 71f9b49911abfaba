"""MLX quantization through specs: identical to mlx_lm.convert -q, declared in config.json, loaded and
run by mlx-lm, and dequantized back to transformers' layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from remap import api
from remap.layouts.mlx import MIXED_RECIPES
from remap.spec.load import MAPPINGS, parse_spec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
IDS = np.array([[0, 5, 9, 2, 77, 140, 3, 12]])


def _convert(src, dst, spec, **options):
    plan, ckpt = api.plan(src, spec, **options)
    report = api.report(plan, ckpt)
    assert report.ok, report.problems
    api.convert(plan, ckpt, dst, report=report.to_dict())
    return plan


def _mlx_logits(path):
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(path), strict=True)
    model.set_dtype(mx.float32)
    return np.array(model(mx.array(IDS)))


def _torch_logits(path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, 64), (3, 32)])
def test_quantized_output_is_what_mlx_lm_convert_writes(tmp_path, bits, group_size):
    _convert(FIXTURES / "hf-bf16", tmp_path / "ours", "hf-to-mlx", quantize=bits, group_size=group_size)
    subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(FIXTURES / "hf-bf16"),
                    "--mlx-path", str(tmp_path / "theirs"), "-q", "--q-bits", str(bits),
                    "--q-group-size", str(group_size)], check=True, capture_output=True)
    ours, theirs = api.open_source(tmp_path / "ours"), api.open_source(tmp_path / "theirs")
    assert set(ours.tensors) == set(theirs.tensors)
    assert [n for n in theirs.tensors if bytes(ours.read_bytes(n)) != bytes(theirs.read_bytes(n))] == []
    config = lambda p: json.loads((p / "config.json").read_text())
    assert config(tmp_path / "ours")["quantization"] == config(tmp_path / "theirs")["quantization"]


def test_a_mixed_recipe_declares_every_quantized_module(tmp_path):
    """A spec may give some modules other bits; config.json then names every quantized module (as
    mlx-lm's mixed recipes do), so mlx-lm builds the right shapes instead of guessing."""
    document = yaml.safe_load((MAPPINGS / "mlx-quantize.yaml").read_text())
    document["name"] = "mlx-quantize-mixed"
    document["rules"][0]["ops"][0]["bits"] = "6 if w == 'down_proj' else bits"
    mixed = parse_spec(yaml.safe_dump(document), "mixed.yaml")
    base = api.load("hf-to-mlx")
    import dataclasses

    spec = dataclasses.replace(base, name="hf-to-mlx-mixed", rules=(), parts=(base, mixed))
    _convert(FIXTURES / "hf-bf16", tmp_path / "mlx", spec, params={"bits": 4, "group_size": 32})
    config = json.loads((tmp_path / "mlx/config.json").read_text())
    block = config["quantization"]
    modules = {k: v for k, v in block.items() if isinstance(v, dict)}
    quantized = {n.removesuffix(".scales") for n in api.open_source(tmp_path / "mlx").tensors if n.endswith(".scales")}
    assert set(modules) == quantized
    six = {k for k, v in modules.items() if v["bits"] == 6}
    assert six and all(k.endswith("down_proj") for k in six)
    assert len(six) == 1 + 2 * 2  # layer 0's dense down_proj; shared_experts and switch_mlp in 2 MoE layers
    assert config["quantization_config"] == block
    assert np.isfinite(_mlx_logits(tmp_path / "mlx")).all()  # strict load: every shape as declared


@pytest.mark.parametrize("recipe", ["mixed_4_6", "mixed_3_4"])
def test_mixed_recipes_write_what_mlx_lm_convert_writes(tmp_path, recipe):
    _convert(FIXTURES / "hf-bf16", tmp_path / "ours", "hf-to-mlx", quantize=recipe)
    low = MIXED_RECIPES[recipe][0]
    subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(FIXTURES / "hf-bf16"),
                    "--mlx-path", str(tmp_path / "theirs"), "-q", "--q-bits", str(low), "--quant-predicate", recipe,
                    "--q-group-size", "64"],  # without it mlx-lm writes "group_size": null per module (read as 64)
                   check=True, capture_output=True)
    ours, theirs = api.open_source(tmp_path / "ours"), api.open_source(tmp_path / "theirs")
    assert set(ours.tensors) == set(theirs.tensors)
    assert [n for n in theirs.tensors if bytes(ours.read_bytes(n)) != bytes(theirs.read_bytes(n))] == []
    config = lambda p: json.loads((p / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        assert config(tmp_path / "ours")[key] == config(tmp_path / "theirs")[key]


@pytest.mark.parametrize("layers", [1, 7, 8, 9, 16, 27, 61])
def test_mixed_recipe_bits_are_mlx_lms_predicate_at_any_depth(layers):
    """Which modules get the high bits, layer by layer, against mlx-lm's own predicate run on its
    own model (the fixture's 3 layers put every layer in the first eighth)."""
    from mlx.utils import tree_flatten
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.models import deepseek_v3

    from helpers import HF_BASE
    from remap.ops import TensorType
    from remap.planner import build_plan

    raw = {**HF_BASE, "num_hidden_layers": layers, "tie_word_embeddings": False}
    model = deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(raw))
    tensors = {n: TensorType(tuple(a.shape), "BF16") for n, a in tree_flatten(model.parameters())}
    plan = build_plan(api.load("mlx-quantize"), tensors, raw, params={"bits": 3, "group_size": 32, "high_bits": 6})
    ours = {s.outputs[0].name.removesuffix(".weight"): op.bits for s in plan.steps for op in s.ops}
    predicate = mixed_quant_predicate_builder("mixed_3_6", model, group_size=32)
    theirs = {path: predicate(path, module)["bits"] for path, module in model.named_modules()
              if hasattr(module, "to_quantized") and module.weight.shape[-1] % 32 == 0}
    assert ours == theirs
    assert 6 in ours.values() and 3 in ours.values()


@pytest.mark.parametrize("fixture, spec", [("hf-bf16", "hf-to-mlx"), ("hf-fp8-mtp", "hf-fp8-to-mlx"),
                                           ("scratch-compatible", "scratch-to-mlx")])
def test_quantized_mlx_loads_generates_and_agrees_with_the_float_model(tmp_path, fixture, spec):
    _convert(FIXTURES / fixture, tmp_path / "float", spec)
    _convert(FIXTURES / fixture, tmp_path / "q8", spec, quantize=8, group_size=32)
    reference, quantized = _mlx_logits(tmp_path / "float"), _mlx_logits(tmp_path / "q8")
    assert (reference.argmax(-1) == quantized.argmax(-1)).mean() >= 0.85
    import mlx.core as mx
    from mlx_lm import generate, load

    model, tokenizer = load(str(tmp_path / "q8"))
    model.set_dtype(mx.float32)
    assert isinstance(generate(model, tokenizer, prompt="remap", max_tokens=2), str)


def test_quantized_mlx_back_to_transformers(tmp_path):
    """mlx-to-hf dequantizes with the declared bits, then undoes hf-to-mlx; transformers loads it and
    computes what the 8-bit MLX model computes, up to the bf16 rounding of the dequantized weights."""
    _convert(FIXTURES / "hf-bf16", tmp_path / "q8", "hf-to-mlx", quantize=8, group_size=32)
    _convert(tmp_path / "q8", tmp_path / "hf", "mlx-to-hf")
    torch_logits, mlx_logits = _torch_logits(tmp_path / "hf"), _mlx_logits(tmp_path / "q8")
    assert np.abs(torch_logits - mlx_logits).max() < 3e-2 * np.abs(mlx_logits).max()
    cosine = (torch_logits * mlx_logits).sum() / np.linalg.norm(torch_logits) / np.linalg.norm(mlx_logits)
    assert cosine > 0.999
    original = _torch_logits(FIXTURES / "hf-bf16")  # and close to the model before quantization
    assert (original * torch_logits).sum() / np.linalg.norm(original) / np.linalg.norm(torch_logits) > 0.99


def test_stacked_experts_quantize_one_expert_at_a_time():
    """The quantize stage takes the earlier stage's stacked experts slab by slab (never the whole
    stack in memory), and the slabs assemble to the whole tensor's quantization."""
    from remap.compute import StagedReader, step_outputs, step_pieces
    from remap.ops.quant import QuantizeMLX

    plan, ckpt = api.plan(FIXTURES / "hf-bf16", "hf-to-mlx", quantize=4)
    read = StagedReader(plan.stages, ckpt.load)
    step = next(s for s in plan.steps if s.outputs[0].name.endswith("switch_mlp.up_proj.weight"))
    experts = step.outputs[0].shape[0]
    pieces = list(step_pieces(step, read))
    assert [index for index, _ in pieces] == list(range(experts))
    assert read.piece_nbytes(step) * experts == plan.last.source_tensors[step.sources[0]].nbytes

    whole = QuantizeMLX(bits=4, group_size=64).apply([read(step.sources[0])])
    assert all(np.array_equal(a, b) for a, b in zip(step_outputs(step, read), whole))

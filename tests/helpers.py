"""Small shared helpers for tests: tiny configs, synthetic headers, in-memory plan execution."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

from remap import dtypes
from remap.compute import StagedReader, step_outputs
from remap.layouts import get_layout
from remap.ops import TensorType
from remap.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
CLI_ENV = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}  # rich's default: 80 columns


def remap(*args) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, from the repository root, as a user's shell runs it."""
    return subprocess.run([sys.executable, "-m", "remap.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=CLI_ENV)


HF_BASE = dict(
    model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
    kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8,
    first_k_dense_replace=1, n_group=2, topk_group=1,
)
# The from-scratch model's DeepSeekConfig fields (remap/layouts/scratch.py).
SCRATCH_BASE = dict(
    vocab_size=64, block_size=32, n_layer=3, n_embd=32, n_head=4, kv_lora_rank=16, q_lora_rank=24, rope_dim=8,
    n_experts=4, n_experts_per_token=2, expert_intermediate_size=16, shared_expert_intermediate_size=24, mtp_num_heads=0,
)


def scratch_compatible(data: dict, config: Mapping) -> None:
    """Make random scratch tensors a compatible checkpoint, in place: zero wpe and MLP biases,
    every head's rope key equal to head 0's, buffers holding what the model computes."""
    from remap.fills import fill_values

    heads = config["n_head"]
    for name, array in data.items():
        if name == "wpe.weight" or (".mlp." in name and name.endswith(".bias")):
            array[...] = 0
        elif name.endswith("k_rope_proj.weight"):
            per_head = array.reshape(heads, -1, array.shape[-1])
            per_head[...] = per_head[0]
        elif name.endswith((".inv_freq", ".causal_mask")):
            array[...] = fill_values("rope_inv_freq" if name.endswith(".inv_freq") else "tril", array.shape, array.dtype)


# Mistral4ForCausalLM configs (fixture sizes). "untied": yarn rope whose original context (8) is
# shorter than parity's 32 tokens, so llama-4 query scaling changes the result, and group-limited
# routing; "tied": the routing of a from-scratch DeepSeek-V3 (softmax top-k over all experts,
# renormalised) with llama-4 scaling off (beta 0), no q LoRA, tied embeddings (no lm_head), MoE
# from layer 0. Both use yarn: transformers 5.23's Mistral4 rope of type "default" ignores
# partial_rotary_factor and cannot run (its cos / sin span the whole qk head).
_MISTRAL4_SIZES = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
    num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
)
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
TINY_MISTRAL4 = {
    "untied": dict(_MISTRAL4_SIZES, num_hidden_layers=3, q_lora_rank=48, first_k_dense_replace=1, n_shared_experts=1,
                   n_group=2, topk_group=1, tie_word_embeddings=False,
                   rope_parameters={**_YARN, "llama_4_scaling_beta": 0.1}),
    "tied": dict(_MISTRAL4_SIZES, num_hidden_layers=2, q_lora_rank=None, first_k_dense_replace=0, n_shared_experts=2,
                 n_group=1, topk_group=1, tie_word_embeddings=True,
                 rope_parameters={**_YARN, "llama_4_scaling_beta": 0.0}),
}

# DeepseekV2ForCausalLM configs (fixture sizes). "v2" has DeepSeek-V2's shape: q LoRA, group-limited
# routing, 16 routed experts (an expert order that sorts "10" before "2" would show), 2 shared,
# qk_nope_head_dim 16 != v_head_dim 32, a dense first layer, a routed scaling factor. "lite" has
# DeepSeek-V2-Lite's: no q LoRA, greedy routing over all experts. Both carry the releases' yarn
# rope (mscale 0.707); "plain" is V2-Lite's shape with the plain rope transformers uses without one.
_V2_SIZES = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
    num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, max_position_embeddings=32,
    n_shared_experts=2, first_k_dense_replace=1, bos_token_id=0, eos_token_id=1,
)
V2_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 32, "beta_slow": 1,
           "mscale": 0.707, "mscale_all_dim": 0.707}
TINY_DEEPSEEK_V2 = {
    "v2": dict(_V2_SIZES, num_hidden_layers=3, q_lora_rank=48, v_head_dim=32, n_routed_experts=16,
               num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4, topk_group=2,
               routed_scaling_factor=2.0, rope_scaling=V2_YARN),
    "lite": dict(_V2_SIZES, num_hidden_layers=2, q_lora_rank=None, v_head_dim=16, n_routed_experts=8,
                 num_experts_per_tok=2, topk_method="greedy", rope_scaling=V2_YARN),
    "plain": dict(_V2_SIZES, num_hidden_layers=2, q_lora_rank=None, v_head_dim=16, n_routed_experts=8,
                  num_experts_per_tok=2, topk_method="greedy"),
}

_DTYPE = {"float": "BF16", "float8_e4m3fn": "F8_E4M3", "float32": "F32", "uint32": "U32"}


def layout_tensors(layout: str, config: Mapping, variant: str | None = None, float_dtype: str = "BF16") -> dict[str, TensorType]:
    """The headers a checkpoint of `layout` would have for `config` (names, shapes, dtypes)."""
    lay = get_layout(layout)
    expected = lay.expected(lay.read_config(config), variant)
    return {n: TensorType(e.shape, float_dtype if e.dtype == "float" else _DTYPE[e.dtype]) for n, e in expected.items()}


def random_tensors(types: Mapping[str, TensorType], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, t in types.items():
        values = rng.standard_normal(t.shape).astype(np.float32)
        if t.dtype == "F8_E4M3":
            out[name] = values.astype(ml_dtypes.float8_e4m3fn)
        else:
            out[name] = values.astype(dtypes.numpy_dtype(t.dtype))
    return out


def run_plan(plan: Plan, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Execute a plan in memory (same step code as the streaming executor)."""
    read = StagedReader(plan.stages, data.__getitem__)
    result = {}
    for step in plan.steps:
        for output, array in zip(step.outputs, step_outputs(step, read)):
            result[output.name] = array
    return result


def types_of(data: Mapping[str, np.ndarray]) -> dict[str, TensorType]:
    return {n: TensorType(a.shape, dtypes.dtype_name(a.dtype)) for n, a in data.items()}


def save_checkpoint(path, config: Mapping, tensors: Mapping[str, np.ndarray]) -> None:
    """A checkpoint directory as transformers saves one: model.safetensors and config.json."""
    import json
    from pathlib import Path

    from safetensors.numpy import save_file

    Path(path).mkdir(parents=True, exist_ok=True)
    save_file(dict(tensors), Path(path) / "model.safetensors", metadata={"format": "pt"})
    (Path(path) / "config.json").write_text(json.dumps(dict(config)))

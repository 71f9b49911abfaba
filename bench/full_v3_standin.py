"""Header-only stand-ins for the official FP8 checkpoints: DeepSeek-V3 (163 shards, 91,991
tensors) and Kimi-K2 (`--model kimi-k2`: 61 shards, 139,583 tensors).

Every file has the real names, shapes and dtypes in its safetensors header and the right size,
but its data section is a hole (a sparse file): the planner reads only headers, so this is all it
needs, and it costs a few MB of disk instead of 690 GB (1 TB for Kimi-K2).

    python bench/full_v3_standin.py /tmp/dsv3-standin
    python bench/full_v3_standin.py /tmp/kimi-k2-standin --model kimi-k2
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from remap.io.shards import plan_shards, write_index
from remap.io.writer import _layout  # header bytes exactly as ShardWriter writes them
from remap.layouts import get_layout

FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
# DeepSeek-V3's config.json (the values that shape tensors), as published.
CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True, "num_nextn_predict_layers": 1,
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "quantization_config": FP8,
}
# Kimi-K2-Instruct's config.json (moonshotai, July 2025), the values that shape tensors, route and
# rotate: DeepSeek-V3's architecture with 384 experts, 64 heads, one dense layer, no MTP layer.
KIMI_K2 = {
    **CONFIG, "model_type": "kimi_k2", "vocab_size": 163840, "num_attention_heads": 64, "num_key_value_heads": 64,
    "n_routed_experts": 384, "routed_scaling_factor": 2.827, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "num_nextn_predict_layers": 0, "max_position_embeddings": 131072,
    "rope_theta": 50000.0, "scoring_func": "sigmoid",
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
}
# model -> (config.json, hf variant, shards)
MODELS: dict[str, tuple[dict[str, Any], str, int]] = {
    "deepseek-v3": (CONFIG, "fp8-mtp", 163),
    "kimi-k2": (KIMI_K2, "fp8", 61),
}
DTYPE = {"float": "BF16", "float8_e4m3fn": "F8_E4M3", "float32": "F32"}
ITEMSIZE = {"BF16": 2, "F8_E4M3": 1, "F32": 4}


def main(out: Path, model: str = "deepseek-v3") -> None:
    write_standin(out, *MODELS[model])


def write_standin(out: Path, config: dict[str, Any], variant: str, count: int) -> None:
    """Headers of every tensor the hf layout expects for `config`, in `count` files."""
    out.mkdir(parents=True, exist_ok=True)
    hf = get_layout("hf")
    expected = hf.expected(hf.read_config(config), variant)
    entries = [(e.name, DTYPE[e.dtype], e.shape) for e in expected.values()]
    size = sum(math.prod(shape) * ITEMSIZE[dtype] for _, dtype, shape in entries)
    # the largest shard size that still gives the release's number of files
    shards = plan_shards(entries, max_shard_size=size // (count - 1))
    for shard in shards:
        header, _, file_size = _layout(shard.entries, {"format": "pt"})
        with open(out / shard.file, "wb") as f:
            f.write(header)
            f.truncate(file_size)  # a hole: no data blocks on disk
    write_index(out, shards)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    print(f"{out}: {len(shards)} shards, {len(entries)} tensors, {size / 1e9:.0f} GB declared")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path("/tmp/dsv3-standin"))
    parser.add_argument("--model", choices=list(MODELS), default="deepseek-v3")
    arguments = parser.parse_args()
    main(arguments.out, arguments.model)

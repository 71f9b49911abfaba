"""A header-only stand-in for the official DeepSeek-V3 FP8 checkpoint (163 shards, 91,991 tensors).

Every file has the real names, shapes and dtypes in its safetensors header and the right size,
but its data section is a hole (a sparse file): the planner reads only headers, so this is all it
needs, and it costs a few MB of disk instead of 690 GB.

    python bench/full_v3_standin.py /tmp/dsv3-standin
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from remap.io.shards import plan_shards, write_index
from remap.io.writer import _layout  # header bytes exactly as ShardWriter writes them
from remap.layouts import get_layout

# DeepSeek-V3's config.json (the values that shape tensors), as published.
CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True, "num_nextn_predict_layers": 1,
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
}
DTYPE = {"float": "BF16", "float8_e4m3fn": "F8_E4M3", "float32": "F32"}
SHARDS = 163
ITEMSIZE = {"BF16": 2, "F8_E4M3": 1, "F32": 4}


def write_standin(out: Path, config: dict, variant: str, shards: int) -> None:
    """Header-only files of the hf layout's `variant` for `config`, cut into `shards` files."""
    out.mkdir(parents=True, exist_ok=True)
    hf = get_layout("hf")
    expected = hf.expected(hf.read_config(config), variant)
    entries = [(e.name, DTYPE[e.dtype], e.shape) for e in expected.values()]
    size = sum(math.prod(shape) * ITEMSIZE[dtype] for _, dtype, shape in entries)
    # the largest shard size that still gives `shards` files
    planned = plan_shards(entries, max_shard_size=size // (shards - 1))
    for shard in planned:
        header, _, file_size = _layout(shard.entries, {"format": "pt"})
        with open(out / shard.file, "wb") as f:
            f.write(header)
            f.truncate(file_size)  # a hole: no data blocks on disk
    write_index(out, planned)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    print(f"{out}: {len(planned)} shards, {len(entries)} tensors, {size / 1e9:.0f} GB declared")


def main(out: Path) -> None:
    write_standin(out, CONFIG, "fp8-mtp", SHARDS)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/dsv3-standin"))

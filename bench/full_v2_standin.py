"""A header-only stand-in for the bf16 DeepSeek-V2 (236B) checkpoint (29,102 tensors, 471 GB).

Like bench/full_v3_standin.py: the real names, shapes and dtypes in every safetensors header,
the data sections holes. The planner reads only headers, so

    python bench/full_v2_standin.py /tmp/dsv2-standin
    remap report /tmp/dsv2-standin --spec hf-to-mlx --no-check-data

plans the whole conversion to mlx-lm's deepseek_v2 from them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from full_v3_standin import write_standin

# DeepSeek-V2's config.json (deepseek-ai/DeepSeek-V2), the values that shape tensors or routing
# and its rope, as published; DeepSeek-V2-Chat has the same.
CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 60,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 2, "n_routed_experts": 160,
    "routed_scaling_factor": 16.0, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "group_limited_greedy", "n_group": 8,
    "topk_group": 3, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "norm_topk_prob": False, "scoring_func": "softmax", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
    "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                          "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
SHARDS = 55  # the release's model-000NN-of-000055 files; planning does not depend on the count


def main(out: Path) -> None:
    write_standin(out, CONFIG, "bf16", SHARDS)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/dsv2-standin"))

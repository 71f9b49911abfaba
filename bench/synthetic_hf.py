"""A synthetic DeepSeek-V3-shaped HF checkpoint, written tensor by tensor (no model is built).

Shapes come from remap's `hf` layout for a mid-size config (hidden 2048, 64 routed experts (`--experts`) of
width 1408, kv_lora_rank 512, vocab 102400); the number of layers sets the size. Values are
random bf16 (N(0, 0.02)), sharded as save_pretrained would (5 GB files + index), with a tiny
byte-level tokenizer so mlx_lm.convert accepts the directory.

    python bench/synthetic_hf.py OUT --layers 2      # ~2.1 GB (1 dense + 1 MoE layer)
    python bench/synthetic_hf.py OUT --layers 6      # ~6.6 GB
    python bench/synthetic_hf.py OUT --layers 5 --fp8  # ~3.2 GB, the official FP8 form (e4m3 + 128x128 scales)
    python bench/synthetic_hf.py OUT --full-width --layers 2 --fp8  # ~15.9 GB: DeepSeek-V3's own widths

--full-width takes DeepSeek-V3's own config (hidden 7168, 128 heads, q_lora_rank 1536, 256 routed
experts of width 2048 + 1 shared, vocab 129280, its grouped routing) with the number of layers
given, the first of them dense: at 2 layers, one dense and one MoE layer.

FP8 weights are quantized as the release's are: per 128x128 block, the largest magnitude maps to
448 (e4m3's largest finite value), so every code is finite.
"""

from __future__ import annotations

import argparse
import json
import math
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

from remap.io.shards import plan_shards, write_index
from remap.io.writer import ShardWriter
from remap.layouts import get_layout


def config(layers: int, experts: int = 64) -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 102400,
        "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 16,
        "n_shared_experts": 2, "n_routed_experts": experts, "num_experts_per_tok": 6, "kv_lora_rank": 512,
        "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
        "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
        "norm_topk_prob": True, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "num_nextn_predict_layers": 0,
    }


def full_width_config(layers: int) -> dict:
    """DeepSeek-V3's config.json, cut to `layers` decoder layers (the first dense) and no MTP layer."""
    return {**config(layers), "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
            "moe_intermediate_size": 2048, "num_attention_heads": 128, "num_key_value_heads": 128,
            "n_shared_experts": 1, "n_routed_experts": 256, "num_experts_per_tok": 8, "q_lora_rank": 1536,
            "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "max_position_embeddings": 163840,
            "scoring_func": "sigmoid", "topk_method": "noaux_tc"}


def tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["remap converts deepseek checkpoints between stacks"] * 10, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>"}))


def values(name: str, shape: tuple[int, ...], noise: np.ndarray) -> np.ndarray:
    """Random values, drawn from a pool at an offset the name decides (generating 3e9 fresh normals
    would dominate; the name, so that a weight's block scales can be computed from it anywhere)."""
    offset = zlib.crc32(name.encode()) % noise.size
    return np.resize(np.roll(noise, offset), math.prod(shape)).reshape(shape)


def fp8_blocks(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(e4m3 codes, float32 scale per 128x128 block) of a 2-D weight, as DeepSeek's release
    quantizes: each block's largest magnitude maps to 448, e4m3's largest finite value, so every
    code is finite."""
    rows, cols = weight.shape
    padded = np.zeros((-(-rows // 128) * 128, -(-cols // 128) * 128), np.float32)
    padded[:rows, :cols] = weight
    blocks = padded.reshape(padded.shape[0] // 128, 128, padded.shape[1] // 128, 128)
    scale = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-12) / 448
    codes = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols]
    return codes.astype(ml_dtypes.float8_e4m3fn), scale.astype(np.float32)


def tensor(name: str, dtype: str, shapes: dict[str, tuple[int, ...]], noise: np.ndarray,
           scales: dict[str, np.ndarray]) -> np.ndarray:
    """The values of tensor `name` (`shapes`: every tensor's shape, for a scale's weight; `scales`:
    the block scales of FP8 weights already written, so that quantizing is done once a weight)."""
    if dtype == "F8_E4M3":
        codes, scales[name] = fp8_blocks(values(name, shapes[name], noise).astype(np.float32))
        return codes
    if name.endswith(".weight_scale_inv"):  # the block scales of the weight of the same name
        weight = name.removesuffix("_scale_inv")
        if weight in scales:
            return scales.pop(weight)
        return fp8_blocks(values(weight, shapes[weight], noise).astype(np.float32))[1]
    data = values(name, shapes[name], noise)
    return data.astype(np.float32) if dtype == "F32" else data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=64, help="routed experts per MoE layer")
    parser.add_argument("--fp8", action="store_true", help="e4m3 weights + float32 weight_scale_inv, as released")
    parser.add_argument("--full-width", action="store_true", help="DeepSeek-V3's own widths (hidden 7168, 256 experts)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = full_width_config(args.layers) if args.full_width else config(args.layers, args.experts)
    if args.fp8:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}
    hf = get_layout("hf")
    expected = hf.expected(hf.read_config(cfg), "fp8" if args.fp8 else "bf16")
    dtype = {"float": "BF16", "float8_e4m3fn": "F8_E4M3", "float32": "F32"}
    shards = plan_shards([(e.name, dtype[e.dtype], e.shape) for e in expected.values()], "5GB")
    shapes = {entry.name: entry.shape for shard in shards for entry in shard.entries}
    noise = (np.random.default_rng(0).standard_normal(1 << 22, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    scales: dict[str, np.ndarray] = {}
    for shard in shards:
        with ShardWriter(args.out / shard.file, shard.entries, {"format": "pt"}) as writer:
            for entry in shard.entries:
                writer.write(entry.name, tensor(entry.name, entry.dtype, shapes, noise, scales))
    if len(shards) > 1:
        write_index(args.out, shards)
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2))
    tokenizer(args.out)
    total = sum(s.nbytes for s in shards)
    print(f"{args.out}: {len(expected)} tensors, {len(shards)} files, {total / 1e9:.2f} GB")


if __name__ == "__main__":
    main()

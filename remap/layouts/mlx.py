"""The `mlx` layout: what mlx-lm's `deepseek_v3.Model` holds (mlx-lm 0.32).

Routed experts are stacked per layer as `model.layers.{i}.mlp.switch_mlp.{gate,up,down}_proj.weight`
of shape [experts, out, in]. mlx-lm's `sanitize` drops the MTP layer, so the layout has none, and
the model always holds its own `lm_head` (mlx-lm ignores tie_word_embeddings here).

Variants, differing only in how attention's kv_b_proj is held:
  embed_q    what current mlx-lm holds and writes: per head, `self_attn.embed_q.weight`
             [heads, kv_lora_rank, qk_nope_head_dim] (the key half of kv_b_proj, transposed) and
             `self_attn.unembed_out.weight` [heads, v_head_dim, kv_lora_rank] (the value half).
  kv_b_proj  `self_attn.kv_b_proj.weight` [heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]
             as in transformers: what exo shards and older mlx-community checkpoints carry;
             mlx-lm's sanitize turns it into embed_q / unembed_out at load.

Quantized MLX weights (uint32-packed `weight` + `scales` + `biases`, sized by config.json's
`quantization` group_size and bits) are not described yet: `expected` refuses a quantized config
rather than guess. They follow from the config, as in mlx-lm, so they will not need a variant.
"""

from __future__ import annotations

from typing import Any, Mapping

from remap.errors import RemapError
from remap.layouts.base import FLOAT, Expected
from remap.layouts.hf import config_error, normalised_config

# mlx-lm loads these model types with deepseek_v3 (the first is its own; the others through
# mlx_lm.utils.MODEL_REMAPPING).
MODEL_TYPES = ("deepseek_v3", "kimi_k2", "joyai_llm_flash")

# mlx_lm.models.deepseek_v3.ModelArgs defaults (mlx-lm 0.32) for the keys that shape tensors or
# routing. ModelArgs.from_dict keeps only its own fields, so nothing else in config.json counts.
_MODEL_ARGS_DEFAULTS: dict[str, Any] = {
    "vocab_size": 102400,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "moe_intermediate_size": 1407,
    "num_hidden_layers": 30,
    "num_attention_heads": 32,
    "n_shared_experts": None,
    "n_routed_experts": None,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "n_group": 1,
    "topk_group": 1,
    "num_experts_per_tok": 1,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 0,
    "attention_bias": False,
}


def read_mlx_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """config.json as mlx-lm's deepseek_v3 ModelArgs reads it."""
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise config_error(f"model_type is {model_type!r}", "model_type", " or ".join(MODEL_TYPES))
    values = {key: raw.get(key, default) for key, default in _MODEL_ARGS_DEFAULTS.items()}
    values.update(
        model_type=model_type,
        scoring_func="sigmoid",  # the only routing mlx-lm's deepseek_v3 implements
        mlp_bias=False,
        tie_word_embeddings=False,  # lm_head always exists
        num_nextn_predict_layers=0,  # sanitize drops the MTP layer
        quantization_config=raw.get("quantization"),  # the key mlx-lm quantizes by
    )
    return normalised_config(values)


def _is_moe(i: int, c: Mapping[str, Any]) -> bool:
    return (
        c["n_routed_experts"] is not None
        and i >= c["first_k_dense_replace"]
        and i % c["moe_layer_freq"] == 0
    )


def _linear(name: str, rows: int, cols: int, bias: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{name}.weight", (rows, cols))] + ([(f"{name}.bias", (rows,))] if bias else [])


def _mlp(p: str, hidden: int, width: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        *_linear(f"{p}.gate_proj", width, hidden),
        *_linear(f"{p}.up_proj", width, hidden),
        *_linear(f"{p}.down_proj", hidden, width),
    ]


def _attention(p: str, c: Mapping[str, Any], variant: str) -> list[tuple[str, tuple[int, ...]]]:
    hidden, heads, bias = c["hidden_size"], c["num_attention_heads"], c["attention_bias"]
    nope, rope, v, rank = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    if c["q_lora_rank"] is None:
        tensors = _linear(f"{p}.q_proj", heads * (nope + rope), hidden)
    else:
        q_rank = c["q_lora_rank"]
        tensors = [
            *_linear(f"{p}.q_a_proj", q_rank, hidden, bias),
            (f"{p}.q_a_layernorm.weight", (q_rank,)),
            *_linear(f"{p}.q_b_proj", heads * (nope + rope), q_rank),
        ]
    tensors += _linear(f"{p}.kv_a_proj_with_mqa", rank + rope, hidden, bias)
    tensors.append((f"{p}.kv_a_layernorm.weight", (rank,)))
    if variant == "embed_q":
        tensors += [(f"{p}.embed_q.weight", (heads, rank, nope)), (f"{p}.unembed_out.weight", (heads, v, rank))]
    else:
        tensors += _linear(f"{p}.kv_b_proj", heads * (nope + v), rank)
    return tensors + _linear(f"{p}.o_proj", hidden, heads * v, bias)


def _layer(i: int, c: Mapping[str, Any], variant: str) -> list[tuple[str, tuple[int, ...]]]:
    p, hidden = f"model.layers.{i}", c["hidden_size"]
    tensors = [(f"{p}.input_layernorm.weight", (hidden,)), (f"{p}.post_attention_layernorm.weight", (hidden,))]
    tensors += _attention(f"{p}.self_attn", c, variant)
    if not _is_moe(i, c):
        return tensors + _mlp(f"{p}.mlp", hidden, c["intermediate_size"])
    experts, width = c["n_routed_experts"], c["moe_intermediate_size"]
    tensors += [
        (f"{p}.mlp.gate.weight", (experts, hidden)),
        (f"{p}.mlp.gate.e_score_correction_bias", (experts,)),
        (f"{p}.mlp.switch_mlp.gate_proj.weight", (experts, width, hidden)),
        (f"{p}.mlp.switch_mlp.up_proj.weight", (experts, width, hidden)),
        (f"{p}.mlp.switch_mlp.down_proj.weight", (experts, hidden, width)),
    ]
    if c["n_shared_experts"] is not None:
        tensors += _mlp(f"{p}.mlp.shared_experts", hidden, width * c["n_shared_experts"])
    return tensors


class MlxLayout:
    name = "mlx"
    variants = ("embed_q", "kv_b_proj")

    def write_config(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return write_config(raw)

    def read_config(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return read_mlx_config(raw)

    def expected(self, config: Mapping[str, Any], variant: str | None = None) -> dict[str, Expected]:
        variant = variant or self.variants[0]
        if variant not in self.variants:
            raise RemapError(f"unknown variant {variant!r}", rule="layout mlx", expected=", ".join(self.variants))
        if config["quantization_config"]:
            raise RemapError(
                "quantized MLX weights (uint32 weight + scales + biases) are not supported yet",
                rule="config.json quantization",
                expected="an unquantized MLX checkpoint",
            )
        c = config
        hidden, vocab = c["hidden_size"], c["vocab_size"]
        tensors = [("model.embed_tokens.weight", (vocab, hidden))]
        for i in range(c["num_hidden_layers"]):
            tensors += _layer(i, c, variant)
        tensors += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
        return {name: Expected(name, shape, FLOAT) for name, shape in tensors}


def write_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A config.json as mlx-lm reads it, from one transformers 5 wrote: mlx-lm reads a top-level
    `rope_theta` / `rope_scaling` (not `rope_parameters`) and `torch_dtype` (not `dtype`); missing,
    it would silently fall back to its defaults."""
    out = dict(raw)
    rope = raw.get("rope_parameters") or {}
    if "rope_theta" not in out and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    if "rope_scaling" not in out and rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = {"type": rope["rope_type"], **{k: v for k, v in rope.items() if k != "rope_theta"}}
    if "torch_dtype" not in out and "dtype" in out:
        out["torch_dtype"] = out["dtype"]
    return out


LAYOUT = MlxLayout()

"""config.json as mlx-lm reads it, into the config namespace every layout shares (CONFIG_KEYS,
remap.layouts.hf_config), and the config.json a conversion into the `mlx` layout writes.

Each model type is read as the mlx-lm module that loads it reads it (mlx-lm 0.32): its ModelArgs'
own defaults, and, for the namespace keys a ModelArgs lacks, what its model does. `_READERS` is
the one list of model types the layout accepts (MODEL_TYPES).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from remap.layouts.hf_config import INDEXER_KEYS, config_error, normalised_config

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
# mlx_lm.models.deepseek_v32.ModelArgs: the same defaults, plus its indexer's.
_V32_MODEL_ARGS_DEFAULTS: dict[str, Any] = {
    **_MODEL_ARGS_DEFAULTS,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 2048,
}
# mlx_lm.models.deepseek_v2.ModelArgs: deepseek_v3's sizes, its own routing defaults ("gready"
# [sic] is its default; its MoEGate limits groups only for "group_limited_greedy"), and no
# norm_topk_prob field.
_V2_MODEL_ARGS_DEFAULTS: dict[str, Any] = {
    **{key: value for key, value in _MODEL_ARGS_DEFAULTS.items() if key != "norm_topk_prob"},
    "topk_method": "gready",
    "n_group": None,
    "topk_group": None,
    "num_experts_per_tok": None,
}

# mlx_lm.models.mistral4.ModelArgs (mlx-lm 0.32): its keys that shape tensors or routing, and the
# other fields it has no default for. from_dict fails on a config.json without any _REQUIRED one.
_REQUIRED = object()
_MISTRAL4_MODEL_ARGS: dict[str, Any] = {
    **{key: _REQUIRED for key in (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
        "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "norm_topk_prob",
        "n_group", "topk_group", "num_experts_per_tok", "first_k_dense_replace",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps")},
    "tie_word_embeddings": False,
    "attention_bias": False,
}
# Mistral4Model.__call__ reads these of rope_parameters (ModelArgs default: None) for the llama-4
# query scale, at every call: without them mlx-lm loads the model but cannot run it.
MISTRAL4_ROPE_KEYS = ("llama_4_scaling_beta", "original_max_position_embeddings")


def _namespace(raw: Mapping[str, Any], args: Mapping[str, Any], **model: Any) -> dict[str, Any]:
    """The namespace from a ModelArgs' fields (`args`: defaults) and what the model fixes (`model`).
    None of mlx-lm's DeepSeek modules has MLP biases or keeps an MTP layer (sanitize drops it)."""
    values = {key: raw.get(key, default) for key, default in args.items()}
    values.update((key, values.get(key)) for key in INDEXER_KEYS)  # null: no indexer
    values.update(
        mlp_bias=False,
        num_nextn_predict_layers=0,
        quantization_config=_read_quantization(raw.get("quantization")),  # the key mlx-lm quantizes by
        **model,
    )
    return normalised_config(values)


def _read_deepseek_v3_args(raw: Mapping[str, Any]) -> dict[str, Any]:
    v32 = raw["model_type"] == "deepseek_v32"
    return _namespace(raw, _V32_MODEL_ARGS_DEFAULTS if v32 else _MODEL_ARGS_DEFAULTS,
                      model_type=raw["model_type"],
                      scoring_func="sigmoid",  # the only routing mlx-lm's deepseek_v3 implements
                      tie_word_embeddings=False)  # lm_head always exists


def _read_deepseek_v2_args(raw: Mapping[str, Any]) -> dict[str, Any]:
    # Every attention builds its yarn rope from rope_scaling["factor"]: without it, no model.
    rope = raw.get("rope_scaling")
    if not (isinstance(rope, Mapping) and "factor" in rope):
        raise config_error(f"rope_scaling is {rope!r}", "rope_scaling",
                           "an object with factor (mlx-lm's deepseek_v2 builds its yarn rope from it)")
    return _namespace(raw, _V2_MODEL_ARGS_DEFAULTS,
                      model_type="deepseek_v2",
                      scoring_func="softmax",  # softmax over all experts, no correction bias
                      norm_topk_prob=False,  # its MoEGate never renormalises the top-k weights
                      tie_word_embeddings=False)  # lm_head always exists


def _read_mistral4_args(raw: Mapping[str, Any]) -> dict[str, Any]:
    missing = [key for key, default in _MISTRAL4_MODEL_ARGS.items() if default is _REQUIRED and key not in raw]
    if missing:
        raise config_error(f"{missing[0]} is missing", missing[0],
                           "every field mlx-lm's mistral4 ModelArgs requires: " + ", ".join(missing))
    rope = raw.get("rope_parameters")
    if not (isinstance(rope, Mapping) and all(key in rope for key in MISTRAL4_ROPE_KEYS)):
        raise config_error(f"rope_parameters is {rope!r}", "rope_parameters",
                           "an object with " + " and ".join(MISTRAL4_ROPE_KEYS) + " (mlx-lm's llama-4 query scale)")
    return _namespace(raw, _MISTRAL4_MODEL_ARGS,
                      model_type="mistral4",
                      moe_layer_freq=1,  # not a field: every layer from first_k_dense_replace on is MoE
                      topk_method=None,  # softmax scores, groups ranked by their top-2 sum, no correction bias
                      scoring_func="softmax")


# The model types the layout accepts, each with the reading of the mlx-lm module that loads it:
# deepseek_v3 (kimi_k2 and joyai_llm_flash through mlx_lm.utils.MODEL_REMAPPING), and
# deepseek_v2, deepseek_v32 and mistral4 with modules of their own.
_READERS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "deepseek_v3": _read_deepseek_v3_args,
    "kimi_k2": _read_deepseek_v3_args,
    "joyai_llm_flash": _read_deepseek_v3_args,
    "deepseek_v2": _read_deepseek_v2_args,
    "deepseek_v32": _read_deepseek_v3_args,
    "mistral4": _read_mistral4_args,
}
MODEL_TYPES = tuple(_READERS)


def read_mlx_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """config.json as the ModelArgs of the mlx-lm module that loads its model_type reads it."""
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in _READERS:
        raise config_error(f"model_type is {model_type!r}", "model_type", " or ".join(MODEL_TYPES))
    return _READERS[model_type](raw)


def _read_quantization(raw: Any) -> dict[str, Any] | None:
    """config.json's `quantization` as mlx-lm reads it: affine defaults plus per-module entries."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise config_error(f"quantization is {raw!r}", "quantization", "an object with group_size and bits")
    for module, params in [("quantization", raw), *((k, v) for k, v in raw.items() if isinstance(v, Mapping))]:
        for key in ("group_size", "bits"):
            value = params.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise config_error(f"{module} {key} is {value!r}", f"quantization {key}", "a positive integer")
        if params.get("mode", "affine") != "affine":
            raise config_error(f"{module} mode is {params['mode']!r}", "quantization mode",
                               "affine (mxfp4 / mxfp8 / nvfp4 weights are not described)")
    for key, value in raw.items():
        if key not in ("group_size", "bits", "mode") and not (value is False or isinstance(value, Mapping)):
            raise config_error(f"quantization {key} is {value!r}", f"quantization {key}", "false or an object")
    return dict(raw)


# What mlx-lm's deepseek_v2 needs of rope_scaling where transformers runs the plain rope: a yarn
# rope of factor 1 is the plain rope (no frequency change, mscale 1, no attention scale).
PLAIN_V2_ROPE = {"type": "default", "factor": 1.0}


def write_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A config.json as mlx-lm reads it, from one transformers 5 wrote: mlx-lm's deepseek models
    read a top-level `rope_theta` / `rope_scaling` (not `rope_parameters`) and `torch_dtype` (not
    `dtype`); missing, they would silently fall back to their defaults (deepseek_v2 fails to
    build without rope_scaling: PLAIN_V2_ROPE). mistral4 reads `rope_parameters` itself: its
    config.json stays as transformers wrote it, as mlx_lm.convert leaves it."""
    out = dict(raw)
    if raw.get("model_type") == "mistral4":
        return out
    rope = raw.get("rope_parameters") or {}
    if "rope_theta" not in out and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    if "rope_scaling" not in out and rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = {"type": rope["rope_type"], **{k: v for k, v in rope.items() if k != "rope_theta"}}
    if "rope_scaling" not in out and raw.get("model_type") == "deepseek_v2":
        out["rope_scaling"] = dict(PLAIN_V2_ROPE)
    if "torch_dtype" not in out and "dtype" in out:
        out["torch_dtype"] = out["dtype"]
    return out

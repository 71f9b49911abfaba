"""config.json as transformers reads it, into the config namespace every layout shares.

The namespace is HF DeepSeek-V3's config.json key names (CONFIG_KEYS); `normalised_config` builds
it from any layout's reading, so the layouts cannot drift apart. `read_transformers_config` is the
`hf` layout's reading: the defaults and aliases of transformers' own config classes (5.23) for
every model type the layout accepts (MODEL_TYPES). quantization_config is read by
remap.layouts.hf_fp8 (the FP8 forms).
"""

from __future__ import annotations

from typing import Any, Mapping

from remap.errors import RemapError
from remap.layouts.hf_fp8 import fp8_scheme, read_quantization_config

# The keys spec expressions see, whichever layout read the config.
CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "n_shared_experts",
    "first_k_dense_replace",
    "moe_layer_freq",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "topk_method",
    "scoring_func",
    "routed_scaling_factor",
    "norm_topk_prob",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
    "num_nextn_predict_layers",
    "index_n_heads",
    "index_head_dim",
    "index_topk",
    "quantization_config",
)
# DeepSeek-V3.2's sparse-attention indexer; null in every other model (no indexer).
INDEXER_KEYS = ("index_n_heads", "index_head_dim", "index_topk")
# Tensor sizes: integers >= 0. Null means "absent" for the nullable ones (no q LoRA; mlx-lm builds
# a dense model without n_routed_experts and no shared expert without n_shared_experts; no indexer).
_SIZES = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "first_k_dense_replace", "moe_layer_freq", "num_nextn_predict_layers",
)
_NULLABLE_SIZES = ("q_lora_rank", "n_routed_experts", "n_shared_experts", *INDEXER_KEYS)

# DeepseekV3Config / DeepseekV32Config / DeepseekV2Config / Mistral4Config defaults (transformers
# 5.23) for the keys that shape tensors or routing. Keys the class lacks are filled as its model
# behaves (comments).
_TRANSFORMERS_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": {
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "first_k_dense_replace": 3,
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": 1,  # the class's num_mtp_layers
    },
    "deepseek_v2": {
        "vocab_size": 102400,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "moe_intermediate_size": 1407,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "first_k_dense_replace": 0,
        "num_experts_per_tok": None,
        "n_group": None,
        "topk_group": None,
        "topk_method": "greedy",
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": False,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": 0,  # DeepSeek-V2 has no MTP
    },
}
_TRANSFORMERS_DEFAULTS["deepseek_v32"] = {
    **_TRANSFORMERS_DEFAULTS["deepseek_v3"],  # DeepseekV32Config repeats V3's defaults
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 2048,
    # not a DeepseekV32Config field: the official config.json states 1, and the model ignores
    # the MTP layer on load (model.layers.61.*)
    "num_nextn_predict_layers": 1,
}
# Mistral4: DeepSeek-V3's MLA and MoE blocks (routed experts saved fused: hf.FUSED_EXPERTS) with
# Mistral's router and llama-4 query scaling (rope_parameters; no tensor of its own).
_TRANSFORMERS_DEFAULTS["mistral4"] = {
    "vocab_size": 131072,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "q_lora_rank": 1024,
    "kv_lora_rank": 256,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 128,
    "n_shared_experts": 1,
    "first_k_dense_replace": 0,
    "num_experts_per_tok": 4,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 1.0,
    "norm_topk_prob": True,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "mlp_bias": False,  # not a field: Mistral4MLP has no biases
    "num_nextn_predict_layers": 0,  # not a field: no MTP
}
# The classes' attribute_map: a config.json may spell these keys either way.
_ALIASES = {
    "deepseek_v3": {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"},
    "deepseek_v2": {"num_experts": "n_routed_experts"},
    "deepseek_v32": {"num_local_experts": "n_routed_experts", "num_experts": "n_routed_experts"},
    "mistral4": {"num_local_experts": "n_routed_experts"},
}
# Model types transformers 5.23 has no class for whose checkpoints are DeepSeek-V3's, read and run
# as the architecture named here: mlx-lm loads them with deepseek_v3 (mlx_lm.utils.MODEL_REMAPPING),
# transformers' own Kimi-K2.5 config turns a kimi_k2 text_config into deepseek_v3, and Moonshot's
# Kimi-K2 config.json names DeepseekV3ForCausalLM (its remote code is DeepSeek-V3's). The config
# keeps its model_type: it is what tells engines which model it is.
ARCHITECTURE_OF = {"kimi_k2": "deepseek_v3", "joyai_llm_flash": "deepseek_v3"}
MODEL_TYPES = (*_TRANSFORMERS_DEFAULTS, *ARCHITECTURE_OF)
# The router each class hard-codes, as (topk_method, scoring_func); V2's reads topk_method from the
# config. V3 and V3.2: sigmoid scores, group top-k corrected by e_score_correction_bias. Mistral4:
# softmax scores, groups ranked by their top-2 sum, no correction bias, which is none of
# DeepSeek's topk_methods (None).
_ROUTING: dict[str, tuple[str | None, str]] = {
    "deepseek_v3": ("noaux_tc", "sigmoid"),
    "deepseek_v32": ("noaux_tc", "sigmoid"),
    "mistral4": (None, "softmax"),
}

# Layer and expert counts multiply into the number of tensors a layout lists (the full
# DeepSeek-V3: 62 layers x 256 experts). A hostile config.json saying 10**12 layers must be
# refused before the listing, not exhaust memory making it; this allows 250x DeepSeek-V3.
MAX_LAYER_EXPERTS = 1 << 22


def config_error(message: str, key: str, expected: str) -> RemapError:
    return RemapError(message, rule=f"config.json {key}", expected=expected)


def normalised_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """Exactly CONFIG_KEYS from `values` (every key must be there), with the sizes checked."""
    config = {key: values[key] for key in CONFIG_KEYS}
    for key in (*_SIZES, *_NULLABLE_SIZES):
        value = config[key]
        if value is None and key in _NULLABLE_SIZES:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise config_error(f"{key} is {value!r}", key, "an integer >= 0")
    if config["moe_layer_freq"] == 0:
        raise config_error("moe_layer_freq is 0", "moe_layer_freq", "an integer >= 1")
    indexer = [config[key] is not None for key in INDEXER_KEYS]
    if any(indexer) and not all(indexer):
        raise config_error(f"{dict((k, config[k]) for k in INDEXER_KEYS)}", "index_n_heads",
                           "all three indexer sizes, or none (no indexer)")
    if all(indexer) and config["q_lora_rank"] is None:
        raise config_error("q_lora_rank is None", "q_lora_rank",
                           "an integer: DeepSeek-V3.2's indexer reads the q LoRA latent")
    layers = config["num_hidden_layers"] + config["num_nextn_predict_layers"]
    if layers * max(1, config["n_routed_experts"] or 0) > MAX_LAYER_EXPERTS:
        raise config_error(
            f"{layers} layers x {config['n_routed_experts']} routed experts is beyond any model",
            "num_hidden_layers",
            f"layers x experts <= {MAX_LAYER_EXPERTS}",
        )
    return config


def read_transformers_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """config.json as transformers' config class of its model_type (MODEL_TYPES) reads it; a
    model type transformers has no class for (ARCHITECTURE_OF) as its architecture's class does."""
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise config_error(f"model_type is {model_type!r}", "model_type", " or ".join(MODEL_TYPES))
    architecture = ARCHITECTURE_OF.get(model_type, model_type)
    values = dict(_TRANSFORMERS_DEFAULTS[architecture])
    for alias, key in _ALIASES[architecture].items():
        if alias in raw and key not in raw:
            values[key] = raw[alias]
    values.update((key, raw[key]) for key in _TRANSFORMERS_DEFAULTS[architecture] if key in raw)
    if architecture == "deepseek_v32" and raw.get("mlp_layer_types") is not None:
        # V3.2 builds each layer from mlp_layer_types (first_k_dense_replace only fills it in)
        values["first_k_dense_replace"] = _dense_prefix(raw["mlp_layer_types"], values["num_hidden_layers"])
    topk_method, scoring_func = _ROUTING.get(architecture, (values.get("topk_method"), "softmax"))  # V2: its own
    values.update(
        model_type=model_type,
        # transformers builds a MoE block at every layer from first_k_dense_replace on, whatever
        # moe_layer_freq says (every release has 1).
        moe_layer_freq=1,
        topk_method=topk_method,
        scoring_func=scoring_func,
        mlp_bias=values.get("mlp_bias", False),
        **{key: values.get(key) for key in INDEXER_KEYS},
        quantization_config=read_quantization_config(raw.get("quantization_config")),
    )
    for key in ("n_routed_experts", "n_shared_experts"):  # transformers' MoE block needs both
        if values[key] is None:
            raise config_error(f"{key} is None", key, "an integer >= 0")
    return normalised_config(values)


def _dense_prefix(types: Any, layers: Any) -> int:
    """How many leading layers mlp_layer_types makes dense; a layout lists dense layers first."""
    dense = types.count("dense") if isinstance(types, list) else -1
    if not (isinstance(layers, int) and 0 <= dense <= layers
            and types == ["dense"] * dense + ["sparse"] * (layers - dense)):
        raise config_error(f"mlp_layer_types is {types!r}", "mlp_layer_types",
                           f"{layers} entries: 'dense' layers first, then 'sparse'")
    return dense


def fp8_block(config: Mapping[str, Any]) -> tuple[int, int] | None:
    """The block of a config's FP8 scales; None where there is one per tensor or per channel."""
    return fp8_scheme(config.get("quantization_config")).block

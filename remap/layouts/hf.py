"""The `hf` layout: DeepSeek-V2/V3/V3.2 as transformers saves them, and the official HF checkpoints.

Names are transformers' (`model.layers.{i}.self_attn.kv_b_proj.weight`, ...). transformers 5.23
fuses routed experts in memory but `save_pretrained` writes one tensor per expert
(`mlp.experts.{e}.gate_proj.weight`); the on-disk names are the layout.

Variants:
  bf16      what DeepseekV3/V32/V2ForCausalLM.save_pretrained writes. "bf16"
            names the unquantized family: f32 or f16 files have the same tensors.
  bf16-mtp  bf16 plus the multi-token-prediction modules of the official checkpoints, one per
            num_nextn_predict_layers at `model.layers.{num_hidden_layers + k}`: a full decoder
            block plus embed_tokens, enorm, hnorm, eh_proj, shared_head.norm, shared_head.head.
            transformers ignores them on load.
  fp8       the official DeepSeek-V3 quantization: every linear projection of attention and MLP
            (dense, shared and routed experts) in float8_e4m3fn, each with a float32
            `weight_scale_inv` of one value per quantization_config.weight_block_size block
            (default 128 x 128). Embeddings, norms, router and lm_head stay unquantized.
  fp8-mtp   the official release as shipped: fp8 plus MTP, whose decoder block is quantized like
            any other and whose eh_proj, embed_tokens and shared_head.head are not.

DeepSeek-V3.2 (model_type deepseek_v32) is V3 plus a lightning indexer in every attention block,
`self_attn.indexer.{wq_b, wk, k_norm, weights_proj}` (k_norm a LayerNorm: weight and bias). The
official FP8 release quantizes wq_b and wk like any other linear and keeps weights_proj unquantized:
DeepSeek-V3.2-Exp's inference/model.py (github.com/deepseek-ai/DeepSeek-V3.2-Exp at 3b99a535,
2025-10-02) builds weights_proj in the default dtype and every other Linear in fp8 with a block
scale, and loads the converted checkpoint strictly; transformers' DeepseekV32 keeps
`indexer.weights_proj` in float32 (`_keep_in_fp32_modules`), which its FP8 quantizer skips.

The config namespace of every DeepSeek layout is HF DeepSeek-V3's config.json key names
(CONFIG_KEYS); `normalised_config` builds it, so the layouts cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Mapping

from remap.errors import RemapError
from remap.layouts.base import F32, FLOAT, FP8, Expected, Layout, Sections

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

# DeepseekV3Config / DeepseekV32Config / DeepseekV2Config defaults (transformers 5.23) for the keys
# that shape tensors or routing. Keys the class lacks are filled as its model behaves (comments).
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
# The classes' attribute_map: a config.json may spell these keys either way.
_ALIASES = {
    "deepseek_v3": {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"},
    "deepseek_v2": {"num_experts": "n_routed_experts"},
    "deepseek_v32": {"num_local_experts": "n_routed_experts", "num_experts": "n_routed_experts"},
}
MODEL_TYPES = tuple(_TRANSFORMERS_DEFAULTS)

DEFAULT_FP8_BLOCK = (128, 128)
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
    """config.json as transformers' DeepseekV3Config / DeepseekV32Config / DeepseekV2Config reads it."""
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in _TRANSFORMERS_DEFAULTS:
        raise config_error(f"model_type is {model_type!r}", "model_type", " or ".join(MODEL_TYPES))
    values = dict(_TRANSFORMERS_DEFAULTS[model_type])
    for alias, key in _ALIASES[model_type].items():
        if alias in raw and key not in raw:
            values[key] = raw[alias]
    values.update((key, raw[key]) for key in _TRANSFORMERS_DEFAULTS[model_type] if key in raw)
    v3 = model_type != "deepseek_v2"
    if model_type == "deepseek_v32" and raw.get("mlp_layer_types") is not None:
        # V3.2 builds each layer from mlp_layer_types (first_k_dense_replace only fills it in)
        values["first_k_dense_replace"] = _dense_prefix(raw["mlp_layer_types"], values["num_hidden_layers"])
    values.update(
        model_type=model_type,
        # transformers builds a MoE block at every layer from first_k_dense_replace on, whatever
        # moe_layer_freq says (every DeepSeek release has 1).
        moe_layer_freq=1,
        # V3's router is always sigmoid + bias-corrected group top-k; V2's always softmax.
        topk_method="noaux_tc" if v3 else values["topk_method"],
        scoring_func="sigmoid" if v3 else "softmax",
        mlp_bias=values.get("mlp_bias", False),
        **{key: values.get(key) for key in INDEXER_KEYS},
        quantization_config=_quantization_config(raw.get("quantization_config")),
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


def _quantization_config(value: Any) -> dict[str, Any] | None:
    """null, or an object whose weight_block_size (default 128 x 128) is two positive integers."""
    if value is None:
        return None
    block = (value.get("weight_block_size") or DEFAULT_FP8_BLOCK) if isinstance(value, dict) else None
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(_is_count(b) and b > 0 for b in block)):
        raise config_error(f"quantization_config is {value!r}", "quantization_config",
                           'null, or an object with "weight_block_size": [rows, cols]')
    return value


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def fp8_block(config: Mapping[str, Any]) -> tuple[int, int]:
    block = (config.get("quantization_config") or {}).get("weight_block_size") or DEFAULT_FP8_BLOCK
    return (int(block[0]), int(block[1]))


def fp8_scale_shape(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """One scale per block, partial blocks at the edges included."""
    return (-(-rows // block[0]), -(-cols // block[1]))


class ExpectedTensors:
    """Collects one variant's tensors; `linear` knows whether and how the variant quantizes.

    With a block size, quantized linears get an FP8 weight and a float32 block scale named
    `{module}.{scale}` (`weight_scale_inv` here, `scale` in DeepSeek's own files).
    """

    def __init__(self, block: tuple[int, int] | None, scale: str = "weight_scale_inv"):
        self.block = block
        self.scale = scale
        self.out: dict[str, Expected] = {}

    def add(self, name: str, shape: tuple[int, ...], dtype: str = FLOAT) -> None:
        self.out[name] = Expected(name, shape, dtype)

    def linear(self, name: str, rows: int, cols: int, *, bias: bool = False, quantized: bool = True) -> None:
        if self.block and quantized:
            self.add(f"{name}.weight", (rows, cols), FP8)
            self.add(f"{name}.{self.scale}", fp8_scale_shape(rows, cols, self.block), F32)
        else:
            self.add(f"{name}.weight", (rows, cols))
        if bias:
            self.add(f"{name}.bias", (rows,))


def _attention(t: ExpectedTensors, p: str, c: Mapping[str, Any]) -> None:
    hidden, heads, bias = c["hidden_size"], c["num_attention_heads"], c["attention_bias"]
    qk_head = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    if c["q_lora_rank"] is None:
        t.linear(f"{p}.q_proj", heads * qk_head, hidden)
    else:
        t.linear(f"{p}.q_a_proj", c["q_lora_rank"], hidden, bias=bias)
        t.add(f"{p}.q_a_layernorm.weight", (c["q_lora_rank"],))
        t.linear(f"{p}.q_b_proj", heads * qk_head, c["q_lora_rank"])
    t.linear(f"{p}.kv_a_proj_with_mqa", c["kv_lora_rank"] + c["qk_rope_head_dim"], hidden, bias=bias)
    t.add(f"{p}.kv_a_layernorm.weight", (c["kv_lora_rank"],))
    t.linear(f"{p}.kv_b_proj", heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"])
    t.linear(f"{p}.o_proj", hidden, heads * c["v_head_dim"], bias=bias)
    if c["index_n_heads"] is not None:
        indexer(t, f"{p}.indexer", c)


def indexer(t: ExpectedTensors, p: str, c: Mapping[str, Any]) -> None:
    """DeepSeek-V3.2's lightning indexer, under the same names in transformers and DeepSeek's
    model.py: wq_b and wk quantize like any linear, weights_proj never does."""
    heads, dim = c["index_n_heads"], c["index_head_dim"]
    t.linear(f"{p}.wq_b", heads * dim, c["q_lora_rank"])
    t.linear(f"{p}.wk", dim, c["hidden_size"])
    t.add(f"{p}.k_norm.weight", (dim,))
    t.add(f"{p}.k_norm.bias", (dim,))
    t.linear(f"{p}.weights_proj", heads, c["hidden_size"], quantized=False)


def _mlp(t: ExpectedTensors, p: str, hidden: int, width: int, bias: bool = False) -> None:
    t.linear(f"{p}.gate_proj", width, hidden, bias=bias)
    t.linear(f"{p}.up_proj", width, hidden, bias=bias)
    t.linear(f"{p}.down_proj", hidden, width, bias=bias)


def _decoder_layer(t: ExpectedTensors, i: int, c: Mapping[str, Any]) -> None:
    p, hidden = f"model.layers.{i}", c["hidden_size"]
    t.add(f"{p}.input_layernorm.weight", (hidden,))
    t.add(f"{p}.post_attention_layernorm.weight", (hidden,))
    _attention(t, f"{p}.self_attn", c)
    if i < c["first_k_dense_replace"]:
        _mlp(t, f"{p}.mlp", hidden, c["intermediate_size"], c["mlp_bias"])
        return
    experts = c["n_routed_experts"]
    t.add(f"{p}.mlp.gate.weight", (experts, hidden))
    if c["topk_method"] == "noaux_tc":
        # float32 in the official checkpoints; save_pretrained writes the model's dtype
        t.add(f"{p}.mlp.gate.e_score_correction_bias", (experts,), F32 if t.block else FLOAT)
    for e in range(experts):
        _mlp(t, f"{p}.mlp.experts.{e}", hidden, c["moe_intermediate_size"])
    _mlp(t, f"{p}.mlp.shared_experts", hidden, c["moe_intermediate_size"] * c["n_shared_experts"], c["mlp_bias"])


def _mtp_extras(t: ExpectedTensors, i: int, c: Mapping[str, Any]) -> None:
    p, hidden, vocab = f"model.layers.{i}", c["hidden_size"], c["vocab_size"]
    t.add(f"{p}.embed_tokens.weight", (vocab, hidden))
    t.add(f"{p}.enorm.weight", (hidden,))
    t.add(f"{p}.hnorm.weight", (hidden,))
    t.linear(f"{p}.eh_proj", hidden, 2 * hidden, quantized=False)
    t.add(f"{p}.shared_head.norm.weight", (hidden,))
    t.add(f"{p}.shared_head.head.weight", (vocab, hidden))


# transformers' (and mlx-lm's) names for what parity compares.
TRANSFORMERS_SECTIONS = Sections(("model.embed_tokens.",), "model.layers.{i}.", ("model.norm.", "lm_head."))


class HfLayout(Layout):
    name = "hf"
    variants = ("bf16", "bf16-mtp", "fp8", "fp8-mtp")
    format = "pt"
    sections = TRANSFORMERS_SECTIONS

    def read_config(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return read_transformers_config(raw)

    def keeps_dtype(self, name: str) -> bool:
        return name.endswith(".weight_scale_inv")  # FP8 block scales are float32 by definition

    def runtime(self, checkpoint, dtype: str):
        from remap.parity.runtimes import transformers_runtime

        return transformers_runtime(checkpoint, dtype)

    def expected(self, config: Mapping[str, Any], variant: str | None = None) -> dict[str, Expected]:
        variant = self.variant(variant)
        c = config
        t = ExpectedTensors(fp8_block(c) if variant.startswith("fp8") else None)
        hidden, vocab = c["hidden_size"], c["vocab_size"]
        t.add("model.embed_tokens.weight", (vocab, hidden))
        layers = c["num_hidden_layers"]
        for i in range(layers):
            _decoder_layer(t, i, c)
        t.add("model.norm.weight", (hidden,))
        if not c["tie_word_embeddings"]:
            t.add("lm_head.weight", (vocab, hidden))
        if variant.endswith("-mtp"):
            for i in range(layers, layers + c["num_nextn_predict_layers"]):
                _decoder_layer(t, i, c)
                _mtp_extras(t, i, c)
        return t.out


LAYOUT = HfLayout()

"""The `scratch` layout: a from-scratch PyTorch DeepSeek-V3 with GPT-2 style names.

Names follow nanoGPT (`wte`, `wpe`, `h.{i}`, `ln_f`) plus `mtp_heads.{d}`. The attention keeps
the separate projections a from-scratch MLA is usually written with (`kv_proj`, `k_rope_proj`
with one rope key per head, `k_decompress`, `v_decompress`), every MLP linear has a bias, and
the shared expert may be wider than the routed ones. docs/layouts/scratch.md defines the
forward and when it equals DeepSeek-V3's; remap/parity/scratch_model.py implements it.
"""

from __future__ import annotations

from typing import Any, Mapping

from remap.errors import RemapError
from remap.layouts.base import Expected, Layout, Sections
from remap.layouts.hf import MAX_LAYER_EXPERTS

MODEL_TYPE = "deepseek_v3_scratch"

# The RMSNorms on the q and kv latents use a fixed eps, whatever rms_norm_eps says:
# transformers, mlx-lm and DeepSeek's own inference code all hardcode 1e-6 there, so a fixed
# value is what lets a scratch model equal DeepSeek-V3 for any rms_norm_eps.
LATENT_NORM_EPS = 1e-6

# Sizes with no sensible default: a config must state them. q_lora_rank may be null.
REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_intermediate_size",
    "n_routed_experts",
    "num_experts_per_tok",
    "max_position_embeddings",
)

# Where a config is silent: what the seed-003 model did (no dense layers, unscaled normalised
# top-k weights, eps 1e-6, theta 10000, tied lm_head), and no MTP heads.
DEFAULTS: dict[str, Any] = {
    "first_k_dense_replace": 0,
    "routed_scaling_factor": 1.0,
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "num_nextn_predict_layers": 0,
    "tie_word_embeddings": True,
}

# What the format fixes, in the HF DeepSeek-V3 names every layout's config shares: one shared
# expert, DeepSeek-V3's sigmoid top-k with a single group and no stored correction bias (zero),
# MLP biases, no attention biases, no quantization, no rope scaling, no sparse-attention indexer
# (DeepSeek-V3.2's). A config.json may state them, but only with these values.
FIXED: dict[str, Any] = {
    "n_shared_experts": 1,
    "moe_layer_freq": 1,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "attention_bias": False,
    "mlp_bias": True,
    "quantization_config": None,
    "rope_scaling": None,
    "index_n_heads": None,
    "index_head_dim": None,
    "index_topk": None,
}


def _bad(message: str, key: str, expected: str) -> RemapError:
    return RemapError(message, rule=f"config.json {key}", expected=expected)


def _positive_int(raw: Mapping[str, Any], key: str) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _bad(f"{key} is {value!r}", key, "a positive integer")
    return value


def read_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The scratch config.json with defaults filled; idempotent (a read config reads the same).

    Returns the HF DeepSeek-V3 keys every layout's config has (hf.CONFIG_KEYS, so one spec
    expression reads any source) plus what only this format needs: shared_intermediate_size,
    max_position_embeddings (wpe), rms_norm_eps, rope_theta.
    """
    model_type = raw.get("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        raise _bad(f"model_type is {model_type!r}", "model_type", repr(MODEL_TYPE))
    missing = [key for key in REQUIRED if key not in raw]
    if missing:
        raise _bad(f"missing {', '.join(missing)}", missing[0], "every size of the scratch format")
    for key, value in FIXED.items():
        if raw.get(key, value) != value:
            raise _bad(f"{key} is {raw[key]!r}: the scratch format fixes it", key, repr(value))

    config: dict[str, Any] = {"model_type": MODEL_TYPE, **FIXED}
    for key in REQUIRED:
        if key == "q_lora_rank" and raw[key] is None:
            config[key] = None  # a plain q_proj instead of q_a_proj / q_a_norm / q_b_proj
        else:
            config[key] = _positive_int(raw, key)
    for key, default in DEFAULTS.items():
        config[key] = raw.get(key, default)
    for key in ("first_k_dense_replace", "num_nextn_predict_layers"):
        if isinstance(config[key], bool) or not isinstance(config[key], int):
            raise _bad(f"{key} is {config[key]!r}", key, "an integer")
    for key in ("routed_scaling_factor", "rms_norm_eps", "rope_theta"):
        if isinstance(config[key], bool) or not isinstance(config[key], (int, float)):
            raise _bad(f"{key} is {config[key]!r}", key, "a number")
        config[key] = float(config[key])
    for key in ("norm_topk_prob", "tie_word_embeddings"):
        if not isinstance(config[key], bool):
            raise _bad(f"{key} is {config[key]!r}", key, "true or false")

    if config["qk_rope_head_dim"] % 2:
        raise _bad("RoPE rotates pairs of dims", "qk_rope_head_dim", "an even number")
    if config["num_experts_per_tok"] > config["n_routed_experts"]:
        raise _bad("more experts per token than experts", "num_experts_per_tok", "<= n_routed_experts")
    if not 0 <= config["first_k_dense_replace"] <= config["num_hidden_layers"]:
        raise _bad("dense layers out of range", "first_k_dense_replace", "0..num_hidden_layers")
    if config["num_nextn_predict_layers"] < 0:
        raise _bad("negative number of MTP heads", "num_nextn_predict_layers", ">= 0")
    layers = config["num_hidden_layers"] + config["num_nextn_predict_layers"]
    if layers * config["n_routed_experts"] > MAX_LAYER_EXPERTS:  # refused before listing them
        raise _bad(f"{layers} layers x {config['n_routed_experts']} routed experts is beyond any model",
                   "num_hidden_layers", f"layers x experts <= {MAX_LAYER_EXPERTS}")
    return config


def _mlp(prefix: str, hidden: int, width: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (f"{prefix}gate_proj.weight", (width, hidden)),
        (f"{prefix}gate_proj.bias", (width,)),
        (f"{prefix}up_proj.weight", (width, hidden)),
        (f"{prefix}up_proj.bias", (width,)),
        (f"{prefix}down_proj.weight", (hidden, width)),
        (f"{prefix}down_proj.bias", (hidden,)),
    ]


def _attention(prefix: str, c: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    hidden, heads, rank = c["hidden_size"], c["num_attention_heads"], c["kv_lora_rank"]
    qk_head = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    if c["q_lora_rank"] is None:
        query = [(f"{prefix}q_proj.weight", (heads * qk_head, hidden))]
    else:
        q_rank = c["q_lora_rank"]
        query = [
            (f"{prefix}q_a_proj.weight", (q_rank, hidden)),
            (f"{prefix}q_a_norm.weight", (q_rank,)),
            (f"{prefix}q_b_proj.weight", (heads * qk_head, q_rank)),
        ]
    return query + [
        (f"{prefix}kv_proj.weight", (rank, hidden)),
        (f"{prefix}kv_norm.weight", (rank,)),
        (f"{prefix}k_rope_proj.weight", (heads * c["qk_rope_head_dim"], hidden)),
        # a full (nope + rope) slot per head, of which only the first nope rows are used
        (f"{prefix}k_decompress.weight", (heads * qk_head, rank)),
        (f"{prefix}v_decompress.weight", (heads * c["v_head_dim"], rank)),
        (f"{prefix}o_proj.weight", (hidden, heads * c["v_head_dim"])),
    ]


def _block(prefix: str, c: Mapping[str, Any], moe: bool) -> list[tuple[str, tuple[int, ...]]]:
    hidden = c["hidden_size"]
    tensors = [(f"{prefix}ln_1.weight", (hidden,)), (f"{prefix}ln_2.weight", (hidden,))]
    tensors += _attention(f"{prefix}attn.", c)
    if not moe:
        return tensors + _mlp(f"{prefix}mlp.", hidden, c["intermediate_size"])
    tensors.append((f"{prefix}mlp.router.weight", (c["n_routed_experts"], hidden)))
    for e in range(c["n_routed_experts"]):
        tensors += _mlp(f"{prefix}mlp.experts.{e}.", hidden, c["moe_intermediate_size"])
    return tensors + _mlp(f"{prefix}mlp.shared_expert.", hidden, c["shared_intermediate_size"])


class ScratchLayout(Layout):
    name = "scratch"
    variants = ("default",)
    format = "pt"
    sections = Sections(("wte.", "wpe."), "h.{i}.", ("ln_f.", "lm_head."))

    def read_config(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return read_config(raw)

    def runtime(self, checkpoint, dtype: str):
        from remap.parity.runtimes import scratch_runtime

        return scratch_runtime(checkpoint, dtype)

    def expected(self, config: Mapping[str, Any], variant: str | None = None) -> dict[str, Expected]:
        self.variant(variant)
        c = config
        hidden, vocab = c["hidden_size"], c["vocab_size"]
        tensors = [
            ("wte.weight", (vocab, hidden)),
            ("wpe.weight", (c["max_position_embeddings"], hidden)),
            ("ln_f.weight", (hidden,)),
        ]
        if not c["tie_word_embeddings"]:
            tensors.append(("lm_head.weight", (vocab, hidden)))
        for i in range(c["num_hidden_layers"]):
            tensors += _block(f"h.{i}.", c, moe=i >= c["first_k_dense_replace"])
        for d in range(c["num_nextn_predict_layers"]):
            prefix = f"mtp_heads.{d}."
            tensors += [
                (f"{prefix}norm_e.weight", (hidden,)),
                (f"{prefix}norm_h.weight", (hidden,)),
                (f"{prefix}proj.weight", (hidden, 2 * hidden)),
            ]
            tensors += _block(f"{prefix}block.", c, moe=True)  # DeepSeek's MTP block is MoE
        return {name: Expected(name, shape) for name, shape in tensors}


LAYOUT = ScratchLayout()

"""The `scratch` layout: the state dict of the from-scratch PyTorch DeepSeek-V3 that seed 003 converted.

Provenance: github.com/Mayankpratapsingh022/DeepSeek-from-Scratch at cd9a8d8 (models/*.py); its
trainer saves `torch.save(model.state_dict(), "best_deepseek_v3.pt")`, a bare `.pt` with no
config.json. Facts, not code, carried over here (docs/layouts/scratch.md has the forward):

    wte.weight [V, D]   wpe.weight [block, D]   ln_f.weight [D]   lm_head.weight [V, D] (tied to wte)
    h.{i}.ln_1.weight, h.{i}.ln_2.weight [D]
    h.{i}.attn.kv_proj [c, D]  kv_norm [c]  k_decompress, v_decompress [H*hd, c]
               q_proj [q, D]  q_decompress [H*hd, q]  k_rope_proj [H*r, D]  q_rope_proj [H*r, q]
               o_proj.weight [D, H*hd] (+ .bias [D] with config.bias)
               buffers rope.inv_freq [r/2], causal_mask [1, 1, block, block]
    h.{i}.mlp.router.weight [E, D]   buffer h.{i}.mlp.expert_bias [E]
               experts.{e}.{gate,up}_proj [w, D], down_proj [D, w] (+ biases with config.bias)
               shared_expert.* the same at width sw (with config.use_shared_expert)
    mtp_heads.{d}.combine_proj [D, 2D] (+ bias), norm1, norm2, attn_norm, mlp_norm [D], attn.*, mlp.*

with hd = n_embd / n_head. Every layer is MoE. Its config.json, where one exists, is the
`DeepSeekConfig` dataclass's fields (n_embd, n_head, rope_dim, ...); without one, the sizes are read
off the tensors' shapes (`infer_config`), all but `n_experts_per_token`, which no shape shows.
Spec expressions see the config under HF DeepSeek-V3 names (hidden_size, qk_nope_head_dim = hd, ...).
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from remap.errors import RemapError
from remap.layouts.base import Expected, Layout, Sections
from remap.layouts.hf import MAX_LAYER_EXPERTS, normalised_config

# DeepSeekConfig's fields and defaults (models/config.py). Training-only fields (dropout,
# aux_loss_weight, mtp_loss_weight) shape no tensor and are passed through untouched.
UPSTREAM_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257, "block_size": 128, "n_layer": 6, "n_embd": 384, "n_head": 6,
    "kv_lora_rank": 128, "q_lora_rank": 192, "rope_dim": 32,
    "n_experts": 4, "n_experts_per_token": 2, "expert_intermediate_size": 512,
    "shared_expert_intermediate_size": 768, "use_shared_expert": True,
    "mtp_num_heads": 2, "bias": True,
}
# What the model fixes, whatever a config says: RMSNorm eps 1e-6 (outside the root), rope theta
# 10000 (RotaryEmbedding), and a tied head.
RMS_NORM_EPS = 1e-6
ROPE_THETA = 10000.0
# No shape tells how many experts a token takes: read from a config, else the dataclass default.
ASSUMED = ("n_experts_per_token",)

_INT_KEYS = tuple(k for k, v in UPSTREAM_DEFAULTS.items() if not isinstance(v, bool))


def _bad(message: str, key: str, expected: str) -> RemapError:
    return RemapError(message, rule=f"config.json {key}", expected=expected)


def _upstream(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The DeepSeekConfig the model was built with: `raw`'s fields over the dataclass defaults."""
    if "model_type" in raw:  # a transformers or mlx config.json is not this model's
        raise _bad(f"model_type is {raw['model_type']!r}", "model_type",
                   "no model_type: the from-scratch model's config is its DeepSeekConfig fields (n_embd, n_head, ...)")
    values = {**UPSTREAM_DEFAULTS, **{k: raw[k] for k in UPSTREAM_DEFAULTS if k in raw}}
    for key in _INT_KEYS:
        if isinstance(values[key], bool) or not isinstance(values[key], int) or values[key] <= 0:
            if not (key == "mtp_num_heads" and values[key] == 0):
                raise _bad(f"{key} is {values[key]!r}", key, "a positive integer")
    for key in ("use_shared_expert", "bias"):
        if not isinstance(values[key], bool):
            raise _bad(f"{key} is {values[key]!r}", key, "true or false")
    if values["n_embd"] % values["n_head"]:
        raise _bad(f"n_embd {values['n_embd']} is not a multiple of n_head {values['n_head']}", "n_head",
                   "n_head dividing n_embd (head_dim = n_embd / n_head)")
    if values["rope_dim"] % 2:
        raise _bad("RoPE rotates pairs of dims", "rope_dim", "an even number")
    if values["n_experts_per_token"] > values["n_experts"]:
        raise _bad("more experts per token than experts", "n_experts_per_token", "<= n_experts")
    if (values["n_layer"] + values["mtp_num_heads"]) * values["n_experts"] > MAX_LAYER_EXPERTS:
        raise _bad("layers x experts is beyond any model", "n_layer", f"layers x experts <= {MAX_LAYER_EXPERTS}")
    return values


def read_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The model's config under the HF DeepSeek-V3 names every layout shares (hf.CONFIG_KEYS), plus
    what only this model has: shared_intermediate_size (null without a shared expert),
    max_position_embeddings (wpe), head_dim, rms_norm_eps, rope_theta."""
    u = _upstream(raw)
    head_dim = u["n_embd"] // u["n_head"]
    shared = u["use_shared_expert"]
    config = normalised_config({
        "model_type": "deepseek_from_scratch", "vocab_size": u["vocab_size"], "hidden_size": u["n_embd"],
        "intermediate_size": 0,  # no dense layer
        "moe_intermediate_size": u["expert_intermediate_size"], "num_hidden_layers": u["n_layer"],
        "num_attention_heads": u["n_head"], "q_lora_rank": u["q_lora_rank"], "kv_lora_rank": u["kv_lora_rank"],
        "qk_nope_head_dim": head_dim, "qk_rope_head_dim": u["rope_dim"], "v_head_dim": head_dim,
        "n_routed_experts": u["n_experts"], "n_shared_experts": 1 if shared else None,
        "first_k_dense_replace": 0, "moe_layer_freq": 1, "num_experts_per_tok": u["n_experts_per_token"],
        "n_group": 1, "topk_group": 1, "topk_method": "softmax_of_topk", "scoring_func": "softmax",
        "routed_scaling_factor": 1.0, "norm_topk_prob": True, "attention_bias": u["bias"], "mlp_bias": u["bias"],
        "tie_word_embeddings": True, "num_nextn_predict_layers": u["mtp_num_heads"],
        "index_n_heads": None, "index_head_dim": None, "index_topk": None, "quantization_config": None,
    })
    return {**config, "head_dim": head_dim, "shared_intermediate_size": u["shared_expert_intermediate_size"] if shared
            else None, "max_position_embeddings": u["block_size"], "rms_norm_eps": RMS_NORM_EPS, "rope_theta": ROPE_THETA}


def _count(tensors: Mapping[str, Any], pattern: str) -> int:
    found = {int(m.group(1)) for name in tensors if (m := re.fullmatch(pattern, name))}
    return max(found) + 1 if found else 0


def infer_config(tensors: Mapping[str, tuple[Any, str]]) -> dict[str, Any] | None:
    """The DeepSeekConfig fields the shapes tell (all but ASSUMED), or None when `tensors` is not
    this model's state dict."""
    shape = {name: tuple(info[0]) for name, info in tensors.items()}
    needed = ("wte.weight", "wpe.weight", "h.0.attn.k_rope_proj.weight", "h.0.attn.rope.inv_freq",
              "h.0.attn.kv_proj.weight", "h.0.attn.q_proj.weight", "h.0.mlp.router.weight",
              "h.0.mlp.experts.0.gate_proj.weight")
    if not all(name in shape for name in needed) or len(shape["h.0.attn.rope.inv_freq"]) != 1:
        return None
    vocab, hidden = shape["wte.weight"]
    rope = 2 * shape["h.0.attn.rope.inv_freq"][0]
    if rope == 0 or shape["h.0.attn.k_rope_proj.weight"][0] % rope:
        return None
    shared = shape.get("h.0.mlp.shared_expert.gate_proj.weight")
    return {
        "vocab_size": vocab, "block_size": shape["wpe.weight"][0], "n_layer": _count(shape, r"h\.(\d+)\.ln_1\.weight"),
        "n_embd": hidden, "n_head": shape["h.0.attn.k_rope_proj.weight"][0] // rope,
        "kv_lora_rank": shape["h.0.attn.kv_proj.weight"][0], "q_lora_rank": shape["h.0.attn.q_proj.weight"][0],
        "rope_dim": rope, "n_experts": shape["h.0.mlp.router.weight"][0],
        "n_experts_per_token": min(UPSTREAM_DEFAULTS["n_experts_per_token"], shape["h.0.mlp.router.weight"][0]),
        "expert_intermediate_size": shape["h.0.mlp.experts.0.gate_proj.weight"][0],
        "shared_expert_intermediate_size": shared[0] if shared else UPSTREAM_DEFAULTS["shared_expert_intermediate_size"],
        "use_shared_expert": shared is not None, "mtp_num_heads": _count(shape, r"mtp_heads\.(\d+)\.combine_proj\.weight"),
        "bias": "h.0.attn.o_proj.bias" in shape,
    }


def _linear(out: dict, name: str, rows: int, cols: int, bias: bool) -> None:
    out[f"{name}.weight"] = (rows, cols)
    if bias:
        out[f"{name}.bias"] = (rows,)


def _attention(out: dict, p: str, c: Mapping[str, Any]) -> None:
    hidden, heads, head_dim, rope = c["hidden_size"], c["num_attention_heads"], c["head_dim"], c["qk_rope_head_dim"]
    rank, q_rank = c["kv_lora_rank"], c["q_lora_rank"]
    for name, rows, cols in (("kv_proj", rank, hidden), ("k_decompress", heads * head_dim, rank),
                             ("v_decompress", heads * head_dim, rank), ("q_proj", q_rank, hidden),
                             ("q_decompress", heads * head_dim, q_rank), ("k_rope_proj", heads * rope, hidden),
                             ("q_rope_proj", heads * rope, q_rank)):
        _linear(out, f"{p}.{name}", rows, cols, False)
    out[f"{p}.kv_norm.weight"] = (rank,)
    _linear(out, f"{p}.o_proj", hidden, heads * head_dim, c["attention_bias"])
    out[f"{p}.rope.inv_freq"] = (rope // 2,)
    block = c["max_position_embeddings"]
    out[f"{p}.causal_mask"] = (1, 1, block, block)


def _moe(out: dict, p: str, c: Mapping[str, Any]) -> None:
    hidden, bias = c["hidden_size"], c["mlp_bias"]
    out[f"{p}.router.weight"] = (c["n_routed_experts"], hidden)
    experts = [(f"{p}.experts.{e}", c["moe_intermediate_size"]) for e in range(c["n_routed_experts"])]
    if c["shared_intermediate_size"] is not None:
        experts.append((f"{p}.shared_expert", c["shared_intermediate_size"]))
    for prefix, width in experts:
        _linear(out, f"{prefix}.gate_proj", width, hidden, bias)
        _linear(out, f"{prefix}.up_proj", width, hidden, bias)
        _linear(out, f"{prefix}.down_proj", hidden, width, bias)
    out[f"{p}.expert_bias"] = (c["n_routed_experts"],)


class ScratchLayout(Layout):
    name = "scratch"
    variants = ("default",)
    format = "pt"
    sections = Sections(("wte.", "wpe."), "h.{i}.", ("ln_f.", "lm_head."))
    assumed = ASSUMED

    def usage(self, path: str) -> tuple[str, str]:
        return "python", ("from safetensors.torch import load_file\n\n"
                          f"state_dict = load_file({json.dumps(path + '/model.safetensors')})  # each shard, where there are several\n"
                          "model.load_state_dict(state_dict)  # model: your DeepSeek-from-Scratch model, built with its config")

    def read_config(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return read_config(raw)

    def infer_config(self, tensors: Mapping[str, tuple[Any, str]]) -> dict[str, Any] | None:
        return infer_config(tensors)

    def runtime(self, checkpoint, dtype: str):
        from remap.parity.runtimes import scratch_runtime

        return scratch_runtime(checkpoint, dtype)

    def expected(self, config: Mapping[str, Any], variant: str | None = None) -> dict[str, Expected]:
        self.variant(variant)
        c, out = config, {}
        hidden, vocab = c["hidden_size"], c["vocab_size"]
        out["wte.weight"] = (vocab, hidden)
        out["wpe.weight"] = (c["max_position_embeddings"], hidden)
        for i in range(c["num_hidden_layers"]):
            out[f"h.{i}.ln_1.weight"] = out[f"h.{i}.ln_2.weight"] = (hidden,)
            _attention(out, f"h.{i}.attn", c)
            _moe(out, f"h.{i}.mlp", c)
        out["ln_f.weight"] = (hidden,)
        out["lm_head.weight"] = (vocab, hidden)  # the same tensor as wte.weight, saved under both names
        for d in range(c["num_nextn_predict_layers"]):
            p = f"mtp_heads.{d}"
            _linear(out, f"{p}.combine_proj", hidden, 2 * hidden, c["mlp_bias"])
            for norm in ("norm1", "norm2", "attn_norm", "mlp_norm"):
                out[f"{p}.{norm}.weight"] = (hidden,)
            _attention(out, f"{p}.attn", c)
            _moe(out, f"{p}.mlp", c)
        return {name: Expected(name, shape) for name, shape in out.items()}  # buffers follow model.to(dtype)


LAYOUT = ScratchLayout()

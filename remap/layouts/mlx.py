"""The `mlx` layout: what mlx-lm's `deepseek_v3.Model`, `deepseek_v32.Model`, `deepseek_v2.Model`
and `mistral4.Model` hold (mlx-lm 0.32). Their config reading is in remap.layouts.mlx_config.

Routed experts are stacked per layer as `model.layers.{i}.mlp.switch_mlp.{gate,up,down}_proj.weight`
of shape [experts, out, in]. mlx-lm's `sanitize` drops the MTP layer, so the layout has none, and
deepseek_v3's model always holds its own `lm_head` (mlx-lm ignores tie_word_embeddings there).
DeepSeek-V3.2 (model_type deepseek_v32) adds the indexer under transformers' names,
`self_attn.indexer.{wq_b, wk, k_norm, weights_proj}` (sanitize passes them through unchanged;
k_norm is an nn.LayerNorm with weight and bias, the three others quantizable Linears).
Mistral4 (model_type mistral4) holds DeepSeek-V3's names but for its router, `mlp.gate` a plain
(quantizable) Linear with no e_score_correction_bias, and has no `lm_head` when
tie_word_embeddings is true (the embedding's `as_linear` is the head). Its sanitize stacks
transformers' fused `mlp.experts.gate_up_proj` (split in half: gate, then up) and `down_proj`
into switch_mlp, as it stacks per-expert weights.
DeepSeek-V2 and V2-Lite (model_type deepseek_v2) hold DeepSeek-V3's names but for attention, which
keeps transformers' `kv_b_proj` (mlx-lm's deepseek_v2 multiplies by it; it has no embed_q form),
and the router, a MoEGate of `weight` alone (softmax scores, no correction bias).

Variants, differing only in how attention's kv_b_proj is held:
  embed_q    what current mlx-lm holds and writes: per head, `self_attn.embed_q.weight`
             [heads, kv_lora_rank, qk_nope_head_dim] (the key half of kv_b_proj, transposed) and
             `self_attn.unembed_out.weight` [heads, v_head_dim, kv_lora_rank] (the value half).
  kv_b_proj  `self_attn.kv_b_proj.weight` [heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]
             as in transformers: what exo shards and older mlx-community checkpoints carry;
             mlx-lm's sanitize turns it into embed_q / unembed_out at load.
A deepseek_v2 model holds kv_b_proj under either variant (KV_B_PROJ_ONLY): it has no other form.

Quantized checkpoints (config.json `quantization`, as mlx_lm.convert -q writes it) need no variant:
each module mlx-lm quantizes holds `weight` (uint32, in * bits / 32 wide), `scales` and `biases`
(in / group_size wide, in the float dtype) instead of its float weight. mlx-lm quantizes every
Linear, SwitchLinear (stacked experts), MultiLinear (embed_q / unembed_out) and Embedding whose
input width is a multiple of group_size, lm_head included; norms and the MoE router (its weight
and e_score_correction_bias) stay float. Per-module entries override the default (`mixed_*`
recipes write `{"bits": 6, "group_size": 64, ...}` under the module path; `false` keeps it float).
Only affine quantization is described. A module a custom predicate skipped without recording
`false` cannot be told from config.json: mlx-lm's loader then goes by which `scales` the files hold.
A quantized kv_b_proj (the kv_b_proj variant) loads in mlx-lm's deepseek_v3 only when
qk_nope_head_dim is a multiple of its group size: sanitize requantizes embed_q, grouped along that
axis (deepseek_v2 keeps kv_b_proj as it is).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from remap.errors import RemapError
from remap.layouts.base import FLOAT, U32, Expected, FilePlan, Layout
from remap.layouts.hf import TRANSFORMERS_SECTIONS, config_error

# Re-exported: tests and tools import the config reading from here.
from remap.layouts.mlx_config import (  # noqa: F401
    MISTRAL4_ROPE_KEYS,
    MODEL_TYPES,
    read_mlx_config,
    write_config,
)


def _is_moe(i: int, c: Mapping[str, Any]) -> bool:
    return (
        c["n_routed_experts"] is not None
        and i >= c["first_k_dense_replace"]
        and i % c["moe_layer_freq"] == 0
    )


class _Tensors:
    """Collects the tensors of one variant; `module` adds the weight of a module mlx-lm can
    quantize (Linear, SwitchLinear, MultiLinear, Embedding: those with `to_quantized`), as
    `weight` / `scales` / `biases` where the config's `quantization` says it is quantized."""

    def __init__(self, quantization: Mapping[str, Any] | None):
        self.quantization = quantization
        self.out: dict[str, Expected] = {}

    def add(self, name: str, shape: tuple[int, ...], dtype: str = FLOAT) -> None:
        self.out[name] = Expected(name, shape, dtype)

    def module(self, name: str, shape: tuple[int, ...]) -> None:
        """A quantizable module's weight [..., out, in] (in: the axis mlx groups along)."""
        packing = _packing(name, shape[-1], self.quantization) if self.quantization else None
        if packing is None:
            self.add(f"{name}.weight", shape)
            return
        bits, group_size = packing
        *lead, width = shape
        self.add(f"{name}.weight", (*lead, width * bits // 32), U32)
        self.add(f"{name}.scales", (*lead, width // group_size))
        self.add(f"{name}.biases", (*lead, width // group_size))

    def linear(self, name: str, rows: int, cols: int, bias: bool = False) -> None:
        self.module(name, (rows, cols))
        if bias:  # a quantized Linear keeps its bias as it is
            self.add(f"{name}.bias", (rows,))


def _packing(module: str, width: int, quantization: Mapping[str, Any]) -> tuple[int, int] | None:
    """(bits, group_size) of `module` in a checkpoint mlx-lm quantized, or None where it stays float.

    mlx_lm.utils.quantize_model skips a module whose input width is not a multiple of the default
    group_size and records per-module parameters under the module's path (`mixed_*` recipes);
    its loader also reads `path: false` as "not quantized".
    """
    own = quantization.get(module)
    if own is False:
        return None
    if isinstance(own, Mapping):
        bits, group_size = own["bits"], own["group_size"]
    elif width % quantization["group_size"]:
        return None
    else:
        bits, group_size = quantization["bits"], quantization["group_size"]
    if width % group_size or width * bits % 32:
        raise config_error(f"{module} of input width {width} cannot pack {bits}-bit groups of {group_size}",
                           f"quantization {module}", "a group_size dividing the width, width * bits a multiple of 32")
    return bits, group_size


# Model types whose MoE router is an nn.Linear (quantizable; no correction bias), not a MoEGate.
LINEAR_ROUTER = ("mistral4",)
# Model types whose attention holds kv_b_proj whatever the variant: mlx-lm's deepseek_v2 has no
# embed_q / unembed_out (its sanitize only stacks experts).
KV_B_PROJ_ONLY = ("deepseek_v2",)
# Model types whose MoEGate holds no e_score_correction_bias (softmax routing).
NO_ROUTER_BIAS = ("deepseek_v2",)


def _mlp(t: _Tensors, p: str, hidden: int, width: int) -> None:
    t.linear(f"{p}.gate_proj", width, hidden)
    t.linear(f"{p}.up_proj", width, hidden)
    t.linear(f"{p}.down_proj", hidden, width)


def _attention(t: _Tensors, p: str, c: Mapping[str, Any], variant: str) -> None:
    hidden, heads, bias = c["hidden_size"], c["num_attention_heads"], c["attention_bias"]
    nope, rope, v, rank = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    if c["q_lora_rank"] is None:
        t.linear(f"{p}.q_proj", heads * (nope + rope), hidden)
    else:
        q_rank = c["q_lora_rank"]
        t.linear(f"{p}.q_a_proj", q_rank, hidden, bias)
        t.add(f"{p}.q_a_layernorm.weight", (q_rank,))
        t.linear(f"{p}.q_b_proj", heads * (nope + rope), q_rank)
    t.linear(f"{p}.kv_a_proj_with_mqa", rank + rope, hidden, bias)
    t.add(f"{p}.kv_a_layernorm.weight", (rank,))
    if variant == "embed_q" and c["model_type"] not in KV_B_PROJ_ONLY:  # MultiLinear: per head [out, in]
        t.module(f"{p}.embed_q", (heads, rank, nope))
        t.module(f"{p}.unembed_out", (heads, v, rank))
    else:
        t.linear(f"{p}.kv_b_proj", heads * (nope + v), rank)
    t.linear(f"{p}.o_proj", hidden, heads * v, bias)
    if c["index_n_heads"] is not None:
        index_heads, index_dim = c["index_n_heads"], c["index_head_dim"]
        t.linear(f"{p}.indexer.wq_b", index_heads * index_dim, c["q_lora_rank"])
        t.linear(f"{p}.indexer.wk", index_dim, hidden)
        t.add(f"{p}.indexer.k_norm.weight", (index_dim,))
        t.add(f"{p}.indexer.k_norm.bias", (index_dim,))
        t.linear(f"{p}.indexer.weights_proj", index_heads, hidden)


def _layer(t: _Tensors, i: int, c: Mapping[str, Any], variant: str) -> None:
    p, hidden = f"model.layers.{i}", c["hidden_size"]
    t.add(f"{p}.input_layernorm.weight", (hidden,))
    t.add(f"{p}.post_attention_layernorm.weight", (hidden,))
    _attention(t, f"{p}.self_attn", c, variant)
    if not _is_moe(i, c):
        _mlp(t, f"{p}.mlp", hidden, c["intermediate_size"])
        return
    experts, width = c["n_routed_experts"], c["moe_intermediate_size"]
    if c["model_type"] in LINEAR_ROUTER:
        t.linear(f"{p}.mlp.gate", experts, hidden)
    else:  # the router (MoEGate) is a plain module with no `to_quantized`: never quantized
        t.add(f"{p}.mlp.gate.weight", (experts, hidden))
        if c["model_type"] not in NO_ROUTER_BIAS:
            t.add(f"{p}.mlp.gate.e_score_correction_bias", (experts,))
    t.module(f"{p}.mlp.switch_mlp.gate_proj", (experts, width, hidden))
    t.module(f"{p}.mlp.switch_mlp.up_proj", (experts, width, hidden))
    t.module(f"{p}.mlp.switch_mlp.down_proj", (experts, hidden, width))
    if c["n_shared_experts"] is not None:
        _mlp(t, f"{p}.mlp.shared_experts", hidden, width * c["n_shared_experts"])


# mlx-lm's named mixed recipes (`mlx_lm.convert --quant-predicate`): bits, and the high_bits that
# lm_head and some layers' down_proj / kv_a_proj_with_mqa take (mappings/mlx-quantize.yaml).
MIXED_RECIPES = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6)}


class MlxLayout(Layout):
    name = "mlx"
    variants = ("embed_q", "kv_b_proj")
    format = "mlx"
    sections = TRANSFORMERS_SECTIONS  # mlx-lm keeps transformers' module names
    # what mlx_lm.convert's model card declares (mlx_lm.utils.create_model_card)
    card_metadata = {"language": "en", "library_name": "mlx", "pipeline_tag": "text-generation", "tags": ["mlx"]}

    def usage(self, path: str) -> tuple[str, str]:
        return "python", (f"from mlx_lm import generate, load\n\nmodel, tokenizer = load({json.dumps(path)})\n"
                          f"print(generate(model, tokenizer, prompt=\"Hello\", max_tokens=32))")

    def write_config(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return write_config(raw)

    def read_config(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return read_mlx_config(raw)

    def record(self, config: dict[str, Any], steps) -> None:
        record_quantization(config, steps)

    def plan_files(self, outputs, max_shard_size, names, config) -> FilePlan:
        """As mlx_lm.convert writes them, byte for byte (remap/layouts/mlx_files.py)."""
        from remap.layouts.mlx_files import plan_files

        return plan_files(outputs, max_shard_size, config)

    def quantization(self, quantize: int | str, group_size: int) -> tuple[str, dict[str, Any], str]:
        """mlx-lm's affine quantization: bits, or one of its mixed recipes by name; bits and group
        size are those mlx.core.quantize takes."""
        from remap.ops.quant import MLX_BITS, MLX_GROUP_SIZES

        if str(quantize) in MIXED_RECIPES:
            (bits, high_bits), label = MIXED_RECIPES[str(quantize)], str(quantize)
        elif str(quantize).isdigit() and int(quantize) in MLX_BITS:
            bits, high_bits, label = int(quantize), 0, f"{int(quantize)}bit"
        else:
            raise RemapError(f"--quantize {quantize!r}", expected=f"bits ({', '.join(map(str, MLX_BITS))}) "
                             f"or a mixed recipe ({', '.join(MIXED_RECIPES)})")
        if group_size not in MLX_GROUP_SIZES:
            raise RemapError(f"--q-group-size {group_size!r}", expected=", ".join(map(str, MLX_GROUP_SIZES)))
        return "mlx-quantize", {"bits": bits, "group_size": group_size, "high_bits": high_bits}, label

    def runtime(self, checkpoint, dtype: str):
        from remap.parity.runtimes import mlx_runtime

        return mlx_runtime(checkpoint, dtype)

    def expected(self, config: Mapping[str, Any], variant: str | None = None) -> dict[str, Expected]:
        variant = self.variant(variant)
        c = config
        hidden, vocab = c["hidden_size"], c["vocab_size"]
        t = _Tensors(c["quantization_config"])
        t.module("model.embed_tokens", (vocab, hidden))
        for i in range(c["num_hidden_layers"]):
            _layer(t, i, c, variant)
        t.add("model.norm.weight", (hidden,))
        if not c["tie_word_embeddings"]:  # always false but for mistral4 (read_mlx_config)
            t.linear("lm_head", vocab, hidden)
        return t.out


def record_quantization(config: dict[str, Any], steps) -> None:
    """mlx-lm rebuilds quantized modules from config.json's `quantization` block. Where modules
    differ in bits or group size (a mixed recipe), every quantized module gets an entry of its own,
    as mlx-lm's mixed recipes write it, so the loader is told, never left to guess from shapes."""
    block = config.get("quantization")
    if not isinstance(block, dict):
        return
    quantized = [(step, op) for step in steps for op in step.ops if op.name == "quantize_mlx"]
    if all((op.bits, op.group_size) == (block.get("bits"), block.get("group_size")) for _, op in quantized):
        return
    for step, op in quantized:
        module = step.outputs[0].name.removesuffix(".weight")
        block[module] = {"group_size": op.group_size, "bits": op.bits, "mode": op.mode}
    if isinstance(config.get("quantization_config"), dict):  # mlx-lm writes both, alike
        config["quantization_config"] = dict(block)


LAYOUT = MlxLayout()

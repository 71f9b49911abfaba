"""The `hf` layout: DeepSeek-V2/V3/V3.2 and Mistral4 as transformers saves them, and the official
HF DeepSeek checkpoints.

Names are transformers' (`model.layers.{i}.self_attn.kv_b_proj.weight`, ...). transformers 5.23
fuses routed experts in memory; for the DeepSeek models `save_pretrained` writes one tensor per
expert (`mlp.experts.{e}.gate_proj.weight`, its conversion mapping splits them), for Mistral4 the
fused parameters as they are (FUSED_EXPERTS): `mlp.experts.gate_up_proj` [experts, 2 *
moe_intermediate_size, hidden] (gate rows, then up rows) and `mlp.experts.down_proj` [experts,
hidden, moe_intermediate_size], no `.weight` suffix. The on-disk names are the layout.

Mistral4 (model_type mistral4) is DeepSeek-V3's MLA and MoE blocks with a softmax router that has
no e_score_correction_bias, no MLP biases and no MTP; its llama-4 query scaling has no tensor.

Variants:
  bf16      what DeepseekV3/V32/V2ForCausalLM and Mistral4ForCausalLM.save_pretrained write. "bf16"
            names the unquantized family: f32 or f16 files have the same tensors.
  bf16-mtp  bf16 plus the multi-token-prediction modules of the official checkpoints, one per
            num_nextn_predict_layers at `model.layers.{num_hidden_layers + k}`: a full decoder
            block plus embed_tokens, enorm, hnorm, eh_proj, shared_head.norm, shared_head.head.
            transformers ignores them on load.
  fp8       FP8 weights in the form config.json's quantization_config names (DeepSeek models only;
            remap.layouts.hf_fp8). The official one (quant_method fp8, DeepSeek-V3 / R1 / V3.1 /
            V3.2, Kimi-K2): every linear projection of attention and MLP (dense, shared and routed
            experts) in float8_e4m3fn, each with a float32 `weight_scale_inv` of one value per
            weight_block_size block (default 128 x 128). Embeddings, norms, router and lm_head stay
            unquantized. Third-party forms (compressed-tensors float-quantized, fbgemm_fp8) hold a
            per-tensor or per-channel `weight_scale` instead.
  fp8-mtp   the official release as shipped: fp8 plus MTP, whose decoder block is quantized like
            any other and whose eh_proj, embed_tokens and shared_head.head are not.

Kimi-K2 (model_type kimi_k2, and joyai_llm_flash: hf_config.ARCHITECTURE_OF) is DeepSeek-V3 on
disk: transformers 5.23 has no class of that name, so it is read and run as DeepseekV3.

DeepSeek-V3.2 (model_type deepseek_v32) is V3 plus a lightning indexer in every attention block,
`self_attn.indexer.{wq_b, wk, k_norm, weights_proj}` (k_norm a LayerNorm: weight and bias). The
official FP8 release quantizes wq_b and wk like any other linear and keeps weights_proj unquantized:
DeepSeek-V3.2-Exp's inference/model.py (github.com/deepseek-ai/DeepSeek-V3.2-Exp at 3b99a535,
2025-10-02) builds weights_proj in the default dtype and every other Linear in fp8 with a block
scale, and loads the converted checkpoint strictly; transformers' DeepseekV32 keeps
`indexer.weights_proj` in float32 (`_keep_in_fp32_modules`), which its FP8 quantizer skips.

The config namespace of every layout is HF DeepSeek-V3's config.json key names (CONFIG_KEYS, in
remap.layouts.hf_config with transformers' config reading); `normalised_config` builds it, so the
layouts cannot drift apart.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

from remap.errors import RemapError
from remap.layouts.base import F32, FLOAT, FP8, Expected, Layout, Sections

# Re-exported: the other layouts, fixtures and tests import the config namespace from here.
from remap.layouts.hf_config import (  # noqa: F401
    ARCHITECTURE_OF,
    CONFIG_KEYS,
    INDEXER_KEYS,
    MAX_LAYER_EXPERTS,
    MODEL_TYPES,
    config_error,
    fp8_block,
    normalised_config,
    read_transformers_config,
)
from remap.layouts.hf_fp8 import Fp8Scheme, fp8_scheme  # noqa: F401

# Model types whose routed experts save_pretrained writes fused, one [experts, ...] tensor per
# projection (transformers 5.23 has no conversion mapping that splits them per expert).
FUSED_EXPERTS = ("mistral4",)
# Model types whose router never holds e_score_correction_bias: DeepseekV2TopkRouter is a weight
# alone, whatever topk_method its config.json names (V2 reads topk_method from it).
NO_ROUTER_BIAS = ("deepseek_v2",)


class ExpectedTensors:
    """Collects one variant's tensors; `linear` knows whether and how the variant quantizes.

    With a block size (or an FP8 scheme: `scheme`), quantized linears get an FP8 weight and a
    scale named `{module}.{scale}` (`weight_scale_inv` here, `scale` in DeepSeek's own files).
    """

    def __init__(self, block: tuple[int, int] | None, scale: str = "weight_scale_inv",
                 scheme: Fp8Scheme | None = None):
        self.scheme = scheme or (Fp8Scheme("fp8", scale, block) if block else None)
        self.out: dict[str, Expected] = {}

    def add(self, name: str, shape: tuple[int, ...], dtype: str = FLOAT) -> None:
        self.out[name] = Expected(name, shape, dtype)

    def linear(self, name: str, rows: int, cols: int, *, bias: bool = False, quantized: bool = True) -> None:
        """A Linear; `quantized`: the official FP8 release quantizes it (other forms may differ)."""
        s = self.scheme
        if s and s.quantizes(name, quantized):
            self.add(f"{name}.weight", (rows, cols), FP8)
            self.add(f"{name}.{s.scale}", s.scale_shape(rows, cols), s.scale_dtype)
            if s.activation:
                self.add(f"{name}.{s.activation}", s.tensor_shape, s.scale_dtype)
        else:
            self.add(f"{name}.weight", (rows, cols))
        if bias:
            self.add(f"{name}.bias", (rows,))

    def experts(self, prefix: str, count: int, hidden: int, width: int, mlp: Callable[..., None] | None = None) -> None:
        """Routed experts `{prefix}.0` .. `{prefix}.{count - 1}`, each an `mlp` (this layout's
        gate/up/down by default). Where the FP8 form leaves no module alone by name, every expert
        quantizes alike: the first is built, the rest stamped from it by name (61 layers x 256
        experts x 6 tensors)."""
        mlp = mlp or _mlp
        if self.scheme and (self.scheme.skip or self.scheme.ignore):
            for e in range(count):
                mlp(self, f"{prefix}.{e}", hidden, width)
            return
        one = ExpectedTensors(None, scheme=self.scheme)
        mlp(one, "", hidden, width)
        self.stamp(prefix, count, one.out)

    def stamp(self, prefix: str, count: int, one: Mapping[str, Expected]) -> None:
        """`one` expert's tensors (names relative to it) for each of `count` experts."""
        out = self.out
        for e in range(count):
            head = f"{prefix}.{e}"
            for tail, want in one.items():
                out[head + tail] = Expected(head + tail, want.shape, want.dtype)


class ShapeTensors(ExpectedTensors):
    """Collects name -> shape alone in `out`: all detection compares, without an Expected object
    per tensor (92k for DeepSeek-V3)."""

    def add(self, name: str, shape: tuple[int, ...], dtype: str = FLOAT) -> None:
        self.out[name] = shape

    def stamp(self, prefix: str, count: int, one: Mapping[str, Expected]) -> None:
        names = [head + tail for head in [f"{prefix}.{e}" for e in range(count)] for tail in one]
        self.out.update(zip(names, [want.shape for want in one.values()] * count))  # in C, not a loop of 90k


class CountTensors(ShapeTensors):
    """Counts the tensors without naming the stamped experts: `len(out) + stamped`. Detection
    skips a variant whose count is not the checkpoint's before building its 92k names."""

    stamped = 0

    def stamp(self, prefix: str, count: int, one: Mapping[str, Expected]) -> None:
        self.stamped += count * len(one)  # expert names are their own: none repeats another


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
    experts, width = c["n_routed_experts"], c["moe_intermediate_size"]
    t.add(f"{p}.mlp.gate.weight", (experts, hidden))
    if c["topk_method"] == "noaux_tc" and c["model_type"] not in NO_ROUTER_BIAS:
        # float32 in the official checkpoints; save_pretrained writes the model's dtype
        t.add(f"{p}.mlp.gate.e_score_correction_bias", (experts,), F32 if t.scheme else FLOAT)
    if c["model_type"] in FUSED_EXPERTS:
        t.add(f"{p}.mlp.experts.gate_up_proj", (experts, 2 * width, hidden))
        t.add(f"{p}.mlp.experts.down_proj", (experts, hidden, width))
    else:
        t.experts(f"{p}.mlp.experts", experts, hidden, width)
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


class CollectedLayout(Layout):
    """A layout whose `_collect` fills an ExpectedTensors of the kind asked: Expected objects for
    `expected`, bare shapes for detection's `shapes`, or the stamped experts only counted."""

    def expected(self, config: Mapping[str, Any], variant: str | None = None) -> dict[str, Expected]:
        return self._collect(ExpectedTensors, config, variant).out

    def shapes(self, config: Mapping[str, Any], variant: str | None = None) -> dict[str, tuple[int, ...]]:
        return self._collect(ShapeTensors, config, variant).out

    def count(self, config: Mapping[str, Any], variant: str | None = None) -> int:
        counted = self._collect(CountTensors, config, variant)
        return len(counted.out) + counted.stamped

    def _collect(self, kind: type[ExpectedTensors], config: Mapping[str, Any], variant: str | None) -> ExpectedTensors:
        raise NotImplementedError


class HfLayout(CollectedLayout):
    name = "hf"
    variants = ("bf16", "bf16-mtp", "fp8", "fp8-mtp")
    format = "pt"
    sections = TRANSFORMERS_SECTIONS
    card_metadata = {"library_name": "transformers", "pipeline_tag": "text-generation"}

    def usage(self, path: str) -> tuple[str, str]:
        return "python", ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                          f"model = AutoModelForCausalLM.from_pretrained({json.dumps(path)})\n"
                          f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(path)})")

    def read_config(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return read_transformers_config(raw)

    def keeps_dtype(self, name: str) -> bool:
        return name.endswith(".weight_scale_inv")  # FP8 block scales are float32 by definition

    def runtime(self, checkpoint, dtype: str):
        from remap.parity.runtimes import transformers_runtime

        return transformers_runtime(checkpoint, dtype)

    def _collect(self, kind: type[ExpectedTensors], config: Mapping[str, Any], variant: str | None) -> ExpectedTensors:
        """The variant's tensors, collected by `kind` (as Expected, as shapes, or counted)."""
        variant = self.variant(variant)
        c = config
        if variant.startswith("fp8") and c["model_type"] in FUSED_EXPERTS:
            raise RemapError(f"the {variant} variant is DeepSeek's official FP8 release, not {c['model_type']}",
                             rule="layout hf", expected="bf16")
        t = kind(None, scheme=fp8_scheme(c["quantization_config"]) if variant.startswith("fp8") else None)
        hidden, vocab = c["hidden_size"], c["vocab_size"]
        t.add("model.embed_tokens.weight", (vocab, hidden))
        layers = c["num_hidden_layers"]
        for i in range(layers):
            _decoder_layer(t, i, c)
        t.add("model.norm.weight", (hidden,))
        if not c["tie_word_embeddings"]:
            t.linear("lm_head", vocab, hidden, quantized=False)
        if variant.endswith("-mtp"):
            for i in range(layers, layers + c["num_nextn_predict_layers"]):
                _decoder_layer(t, i, c)
                _mtp_extras(t, i, c)
        return t


LAYOUT = HfLayout()

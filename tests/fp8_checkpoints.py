"""Tiny checkpoints beyond the bundled fixtures, written as fixtures/generate.py writes those
(weights drawn from the model's and the tensor's names, the fixtures' tokenizer): Kimi-K2 as
Moonshot ships it, bf16 and FP8, and the FP8 forms other quantizers give a DeepSeek-V3.

Each is written into a directory the caller owns (tests pass tmp_path) and returned."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from fixtures.generate import HF_SIZES, WEIGHTS, draw, quantize_fp8, train_tokenizer, write_safetensors
from remap.layouts.base import F32, FP8, Expected
from remap.layouts.hf import LAYOUT as HF
from remap.layouts.hf import fp8_scheme

# Kimi-K2-Instruct's config.json (moonshotai, July 2025) at the fixtures' sizes, as Moonshot wrote
# it (transformers 4.48: top-level rope_theta / rope_scaling, torch_dtype, remote code of
# DeepSeek-V3's), with its routing (every expert in one group: n_group = topk_group = 1; scaling
# 2.827), its rope (theta 50000; yarn x32 from 4096 positions, beta_fast = beta_slow = 1,
# mscale = mscale_all_dim = 1) and no MTP layer. 6 routed experts: Kimi has 1.5x V3's.
KIMI_K2: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "model_type": "kimi_k2",
    "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 0,
    "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": HF_SIZES["hidden_size"], "initializer_range": 0.02,
    "intermediate_size": HF_SIZES["intermediate_size"], "kv_lora_rank": HF_SIZES["kv_lora_rank"],
    "max_position_embeddings": 131072, "moe_intermediate_size": HF_SIZES["moe_intermediate_size"],
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 6, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": HF_SIZES["num_attention_heads"], "num_experts_per_tok": 2,
    "num_hidden_layers": 3, "num_key_value_heads": HF_SIZES["num_attention_heads"],
    "num_nextn_predict_layers": 0, "pretraining_tp": 1, "q_lora_rank": HF_SIZES["q_lora_rank"],
    "qk_nope_head_dim": HF_SIZES["qk_nope_head_dim"], "qk_rope_head_dim": HF_SIZES["qk_rope_head_dim"],
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 50000.0, "routed_scaling_factor": 2.827, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.48.3", "use_cache": True, "v_head_dim": HF_SIZES["v_head_dim"],
    "vocab_size": HF_SIZES["vocab_size"],
}
# The official FP8 quantization_config (Kimi-K2's is DeepSeek-V3's).
FP8_BLOCKS = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def _write(out: Path, config: Mapping[str, Any], variant: str,
           quantize: Callable[[str, np.ndarray], dict[str, np.ndarray]] | None = None) -> Path:
    """config.json, model.safetensors and the tokenizer. Float tensors are bf16 (float32 where the
    layout says so); `quantize(name, master)` gives a quantized linear's tensors from its float32
    weight."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors: dict[str, np.ndarray] = {}
    for name, e in HF.expected(HF.read_config(config), variant).items():
        if name in tensors:  # a scale, written with its weight
            continue
        if e.dtype == FP8:
            tensors.update(quantize(name, draw(config["model_type"], name, e.shape)))
        else:
            tensors[name] = _float(config["model_type"], e)
    write_safetensors(out / WEIGHTS, {n: tensors[n] for n in sorted(tensors)})
    train_tokenizer().save_pretrained(out)
    return out


def _float(model: str, e: Expected) -> np.ndarray:
    master = draw(model, e.name, e.shape)
    return master if e.dtype == F32 else master.astype(ml_dtypes.bfloat16)


def write_kimi(out: Path, fp8: bool = False, **changes: Any) -> Path:
    """Kimi-K2 (KIMI_K2 with `changes`): bf16, or FP8 as released (the bf16 weights block-quantized)."""
    config = {**KIMI_K2, **changes}
    if not fp8:
        return _write(out, config, "bf16")
    config["quantization_config"] = FP8_BLOCKS
    block = fp8_scheme(HF.read_config(config)).block

    def quantize(name: str, master: np.ndarray) -> dict[str, np.ndarray]:
        weight, scale = quantize_fp8(master, block)
        return {name: weight, name.removesuffix("weight") + "weight_scale_inv": scale}

    return _write(out, config, "fp8", quantize)


# -- FP8 forms beyond the official 128 x 128 float32 blocks ---------------------------------------

# quantization_config of each form, as its library writes it (remap.layouts.hf_fp8).
FP8_FORMS: dict[str, dict[str, Any]] = {
    # DeepSeek-V3.1 / V3.2: the official blocks, scales rounded up to powers of two
    "ue8m0": {**FP8_BLOCKS, "scale_fmt": "ue8m0"},
    # transformers' FineGrainedFP8Config(weight_block_size=None): one float32 scale per tensor
    "per-tensor": {**FP8_BLOCKS, "weight_block_size": None},
    # llm-compressor's FP8 scheme: per-tensor weights, static per-tensor activations (input_scale)
    "ct-tensor": {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"], "kv_cache_scheme": None,
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True,
                                  "dynamic": False}}},
    },
    # llm-compressor's FP8_DYNAMIC: per-channel weights, dynamic per-token activations; lm_head
    # quantized too (not in ignore), the first layer's attention left out by a pattern
    "ct-channel": {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "ignore": ["re:model[.]layers[.]0[.]self_attn[.].*"],
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                  "dynamic": True}}},
    },
    # transformers' FbgemmFp8Config: a float32 scale per output row
    "fbgemm": {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]},
}


def quantize_fp8_form(master: np.ndarray, form: str, scale: np.dtype = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(e4m3 weight, scale) as each form's quantizer computes them: scale = amax / 448 over the
    block, tensor or row, the weight divided by it; ue8m0 rounds each block's scale up to a power of
    two first (transformers' Fp8Quantize, DeepSeek's ue8m0 act_quant). `scale` is the scale's dtype."""
    if form == "ue8m0":
        _, blocks = quantize_fp8(master, (128, 128))
        blocks = np.exp2(np.ceil(np.log2(blocks))).astype(np.float32)
        expanded = np.kron(blocks, np.ones((128, 128), np.float32))[: master.shape[0], : master.shape[1]]
        return np.clip(master / expanded, -448, 448).astype(ml_dtypes.float8_e4m3fn), blocks.astype(scale)
    axis = None if form in ("per-tensor", "ct-tensor") else 1
    amax = np.abs(master).max(axis=axis, keepdims=axis is not None)
    values = (amax / 448.0).astype(scale)  # stored in its dtype; the weight is divided by what is stored
    weight = np.clip(master / values.astype(np.float32), -448, 448).astype(ml_dtypes.float8_e4m3fn)
    shape = {"per-tensor": (), "ct-tensor": (1,)}.get(form, (master.shape[0], 1))
    return weight, values.reshape(shape)


def write_fp8_form(out: Path, form: str, scale_dtype: np.dtype | None = None) -> Path:
    """The fixtures' DeepSeek-V3 (tiny, with its MTP layer for the official forms) in one FP8 form.
    Scales are float32, bfloat16 for compressed-tensors (the model's dtype), or `scale_dtype`
    (ml_dtypes.float8_e8m0fnu or np.uint8 for E8M0 bytes: ue8m0 only)."""
    from fixtures.generate import hf_config

    official = FP8_FORMS[form].get("quant_method") == "fp8"
    config = hf_config(num_nextn_predict_layers=1 if official else 0, quantization_config=FP8_FORMS[form]).to_dict()
    scheme = fp8_scheme(HF.read_config(config)["quantization_config"])
    dtype = np.float32 if scheme.scale_dtype == F32 else ml_dtypes.bfloat16

    def quantize(name: str, master: np.ndarray) -> dict[str, np.ndarray]:
        weight, scale = quantize_fp8_form(master, form, dtype)
        if scale_dtype is not None:  # E8M0: the exponent byte of the power of two
            scale = (np.log2(scale).astype(np.int32) + 127).astype(np.uint8).view(scale_dtype)
        module = name.removesuffix(".weight")
        out = {name: weight, f"{module}.{scheme.scale}": scale}
        if scheme.activation:
            out[f"{module}.{scheme.activation}"] = np.full(scheme.tensor_shape, 0.02, dtype)
        return out

    return _write(out, config, "fp8-mtp" if official else "fp8", quantize)

"""The hf, mlx and deepseek layouts against the runtimes they describe, and detection.

hf: the tensors transformers' DeepseekV3 / DeepseekV32 / DeepseekV2 / Mistral4ForCausalLM write
with save_pretrained (read back from the safetensors header), the FP8 modules of transformers'
fine-grained FP8 quantizer, and the MTP layer transformers' MtpModel loads and saves.
mlx: the parameters of mlx-lm's deepseek_v3.Model, deepseek_v32.Model, deepseek_v2.Model and
mistral4.Model (quantized too), and what their sanitize turns the kv_b_proj variant and an hf
checkpoint into. deepseek: DeepSeek's inference code cannot be installed, so its layout is checked
for a consistent model-parallel split and for holding exactly hf's tensors under other names
(convert.py only renames and slices).
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from pathlib import Path

import mlx.core as mx
import pytest
import torch
from mlx.utils import tree_flatten
from mlx_lm.models import deepseek_v2 as mlx_deepseek_v2
from mlx_lm.models import deepseek_v3 as mlx_deepseek_v3
from mlx_lm.models import deepseek_v32 as mlx_deepseek_v32
from mlx_lm.models import mistral4 as mlx_mistral4
from mlx_lm.utils import MODEL_REMAPPING, quantize_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DeepseekV32Config,
    DeepseekV32ForCausalLM,
    FineGrainedFP8Config,
    Mistral4Config,
    Mistral4ForCausalLM,
)
from transformers.integrations.finegrained_fp8 import FP8Linear
from transformers.modeling_layers import MtpModel
from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

from remap.errors import RemapError
from remap.io.headers import TensorInfo
from remap.layouts import LAYOUTS, detect, get_layout
from remap.layouts.base import F32, FLOAT, FP8, U32
from remap.layouts.deepseek import LAYOUT as DEEPSEEK
from remap.layouts.deepseek import model_parallel, shard_file, split_of
from remap.layouts.hf import CONFIG_KEYS
from remap.layouts.hf import LAYOUT as HF
from remap.layouts.mlx import LAYOUT as MLX
from remap.layouts.mlx import MODEL_TYPES as MLX_MODEL_TYPES
from remap.layouts.mlx_config import PLAIN_V2_ROPE
from tests.fp8_checkpoints import FP8_FORMS

TINY = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "moe_intermediate_size": 16,
    "num_attention_heads": 4,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
    "num_experts_per_tok": 2,
}
# DeepSeek-V2's rope as its releases spell it (mlx-lm's deepseek_v2 builds no model without
# rope_scaling; transformers reads it into rope_parameters), 4 x transformers' default context.
V2_ROPE = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 32, "beta_slow": 1,
           "mscale": 0.707, "mscale_all_dim": 0.707}
# config.json contents, covering: q_lora_rank null and set; first_k_dense_replace 0, 1, 2;
# n_shared_experts 1 and 2; n_group 1 and > 1; tied and untied; attention and MLP biases;
# a moe_layer_freq that mlx-lm honours and transformers ignores; V3.2 indexers (an index_head_dim
# equal to the rope dim), and V3.2's mlp_layer_types, which transformers builds from instead of
# first_k_dense_replace (mlx-lm reads only the latter). V2: 16 experts (their order as numbers, not
# strings), qk_nope_head_dim != v_head_dim, and one leaving n_shared_experts and topk_method to each
# runtime's own default (transformers: 2 and "greedy"; mlx-lm: none and "gready").
CONFIGS = {
    "v3-qlora-dense1": {**TINY, "model_type": "deepseek_v3", "num_hidden_layers": 2, "q_lora_rank": 24,
                        "first_k_dense_replace": 1, "n_routed_experts": 4, "n_shared_experts": 1,
                        "n_group": 2, "topk_group": 1, "tie_word_embeddings": False},
    "v3-noqlora-moe0-tied": {**TINY, "model_type": "deepseek_v3", "num_hidden_layers": 2, "q_lora_rank": None,
                             "first_k_dense_replace": 0, "n_routed_experts": 4, "n_shared_experts": 2,
                             "n_group": 1, "topk_group": 1, "tie_word_embeddings": True},
    "v3-dense2-attnbias": {**TINY, "model_type": "deepseek_v3", "num_hidden_layers": 3, "q_lora_rank": 16,
                           "first_k_dense_replace": 2, "n_routed_experts": 8, "n_shared_experts": 1,
                           "n_group": 4, "topk_group": 2, "attention_bias": True, "tie_word_embeddings": False},
    "v3-freq2": {**TINY, "model_type": "deepseek_v3", "num_hidden_layers": 4, "q_lora_rank": None,
                 "first_k_dense_replace": 1, "moe_layer_freq": 2, "n_routed_experts": 8, "n_shared_experts": 2,
                 "n_group": 2, "topk_group": 1, "tie_word_embeddings": False},
    "v2-lite": {**TINY, "model_type": "deepseek_v2", "num_hidden_layers": 2, "q_lora_rank": None,
                "first_k_dense_replace": 1, "n_routed_experts": 4, "n_shared_experts": 2,
                "topk_method": "greedy", "tie_word_embeddings": False, "rope_scaling": V2_ROPE},
    "v2-grouped-biases-tied": {**TINY, "model_type": "deepseek_v2", "num_hidden_layers": 2, "q_lora_rank": 24,
                               "first_k_dense_replace": 0, "n_routed_experts": 4, "n_shared_experts": 1,
                               "topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1,
                               "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True,
                               "rope_scaling": V2_ROPE},
    "v2-16experts-v16": {**TINY, "model_type": "deepseek_v2", "num_hidden_layers": 3, "q_lora_rank": 24,
                         "first_k_dense_replace": 1, "n_routed_experts": 16, "n_shared_experts": 2,
                         "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "v_head_dim": 16,
                         "kv_lora_rank": 32, "tie_word_embeddings": False, "rope_scaling": V2_ROPE},
    "v2-freq2-defaults": {**TINY, "model_type": "deepseek_v2", "num_hidden_layers": 4, "q_lora_rank": None,
                          "first_k_dense_replace": 1, "moe_layer_freq": 2, "n_routed_experts": 8,
                          "attention_bias": True, "tie_word_embeddings": False, "rope_scaling": V2_ROPE},
    "v32-dense1": {**TINY, "model_type": "deepseek_v32", "num_hidden_layers": 2, "q_lora_rank": 24,
                   "first_k_dense_replace": 1, "n_routed_experts": 4, "n_shared_experts": 1, "n_group": 2,
                   "topk_group": 1, "num_key_value_heads": 4, "index_n_heads": 2, "index_head_dim": 16,
                   "index_topk": 4, "tie_word_embeddings": False},
    "v32-layertypes-tied-attnbias": {**TINY, "model_type": "deepseek_v32", "num_hidden_layers": 3, "q_lora_rank": 16,
                                     "first_k_dense_replace": 1, "mlp_layer_types": ["dense", "dense", "sparse"],
                                     "n_routed_experts": 8, "n_shared_experts": 2, "n_group": 1, "topk_group": 1,
                                     "num_key_value_heads": 4, "index_n_heads": 4, "index_head_dim": 8,
                                     "index_topk": 2, "attention_bias": True, "tie_word_embeddings": True},
    # Mistral4: routed experts saved fused, a bias-free softmax router, lm_head absent when tied
    "m4-qlora-dense1": {**TINY, "model_type": "mistral4", "num_hidden_layers": 2, "q_lora_rank": 24,
                        "first_k_dense_replace": 1, "n_routed_experts": 4, "n_shared_experts": 1,
                        "tie_word_embeddings": False},
    "m4-noqlora-moe0-tied-attnbias": {**TINY, "model_type": "mistral4", "num_hidden_layers": 2, "q_lora_rank": None,
                                      "first_k_dense_replace": 0, "n_routed_experts": 4, "n_shared_experts": 2,
                                      "attention_bias": True, "tie_word_embeddings": True},
    "m4-dense2-grouped": {**TINY, "model_type": "mistral4", "num_hidden_layers": 3, "q_lora_rank": 16,
                          "first_k_dense_replace": 2, "n_routed_experts": 8, "n_shared_experts": 1, "n_group": 2,
                          "topk_group": 1, "tie_word_embeddings": False},
}
V3 = [name for name, raw in CONFIGS.items() if raw["model_type"] == "deepseek_v3"]
V32 = [name for name, raw in CONFIGS.items() if raw["model_type"] == "deepseek_v32"]
M4 = [name for name, raw in CONFIGS.items() if raw["model_type"] == "mistral4"]
V2 = [name for name, raw in CONFIGS.items() if raw["model_type"] == "deepseek_v2"]
TRANSFORMERS = {"deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
                "deepseek_v32": (DeepseekV32Config, DeepseekV32ForCausalLM),
                "deepseek_v2": (DeepseekV2Config, DeepseekV2ForCausalLM),
                "mistral4": (Mistral4Config, Mistral4ForCausalLM)}
MLX_MODULES = {"deepseek_v3": mlx_deepseek_v3, "deepseek_v32": mlx_deepseek_v32, "deepseek_v2": mlx_deepseek_v2,
               "mistral4": mlx_mistral4}
# Shapes of the real DeepSeek-V3 (config.json of deepseek-ai/DeepSeek-V3).
DEEPSEEK_V3 = {"model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
               "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
               "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
               "v_head_dim": 128, "n_routed_experts": 256, "n_shared_experts": 1, "first_k_dense_replace": 3,
               "num_nextn_predict_layers": 1, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                                      "weight_block_size": [128, 128]}}
# DeepSeek-V3.2-Exp: V3's shapes plus the indexer (its config.json and inference/config_671B_v3.2.json).
DEEPSEEK_V32 = {**DEEPSEEK_V3, "model_type": "deepseek_v32", "index_n_heads": 64, "index_head_dim": 128,
                "index_topk": 2048}
# DeepSeek-V2 (236B): its config.json's keys that shape tensors or routing, and its rope.
DEEPSEEK_V2 = {"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 5120, "intermediate_size": 12288,
               "moe_intermediate_size": 1536, "num_hidden_layers": 60, "num_attention_heads": 128,
               "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
               "v_head_dim": 128, "n_routed_experts": 160, "n_shared_experts": 2, "num_experts_per_tok": 6,
               "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "group_limited_greedy",
               "n_group": 8, "topk_group": 3, "routed_scaling_factor": 16.0, "norm_topk_prob": False,
               "scoring_func": "softmax", "tie_word_embeddings": False,
               "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}}


def _transformers_config(raw):
    config_class, _ = TRANSFORMERS[raw["model_type"]]
    # a copy: transformers writes rope_theta and rope_type into the rope_scaling dict it is given
    return config_class(**{k: copy.deepcopy(v) for k, v in raw.items() if k != "model_type"})


def _config_json(raw):
    """The config.json mlx-lm reads: for Mistral4, what save_pretrained writes (mlx-lm's mistral4
    ModelArgs has no defaults for most fields, and reads rope_parameters); the others as they are."""
    return _transformers_config(raw).to_dict() if raw["model_type"] == "mistral4" else raw


def _dtype_fits(dtype_class: str, dtype: str) -> bool:
    """dtype: a safetensors dtype name."""
    if dtype_class == FLOAT:
        return dtype in ("BF16", "F16", "F32")
    return {FP8: "F8_E4M3", F32: "F32"}[dtype_class] == dtype


def _names_shapes(tensors) -> dict[str, tuple[int, ...]]:
    return {name: tuple(entry.shape) for name, entry in tensors.items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per config: the header (name -> (shape, dtype)) and path of what save_pretrained writes."""
    out = {}
    for name, raw in CONFIGS.items():
        torch.manual_seed(0)
        _, model_class = TRANSFORMERS[raw["model_type"]]
        model = model_class(_transformers_config(raw)).to(torch.bfloat16)
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory)
        path = directory / "model.safetensors"
        with safe_open(path, framework="pt") as f:
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        out[name] = (header, path)
    return out


# --- config reading ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [*CONFIGS.values(), {"model_type": "deepseek_v3"}, {"model_type": "deepseek_v2"},
                                 {"model_type": "deepseek_v32"}, {"model_type": "mistral4"},
                                 {"model_type": "deepseek_v3", "num_local_experts": 7, "num_mtp_layers": 2},
                                 {"model_type": "deepseek_v32", "num_experts": 6},
                                 {"model_type": "mistral4", "num_local_experts": 6}])
def test_hf_reads_config_as_transformers_does(raw):
    ours = HF.read_config(raw)
    theirs = _transformers_config(raw)
    # moe_layer_freq: not a transformers field (it builds MoE at every layer >= first_k_dense_replace,
    # which test_hf_equals_save_pretrained checks on the freq-2 config)
    compared = [k for k in ours if hasattr(theirs, k) and k not in ("moe_layer_freq", "quantization_config")]
    assert len(compared) >= 20
    expected = {k: getattr(theirs, k) for k in compared}
    if hasattr(theirs, "mlp_layer_types"):  # V3.2 builds its layers from this list
        expected["first_k_dense_replace"] = theirs.mlp_layer_types.count("dense")
    assert {k: ours[k] for k in compared} == expected
    assert (ours["index_n_heads"] is not None) == (raw["model_type"] == "deepseek_v32")


@pytest.mark.parametrize("raw", [*(_config_json(CONFIGS[n]) for n in V3 + V32 + V2 + M4), {"model_type": "deepseek_v3"},
                                 {"model_type": "deepseek_v32"}, {"model_type": "deepseek_v2", "rope_scaling": V2_ROPE},
                                 _config_json({"model_type": "mistral4"})])
def test_mlx_reads_config_as_model_args_does(raw):
    ours = MLX.read_config(raw)
    theirs = MLX_MODULES[raw["model_type"]].ModelArgs.from_dict(raw)
    compared = [k for k in ours if hasattr(theirs, k) and k != "model_type"]
    assert len(compared) >= 20 + 3 * (raw["model_type"] == "deepseek_v32")
    assert {k: ours[k] for k in compared} == {k: getattr(theirs, k) for k in compared}


def test_every_layout_reads_into_the_same_keys():
    for raw in (CONFIGS["v3-qlora-dense1"], CONFIGS["v32-dense1"], CONFIGS["v2-16experts-v16"]):
        for layout in (HF, MLX, DEEPSEEK):
            assert tuple(layout.read_config(raw)) == CONFIG_KEYS
    assert tuple(DEEPSEEK.read_config({"dim": 32, "n_layers": 2})) == CONFIG_KEYS
    m4 = _config_json(CONFIGS["m4-qlora-dense1"])
    assert HF.read_config(m4) == MLX.read_config(m4)  # both runtimes read a Mistral4 config.json alike
    assert tuple(HF.read_config(m4)) == CONFIG_KEYS
    assert (HF.read_config(m4)["scoring_func"], HF.read_config(m4)["topk_method"]) == ("softmax", None)
    # both runtimes read DeepSeek-V2's config.json, and one transformers 5 saves, alike
    saved = {**_transformers_config(CONFIGS["v2-16experts-v16"]).to_dict(), "rope_scaling": V2_ROPE}
    for v2 in (DEEPSEEK_V2, saved):
        assert HF.read_config(v2) == MLX.read_config(v2)
        assert (MLX.read_config(v2)["scoring_func"], MLX.read_config(v2)["norm_topk_prob"]) == ("softmax", False)


def test_mlx_reads_a_v2_config_only_where_mlx_lm_can_build_it_and_writes_one_it_can():
    """mlx-lm's deepseek_v2 builds every attention's yarn rope from rope_scaling["factor"]: without it
    there is no model. transformers 5 saves rope_parameters instead; the config.json remap writes
    spells the rope as the releases do, for the plain rope as a yarn rope of factor 1."""
    raw = {k: v for k, v in CONFIGS["v2-lite"].items() if k != "rope_scaling"}
    for rope in (None, {"type": "yarn"}):
        with pytest.raises((AttributeError, KeyError)):
            _mlx_model({**raw, "rope_scaling": rope})
        with pytest.raises(RemapError, match="rope_scaling"):
            MLX.read_config({**raw, "rope_scaling": rope})
    for rope, written in ((None, PLAIN_V2_ROPE), (V2_ROPE, {**V2_ROPE, "rope_type": "yarn"})):
        saved = _transformers_config({**raw, "rope_scaling": rope}).to_dict()
        assert "rope_scaling" not in saved and "rope_theta" not in saved  # both in rope_parameters
        config = MLX.write_config(saved)
        assert (config["rope_scaling"], config["rope_theta"]) == (written, 10000.0)
        args = mlx_deepseek_v2.ModelArgs.from_dict(config)
        assert MLX.read_config(config)["num_hidden_layers"] == args.num_hidden_layers
        assert mlx_deepseek_v2.Model(args)(mx.array([[1, 2]])).shape == (1, 2, raw["vocab_size"])


def test_mlx_reads_a_mistral4_config_only_where_mlx_lm_can_build_and_run_it():
    """mlx-lm's mistral4 ModelArgs has no default for most fields (from_dict fails without one), and
    its model reads the llama-4 scaling keys of rope_parameters at every call."""
    from dataclasses import MISSING, fields

    raw = _config_json(CONFIGS["m4-qlora-dense1"])
    required = [f.name for f in fields(mlx_mistral4.ModelArgs) if f.default is MISSING and f.name != "model_type"]
    assert len(required) == 22
    for key in required:
        partial = {k: v for k, v in raw.items() if k != key}
        with pytest.raises(TypeError):
            mlx_mistral4.ModelArgs.from_dict(partial)
        with pytest.raises(RemapError, match=key):
            MLX.read_config(partial)
    for rope in ({k: v for k, v in raw["rope_parameters"].items() if k != "llama_4_scaling_beta"}, None):
        model = mlx_mistral4.Model(mlx_mistral4.ModelArgs.from_dict({**raw, "rope_parameters": rope}))
        with pytest.raises((KeyError, TypeError)):
            model(mx.array([[1, 2]]))
        with pytest.raises(RemapError, match="rope_parameters"):
            MLX.read_config({**raw, "rope_parameters": rope})


def test_mlx_model_types_are_the_ones_mlx_lm_loads_with_its_deepseek_modules():
    assert {MODEL_REMAPPING.get(t, t) for t in MLX_MODEL_TYPES} == set(MLX_MODULES)
    with pytest.raises(RemapError, match=" or ".join(MLX_MODEL_TYPES)):
        MLX.read_config({"model_type": "llama"})


@pytest.mark.parametrize("bad", [{"hidden_size": None}, {"num_hidden_layers": -1}, {"kv_lora_rank": 1.5},
                                 {"model_type": "llama"}, {"model_type": None},
                                 {"model_type": "deepseek_v32", "q_lora_rank": None},  # the indexer reads it
                                 {"model_type": "deepseek_v32", "index_head_dim": None}])
def test_unreadable_configs_are_user_errors(bad):
    raw = {**CONFIGS["v3-qlora-dense1"], **bad}
    for layout in (HF, MLX, DEEPSEEK):
        with pytest.raises(RemapError):
            layout.read_config(raw)


@pytest.mark.parametrize("types", [["sparse", "dense"], ["dense", "dense", "dense"], "dense", ["dense", "moe"]])
def test_hf_refuses_mlp_layer_types_no_layout_can_list(types):
    """A layout lists dense layers first (DeepSeek's first_k_dense_replace): other patterns are named."""
    raw = {**CONFIGS["v32-dense1"], "mlp_layer_types": types}
    for layout in (HF, DEEPSEEK):
        with pytest.raises(RemapError, match="mlp_layer_types"):
            layout.read_config(raw)


# --- hf -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_equals_save_pretrained(name, saved):
    header, _ = saved[name]
    expected = HF.expected(HF.read_config(CONFIGS[name]), "bf16")
    assert {k: shape for k, (shape, _) in header.items()} == _names_shapes(expected)
    assert all(_dtype_fits(expected[k].dtype, dtype) for k, (_, dtype) in header.items())


@pytest.mark.parametrize("name", ["v3-qlora-dense1", "v32-dense1"])
def test_hf_fp8_quantizes_the_modules_transformers_fp8_quantizes(name):
    """transformers' own FP8 quantizer, as it prepares a model for an official checkpoint: it skips
    lm_head and the modules a model keeps in float32 (V3.2's indexer.weights_proj)."""
    raw = {**CONFIGS[name], "quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 16]}}
    _, model_class = TRANSFORMERS[raw["model_type"]]
    model = model_class(_transformers_config(raw))
    quantizer = FineGrainedFP8HfQuantizer(FineGrainedFP8Config(weight_block_size=(16, 16)), pre_quantized=True)
    quantizer._process_model_before_weight_loading(model)
    expected = HF.expected(HF.read_config(raw), "fp8")
    # transformers fuses routed experts in memory; their on-disk per-expert names are checked below
    held = {n: t for n, t in model.state_dict().items() if ".mlp.experts." not in n}
    ours = {n: e for n, e in expected.items() if ".mlp.experts." not in n}
    assert {n: tuple(t.shape) for n, t in held.items()} == {n: e.shape for n, e in ours.items()}
    safetensors_dtype = {torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32"}
    assert all(_dtype_fits(ours[n].dtype, safetensors_dtype[t.dtype]) for n, t in held.items())

    # Routed experts: the bf16 names, each weight FP8 with the scale FP8Linear would give it.
    bf16 = HF.expected(HF.read_config(raw), "bf16")
    experts = {n: t for n, t in bf16.items() if ".mlp.experts." in n}
    scales = {n.replace(".weight", ".weight_scale_inv") for n in experts}
    assert {n for n in expected if ".mlp.experts." in n} == set(experts) | scales
    for name, tensor in experts.items():
        linear = FP8Linear(tensor.shape[1], tensor.shape[0], block_size=(16, 16))
        scale = name.replace(".weight", ".weight_scale_inv")
        assert expected[name].dtype == FP8 and expected[name].shape == tensor.shape
        assert expected[scale].dtype == F32 and expected[scale].shape == tuple(linear.weight_scale_inv.shape)
    if raw["model_type"] == "deepseek_v32":  # the official V3.2 release: wq_b and wk fp8, weights_proj not
        indexer = "model.layers.1.self_attn.indexer"
        assert [expected[f"{indexer}.{m}.weight"].dtype for m in ("wq_b", "wk", "weights_proj")] == [FP8, FP8, FLOAT]
        assert f"{indexer}.weights_proj.weight_scale_inv" not in expected


def test_hf_v2_router_holds_no_correction_bias_whatever_topk_method_says(tmp_path):
    """DeepseekV2TopkRouter is a weight alone; V2 reads topk_method from config.json, and a V3-style
    noaux_tc there (which its router cannot run) adds no tensor."""
    raw = {**CONFIGS["v2-lite"], "topk_method": "noaux_tc"}
    DeepseekV2ForCausalLM(_transformers_config(raw)).save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        header = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert header == _names_shapes(HF.expected(HF.read_config(raw), "bf16"))
    assert not any("e_score_correction_bias" in name for name in header)


def test_full_deepseek_v2_in_both_layouts():
    """DeepSeek-V2 (236B): 29,102 tensors in transformers' layout, 959 in mlx-lm's deepseek_v2
    (experts stacked; kv_b_proj kept under either variant; no router bias)."""
    hf, mlx = HF.expected(HF.read_config(DEEPSEEK_V2)), MLX.expected(MLX.read_config(DEEPSEEK_V2))
    assert (len(hf), len(mlx)) == (29102, 959)
    assert hf["model.layers.59.mlp.experts.159.down_proj.weight"].shape == (5120, 1536)
    assert hf["model.layers.0.mlp.gate_proj.weight"].shape == (12288, 5120)
    assert mlx["model.layers.59.mlp.switch_mlp.down_proj.weight"].shape == (160, 5120, 1536)
    assert mlx["model.layers.1.self_attn.kv_b_proj.weight"].shape == (128 * 256, 512)
    assert mlx == MLX.expected(MLX.read_config(DEEPSEEK_V2), "kv_b_proj")
    assert not any("e_score_correction_bias" in n or "embed_q" in n for n in {*hf, *mlx})


def test_hf_fp8_mtp_is_the_official_deepseek_v3_checkpoint():
    """The official FP8 release: 91,991 tensors in 163 files (its model.safetensors.index.json)."""
    config = HF.read_config(DEEPSEEK_V3)
    expected = HF.expected(config, "fp8-mtp")
    assert len(expected) == 91991
    layer = "model.layers.61"
    assert expected[f"{layer}.eh_proj.weight"].shape == (7168, 14336)
    assert expected[f"{layer}.eh_proj.weight"].dtype == FLOAT  # MTP's projection ships unquantized
    assert expected[f"{layer}.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 56)
    assert expected[f"{layer}.mlp.experts.255.down_proj.weight_scale_inv"].shape == (56, 16)
    assert expected["model.layers.3.mlp.gate.e_score_correction_bias"].dtype == F32


def test_hf_mtp_is_what_transformers_mtp_model_loads_and_saves(tmp_path):
    # transformers' MtpModel finds MTP weights by the pattern model.layers.61 (DeepSeek-V3's index),
    # so the model needs 61 layers; dense ones keep it small.
    raw = {**TINY, "model_type": "deepseek_v3", "hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 61,
           "q_lora_rank": 8, "first_k_dense_replace": 61, "n_routed_experts": 4, "n_shared_experts": 1,
           "n_group": 1, "topk_group": 1, "num_nextn_predict_layers": 1}
    DeepseekV3ForCausalLM(_transformers_config(raw)).save_pretrained(tmp_path / "main")
    config = HF.read_config(raw)
    base, with_mtp = HF.expected(config, "bf16"), HF.expected(config, "bf16-mtp")
    mtp = {n: torch.randn(e.shape) for n, e in with_mtp.items() if n not in base}
    weights = load_file(tmp_path / "main" / "model.safetensors")
    save_file({**weights, **mtp}, tmp_path / "main" / "model.safetensors", metadata={"format": "pt"})

    main = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "main")
    mtp_model = MtpModel.from_pretrained(main)  # raises on any MTP weight it misses
    mtp_model.save_pretrained(tmp_path / "mtp")
    with safe_open(tmp_path / "mtp" / "model.safetensors", framework="pt") as f:
        written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("model.layers.61.")}
    # The MTP's embedding and head are the main model's: transformers ignores the checkpoint's copies.
    shared = {n for n in mtp if any(s in n for s in MtpModel._keys_to_ignore_on_load_unexpected)}
    assert shared == {"model.layers.61.embed_tokens.weight", "model.layers.61.shared_head.head.weight"}
    assert written == {n: tuple(t.shape) for n, t in mtp.items() if n not in shared}


# --- mlx ----------------------------------------------------------------------------------


def _mlx_model(raw):
    module = MLX_MODULES[raw["model_type"]]
    return module.Model(module.ModelArgs.from_dict(_config_json(raw)))


def _mlx_shapes(arrays) -> dict[str, tuple[int, ...]]:
    return {name: tuple(array.shape) for name, array in arrays}


@pytest.mark.parametrize("name", V3 + V32 + V2 + M4)
def test_mlx_embed_q_equals_mlx_lm_model(name):
    model = _mlx_model(CONFIGS[name])
    expected = MLX.expected(MLX.read_config(_config_json(CONFIGS[name])), "embed_q")
    assert _mlx_shapes(tree_flatten(model.parameters())) == _names_shapes(expected)


@pytest.mark.parametrize("name", V3 + V32 + V2 + M4)
def test_mlx_kv_b_proj_is_what_mlx_lm_sanitizes_into_its_model(name):
    model = _mlx_model(CONFIGS[name])
    expected = MLX.expected(MLX.read_config(_config_json(CONFIGS[name])), "kv_b_proj")
    weights = {n: mx.random.normal(e.shape) for n, e in expected.items()}
    assert _mlx_shapes(model.sanitize(weights).items()) == _mlx_shapes(tree_flatten(model.parameters()))


# (mlx-lm honours moe_layer_freq and ignores mlp_layer_types, transformers the other way round:
# only where they agree on the layers does an hf checkpoint fit mlx-lm's model; no mlx-lm model
# has MLP biases)
@pytest.mark.parametrize("name", [n for n in V3 + V32 + V2 + M4 if CONFIGS[n].get("moe_layer_freq", 1) == 1
                                  and "mlp_layer_types" not in CONFIGS[n] and not CONFIGS[n].get("mlp_bias")])
def test_mlx_lm_sanitizes_an_hf_checkpoint_into_the_mlx_layout(name, saved):
    """Mistral4's fused experts included: its sanitize splits gate_up_proj into switch_mlp; V2's
    keeps kv_b_proj."""
    _, path = saved[name]
    raw = CONFIGS[name]
    sanitized = _mlx_shapes(_mlx_model(raw).sanitize(mx.load(str(path))).items())
    expected = _names_shapes(MLX.expected(MLX.read_config(_config_json(raw)), "embed_q"))
    if raw["tie_word_embeddings"] and raw["model_type"] != "mistral4":
        # mlx-lm's deepseek_v3 always holds lm_head: a tied hf checkpoint lacks it and will not load
        del expected["lm_head.weight"]
    assert sanitized == expected


@pytest.mark.parametrize("name", ["v3-qlora-dense1", *V32, *M4, "v2-16experts-v16", "v2-lite"])
def test_mlx_quantized_equals_mlx_lm_quantize_model(name):
    """mlx-lm's own quantize_model (groups of 32: some widths quantize, some are too narrow),
    V3.2's indexer linears included, k_norm and DeepSeek's router left float; Mistral4's router is
    a Linear, quantized like the others; V2's kv_b_proj is a Linear too."""
    raw = _config_json(CONFIGS[name])
    model, config = quantize_model(_mlx_model(raw), dict(raw), group_size=32, bits=4)
    expected = MLX.expected(MLX.read_config({**raw, "quantization": config["quantization"]}), "embed_q")
    assert _mlx_shapes(tree_flatten(model.parameters())) == _names_shapes(expected)
    assert any(e.dtype == U32 for e in expected.values()) and any(e.dtype == FLOAT for n, e in expected.items()
                                                                  if n.endswith("proj.weight"))
    router = expected[f"model.layers.{raw['num_hidden_layers'] - 1}.mlp.gate.weight"].dtype
    assert router == (U32 if raw["model_type"] == "mistral4" else FLOAT)
    if raw["model_type"] == "deepseek_v2":  # kv_b_proj is kv_lora_rank wide: 32 quantizes, 16 does not
        kv_b_proj = expected["model.layers.0.self_attn.kv_b_proj.weight"].dtype
        assert kv_b_proj == (U32 if raw["kv_lora_rank"] == 32 else FLOAT)


# --- deepseek -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_deepseek_holds_hf_tensors_renamed(name):
    raw = CONFIGS[name]
    if raw["model_type"] == "mistral4":  # DeepSeek's model.py routes and scales queries otherwise
        with pytest.raises(RemapError, match="model_type"):
            DEEPSEEK.read_config(raw)
        return
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        with pytest.raises(RemapError, match="no biases"):
            DEEPSEEK.read_config(raw)
        return
    raw = {**raw, "tie_word_embeddings": False}  # DeepSeek's model always has its own head
    hf_config, config = HF.read_config(raw), DEEPSEEK.read_config(raw)
    hf, ours = HF.expected(hf_config, "bf16").values(), DEEPSEEK.expected(config, "bf16").values()
    assert Counter(t.shape for t in ours) == Counter(t.shape for t in hf)
    # with FP8 the dtypes agree too (the router bias float32 in both, as the releases hold it)
    hf, ours = HF.expected(hf_config, "fp8").values(), DEEPSEEK.expected(config, "fp8").values()
    assert Counter((t.shape, t.dtype) for t in ours) == Counter((t.shape, t.dtype) for t in hf)


def test_deepseek_model_args_config_reads_like_the_hf_config():
    """inference/configs/config_671B.json's sizes give the tensors of DeepSeek-V3's config.json."""
    model_args = {"vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61,
                  "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
                  "n_activated_experts": 8, "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5,
                  "score_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                  "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8"}
    from_model_args = DEEPSEEK.read_config(model_args)
    from_hf = DEEPSEEK.read_config(DEEPSEEK_V3)
    assert DEEPSEEK.expected(from_model_args, "fp8") == DEEPSEEK.expected(from_hf, "fp8")
    assert from_model_args["quantization_config"]["weight_block_size"] == [128, 128]
    assert DEEPSEEK.read_config({**model_args, "q_lora_rank": 0})["q_lora_rank"] is None


def test_deepseek_v32_model_args_config_reads_like_the_hf_config():
    """DeepSeek-V3.2-Exp's inference/config_671B_v3.2.json names the indexer sizes, which is how it
    tells V3.2 from V3; its tensors are those of the HF V3.2 config.json."""
    model_args = {"vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61,
                  "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
                  "n_activated_experts": 8, "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5,
                  "score_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                  "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8", "scale_fmt": "ue8m0",
                  "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}
    from_model_args = DEEPSEEK.read_config(model_args)
    assert from_model_args["model_type"] == "deepseek_v32"
    expected = DEEPSEEK.expected(from_model_args, "fp8")
    assert expected == DEEPSEEK.expected(DEEPSEEK.read_config(DEEPSEEK_V32), "fp8")
    indexer = "layers.60.attn.indexer"
    assert {n.removeprefix(indexer + ".") for n in expected if n.startswith(indexer)} == {
        "wq_b.weight", "wq_b.scale", "wk.weight", "wk.scale", "k_norm.weight", "k_norm.bias", "weights_proj.weight"}
    assert expected[f"{indexer}.wq_b.weight"].shape == (64 * 128, 1536)
    assert expected[f"{indexer}.weights_proj.weight"].dtype == FLOAT  # built in the default dtype
    v3_model_args = {k: v for k, v in model_args.items() if not k.startswith("index_")}
    assert DEEPSEEK.read_config(v3_model_args)["index_n_heads"] is None  # V3's ModelArgs has no indexer


def test_deepseek_v32_indexer_is_replicated_on_every_rank():
    """V3.2's convert.py maps the indexer's modules with dim None, its wq_b included (the attention's
    q_b_proj -> wq_b is sliced)."""
    config = DEEPSEEK.read_config(CONFIGS["v32-dense1"])
    files = DEEPSEEK.shards(config, 2)
    single = DEEPSEEK.expected(config)
    indexer = [n for n in single if ".indexer." in n]
    assert len(indexer) == 2 * 5
    assert all(shard[n] == single[n] for shard in files.values() for n in indexer)
    assert split_of("layers.0.attn.wq_b.weight").dim == 0 and split_of("layers.0.attn.indexer.wq_b.weight").dim is None


@pytest.mark.parametrize("variant", DEEPSEEK.variants)
@pytest.mark.parametrize("mp", [1, 2, 8])
def test_deepseek_shards_cut_the_single_file_exactly(mp, variant):
    config = DEEPSEEK.read_config(DEEPSEEK_V3)  # full size: FP8 scales split evenly only there
    full = DEEPSEEK.expected(config, variant)
    files = DEEPSEEK.shards(config, mp, variant)
    assert list(files) == [shard_file(r, mp) for r in range(mp)]
    assert set().union(*files.values()) == set(full)
    for name, tensor in full.items():
        split = split_of(name)
        parts = [shard[name] for shard in files.values() if name in shard]
        if split.expert is not None:
            assert parts == [tensor]
            assert name in files[shard_file(split.expert // (config["n_routed_experts"] // mp), mp)]
        elif split.dim is None:
            assert parts == [tensor] * mp
        else:
            assert len(parts) == mp
            assert sum(p.shape[split.dim] for p in parts) == tensor.shape[split.dim]
            assert all(p.shape[:split.dim] + p.shape[split.dim + 1:] ==
                       tensor.shape[:split.dim] + tensor.shape[split.dim + 1:] for p in parts)
    sliced = {name: split_of(name).dim for name in full if split_of(name).dim is not None}
    assert set(sliced.values()) == {0, 1}
    assert any(n.endswith(".scale") for n in sliced) == (variant == "fp8")  # a scale splits with its weight


def test_deepseek_shards_refuse_an_uneven_split():
    config = DEEPSEEK.read_config(CONFIGS["v3-qlora-dense1"])
    with pytest.raises(RemapError):
        DEEPSEEK.shards(config, 3)  # 4 experts
    with pytest.raises(RemapError, match="does not split"):
        DEEPSEEK.shards({**config, "n_routed_experts": 64}, 64)


@pytest.mark.parametrize("mp", [2, 8])
def test_deepseek_assemble_reads_the_cut_backwards(mp):
    """The rank files' headers give back where convert.py put each piece of each tensor, in any
    file order; files of another scheme, or a single rank, are not pieces."""
    config = DEEPSEEK.read_config({**DEEPSEEK_V3, "num_hidden_layers": 5})  # full-size tensors, fewer layers
    headers = {file: {n: (e.shape, e.dtype) for n, e in shard.items()}
               for file, shard in DEEPSEEK.shards(config, mp, "fp8").items()}
    _, cut = model_parallel(list(DEEPSEEK.expected(config, "fp8").values()), mp, config["n_routed_experts"])
    assert DEEPSEEK.assemble(headers) == cut
    assert DEEPSEEK.assemble(dict(reversed(headers.items()))) == cut
    assert DEEPSEEK.assemble({shard_file(0, 1): headers[shard_file(0, mp)]}) is None
    assert HF.assemble(headers) is None and MLX.assemble(headers) is None
    del headers[shard_file(mp - 1, mp)]["layers.4.attn.wo.weight"]  # (an expert missing is missing from the model)
    with pytest.raises(RemapError, match=f"model{mp - 1}-mp{mp}.safetensors does not hold it"):
        DEEPSEEK.assemble(headers)


# --- registry and detection ---------------------------------------------------------------


def test_registry_names_every_layout():
    assert set(LAYOUTS) == {"hf", "mlx", "scratch", "deepseek"}
    assert all(layout.name == name for name, layout in LAYOUTS.items())
    with pytest.raises(RemapError, match="hf, mlx, scratch, deepseek"):
        get_layout("llama")


def _as_checkpoint(expected):
    return {name: (tensor.shape, "BF16") for name, tensor in expected.items()}


@pytest.mark.parametrize("name", ["v3-qlora-dense1", "v32-dense1"])
@pytest.mark.parametrize("layout", [HF, MLX, DEEPSEEK])
def test_each_layout_variant_detects_as_itself(layout, name):
    raw = {**CONFIGS[name], "num_nextn_predict_layers": 1}
    for variant in layout.variants:
        detection = detect(_as_checkpoint(layout.expected(layout.read_config(raw), variant)), raw)
        assert (detection.layout, detection.variant) == (layout.name, variant)
        assert detection.config == layout.read_config(raw)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_what_detection_builds_is_what_expected_holds(name):
    """`shapes` and `count`, what detection builds instead of `expected`, agree with it in every
    layout and variant: plain, official FP8, and a form that leaves modules alone by name (its
    experts are not stamped)."""
    forms = [None] if CONFIGS[name]["model_type"] == "mistral4" else [None, FP8_FORMS["ue8m0"], FP8_FORMS["ct-channel"]]
    for form, layout in itertools.product(forms, (HF, MLX, DEEPSEEK)):
        raw = {**CONFIGS[name], "num_nextn_predict_layers": 1, "quantization_config": form}
        try:
            config = layout.read_config(raw)
        except RemapError:
            continue
        for variant in layout.variants:
            try:
                expected = layout.expected(config, variant)
            except RemapError:
                with pytest.raises(RemapError):
                    layout.shapes(config, variant)
                continue
            assert list(layout.shapes(config, variant).items()) == [(n, e.shape) for n, e in expected.items()]
            assert layout.count(config, variant) in (None, len(expected))


def test_a_checkpoints_tensor_infos_detect_as_their_shape_dtype_pairs():
    """api passes the TensorInfos as they are; a layout reading a config off the shapes still gets pairs."""
    raw = {**CONFIGS["v3-qlora-dense1"], "num_nextn_predict_layers": 1}
    for variant, changed in itertools.product(HF.variants, (False, True)):
        pairs = _as_checkpoint(HF.expected(HF.read_config(raw), variant))
        if changed:
            pairs["model.layers.1.self_attn.kv_b_proj.weight"] = ((64, 8), "BF16")
        infos = {n: TensorInfo(n, dtype, tuple(shape), Path("model.safetensors")) for n, (shape, dtype) in pairs.items()}
        for config in (raw, None):
            got, want = detect(infos, config), detect(pairs, config)
            assert (got.layout, got.variant, got.describe(), got.closest) == (want.layout, want.variant, want.describe(), want.closest)


def test_mistral4_detects_as_hf_and_mlx_and_no_other_variant(saved):
    """transformers' file is hf bf16 (the FP8 variants describe DeepSeek's release only); mlx-lm's
    model is mlx embed_q; DeepSeek's layout reads no mistral4 config."""
    for name in M4:
        header, path = saved[name]
        raw = _config_json(CONFIGS[name])
        detection = detect(header, raw)
        assert (detection.layout, detection.variant) == ("hf", "bf16")
        fits = {fit.layout: fit for fit in detection.closest}
        assert "model_type" in fits["deepseek"].error
        for variant in ("fp8", "fp8-mtp"):
            with pytest.raises(RemapError, match="DeepSeek's official FP8 release"):
                HF.expected(HF.read_config(raw), variant)
        params = {n: (tuple(a.shape), "F32") for n, a in tree_flatten(_mlx_model(raw).parameters())}
        assert (detect(params, raw).layout, detect(params, raw).variant) == ("mlx", "embed_q")


def test_real_checkpoints_detect(saved):
    for name in ("v3-qlora-dense1", "v2-lite"):
        header, _ = saved[name]
        assert (detect(header, CONFIGS[name]).layout, detect(header, CONFIGS[name]).variant) == ("hf", "bf16")
    raw = CONFIGS["v3-dense2-attnbias"]
    params = {n: (tuple(a.shape), "F32") for n, a in tree_flatten(_mlx_model(raw).parameters())}
    assert (detect(params, raw).layout, detect(params, raw).variant) == ("mlx", "embed_q")
    # mlx-lm's deepseek_v2 holds kv_b_proj, which both variants name for it: the first fits
    raw = CONFIGS["v2-16experts-v16"]
    params = {n: (tuple(a.shape), "F32") for n, a in tree_flatten(_mlx_model(raw).parameters())}
    assert (detect(params, raw).layout, detect(params, raw).variant) == ("mlx", "embed_q")
    assert detect(params, {k: v for k, v in raw.items() if k != "rope_scaling"}).layout is None


def test_a_wrong_shape_is_named_not_matched():
    raw = CONFIGS["v3-qlora-dense1"]
    tensors = _as_checkpoint(HF.expected(HF.read_config(raw)))
    tensors["model.layers.1.self_attn.kv_b_proj.weight"] = ((64, 8), "BF16")
    detection = detect(tensors, raw)
    assert detection.layout is None
    hf = next(fit for fit in detection.closest if fit.layout == "hf")
    assert (hf.variant, hf.unexpected, hf.missing) == ("bf16", (), ())
    assert hf.wrong_shape == (("model.layers.1.self_attn.kv_b_proj.weight", (64, 8), (64, 16)),)
    assert "kv_b_proj.weight [64, 8] not [64, 16]" in detection.describe()


LLAMA = {f"model.layers.{i}.{part}.weight": (shape, "BF16") for i in range(2) for part, shape in (
    ("self_attn.q_proj", (32, 32)), ("self_attn.k_proj", (8, 32)), ("self_attn.v_proj", (8, 32)),
    ("self_attn.o_proj", (32, 32)), ("mlp.gate_proj", (48, 32)), ("mlp.up_proj", (48, 32)),
    ("mlp.down_proj", (32, 48)), ("input_layernorm", (32,)), ("post_attention_layernorm", (32,)))}
LLAMA.update({"model.embed_tokens.weight": ((64, 32), "BF16"), "model.norm.weight": ((32,), "BF16"),
              "lm_head.weight": ((64, 32), "BF16")})


@pytest.mark.parametrize("raw", [{"model_type": "llama", "hidden_size": 32}, None])
def test_a_llama_checkpoint_fits_no_layout(raw):
    detection = detect(LLAMA, raw)
    assert detection.layout is None and detection.config is None
    assert len(detection.unmatched) == len(LLAMA)
    assert detection.describe().startswith(f"not a DeepSeek checkpoint: none of its {len(LLAMA)} tensors fit")


def test_llama_tensors_under_a_deepseek_config_are_named():
    detection = detect(LLAMA, {**CONFIGS["v3-noqlora-moe0-tied"], "tie_word_embeddings": False})
    assert detection.layout is None
    assert "model.layers.0.self_attn.k_proj.weight" in detection.unmatched
    assert "model.embed_tokens.weight" not in detection.unmatched  # hf and mlx hold it with this shape
    examples = "model.layers.0.self_attn.q_proj.weight, model.layers.0.self_attn.k_proj.weight"
    assert f"fit no layout, e.g. {examples}" in detection.describe()

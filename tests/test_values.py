"""Values, not only names and shapes: what a spec writes, against what the target runtime's own
conversion makes of the same random weights.

hf-to-deepseek against DeepSeek's inference/convert.py (its mapping table and per-rank cut,
written out below); hf-to-mlx against mlx-lm's own `sanitize`. The configs are the ones that tell
right from wrong: 16 routed experts (as text, expert 10 sorts before expert 2) and
qk_nope_head_dim != v_head_dim (kv_b_proj split in the wrong order keeps its total). Random
normal weights: no two tensors, rows or experts alike, so any swap shows.
"""

from __future__ import annotations

import numpy as np
import pytest

from remap import api
from remap.io.checkpoint import open_checkpoint
from remap.planner import build_plan
from remap.spec.invert import invert_spec
from remap.spec.load import load_spec
from tests.helpers import HF_BASE, layout_tensors, random_tensors, run_plan, save_checkpoint, types_of

# 16 experts, 4 heads of qk_nope 16 / v 8, and every sliced dim a multiple of 16 (so mp=16 works).
WIDE = {**HF_BASE, "n_routed_experts": 16, "qk_nope_head_dim": 16, "v_head_dim": 8}
CONFIGS = {
    "16 experts, nope != v": WIDE,
    "no q LoRA, all MoE": {**WIDE, "q_lora_rank": None, "first_k_dense_replace": 0},
    "V3.2 indexer": {**WIDE, "model_type": "deepseek_v32", "index_n_heads": 2, "index_head_dim": 16, "index_topk": 4},
}

# DeepSeek-V3 inference/convert.py (commit 9b4e978), `mapping`: the HF module -> (DeepSeek's module,
# the dim each rank's slice is cut along; None: whole on every rank). The last four are
# DeepSeek-V3.2-Exp's additions for the indexer (whole on every rank).
CONVERT_PY = {
    "embed_tokens": ("embed", 0),
    "input_layernorm": ("attn_norm", None),
    "post_attention_layernorm": ("ffn_norm", None),
    "q_proj": ("wq", 0),
    "q_a_proj": ("wq_a", None),
    "q_a_layernorm": ("q_norm", None),
    "q_b_proj": ("wq_b", 0),
    "kv_a_proj_with_mqa": ("wkv_a", None),
    "kv_a_layernorm": ("kv_norm", None),
    "kv_b_proj": ("wkv_b", 0),
    "o_proj": ("wo", 1),
    "gate": ("gate", None),
    "gate_proj": ("w1", 0),
    "down_proj": ("w2", 1),
    "up_proj": ("w3", 0),
    "norm": ("norm", None),
    "lm_head": ("head", 0),
    "scale": ("scale", None),
    "wq_b": ("wq_b", None),
    "wk": ("wk", None),
    "k_norm": ("k_norm", None),
    "weights_proj": ("weights_proj", None),
}


def convert_py(hf: dict[str, np.ndarray], n_layers: int, n_experts: int, mp: int) -> list[dict[str, np.ndarray]]:
    """convert.py's main() on in-memory tensors, step for step: one state dict per rank."""
    local = n_experts // mp
    ranks: list[dict[str, np.ndarray]] = [{} for _ in range(mp)]
    for name, param in hf.items():
        if name.startswith(f"model.layers.{n_layers}."):  # convert.py: `if "model.layers.61" in name`
            continue
        name = name.removeprefix("model.").replace("self_attn", "attn").replace("mlp", "ffn")
        name = name.replace("weight_scale_inv", "scale").replace("e_score_correction_bias", "bias")
        key = name.split(".")[-2]
        new_key, dim = CONVERT_PY[key]
        name = name.replace(key, new_key)
        for i in range(mp):
            piece = param
            if "experts" in name and "shared_experts" not in name:
                if not i * local <= int(name.split(".")[-3]) < (i + 1) * local:
                    continue
            elif dim is not None:
                size = param.shape[dim] // mp
                piece = np.take(param, range(i * size, (i + 1) * size), axis=dim)
            ranks[i][name] = piece
    return ranks


@pytest.mark.parametrize("mp", [1, 2, 16])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=list(CONFIGS))
def test_hf_to_deepseek_writes_what_convert_py_writes(tmp_path, config, mp):
    config = {**config, "num_nextn_predict_layers": 1}  # an MTP layer, which convert.py drops
    hf = random_tensors(layout_tensors("hf", config, "bf16-mtp"))
    save_checkpoint(tmp_path / "hf", config, hf)
    plan, ckpt = api.plan(tmp_path / "hf", "hf-to-deepseek", params={"mp": mp})
    api.convert(plan, ckpt, tmp_path / "deepseek")
    for r, expected in enumerate(convert_py(hf, config["num_hidden_layers"], config["n_routed_experts"], mp)):
        with open_checkpoint(tmp_path / f"deepseek/model{r}-mp{mp}.safetensors") as rank:
            assert set(rank.tensors) == set(expected)
            for name, want in expected.items():
                got = rank.read(name)
                assert got.dtype == want.dtype, name  # the router bias too: convert.py copies its dtype
                assert got.shape == want.shape and np.array_equal(got.astype(np.float64), want.astype(np.float64)), name


def _sanitized(config: dict, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What mlx-lm's deepseek_v3 / deepseek_v32 Model.sanitize makes of `weights` (float32)."""
    import mlx.core as mx
    from mlx_lm.models import deepseek_v3, deepseek_v32

    module = deepseek_v32 if config["model_type"] == "deepseek_v32" else deepseek_v3
    model = module.Model(module.ModelArgs.from_dict(config))
    sanitized = model.sanitize({name: mx.array(array) for name, array in weights.items()})
    return {name: np.array(array) for name, array in sanitized.items()}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=list(CONFIGS))
def test_hf_to_mlx_writes_what_mlx_lm_sanitize_makes(config):
    """embed_q: mlx-lm's own split of kv_b_proj and stacking of the experts, value for value. The
    kv_b_proj variant keeps kv_b_proj as it is, which mlx-lm's sanitize turns into the same."""
    hf = random_tensors(layout_tensors("hf", config, "bf16", float_dtype="F32"))
    theirs = _sanitized(config, hf)
    for variant in ("embed_q", "kv_b_proj"):
        plan = build_plan(load_spec("hf-to-mlx"), layout_tensors("hf", config, "bf16", "F32"), config, variant=variant)
        ours = run_plan(plan, hf)
        if variant == "kv_b_proj":
            kv_b = [n for n in ours if n.endswith("kv_b_proj.weight")]
            assert kv_b and all(np.array_equal(ours[n], hf[n]) for n in kv_b)
            ours = _sanitized(config, ours)
        assert set(ours) == set(theirs), variant
        for name, want in theirs.items():
            assert ours[name].shape == want.shape and np.array_equal(ours[name], want), (variant, name)


def test_expert_e_lands_at_expert_e():
    """With 16 experts, switch_mlp[e] is expert e (not the e-th name in text order), and the
    inverse puts it back at expert e."""
    hf = random_tensors(layout_tensors("hf", WIDE, "bf16"))
    plan = build_plan(load_spec("hf-to-mlx"), types_of(hf), WIDE)
    mlx = run_plan(plan, hf)
    for e in range(16):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            stacked = mlx[f"model.layers.1.mlp.switch_mlp.{proj}.weight"]
            assert np.array_equal(stacked[e], hf[f"model.layers.1.mlp.experts.{e}.{proj}.weight"]), (e, proj)
    back = run_plan(build_plan(invert_spec(load_spec("hf-to-mlx")), types_of(mlx), plan.target_config,
                               source_variant="embed_q"), mlx)
    assert set(back) == set(hf) and all(np.array_equal(back[n], hf[n]) for n in hf)

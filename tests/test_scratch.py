"""The scratch layout, its reference model, and the conditions under which it is DeepSeek-V3.

The oracle is transformers' own DeepseekV3ForCausalLM: given the equivalent weights (built here
by a plain, commented hand-mapping, independent of remap's specs) it must produce the scratch
model's logits whenever the documented conditions hold, and must not when one is broken.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.modeling_layers import MtpLayer
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

from remap.errors import RemapError
from remap.layouts.base import FLOAT
from remap.layouts.hf import CONFIG_KEYS
from remap.layouts.scratch import LAYOUT
from remap.parity.scratch_model import ScratchModel

BASE = {
    "model_type": "deepseek_v3_scratch",
    "vocab_size": 96,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "q_lora_rank": 24,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 6,
    "intermediate_size": 40,
    "moe_intermediate_size": 12,  # routed experts narrower than the shared one, as in seed 003
    "shared_intermediate_size": 20,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 1.7,
    "norm_topk_prob": True,
    "max_position_embeddings": 16,
    # != the latent norms' fixed 1e-6, so parity also proves which eps each norm uses
    "rms_norm_eps": 1e-5,
    "rope_theta": 500.0,
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": True,
}
CONFIGS = {
    "q_lora-dense1-mtp1": BASE,
    "q_proj-all_moe-no_mtp": {
        **BASE, "q_lora_rank": None, "first_k_dense_replace": 0, "num_nextn_predict_layers": 0
    },
    "3_layers-2_dense-2_mtp": {
        **BASE, "num_hidden_layers": 3, "first_k_dense_replace": 2, "num_nextn_predict_layers": 2
    },
    "untied-top1-unnormalised": {
        **BASE, "tie_word_embeddings": False, "norm_topk_prob": False, "num_experts_per_tok": 1
    },
}
PARITY_CONFIGS = ["q_lora-dense1-mtp1", "q_proj-all_moe-no_mtp", "untied-top1-unnormalised"]
TOKENS = torch.tensor([[5, 17, 3, 88, 41, 41, 0, 60, 12, 95, 7, 33]])


# --- the layout ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_layout_is_what_the_reference_model_holds(name):
    config = LAYOUT.read_config(CONFIGS[name])
    expected = LAYOUT.expected(config)
    held = {key: tuple(value.shape) for key, value in ScratchModel(config).state_dict().items()}
    assert {key: e.shape for key, e in expected.items()} == held
    assert all(e.name == key and e.dtype == FLOAT for key, e in expected.items())


def test_read_config_fills_defaults_and_is_idempotent():
    minimal = {k: v for k, v in BASE.items() if k not in ("model_type", "first_k_dense_replace", "rope_theta")}
    config = LAYOUT.read_config(minimal)
    assert config["model_type"] == "deepseek_v3_scratch"
    assert config["first_k_dense_replace"] == 0 and config["rope_theta"] == 10000.0
    assert config["n_shared_experts"] == 1 and config["n_group"] == 1 and config["mlp_bias"] is True
    assert LAYOUT.read_config(config) == config


def test_read_config_speaks_the_shared_deepseek_namespace():
    """Spec expressions see the same keys whichever layout read the source config."""
    assert set(CONFIG_KEYS) <= set(LAYOUT.read_config(BASE))


@pytest.mark.parametrize(
    "change, key",
    [
        ({"model_type": "deepseek_v3"}, "model_type"),
        ({"n_shared_experts": 2}, "n_shared_experts"),
        ({"n_group": 8}, "n_group"),
        ({"qk_rope_head_dim": 5}, "qk_rope_head_dim"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ],
)
def test_read_config_rejects_what_the_format_cannot_hold(change, key):
    with pytest.raises(RemapError) as error:
        LAYOUT.read_config({**BASE, **change})
    assert key in str(error.value)


def test_read_config_names_missing_sizes():
    with pytest.raises(RemapError, match="shared_intermediate_size"):
        LAYOUT.read_config({k: v for k, v in BASE.items() if k != "shared_intermediate_size"})


# --- weights -------------------------------------------------------------------------------


def random_scratch(config: dict, seed: int = 0) -> ScratchModel:
    """A scratch model with random weights that meets every DeepSeek-V3 condition."""
    torch.manual_seed(seed)
    model = ScratchModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and not name.endswith(".bias"):
                param.copy_(1 + 0.2 * torch.randn_like(param))  # RMSNorm weights: near 1, not 1
            elif param.dim() == 2:
                param.copy_(torch.randn_like(param) * param.shape[1] ** -0.5)
            else:
                param.copy_(0.3 * torch.randn_like(param))  # biases (zeroed below)
    meet_conditions(model)
    return model


def meet_conditions(model: ScratchModel) -> None:
    """The documented conditions: wpe zero, MLP biases zero, every head's rope key = head 0's."""
    rope = model.config["qk_rope_head_dim"]
    with torch.no_grad():
        model.wpe.weight.zero_()
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.zero_()
            if name.endswith("k_rope_proj.weight"):
                param.copy_(param[:rope].repeat(model.config["num_attention_heads"], 1))


# --- the independent oracle: transformers' DeepseekV3ForCausalLM -----------------------------


def hf_config(c: dict) -> DeepseekV3Config:
    """The DeepSeek-V3 config of the same model (c is a read scratch config)."""
    return DeepseekV3Config(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_attention_heads"],
        q_lora_rank=c["q_lora_rank"],
        kv_lora_rank=c["kv_lora_rank"],
        qk_nope_head_dim=c["qk_nope_head_dim"],
        qk_rope_head_dim=c["qk_rope_head_dim"],
        v_head_dim=c["v_head_dim"],
        intermediate_size=c["intermediate_size"],
        # one width for routed and shared experts: the routed ones get zero-padded to it
        moe_intermediate_size=c["shared_intermediate_size"],
        n_shared_experts=1,
        n_routed_experts=c["n_routed_experts"],
        num_experts_per_tok=c["num_experts_per_tok"],
        n_group=1,  # no group-limited routing
        topk_group=1,
        first_k_dense_replace=c["first_k_dense_replace"],
        routed_scaling_factor=c["routed_scaling_factor"],
        norm_topk_prob=c["norm_topk_prob"],
        max_position_embeddings=c["max_position_embeddings"],
        rms_norm_eps=c["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"]},
        rope_interleave=True,
        tie_word_embeddings=False,  # DeepSeek-V3 stores lm_head; we give it a copy of wte
        num_nextn_predict_layers=0,
        attn_implementation="eager",
    )


def hf_attention(s: dict, src: str, dst: str, c: dict) -> dict:
    heads, nope, rope = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"]
    out = {}
    if c["q_lora_rank"] is None:
        out[f"{dst}q_proj.weight"] = s[f"{src}q_proj.weight"]
    else:
        out[f"{dst}q_a_proj.weight"] = s[f"{src}q_a_proj.weight"]
        out[f"{dst}q_a_layernorm.weight"] = s[f"{src}q_a_norm.weight"]
        out[f"{dst}q_b_proj.weight"] = s[f"{src}q_b_proj.weight"]
    # kv_a_proj_with_mqa = [kv_proj ; the rope key of head 0]: DeepSeek-V3 has one rope key for
    # all heads, so the other heads' rows are dropped (lossless only when they equal head 0's).
    out[f"{dst}kv_a_proj_with_mqa.weight"] = torch.cat(
        [s[f"{src}kv_proj.weight"], s[f"{src}k_rope_proj.weight"][:rope]]
    )
    out[f"{dst}kv_a_layernorm.weight"] = s[f"{src}kv_norm.weight"]
    # kv_b_proj holds, per head, nope rows of k then v_head_dim rows of v. k_decompress has
    # nope + rope rows per head of which the first nope are used; the rest is dropped.
    k_nope = s[f"{src}k_decompress.weight"].view(heads, nope + rope, -1)[:, :nope]
    v = s[f"{src}v_decompress.weight"].view(heads, c["v_head_dim"], -1)
    out[f"{dst}kv_b_proj.weight"] = torch.cat([k_nope, v], dim=1).reshape(-1, c["kv_lora_rank"])
    out[f"{dst}o_proj.weight"] = s[f"{src}o_proj.weight"]
    return out


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])


def hf_layer(s: dict, src: str, dst: str, c: dict, moe: bool) -> dict:
    """One block; MLP biases are dropped (lossless only when they are zero)."""
    out = {
        f"{dst}input_layernorm.weight": s[f"{src}ln_1.weight"],
        f"{dst}post_attention_layernorm.weight": s[f"{src}ln_2.weight"],
        **hf_attention(s, f"{src}attn.", f"{dst}self_attn.", c),
    }
    if not moe:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[f"{dst}mlp.{proj}.weight"] = s[f"{src}mlp.{proj}.weight"]
        return out
    width, experts = c["shared_intermediate_size"], range(c["n_routed_experts"])
    out[f"{dst}mlp.gate.weight"] = s[f"{src}mlp.router.weight"]
    out[f"{dst}mlp.gate.e_score_correction_bias"] = torch.zeros(c["n_routed_experts"])
    # transformers holds experts fused: gate_up_proj [E, 2 * width, hidden] (gate rows, then up
    # rows) and down_proj [E, hidden, width]. Zero rows of gate/up and zero columns of down give
    # a zero contribution, so padding routed experts to the shared width changes nothing.
    e = f"{src}mlp.experts."
    gate = [pad_rows(s[f"{e}{i}.gate_proj.weight"], width) for i in experts]
    up = [pad_rows(s[f"{e}{i}.up_proj.weight"], width) for i in experts]
    down = [pad_rows(s[f"{e}{i}.down_proj.weight"].T, width).T for i in experts]
    out[f"{dst}mlp.experts.gate_up_proj"] = torch.stack([torch.cat(pair) for pair in zip(gate, up)])
    out[f"{dst}mlp.experts.down_proj"] = torch.stack(down)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        out[f"{dst}mlp.shared_experts.{proj}.weight"] = s[f"{src}mlp.shared_expert.{proj}.weight"]
    return out


def hf_state_dict(scratch: ScratchModel) -> dict:
    """transformers DeepseekV3ForCausalLM weights for a scratch model (wpe is dropped)."""
    s, c = scratch.state_dict(), scratch.config
    out = {
        "model.embed_tokens.weight": s["wte.weight"],
        "model.norm.weight": s["ln_f.weight"],
        "lm_head.weight": s["wte.weight"] if c["tie_word_embeddings"] else s["lm_head.weight"],
    }
    for i in range(c["num_hidden_layers"]):
        out |= hf_layer(s, f"h.{i}.", f"model.layers.{i}.", c, moe=i >= c["first_k_dense_replace"])
    return out


def hf_model(scratch: ScratchModel) -> DeepseekV3ForCausalLM:
    model = DeepseekV3ForCausalLM(hf_config(scratch.config)).eval()
    model.load_state_dict(hf_state_dict(scratch), strict=True)  # every tensor given, none extra
    return model


def both_logits(scratch: ScratchModel) -> tuple[torch.Tensor, torch.Tensor]:
    hf = hf_model(scratch)
    with torch.no_grad():
        return scratch(TOKENS).logits, hf(TOKENS).logits


# --- parity under the conditions, and each condition's necessity ------------------------------


@pytest.mark.parametrize("name", PARITY_CONFIGS)
def test_scratch_equals_transformers_deepseek_v3_under_the_conditions(name):
    scratch = random_scratch(CONFIGS[name]).eval()
    hf = hf_model(scratch)
    with torch.no_grad():
        ours = scratch(TOKENS, output_hidden_states=True)
        theirs = hf(TOKENS, output_hidden_states=True)
    assert ours.logits.abs().max() > 1  # a test on near-zero logits would prove nothing
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-5)
    # Per layer: the embedding, then every block. transformers' last entry is after its final
    # norm; ours are all before ln_f.
    ours_hidden = [*ours.hidden_states[:-1], scratch.ln_f(ours.hidden_states[-1])]
    assert len(ours_hidden) == len(theirs.hidden_states) == scratch.config["num_hidden_layers"] + 1
    for layer, (a, b) in enumerate(zip(ours_hidden, theirs.hidden_states)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"hidden state {layer}")


def break_wpe(model):
    model.wpe.weight.normal_(0, 0.5)


def break_bias(model):
    model.h[-1].mlp.experts[0].up_proj.bias.normal_(0, 0.5)


def break_dense_bias(model):
    model.h[0].mlp.down_proj.bias.normal_(0, 0.5)


def break_rope_heads(model):
    rope = model.config["qk_rope_head_dim"]
    model.h[0].attn.k_rope_proj.weight[rope:].normal_(0, 0.5)  # heads 1.. no longer equal head 0


@pytest.mark.parametrize("breaks", [break_wpe, break_bias, break_dense_bias, break_rope_heads])
def test_each_condition_matters(breaks):
    scratch = random_scratch(BASE).eval()
    with torch.no_grad():
        breaks(scratch)
    ours, theirs = both_logits(scratch)
    assert (ours - theirs).abs().max() > 1e-3


def test_unused_k_decompress_rows_do_not_matter():
    scratch = random_scratch(BASE).eval()
    with torch.no_grad():
        before = scratch(TOKENS).logits
        heads, nope, rope = BASE["num_attention_heads"], BASE["qk_nope_head_dim"], BASE["qk_rope_head_dim"]
        for block in scratch.h:
            slots = block.attn.k_decompress.weight.view(heads, nope + rope, -1)
            slots[:, nope:].normal_(0, 5.0)  # the trailing rope-sized rows of every head
    ours, theirs = both_logits(scratch)
    assert torch.equal(ours, before)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_mtp_heads_do_not_touch_logits():
    scratch = random_scratch(BASE).eval()
    with torch.no_grad():
        before = scratch(TOKENS).logits
        for param in scratch.mtp_heads.parameters():
            param.normal_(0, 1.0)
        assert torch.equal(scratch(TOKENS).logits, before)


def test_mtp_head_is_deepseek_v3_mtp_module():
    """Pins the MTP weights' meaning, proj's column order above all, against transformers' MtpLayer."""
    scratch = random_scratch(BASE).eval()
    c, s = scratch.config, scratch.state_dict()
    hf = hf_model(scratch)
    # DeepSeek-V3's MTP module minus shared_head.norm, which the scratch format does not store
    # (its index is where DeepSeek-V3 stores it: right after the trunk's layers)
    layer = MtpLayer(
        hf.config, DeepseekV3DecoderLayer, DeepseekV3RMSNorm, layer_idx=c["num_hidden_layers"], use_post_norm=False
    )
    layer.load_state_dict(
        {
            "enorm.weight": s["mtp_heads.0.norm_e.weight"],
            "hnorm.weight": s["mtp_heads.0.norm_h.weight"],
            "eh_proj.weight": s["mtp_heads.0.proj.weight"],  # [embedding half | hidden half]
            **{
                f"mtp_block.{k}": v
                for k, v in hf_layer(s, "mtp_heads.0.block.", "", c, moe=True).items()
            },
        },
        strict=True,
    )
    layer.eval()
    with torch.no_grad():
        final = scratch.ln_f(scratch(TOKENS, output_hidden_states=True).hidden_states[-1])
        (ours,) = scratch.mtp(TOKENS, final)
        tokens = TOKENS.shape[1] - 1
        positions = torch.arange(tokens)[None]
        causal = torch.full((tokens, tokens), float("-inf")).triu(1)[None, None]
        theirs = layer(
            hf.model.embed_tokens(TOKENS[:, 1:]),
            final[:, :tokens],
            position_embeddings=hf.model.rotary_emb(final, positions),
            attention_mask=causal,
            position_ids=positions,
            past_key_values=None,
        )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_too_many_tokens_is_a_user_error():
    scratch = ScratchModel(BASE)
    with pytest.raises(RemapError, match="max_position_embeddings"):
        scratch(torch.zeros(1, BASE["max_position_embeddings"] + 1, dtype=torch.long))

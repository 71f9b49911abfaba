"""Shared fixtures: a tiny checkpoint written by transformers itself (the real `hf` layout)."""

from __future__ import annotations

import pytest

TINY_HF = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
    kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
    first_k_dense_replace=1, n_group=2, topk_group=1, max_position_embeddings=64,
)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """A bf16 DeepseekV3ForCausalLM saved with save_pretrained (what users have on disk)."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY_HF)).to(torch.bfloat16)
    with torch.no_grad():  # a visible router bias, so routing differences would show
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("tiny") / "hf"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_mistral4(tmp_path_factory):
    """tiny_mistral4(name): a bf16 Mistral4ForCausalLM of TINY_MISTRAL4[name] saved with save_pretrained,
    with the fixtures' tokenizer (mlx_lm.convert needs one). Weights drawn as fixtures/generate.py
    draws them (unit-size activations), not transformers' tiny initialisation."""
    made = {}

    def make(name: str):
        if name not in made:
            import torch
            from transformers import Mistral4Config, Mistral4ForCausalLM

            from fixtures.generate import draw, train_tokenizer
            from tests.helpers import TINY_MISTRAL4

            model = Mistral4ForCausalLM(Mistral4Config(**TINY_MISTRAL4[name], architectures=["Mistral4ForCausalLM"]))
            with torch.no_grad():
                for key, param in model.named_parameters():
                    param.copy_(torch.from_numpy(draw(f"mistral4-{name}", key, tuple(param.shape))))
            made[name] = tmp_path_factory.mktemp("mistral4") / name
            model.to(torch.bfloat16).save_pretrained(made[name])
            train_tokenizer().save_pretrained(made[name])
        return made[name]

    return make


@pytest.fixture(scope="session")
def tiny_deepseek_v2(tmp_path_factory):
    """tiny_deepseek_v2(name, hub=True): a bf16 DeepseekV2ForCausalLM of TINY_DEEPSEEK_V2[name] saved
    with save_pretrained, with the fixtures' tokenizer, weights drawn as fixtures/generate.py draws
    them. hub: config.json spells the rope as DeepSeek's releases do (rope_scaling, rope_theta), the
    only spelling mlx-lm's deepseek_v2 (and so mlx_lm.convert) reads; otherwise as transformers 5
    writes it (rope_parameters)."""
    made = {}

    def make(name: str, hub: bool = True):
        if (name, hub) not in made:
            import copy
            import json

            import torch
            from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

            from fixtures.generate import draw, train_tokenizer
            from tests.helpers import TINY_DEEPSEEK_V2

            # a copy: transformers writes rope_theta and rope_type into the rope_scaling it is given
            model = DeepseekV2ForCausalLM(DeepseekV2Config(**copy.deepcopy(TINY_DEEPSEEK_V2[name])))
            with torch.no_grad():
                for key, param in model.named_parameters():
                    param.copy_(torch.from_numpy(draw(f"deepseek-v2-{name}", key, tuple(param.shape))))
            path = made[(name, hub)] = tmp_path_factory.mktemp("deepseek-v2") / name
            model.to(torch.bfloat16).save_pretrained(path)
            train_tokenizer().save_pretrained(path)
            if hub:
                config = json.loads((path / "config.json").read_text())
                rope = config.pop("rope_parameters")
                config.update(rope_theta=rope.pop("rope_theta"), rope_scaling=TINY_DEEPSEEK_V2[name]["rope_scaling"])
                (path / "config.json").write_text(json.dumps(config, indent=2))
        return made[(name, hub)]

    return make

"""Reference PyTorch model for the `scratch` layout, in one readable file.

The parity checker runs it as the torch side for scratch checkpoints, so it is written from the
layout's definition (docs/layouts/scratch.md), not copied from any other runtime. Its
`state_dict()` names and shapes are exactly the layout's.

Forward, for token ids t_0..t_{T-1}:

    x = wte[t] + wpe[pos]                                      learned positions, GPT-2 style
    for each block:   x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
    logits = ln_f(x) @ wte.T                                   (lm_head.weight when untied)

attn is DeepSeek-V3's multi-head latent attention, except that the rope key is computed per head
from the layer input (`k_rope_proj`) where DeepSeek-V3 shares one across heads. mlp is a SwiGLU
with biases in the first `first_k_dense_replace` blocks and a DeepSeek-V3 MoE after: sigmoid router,
top-k, one shared expert. All norms are RMSNorm.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from remap.errors import RemapError
from remap.layouts.scratch import LATENT_NORM_EPS, read_config


class ScratchOutput(NamedTuple):
    logits: torch.Tensor  # [batch, tokens, vocab]
    # With output_hidden_states: the embedding output, then every block's output (before ln_f);
    # num_hidden_layers + 1 tensors of [batch, tokens, hidden]. None otherwise.
    hidden_states: tuple[torch.Tensor, ...] | None


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dims))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # normalise in float32 whatever the weights are, as DeepSeek-V3 does
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Interleaved ("traditional") RoPE on the last axis of x [batch, tokens, heads, dims].

    Pair (x_{2i}, x_{2i+1}) at position p turns by the angle p * theta^(-2i/dims), as in
    DeepSeek-V3, transformers' `rope_interleave=True` and mlx's `traditional=True`.
    """
    dims = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dims, 2, dtype=torch.float32, device=x.device) / dims))
    angles = positions.float()[:, None] * inv_freq  # [tokens, dims / 2]
    cos = angles.cos()[:, None, :].to(x.dtype)  # broadcast over heads
    sin = angles.sin()[:, None, :].to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    turned = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return turned.flatten(-2)


class Attention(nn.Module):
    """Multi-head latent attention with a per-head rope key."""

    def __init__(self, c: Mapping[str, Any]):
        super().__init__()
        hidden, heads, rank = c["hidden_size"], c["num_attention_heads"], c["kv_lora_rank"]
        self.heads = heads
        self.nope, self.rope_dims = c["qk_nope_head_dim"], c["qk_rope_head_dim"]
        self.v_dims = c["v_head_dim"]
        self.rope_theta = c["rope_theta"]
        self.scale = (self.nope + self.rope_dims) ** -0.5
        qk_head = self.nope + self.rope_dims

        self.q_lora = c["q_lora_rank"] is not None
        if self.q_lora:
            self.q_a_proj = nn.Linear(hidden, c["q_lora_rank"], bias=False)
            self.q_a_norm = RMSNorm(c["q_lora_rank"], LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(c["q_lora_rank"], heads * qk_head, bias=False)
        else:
            self.q_proj = nn.Linear(hidden, heads * qk_head, bias=False)
        self.kv_proj = nn.Linear(hidden, rank, bias=False)
        self.kv_norm = RMSNorm(rank, LATENT_NORM_EPS)
        self.k_rope_proj = nn.Linear(hidden, heads * self.rope_dims, bias=False)
        self.k_decompress = nn.Linear(rank, heads * qk_head, bias=False)
        self.v_decompress = nn.Linear(rank, heads * self.v_dims, bias=False)
        self.o_proj = nn.Linear(heads * self.v_dims, hidden, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        heads, nope, rope_dims = self.heads, self.nope, self.rope_dims

        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q_nope, q_rope = q.view(batch, tokens, heads, nope + rope_dims).split([nope, rope_dims], dim=-1)

        latent = self.kv_norm(self.kv_proj(x))
        # k_decompress holds a (nope + rope) slot per head; only its first nope rows are used.
        k_nope = self.k_decompress(latent).view(batch, tokens, heads, nope + rope_dims)[..., :nope]
        v = self.v_decompress(latent).view(batch, tokens, heads, self.v_dims)
        k_rope = self.k_rope_proj(x).view(batch, tokens, heads, rope_dims)

        q = torch.cat([q_nope, rope(q_rope, positions, self.rope_theta)], dim=-1)
        k = torch.cat([k_nope, rope(k_rope, positions, self.rope_theta)], dim=-1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, tokens, dims]

        scores = (q @ k.transpose(-1, -2)) * self.scale
        causal = torch.ones(tokens, tokens, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        weights = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        out = (weights @ v).transpose(1, 2).reshape(batch, tokens, heads * self.v_dims)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU with biases: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width)
        self.up_proj = nn.Linear(hidden, width)
        self.down_proj = nn.Linear(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """DeepSeek-V3 routing without groups or correction bias, plus one (wider) shared expert."""

    def __init__(self, c: Mapping[str, Any]):
        super().__init__()
        hidden = c["hidden_size"]
        self.top_k = c["num_experts_per_tok"]
        self.norm_topk_prob = c["norm_topk_prob"]
        self.routed_scaling_factor = c["routed_scaling_factor"]
        self.router = nn.Linear(hidden, c["n_routed_experts"], bias=False)
        experts = range(c["n_routed_experts"])
        self.experts = nn.ModuleList(MLP(hidden, c["moe_intermediate_size"]) for _ in experts)
        self.shared_expert = MLP(hidden, c["shared_intermediate_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        scores = F.linear(flat.float(), self.router.weight.float()).sigmoid()  # routing in float32
        weights, chosen = scores.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights * self.routed_scaling_factor

        routed = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out = expert(flat[token]) * weights[token, slot, None]
                routed.index_add_(0, token, out.to(flat.dtype))
        return (routed + self.shared_expert(flat)).view_as(x)


class Block(nn.Module):
    def __init__(self, c: Mapping[str, Any], moe: bool):
        super().__init__()
        self.ln_1 = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.attn = Attention(c)
        self.ln_2 = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.mlp = MoE(c) if moe else MLP(c["hidden_size"], c["intermediate_size"])

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), positions)
        return x + self.mlp(self.ln_2(x))


class MTPHead(nn.Module):
    """DeepSeek-V3's multi-token prediction module: enorm, hnorm, eh_proj and an MoE block."""

    def __init__(self, c: Mapping[str, Any]):
        super().__init__()
        hidden = c["hidden_size"]
        self.norm_e = RMSNorm(hidden, c["rms_norm_eps"])
        self.norm_h = RMSNorm(hidden, c["rms_norm_eps"])
        self.proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.block = Block(c, moe=True)

    def forward(self, embedded: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor):
        # proj's first `hidden` columns read the embedding, the last ones the hidden state (eh_proj)
        x = self.proj(torch.cat([self.norm_e(embedded), self.norm_h(hidden)], dim=-1))
        return self.block(x, positions)


class ScratchModel(nn.Module):
    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        c = read_config(config)
        self.config = c
        hidden = c["hidden_size"]
        self.wte = nn.Embedding(c["vocab_size"], hidden)
        self.wpe = nn.Embedding(c["max_position_embeddings"], hidden)
        layers = range(c["num_hidden_layers"])
        self.h = nn.ModuleList(Block(c, moe=i >= c["first_k_dense_replace"]) for i in layers)
        self.ln_f = RMSNorm(hidden, c["rms_norm_eps"])
        # Tied: the logits reuse wte and nothing more is stored, as transformers saves tied weights.
        self.lm_head = None
        if not c["tie_word_embeddings"]:
            self.lm_head = nn.Linear(hidden, c["vocab_size"], bias=False)
        self.mtp_heads = nn.ModuleList(MTPHead(c) for _ in range(c["num_nextn_predict_layers"]))

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> ScratchOutput:
        """input_ids [batch, tokens] -> logits [batch, tokens, vocab] (and per-layer hidden states)."""
        tokens = input_ids.shape[-1]
        if tokens > self.wpe.num_embeddings:
            raise RemapError(
                f"{tokens} tokens do not fit the learned positions",
                expected=f"at most max_position_embeddings = {self.wpe.num_embeddings} tokens",
            )
        positions = torch.arange(tokens, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(positions)
        hidden_states = [x]
        for block in self.h:
            x = block(x, positions)
            hidden_states.append(x)
        logits = self.logits(self.ln_f(x))
        return ScratchOutput(logits, tuple(hidden_states) if output_hidden_states else None)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        return F.linear(normed, self.wte.weight if self.lm_head is None else self.lm_head.weight)

    def mtp(self, input_ids: torch.Tensor, final_hidden: torch.Tensor) -> list[torch.Tensor]:
        """Multi-token prediction hidden states, one [batch, tokens - k, hidden] per depth k = 1, 2, ...

        `final_hidden` is the trunk's output after ln_f, which is what DeepSeek-V3 (and
        transformers' MTP drafting) feeds the first module. Depth k combines, at position i, the
        previous depth's hidden state with the token embedding of t_{i+k} (wte only: DeepSeek has
        no learned positions); its output at i serves to predict t_{i+k+1}. The scratch format
        stores no MTP output norm, so this returns hidden states, not logits. Logits never use it.
        """
        hidden = final_hidden
        depths = []
        for k, head in enumerate(self.mtp_heads, start=1):
            tokens = input_ids.shape[-1] - k
            positions = torch.arange(tokens, device=input_ids.device)
            hidden = head(self.wte(input_ids[:, k:]), hidden[:, :tokens], positions)
            depths.append(hidden)
        return depths

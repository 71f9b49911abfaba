"""A reference of the from-scratch PyTorch DeepSeek-V3 (the `scratch` layout), in one readable file.

Written here from the model's documented facts (docs/layouts/scratch.md; provenance in
remap/layouts/scratch.py), not copied from its code: parity runs it as the torch side of a
scratch checkpoint when the user gives no `--torch-model` of their own, and the tests check the
conversions against it. Its `state_dict()` has the upstream names, buffers included.

Forward, for token ids t_0..t_{T-1} (dropout is off: parity runs in eval mode):

    x = wte[t] + wpe[pos]
    for each block:   x = x + attn(ln_1(x));  x = x + moe(ln_2(x))
    logits = ln_f(x) @ wte.T                                   (lm_head is wte)

RMSNorm is w * x / (rms(x) + 1e-6), the eps outside the root. Attention: a q latent with no norm,
per head q = [q_decompress(ql) | rope(q_rope_proj(ql))] and k = [k_decompress(kv_norm(kv_proj x)) |
rope(k_rope_proj x)], v = v_decompress(...), all head_dim = n_embd / n_head content dims used, one
rope key per head, half-split RoPE (dims j and j + r/2 turn together) from the `rope.inv_freq`
buffer, scale 1 / sqrt(head_dim + r), the `causal_mask` buffer, o_proj with a bias. MoE: top-k of
router logits + expert_bias, weights a softmax over the k chosen (biased) logits, plus the
shared expert; every expert linear has a bias. Unlike the upstream `forward(idx)`, which returns the
last position only, this returns the logits of every position.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from remap.layouts.scratch import RMS_NORM_EPS, read_config


class ScratchOutput(NamedTuple):
    logits: torch.Tensor  # [batch, tokens, vocab]
    # The embedding output, then every block's output (before ln_f): num_hidden_layers + 1 tensors.
    hidden_states: tuple[torch.Tensor, ...]


class RMSNorm(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.norm(dim=-1, keepdim=True) * x.shape[-1] ** -0.5
        return self.weight * x / (rms + RMS_NORM_EPS)


class Rope(nn.Module):
    """Half-split rotary embedding; `inv_freq` is a saved buffer, used as loaded."""

    def __init__(self, dims: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dims, 2).float() / dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [batch, heads, tokens, dims]
        angles = torch.outer(torch.arange(x.shape[-2], dtype=self.inv_freq.dtype), self.inv_freq)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _linear(rows: int, cols: int, bias: bool = False) -> nn.Linear:
    return nn.Linear(cols, rows, bias=bias)


class Attention(nn.Module):
    def __init__(self, c: Mapping[str, Any]):
        super().__init__()
        hidden, self.heads, self.head_dim = c["hidden_size"], c["num_attention_heads"], c["head_dim"]
        self.rope_dim, rank, q_rank = c["qk_rope_head_dim"], c["kv_lora_rank"], c["q_lora_rank"]
        self.kv_proj, self.kv_norm = _linear(rank, hidden), RMSNorm(rank)
        self.k_decompress = _linear(self.heads * self.head_dim, rank)
        self.v_decompress = _linear(self.heads * self.head_dim, rank)
        self.q_proj, self.q_decompress = _linear(q_rank, hidden), _linear(self.heads * self.head_dim, q_rank)
        self.k_rope_proj = _linear(self.heads * self.rope_dim, hidden)
        self.q_rope_proj = _linear(self.heads * self.rope_dim, q_rank)
        self.o_proj = _linear(hidden, self.heads * self.head_dim, c["attention_bias"])
        self.rope = Rope(self.rope_dim)
        block = c["max_position_embeddings"]
        self.register_buffer("causal_mask", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def _heads(self, x: torch.Tensor, dims: int) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, dims).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        latent, q_latent = self.kv_norm(self.kv_proj(x)), self.q_proj(x)
        q = torch.cat([self._heads(self.q_decompress(q_latent), self.head_dim),
                       self.rope(self._heads(self.q_rope_proj(q_latent), self.rope_dim))], dim=-1)
        k = torch.cat([self._heads(self.k_decompress(latent), self.head_dim),
                       self.rope(self._heads(self.k_rope_proj(x), self.rope_dim))], dim=-1)
        v = self._heads(self.v_decompress(latent), self.head_dim)
        scores = q @ k.transpose(-2, -1) / (self.head_dim + self.rope_dim) ** 0.5
        scores = scores.masked_fill(self.causal_mask[:, :, :tokens, :tokens] == 0, float("-inf"))
        out = F.softmax(scores, dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, width: int, bias: bool):
        super().__init__()
        self.gate_proj, self.up_proj = _linear(width, hidden, bias), _linear(width, hidden, bias)
        self.down_proj = _linear(hidden, width, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self, c: Mapping[str, Any]):
        super().__init__()
        hidden, experts, bias = c["hidden_size"], c["n_routed_experts"], c["mlp_bias"]
        self.top_k = c["num_experts_per_tok"]
        self.router = _linear(experts, hidden)
        self.experts = nn.ModuleList(SwiGLU(hidden, c["moe_intermediate_size"], bias) for _ in range(experts))
        width = c["shared_intermediate_size"]
        self.shared_expert = SwiGLU(hidden, width, bias) if width is not None else None
        self.register_buffer("expert_bias", torch.zeros(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        top, chosen = torch.topk(self.router(flat) + self.expert_bias, self.top_k, dim=-1)
        weights = F.softmax(top, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if len(rows):
                out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None])
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        return out.view_as(x)


class Block(nn.Module):
    def __init__(self, c: Mapping[str, Any]):
        super().__init__()
        self.ln_1, self.attn = RMSNorm(c["hidden_size"]), Attention(c)
        self.ln_2, self.mlp = RMSNorm(c["hidden_size"]), MoE(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class MTPHead(nn.Module):
    """Held for its weights only: next-token logits never read a multi-token-prediction head."""

    def __init__(self, c: Mapping[str, Any]):
        super().__init__()
        hidden = c["hidden_size"]
        self.combine_proj = _linear(hidden, 2 * hidden, c["mlp_bias"])
        self.norm1, self.norm2 = RMSNorm(hidden), RMSNorm(hidden)
        self.attn, self.mlp = Attention(c), MoE(c)
        self.attn_norm, self.mlp_norm = RMSNorm(hidden), RMSNorm(hidden)


class ScratchModel(nn.Module):
    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        c = self.config = read_config(config)
        self.wte = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.wpe = nn.Embedding(c["max_position_embeddings"], c["hidden_size"])
        self.h = nn.ModuleList(Block(c) for _ in range(c["num_hidden_layers"]))
        self.ln_f = RMSNorm(c["hidden_size"])
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        self.wte.weight = self.lm_head.weight  # tied: saved under both names
        if c["num_nextn_predict_layers"]:
            self.mtp_heads = nn.ModuleList(MTPHead(c) for _ in range(c["num_nextn_predict_layers"]))

    def forward(self, ids: torch.Tensor) -> ScratchOutput:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        hidden = [x]
        for block in self.h:
            x = block(x)
            hidden.append(x)
        return ScratchOutput(self.lm_head(self.ln_f(x)), tuple(hidden))

"""Whether a spec run backwards can run: `remap invert` plans the inverse, from headers alone, on a
tiny checkpoint of the layout it claims to read, and refuses an inverse no such checkpoint fits
(every rule inverts, yet the whole matches nothing: mlx-quantize's inverse filters on the dtype
the forward read, not the one it wrote).

Two samples: a plain checkpoint of that layout (what a user will hand the inverse), and the
forward spec's own output. An inverse that reads only the second (scratch-to-hf's needs config
keys scratch-to-hf records) is named as such; `convert --spec S --inverse` still runs it there.
"""

from __future__ import annotations

from typing import Any, Mapping

from remap import dtypes
from remap.errors import RemapError
from remap.layouts import get_layout
from remap.layouts.base import FLOAT
from remap.ops import TensorType
from remap.planner import build_plan
from remap.report import build_report
from remap.spec.invert import invert_spec
from remap.spec.load import Spec

# The smallest configs the built-in layouts read (DeepSeek-V3's and the scratch model's): 2
# layers, one dense, one MoE, so that every rule kind has a tensor to match.
SAMPLE_CONFIGS: tuple[dict[str, Any], ...] = (
    {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 64,
     "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2, "first_k_dense_replace": 1,
     "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 48, "kv_lora_rank": 32,
     "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 4, "n_shared_experts": 1,
     "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
     "num_nextn_predict_layers": 1, "vocab_size": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
     "tie_word_embeddings": False, "max_position_embeddings": 128,
     "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}},
    {"n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 128, "block_size": 64, "q_lora_rank": 48,
     "kv_lora_rank": 32, "rope_dim": 8, "n_experts": 4, "n_experts_per_token": 2, "expert_intermediate_size": 32,
     "shared_expert_intermediate_size": 48, "use_shared_expert": True, "bias": True, "mtp_num_heads": 1},
)


def sample(layout_name: str, variant: str) -> tuple[dict[str, TensorType], dict[str, Any]] | None:
    """(tensors, raw config) of a tiny `variant` checkpoint of the layout; None where no sample
    config is one it reads."""
    layout = get_layout(layout_name)
    for raw in SAMPLE_CONFIGS:
        try:
            expected = layout.expected(layout.read_config(raw), variant)
        except (RemapError, KeyError, TypeError, ValueError):
            continue
        if expected:
            return {e.name: TensorType(tuple(e.shape), _concrete(e.dtype)) for e in expected.values()}, dict(raw)
    return None


def _concrete(dtype: str) -> str:
    """A layout's dtype as a safetensors header spells it (any float: BF16)."""
    return "BF16" if dtype == FLOAT else dtypes.canonical(dtype)


def why_not(spec: Spec, tensors: Mapping[str, TensorType], raw: Mapping[str, Any], variant: str | None):
    """Why `spec` does not convert these headers (None: its report fits), and the plan when it does."""
    try:
        plan = build_plan(spec, tensors, raw, source_variant=variant)
        problems = build_report(plan).problems
    except RemapError as exc:
        return exc.message, None
    return (problems[0], None) if problems else (None, plan)


def check_inverse(forward: Spec) -> Spec:
    """The inverse of `forward`, refused (RemapError) where no checkpoint of the layout it reads fits
    it. A layout with no sample config is not checked."""
    inverse = invert_spec(forward)
    layout = get_layout(inverse.source_layout)
    reasons = []
    for variant in (inverse.source_variant,) if inverse.source_variant else layout.variants:
        found = sample(layout.name, variant)
        if found is None:
            continue
        why, _ = why_not(inverse, *found, variant)
        if why is None:
            return inverse
        reasons.append(f"on a {layout.name} ({variant}) checkpoint: {why}")
    if not reasons:
        return inverse
    own = _on_own_output(forward, inverse)
    if own is None:
        raise RemapError(f"{inverse.name} reads only what {forward.name} writes, not a plain {layout.name} checkpoint ({reasons[0]})",
                         expected=f"`remap convert --spec {forward.name} --inverse` on {forward.name}'s own output")
    raise RemapError(f"{inverse.name} cannot run: on what {forward.name} writes: {own}; {reasons[0]}",
                     expected=f"a spec whose inverse reads {layout.name} checkpoints")


def _on_own_output(forward: Spec, inverse: Spec) -> str | None:
    """Why the inverse does not fit what `forward` writes from a sample of its own source layout
    (None: it fits)."""
    source = get_layout(forward.source_layout)
    for variant in (forward.source_variant,) if forward.source_variant else source.variants:
        found = sample(source.name, variant)
        if found is None:
            continue
        _, plan = why_not(forward, *found, variant)
        if plan is not None:
            outputs = {o.name: TensorType(tuple(o.shape), o.dtype) for o in plan.outputs}
            return why_not(inverse, outputs, plan.target_config, inverse.source_variant)[0]
    return f"no sample of {source.name} that {forward.name} reads"

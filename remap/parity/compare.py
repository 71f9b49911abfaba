"""Compare two forward passes: metrics, tolerances, checks, and where the first drift starts.

Pure functions on arrays and plans; nothing here loads a model.

Over every position (batch x tokens) of the source's `s` and the target's `t`, both the logits
and each hidden state (the embedding output, then each decoder layer's output) get:
- `max_abs`: max |s - t|, and `max_rel` = max_abs / max |s|: the strict measure, for float32;
- `rms_rel`: ||s - t|| / ||s|| over all positions: the robust one. A tiny rounding can flip a
  near-tied MoE routing choice and move a few positions a lot; that dominates the max but
  only its own share of the RMS;
- `cosine`: the cosine similarity of s and t, averaged over positions.

The logits also get `mean_abs`, `scale` (max |s|), and
- `top1`: the fraction of positions whose argmax agrees;
- `top5`: the mean overlap of the two top-5 sets (1.0: the same five tokens everywhere);
- `kl`: KL(softmax s || softmax t), in nats, averaged over positions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Mapping

import numpy as np

from remap import dtypes
from remap.errors import RemapError
from remap.layouts import get_layout
from remap.names import collapse
from remap.plan import Plan, Step


# -- tolerances -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerances:
    """Limits a passing comparison stays within; None leaves that metric unchecked."""

    max_error: float | None = None  # logits: max_rel
    min_cosine: float | None = None  # logits: cosine
    min_top1: float | None = None
    min_top5: float | None = None
    max_kl: float | None = None
    max_hidden_error: float | None = None  # each hidden state: max_rel
    max_hidden_rms: float | None = None  # each hidden state: rms_rel

    def override(self, values: Mapping[str, float | None]) -> "Tolerances":
        names = {f.name for f in fields(self)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown tolerance {sorted(unknown)[0]!r}; known: {', '.join(sorted(names))}")
        return replace(self, **{k: v for k, v in values.items() if v is not None})


# Measured on the fixtures (docs/parity.md): a correct float32 conversion stays within ~1e-6
# of the scale everywhere; bfloat16 weights within an RMS of ~2e-2 and a KL of ~4e-4; 8-bit
# weights within an RMS of ~8e-2 and a KL of ~4e-3. Each leaves an order of magnitude of
# headroom or more; a broken rule moves an RMS by tens of percent.
PROFILES = {
    "fp32": Tolerances(max_error=1e-4, min_cosine=0.99999, min_top1=0.99, min_top5=0.99, max_kl=1e-6,
                       max_hidden_error=1e-4),
    "bf16": Tolerances(min_cosine=0.999, min_top1=0.9, min_top5=0.9, max_kl=1e-2, max_hidden_rms=0.05),
    "quantized": Tolerances(min_cosine=0.95, min_top1=0.8, min_top5=0.8, max_kl=0.1, max_hidden_rms=0.25),
}


def weight_precision(matrices: Mapping[str, str]) -> str:
    """A checkpoint's weight precision, by its weakest matrix: "quantized" (packed integers), else
    the float dtype of fewest bits ("BF16", "F8_E4M3", ...). `matrices` maps name -> dtype."""
    kinds = set(matrices.values())
    if any(not dtypes.is_float(k) for k in kinds):
        return "quantized"
    return min(sorted(kinds), key=lambda k: dtypes.DTYPES[k].bits, default="F32")


def profile_for(source: str, target: str, compute_dtype: str) -> str:
    """The tolerance profile for weights of precision `source` and `target` (weight_precision)
    computed in `compute_dtype`."""
    if target == "quantized" and source != "quantized":
        return "quantized"
    if compute_dtype != "float32":
        return "bf16"
    # Widening (bf16 -> f32) is exact; any other change of precision rounds the weights.
    return "fp32" if target in (source, "F32") else "bf16"


# -- metrics --------------------------------------------------------------------------------------


def _rows(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).reshape(-1, a.shape[-1])


def _cosine(s: np.ndarray, t: np.ndarray) -> float:
    norms = np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1)
    nonzero = norms > 0
    # where a vector is zero: 1 if both are (the same vector), else 0
    cos = np.where(nonzero, (s * t).sum(-1) / np.where(nonzero, norms, 1.0), (s == t).all(-1))
    return float(cos.mean())


def _relative(error: float, size: float) -> float:
    return error / size if size > 0 else error


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _difference(source: np.ndarray, target: np.ndarray) -> dict:
    s, t = _rows(source), _rows(target)
    diff = np.abs(s - t)
    scale, max_abs = float(np.abs(s).max()), float(diff.max())
    return {"max_abs": max_abs, "mean_abs": float(diff.mean()), "scale": scale, "max_rel": _relative(max_abs, scale),
            "rms_rel": _relative(float(np.linalg.norm(diff)), float(np.linalg.norm(s))), "cosine": _cosine(s, t)}


def logit_metrics(source: np.ndarray, target: np.ndarray) -> dict:
    s, t = _rows(source), _rows(target)
    k = min(5, s.shape[-1])
    top_s, top_t = np.argsort(-s, -1, kind="stable")[:, :k], np.argsort(-t, -1, kind="stable")[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(top_s.tolist(), top_t.tolist())]
    log_s, log_t = _log_softmax(s), _log_softmax(t)
    kl = (np.exp(log_s) * (log_s - log_t)).sum(-1)
    return {**_difference(s, t), "top1": float((top_s[:, 0] == top_t[:, 0]).mean()),
            "top5": float(np.mean(overlap)), "kl": float(max(kl.mean(), 0.0))}


def hidden_metrics(source: np.ndarray, target: np.ndarray) -> dict:
    metrics = _difference(source, target)
    del metrics["mean_abs"], metrics["scale"]
    return metrics


def hidden_names(count: int) -> list[str]:
    """Names of the compared hidden states: the embedding, then each decoder layer."""
    return ["embedding", *(f"layer {i}" for i in range(count - 1))]


# -- checks ---------------------------------------------------------------------------------------


# What each checked metric is called in reports.
LABELS = {"max_rel": "max error", "rms_rel": "relative RMS error", "cosine": "cosine", "top1": "top-1 agreement",
          "top5": "top-5 agreement", "kl": "KL(source || target)"}


@dataclass(frozen=True)
class Check:
    section: str  # "logits", "embedding", "layer 3"
    metric: str  # a key of LABELS
    value: float
    limit: float
    at_most: bool  # True: value <= limit passes; False: value >= limit passes

    @property
    def name(self) -> str:
        return f"{self.section} {LABELS[self.metric]}"

    @property
    def ok(self) -> bool:
        return bool(self.value <= self.limit if self.at_most else self.value >= self.limit)

    def describe(self) -> str:
        return f"{self.name} {self.value:.4g} ({'<=' if self.at_most else '>='} {self.limit:g})"


_LOGIT_CHECKS = (("max_rel", "max_error", True), ("cosine", "min_cosine", False), ("top1", "min_top1", False),
                 ("top5", "min_top5", False), ("kl", "max_kl", True))  # metric, tolerance, at_most
_HIDDEN_CHECKS = (("max_rel", "max_hidden_error", True), ("rms_rel", "max_hidden_rms", True))


def checks(logits: dict, hidden: Mapping[str, dict], tolerances: Tolerances) -> list[Check]:
    """One check per tolerance that is set: the logit metrics, then every hidden state in order."""
    out = []
    for section, metrics, table in (("logits", logits, _LOGIT_CHECKS), *((n, m, _HIDDEN_CHECKS) for n, m in hidden.items())):
        out += [Check(section, metric, metrics[metric], getattr(tolerances, limit), at_most)
                for metric, limit, at_most in table if getattr(tolerances, limit) is not None]
    return out


def first_divergence(results: list[Check], hidden: list[str]) -> str | None:
    """The first hidden state (in forward order) that fails a check; "head" (final norm and
    output projection) when only the logits fail; None when everything passes."""
    failed = {c.section for c in results if not c.ok}
    if not failed:
        return None
    return next((name for name in hidden if name in failed), "head")


# -- from a diverging section back to the spec rules that made it ---------------------------------


def section_prefixes(layout: str, section: str) -> tuple[str, ...]:
    """Tensor-name prefixes of `section` ("embedding", "layer 3", "head") in `layout`."""
    found = get_layout(layout)
    if found.sections is None:
        raise RemapError(f"the {layout} layout does not say where its layers are", expected="a layout with `sections`")
    return found.sections.prefixes(section)


@dataclass(frozen=True)
class RuleRef:
    stage: str  # the spec (stage of a composed spec) the rule belongs to
    rule: str  # "rules[5] kv_b_proj split per head ..."
    where: str  # "mappings/hf-to-mlx.yaml:23"
    tensors: tuple[str, ...]  # what it made (or dropped) in the section, indices collapsed


def rules_behind(plan: Plan, section: str) -> list[RuleRef]:
    """The rules that produced the target tensors of `section`, followed back through every
    earlier stage of a composed plan to the source, plus each stage's drops in that section.
    Source-side stages first."""
    stages = plan.stages
    wanted = [o.name for o in plan.outputs if o.name.startswith(section_prefixes(plan.target_layout, section))]
    refs: list[RuleRef] = []
    for stage in reversed(stages):
        made: dict[str, list[str]] = {}
        steps: dict[int, Step] = {}
        for name in wanted:
            step = stage.producers.get(name)
            if step is not None:
                made.setdefault(step.rule, []).append(name)
                steps[id(step)] = step
        prefixes = section_prefixes(stage.spec.source_layout, section)
        for drop in stage.dropped:
            if drop.name.startswith(prefixes):
                made.setdefault(drop.rule, []).append(drop.name)
        where = {rule.id: stage.spec.where(rule) for rule in stage.spec.rules}
        refs[:0] = [RuleRef(stage.spec.name, rule, where.get(rule, stage.spec.path), tuple(_collapsed(names)))
                    for rule, names in made.items()]
        wanted = list(dict.fromkeys(source for step in steps.values() for source in step.sources))
    return refs


def _collapsed(names: list[str]) -> list[str]:
    return [name for name, _ in collapse(dict.fromkeys(names), lambda n: n)]

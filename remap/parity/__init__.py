"""Forward-pass parity: a checkpoint and its conversion, each run by its own runtime.

    from remap.parity import run_parity
    result = run_parity("path/to/hf", spec="hf-to-mlx")        # converts into a temporary directory
    result = run_parity("path/to/hf", "path/to/mlx")           # or compares a finished conversion
    print(result.ok, result.logits["max_abs"], result.divergence)

Each side runs in the runtime of its layout (runtimes.py: transformers for `hf`, remap's
reference ScratchModel for `scratch`, mlx-lm for `mlx`), both on the same seeded token ids and by
default in float32. compare.py turns the
two forward passes into metrics and checks; when one fails, the first hidden state that drifts
(the embedding, a decoder layer, or the head) names the spec rules that made its tensors, and the
spec's claims are measured on the source bytes to say which of them do not hold.
remap.render.parity prints the result as rich text, JSON (schemas/parity.schema.json), JUnit XML
or Markdown (apart, so that this package imports without rich).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from remap import __version__, api
from remap.conversion import Conversion
from remap.errors import RemapError
from remap.io.textfiles import read_json
from remap.io.checkpoint import Checkpoint
from remap.parity import runtimes
from remap.parity.compare import (PROFILES, Check, RuleRef, Tolerances, checks, first_divergence, hidden_metrics,
                                  hidden_names, logit_metrics, profile_for, rules_behind, weight_precision)
from remap.parity.stream import (Streamed, budget_bytes, default_budget, peak_rss, run_streamed, size_text, streamed_side,
                                 whole_model_bytes)
from remap.plan import Plan
from remap.report import Loss

__all__ = ["ParityResult", "Side", "run_parity", "token_ids"]


@dataclass(frozen=True)
class Side:
    path: str
    layout: str
    variant: str | None
    runtime: str  # what computed it, with its version
    weights: str  # weight precision: "F32", "BF16", "F8_E4M3", ..., or "quantized" (compare.weight_precision)


@dataclass
class ParityResult:
    source: Side
    target: Side
    spec: str | None  # the spec that made the target, when known
    dtype: str  # compute dtype on both sides
    tokens: int
    batch: int
    seed: int
    profile: str  # which default tolerances apply (compare.PROFILES)
    tolerances: Tolerances
    logits: dict  # compare.logit_metrics
    hidden: dict[str, dict]  # "embedding", "layer 0", ...: compare.hidden_metrics
    checks: list[Check]
    divergence: str | None = None  # the first hidden state that fails, or "head"
    rules: list[RuleRef] = field(default_factory=list)  # the rules behind `divergence`
    claims: list[Loss] = field(default_factory=list)  # on failure: the spec's claims that break, or lose by design
    # on failure: of those, the ones whose rules made the first diverging section: where the drift starts
    starts_in: list[Loss] = field(default_factory=list)
    # on failure of a conversion that loses nothing (every step moves bytes, every claim holds on the
    # source): the drift is the two runtimes' own computation, not the spec's doing
    runtimes_disagree: bool = False
    # layer-streamed runs (parity/stream.py): what was streamed, and what its source-fed half found
    streamed: Streamed | None = None
    peak_rss: int = 0  # the process's resident-memory high-water mark at the end, in bytes
    seconds: float = 0.0
    remap_version: str = __version__

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["checks"] = [{**asdict(c), "ok": c.ok} for c in self.checks]
        return {**data, "ok": self.ok}


def token_ids(vocab_size: int, tokens: int, batch: int, seed: int) -> np.ndarray:
    """The [batch, tokens] ids both sides run on: uniform over the vocabulary, seeded."""
    if tokens < 1 or batch < 1:
        raise RemapError(f"{batch} x {tokens} tokens", expected="--tokens and --batch of at least 1")
    return np.random.default_rng(seed).integers(0, vocab_size, size=(batch, tokens), dtype=np.int64)


def run_parity(
    src: str | Path,
    dst: str | Path | None = None,
    *,
    spec: str | Path | None = None,
    inverse: bool = False,
    variant: str | None = None,
    params: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    torch_model: str | Path | None = None,
    revision: str | None = None,
    quantize: int | str | None = None,
    group_size: int = 64,
    allow_pickle: bool = False,
    tokens: int = 32,
    batch: int = 2,
    seed: int = 0,
    dtype: str = "float32",
    tolerances: Mapping[str, float | None] | None = None,
    stream: bool = False,
    memory_budget: int | str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> ParityResult:
    """Run SRC and its conversion on the same tokens and compare them.

    With `dst`, compare against that finished conversion (`spec`, or else the spec its
    remap-manifest.json names, only names the rules behind a divergence). Without, convert SRC
    with `spec` into a temporary directory first (`quantize` bits and `group_size` append the
    mlx-quantize stage, as for `remap convert`). `tolerances` overrides fields of the default
    profile (compare.Tolerances). `torch_model` runs SRC with the user's own model code
    (runtimes.user_torch_runtime) instead of its layout's runtime; `settings` override keys of
    SRC's config (or of the one read off its shapes). `stream` runs both sides one decoder layer
    at a time (parity/stream.py); without it they stream when loading both whole would take more
    than `memory_budget` (bytes, or a size like "8GB"; default: stream.default_budget()).
    `progress(what runs now, steps done, steps in all)` is told each step as it starts.
    """
    start = time.perf_counter()
    if memory_budget is not None:
        budget_bytes(memory_budget)  # a bad size is refused before any work
    if stream and torch_model:
        raise RemapError("--torch-model runs your model whole", expected="no --stream with --torch-model")
    source = api.open_source(src, revision=revision, allow_pickle=allow_pickle)
    if spec is None and dst is None:
        raise RemapError("nothing to compare the source with", expected="a converted DST, or --spec to convert SRC")
    plan = None
    if spec is not None:
        plan, source = api.plan(source, spec, inverse=inverse, params=params, settings=settings, variant=variant,
                                quantize=quantize, group_size=group_size)
    elif (recipe := _recorded_recipe(Path(dst), str(src))) is not None:
        plan, source = api.plan_recipe(recipe, source)  # the conversion that made DST, replayed on SRC
    step = Steps(progress, 0 if dst is not None else 1)
    options = dict(tokens=tokens, batch=batch, seed=seed, dtype=dtype, tolerances=tolerances or {},
                   torch_model=torch_model, stream=stream, memory_budget=memory_budget, step=step)
    result = _compare(source, api.open_source(dst), plan, **options) if dst is not None else _converted(source, plan, options)
    step.finish()
    result.seconds = time.perf_counter() - start
    result.peak_rss = peak_rss()
    return result


def _converted(source: Checkpoint, plan: Plan, options: dict) -> ParityResult:
    """Parity against `plan` carried out on `source` into a temporary directory."""
    report = api.report(plan, source)
    if not report.ok:
        raise RemapError(f"the conversion would not be valid: {report.problems[0]}",
                         expected="a spec whose `remap report` is OK")
    with tempfile.TemporaryDirectory(prefix="remap-parity-") as tmp:
        converted = Path(tmp) / "target"
        options["step"](f"converting {source.source} by {plan.name}")
        api.convert(plan, source, converted, report=report.to_dict(), checksums=False)
        result = _compare(source, api.open_source(converted), plan, **options)
    result.target = replace(result.target, path=f"{plan.name} of {source.source} (temporary)")
    return result


class Steps:
    """Tells `progress` each step as it starts, with how many are done of how many in all (a
    total that grows as the run learns what it has to do)."""

    def __init__(self, progress: Callable[[str, int, int], None] | None, total: int):
        self.progress, self.done, self.total = progress, 0, total

    def expect(self, steps: int) -> None:
        self.total += steps

    def __call__(self, what: str) -> None:
        if self.progress:
            self.progress(what, self.done, self.total)
        self.done += 1

    def finish(self) -> None:
        if self.progress:
            self.progress("done", self.total, self.total)


def _compare(source: Checkpoint, target: Checkpoint, plan: Plan | None, *, tokens: int, batch: int, seed: int,
             dtype: str, tolerances: Mapping[str, float | None], torch_model: str | Path | None, stream: bool,
             memory_budget: int | str | None, step: Steps) -> ParityResult:
    checkpoints = (source, target)
    found = [_layout(source, plan and plan.source_layout), _layout(target, plan and plan.target_layout)]
    reason = _stream_reason(checkpoints, [layout for layout, _ in found], dtype, stream, memory_budget, torch_model)
    step.expect(2 if reason else 4)  # a streamed run learns its layers once both sides are open
    models = []
    for (layout, _), checkpoint, which in zip(found, checkpoints, ("source", "target")):
        step(f"loading the {which}")
        if reason:
            models.append(streamed_side(layout, checkpoint, dtype))
        elif torch_model and which == "source":
            models.append(runtimes.user_torch_runtime(Path(torch_model), source, dtype))
        else:
            models.append(runtimes.load(layout, checkpoint, dtype))
    sides = [Side(checkpoint.source, layout, variant, model.name, _weights(checkpoint))
             for checkpoint, (layout, variant), model in zip(checkpoints, found, models)]
    if models[0].vocab_size != models[1].vocab_size:
        raise RemapError(f"vocabularies differ: {models[0].vocab_size} (source) and {models[1].vocab_size} (target)",
                         expected="the same vocab_size on both sides")
    ids = token_ids(models[0].vocab_size, tokens, batch, seed)
    streamed = None
    if reason:
        step.expect(models[0].layers + 2)
        ours, theirs, streamed = run_streamed(*models, ids, reason, step)
    else:
        step("running the source")
        ours = models[0].forward(ids)
        step("running the target")
        theirs = models[1].forward(ids)
    if not (ours.hidden and theirs.hidden):  # a user model without layers(): the logits alone
        ours, theirs = (replace(side, hidden=[]) for side in (ours, theirs))
    elif len(ours.hidden) != len(theirs.hidden):
        raise RemapError(f"{len(ours.hidden) - 1} decoder layers (source) and {len(theirs.hidden) - 1} (target)",
                         expected="the same num_hidden_layers on both sides")
    result = _judge(sides, plan, ours, theirs, dtype=dtype, tokens=tokens, batch=batch, seed=seed,
                    tolerances=tolerances)
    result.streamed = streamed
    if not result.ok and plan is not None:
        step.expect(1)
        step("measuring the spec's claims on the source")
        _explain(result, plan, source, measure_all=not reason)
    return result


def _stream_reason(checkpoints: tuple[Checkpoint, Checkpoint], layouts: list[str], dtype: str, stream: bool,
                   memory_budget: int | str | None, torch_model: str | Path | None) -> str | None:
    """Why this run streams (None: it loads both models whole)."""
    if stream:
        return "--stream"
    budget = default_budget() if memory_budget is None else budget_bytes(memory_budget)
    need = whole_model_bytes(checkpoints, dtype)
    if need <= budget or torch_model or not all(layout in ("hf", "mlx") for layout in layouts):
        return None
    return f"both models whole need ~{size_text(need)} in {dtype}, over the memory budget of {size_text(budget)}"


def _judge(sides: list[Side], plan: Plan | None, ours, theirs, *, dtype: str, tokens: int, batch: int, seed: int,
           tolerances: Mapping[str, float | None]) -> ParityResult:
    """Metrics, checks and the first divergence of two forward passes."""
    profile = profile_for(sides[0].weights, sides[1].weights, dtype)
    try:
        limits = PROFILES[profile].override(tolerances)
    except ValueError as exc:
        raise RemapError(str(exc)) from None
    logits = logit_metrics(ours.logits, theirs.logits)
    names = hidden_names(len(ours.hidden)) if ours.hidden else []
    hidden = {name: hidden_metrics(s, t) for name, s, t in zip(names, ours.hidden, theirs.hidden)}
    results = checks(logits, hidden, limits)
    result = ParityResult(sides[0], sides[1], plan.name if plan else None, dtype, tokens, batch, seed, profile, limits,
                          logits, hidden, results, divergence=first_divergence(results, names) if names else None)
    if result.divergence is not None and plan is not None:
        result.rules = rules_behind(plan, result.divergence)
    return result


def _explain(result: ParityResult, plan: Plan, source: Checkpoint, measure_all: bool = True) -> None:
    """On failure: the spec's claims measured on the source, and whether the runtimes are to blame.
    Streamed (not `measure_all`), only the claims the bytes can break (zero, redundant) are:
    measuring the others reads and rebuilds every tensor of the model, whole stacks of experts
    included, which a streamed run is there to avoid; those steps are still listed."""
    measured = api.report(plan, source, check=True if measure_all else None).losses
    result.claims = [loss for loss in measured if loss.holds is False or loss.claim in ("lossy", "rounding")]
    behind = {(ref.stage, ref.rule) for ref in result.rules}
    result.starts_in = [loss for loss in result.claims if (loss.stage, loss.rule) in behind]
    lossless = all(loss.claim in ("zero", "redundant", "unused") and loss.holds is not False for loss in measured)
    result.runtimes_disagree = lossless and result.source.weights == result.target.weights


def _layout(checkpoint: Checkpoint, planned: str | None) -> tuple[str, str | None]:
    """(layout, variant) of a checkpoint: as detected, else the layout the plan says it has."""
    detected = api.identify(checkpoint)
    if detected.layout is None and planned is None:
        raise RemapError(f"not a layout remap knows: {detected.describe()}", file=checkpoint.source)
    return detected.layout or planned, detected.variant


def _weights(checkpoint: Checkpoint) -> str:
    return weight_precision({name: t.dtype for name, t in checkpoint.tensors.items() if len(t.shape) >= 2})


def _recorded_recipe(dst: Path, src: str) -> Conversion | None:
    """The recipe `remap convert` recorded in DST's manifest, when DST was converted from SRC."""
    from remap.destination import MANIFEST

    if not (dst / MANIFEST).is_file():
        return None
    manifest = read_json(dst / MANIFEST, "manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("recipe"), dict):
        return None  # written before manifests held the recipe: compared, with no rules to name
    recipe = Conversion.from_dict(manifest["recipe"], str(dst / MANIFEST))
    return recipe if _same_source(recipe.source, src) else None


def _same_source(recorded: str, src: str) -> bool:
    """The same hub id, or paths to the same place (a relative one read from here)."""
    if recorded == src:
        return True
    a, b = Path(recorded).expanduser(), Path(src).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()

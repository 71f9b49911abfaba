"""Which bundled spec converts a source: `--to LAYOUT` picks it, and a `--spec` that does not fit
the source is refused with the one(s) that do.

A route is a bundled spec, run forwards or (`--inverse`) backwards. It fits a source when the
source is the layout it reads and its plan, from headers alone, meets the target layout with
every source tensor accounted for (the report's structural checks: what `remap report` would
print as tensors that fit no rule). That is what tells an FP8 checkpoint (its weight_scale_inv
match no rule of hf-to-mlx) from a bf16 one, with no list of variants kept here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

from remap import api
from remap.errors import RemapError
from remap.io.checkpoint import Checkpoint
from remap.spec.load import bundled_specs, load_spec


@dataclass(frozen=True)
class Route:
    spec: str  # a bundled spec's name
    inverse: bool
    source_layout: str
    target_layout: str
    stages: int  # fewer is simpler: hf-to-mlx before hf-fp8-to-mlx where both fit

    def __str__(self) -> str:
        return f"{self.spec} --inverse" if self.inverse else self.spec


@lru_cache(maxsize=1)
def routes() -> tuple[Route, ...]:
    """Every bundled spec forwards, and backwards where it inverts."""
    found = []
    for path in bundled_specs():
        spec = load_spec(path)
        stages = len(spec.parts) or 1
        found.append(Route(spec.name, False, spec.source_layout, spec.target_layout, stages))
        try:
            api.load(spec, inverse=True)
        except RemapError:
            continue  # a lossy drop or a quantizer: no way back
        found.append(Route(spec.name, True, spec.target_layout, spec.source_layout, stages))
    return tuple(found)


def source_layout(checkpoint: Checkpoint, settings: Mapping[str, Any] | None = None) -> tuple[str | None, str]:
    """(layout, 'SRC is hf (fp8-mtp)'): what the source is, as every message here names it."""
    detection = api.identify(checkpoint, settings)
    if detection.layout is None:
        return None, f"{checkpoint.source} matches no layout"
    return detection.layout, f"{checkpoint.source} is {detection.layout} ({detection.variant})"


def misfit(route: Route, checkpoint: Checkpoint, **options: Any) -> str | None:
    """Why `route` does not convert `checkpoint` (None: it does), from headers alone."""
    try:
        plan, _ = api.plan(checkpoint, route.spec, inverse=route.inverse, **options)
        problems = [p for p in api.report(plan).problems]
    except RemapError as exc:
        return exc.message
    return problems[0] if problems else None


def fitting(checkpoint: Checkpoint, layout: str, target: str | None, **options: Any) -> list[Route]:
    """The routes from `layout` (to `target`, or anywhere) that convert `checkpoint`, simplest first."""
    candidates = [r for r in routes() if r.source_layout == layout and target in (None, r.target_layout)]
    return sorted((r for r in candidates if misfit(r, checkpoint, **options) is None), key=lambda r: r.stages)


def pick(checkpoint: Checkpoint, target: str, **options: Any) -> Route:
    """The route `--to target` takes: the simplest that fits; two equally simple are a choice for
    the user (scratch -> hf: seed 003's target or the exact Mistral4 one), named, not made here.
    One spec fitting both ways is no choice: forwards, then."""
    layout, what = source_layout(checkpoint, options.get("settings"))
    if layout is None:
        raise RemapError(f"--to {target}: {what}", expected="a checkpoint `remap inspect` recognises, or --spec")
    found = fitting(checkpoint, layout, target, **options)
    if not found:
        raise RemapError(f"--to {target}: {what}, and no bundled spec converts it to {target}",
                         expected=f"--spec with a spec of your own ({_listing(fitting(checkpoint, layout, None, **options), 'bundled specs that read it: ')})")
    simplest = [r for r in found if r.stages == found[0].stages]
    if len({r.spec for r in simplest}) == 1:  # one spec both ways: both leave this source as it is
        simplest = [r for r in simplest if not r.inverse]
    if len(simplest) > 1:
        raise RemapError(f"--to {target}: {what}, and {len(simplest)} bundled specs convert it to {target}",
                         expected="--spec " + " or --spec ".join(str(r) for r in simplest))
    return found[0]


def check_layout(checkpoint: Checkpoint, spec: Any, inverse: bool, **options: Any) -> None:
    """Refuse, before planning, a spec that reads another layout than the source is."""
    loaded = api.load(spec, inverse=inverse)
    layout, what = source_layout(checkpoint, options.get("settings"))
    if layout is None or layout == loaded.source_layout:
        return
    found = fitting(checkpoint, layout, loaded.target_layout, **options)
    if layout == loaded.target_layout or not found:  # already what the spec writes: any spec from here
        found = fitting(checkpoint, layout, None, **options)
        already = f" already, what {loaded.name} writes," if layout == loaded.target_layout else ","
        raise RemapError(f"{what}{already} not {loaded.source_layout} as {loaded.name} reads",
                         expected=_listing(found, f"a spec that reads {layout}: ") or f"a spec that reads {layout}")
    raise RemapError(f"{what}, not {loaded.source_layout} as {loaded.name} reads", expected=_instead(found, loaded.target_layout))


def check_fit(checkpoint: Checkpoint, spec: Any, inverse: bool, problems: list[str], **options: Any) -> None:
    """A spec of the source's layout whose plan still does not fit it (an FP8 source and a spec for
    bf16) is refused when a bundled spec does fit: the user picked the wrong one, and the fit one
    is all they need to know. With no better spec, or with a spec file of the user's own (one being
    written), the full report shows what is wrong."""
    if not problems or str(spec) not in {r.spec for r in routes()}:
        return
    loaded = api.load(spec, inverse=inverse)
    layout, what = source_layout(checkpoint, options.get("settings"))
    if layout is None:
        return
    found = [r for r in fitting(checkpoint, layout, loaded.target_layout, **options)
             if (r.spec, r.inverse) != (loaded.name, False) and r.spec != loaded.name.removesuffix(".inverse")]
    if found:
        raise RemapError(f"{what}: {loaded.name} does not fit it ({problems[0]})",
                         expected=_instead(found, loaded.target_layout))


def _instead(found: list[Route], target: str) -> str:
    """--spec of each fit, and --to where it would pick one of them alone."""
    alone = len([r for r in found if r.stages == found[0].stages]) == 1
    return _listing(found, "--spec ") + (f", or --to {target}" if alone else "")


def _listing(found: list[Route], prefix: str) -> str:
    return prefix + " or ".join(str(r) for r in found) if found else ""


def check_spec(checkpoint: Checkpoint, spec: Any, inverse: bool, **options: Any) -> None:
    """check_layout, then check_fit on the spec's own header-only plan (for a command that plans
    it later, as parity does)."""
    check_layout(checkpoint, spec, inverse, **options)
    loaded = api.load(spec, inverse=inverse)
    why = misfit(Route(str(spec), inverse, loaded.source_layout, loaded.target_layout, 1), checkpoint, **options)
    check_fit(checkpoint, spec, inverse, [why] if why else [], **options)


def resolve(checkpoint: Checkpoint, spec: Any, to: str | None, inverse: bool, quantize: int | str | None = None,
            **options: Any) -> tuple[Any, bool]:
    """(spec, inverse) to run: --spec when given (refused when it reads another layout than the
    source is, or writes another than --to), else the route --to picks for what the source is.
    Quantizing with neither names mlx, as `mlx_lm.convert -q` does: only mlx holds quantized weights.
    A route picked for quantizing must fit with the quantization appended: from mlx that leaves
    mlx-dequantize (nothing to do on float weights), not mlx-quantize, which would quantize twice."""
    if spec is None and to is None and quantize is not None:
        to = "mlx"
    if spec is None:
        if to is None:
            raise RemapError("no spec to convert with", expected="--spec SPEC, or --to LAYOUT to let remap pick it")
        if quantize is not None and "quantization" in (checkpoint.config or {}):  # as mlx_lm.convert refuses it
            raise RemapError(f"{checkpoint.source} is quantized already (its config.json has `quantization`)",
                             expected="its float model, or --spec mlx-dequantize to quantize its dequantized weights again")
        picked = pick(checkpoint, to, **options, **({"quantize": quantize} if quantize is not None else {}))
        return picked.spec, picked.inverse
    loaded = api.load(spec, inverse=inverse)
    if to is not None and loaded.target_layout != to:
        raise RemapError(f"--spec {spec} writes {loaded.target_layout}, not --to {to}", expected="one of them, or both agreeing")
    check_layout(checkpoint, spec, inverse, **options)
    return spec, inverse


def check_report(checkpoint: Checkpoint, spec: Any, inverse: bool, report: Any, **options: Any) -> None:
    """check_fit on a report already built: its structural problems, not claims the data breaks."""
    check_fit(checkpoint, spec, inverse, [] if report.only_claims_broken else report.problems[:1], **options)

"""The Python API: what every CLI command calls, usable without the CLI.

    from remap import api
    plan, ckpt = api.plan("path/to/hf", "hf-to-mlx")
    print(api.report(plan).ok)
    api.convert(plan, ckpt, "out/mlx")
"""

from __future__ import annotations

import dataclasses
from importlib import import_module
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from remap.conversion import Conversion
from remap.errors import RemapError
from remap.heap import paused_gc
from remap.io.checkpoint import Checkpoint, open_checkpoint
from remap.layouts import Detection, assembly, detect, get_layout

# The planner, the spec loader (jsonschema, yaml), numpy and the executor are imported by the
# functions that use them: `remap inspect` opens and identifies a checkpoint without them.
if TYPE_CHECKING:
    from remap import execute
    from remap.check import Progress
    from remap.plan import Plan
    from remap.report import Report
    from remap.spec.load import Spec
    from remap.verify import Verification

# What this module imported at the top before, still its attributes (api.check_data, ...), each
# imported on first access (PEP 562); report() measures through api.check_data, so that replacing
# it (a test's spy) still takes effect.
_LAZY = {"execute": "remap.execute", "BREAKABLE": "remap.check", "Progress": "remap.check", "check_data": "remap.check",
         "assembled": "remap.io.assembled", "TensorType": "remap.ops", "Plan": "remap.plan",
         "build_plan": "remap.planner", "Report": "remap.report", "build_report": "remap.report",
         "invert_spec": "remap.spec.invert", "Spec": "remap.spec.load", "load_spec": "remap.spec.load",
         "Verification": "remap.verify"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = import_module(_LAZY[name])
    value = module if name == "execute" else getattr(module, name)  # (execute: a module itself)
    globals()[name] = value
    return value


def _attribute(name: str) -> Any:
    """This module's `name`, as api.<name> finds it (imported on first use, or as set since)."""
    return globals()[name] if name in globals() else __getattr__(name)


@paused_gc
def open_source(src: str | Path, *, revision: str | None = None, allow_pickle: bool = False) -> Checkpoint:
    """The checkpoint at `src` as whole tensors: model-parallel files (a name in several files)
    are put together as the layout that cut them says."""
    checkpoint = open_checkpoint(str(src), revision=revision, allow_pickle=allow_pickle)
    if checkpoint.ranks == 1:
        return checkpoint
    from remap.io.assembled import assembled  # numpy: only model-parallel files are put together
    headers = {file: {n: (t.shape, t.dtype) for n, t in tensors.items()} for file, tensors in checkpoint.files.items()}
    try:
        found = assembly(headers)
    except RemapError as exc:
        raise exc.within(file=str(checkpoint.root)) from None
    return checkpoint if found is None else assembled(checkpoint, found[1])


@paused_gc
def identify(checkpoint: Checkpoint, settings: Mapping[str, Any] | None = None) -> Detection:
    """Which layout the checkpoint is; `settings` (--set) override keys of its config."""
    return _detected(checkpoint, checkpoint.config, settings)


# The latest detection, (tensors, config as detect reads it, Detection): `report` and `convert`
# detect once to check the route and again to plan, on the same tensors, ~1.5 s on DeepSeek-V3.
_last_detection: list[tuple[Any, Any, Detection]] = []


def _detected(checkpoint: Checkpoint, raw: Mapping[str, Any] | None,
              settings: Mapping[str, Any] | None = None) -> Detection:
    """detect() on the checkpoint's tensors, reused while tensors and effective config are the same
    (a config with --set applied detects as the merged config does)."""
    key = (None, dict(settings or {})) if raw is None else ({**raw, **(settings or {})}, None)
    for tensors, seen, detection in _last_detection:
        if tensors is checkpoint.tensors and seen == key:
            return detection
    detection = detect(checkpoint.tensors, raw, settings)  # TensorInfos as they are: no 92k pairs to make
    _last_detection[:] = [(checkpoint.tensors, key, detection)]
    return detection


def load(spec: str | Path | Spec, *, inverse: bool = False) -> Spec:
    from remap.spec.invert import invert_spec
    from remap.spec.load import Spec, load_spec

    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    return invert_spec(spec) if inverse else spec


def quantized(spec: Spec, quantize: int | str, group_size: int = 64) -> tuple[Spec, dict[str, int]]:
    """`spec` followed by the quantizing stage its target layout declares, and that stage's
    params. `quantize` is the bits, or a recipe the layout names (mlx: "mixed_4_6", ...)."""
    from remap.spec.load import load_spec

    stage_spec, params, label = get_layout(spec.target_layout).quantization(quantize, group_size)
    stage = load_spec(stage_spec)
    composed = dataclasses.replace(spec, name=f"{spec.name}+{label}", rules=(), parts=(*(spec.parts or (spec,)), stage))
    return composed, params


@paused_gc
def plan(
    src: str | Path | Checkpoint,
    spec: str | Path | Spec,
    *,
    inverse: bool = False,
    params: Mapping[str, Any] | None = None,
    dtype: str | None = None,
    variant: str | None = None,
    revision: str | None = None,
    quantize: int | str | None = None,
    group_size: int = 64,
    max_shard_size: int | str = "5GB",
    settings: Mapping[str, Any] | None = None,
    allow_nonfinite: bool = False,
    allow_pickle: bool = False,
) -> tuple[Plan, Checkpoint]:
    """Plan a conversion from the source's headers and config.json alone (no tensor bytes).
    `quantize` (bits, or a recipe such as "mixed_4_6") appends the target layout's quantizing
    stage. The plan carries its recipe (`plan.recipe`, a Conversion) for the manifest."""
    checkpoint = src if isinstance(src, Checkpoint) else open_source(src, revision=revision, allow_pickle=allow_pickle)
    recipe = Conversion.of(checkpoint.source if isinstance(src, Checkpoint) else src, spec, inverse=inverse,
                           params=params, dtype=dtype, variant=variant, revision=revision, quantize=quantize,
                           group_size=group_size, max_shard_size=max_shard_size, settings=settings,
                           allow_nonfinite=allow_nonfinite)
    return plan_recipe(recipe, checkpoint, spec)


@paused_gc
def replay(recipe: Conversion, source: str | Path | Checkpoint | None = None) -> tuple[Plan, Checkpoint]:
    """Plan a recorded conversion again (from a manifest's recipe), on `source` or its own."""
    checkpoint = source if isinstance(source, Checkpoint) else open_source(source or recipe.source,
                                                                          revision=recipe.revision)
    return plan_recipe(recipe, checkpoint)


def plan_recipe(recipe: Conversion, checkpoint: Checkpoint,
                spec: str | Path | Spec | None = None) -> tuple[Plan, Checkpoint]:
    """The plan of `recipe` on `checkpoint` (`spec`: the Spec object the recipe names, if held),
    and the checkpoint under the config the plan read (inferred from shapes, or --set)."""
    from remap.ops import tensor_types
    from remap.planner import build_plan

    raw = source_config(checkpoint, dict(recipe.settings))
    if raw != checkpoint.config:
        checkpoint = checkpoint.with_config(raw)
    loaded = load(spec if spec is not None else recipe.spec, inverse=recipe.inverse)
    params = recipe.param_map
    if recipe.quantize is not None:
        loaded, quant_params = quantized(loaded, recipe.quantize, recipe.group_size)
        params = {**quant_params, **params}
    detected = _detected(checkpoint, raw)
    source_variant = detected.variant if detected.layout == loaded.source_layout else None
    infos = checkpoint.tensors.values()
    tensors = tensor_types(checkpoint.tensors, map(attrgetter("shape"), infos), map(attrgetter("dtype"), infos))
    built = build_plan(loaded, tensors, raw, params=params, dtype=recipe.dtype, variant=recipe.variant,
                       source_variant=source_variant, allow_nonfinite=recipe.allow_nonfinite)
    return dataclasses.replace(built, recipe=recipe), checkpoint


def source_config(checkpoint: Checkpoint, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The source's config.json, or, where it has none, the one its layout reads off the tensors'
    shapes; `settings` (--set KEY=VALUE) override keys of either."""
    raw = checkpoint.config
    if raw is None:
        detected = identify(checkpoint, settings)
        if not detected.inferred:
            raise RemapError("no config.json beside the weights, and no layout reads the model's sizes off its tensors",
                             file=str(checkpoint.root / "config.json"), expected="the model's config.json")
        raw = detected.raw_config
    return {**raw, **(settings or {})}


@paused_gc
def report(plan: Plan, checkpoint: Checkpoint | None = None, *, check: bool | None = False,
           progress: Progress | None = None) -> Report:
    """The shape-verification report. `check`: True measures every claim on the bytes; None the
    claims the bytes can break (zero, redundant: what the CLI does by default); False none.
    `progress(tensor, done, total)` is told each tensor measured."""
    from remap.report import build_report

    if checkpoint is None or check is False:
        return build_report(plan, None)
    claims = None if check else _attribute("BREAKABLE")
    return build_report(plan, _attribute("check_data")(plan, checkpoint.read, claims, progress), measured=claims)


def convert(plan: Plan, checkpoint: Checkpoint, dst: str | Path, **options: Any) -> execute.Result:
    from remap import execute

    return execute.convert(plan, checkpoint, dst, **options)


def verify(dst: str | Path) -> Verification:
    """Re-hash a converted checkpoint's files and re-read its headers against its manifest and report."""
    from remap.verify import verify as _verify

    return _verify(dst)

"""A conversion, whole: the one recipe the CLI, the Python API and parity build the same way.

Everything that decides a conversion's output is here (source, spec, options), so that a
manifest can record it verbatim and `remap parity SRC DST` / `remap verify DST` can replay it:
plan the same conversion again from the source's headers and compare.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from remap.errors import RemapError


@dataclass(frozen=True)
class Conversion:
    source: str  # a path or a hub repo id
    spec: str  # a bundled spec's name, or a spec file's absolute path
    inverse: bool = False
    variant: str | None = None
    params: tuple[tuple[str, Any], ...] = ()  # --param KEY=VALUE, sorted by key
    settings: tuple[tuple[str, Any], ...] = ()  # --set KEY=VALUE: the source's config.json, overridden
    quantize: int | str | None = None  # bits, or a recipe the target layout names
    group_size: int = 64
    dtype: str | None = None  # --dtype: a final cast of floating outputs
    max_shard_size: int | str = "5GB"
    revision: str | None = None  # of a hub repo id
    allow_nonfinite: bool = False  # quantizing ops take NaN and Inf instead of refusing them

    @classmethod
    def of(cls, source: Any, spec: Any, *, params: Mapping[str, Any] | None = None,
           settings: Mapping[str, Any] | None = None, **options: Any) -> "Conversion":
        """From what a caller holds: paths, a Spec, a params mapping."""
        local = Path(str(source)).expanduser()
        source = str(local.resolve()) if local.exists() else str(source)  # replayable from any directory
        return cls(source, spec_reference(spec), params=tuple(sorted((params or {}).items())),
                   settings=tuple(sorted((settings or {}).items())), **options)

    @property
    def param_map(self) -> dict[str, Any]:
        return dict(self.params)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["params"], data["settings"] = self.param_map, dict(self.settings)
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Conversion":
        """A recorded recipe (a manifest's `recipe`), checked."""
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or not {"source", "spec"} <= set(data) or set(data) - fields:
            raise RemapError("the recorded recipe is not one remap wrote", file=where,
                             expected=f"an object with {', '.join(sorted(fields))}")
        if not isinstance(data.get("params", {}), dict) or not isinstance(data.get("settings", {}), dict):
            raise RemapError("the recorded recipe's params or settings are not an object", file=where)
        return cls.of(**data)


def spec_reference(spec: Any) -> str:
    """A bundled spec by name; a spec file by absolute path (replayable from anywhere); a Spec
    object by the file it was loaded from, else its name."""
    from remap.spec.load import Spec

    if isinstance(spec, Spec):
        spec = spec.path if spec.path and Path(spec.path).is_file() else spec.name
    text = str(spec)
    if text.endswith((".yaml", ".yml")) and Path(text).is_file():
        return str(Path(text).resolve())
    return text

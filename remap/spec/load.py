"""Load a mapping spec: YAML (safe, with line numbers) -> JSON Schema check -> Spec (plain data).

The schema check (remap/spec/schema_check.py) imports jsonschema only for a document not known to
pass it: the bundled specs and their inverses are known."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import yaml

from remap.errors import RemapError, flattened
from remap.io.textfiles import read_bounded
from remap.ops import op_class
from remap.spec import yaml_lines
from remap.spec.pattern import Pattern
from remap.spec.schema_check import check_document, spec_schema  # noqa: F401  (callers import spec_schema here)

# The repository's top-level mappings/ and schemas/, reached through symlinks inside the package
# so that a wheel (which copies what they point to) carries them too.
PACKAGE = Path(__file__).resolve().parents[1]
MAPPINGS = PACKAGE / "mappings"
SCHEMAS = PACKAGE / "schemas"


@dataclass(frozen=True)
class Rule:
    index: int
    line: int
    raw: dict
    kind: str  # "map" | "drop" | "fill"
    to: tuple[Pattern, ...] = ()
    sources: tuple[Pattern, ...] = ()
    ops: tuple[dict, ...] = ()
    stack: str | None = None
    unstack: str | None = None
    reuse: bool = False
    when: str | int | None = None
    claim: str | None = None
    reason: str = ""
    same_as: Pattern | None = None
    equals: str | None = None  # a drop: what the tensor holds by construction (remap.fills.EQUALS)
    fill: str | None = None
    shape: tuple = ()
    dtype: str | None = None
    like: Pattern | None = None

    @cached_property  # asked for at every step the rule makes (47k for DeepSeek-V3)
    def id(self) -> str:
        label = self.raw.get("name") or " ".join(p.text for p in (self.to or self.sources))
        return f"rules[{self.index}] {label}"


@dataclass(frozen=True)
class Spec:
    name: str
    source_layout: str
    target_layout: str
    rules: tuple[Rule, ...]
    raw: dict
    path: str = "<memory>"
    description: str = ""
    source_variant: str | None = None
    variant: str | None = None
    scope: str = "source"
    params: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    inverse_config: dict | None = None
    parts: tuple["Spec", ...] = ()  # a composed spec: stages run in order (then `rules` is empty)

    def where(self, rule: Rule) -> str:
        return f"{self.path}:{rule.line}" if rule.line else self.path


def bundled_specs() -> list[Path]:
    return sorted(MAPPINGS.glob("*.yaml"))


def resolve(name_or_path: str | Path) -> Path:
    """A path to a spec file, or the name of a bundled one (`hf-to-mlx`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = MAPPINGS / f"{name_or_path}.yaml"
    if bundled.is_file():
        return bundled
    names = ", ".join(p.stem for p in bundled_specs())
    raise RemapError(f"no spec file '{name_or_path}'", expected=f"a path or a bundled spec: {names}")


def load_spec(name_or_path: str | Path) -> Spec:
    path = resolve(name_or_path)
    try:
        text = read_bounded(path, "spec").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemapError(f"cannot read spec: {exc}", file=str(path)) from None
    return _parsed(text, str(path))


# One command loads its spec several times (choosing the route, checking it, planning): the same
# text parses to the same Spec, which is plain data nothing changes.
@lru_cache(maxsize=32)
def _parsed(text: str, path: str) -> Spec:
    return parse_spec(text, path)


def parse_spec(text: str, path: str = "<memory>") -> Spec:
    try:
        document = yaml_lines.load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise RemapError(f"invalid YAML: {getattr(exc, 'problem', None) or exc}", file=where,
                         expected="a spec in plain YAML (docs/specs.md)") from None
    return spec_from_document(document, path)


def spec_from_document(document: Any, path: str = "<memory>") -> Spec:
    check_document(document, path)
    rules = tuple(_rule(k, raw, path) for k, raw in enumerate(document.get("rules", [])))
    parts = tuple(_part(item, path) for item in document.get("compose", []))
    for before, after in zip(parts, parts[1:]):
        if before.target_layout != after.source_layout:
            raise RemapError(f"compose: '{before.name}' writes {before.target_layout} but '{after.name}' reads {after.source_layout}", file=path)
    if parts and (parts[0].source_layout, parts[-1].target_layout) != (document["from"], document["to"]):
        raise RemapError(f"compose: the stages go {parts[0].source_layout} -> {parts[-1].target_layout}",
                         file=path, expected=f"{document['from']} -> {document['to']}")
    return Spec(
        name=document["name"],
        source_layout=document["from"],
        target_layout=document["to"],
        rules=rules,
        raw=yaml_lines.plain(document),
        path=path,
        description=document.get("description", ""),
        source_variant=document.get("source_variant"),
        variant=document.get("variant"),
        scope=document.get("scope", "source"),
        params=dict(document.get("params") or {}),
        config=yaml_lines.plain(document.get("config") or {}),
        inverse_config=yaml_lines.plain(document["inverse_config"]) if "inverse_config" in document else None,
        parts=parts,
    )


def _part(item: Any, path: str) -> Spec:
    if isinstance(item, dict) and set(item) == {"invert"}:
        from remap.spec.invert import invert_spec  # invert builds on this module

        return invert_spec(_part(item["invert"], path))
    if isinstance(item, str):
        base = Path(path).parent if path != "<memory>" else MAPPINGS
        local = base / item
        return load_spec(local if local.is_file() else item)
    return spec_from_document(item, f"{path} (composed)")


def _rule(index: int, raw: dict, path: str) -> Rule:
    line = getattr(raw, "line", 0)
    try:
        return _build_rule(index, line, raw)
    except RemapError as exc:
        raise exc.within(file=f"{path}:{line}", rule=f"rules[{index}]") from None


def _patterns(value: Any) -> tuple[Pattern, ...]:
    return tuple(Pattern(v) for v in (value if isinstance(value, list) else [value]))


def _build_rule(index: int, line: int, raw: dict) -> Rule:
    common = dict(index=index, line=line, raw=yaml_lines.plain(raw), when=raw.get("when"))
    if "drop" in raw:
        if "equals" in raw and raw["claim"] != "redundant":
            raise RemapError(f"`equals: {raw['equals']}` with claim '{raw['claim']}'",
                             expected="claim: redundant (the tensor is what the target computes by itself)")
        return Rule(kind="drop", sources=_patterns(raw["drop"]), claim=raw["claim"], reason=flattened(raw["reason"]),
                    same_as=Pattern(raw["same_as"]) if "same_as" in raw else None, equals=raw.get("equals"),
                    **common)
    if "fill" in raw:
        if "unstack" in raw and "like" not in raw:
            raise RemapError(f"`unstack: {raw['unstack']}` counts the elements of the `like` tensor", expected="a `like` pattern")
        return Rule(kind="fill", to=_patterns(raw["to"]), fill=raw["fill"], shape=tuple(raw["shape"]),
                    dtype=raw.get("dtype"), like=Pattern(raw["like"]) if "like" in raw else None,
                    unstack=raw.get("unstack"), reason=flattened(raw.get("reason", "")), **common)
    rule = Rule(kind="map", to=_patterns(raw["to"]), sources=_patterns(raw["from"]),
                ops=tuple(yaml_lines.plain(op) for op in raw.get("ops", [])), stack=raw.get("stack"),
                unstack=raw.get("unstack"), reuse=bool(raw.get("reuse", False)), **common)
    for op in rule.ops:
        op_class(op["op"])
    bound = set(rule.sources[0].variables)
    for pattern in rule.sources[1:] + rule.to:
        free = [v for v in pattern.variables if v not in bound and v not in (rule.stack, rule.unstack)]
        if free:
            raise RemapError(f"pattern '{pattern}' uses {{{free[0]}}}, which the first `from` pattern does not bind")
    if rule.stack and any(rule.stack in p.variables for p in rule.to):
        raise RemapError(f"`stack: {rule.stack}` collects {{{rule.stack}}}, so `to` must not use it")
    if rule.stack and rule.stack not in rule.sources[0].variables:
        raise RemapError(f"`stack: {rule.stack}` but the first `from` pattern has no {{{rule.stack}}}")
    if rule.unstack and not all(rule.unstack in p.variables for p in rule.to):
        raise RemapError(f"`unstack: {rule.unstack}` needs {{{rule.unstack}}} in every `to` pattern")
    return rule


def dump_spec(document: dict) -> str:
    return yaml.safe_dump(document, sort_keys=False, width=110)

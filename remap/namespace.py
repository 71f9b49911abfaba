"""The names a spec's expressions read (the source's config and the spec's params) and the
target config.json the spec writes."""

from __future__ import annotations

from typing import Any, Mapping

from remap.errors import RemapError
from remap.expr import evaluate
from remap.spec.load import Spec


def translate_config(change: Mapping[str, Any], raw: Mapping[str, Any], names: Mapping[str, Any]) -> dict:
    """The target config.json: the source's (or, with `keep: false`, nothing), with the spec's
    `set`, `derive` and `remove` applied."""
    out = dict(raw) if change.get("keep", True) else {}
    out.update(change.get("set", {}))
    for key, expression in change.get("derive", {}).items():
        try:
            out[key] = _derive(expression, names)
        except RemapError as exc:
            raise exc.within(rule=f"config.derive.{key}") from None
    for key in change.get("remove", []):
        out.pop(key, None)
    return out


def _derive(expression: Any, names: Mapping[str, Any]) -> Any:
    """An expression, or a mapping whose values are (a JSON object for config.json)."""
    if isinstance(expression, dict):
        return {key: _derive(value, names) for key, value in expression.items()}
    return evaluate(expression, names)


def namespace(spec: Spec, config: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict:
    """Config values plus the spec's params: a default may be an expression over the config; a
    user's override (`--param key=value`) is a value, taken as given."""
    names = dict(config)
    for key, default in spec.params.items():
        if key in (overrides or {}):
            names[key] = overrides[key]
        else:
            names[key] = evaluate(default, names) if isinstance(default, str) else default
    unknown = set(overrides or {}) - set(spec.params)
    if unknown:
        raise RemapError(f"unknown parameter '{sorted(unknown)[0]}'", file=spec.path,
                         expected=", ".join(spec.params) or "no parameters")
    return names

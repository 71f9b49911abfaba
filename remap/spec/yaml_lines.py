"""Safe YAML loading that remembers line numbers, so spec errors can say file:line."""

from __future__ import annotations

from typing import Any

import yaml


class LineDict(dict):
    line: int = 0


class LineList(list):
    line: int = 0


class _Loader(yaml.SafeLoader):
    """SafeLoader (no arbitrary objects) whose mappings and sequences carry their line."""

    def compose_node(self, parent, index):  # type: ignore[override]
        # Aliases let a few lines expand to billions of nodes ("billion laughs"); a spec is
        # short enough to write out, so `*name` is refused.
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} is not allowed in a spec (write the value out)", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: super() says so below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        result = LineDict(super().construct_mapping(node, deep=True))
        result.line = node.start_mark.line + 1
        return result

    def construct_sequence(self, node, deep=False):  # type: ignore[override]
        result = LineList(super().construct_sequence(node, deep=True))
        result.line = node.start_mark.line + 1
        return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _Loader.construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _Loader.construct_sequence)


def load(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except RecursionError:  # PyYAML composes recursively: thousands of nested `[` end here
        raise yaml.YAMLError("nested too deeply") from None
    except ValueError as exc:  # an integer of thousands of digits (Python's int() refuses it)
        raise yaml.YAMLError(str(exc)) from None


def plain(value: Any) -> Any:
    """`value` with LineDict / LineList turned back into dict / list (for JSON, equality, yaml.safe_dump)."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def line_of(document: Any, path: list) -> int:
    """Line of the deepest container on `path` (a jsonschema error path) that knows its line."""
    line, node = getattr(document, "line", 0), document
    for key in path:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            break
        line = getattr(node, "line", line)
    return line

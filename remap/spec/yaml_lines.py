"""Safe YAML loading that remembers line numbers, so spec errors can say file:line."""

from __future__ import annotations

from typing import Any

import yaml


class LineDict(dict):
    line: int = 0


class LineList(list):
    line: int = 0


class _Lines:
    """A safe constructor (no arbitrary objects) whose mappings and sequences carry their line."""

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


class _Loader(_Lines, yaml.SafeLoader):
    """PyYAML's own parser: it words every error, with its line, and refuses aliases."""

    def compose_node(self, parent, index):  # type: ignore[override]
        # Aliases let a few lines expand to billions of nodes ("billion laughs"); a spec is
        # short enough to write out, so `*name` is refused.
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} is not allowed in a spec (write the value out)", event.start_mark
            )
        return super().compose_node(parent, index)


# libyaml's parser, where PyYAML was built with it: ~10x faster (a composed spec's three files
# parse in ~2 ms, not ~13). It caps nesting itself; its nodes are checked for aliases.
_CLoader = type("_CLoader", (_Lines, yaml.CSafeLoader), {}) if yaml.__with_libyaml__ else None

for _loader in filter(None, (_Loader, _CLoader)):
    _loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _Lines.construct_mapping)
    _loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _Lines.construct_sequence)


def load(text: str) -> Any:
    """The document in `text`, read by libyaml where it is there and the text is plain (one
    document, no alias); anything else, errors included, by PyYAML's parser, which words them."""
    if _CLoader is not None:
        loader = _CLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None and not _aliased(node):
                return loader.construct_document(node)
        except (yaml.YAMLError, ValueError, RecursionError):
            pass  # (worded below)
        finally:
            loader.dispose()
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


def _aliased(root: yaml.Node) -> bool:
    """Whether a node is reached twice (an alias composes to the node of its anchor)."""
    seen, todo = set(), [root]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            return True
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            todo.extend(part for pair in node.value for part in pair)
        elif isinstance(node, yaml.SequenceNode):
            todo.extend(node.value)
    return False

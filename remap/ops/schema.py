"""The op part of schemas/spec.schema.json (`$defs/op`), generated from the op classes.

Each registered op becomes one if/then branch listing its parameters, so the schema cannot drift
from the code: a parameter is an expression (`int_params`, and `input`), an expression or a list
of them (`list_params`), a word (a `str` field), or what the class's `param_schema` says.

    python -m remap.ops.schema          # print the generated `$defs/op`
    python -m remap.ops.schema --write  # put it into schemas/spec.schema.json, the rest untouched

tests/test_spec_load.py fails while the committed file differs from what this generates.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from remap.ops import OPS, Op

# The repository's schemas/, reached through the package's symlink (as remap.spec.load does).
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "spec.schema.json"
REGENERATE = "python -m remap.ops.schema --write"

_EXPR = {"$ref": "#/$defs/expr"}
_EXPR_OR_LIST = {"oneOf": [_EXPR, {"type": "array", "items": _EXPR}]}
_WORD = {"type": "string", "minLength": 1}  # dtype names and the like: literal, never expressions
_INDENT = 2  # the file's indentation (json.dumps(indent=2), as it was written by hand)


def op_schema(ops: Mapping[str, type[Op]] = OPS) -> dict[str, Any]:
    """`$defs/op`: an object whose `op` names one of `ops`, with that op's parameters and no others."""
    return {
        "type": "object",
        "required": ["op"],
        "properties": {"op": {"enum": list(ops)}},
        "allOf": [_branch(cls) for cls in ops.values()],
    }


def _branch(cls: type[Op]) -> dict[str, Any]:
    return {
        "if": {"properties": {"op": {"const": cls.name}}, "required": ["op"]},
        "then": {"properties": {"op": True, **param_schemas(cls)}, "additionalProperties": False},
    }


def param_schemas(cls: type[Op]) -> dict[str, Any]:
    """Each parameter of `cls` and its schema: `input`, the expressions (int_params, then
    list_params), then the other fields in the order the class declares them."""
    fields = [f.name for f in dataclasses.fields(cls)]
    expressions = ["input", *cls.int_params, *cls.list_params]
    unknown = [name for name in [*expressions, *cls.param_schema] if name not in fields]
    if unknown:
        raise TypeError(f"op '{cls.name}' describes {unknown}, which are not fields of {cls.__qualname__}")
    order = [*expressions, *(name for name in fields if name not in expressions)]
    schemas = {name: cls.param_schema[name] if name in cls.param_schema else _default(cls, name) for name in order}
    return copy.deepcopy(schemas)  # the caller's to change: the constants and ClassVars stay as they are


def _default(cls: type[Op], name: str) -> dict[str, Any]:
    if name in cls.list_params:
        return _EXPR_OR_LIST
    if name == "input" or name in cls.int_params:
        return _EXPR
    hint = typing.get_type_hints(cls)[name]
    if hint is str or (str in typing.get_args(hint) and set(typing.get_args(hint)) <= {str, types.NoneType}):
        return _WORD
    raise TypeError(f"op '{cls.name}': parameter '{name}' is neither an expression nor a word; "
                    "give its schema in the class's `param_schema`")


def render(fragment: Mapping[str, Any], indent: int = 0) -> str:
    """`fragment` as the file writes it, its lines after the first indented by `indent` spaces."""
    return json.dumps(fragment, indent=_INDENT).replace("\n", "\n" + " " * indent)


def updated(text: str, fragment: Mapping[str, Any] | None = None) -> str:
    """The schema file's `text` with its `$defs/op` entry replaced by `fragment` (default: the
    generated one). The rest stays byte for byte; a file laid out otherwise is refused."""
    fragment = op_schema() if fragment is None else fragment
    defs = re.search(r'^( *)"\$defs": \{\n', text, re.MULTILINE)
    if defs is None:
        raise ValueError("no \"$defs\" in the schema")
    pad = defs.group(1) + " " * _INDENT
    start = re.compile(rf'^{pad}"op": \{{\n', re.MULTILINE).search(text, defs.end())
    end = start and re.compile(rf"^{pad}\}}", re.MULTILINE).search(text, start.end())
    if start is None or end is None:
        raise ValueError(f"no \"op\" entry in \"$defs\" indented by {len(pad)} spaces")
    result = text[: start.start()] + f'{pad}"op": ' + render(fragment, len(pad)) + text[end.end() :]
    before = json.loads(text)
    before["$defs"]["op"] = fragment
    try:
        after = json.loads(result)
    except json.JSONDecodeError:
        after = None
    if after != json.loads(json.dumps(before)):  # the splice must have replaced exactly that entry
        raise ValueError("the schema's \"$defs\" -> \"op\" entry is not laid out as json.dumps(indent=2) writes it")
    return result


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        text = SCHEMA_PATH.read_text()
        new = updated(text)
        if new != text:
            SCHEMA_PATH.write_text(new)
        print(f"{SCHEMA_PATH.resolve()}: {'updated' if new != text else 'already up to date'}")
        return 0
    if argv:
        print("usage: python -m remap.ops.schema [--write]", file=sys.stderr)
        return 2
    print(render(op_schema()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

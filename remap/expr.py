"""Size expressions over config values, evaluated safely.

Specs write sizes as `num_attention_heads * v_head_dim`, or read a nested config value with a
constant subscript (`quantization_config['weight_block_size']`). We parse with `ast` and walk a small
whitelist of node types: integer arithmetic, comparisons, boolean logic, a few functions. No
attribute access, no calls but the whitelist, no `eval` — a spec file is untrusted input.

A module of its own, outside remap.spec: ops evaluate their parameters with it, and the spec
loader builds on the ops, so neither package may own it.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
import warnings
from typing import Any, Mapping

from remap.errors import RemapError

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
}
_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
def _join(*parts: Any) -> str:
    """Tensor-name pieces joined with dots: join(m, w) -> 'model.layers.0.mlp.up_proj'."""
    if not all(isinstance(p, (str, int)) for p in parts):
        raise RemapError("join() takes names and indices")
    text = ".".join(map(str, parts))
    if len(text) > _MAX_LENGTH:
        raise RemapError(f"join() result longer than {_MAX_LENGTH} characters")
    return text


def _get(mapping: Any, key: Any, default: Any = None) -> Any:
    """mapping[key], or default when the key is absent (config blocks with optional entries)."""
    if not isinstance(mapping, dict):
        raise RemapError(f"get() needs a mapping, got {type(mapping).__name__}")
    return mapping.get(key, default)


_FUNCTIONS = {
    "min": min,
    "max": max,
    "cdiv": lambda a, b: -(-a // b),  # ceiling division: number of blocks covering a
    "ceil": math.ceil,
    "int": int,
    "join": _join,
    "get": _get,
}
_CONSTANTS = {"null": None, "None": None, "true": True, "false": False, "True": True, "False": False}
_MAX_LENGTH = 500  # expressions are short; a long one is a mistake or an attack


def evaluate(text: str | int | float | bool | None, names: Mapping[str, Any]) -> Any:
    """Value of `text` with `names` (usually a config) in scope. Literals pass through."""
    if text is None or isinstance(text, (bool, int, float)):
        return text
    if not isinstance(text, str):
        raise RemapError(f"expression must be a string or number, got {type(text).__name__}")
    tree = _parse(text)
    try:
        return _eval(tree.body, names, text)
    except RemapError:
        raise
    except ZeroDivisionError:
        raise RemapError(f"division by zero in {text!r}", expected="a non-zero divisor") from None
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise RemapError(f"cannot evaluate {text!r}: {exc}") from None


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> ast.Expression:
    """Parsed once per distinct expression: a full-size plan evaluates the same few hundred
    thousands of times."""
    if len(text) > _MAX_LENGTH:
        raise RemapError(f"expression longer than {_MAX_LENGTH} characters")
    try:
        with warnings.catch_warnings():  # Python's SyntaxWarnings ('1and') are not ours to print
            warnings.simplefilter("ignore")
            return ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise RemapError(f"invalid expression {text!r}: {exc.msg}") from None


def names_in(text: Any) -> frozenset[str]:
    """The names an expression reads (so a caller can tell what its value depends on)."""
    return _names_in(text) if isinstance(text, str) else frozenset()


@functools.lru_cache(maxsize=4096)
def _names_in(text: str) -> frozenset[str]:
    return frozenset(n.id for n in ast.walk(_parse(text)) if isinstance(n, ast.Name))


def evaluate_int(text: str | int, names: Mapping[str, Any]) -> int:
    """An expression that must give a whole number (a size, an index)."""
    value = evaluate(text, names)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RemapError(f"expression {text!r} gave {value!r}", expected="an integer")
    return value


def _constant_index(node: ast.AST) -> str | int | None:
    """A subscript we allow: a literal key or index (`['weight_block_size']`, `[0]`, `[-1]`)."""
    match node:
        case ast.Constant(value=key) if isinstance(key, (str, int)) and not isinstance(key, bool):
            return key
        case ast.UnaryOp(op=ast.USub(), operand=ast.Constant(value=int() as key)) if not isinstance(key, bool):
            return -key
    return None


def _eval(node: ast.AST, names: Mapping[str, Any], text: str) -> Any:
    match node:
        case ast.Constant(value=value) if value is None or isinstance(value, (int, float, bool, str)):
            return value
        case ast.Name(id=name):
            if name in names:
                return names[name]
            if name in _CONSTANTS:
                return _CONSTANTS[name]
            raise RemapError(f"unknown name '{name}' in {text!r}", expected="a config key")
        case ast.BinOp(left=left, op=op, right=right) if type(op) in _BINARY:
            return _BINARY[type(op)](_number(left, names, text), _number(right, names, text))
        case ast.UnaryOp(op=ast.USub(), operand=operand):
            return -_number(operand, names, text)
        case ast.UnaryOp(op=ast.Not(), operand=operand):
            return not _eval(operand, names, text)
        case ast.BoolOp(op=op, values=values):
            results = (_eval(v, names, text) for v in values)
            return all(results) if isinstance(op, ast.And) else any(results)
        case ast.Compare(left=left, ops=ops, comparators=comparators):
            current = _eval(left, names, text)
            for op, right_node in zip(ops, comparators):
                right = _eval(right_node, names, text)
                if isinstance(op, ast.Is):
                    ok = current is right
                elif isinstance(op, ast.IsNot):
                    ok = current is not right
                elif type(op) in _COMPARE:
                    ok = _COMPARE[type(op)](current, right)
                else:
                    break
                if not ok:
                    return False
                current = right
            else:
                return True
        case ast.Subscript(value=value, slice=index) if _constant_index(index) is not None:
            key = _constant_index(index)
            container = _eval(value, names, text)
            if not isinstance(container, (dict, list, tuple)):
                raise RemapError(f"cannot index {type(container).__name__} in {text!r}")
            try:
                return container[key]
            except (KeyError, IndexError):
                raise RemapError(f"no [{key!r}] in {text!r}") from None
        case ast.IfExp(test=test, body=body, orelse=orelse):
            return _eval(body if _eval(test, names, text) else orelse, names, text)
        case ast.Call(func=ast.Name(id=fname), args=args, keywords=[]) if fname in _FUNCTIONS:
            return _FUNCTIONS[fname](*(_eval(a, names, text) for a in args))
    raise RemapError(
        f"unsupported syntax in {text!r}: {ast.unparse(node)!r}",
        expected="numbers, config names, + - * / // %, comparisons, and/or/not, min/max/cdiv",
    )


def _number(node: ast.AST, names: Mapping[str, Any], text: str) -> int | float:
    """An arithmetic operand. Strings are refused: `'a' * 10**9` or `'%0999999999d' % 1` would
    fill memory, and no size is ever made of text."""
    value = _eval(node, names, text)
    if not isinstance(value, (int, float)):
        raise RemapError(f"arithmetic on {value!r} in {text!r}", expected="a number")
    return value

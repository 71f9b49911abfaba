"""Untrusted input never crashes: expressions, spec text, spec documents, patterns and op
parameters either work or raise RemapError (the one error the CLI prints as a user error)."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remap.errors import RemapError
from remap.ops import OPS, TensorType, build_op
from remap.expr import evaluate, evaluate_int
from remap.spec.invert import invert_spec
from remap.spec.load import parse_spec, spec_from_document
from remap.spec.pattern import Pattern

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = {"hidden_size": 64, "heads": 4, "q_lora_rank": None, "target_variant": "embed_q", "flag": True,
         "rope_scaling": {"factor": 40}, "layer_types": ["dense", "moe"]}


def returns_or_remap_error(function, *args):
    try:
        return function(*args)
    except RemapError:
        return None


# -- expressions ------------------------------------------------------------------------------

_EXPR_TOKENS = st.sampled_from(
    ["hidden_size", "heads", "q_lora_rank", "target_variant", "flag", "rope_scaling", "layer_types", "[0]",
     "['factor']", "nope", "0", "1", "7", "128", "2.5", "1e400", "'embed_q'", "'%d'", "+", "-", "*", "/", "//", "%", "**", "(", ")", ",", "<", "<=", "==", "!=", " is ", " not ",
     " and ", " or ", " if ", " else ", "null", "true", "cdiv", "min", "max", "ceil", "int", "__import__", ".",
     "__class__", "[", "]", "lambda", ":", "=", ";", "\n", " ", "{", "}", "'", '"', "\\", "\x00"]
)


@FUZZ
@given(st.one_of(st.text(max_size=80), st.lists(_EXPR_TOKENS, max_size=30).map("".join)))
def test_any_expression_returns_or_raises_remap_error(text):
    returns_or_remap_error(evaluate, text, NAMES)
    value = returns_or_remap_error(evaluate_int, text, NAMES)
    assert value is None or type(value) is int


# -- patterns ---------------------------------------------------------------------------------

_PATTERN_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="ab01._-{}*:|? ", max_size=30),
    st.lists(st.sampled_from(["model", ".", "layers", "{i}", "{e}", "{w:a|b}", "{w:|}", "{r*}", "{", "}", "{i",
                              "{1}", "*", "-", "0", "01"]), max_size=8).map("".join),
)


@FUZZ
@given(_PATTERN_TEXT, st.text(alphabet="ab01._-", max_size=20))
def test_any_pattern_returns_or_raises_remap_error(text, name):
    pattern = returns_or_remap_error(Pattern, text)
    if pattern is None:
        return
    found = pattern.match(name)
    if found is not None:
        assert pattern.fill(found) == name


# -- spec text and documents ----------------------------------------------------------------------

_YAML_TOKENS = st.sampled_from(
    ["remap: 1\n", "name: x\n", "from: hf\n", "to: mlx\n", "rules:\n", "  - ", "    ", "to: a.{i}\n", "from: a.{i}\n",
     "from: b\n", "drop: c\n", "claim: zero\n", "claim: lossy\n", "reason: r\n", "fill: zeros\n", "shape: [1]\n",
     "stack: i\n", "unstack: e\n", "ops:\n", "      - {op: split, sizes: [1, 2]}\n", "      - {op: slice}\n",
     "when: i < 3\n", "inverse: omit\n", "{", "}", "[", "]", ": ", "- ", "&a ", "*a ", "!!python/object:os.system ",
     "!!binary ", "? ", "<<: ", "'", '"', "\t", "\n", "---\n", "...\n", "%YAML 1.1\n", "#", "\x00", "\ufeff"]
)


@FUZZ
@given(st.one_of(st.text(max_size=120), st.lists(_YAML_TOKENS, max_size=40).map("".join)))
def test_any_spec_text_returns_or_raises_remap_error(text):
    returns_or_remap_error(parse_spec, text)


_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10), st.floats(allow_nan=True), st.text(max_size=10),
    st.sampled_from(["a", "zero", "lossy", "omit", "i < 3", "num_heads", "split", "bf16", "e", "i"]),
)
_VALUE = st.recursive(
    _LEAF,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)),
    max_leaves=12,
)
# Mostly well-formed pieces, so that many documents get past the schema into rule building.
_NAME_PATTERN = st.sampled_from(["a", "a.{i}", "b.{i}.{e}", "c.{w:x|y}", "d.{i}.{r*}", "e.{j}", "f.{e}", "g.{w:|}", "{i}.{i}"])
_PATTERNS = st.one_of(_NAME_PATTERN, st.lists(_NAME_PATTERN, min_size=1, max_size=3))
_EXPRESSION = st.one_of(st.integers(-2, 8), st.sampled_from(["i < 3", "heads", "1 +", "target_variant == 'x'", "i"]))
_OP = st.sampled_from(sorted(OPS)).flatmap(
    lambda name: st.fixed_dictionaries(
        {"op": st.just(name)},
        optional={f.name: st.one_of(_EXPRESSION, st.lists(_EXPRESSION, max_size=3), _CLAIM)
                  for f in dataclasses.fields(OPS[name])},
    )
)
_CLAIM = st.sampled_from(["zero", "redundant", "unused", "lossy", "maybe"])
_VARIABLE = st.sampled_from(["i", "e", "j", "w"])
_MAP_RULE = st.fixed_dictionaries(
    {"to": _PATTERNS, "from": _PATTERNS},
    optional={"ops": st.lists(_OP, max_size=3), "stack": _VARIABLE, "unstack": _VARIABLE, "reuse": st.booleans(),
              "when": _EXPRESSION, "name": st.text(max_size=5)},
)
_DROP_RULE = st.fixed_dictionaries(
    {"drop": _PATTERNS, "claim": _CLAIM, "reason": st.text(min_size=1, max_size=5)},
    optional={"same_as": _NAME_PATTERN, "inverse": st.one_of(st.just("omit"), _VALUE), "when": _EXPRESSION},
)
_FILL_RULE = st.fixed_dictionaries(
    {"fill": st.sampled_from(["zeros", "ones", "twos"]), "to": _NAME_PATTERN, "shape": st.lists(_EXPRESSION, max_size=3)},
    optional={"dtype": _LEAF, "like": _NAME_PATTERN, "when": _EXPRESSION},
)
_RULE = st.one_of(
    _MAP_RULE, _DROP_RULE, _FILL_RULE, _MAP_RULE,
    st.tuples(st.one_of(_MAP_RULE, _DROP_RULE, _FILL_RULE), st.text(max_size=6), _VALUE).map(lambda t: {**t[0], t[1]: t[2]}),
    st.dictionaries(st.text(max_size=6), _VALUE, max_size=4),
)
_DOCUMENT = st.one_of(
    st.fixed_dictionaries(
        {"remap": st.just(1), "name": st.just("fuzz"), "from": st.just("hf"), "to": st.just("mlx"),
         "rules": st.lists(_RULE, min_size=1, max_size=3)},
        optional={"variant": st.just("embed_q"), "scope": st.sampled_from(["source", "target"])},
    ),
    st.fixed_dictionaries(
        {"remap": st.just(1), "name": st.just("fuzz"), "from": st.just("hf"), "to": st.just("mlx"),
         "rules": st.lists(_RULE, min_size=1, max_size=3)},
        optional={"variant": _LEAF, "scope": _LEAF, "params": _VALUE, "config": _VALUE, "compose": _VALUE},
    ),
    _VALUE,
)


@FUZZ
@given(_DOCUMENT)
def test_any_document_returns_or_raises_remap_error(document):
    spec = returns_or_remap_error(spec_from_document, document)
    if spec is not None:
        returns_or_remap_error(invert_spec, spec)


# -- ops: built from any parameters, planned types are what apply computes -----------------------

_SMALL = st.integers(-2, 5)
_PARAMETER = {"input": st.integers(0, 2), "sizes": st.lists(_SMALL, max_size=3), "claim": _CLAIM,
              "axes": st.lists(st.integers(-1, 3), max_size=3)}
_OP_PARAMS = st.sampled_from(sorted(set(OPS) - {"dequant_fp8", "cast", "quant_fp8"})).flatmap(
    lambda name: st.fixed_dictionaries(
        {"op": st.just(name)},
        optional={f.name: _PARAMETER.get(f.name, _SMALL) for f in dataclasses.fields(OPS[name]) if f.name != "reason"},
    )
)


@FUZZ
@given(_OP_PARAMS, st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=3), min_size=1, max_size=3))
def test_any_op_either_plans_what_it_computes_or_raises_remap_error(raw, shapes):
    op = returns_or_remap_error(build_op, raw, {})
    if op is None:
        return
    inputs = [TensorType(tuple(s), "F32") for s in shapes]
    planned = returns_or_remap_error(op.types, inputs)
    if planned is None:
        return
    arrays = [np.arange(np.prod(s), dtype=np.float32).reshape(s) for s in shapes]
    computed = op.apply(arrays)
    assert [TensorType(a.shape, "F32") for a in computed] == planned

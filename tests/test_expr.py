"""Size expressions: what they compute, and that anything else is a RemapError, never a crash.

Arithmetic is checked against Python's own evaluation of the same (trusted, test-written) text,
so precedence and associativity are Python's, not whatever our tree walk happens to do.
"""

from __future__ import annotations

import math

import pytest

from remap.errors import RemapError
from remap.expr import evaluate, evaluate_int

CONFIG = {
    "hidden_size": 7168,
    "num_attention_heads": 128,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "num_hidden_layers": 61,
    "target_variant": "embed_q",
    "tie_word_embeddings": False,
    "rope_scaling": {"type": "yarn", "factor": 40},
    "layer_types": ["dense", "moe"],
}


@pytest.mark.parametrize(
    "text",
    [
        "2 + 3 * 4",
        "(2 + 3) * 4",
        "10 - 2 - 3",  # left-associative
        "2 * 3 // 4",
        "-7 // 2",  # floor, not truncation
        "7 % 3 + 1",
        "-(3 - 5) * 2",
        "100 // 7 // 2",
        "3 / 2",
        "num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim)",
        "hidden_size // num_attention_heads - v_head_dim % 7",
        "kv_lora_rank + qk_rope_head_dim",
    ],
)
def test_arithmetic_agrees_with_python(text):
    assert evaluate(text, CONFIG) == eval(text, {}, dict(CONFIG))  # noqa: S307 - trusted test text


def test_config_names_are_read():
    assert evaluate("num_attention_heads * v_head_dim", CONFIG) == 128 * 128
    assert evaluate("num_attention_heads * v_head_dim", {**CONFIG, "v_head_dim": 3}) == 128 * 3


@pytest.mark.parametrize(
    "text, value",
    [
        ("cdiv(7168, 128)", 56),
        ("cdiv(200, 128)", 2),
        ("cdiv(128, 128)", 1),
        ("cdiv(129, 128)", 2),
        ("cdiv(0, 128)", 0),
        ("min(3, 1, 2)", 1),
        ("max(3, 1, 2)", 3),
        ("max(hidden_size, 2 * kv_lora_rank)", 7168),
        ("min(cdiv(hidden_size, 128), 10) + 1", 11),
        ("ceil(7 / 2)", 4),
        ("rope_scaling['factor'] * 2", 80),  # a nested config value, by literal key
        ("layer_types[1] == 'moe'", True),
        ("int(7 / 2)", 3),
    ],
)
def test_functions(text, value):
    assert evaluate(text, CONFIG) == value


def test_cdiv_is_ceiling_division():
    for a in range(0, 300, 7):
        for b in (1, 3, 64, 128):
            assert evaluate(f"cdiv({a}, {b})", {}) == math.ceil(a / b)


@pytest.mark.parametrize(
    "text, value",
    [
        ("3 < num_hidden_layers", True),
        ("61 < num_hidden_layers", False),
        ("61 <= num_hidden_layers", True),
        ("1 < 2 < 3", True),
        ("1 < 3 < 2", False),  # chained, not (1 < 3) < 2
        ("1 == 1 != 2", True),
        ("2 > 1 and 3 >= 4", False),
        ("2 > 1 or 3 >= 4", True),
        ("not 2 > 1", False),
        ("not tie_word_embeddings", True),
        ("q_lora_rank is null", True),
        ("q_lora_rank is not null", False),
        ("kv_lora_rank is null", False),
        ("kv_lora_rank is not None", True),
        ("target_variant == 'embed_q'", True),
        ("target_variant == 'kv_b_proj'", False),
        ("target_variant != 'kv_b_proj'", True),
        ('3 < num_hidden_layers and target_variant == "embed_q"', True),
        ("64 < num_hidden_layers and target_variant == 'embed_q'", False),
        ("1 if q_lora_rank is null else 2", 1),
        ("true and not false", True),
    ],
)
def test_logic(text, value):
    result = evaluate(text, CONFIG)
    assert result == value and type(result) is type(value)


def test_when_with_bound_variable():
    # a rule's `when` sees the pattern's bindings next to the config
    assert evaluate("i < num_hidden_layers", {**CONFIG, "i": 60}) is True
    assert evaluate("i < num_hidden_layers", {**CONFIG, "i": 61}) is False


def test_literals_pass_through():
    for value in (None, 0, 7, 2.5, True, False):
        assert evaluate(value, {}) is value


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("heads * 2", "unknown name 'heads'"),
        ("num_hidden_layer + 1", "unknown name 'num_hidden_layer'"),
        ("1 / 0", "division by zero"),
        ("hidden_size // (v_head_dim - 128)", "division by zero"),
        ("7 % 0", "division by zero"),
        ("cdiv(7, 0)", "division by zero"),
        ("().__class__", "unsupported syntax"),
        ("hidden_size.__class__", "unsupported syntax"),
        ("__import__('os')", "unsupported syntax"),
        ("open('/etc/passwd')", "unsupported syntax"),
        ("min(1, key=abs)", "unsupported syntax"),
        ("lambda: 1", "unsupported syntax"),
        ("(lambda: 1)()", "unsupported syntax"),
        ("rope_scaling[hidden_size]", "unsupported syntax"),  # only a literal key
        ("layer_types[0:2]", "unsupported syntax"),
        ("hidden_size[0]", "cannot index int"),
        ("'abc'[0]", "cannot index str"),
        ("rope_scaling['beta']", "no ['beta']"),
        ("layer_types[5]", "no [5]"),
        ("rope_scaling['factor'].__class__", "unsupported syntax"),
        ("[1, 2]", "unsupported syntax"),
        ("2 ** 10", "unsupported syntax"),
        ("x := 1", "invalid expression"),
        ("1 +", "invalid expression"),
        ("1; 2", "invalid expression"),
        ("'a' * 999999999 * 999999999", "arithmetic on 'a'"),  # would fill memory
        ("'%0999999999d' % 1", "arithmetic on"),  # likewise, through %-formatting
        ("q_lora_rank + 1", "arithmetic on None"),
        ("'a' < 1", "cannot evaluate"),
        ("min()", "cannot evaluate"),
        ("int(1e400)", "cannot evaluate"),
    ],
)
def test_errors_are_remap_errors_with_a_clear_message(text, fragment):
    with pytest.raises(RemapError) as info:
        evaluate(text, CONFIG)
    assert fragment in str(info.value)


def test_unknown_name_says_what_was_expected():
    with pytest.raises(RemapError) as info:
        evaluate("heads", CONFIG)
    assert info.value.expected == "a config key"


def test_length_limit():
    at_limit = "1+" * 249 + "1 "  # 500 characters
    assert len(at_limit) == 500
    assert evaluate(at_limit, {}) == 250
    with pytest.raises(RemapError, match="longer than 500"):
        evaluate(at_limit + "0", {})


def test_non_string_expression():
    with pytest.raises(RemapError, match="must be a string or number"):
        evaluate(["hidden_size"], CONFIG)


@pytest.mark.parametrize("text, value", [("7168 // 128", 56), ("128 / 2", 64), (56, 56), ("-3", -3)])
def test_evaluate_int(text, value):
    result = evaluate_int(text, CONFIG)
    assert result == value and type(result) is int


@pytest.mark.parametrize("text", ["7 / 2", "true", "1 < 2", "'embed_q'", "q_lora_rank", "1e400", 2.5])
def test_evaluate_int_refuses_non_integers(text):
    with pytest.raises(RemapError) as info:
        evaluate_int(text, CONFIG)
    assert info.value.expected == "an integer"


def test_python_syntax_warnings_are_not_printed(recwarn):
    evaluate("1if 1else 2", {})  # Python warns 'invalid decimal literal' when it parses this
    assert not [w for w in recwarn if issubclass(w.category, SyntaxWarning)]

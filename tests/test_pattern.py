"""Tensor-name patterns: anchored, literal dots, canonical indices, and fill as match's inverse."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from remap.errors import RemapError
from remap.spec.pattern import Pattern

EXPERT = Pattern("model.layers.{i}.mlp.experts.{e}.gate_proj.weight")


def test_match_binds_indices_as_integers():
    assert EXPERT.match("model.layers.3.mlp.experts.17.gate_proj.weight") == {"i": 3, "e": 17}
    assert EXPERT.variables == ("i", "e")


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.3.mlp.shared_experts.0.gate_proj.weight",  # the classic unanchored-regex trap
        "model.layers.3.mlp.shared_experts.gate_proj.weight",
        "model.layers.3.mlp.experts.0.gate_proj.weight_scale_inv",  # no prefix match
        "x.model.layers.3.mlp.experts.0.gate_proj.weight",  # no suffix match
        "model.layers.3.mlp.experts.0.gate_proj",
        "model.layers.3Xmlp.experts.0.gate_proj.weight",  # a dot is a dot, not any character
        "model.layers..mlp.experts.0.gate_proj.weight",
        "model.layers.a.mlp.experts.0.gate_proj.weight",
        "model.layers.-1.mlp.experts.0.gate_proj.weight",
        "model.layers.3.mlp.experts.0.1.gate_proj.weight",  # an index is one dot-free number
    ],
)
def test_anchored_and_literal(name):
    assert EXPERT.match(name) is None


@pytest.mark.parametrize("index, matches", [("0", True), ("7", True), ("10", True), ("61", True),
                                            ("01", False), ("00", False), ("007", False), ("", False), ("+1", False)])
def test_indices_are_canonical(index, matches):
    # `layers.01` and `layers.1` must not both be layer 1: only the canonical spelling matches
    assert (Pattern("layers.{i}.w").match(f"layers.{index}.w") is not None) is matches


def test_repeated_variable_takes_one_value():
    p = Pattern("a.{i}.b.{i}")
    assert p.variables == ("i",)
    assert p.match("a.3.b.3") == {"i": 3}
    assert p.match("a.3.b.4") is None
    assert p.match("a.12.b.1") is None


def test_alternation():
    p = Pattern("layers.{i}.self_attn.{w:q_proj|q_a_proj|kv_a_proj_with_mqa}.weight")
    for word in ("q_proj", "q_a_proj", "kv_a_proj_with_mqa"):
        assert p.match(f"layers.2.self_attn.{word}.weight") == {"i": 2, "w": word}
    for other in ("o_proj", "q_proj_x", "xq_proj", "q", "kv_a_proj", ""):
        assert p.match(f"layers.2.self_attn.{other}.weight") is None


def test_alternation_words_that_look_like_numbers_stay_text():
    assert Pattern("a.{w:1|01}").match("a.01") == {"w": "01"}


def test_star_tail():
    p = Pattern("model.layers.{i}.{rest*}")
    assert p.match("model.layers.61.mlp.experts.3.down_proj.weight") == {
        "i": 61,
        "rest": "mlp.experts.3.down_proj.weight",
    }
    assert p.match("model.layers.61.embed_tokens.weight")["rest"] == "embed_tokens.weight"
    assert p.match("model.layers.61.") is None  # a tail is never empty
    assert p.match("model.layers.61") is None
    assert p.match("model.norm.weight") is None


def test_star_keeps_its_text_so_fill_gives_the_name_back():
    p = Pattern("a.{rest*}")
    m = p.match("a.007")
    assert m == {"rest": "007"}
    assert p.fill(m) == "a.007"


@pytest.mark.parametrize(
    "pattern, name",
    [
        ("model.layers.{i}.mlp.experts.{e}.{proj:gate_proj|up_proj}.weight", "model.layers.4.mlp.experts.250.up_proj.weight"),
        ("h.{i}.attn.{w:q_proj|o_proj}.weight", "h.0.attn.o_proj.weight"),
        ("model.layers.{i}.{rest*}", "model.layers.61.shared_head.norm.weight"),
        ("{a}.{a}", "5.5"),
        ("wte.weight", "wte.weight"),
    ],
)
def test_fill_undoes_match(pattern, name):
    p = Pattern(pattern)
    assert p.fill(p.match(name)) == name


def test_fill_ignores_kinds_and_extra_values():
    p = Pattern("model.layers.{i}.mlp.{proj:gate_proj|up_proj}.weight")
    assert p.fill({"i": 7, "proj": "up_proj", "e": 3}) == "model.layers.7.mlp.up_proj.weight"


def test_fill_names_the_missing_variable():
    with pytest.raises(RemapError, match=r"uses \{e\}"):
        Pattern("switch_mlp.{e}.{proj}").fill({"proj": "gate_proj"})


def test_kinds():
    p = Pattern("a.{i}.{w:x|y}.{r*}.{i}")
    assert p.kinds() == {"i": "", "w": ":x|y", "r": "*"}


def test_with_kinds_makes_a_matching_pattern():
    # inverting a rule: its plain `to` pattern must accept exactly what the old `from` accepted
    to = Pattern("model.layers.{i}.mlp.{proj}.weight")
    source = Pattern("model.layers.{i}.mlp.{proj:gate_proj|up_proj|down_proj}.weight")
    inverted = to.with_kinds(source.kinds())
    assert inverted.text == source.text
    assert inverted.match("model.layers.1.mlp.up_proj.weight") == {"i": 1, "proj": "up_proj"}
    assert inverted.match("model.layers.1.mlp.other.weight") is None
    assert to.match("model.layers.1.mlp.other.weight") is None  # `{proj}` alone is an index


def test_with_kinds_keeps_what_it_is_not_told():
    assert Pattern("a.{i}.{r*}").with_kinds({"i": ":x|y"}).text == "a.{i:x|y}.{r*}"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "model layers",
        "model/layers",
        "model.layers.{i",
        "model.layers.i}",
        "model.layers.{}",
        "model.layers.{1i}",
        "model.layers.{i:}",
        "model.layers.{w:|}",
        "model.layers.{w:a.b}",
        "model.layers.{i+1}",
        "model.layers.*",
        "model.layers.(0|1)",
        "model.layers.[0-9]",
        "model.layers.\n",
        "model.läyers",
    ],
)
def test_bad_patterns(text):
    with pytest.raises(RemapError):
        Pattern(text)


def test_regex_characters_are_literal():
    # '-' and '.' are name characters; neither may act as a regex operator
    p = Pattern("a-b.{i}")
    assert p.match("a-b.1") == {"i": 1}
    assert p.match("aXb.1") is None and p.match("a-bX1") is None


_WORD = st.text(alphabet="abcxyz_019", min_size=1, max_size=4)


@st.composite
def pattern_and_name(draw):
    """A pattern of literal and variable segments, and a name built by filling it."""
    parts, values = [], {}
    for k in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["literal", "index", "word", "star", "repeat"]))
        if kind == "star" and any(p.endswith("*}") for p in parts):
            kind = "literal"  # one `*` variable per pattern (the loader refuses more)
        if kind == "literal" or (kind == "repeat" and not values):
            parts.append(draw(_WORD))
        elif kind == "repeat":
            parts.append("{" + draw(st.sampled_from(sorted(values))) + "}")
        else:
            name = f"v{k}"
            if kind == "index":
                values[name] = draw(st.integers(0, 300))
                parts.append("{" + name + "}")
            elif kind == "word":
                words = draw(st.lists(_WORD, min_size=1, max_size=3, unique=True))
                values[name] = draw(st.sampled_from(words))
                parts.append("{" + name + ":" + "|".join(words) + "}")
            else:
                values[name] = ".".join(draw(st.lists(_WORD, min_size=1, max_size=3)))
                parts.append("{" + name + "*}")
    pattern = Pattern(".".join(parts))
    return pattern, pattern.fill(values), values


@settings(max_examples=200, deadline=None)
@given(pattern_and_name())
def test_a_filled_pattern_matches_and_refills_to_the_same_name(case):
    pattern, name, values = case
    found = pattern.match(name)
    assert found is not None
    assert set(found) == set(values)
    assert pattern.fill(found) == name
    assert all(type(found[var]) is int for var, kind in pattern.kinds().items() if kind == "")
    if "*" not in pattern.kinds().values():
        # without a `*` (which may take more or fewer dots) a name splits one way only
        assert found == values


@pytest.mark.parametrize("text, says", [
    ("{a*}.{b*}", "2 `*` variables"),
    ("model.{x*}.{y*}.{z*}.w", "3 `*` variables"),
    ("{a*}{b*}", "two variables touch"),
    ("layers.{i}{j}.w", "two variables touch"),
    ("{proj:gate|up}{i}", "two variables touch"),
])
def test_patterns_that_could_backtrack_are_refused(text, says):
    """Matching stays linear in the name: one `*` at most, literal text between variables
    (`{a*}.{b*}.{c*}...` would try every choice of dots, for minutes on a long name)."""
    with pytest.raises(RemapError, match=re.escape(says)):
        Pattern(text)
    assert Pattern("{m*}.self_attn.{w:q_proj|o_proj}.bias").match("model.layers.3.self_attn.o_proj.bias") == {
        "m": "model.layers.3", "w": "o_proj"}

"""Loading specs (YAML -> schema -> Spec) with errors that say file:line, and inverting them."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import yaml

from remap.errors import RemapError
from remap.ops import OPS, build_op
from remap.ops.schema import REGENERATE, updated
from remap.spec import yaml_lines
from remap.spec.invert import invert_document, invert_spec
from remap.spec.load import SCHEMAS, bundled_specs, load_spec, parse_spec, spec_from_document, spec_schema

HEAD = "remap: 1\nname: test\nfrom: hf\nto: mlx\n"


def test_a_valid_spec_loads():
    spec = parse_spec(
        HEAD
        + """variant: embed_q
rules:
  - {to: model.norm.weight, from: ln_f.weight}
  - name: experts
    to: switch_mlp.{proj}.weight
    from: layers.{i}.experts.{e}.{proj:w1|w2}.weight
    stack: e
    when: i < num_hidden_layers
    ops:
      - {op: cast, dtype: bf16}
  - drop: wpe.weight
    claim: zero
    reason: RoPE only
    inverse: {fill: zeros, to: wpe.weight, shape: [max_position_embeddings, hidden_size]}
  - {fill: ones, to: "layers.{i}.norm.bias", shape: [hidden_size], when: "true"}
""",
        "inline.yaml",
    )
    assert (spec.name, spec.source_layout, spec.target_layout, spec.variant) == ("test", "hf", "mlx", "embed_q")
    assert [r.kind for r in spec.rules] == ["map", "map", "drop", "fill"]
    assert [r.line for r in spec.rules] == [7, 8, 15, 19]
    experts = spec.rules[1]
    assert experts.stack == "e" and experts.when == "i < num_hidden_layers"
    assert experts.sources[0].match("layers.2.experts.5.w2.weight") == {"i": 2, "e": 5, "proj": "w2"}
    assert experts.to[0].fill({"proj": "w2"}) == "switch_mlp.w2.weight"
    assert experts.ops == ({"op": "cast", "dtype": "bf16"},)
    assert experts.id == "rules[1] experts"
    assert spec.rules[2].claim == "zero" and spec.rules[3].fill == "ones"
    assert type(spec.raw["rules"][0]) is dict  # plain data, not the line-carrying loader types


@pytest.mark.parametrize("path", bundled_specs(), ids=lambda p: p.stem)
def test_bundled_specs_load(path):
    spec = load_spec(path)
    assert (spec.rules or spec.parts) and spec.path == str(path)
    assert load_spec(path.stem).raw == spec.raw


def test_unknown_spec_name_lists_the_bundled_ones():
    with pytest.raises(RemapError) as info:
        load_spec("no-such-spec")
    assert "hf-to-mlx" in info.value.expected


RULE = "rules:\n  - {to: a, from: a}\n"
ERRORS = {
    "unknown top-level key": (HEAD + "bogus: 1\n" + RULE, 1, "'bogus' was unexpected"),
    "unknown rule key": (HEAD + "rules:\n  - {to: a, from: a}\n  - to: b\n    from: b\n    colour: red\n", 7,
                         "'colour' was unexpected"),
    "unknown op": (HEAD + "rules:\n  - to: a\n    from: a\n    ops:\n      - {op: frobnicate}\n", 9, "'frobnicate'"),
    "unknown op parameter": (HEAD + "rules:\n  - to: a\n    from: a\n    ops:\n      - {op: split, sizes: [1], wibble: 3}\n",
                             9, "'wibble' was unexpected"),
    "op parameter of another op": (HEAD + "rules:\n  - to: a\n    from: a\n    ops:\n      - {op: pad, heads: 3}\n",
                                   9, "'heads' was unexpected"),
    "bad drop claim": (HEAD + "rules:\n  - drop: a\n    claim: probably_fine\n    reason: x\n", 6, "'probably_fine'"),
    "bad slice claim": (HEAD + "rules:\n  - to: a\n    from: a\n    ops:\n      - {op: slice, stop: 2, claim: maybe}\n",
                        9, "'maybe'"),
    "drop without claim": (HEAD + "rules:\n  - {drop: a, reason: x}\n", 6, "'claim' is a required property"),
    "bad pattern": (HEAD + "rules:\n  - to: a\n    from: 'a.{i'\n", 6, "'a.{i'"),
    "empty alternation": (HEAD + "rules:\n  - to: a\n    from: 'a.{w:|}'\n", 6, "{w:|}"),
    "YAML syntax error": (HEAD + "rules:\n  - to: a\n   from: a\n", 7, "invalid YAML"),
    "duplicate key": (HEAD + "rules:\n  - to: a\n    from: a\n    to: b\n", 8, "duplicate key 'to'"),
    "duplicate top-level key": (HEAD + "name: again\n" + RULE, 5, "duplicate key 'name'"),
    "to uses an unbound variable": (HEAD + "rules:\n  - {to: a, from: a}\n  - to: x.{j}\n    from: x.{i}\n", 7,
                                    "x.{j}' uses {j}"),
    "second from uses an unbound variable": (HEAD + "rules:\n  - to: x.{i}\n    from: ['x.{i}', 'y.{k}']\n", 6, "uses {k}"),
    "stack variable not in from": (HEAD + "rules:\n  - {to: a, from: a}\n  - to: x.{i}\n    from: x.{i}\n    stack: e\n",
                                   7, "`stack: e`"),
    "stack variable kept in to": (HEAD + "rules:\n  - to: x.{e}\n    from: x.{e}\n    stack: e\n", 6, "`stack: e`"),
    "unstack variable missing in to": (HEAD + "rules:\n  - to: x.{i}\n    from: x.{i}\n    unstack: e\n", 6, "`unstack: e`"),
    "alias": (HEAD + "rules:\n  - {to: &n a, from: a}\n  - {to: b, from: *n}\n", 7, "alias *n"),
    "no rules": (HEAD + "rules: []\n", 5, "rules: [] should be non-empty"),
    "not a mapping": ("- a\n- b\n", 1, "is not of type 'object'"),
    "empty file": ("", 0, "is not of type 'object'"),
    "wrong version": (HEAD.replace("remap: 1", "remap: 2") + RULE, 1, "remap"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_say_file_line_and_what(case):
    text, line, fragment = ERRORS[case]
    with pytest.raises(RemapError) as info:
        parse_spec(text, "specs/mine.yaml")
    message = str(info.value)
    assert f"specs/mine.yaml:{line}:" in message
    assert fragment in message


def test_rule_errors_name_the_rule():
    with pytest.raises(RemapError) as info:
        parse_spec(ERRORS["to uses an unbound variable"][0], "mine.yaml")
    assert info.value.rule == "rules[1]"


def test_errors_from_a_file_name_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(HEAD + "rules:\n  - to: a\n    from: a\n    ops: [{op: nope}]\n")
    with pytest.raises(RemapError, match=rf"{path}:\d+: .*'nope'"):
        load_spec(path)


def test_python_tags_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    text = HEAD + f"rules: !!python/object/apply:os.mkdir ['{marker}']\n"
    with pytest.raises(RemapError, match="could not determine a constructor"):
        parse_spec(text)
    assert not marker.exists()
    with pytest.raises(RemapError):
        parse_spec(HEAD + "rules: !!python/name:os.system\n")


def test_deep_nesting_is_a_remap_error():
    with pytest.raises(RemapError, match="nested too deeply"):
        parse_spec("[" * 5000 + "]" * 5000)


def _with_lines(value):
    """`value` with the line of each mapping and sequence beside it."""
    if isinstance(value, dict):
        return ("map", getattr(value, "line", None), [(k, _with_lines(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("seq", getattr(value, "line", None), [_with_lines(v) for v in value])
    return (type(value).__name__, value)


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML built without libyaml: only its own parser reads specs")
def test_libyaml_reads_every_bundled_spec_as_pyyamls_parser_does():
    """Values, their types, key order and each mapping's and sequence's line: libyaml reads the
    specs, PyYAML's own parser words the errors (an alias, above, is refused by either)."""
    for path in bundled_specs():
        text = path.read_text()
        assert _with_lines(yaml_lines.load(text)) == _with_lines(yaml.load(text, Loader=yaml_lines._Loader)), path


# -- schema and code cannot drift ----------------------------------------------------------------


def test_committed_schema_is_the_generated_one():
    text = (SCHEMAS / "spec.schema.json").read_text()
    if updated(text) != text:
        pytest.fail(f"schemas/spec.schema.json's $defs/op is not what the op classes generate: run `{REGENERATE}`",
                    pytrace=False)


def _schema_ops() -> dict[str, set[str]]:
    op = spec_schema()["$defs"]["op"]
    params = {}
    for branch in op["allOf"]:
        name = branch["if"]["properties"]["op"]["const"]
        params[name] = set(branch["then"]["properties"]) - {"op"}
        assert branch["then"]["additionalProperties"] is False, name
    assert set(op["properties"]["op"]["enum"]) == set(params)
    return params


def test_schema_ops_are_the_code_ops():
    assert set(_schema_ops()) == set(OPS)


@pytest.mark.parametrize("name", sorted(OPS))
def test_schema_params_are_the_op_fields(name):
    assert _schema_ops()[name] == {f.name for f in dataclasses.fields(OPS[name])}


def test_schema_pattern_accepts_what_pattern_accepts():
    # a pattern the schema lets through but Pattern refuses still fails, with the rule named
    with pytest.raises(RemapError, match=r"rules\[0\]"):
        parse_spec(HEAD + "rules:\n  - {to: 'a.{w:|}', from: 'b.{w:|}'}\n")


# -- invert ---------------------------------------------------------------------------------------

CONFIG = {"num_hidden_layers": 3, "num_attention_heads": 4, "qk_nope_head_dim": 3, "v_head_dim": 5, "kv_lora_rank": 6,
          "moe_intermediate_size": 7}


def _strip_kinds(patterns):
    return [re.sub(r"\{(\w+)[^}]*\}", r"{\1}", p.text) for p in patterns]


def test_hf_to_mlx_inverted_twice_is_itself():
    spec = load_spec("hf-to-mlx")
    inverse = invert_spec(spec)
    twice = invert_spec(inverse)
    assert (twice.source_layout, twice.target_layout, twice.variant, twice.scope) == (
        spec.source_layout, spec.target_layout, spec.variant, spec.scope)
    # `inverse: omit` drops leave nothing to invert back
    kept = [r for r in spec.rules if r.raw.get("inverse") != "omit"]
    assert len(twice.rules) == len(kept) < len(spec.rules)
    names = {**CONFIG, "i": 0, "target_variant": "embed_q", "source_variant": None}
    for before, after in zip(kept, twice.rules):
        assert (after.kind, after.stack, after.unstack, after.when) == (before.kind, before.stack, before.unstack, before.when)
        assert [p.text for p in after.sources] == [p.text for p in before.sources]
        assert _strip_kinds(after.to) == _strip_kinds(before.to)
        assert [build_op(op, names) for op in after.ops] == [build_op(op, names) for op in before.ops]


def test_inverted_rule_reads_the_target_names_and_undoes_the_ops():
    spec = load_spec("hf-to-mlx")
    inverse = invert_spec(spec)
    [rule] = [r for r in inverse.rules if r.raw.get("name", "").startswith("kv_b_proj split")]
    assert rule.when == "i < num_hidden_layers and source_variant == 'embed_q' and model_type != 'deepseek_v2'"
    assert [p.text for p in rule.sources] == [
        "model.layers.{i}.self_attn.embed_q.weight", "model.layers.{i}.self_attn.unembed_out.weight"]
    [forward] = [r for r in spec.rules if r.raw.get("name") == rule.raw["name"]]
    kv_b_proj = np.random.default_rng(1).standard_normal((4 * (3 + 5), 6)).astype(np.float32)
    arrays = [kv_b_proj]
    for raw in [*forward.ops, *rule.ops]:
        arrays = build_op(raw, CONFIG).apply(arrays)
    assert len(arrays) == 1 and np.array_equal(arrays[0], kv_b_proj)

    [experts] = [r for r in inverse.rules if r.raw.get("name") == "routed experts stacked"]
    assert experts.unstack == "e" and experts.stack is None
    assert experts.sources[0].match("model.layers.1.mlp.switch_mlp.up_proj.weight") == {"i": 1, "proj": "up_proj"}
    assert experts.sources[0].match("model.layers.1.mlp.switch_mlp.other.weight") is None


def _spec(rules: str):
    return parse_spec(HEAD + "rules:\n" + rules, "mine.yaml")


@pytest.mark.parametrize(
    "rules, fragment",
    [
        ("  - {to: a, from: a}\n  - name: mtp\n    drop: b\n    claim: lossy\n    reason: gone\n", "'lossy'"),
        ("  - {to: a, from: a}\n  - name: mtp\n    drop: b\n    claim: unused\n    reason: gone\n", "`inverse`"),
        ("  - {to: a, from: a}\n  - name: mtp\n    to: b\n    from: b\n    ops: [{op: slice, stop: 1}]\n", "lossy slice"),
    ],
)
def test_what_cannot_be_inverted_names_the_rule(rules, fragment):
    with pytest.raises(RemapError) as info:
        invert_spec(_spec(rules))
    assert info.value.rule == "rules[1] mtp"
    assert "mine.yaml:7" in str(info.value) and fragment in str(info.value)


def test_drops_and_fills_invert_into_each_other():
    spec = _spec(
        "  - drop: wpe.weight\n    claim: zero\n    reason: RoPE only\n"
        "    inverse: {fill: zeros, to: wpe.weight, shape: [max_position_embeddings, hidden_size]}\n"
        "  - {drop: 'mtp.{rest*}', claim: unused, reason: training only, inverse: omit}\n"
        "  - {fill: ones, to: norm.bias, shape: [hidden_size]}\n"
    )
    document = invert_document(spec)
    assert document["rules"] == [
        {"fill": "zeros", "to": "wpe.weight", "shape": ["max_position_embeddings", "hidden_size"]},
        {"drop": "norm.bias", "claim": "lossy", "reason": "filled with ones by test; exact only while still ones"},
    ]
    assert spec_from_document(document).rules[1].claim == "lossy"

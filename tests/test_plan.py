"""The planner on every bundled spec: accounting, target layouts, exact inversion, and the
errors a bad spec must give at plan time."""

from __future__ import annotations

import dataclasses
import json
from collections import ChainMap, Counter

import numpy as np
import pytest

from remap.errors import RemapError
from remap.ops import TensorType
from remap.plan import Dropped, Output, Plan, Stage, Step
from remap.expr import evaluate
from remap.planner import _Planner, build_plan
from remap.report import build_report
from remap.spec.invert import invert_spec
from remap.spec.load import bundled_specs, load_spec, parse_spec
from tests.helpers import HF_BASE, SCRATCH_BASE, layout_tensors, random_tensors, run_plan, types_of

HF_CONFIGS = {
    "q-lora": {},
    "no-q-lora, all MoE": dict(q_lora_rank=None, first_k_dense_replace=0),
    "two dense, two shared": dict(first_k_dense_replace=2, n_shared_experts=2),
    "V3.2 indexer": dict(model_type="deepseek_v32", index_n_heads=2, index_head_dim=16, index_topk=4),
}
SCRATCH_CONFIGS = {
    "MTP head": dict(mtp_num_heads=1),
    "no biases, wider experts": dict(bias=False, expert_intermediate_size=32),
}
# (spec, source layout, source variant, target variant, configs)
CASES = [
    ("hf-to-mlx", "hf", "bf16", "embed_q", HF_CONFIGS),
    ("hf-to-mlx", "hf", "bf16-mtp", "kv_b_proj", HF_CONFIGS),
    ("hf-to-deepseek", "hf", "bf16-mtp", None, HF_CONFIGS),
    ("hf-fp8-to-hf", "hf", "fp8-mtp", None, HF_CONFIGS),
    ("hf-fp8-to-mlx", "hf", "fp8", "kv_b_proj", HF_CONFIGS),
    ("hf-to-hf-fp8", "hf", "bf16", None, HF_CONFIGS),
    ("hf-to-hf-fp8", "hf", "bf16-mtp", None, HF_CONFIGS),
    ("scratch-to-hf", "scratch", None, None, SCRATCH_CONFIGS),
    ("scratch-to-mlx", "scratch", None, "embed_q", SCRATCH_CONFIGS),
    ("scratch-to-mlx", "scratch", None, "kv_b_proj", SCRATCH_CONFIGS),
    ("scratch-to-hf-exact", "scratch", None, None, SCRATCH_CONFIGS),
    ("scratch-to-mlx-exact", "scratch", None, "embed_q", SCRATCH_CONFIGS),
    ("mlx-quantize", "mlx", "embed_q", None, HF_CONFIGS),
    ("mlx-dequantize", "mlx", "kv_b_proj", None, HF_CONFIGS),
    ("mlx-to-hf", "mlx", "embed_q", None, HF_CONFIGS),
]
# Quantizing is lossy by design: those specs have no exact inverse to test (FP8 ones: see
# test_fp8_requantization_is_a_projection).
LOSSY_SPECS = {"mlx-quantize", "mlx-dequantize", "mlx-to-hf"}
FP8 = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}


def _source(layout, variant, overrides):
    config = {**(SCRATCH_BASE if layout == "scratch" else HF_BASE), **overrides}
    if variant and variant.startswith("fp8"):
        config.update(FP8)
    return config, layout_tensors(layout, config, variant)


def _cases():
    return [
        pytest.param(spec, layout, source_variant, variant, overrides, id=f"{spec}-{variant}-{label}")
        for spec, layout, source_variant, variant, configs in CASES
        for label, overrides in configs.items()
    ]


def _low_rank_tensors(spec, source: dict, target: dict) -> set[str]:
    """Names, on either side, of the tensors a low_rank_fuse rule of `spec` reads or writes."""
    parts = spec.parts or (spec,)
    rules = [r for part in parts for r in part.rules if any(op["op"] == "low_rank_fuse" for op in r.ops)]
    return {name for rule in rules for pattern in (*rule.sources, *rule.to)
            for name in (*source, *target) if pattern.match(name) is not None}


def _forward_fates(plan: Plan) -> dict:
    """Each first-stage source's fate, followed forward name by name (Plan.fates works backward
    from the last stage): used if some step reading it leads to a final output; else the claim of
    its drop, or, read only by steps leading nowhere, that of the first such step's first output
    with one (the first of its outputs dropped, or so read in turn); else unmatched."""
    stages, last = plan.stages, len(plan.stages) - 1

    def entry(i: int, name: str):  # "used", ("claim", claim or None), or None (no rule took it)
        readers = [step for step in stages[i].steps if name in step.sources]
        if any(i == last or entry(i + 1, o.name) == "used" for step in readers for o in step.outputs):
            return "used"
        drops = [d.claim for d in stages[i].dropped if d.name == name]
        if drops or not readers:
            return ("claim", drops[0]) if drops else None
        later = [entry(i + 1, o.name) for o in readers[0].outputs]
        return "claim", next((e[1] for e in later if e is not None), None)

    fates = {}
    for name in stages[0].source_tensors:
        found = entry(0, name)
        fates[name] = ("used", None) if found == "used" else (
            ("dropped", found[1]) if found is not None and found[1] is not None else ("unmatched", None))
    return fates


def test_fates_through_stages_agree_with_following_each_name_forward():
    """Three stages: a tensor re-read by a step leading nowhere, a step of two outputs both lost
    (one dropped later, one read by a step whose output is dropped), what a later stage leaves
    unmatched, a drop, and what no rule took."""
    t = TensorType((2,), "BF16")

    def stage(sources, steps, dropped=(), unmatched=(), reused=None):
        return Stage(None, dict.fromkeys(sources, t), {}, {}, {}, steps=tuple(
            Step(rule, tuple(Output(o, (2,), "BF16") for o in outs), (tuple(ins),)) for rule, ins, outs in steps),
            dropped=tuple(Dropped(n, "drop", c, "why") for n, c in dropped), unmatched=tuple(unmatched), reused=reused or {})

    plan = Plan((
        stage([f"a{k}" for k in range(1, 8)],
              [("A1", ["a1"], ["x1"]), ("A2", ["a2", "a3"], ["x2", "x3"]), ("A3", ["a4"], ["x4"]),
               ("A4", ["a1"], ["x5"]), ("A5", ["a7"], ["x6"])],
              dropped=[("a5", "zero")], unmatched=["a6"], reused={"a1": ("A4",)}),
        stage(["x1", "x2", "x3", "x4", "x5", "x6"], [("B1", ["x1"], ["y1"]), ("B2", ["x2"], ["y2"]), ("B3", ["x6"], ["y3"])],
              dropped=[("x3", "unused"), ("x5", "redundant")], unmatched=["x4"]),
        stage(["y1", "y2", "y3"], [("C1", ["y1"], ["z1"])], dropped=[("y2", "zero")], unmatched=["y3"]),
    ), "t")
    want = {"a1": ("used", None), "a2": ("dropped", "zero"), "a3": ("dropped", "zero"), "a4": ("unmatched", None),
            "a5": ("dropped", "zero"), "a6": ("unmatched", None), "a7": ("unmatched", None)}
    assert plan.fates() == _forward_fates(plan) == want
    assert plan.fate_counts() == Counter(want.values())


def test_every_bundled_spec_is_exercised():
    assert {s for s, *_ in CASES} == {p.stem for p in bundled_specs()}


@pytest.mark.parametrize("spec, layout, source_variant, variant, overrides", _cases())
def test_bundled_spec_meets_its_target_layout(spec, layout, source_variant, variant, overrides):
    config, tensors = _source(layout, source_variant, overrides)
    plan = build_plan(load_spec(spec), tensors, config, variant=variant, source_variant=source_variant)
    report = build_report(plan)
    assert report.ok, report.problems
    fates = plan.fates()
    assert set(fates) == set(tensors)  # every source tensor accounted for
    assert plan.fate_counts() == Counter(fates.values())
    assert fates == _forward_fates(plan)
    for stage in plan.stages:  # the planner's index of each output's step, against one made of the steps
        assert stage.makers == dataclasses.replace(stage, makers=None).makers
    assert report.coverage["used"] + report.coverage["dropped"] == len(tensors)
    json.dumps(plan.to_dict())  # the plan is plain data


def _kept_name_by_name(self, pattern, rule):
    """_Planner._kept as its doc says, plainly: `when` evaluated on each name's binding, dtype and shape."""
    kept = []
    for match in self._matches(pattern):
        if rule.when is None:
            kept.append((match, None))
            continue
        types = [self.tensors[name] for name in match.names]
        passed = [bool(evaluate(rule.when, ChainMap({**binding, "dtype": t.dtype, "shape": t.shape}, self.namespace)))
                  for (_, binding), t in zip(match.bindings(), types)]
        if any(passed):
            kept.append((match, None if all(passed) else [k for k, p in enumerate(passed) if p]))
    return kept


@pytest.mark.parametrize("spec, layout, source_variant, variant, overrides", _cases())
def test_a_shape_planned_at_once_is_the_plan_made_name_by_name(spec, layout, source_variant, variant, overrides, monkeypatch):
    """The planner's per-shape paths (a shape's steps at once, names filled from templates or as
    a name and a tail; `when` decided once per distinct value of what it reads) plan what the
    name-by-name path plans, with `when` evaluated on every name."""
    config, tensors = _source(layout, source_variant, overrides)
    _assert_planned_alike(monkeypatch, spec, tensors, config, variant=variant, source_variant=source_variant)


@pytest.mark.parametrize("dtype", [None, "F16"])
def test_a_shape_of_names_of_several_types_is_planned_as_name_by_name(dtype, monkeypatch):
    """Names of one shape whose types differ (a layer's norm in float32, another's wider) each
    get their own output types; with --dtype, each output its own cast."""
    config, tensors = _source("hf", "bf16", {})
    tensors["model.layers.1.input_layernorm.weight"] = TensorType(tensors["model.layers.1.input_layernorm.weight"].shape, "F32")
    tensors["model.layers.0.post_attention_layernorm.weight"] = TensorType((3,), "BF16")
    _assert_planned_alike(monkeypatch, "hf-to-mlx", tensors, config, dtype=dtype)


def _assert_planned_alike(monkeypatch, spec, tensors, config, **options):
    fast = build_plan(load_spec(spec), tensors, config, **options)
    monkeypatch.setattr(_Planner, "_steps_alike", lambda self, *args: False)
    monkeypatch.setattr(_Planner, "_kept", _kept_name_by_name)
    slow = build_plan(load_spec(spec), tensors, config, **options)
    assert fast.to_dict() == slow.to_dict()
    assert [dict(s.makers) for s in fast.stages] == [dict(s.makers) for s in slow.stages]


@pytest.mark.parametrize("spec, layout, source_variant, variant, overrides",
                         [c for c in _cases() if "fp8" not in c.values[0] and c.values[0] not in LOSSY_SPECS])
def test_forward_then_inverse_is_the_identity(spec, layout, source_variant, variant, overrides):
    """Bit-exact on data that keeps the spec's claims. One round trip projects random data onto
    those claims (zeroes what is claimed zero or unused, copies what is claimed redundant); from
    there, forward then inverse must give it back exactly, and the forward output must not move."""
    config, tensors = _source(layout, source_variant, overrides)
    forward_spec = load_spec(spec)
    inverse_spec = invert_spec(forward_spec)
    x0 = random_tensors(tensors)

    def round_trip(data):
        forward = build_plan(forward_spec, types_of(data), config, variant=variant, source_variant=source_variant)
        out = run_plan(forward, data)
        back = build_plan(inverse_spec, types_of(out), forward.target_config, source_variant=variant)
        return out, run_plan(back, out), back

    y0, x1, back = round_trip(x0)
    y1, x2, _ = round_trip(x1)
    # A low-rank factorization goes back through an SVD: its factors are one of many exact ones,
    # and its product is exact to float rounding; everything else, to the bit.
    factored = _low_rank_tensors(forward_spec, x1, y0)
    assert y1.keys() == y0.keys() and all(np.array_equal(y1[k], y0[k]) for k in y0 if k not in factored)
    for k in factored & set(y0):  # within a few roundings of the dtype (bf16 keeps 8 bits)
        a, b = y0[k].astype(np.float32), y1[k].astype(np.float32)
        eps = 2.0**-8 if y0[k].dtype != np.float32 else 2.0**-23
        assert np.abs(a - b).max() <= 16 * eps * np.abs(a).max(), k
    assert x2.keys() == x1.keys() and all(np.array_equal(x2[k], x1[k]) for k in x1 if k not in factored)
    lossless = not any(loss.claim in ("zero", "unused", "redundant") for stage in back.stages for _, loss in stage.losses)
    if spec.startswith("hf-to"):  # pure rearrangements: the identity on any data (but the MTP layer)
        kept = {k for k in x0 if k in x1}
        assert all(np.array_equal(x1[k], x0[k]) for k in kept)
        assert set(x0) - kept == {k for k in x0 if k.startswith(f"model.layers.{config['num_hidden_layers']}.")}
    assert lossless or spec.startswith("scratch")


@pytest.mark.parametrize("overrides", HF_CONFIGS.values(), ids=list(HF_CONFIGS))
def test_fp8_requantization_is_a_projection(overrides):
    """bf16 -> hf-to-hf-fp8 -> its inverse (dequantize) -> hf-to-hf-fp8 again: the second FP8
    checkpoint is the first bit for bit, and so is the bf16 after it (one round trip lands on a
    fixed point). The inverse computes exactly what hf-fp8-to-hf does."""
    config, tensors = _source("hf", "bf16-mtp", {**overrides, "num_nextn_predict_layers": 1})
    quantize, dequantize = load_spec("hf-to-hf-fp8"), invert_spec(load_spec("hf-to-hf-fp8"))

    def forward(data):
        plan = build_plan(quantize, types_of(data), config, source_variant="bf16-mtp")
        return run_plan(plan, data), plan.target_config

    def back(data, fp8_config):
        plan = build_plan(dequantize, types_of(data), fp8_config, source_variant="fp8-mtp")
        ours = run_plan(plan, data)
        official = run_plan(build_plan(load_spec("hf-fp8-to-hf"), types_of(data), fp8_config,
                                       source_variant="fp8-mtp"), data)
        assert ours.keys() == official.keys() and all(np.array_equal(ours[k], official[k]) for k in ours)
        return ours

    x0 = random_tensors(tensors)
    q1, fp8_config = forward(x0)
    x1 = back(q1, fp8_config)
    q2, _ = forward(x1)
    x2 = back(q2, fp8_config)
    assert q2.keys() == q1.keys() and all(np.array_equal(q2[k].view(np.uint8), q1[k].view(np.uint8)) for k in q1)
    assert all(np.array_equal(x2[k], x1[k]) for k in x1)
    assert {k for k in x0 if not np.array_equal(x1[k].astype(np.float32), x0[k].astype(np.float32))} == {
        k.removesuffix("_scale_inv") for k in q1 if k.endswith("weight_scale_inv")}  # only what was quantized


@pytest.mark.parametrize("spec", sorted({s for s, layout, *_ in CASES if layout == "hf"}))
def test_an_mtp_layer_is_kept_only_where_asked_and_the_target_has_a_place(spec):
    """Every spec reading hf accounts for an MTP layer: an hf target keeps it unless `--param
    mtp=false`; any other target drops it, with a claim and a reason."""
    variant = "fp8-mtp" if spec.startswith("hf-fp8") else "bf16-mtp"
    config, tensors = _source("hf", variant, {"num_nextn_predict_layers": 1})
    loaded = load_spec(spec)
    mtp = {n for n in tensors if n.startswith(f"model.layers.{config['num_hidden_layers']}.")}
    runs = [({}, loaded.target_layout == "hf")]
    if any("mtp" in part.params for part in loaded.parts or (loaded,)):
        runs.append(({"mtp": False}, False))
    for params, kept in runs:
        plan = build_plan(loaded, tensors, config, params=params, source_variant=variant)
        report = build_report(plan)
        assert report.ok, report.problems
        fates = plan.fates()
        assert {fates[n] for n in mtp} == ({("used", None)} if kept else {("dropped", "unused")})
        dropped = [d for d in report.to_dict()["dropped"] if d["name"] in mtp]
        assert bool(dropped) != kept and all("MTP" in d["reason"] for d in dropped)


def test_inverted_config_restores_the_scratch_config():
    config, tensors = _source("scratch", None, {})
    forward = build_plan(load_spec("scratch-to-hf"), tensors, config)
    outputs = {o.name: TensorType(o.shape, o.dtype) for o in forward.outputs}
    back = build_plan(invert_spec(load_spec("scratch-to-hf")), outputs, forward.target_config)
    from remap.layouts import get_layout
    scratch = get_layout("scratch")
    assert scratch.read_config(back.target_config) == scratch.read_config(config)
    assert {o.name: o.shape for o in back.outputs} == {n: t.shape for n, t in tensors.items()}


SPEC_HEAD = "remap: 1\nname: t\nfrom: hf\nto: mlx\nrules:\n"


def _plan(rules: str, **kw):
    config, tensors = _source("hf", "bf16", {})
    return build_plan(parse_spec(SPEC_HEAD + rules, "t.yaml"), tensors, config, **kw)


@pytest.mark.parametrize("rules, message", [
    ("  - {to: a, from: model.norm.weight}\n  - {to: b, from: model.norm.weight}\n", "matched by two rules"),
    ("  - {to: a, from: model.norm.weight}\n  - {to: a, from: lm_head.weight}\n", "written by two rules: rules[0] a and this one"),
    ("  - {to: [a, a], from: [model.norm.weight, lm_head.weight]}\n", "written by two rules: rules[0] a a and this one"),
    ("  - {to: a, from: [model.norm.weight, nope.weight]}\n", "'nope.weight' is missing"),
    ("  - {to: a, from: model.norm.weight}\n  - {drop: model.norm.weight, claim: zero, reason: r}\n", "both dropped and used"),
    ("  - to: a\n    from: [model.norm.weight, lm_head.weight]\n    ops: [{op: concat}]\n", "differ off that axis"),
    ("  - to: a\n    from: [model.embed_tokens.weight, lm_head.weight]\n    ops: [{op: concat, sizes: [64, 32]}]\n", "expected [64, 32]"),
    ("  - to: a\n    from: model.norm.weight\n    ops: [{op: split_heads, heads: nonsense}]\n", "unknown name 'nonsense'"),
    ("  - to: a\n    from: model.norm.weight\n    ops: [{op: split_heads, heads: 1 // 0}]\n", "division by zero"),
    ("  - to: a\n    from: model.norm.weight\n    ops: [{op: split_heads, heads: 5}]\n", "does not split into 5 heads"),
    ("  - {to: a, from: model.norm.weight}\n    ops: []\n", None),
])
def test_plan_time_errors_name_file_line_and_rule(rules, message):
    if message is None:
        with pytest.raises(RemapError):  # YAML structure error: still a clean RemapError
            _plan(rules)
        return
    with pytest.raises(RemapError) as info:
        _plan(rules)
    text = str(info.value)
    assert message in text and "t.yaml:" in text and "rules[" in text


def test_stack_requires_every_index():
    config, tensors = _source("hf", "bf16", {})
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    with pytest.raises(RemapError, match="index 2 is missing"):
        build_plan(load_spec("hf-to-mlx"), tensors, config)


def test_unmatched_tensor_makes_the_report_fail():
    config, tensors = _source("hf", "bf16", {})
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = TensorType((4,), "F32")
    report = build_report(build_plan(load_spec("hf-to-mlx"), tensors, config))
    assert not report.ok and report.unmatched == ["model.layers.0.self_attn.rotary_emb.inv_freq"]


def test_unknown_parameter_and_variant_are_errors():
    with pytest.raises(RemapError, match="unknown parameter 'tp'"):
        _plan("  - {to: a, from: model.norm.weight}\n", params={"tp": 2})
    with pytest.raises(RemapError, match="no variant 'int4'"):
        _plan("  - {to: a, from: model.norm.weight}\n", variant="int4")


def test_dtype_option_casts_float_outputs_and_names_the_rounding():
    config, tensors = _source("hf", "bf16", {})
    tensors = {n: TensorType(t.shape, "F32") for n, t in tensors.items()}
    plan = build_plan(load_spec("hf-to-mlx"), tensors, config, dtype="bf16")
    assert {o.dtype for o in plan.outputs} == {"BF16"}
    assert {loss.claim for _, loss in plan.last.losses} == {"rounding"}


def test_a_stack_names_the_first_element_unlike_the_first():
    config, tensors = _source("hf", "bf16", {})
    tensors["model.layers.1.mlp.experts.2.up_proj.weight"] = TensorType((16, 33), "BF16")
    tensors["model.layers.1.mlp.experts.3.up_proj.weight"] = TensorType((16, 32), "F32")  # (the second unlike one)
    with pytest.raises(RemapError, match=r"cannot stack 'model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight' \[16, 33\] "
                                         r"with 'model\.layers\.1\.mlp\.experts\.0\.up_proj\.weight' \[16, 32\]"):
        build_plan(load_spec("hf-to-mlx"), tensors, config)
    tensors["model.layers.1.mlp.experts.2.up_proj.weight"] = TensorType((16, 32), "BF16")
    with pytest.raises(RemapError, match=r"cannot stack 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight' \[16, 32\]"):
        build_plan(load_spec("hf-to-mlx"), tensors, config)  # a dtype unlike the first's


def test_a_stack_reading_a_source_another_rule_used_names_it():
    rules = ("  - {to: a, from: model.layers.1.mlp.experts.2.up_proj.weight}\n"
             "  - to: 'model.layers.{i}.mlp.switch_mlp.up_proj.weight'\n"
             "    from: 'model.layers.{i}.mlp.experts.{e}.up_proj.weight'\n"
             "    stack: e\n")
    with pytest.raises(RemapError, match=r"source tensor 'model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight' is matched by two rules"):
        _plan(rules)


def test_records_built_in_columns_are_the_records_made_one_by_one():
    from itertools import repeat

    from remap.plan import Output, Step
    from remap.records import built

    outputs = built(Output, 2, name=["a", "b"], shape=[(2, 3), ()], dtype=repeat("BF16"))
    assert outputs == [Output("a", (2, 3), "BF16"), Output("b", (), "BF16")] and outputs[0].nbytes == 12
    steps = built(Step, 1, rule=["r"], outputs=[tuple(outputs)], groups=[(("x",),)], ops=[()], stacked=[True],
                  take=[None], fill=[None], losses=[()])
    assert steps == [Step(rule="r", outputs=tuple(outputs), groups=(("x",),), stacked=True)] and steps[0].sources == ["x"]
    with pytest.raises(TypeError, match="fields"):
        built(Output, 1, name=["a"], shape=[()])  # a field left out is no default here


def test_one_value_is_every_value_equal_to_the_first():
    from remap.records import one_value

    shape = (4, 8)
    assert one_value([]) and one_value([7]) and one_value([shape, tuple([4, 8]), shape])
    assert not one_value([1, 1, 2]) and not one_value(["BF16", "F32"]) and not one_value([2, 1, 1])

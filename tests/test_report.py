"""The report command: JSON against its schema, Markdown, collapsing, --check-data magnitudes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema
import pytest

from remap import api
from remap.names import collapse, format_indices, template
from remap.planner import build_plan
from remap.report import build_report
from remap.spec.load import SCHEMAS, load_spec
from tests.helpers import SCRATCH_BASE, layout_tensors, random_tensors, scratch_compatible

SCHEMA = json.loads((SCHEMAS / "report.schema.json").read_text())


def remap(*args):
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "remap.cli", *map(str, args)], capture_output=True, text=True, env=env)


def test_json_report_matches_its_schema_and_the_exit_code(tiny_hf, tmp_path):
    run = remap("report", tiny_hf, "--spec", "hf-to-mlx", "--json", tmp_path / "r.json", "--markdown", tmp_path / "r.md")
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["ok"] and report["coverage"]["unmatched"] == 0
    markdown = (tmp_path / "r.md").read_text()
    assert "**OK**" in markdown and "`model.layers.{1..2}.mlp.switch_mlp.gate_proj.weight`" in markdown


def test_report_exit_1_when_target_layout_is_not_met(tiny_hf, tmp_path):
    spec = tmp_path / "partial.yaml"
    spec.write_text("remap: 1\nname: partial\nfrom: hf\nto: mlx\nrules:\n"
                    "  - {to: model.embed_tokens.weight, from: model.embed_tokens.weight}\n")
    run = remap("report", tiny_hf, "--spec", spec, "--json", tmp_path / "r.json")
    assert run.returncode == 1
    report = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["missing"] and report["unmatched"] and not report["ok"]


def test_collapsed_names_are_exact_and_readable():
    names = [f"model.layers.{i}.mlp.experts.{e}.w" for i in (1, 2, 3) for e in range(4)] + ["model.layers.5.mlp.experts.0.w"]
    (name, members), = [g for g in collapse(names, lambda n: n) if len(g[1]) > 1] or [(None, [])]
    assert name == "model.layers.{1,2,3,5}.mlp.experts.{0..3}.w" and len(members) == 13
    assert format_indices([4, 2, 3]) == "{2..4}" and format_indices([7]) == "7"
    assert template("layers.10.w1.weight") == ("layers.#.w1.weight", (10,))  # w1 is a name, not an index


def _scratch_plan(data_overrides):
    config = {**SCRATCH_BASE, "mtp_num_heads": 1}
    types = layout_tensors("scratch", config, float_dtype="F32")
    data = random_tensors(types, seed=1)
    scratch_compatible(data, config)
    data_overrides(data)
    plan = build_plan(load_spec("scratch-to-mlx"), types, config)
    return build_report(plan, api.check_data(plan, data.__getitem__))


def test_check_data_finds_nothing_lossy_in_a_compatible_checkpoint():
    report = _scratch_plan(lambda data: None)
    assert report.ok, report.problems
    assert all(loss.holds in (True, None) for loss in report.losses)
    assert all(loss.magnitude == 0 for loss in report.losses if loss.claim in ("zero", "redundant"))


def test_check_data_names_every_broken_claim_with_its_magnitude():
    def train(data):
        data["wpe.weight"][...] = 0.5
        data["h.1.mlp.experts.2.up_proj.bias"][...] = 0.25
        data["h.0.attn.k_rope_proj.weight"][-1, 0] += 2.0

    report = _scratch_plan(train)
    assert not report.ok
    broken = {loss.rule.split(" ", 1)[1]: loss.magnitude for loss in report.losses if loss.holds is False}
    rope = "kv_a_proj_with_mqa = kv_proj + the first head's rope key (pairs interleaved)"
    assert set(broken) == {"learned positions", "routed expert biases", rope}
    assert broken["learned positions"] == pytest.approx(0.5)
    assert broken["routed expert biases"] == pytest.approx(0.25)
    assert broken[rope] == pytest.approx(2.0, abs=0.1)  # the +2 on one head, against head 0


def test_full_deepseek_v2_standin_plans_to_mlx_with_every_tensor_accounted_for(tmp_path, monkeypatch):
    """bench/full_v2_standin.py: DeepSeek-V2 (236B) as 55 header-only files. `remap report --spec
    hf-to-mlx --no-check-data` plans all 29,102 tensors into mlx-lm's deepseek_v2 (959: experts
    stacked, kv_b_proj kept) and meets its layout."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import full_v2_standin

    full_v2_standin.main(tmp_path / "v2")
    run = remap("report", tmp_path / "v2", "--spec", "hf-to-mlx", "--no-check-data", "--json", tmp_path / "r.json")
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(report, SCHEMA)
    coverage = {k: report["coverage"][k] for k in ("source_tensors", "used", "dropped", "unmatched", "target_tensors")}
    assert report["ok"] and not report["missing"]
    assert coverage == {"source_tensors": 29102, "used": 29102, "dropped": 0, "unmatched": 0, "target_tensors": 959}
    assert report["coverage"]["source_bytes"] == report["coverage"]["target_bytes"] > 470e9

"""`--to LAYOUT` picks the bundled spec for what the source is, and a `--spec` that does not fit the
source is refused in one line naming what the source is and the spec that fits."""

from __future__ import annotations

import json
from pathlib import Path
from tests.helpers import remap

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"



def _weights(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.safetensors"))}


def test_to_mlx_converts_the_fp8_fixture_as_its_fp8_spec_does(tmp_path):
    picked = remap("convert", FIXTURES / "hf-fp8-mtp", tmp_path / "to", "--to", "mlx", "--quiet")
    assert picked.returncode == 0, picked.stderr
    named = remap("convert", FIXTURES / "hf-fp8-mtp", tmp_path / "spec", "--spec", "hf-fp8-to-mlx", "--quiet")
    assert named.returncode == 0, named.stderr
    recipe = json.loads((tmp_path / "to" / "remap-manifest.json").read_text())["recipe"]
    assert (recipe["spec"], recipe["inverse"]) == ("hf-fp8-to-mlx", False)
    weights = _weights(tmp_path / "to")
    assert weights and weights == _weights(tmp_path / "spec")
    assert b"weight_scale_inv" not in b"".join(weights.values()) and b"switch_mlp" in b"".join(weights.values())


def test_to_picks_the_route_of_each_source_layout():
    """bf16 hf -> hf-to-mlx (not the FP8 route, which would also read it); an mlx checkpoint to hf
    runs hf-to-mlx backwards; -q appends the quantizing stage to the picked route."""
    cases = {("hf-bf16", "mlx"): "hf-to-mlx", ("mlx", "hf"): "hf-to-mlx.inverse",
             ("hf-fp8-mtp", "mlx"): "hf-fp8-to-mlx", ("hf-bf16", "deepseek"): "hf-to-deepseek"}
    for (fixture, target), spec in cases.items():
        run = remap("report", FIXTURES / fixture, "--to", target, "--json", "-")
        assert run.returncode == 0, (fixture, run.stderr)
        assert json.loads(run.stdout)["spec"] == spec, fixture
    quantized = json.loads(remap("report", FIXTURES / "hf-fp8-mtp", "--to", "mlx", "-q", "--json").stdout)
    assert quantized["spec"] == "hf-fp8-to-mlx+4bit" and quantized["ok"]


def test_to_names_the_choices_where_two_routes_fit():
    run = remap("report", FIXTURES / "scratch-compatible", "--to", "mlx")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1
    assert "is scratch (default)" in run.stderr
    assert "--spec scratch-to-mlx-exact" in run.stderr and "--spec scratch-to-mlx" in run.stderr


def test_quantizing_an_mlx_model_picks_the_route_that_quantizes_once(tmp_path):
    """-q from mlx: mlx-quantize would quantize twice and mlx-dequantize --inverse is the same spec,
    so mlx-dequantize (nothing to undo on float weights) plus the quantizing stage; without -q,
    mlx -> mlx stays a choice. A model quantized already is refused, as mlx_lm.convert refuses it."""
    report = json.loads(remap("report", FIXTURES / "mlx", "-q", "--json", "-").stdout)
    assert report["spec"] == "mlx-dequantize+4bit" and report["ok"]
    assert remap("report", FIXTURES / "mlx", "--to", "mlx").returncode == 2
    assert remap("convert", FIXTURES / "mlx", tmp_path / "q4", "-q", "--quiet").returncode == 0
    again = remap("convert", tmp_path / "q4", tmp_path / "q8", "-q", "--q-bits", "8")
    assert again.returncode == 2 and "is quantized already" in again.stderr and "--spec mlx-dequantize" in again.stderr
    assert not (tmp_path / "q8").exists()


def test_fp8_source_with_the_bf16_spec_is_refused_naming_the_fp8_one():
    for command in (["report"], ["convert", "/nonexistent-dir/out", "--dry-run"], ["parity"]):
        run = remap(*command[:1], FIXTURES / "hf-fp8-mtp", *command[1:], "--spec", "hf-to-mlx")
        assert run.returncode == 2, (command, run.stderr)
        assert run.stdout == "" and run.stderr.count("\n") == 1, (command, run.stdout, run.stderr)
        line = run.stderr
        assert line.startswith("error: ") and "is hf (fp8-mtp)" in line and "--spec hf-fp8-to-mlx" in line, line
        assert "dtype: expected float" not in line.split("(expected")[1]


def test_wrong_layout_source_is_refused_naming_the_specs_that_read_it():
    run = remap("report", FIXTURES / "scratch-compatible", "--spec", "hf-to-mlx")
    assert run.returncode == 2 and run.stdout == "" and run.stderr.count("\n") == 1
    assert "is scratch (default), not hf as hf-to-mlx reads" in run.stderr
    assert "--spec scratch-to-mlx-exact or scratch-to-mlx" in run.stderr
    already = remap("convert", FIXTURES / "mlx", "/nonexistent-dir/out", "--spec", "hf-to-mlx")
    assert already.returncode == 2 and already.stderr.count("\n") == 1
    assert "is mlx (embed_q) already" in already.stderr and "hf-to-mlx --inverse" in already.stderr


def test_spec_wins_over_to_and_must_agree_with_it():
    run = remap("report", FIXTURES / "hf-bf16", "--to", "mlx", "--spec", "hf-fp8-to-mlx", "--json", "-")
    assert run.returncode == 0 and json.loads(run.stdout)["spec"] == "hf-fp8-to-mlx"
    clash = remap("report", FIXTURES / "hf-bf16", "--to", "hf", "--spec", "hf-to-mlx")
    assert clash.returncode == 2 and "writes mlx, not --to hf" in clash.stderr


def test_to_and_spec_are_checked_before_any_work(tmp_path):
    bad = remap("convert", tmp_path / "missing", tmp_path / "out", "--to", "onnx")
    assert bad.returncode == 2 and "--to 'onnx'" in bad.stderr and "hf, mlx, scratch or deepseek" in bad.stderr
    none = remap("report", FIXTURES / "hf-bf16")
    assert none.returncode == 2 and "--spec SPEC, or --to LAYOUT" in none.stderr

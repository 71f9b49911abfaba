"""`remap invert` writes an inverse only where it runs on the layout it claims to read: one that
matches nothing (mlx-quantize's) or reads only the forward spec's own output (scratch-to-hf's,
which needs config keys scratch-to-hf records) is refused in one line, and each refusal is true."""

from __future__ import annotations

import json
from pathlib import Path
from tests.helpers import remap

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"



def test_an_inverse_that_matches_nothing_is_refused_and_it_really_matches_nothing(tmp_path):
    run = remap("invert", "mlx-quantize", "-o", tmp_path / "inverse.yaml")
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and not (tmp_path / "inverse.yaml").exists()
    assert run.stderr.startswith("error: mlx-quantize.inverse cannot run: on what mlx-quantize writes: ")
    # what it says, on a real quantized checkpoint: the inverse does not fit it, mlx-dequantize does
    assert remap("convert", FIXTURES / "mlx", tmp_path / "q", "--spec", "mlx-quantize", "--quiet").returncode == 0
    back = remap("report", tmp_path / "q", "--spec", "mlx-quantize", "--inverse", "--no-check-data")
    assert back.returncode == 2 and "mlx-quantize.inverse does not fit it" in back.stderr
    assert "--spec mlx-dequantize" in back.stderr


def test_an_inverse_that_reads_only_its_forward_output_says_so_and_runs_there(tmp_path):
    run = remap("invert", "scratch-to-hf")
    assert run.returncode == 2 and run.stdout == "" and run.stderr.count("\n") == 1
    assert "reads only what scratch-to-hf writes, not a plain hf checkpoint" in run.stderr
    assert "scratch_q_lora_rank" in run.stderr and "remap convert --spec scratch-to-hf --inverse" in run.stderr
    # on scratch-to-hf's own output, its inverse plans; on a plain hf checkpoint it does not
    assert remap("convert", FIXTURES / "scratch-compatible", tmp_path / "hf", "--spec", "scratch-to-hf",
                 "--allow-lossy", "--quiet").returncode == 0
    assert remap("report", tmp_path / "hf", "--spec", "scratch-to-hf", "--inverse", "--no-check-data").returncode == 0
    assert remap("report", FIXTURES / "hf-bf16", "--spec", "scratch-to-hf", "--inverse").returncode == 2


def test_an_inverse_that_runs_is_written_and_converts_the_layout_it_reads(tmp_path):
    run = remap("invert", "hf-to-mlx", "-o", tmp_path / "mlx-to-hf.yaml")
    assert run.returncode == 0, run.stderr
    back = remap("report", FIXTURES / "mlx", "--spec", tmp_path / "mlx-to-hf.yaml", "--json", "-")
    assert back.returncode == 0 and json.loads(back.stdout)["ok"]
    assert remap("invert", "hf-to-deepseek").returncode == 0

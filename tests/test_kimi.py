"""Kimi-K2 as Moonshot releases it (model_type kimi_k2: DeepSeek-V3's architecture under its own
name, yarn rope scaling, FP8): detected as hf, converted to what mlx-lm's own converter writes,
run by mlx-lm as transformers' DeepseekV3ForCausalLM runs the same weights, its rope scaling
carried into the output and read there; and the full-size 1T model planned from headers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from remap import api
from remap.layouts.hf import ARCHITECTURE_OF
from remap.layouts.hf import LAYOUT as HF
from tests.fp8_checkpoints import KIMI_K2, write_kimi

ROOT = Path(__file__).resolve().parents[1]
IDS = np.array([[0, 5, 9, 2, 77, 140, 33, 260, 12, 8, 199, 41, 3, 90, 15, 222]])


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "remap.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    root = tmp_path_factory.mktemp("kimi")
    return {"bf16": write_kimi(root / "bf16"), "fp8": write_kimi(root / "fp8", fp8=True)}


def test_kimi_is_a_model_type_mlx_lm_runs_as_deepseek_v3_and_transformers_has_no_class_for():
    from mlx_lm.utils import MODEL_REMAPPING
    from transformers import CONFIG_MAPPING, Kimi_K25Config

    from remap.layouts.mlx import MODEL_TYPES as MLX_MODEL_TYPES

    assert set(ARCHITECTURE_OF) == {t for t, a in MODEL_REMAPPING.items() if a == "deepseek_v3"}
    assert set(ARCHITECTURE_OF.values()) == {"deepseek_v3"} and set(ARCHITECTURE_OF) <= set(MLX_MODEL_TYPES)
    assert not set(ARCHITECTURE_OF) & set(CONFIG_MAPPING)
    # transformers' own Kimi-K2.5 reads its kimi_k2 text model as DeepSeek-V3
    assert Kimi_K25Config(text_config=dict(KIMI_K2)).text_config.model_type == "deepseek_v3"


def test_hf_reads_kimi_as_transformers_reads_it_as_deepseek_v3():
    from transformers import DeepseekV3Config

    ours = HF.read_config(KIMI_K2)
    assert ours == {**HF.read_config({**KIMI_K2, "model_type": "deepseek_v3"}), "model_type": "kimi_k2"}
    theirs = DeepseekV3Config(**{k: v for k, v in KIMI_K2.items() if k not in ("model_type", "auto_map")})
    compared = [k for k in ours if hasattr(theirs, k) and k not in ("model_type", "moe_layer_freq", "quantization_config")]
    assert len(compared) >= 20 and {k: ours[k] for k in compared} == {k: getattr(theirs, k) for k in compared}
    # transformers 5 turns the legacy rope_scaling into rope_parameters: the scaling is read
    assert theirs.rope_parameters == {**KIMI_K2["rope_scaling"], "rope_type": "yarn", "rope_theta": 50000.0}


@pytest.mark.parametrize("variant", ["bf16", "fp8"])
def test_inspect_detects_kimi(kimi, variant):
    run = cli("inspect", kimi[variant])
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"layout: hf ({variant})" in run.stdout and "model_type=kimi_k2" in run.stdout


def _mlx_lm_convert(source: Path, out: Path, monkeypatch, **options) -> Path:
    """mlx_lm.convert, but for its tokenizer: transformers' AutoTokenizer builds the model's config
    first and cannot for kimi_k2 without Moonshot's remote code (test below), so the fixtures'
    tokenizer is loaded by its own class. Weights and config.json are mlx-lm's doing."""
    from mlx_lm import convert as mlx_convert
    from mlx_lm import tokenizer_utils
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setattr(tokenizer_utils, "AutoTokenizer", PreTrainedTokenizerFast)
    mlx_convert(hf_path=str(source), mlx_path=str(out), dtype="bfloat16", **options)
    return out


def test_mlx_lm_convert_cannot_load_kimis_tokenizer_without_moonshots_code(kimi, tmp_path):
    from mlx_lm import convert as mlx_convert

    with pytest.raises((ValueError, AttributeError)):
        mlx_convert(hf_path=str(kimi["bf16"]), mlx_path=str(tmp_path / "mlx"), dtype="bfloat16")


@pytest.mark.parametrize("variant, spec", [("bf16", "hf-to-mlx"), ("fp8", "hf-fp8-to-mlx")])
def test_kimi_converts_to_what_mlx_lm_convert_writes(kimi, tmp_path, monkeypatch, variant, spec):
    """Tensors byte for byte, the model type and the yarn scaling kept; the FP8 quantization_config
    is gone from ours (mlx-lm's convert leaves it in, over dequantized weights)."""
    run = cli("convert", kimi[variant], tmp_path / "ours", "--spec", spec, "--quiet")
    assert run.returncode == 0, run.stdout + run.stderr
    theirs = _mlx_lm_convert(kimi[variant], tmp_path / "theirs", monkeypatch)
    a, b = api.open_source(tmp_path / "ours"), api.open_source(theirs)
    assert set(a.tensors) == set(b.tensors)
    assert [n for n in b.tensors if bytes(a.read_bytes(n)) != bytes(b.read_bytes(n))] == []
    ours, their_config = (json.loads((p / "config.json").read_text()) for p in (tmp_path / "ours", theirs))
    assert {k: v for k, v in their_config.items() if k != "quantization_config"} == ours
    assert ours["model_type"] == "kimi_k2" and ours["rope_scaling"] == KIMI_K2["rope_scaling"]
    assert ours["rope_theta"] == KIMI_K2["rope_theta"] and "quantization_config" not in ours


def test_kimi_quantizes_to_what_mlx_lm_convert_q_writes_and_returns_to_hf_byte_for_byte(kimi, tmp_path, monkeypatch):
    run = cli("convert", kimi["bf16"], tmp_path / "q4", "--spec", "hf-to-mlx", "--quiet", "--quantize", "4")
    assert run.returncode == 0, run.stdout + run.stderr
    theirs = _mlx_lm_convert(kimi["bf16"], tmp_path / "theirs", monkeypatch, quantize=True, q_bits=4)
    a, b = api.open_source(tmp_path / "q4"), api.open_source(theirs)
    assert set(a.tensors) == set(b.tensors)
    assert [n for n in b.tensors if bytes(a.read_bytes(n)) != bytes(b.read_bytes(n))] == []
    assert cli("convert", kimi["bf16"], tmp_path / "mlx", "--spec", "hf-to-mlx", "--quiet").returncode == 0
    assert cli("convert", tmp_path / "mlx", tmp_path / "hf", "--spec", "mlx-to-hf", "--quiet").returncode == 0
    back, source = api.open_source(tmp_path / "hf"), api.open_source(kimi["bf16"])
    assert set(back.tensors) == set(source.tensors)
    assert [n for n in source.tensors if bytes(back.read_bytes(n)) != bytes(source.read_bytes(n))] == []


def _converted(source: Path, spec: str, out: Path) -> Path:
    plan, checkpoint = api.plan(source, spec)
    api.convert(plan, checkpoint, out)
    return out


@pytest.mark.parametrize("case", ["bf16", "fp8", "yarn from 8 positions"])
def test_mlx_lm_runs_kimi_as_transformers_deepseek_v3(kimi, tmp_path, case):
    """remap's parity: transformers' DeepseekV3ForCausalLM on the source (FP8: on its hf-fp8-to-hf
    dequantization, the same bf16 values) against mlx-lm on the conversion, 32 tokens. Yarn from 8
    positions puts the scaled frequencies to work on every one of them."""
    from remap.parity import run_parity

    if case == "fp8":
        source = _converted(kimi["fp8"], "hf-fp8-to-hf", tmp_path / "bf16")
        result = run_parity(source, _converted(kimi["fp8"], "hf-fp8-to-mlx", tmp_path / "mlx"))
    else:
        source = kimi["bf16"] if case == "bf16" else write_kimi(
            tmp_path / "src", rope_scaling={**KIMI_K2["rope_scaling"], "original_max_position_embeddings": 8})
        result = run_parity(source, spec="hf-to-mlx")
    assert result.source.runtime.endswith("DeepseekV3ForCausalLM") and "deepseek_v3" in result.target.runtime
    assert result.ok and result.logits["max_abs"] < 1e-4, result.to_dict()


def _mlx_logits(path: Path) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    model.set_dtype(mx.float32)  # MLX on CPU runs the MoE gather-matmul in float32 only
    return np.array(model(mx.array(IDS)))


@pytest.mark.parametrize("scaling", [None, {**KIMI_K2["rope_scaling"], "original_max_position_embeddings": 8}])
def test_mlx_lm_reads_the_rope_scaling_it_is_given(kimi, tmp_path, scaling):
    """The same weights with only rope_scaling changed (none; yarn from 8 positions, not 4096)
    give other logits in mlx-lm: the scaling in the converted config.json is what it runs."""
    base = _mlx_logits(_converted(kimi["bf16"], "hf-to-mlx", tmp_path / "yarn"))
    other = _converted(write_kimi(tmp_path / "src", rope_scaling=scaling), "hf-to-mlx", tmp_path / "other")
    assert json.loads((other / "config.json").read_text()).get("rope_scaling") == scaling
    assert np.abs(_mlx_logits(other) - base).max() > 1e-2


def test_the_full_kimi_k2_plans_from_headers(tmp_path):
    """The release's 139,583 tensors; a stand-in of its first three layers (every expert, all
    shapes of the full model) reports with hf-fp8-to-mlx, every tensor accounted for. The full
    stand-in (bench/full_v3_standin.py --model kimi-k2) reports the same in ~25 s."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from full_v3_standin import KIMI_K2 as FULL, write_standin
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert len(HF.expected(HF.read_config(FULL), "fp8")) == 139583
    write_standin(tmp_path / "src", {**FULL, "num_hidden_layers": 3}, "fp8", 4)
    run = cli("report", tmp_path / "src", "--spec", "hf-fp8-to-mlx", "--no-check-data", "--json", tmp_path / "r.json")
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and not report["unmatched"] and not report["missing"]
    # one dense layer (attention 12, norms 2, MLP 6), two MoE layers (+ router 2, experts, shared 6)
    assert report["coverage"]["source_tensors"] == report["coverage"]["used"] == 20 + 2 * (12 + 2 + 2 + 384 * 6 + 6) + 3

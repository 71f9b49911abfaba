"""Every bundled spec converts every fixture it applies to, and the real runtimes load the result:
mlx-lm loads and generates from MLX outputs, transformers loads HF outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from remap import api
from remap.io.writer import sha256_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MATRIX = [
    ("hf-bf16", "hf-to-mlx", "embed_q"),
    ("hf-bf16", "hf-to-mlx", "kv_b_proj"),
    ("hf-bf16", "hf-to-deepseek", None),
    ("hf-fp8-mtp", "hf-fp8-to-hf", None),
    ("hf-fp8-mtp", "hf-fp8-to-mlx", "embed_q"),
    ("hf-fp8-mtp", "hf-fp8-to-mlx", "kv_b_proj"),
    ("scratch-compatible", "scratch-to-hf", None),
    ("scratch-compatible", "scratch-to-mlx", "embed_q"),
    ("scratch-compatible", "scratch-to-mlx", "kv_b_proj"),
    ("scratch-trained", "scratch-to-hf", None),
    ("scratch-trained", "scratch-to-mlx", "embed_q"),
]


def test_matrix_covers_every_bundled_spec():
    from remap.spec.load import bundled_specs

    assert {spec for _, spec, _ in MATRIX} == {p.stem for p in bundled_specs()}


def _mlx_generates(path: Path) -> None:
    import mlx.core as mx
    from mlx_lm import generate, load

    model, tokenizer = load(str(path))
    model.set_dtype(mx.float32)  # MLX on CPU runs the MoE gather-matmul in float32 only
    text = generate(model, tokenizer, prompt="remap", max_tokens=3)
    assert isinstance(text, str)
    logits = np.array(model(mx.array([[0, 5, 9, 2]])))
    assert np.isfinite(logits).all() and logits.std() > 0


def _transformers_loads(path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        logits = model(torch.tensor([[0, 5, 9, 2]])).logits
    assert torch.isfinite(logits).all() and logits.std() > 0


@pytest.mark.parametrize("fixture, spec, variant", MATRIX, ids=[f"{f}-{s}-{v}" for f, s, v in MATRIX])
def test_fixture_converts_and_loads(tmp_path, fixture, spec, variant):
    plan, ckpt = api.plan(FIXTURES / fixture, spec, variant=variant)
    report = api.report(plan, ckpt)
    assert report.ok, report.problems
    api.convert(plan, ckpt, tmp_path / "out", report=report.to_dict())
    assert (tmp_path / "out/tokenizer.json").exists()
    target = plan.spec.target_layout
    if target == "mlx":
        _mlx_generates(tmp_path / "out")
    elif target == "hf":
        _transformers_loads(tmp_path / "out")
    else:  # deepseek: no installable runtime; its layout is checked against the plan instead
        assert api.identify(api.open_source(tmp_path / "out")).layout == "deepseek"


def test_mlx_fixture_back_to_hf_is_the_hf_fixture_byte_for_byte(tmp_path):
    """What mlx-lm wrote, run back through the inverted hf-to-mlx, is what transformers wrote."""
    plan, ckpt = api.plan(FIXTURES / "mlx", "hf-to-mlx", inverse=True)
    api.convert(plan, ckpt, tmp_path / "hf")
    assert sha256_file(tmp_path / "hf/model.safetensors") == sha256_file(FIXTURES / "hf-bf16/model.safetensors")


def test_hf_to_mlx_writes_what_mlx_lm_convert_writes(tmp_path):
    """Same tensors, same bytes, as mlx_lm.convert of the same checkpoint."""
    plan, ckpt = api.plan(FIXTURES / "hf-bf16", "hf-to-mlx")
    api.convert(plan, ckpt, tmp_path / "mlx")
    ours, theirs = api.open_source(tmp_path / "mlx"), api.open_source(FIXTURES / "mlx")
    assert set(ours.tensors) == set(theirs.tensors)
    for name in theirs.tensors:
        assert bytes(ours.read_bytes(name)) == bytes(theirs.read_bytes(name)), name

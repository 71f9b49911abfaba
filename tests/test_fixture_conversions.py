"""Every bundled spec converts every fixture it applies to, and the real runtimes load the result:
mlx-lm loads and generates from MLX outputs, transformers loads HF outputs (mlx-lm loads FP8 ones:
transformers needs the accelerate package for those, mlx-lm dequantizes them on load)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from remap import api
from remap.io.hashing import sha256_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MATRIX = [
    ("hf-bf16", "hf-to-mlx", "embed_q"),
    ("hf-bf16", "hf-to-mlx", "kv_b_proj"),
    ("hf-bf16", "hf-to-deepseek", None),
    ("hf-fp8-mtp", "hf-fp8-to-hf", None),
    ("hf-fp8-mtp", "hf-fp8-to-mlx", "embed_q"),
    ("hf-fp8-mtp", "hf-fp8-to-mlx", "kv_b_proj"),
    ("hf-bf16", "hf-to-hf-fp8", None),
    ("hf-v32-bf16", "hf-to-mlx", "embed_q"),
    ("hf-v32-bf16", "hf-to-deepseek", None),
    ("hf-v32-bf16", "hf-to-hf-fp8", None),
    ("scratch-compatible", "scratch-to-hf", None),
    ("scratch-compatible", "scratch-to-mlx", "embed_q"),
    ("scratch-compatible", "scratch-to-mlx", "kv_b_proj"),
    ("scratch-trained", "scratch-to-hf", None),
    ("scratch-trained", "scratch-to-mlx", "embed_q"),
    ("scratch-compatible", "scratch-to-hf-exact", None),
    ("scratch-compatible", "scratch-to-mlx-exact", "embed_q"),
    ("scratch-compatible", "scratch-to-mlx-exact", "kv_b_proj"),
    ("mlx", "mlx-to-hf", None),
    ("mlx", "mlx-quantize", None),
    ("mlx", "mlx-dequantize", None),
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


def _transformers_loads(path: Path, model_class=None) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    if model_class is None:  # the class config.json names (5.23's AutoModelForCausalLM leaves Mistral4 out)
        import transformers

        architecture = json.loads((path / "config.json").read_text())["architectures"][0]
        model_class = getattr(transformers, architecture, AutoModelForCausalLM)
    model, info = model_class.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
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
    target = plan.target_layout
    if target == "mlx" or "quantization_config" in plan.target_config:
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


def test_inverted_spec_file_from_the_cli_converts_mlx_back(tmp_path):
    """`remap invert` writes a spec of its own; converting with that file is the same as --inverse."""
    from tests.test_convert import remap

    remap("invert", "hf-to-mlx", "-o", tmp_path / "mlx-to-hf.yaml")
    remap("convert", FIXTURES / "mlx", tmp_path / "hf", "--spec", tmp_path / "mlx-to-hf.yaml", "--quiet")
    assert sha256_file(tmp_path / "hf/model.safetensors") == sha256_file(FIXTURES / "hf-bf16/model.safetensors")


def test_convert_from_a_hub_repo_in_the_local_cache(tmp_path):
    """A hub id resolves through huggingface_hub's own cache (offline here); the manifest records
    the resolved revision."""
    import json
    import os
    import subprocess
    import sys

    from tests.test_io import make_hub_cache

    commit = "89abcdef0123456789abcdef0123456789abcdef"
    files = {p.name: p.read_bytes() for p in (FIXTURES / "hf-bf16").iterdir()}
    make_hub_cache(tmp_path / "home" / "hub", "deepseek-tiny/hf-bf16", commit, files)
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run([sys.executable, "-m", "remap.cli", "convert", "deepseek-tiny/hf-bf16", str(tmp_path / "mlx"),
                          "--spec", "hf-to-mlx", "--revision", "main", "--quiet"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((tmp_path / "mlx/remap-manifest.json").read_text())
    assert manifest["source"] == "deepseek-tiny/hf-bf16" and manifest["source_revision"] == commit
    assert (tmp_path / "mlx/tokenizer.json").read_bytes() == files["tokenizer.json"]


def test_fp8_dequantization_is_bit_identical_to_mlx_lms(tmp_path):
    """hf-fp8-to-mlx and mlx-lm's own load-time FP8 dequant (its deepseek_v3 sanitize) give the
    same bf16 bits for every tensor."""
    import mlx.core as mx
    from mlx_lm.models import deepseek_v3

    plan, ckpt = api.plan(FIXTURES / "hf-fp8-mtp", "hf-fp8-to-mlx")
    api.convert(plan, ckpt, tmp_path / "ours")
    config = json.loads((FIXTURES / "hf-fp8-mtp/config.json").read_text())
    model = deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(config))
    mtp = f"model.layers.{config['num_hidden_layers']}."  # mlx-lm only drops an MTP layer at index 61
    weights = {k: v for k, v in mx.load(str(FIXTURES / "hf-fp8-mtp/model.safetensors")).items() if not k.startswith(mtp)}
    theirs = model.sanitize(weights)
    ours = api.open_source(tmp_path / "ours")
    assert set(ours.tensors) == set(theirs)
    for name, value in theirs.items():
        expected = np.array(value.astype(mx.float32))
        got = ours.read(name).astype(np.float32)
        assert np.array_equal(got, expected), name


@pytest.mark.parametrize("variant", ["embed_q", "kv_b_proj"])
def test_scratch_to_hf_to_mlx_equals_scratch_to_mlx(tmp_path, variant):
    """Composition: converting in two runs through transformers' layout writes the same MLX bytes
    as the composed scratch-to-mlx in one."""
    for src, spec, dst in ((FIXTURES / "scratch-compatible", "scratch-to-hf", "hf"),
                           (tmp_path / "hf", "hf-to-mlx", "two-runs"),
                           (FIXTURES / "scratch-compatible", "scratch-to-mlx", "one-run")):
        plan, ckpt = api.plan(src, spec, variant=variant if spec != "scratch-to-hf" else None)
        api.convert(plan, ckpt, tmp_path / dst)
    assert sha256_file(tmp_path / "two-runs/model.safetensors") == sha256_file(tmp_path / "one-run/model.safetensors")
    two, one = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("two-runs", "one-run"))
    assert two == one


@pytest.mark.parametrize("fixture, lossy", [("scratch-compatible", set()),
                                            ("scratch-trained", {"learned positions", "shared expert biases",
                                                                 "routed expert biases",
                                                                 "kv_a_proj_with_mqa = kv_proj + the first head's rope key "
                                                                 "(pairs interleaved)"})])
def test_check_data_on_the_scratch_fixtures(fixture, lossy):
    """The trained fixture's report names every lossy step with its magnitude; the compatible one none."""
    plan, ckpt = api.plan(FIXTURES / fixture, "scratch-to-mlx")
    report = api.report(plan, ckpt, check=True)
    broken = {loss.rule.split(" ", 1)[1]: loss.magnitude for loss in report.losses if loss.holds is False}
    assert set(broken) == lossy and all(m > 0.01 for m in broken.values())
    assert report.ok == (not lossy)


def test_mlx_lm_computes_transformers_v32_logits_after_hf_to_mlx(tmp_path):
    """DeepSeek-V3.2's sparse attention, in both runtimes: the prompt is longer than index_topk, so
    each query attends to the keys its indexer picks; a mis-mapped indexer tensor would pick others."""
    import mlx.core as mx
    import torch
    from mlx_lm import load
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = FIXTURES / "hf-v32-bf16"
    plan, ckpt = api.plan(source, "hf-to-mlx")
    api.convert(plan, ckpt, tmp_path / "mlx")
    ids = AutoTokenizer.from_pretrained(source)("The quick brown fox jumps", return_tensors="pt").input_ids
    assert ids.shape[1] > json.loads((source / "config.json").read_text())["index_topk"]
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(ids).logits[0].numpy()
    model, _ = load(str(tmp_path / "mlx"))
    model.set_dtype(mx.float32)  # MLX on CPU runs the MoE gather-matmul in float32 only
    np.testing.assert_allclose(np.array(model(mx.array(ids.numpy()))[0]), theirs, atol=1e-4)


def _converted(source: Path, spec: str, out: Path) -> Path:
    plan, ckpt = api.plan(source, spec)
    api.convert(plan, ckpt, out)
    return out


def test_fp8_fixture_requantized_from_bf16_keeps_every_code(tmp_path):
    """hf-fp8-mtp -> hf-fp8-to-hf -> hf-to-hf-fp8: every e4m3 code and every unquantized tensor comes
    back bit for bit; the scales move by up to 2^-8 relative (the fixture's come from float32
    amaxes, which bf16 cannot hold: docs/specs.md, "Quantization"). The result is a fixed point:
    a second round trip rewrites it byte for byte."""
    import ml_dtypes

    fixture = FIXTURES / "hf-fp8-mtp"
    once = _converted(_converted(fixture, "hf-fp8-to-hf", tmp_path / "bf16"), "hf-to-hf-fp8", tmp_path / "fp8")
    before, after = api.open_source(fixture), api.open_source(once)
    assert set(after.tensors) == set(before.tensors)
    moved = []
    for name in before.tensors:
        a, b = before.read(name), after.read(name)
        if name.endswith("weight_scale_inv"):
            assert np.all(np.abs(b / a - 1) <= 2.0**-8), name
            moved.append(not np.array_equal(a, b))
        else:
            assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8)), name
    assert any(a.dtype == ml_dtypes.float8_e4m3fn for a in map(after.read, after.tensors)) and any(moved)
    twice = _converted(_converted(once, "hf-fp8-to-hf", tmp_path / "bf16-2"), "hf-to-hf-fp8", tmp_path / "fp8-2")
    assert sha256_file(twice / "model.safetensors") == sha256_file(once / "model.safetensors")


def test_bf16_fp8_round_trip_lands_on_a_fixed_point(tmp_path):
    """hf-v32-bf16 -> fp8 -> bf16 -> fp8: the second FP8 file is the first byte for byte (each tile's
    amax is a bf16 value, so its scale survives), the bf16 in between loads in transformers, and the
    report names the quantization loss of every quantized weight, measured within its bound."""
    source = FIXTURES / "hf-v32-bf16"
    plan, ckpt = api.plan(source, "hf-to-hf-fp8")
    report = api.report(plan, ckpt, check=True)
    assert report.ok, report.problems
    [loss] = report.to_dict()["losses"]
    quantized = [n for n, t in api.open_source(source).tensors.items()
                 if n.endswith(("_proj.weight", "wq_b.weight", "wk.weight", "kv_a_proj_with_mqa.weight"))
                 and ".mlp.gate." not in n and "weights_proj" not in n]
    assert loss["claim"] == "quantization" and loss["count"] == len(quantized)
    assert 0 < loss["magnitude"] < 0.1
    api.convert(plan, ckpt, tmp_path / "fp8")
    bf16 = _converted(tmp_path / "fp8", "hf-fp8-to-hf", tmp_path / "bf16")
    again = _converted(bf16, "hf-to-hf-fp8", tmp_path / "fp8-2")
    assert sha256_file(again / "model.safetensors") == sha256_file(tmp_path / "fp8" / "model.safetensors")
    _transformers_loads(bf16)


# -- Mistral4: transformers' fused experts, mlx-lm's mistral4 -------------------------------------


def _same_tensors(ours: Path, theirs: Path) -> None:
    """Same names, dtypes, shapes and bytes, and the format tag of the runtime that wrote `theirs`."""
    from safetensors import safe_open

    a, b = api.open_source(ours), api.open_source(theirs)
    assert set(a.tensors) == set(b.tensors)
    kind = lambda info: (info.dtype, tuple(info.shape))
    assert [n for n in b.tensors if kind(a.tensors[n]) != kind(b.tensors[n])
            or bytes(a.read_bytes(n)) != bytes(b.read_bytes(n))] == []
    formats = [safe_open(path / "model.safetensors", "np").metadata()["format"] for path in (ours, theirs)]
    assert formats[0] == formats[1]


def _mlx_lm_convert(source: Path, out: Path, **options) -> Path:
    from mlx_lm import convert as mlx_convert

    mlx_convert(hf_path=str(source), mlx_path=str(out), dtype="bfloat16", **options)
    return out


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_mistral4_hf_to_mlx_writes_what_mlx_lm_convert_writes_and_comes_back(tmp_path, tiny_mistral4, name):
    """`remap convert --spec hf-to-mlx` of a transformers Mistral4 checkpoint: mlx_lm.convert's tensors
    byte for byte (the fused gate_up_proj cut into switch_mlp gate / up; a tied model without lm_head)
    and its config.json; mlx-to-hf of mlx-lm's own output is transformers' file byte for byte."""
    from transformers import Mistral4ForCausalLM

    from tests.test_convert import remap

    source = tiny_mistral4(name)
    remap("convert", source, tmp_path / "ours", "--spec", "hf-to-mlx", "--quiet")
    theirs = _mlx_lm_convert(source, tmp_path / "theirs")
    _same_tensors(tmp_path / "ours", theirs)
    config = lambda path: json.loads((path / "config.json").read_text())
    assert config(tmp_path / "ours") == config(theirs) == config(source)  # mlx-lm reads rope_parameters itself
    assert ("lm_head.weight" in api.open_source(theirs).tensors) == (name == "untied")
    _mlx_generates(tmp_path / "ours")

    remap("convert", theirs, tmp_path / "hf", "--spec", "mlx-to-hf", "--quiet")
    assert sha256_file(tmp_path / "hf/model.safetensors") == sha256_file(source / "model.safetensors")
    assert config(tmp_path / "hf") == config(source)
    _transformers_loads(tmp_path / "hf", Mistral4ForCausalLM)


def test_mistral4_quantized_is_what_mlx_lm_convert_writes_router_included(tmp_path, tiny_mistral4):
    """mlx-lm quantizes Mistral4's router (an nn.Linear, unlike DeepSeek's MoEGate); remap's
    --quantize does too, and mlx-to-hf dequantizes it back into transformers' layout."""
    from transformers import Mistral4ForCausalLM

    source = tiny_mistral4("untied")
    plan, ckpt = api.plan(source, "hf-to-mlx", quantize=4, group_size=32)
    api.convert(plan, ckpt, tmp_path / "ours")
    theirs = _mlx_lm_convert(source, tmp_path / "theirs", quantize=True, q_bits=4, q_group_size=32)
    _same_tensors(tmp_path / "ours", theirs)
    assert api.open_source(theirs).tensors["model.layers.1.mlp.gate.weight"].dtype == "U32"
    assert json.loads((tmp_path / "ours/config.json").read_text()) == json.loads((theirs / "config.json").read_text())
    plan, ckpt = api.plan(theirs, "mlx-to-hf")
    assert api.report(plan, ckpt).ok
    api.convert(plan, ckpt, tmp_path / "hf")
    _transformers_loads(tmp_path / "hf", Mistral4ForCausalLM)


# -- DeepSeek-V2 / V2-Lite: transformers' DeepseekV2, mlx-lm's deepseek_v2 ------------------------


def _mlx_config(path: Path) -> dict:
    """config.json as mlx_lm.convert writes it; remap also writes torch_dtype (from transformers'
    `dtype`), which mlx-lm's deepseek models read and transformers 5 no longer writes."""
    config = json.loads((path / "config.json").read_text())
    config.setdefault("torch_dtype", config["dtype"])
    return config


@pytest.mark.parametrize("name", ["v2", "lite"])
def test_deepseek_v2_hf_to_mlx_writes_what_mlx_lm_convert_writes_and_comes_back(tmp_path, tiny_deepseek_v2, name):
    """`remap convert --spec hf-to-mlx` of a transformers DeepSeek-V2 (V2-Lite) checkpoint:
    mlx_lm.convert's tensors byte for byte (kv_b_proj kept, 16 experts stacked in numeric order, a
    router without bias) and its config.json; mlx-to-hf of mlx-lm's own output is transformers'
    file byte for byte."""
    from transformers import DeepseekV2ForCausalLM

    from tests.test_convert import remap

    source = tiny_deepseek_v2(name)
    remap("convert", source, tmp_path / "ours", "--spec", "hf-to-mlx", "--quiet")
    theirs = _mlx_lm_convert(source, tmp_path / "theirs")
    _same_tensors(tmp_path / "ours", theirs)
    assert _mlx_config(tmp_path / "ours") == _mlx_config(theirs)
    tensors = api.open_source(theirs).tensors
    assert "model.layers.1.self_attn.kv_b_proj.weight" in tensors
    assert not any(".embed_q." in n or "e_score_correction_bias" in n for n in tensors)
    _mlx_generates(tmp_path / "ours")

    remap("convert", theirs, tmp_path / "hf", "--spec", "mlx-to-hf", "--quiet")
    assert sha256_file(tmp_path / "hf/model.safetensors") == sha256_file(source / "model.safetensors")
    _transformers_loads(tmp_path / "hf", DeepseekV2ForCausalLM)


@pytest.mark.parametrize("quantize", [4, "mixed_4_6"])
def test_deepseek_v2_quantized_is_what_mlx_lm_convert_writes(tmp_path, tiny_deepseek_v2, quantize):
    """mlx-lm quantizes V2's kv_b_proj (a Linear: mixed_4_6 gives it 6 bits in the layers that get
    more) and keeps its router (a MoEGate) float; remap's --quantize does the same, and mlx-to-hf
    dequantizes mlx-lm's output back into transformers' layout."""
    from transformers import DeepseekV2ForCausalLM

    source = tiny_deepseek_v2("v2")
    plan, ckpt = api.plan(source, "hf-to-mlx", quantize=quantize, group_size=32)
    api.convert(plan, ckpt, tmp_path / "ours")
    options = {"q_bits": 4} if quantize == 4 else {"quant_predicate": quantize}
    theirs = _mlx_lm_convert(source, tmp_path / "theirs", quantize=True, q_group_size=32, **options)
    _same_tensors(tmp_path / "ours", theirs)
    assert _mlx_config(tmp_path / "ours") == _mlx_config(theirs)
    tensors = api.open_source(theirs).tensors
    assert [tensors[f"model.layers.{i}.self_attn.kv_b_proj.weight"].dtype for i in range(3)] == ["U32"] * 3
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == "BF16"
    if quantize == "mixed_4_6":  # of 3 layers, layer 2 gets more bits
        block = _mlx_config(theirs)["quantization"]
        assert [block[f"model.layers.{i}.self_attn.kv_b_proj"]["bits"] for i in range(3)] == [4, 4, 6]
    plan, ckpt = api.plan(theirs, "mlx-to-hf")
    assert api.report(plan, ckpt).ok
    api.convert(plan, ckpt, tmp_path / "hf")
    _transformers_loads(tmp_path / "hf", DeepseekV2ForCausalLM)


@pytest.mark.parametrize("name", ["v2", "lite"])
def test_mlx_lm_computes_transformers_v2_logits_after_hf_to_mlx(tmp_path, tiny_deepseek_v2, name):
    """mlx-lm's deepseek_v2 on remap's conversion gives transformers' logits within 1e-4: softmax
    routing (group-limited over 16 experts in "v2"), qk_nope_head_dim != v_head_dim, yarn rope."""
    import mlx.core as mx
    import torch
    from mlx_lm import load
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_deepseek_v2(name)
    _converted(source, "hf-to-mlx", tmp_path / "mlx")
    text = "The quick brown fox jumps over the lazy dog"
    ids = AutoTokenizer.from_pretrained(source)(text, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(ids).logits[0].numpy()
    model, _ = load(str(tmp_path / "mlx"))
    model.set_dtype(mx.float32)  # MLX on CPU runs the MoE gather-matmul in float32 only
    np.testing.assert_allclose(np.array(model(mx.array(ids.numpy()))[0]), theirs, atol=1e-4)


def test_deepseek_v2_fp8_to_mlx_is_its_bf16_conversion(tmp_path, tiny_deepseek_v2):
    """hf-fp8-to-mlx of a V2 checkpoint in the official FP8 form (hf-to-hf-fp8) writes what
    dequantizing it (hf-fp8-to-hf) and then hf-to-mlx write, byte for byte."""
    fp8 = _converted(tiny_deepseek_v2("v2"), "hf-to-hf-fp8", tmp_path / "fp8")
    direct = _converted(fp8, "hf-fp8-to-mlx", tmp_path / "direct")
    two_runs = _converted(_converted(fp8, "hf-fp8-to-hf", tmp_path / "bf16"), "hf-to-mlx", tmp_path / "two-runs")
    assert sha256_file(direct / "model.safetensors") == sha256_file(two_runs / "model.safetensors")
    _mlx_generates(direct)

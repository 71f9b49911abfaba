"""FP8 beyond DeepSeek-V3's float32 128 x 128 `weight_scale_inv`: the ue8m0 block scales of
DeepSeek-V3.1 / V3.2 (float32 powers of two, or E8M0 bytes), transformers' per-tensor
`weight_scale_inv`, and the per-tensor / per-channel `weight_scale` of compressed-tensors'
float-quantized and fbgemm_fp8 checkpoints. Each is read from config.json, planned from headers,
and dequantized to what an independent numpy product gives, and to what mlx-lm's and
transformers' own dequantization computes where they have one."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from remap import api
from remap.errors import RemapError
from remap.layouts.hf import LAYOUT as HF
from remap.layouts.hf import fp8_scheme
from remap.ops import build_op
from tests.fp8_checkpoints import FP8_FORMS, write_fp8_form

RNG = np.random.default_rng(0)
# (form, dtype of its scales where not the form's own)
CASES = [("ue8m0", None), ("ue8m0", ml_dtypes.float8_e8m0fnu), ("ue8m0", np.uint8), ("per-tensor", None),
         ("ct-tensor", None), ("ct-channel", None), ("fbgemm", None)]


def _ids(cases):
    return [f"{form}-{np.dtype(dtype).name}" if dtype else form for form, dtype in cases]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    made = {}

    def make(form, scale_dtype=None):
        key = (form, scale_dtype)
        if key not in made:
            made[key] = write_fp8_form(tmp_path_factory.mktemp(form) / "src", form, scale_dtype)
        return made[key]

    return make


def _reference(weight: np.ndarray, scale: np.ndarray, block: tuple[int, int] | None) -> np.ndarray:
    """w * s in float32, rounded once to bf16, by plain numpy: E8M0 bytes as 2^(byte - 127), a
    block grid expanded by np.kron, a per-tensor or per-row scale by broadcasting."""
    w = weight.astype(np.float32)
    if scale.dtype in (np.uint8, ml_dtypes.float8_e8m0fnu):
        s = np.exp2(scale.view(np.uint8).astype(np.float64) - 127).astype(np.float32)
    else:
        s = scale.astype(np.float32)
    if block is not None:
        s = np.kron(s, np.ones(block, np.float32))[: w.shape[0], : w.shape[1]]
    else:  # one per tensor, or a column of one per row
        s = s.reshape(-1, 1) if s.size > 1 else s.reshape(())
    return (w * s).astype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("form, scale_dtype", CASES, ids=_ids(CASES))
def test_each_form_is_detected_planned_and_dequantized_to_the_plain_product(tmp_path, written, form, scale_dtype):
    source = written(form, scale_dtype)
    checkpoint = api.open_source(source)
    official = FP8_FORMS[form]["quant_method"] == "fp8"
    assert api.identify(checkpoint).describe() == ("hf (fp8-mtp)" if official else "hf (fp8)")
    plan, checkpoint = api.plan(checkpoint, "hf-fp8-to-hf")
    report = api.report(plan, checkpoint)
    assert report.ok, report.problems
    api.convert(plan, checkpoint, tmp_path / "bf16")
    out = api.open_source(tmp_path / "bf16")
    scheme = fp8_scheme(HF.read_config(checkpoint.config)["quantization_config"])
    quantized = [n for n, t in checkpoint.tensors.items() if t.dtype == "F8_E4M3"]
    assert len(quantized) > 20
    for name in quantized:
        scale = checkpoint.read(name.removesuffix("weight") + scheme.scale)
        expected = _reference(checkpoint.read(name), scale, scheme.block)
        assert np.array_equal(out.read(name).view(np.uint16), expected.view(np.uint16)), name
    assert all(t.dtype in ("BF16", "F32") for t in out.tensors.values())
    dropped = {d["name"] for d in report.to_dict()["dropped"]}
    assert dropped == ({n for n in checkpoint.tensors if n.endswith(".input_scale")} if form == "ct-tensor" else set())
    if form == "ct-channel":  # lm_head quantized (not ignored); the ignored layer-0 attention not
        assert "lm_head.weight" in quantized and "model.layers.0.self_attn.o_proj.weight" not in quantized
        assert "model.layers.1.self_attn.o_proj.weight" in quantized


@pytest.mark.parametrize("form, scale_dtype", [("ue8m0", None), ("ct-channel", None)], ids=["ue8m0", "ct-channel"])
def test_converted_forms_load_in_mlx_lm(tmp_path, written, form, scale_dtype):
    import mlx.core as mx
    from mlx_lm.utils import load_model

    plan, checkpoint = api.plan(written(form, scale_dtype), "hf-fp8-to-mlx")
    api.convert(plan, checkpoint, tmp_path / "mlx")
    model, _ = load_model(tmp_path / "mlx")
    model.set_dtype(mx.float32)
    logits = np.array(model(mx.array([[0, 5, 9, 2]])))
    assert np.isfinite(logits).all() and logits.std() > 0


def test_ue8m0_blocks_dequantize_as_mlx_lms_deepseek_v3_sanitize(tmp_path, written):
    """DeepSeek-V3.1's form (float32 powers of two): mlx-lm multiplies as for V3, and so does remap."""
    import json

    import mlx.core as mx
    from mlx_lm.models import deepseek_v3

    source = written("ue8m0")
    plan, checkpoint = api.plan(source, "hf-fp8-to-mlx")
    api.convert(plan, checkpoint, tmp_path / "ours")
    config = json.loads((source / "config.json").read_text())
    model = deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(config))
    mtp = f"model.layers.{config['num_hidden_layers']}."
    theirs = model.sanitize({k: v for k, v in mx.load(str(source / "model.safetensors")).items() if not k.startswith(mtp)})
    ours = api.open_source(tmp_path / "ours")
    assert set(ours.tensors) == set(theirs)
    for name, value in theirs.items():
        assert np.array_equal(ours.read(name).astype(np.float32), np.array(value.astype(mx.float32))), name


@pytest.mark.parametrize("shape", [(), (1,), (1, 1), (96, 1)])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_broadcast_scales_dequantize_as_mlx_lms_own_dequant(shape, dtype):
    """mlx-lm dequantizes per-tensor and per-row scales in its mistral4 sanitize (deepseek_v3's
    handles blocks only); remap's dequant_fp8 without a block gives its bits."""
    import mlx.core as mx
    from mlx_lm.models import mistral4
    from transformers import Mistral4Config

    from tests.helpers import TINY_MISTRAL4

    model = mistral4.Model(mistral4.ModelArgs.from_dict(Mistral4Config(**TINY_MISTRAL4["untied"]).to_dict()))
    codes = RNG.integers(0, 256, size=(96, 64), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN codes
    scale = np.exp(RNG.standard_normal(shape)).astype(dtype)
    name = "model.layers.0.self_attn.o_proj.weight"
    theirs = model.sanitize({name: mx.array(codes), name + "_scale_inv": mx.array(scale.astype(np.float32)).astype(
        mx.float32 if dtype == np.float32 else mx.bfloat16)})[name]
    [ours] = build_op({"op": "dequant_fp8", "block": None}, {}).apply([codes.view(ml_dtypes.float8_e4m3fn), scale])
    assert np.array_equal(ours.view(np.uint16), np.array(theirs.astype(mx.float32)).astype(ml_dtypes.bfloat16).view(np.uint16))


@pytest.mark.parametrize("shape", [(1,), (96, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weight_scale_dequantizes_as_compressed_tensors_computes_it(shape, dtype):
    """compressed-tensors' _dequantize on the CPU (not installed here; its arithmetic restated in
    torch): x_q.to(scale.dtype) * scale, then .to(bfloat16). In the scale's dtype or in float32
    then rounded, the bits are remap's."""
    codes = RNG.integers(0, 256, size=(96, 64), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C
    scale = torch.from_numpy(np.exp(RNG.standard_normal(shape) - 4).astype(np.float32)).to(dtype)
    x_q = torch.from_numpy(codes).view(torch.float8_e4m3fn)
    theirs = (x_q.to(scale.dtype) * scale).to(torch.bfloat16)
    numpy_scale = scale.float().numpy().astype({torch.bfloat16: ml_dtypes.bfloat16, torch.float16: np.float16,
                                                torch.float32: np.float32}[dtype])
    [ours] = build_op({"op": "dequant_fp8", "block": None}, {}).apply([codes.view(ml_dtypes.float8_e4m3fn), numpy_scale])
    assert np.array_equal(ours.view(np.uint16), theirs.view(torch.int16).numpy().view(np.uint16))


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float8_e8m0fnu, torch.uint8])
def test_block_scales_dequantize_as_transformers_fp8_dequantize(scale_dtype):
    """transformers' Fp8Dequantize reads float32 and E8M0 scales (a uint8 scale as E8M0 bytes);
    on weights whose sizes are multiples of the block (it takes the block from the scale grid)
    remap's dequant_fp8 gives its bits."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    codes = RNG.integers(0, 256, size=(256, 384), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C
    exponents = RNG.integers(110, 135, size=(2, 3)).astype(np.uint8)
    scale = torch.from_numpy(exponents).view(torch.float8_e8m0fnu)
    scale = scale if scale_dtype == torch.float8_e8m0fnu else scale.to(torch.float32) if scale_dtype == torch.float32 \
        else torch.from_numpy(exponents)
    theirs = Fp8Dequantize(None)._dequantize_one(torch.from_numpy(codes).view(torch.float8_e4m3fn), scale, torch.bfloat16)
    ours_scale = scale.view(torch.uint8).numpy().view(ml_dtypes.float8_e8m0fnu) if scale_dtype != torch.float32 \
        else scale.numpy()
    [ours] = build_op({"op": "dequant_fp8", "block": [128, 128]}, {}).apply([codes.view(ml_dtypes.float8_e4m3fn), ours_scale])
    assert np.array_equal(ours.view(np.uint16), theirs.view(torch.int16).numpy().view(np.uint16))


def test_hf_fp8_forms_are_what_transformers_fp8_quantizers_hold(monkeypatch):
    """FineGrainedFP8Config(weight_block_size=None) holds one float32 weight_scale_inv per tensor
    (shape []); fbgemm_fp8 one float32 weight_scale per output row. transformers fuses routed
    experts in memory (FP8 or not), so those are compared on the other modules."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, FbgemmFp8Config, FineGrainedFP8Config
    from transformers.integrations import fbgemm_fp8
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    from tests.helpers import HF_BASE

    monkeypatch.setattr(fbgemm_fp8, "get_quantize_fp8_per_row", lambda: None)  # its GPU kernel is not needed to build
    for quantization, build in (
        ({"quant_method": "fp8", "weight_block_size": None},
         lambda model: FineGrainedFP8HfQuantizer(FineGrainedFP8Config(weight_block_size=None), pre_quantized=True)
         ._process_model_before_weight_loading(model)),
        ({"quant_method": "fbgemm_fp8", "modules_to_not_convert": ["lm_head"]},
         lambda model: fbgemm_fp8.replace_with_fbgemm_fp8_linear(model, ["lm_head"], FbgemmFp8Config(), True)),
    ):
        raw = {**HF_BASE, "quantization_config": quantization}
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**{k: v for k, v in raw.items() if k != "model_type"}))
        build(model)
        held = {n: tuple(t.shape) for n, t in model.state_dict().items() if ".mlp.experts." not in n}
        expected = HF.expected(HF.read_config(raw), "fp8")
        assert held == {n: e.shape for n, e in expected.items() if ".mlp.experts." not in n}
        scale = "weight_scale_inv" if quantization["quant_method"] == "fp8" else "weight_scale"
        assert expected[f"model.layers.1.mlp.experts.0.down_proj.{scale}"].shape == (() if scale.endswith("inv") else (32, 1))


def test_mlx_lm_deepseek_v3_leaves_a_weight_scale_undequantized():
    """Why remap dequantizes these forms itself: mlx-lm's deepseek_v3 sanitize drops a
    `weight_scale` it does not pair with int4 `weight_packed`, keeping the raw e4m3 codes (and its
    loader refuses compressed-tensors float-quantized configs outright)."""
    import mlx.core as mx
    from mlx_lm.models import deepseek_v3

    from tests.helpers import HF_BASE

    model = deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(HF_BASE))
    name = "model.layers.0.self_attn.o_proj.weight"
    codes = mx.array(RNG.integers(0, 120, size=(32, 32), dtype=np.uint8))
    out = model.sanitize({name: codes, name.removesuffix("weight") + "weight_scale": mx.array([[0.5]] * 32)})
    assert set(out) == {name} and out[name].dtype == mx.uint8


@pytest.mark.parametrize("quantization, fragment", [
    ({"quant_method": "awq", "bits": 4}, "quant_method is 'awq'"),
    ({"quant_method": "fp8", "scale_fmt": "e5m2"}, "scale_fmt is 'e5m2'"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, '"weight_block_size": \\[rows, cols\\]'),
    ({**FP8_FORMS["ct-channel"], "format": "pack-quantized"}, "float-quantized"),
    ({**FP8_FORMS["ct-channel"], "config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 8, "type": "float", "strategy": "group", "group_size": 128}}}}, "per tensor or per channel"),
    ({**FP8_FORMS["ct-channel"], "config_groups": {"group_0": FP8_FORMS["ct-channel"]["config_groups"]["group_0"],
                                                   "group_1": FP8_FORMS["ct-tensor"]["config_groups"]["group_0"]}},
     "one form"),
    ({**FP8_FORMS["ct-channel"], "ignore": ["re:(a+)+$"]}, "nested repetition"),
    ({**FP8_FORMS["fbgemm"], "modules_to_not_convert": [".*.*.*x"]}, "nested repetition"),
    ({**FP8_FORMS["fbgemm"], "modules_to_not_convert": "lm_head"}, "a list of module names"),
])
def test_fp8_forms_remap_does_not_describe_are_config_errors(quantization, fragment):
    from tests.helpers import HF_BASE

    with pytest.raises(RemapError, match=fragment) as caught:
        HF.read_config({**HF_BASE, "quantization_config": quantization})
    assert "config.json quantization_config" in str(caught.value)

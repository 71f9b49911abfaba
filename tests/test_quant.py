"""Quantization, against the real things: the ops' bytes are what `mlx_lm.convert -q` writes, the
quantized mlx layout is what mlx-lm's own loader builds, FP8 block quantization is torch's e4m3
cast with DeepSeek's arithmetic; and what survives each round trip is measured, exceptions named."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from mlx_lm.convert import convert as mlx_convert
from mlx_lm.utils import load_model
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from fixtures.generate import train_tokenizer
from remap import dtypes
from remap.errors import RemapError
from remap.io.checkpoint import open_checkpoint
from remap.layouts.base import FLOAT, U32
from remap.layouts.mlx import LAYOUT as MLX
from remap.ops import TensorType, build_op, invert_ops

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
RNG = np.random.default_rng(0)
MLX_FLOATS = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32}


def bits_of(array: np.ndarray) -> tuple:
    """Shape, dtype and bytes: equality is bit equality (bf16 and -0.0 included)."""
    return array.shape, array.dtype, np.ascontiguousarray(array).view(np.uint8).tobytes()


def types_of(arrays: list[np.ndarray]) -> list[TensorType]:
    return [TensorType(a.shape, dtypes.dtype_name(a.dtype)) for a in arrays]


def run(raw: dict, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Apply one op, checking that its planned types are the computed ones."""
    op = build_op(raw, {})
    planned = op.types(types_of(arrays))
    out = op.apply(arrays)
    assert types_of(out) == planned, raw
    return out


def random(shape, dtype=np.float32, scale_rows=False) -> np.ndarray:
    x = RNG.standard_normal(shape).astype(np.float32)
    if scale_rows:  # rows of very different magnitude, as real weights have
        x *= 10.0 ** RNG.uniform(-3, 1, (*shape[:-1], 1)).astype(np.float32)
    return x.astype(dtype)


def to_mlx(array: np.ndarray) -> mx.array:
    """numpy -> mlx through float32 (a different road from the ops' uint16 view for bf16)."""
    name = dtypes.dtype_name(array.dtype)
    if name in MLX_FLOATS:
        return mx.array(array.astype(np.float32)).astype(MLX_FLOATS[name])
    return mx.array(array)


def from_mlx(x: mx.array) -> np.ndarray:
    if x.dtype == mx.bfloat16:
        return np.array(x.astype(mx.float32)).astype(ml_dtypes.bfloat16)
    return np.array(x)


def codes_of(weight: np.ndarray, bits: int, width: int) -> np.ndarray:
    """The b-bit codes of an mlx-packed weight, read as a little-endian bit stream per row
    (mlx packs low bits first, 3/5/6-bit codes straddling words), independently of mlx."""
    rows = weight.reshape(-1, weight.shape[-1])
    stream = np.unpackbits(rows.view(np.uint8), axis=1, bitorder="little")
    fields = stream.reshape(rows.shape[0], width, bits).astype(np.int64)
    return (fields << np.arange(bits)).sum(-1).reshape(*weight.shape[:-1], width)


# -- quantize_mlx / dequantize_mlx against mlx itself ---------------------------------------------

MLX_BITS = (1, 2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)


@pytest.mark.parametrize("bits", MLX_BITS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_quantize_mlx_is_mx_quantize(bits, group_size):
    for dtype, shape in ((ml_dtypes.bfloat16, (6, 256)), (np.float16, (3, 2, 128)), (np.float32, (4, 384))):
        w = random(shape, dtype, scale_rows=True)
        ours = run({"op": "quantize_mlx", "bits": bits, "group_size": group_size}, [w])
        theirs = [from_mlx(x) for x in mx.quantize(to_mlx(w), group_size, bits)]
        assert [bits_of(a) for a in ours] == [bits_of(a) for a in theirs]
        *lead, width = shape
        assert ours[0].shape == (*lead, width * bits // 32) and ours[0].dtype == np.uint32
        assert ours[1].shape == ours[2].shape == (*lead, width // group_size) and ours[1].dtype == w.dtype


def test_mlx_ops_in_row_blocks_on_threads_are_one_mlx_call(monkeypatch):
    """Blocks of rows (quantized or dequantized) on several threads, the last one short, give the
    bytes of one call on the whole tensor."""
    import remap.ops.quant as quant

    monkeypatch.setattr(quant, "_CHUNK_BYTES", 3 * 512 * 2)  # 3 rows of bf16 per block
    w = random((5, 7, 512), ml_dtypes.bfloat16, scale_rows=True)
    ours = run({"op": "quantize_mlx", "bits": 4, "group_size": 64}, [w])
    theirs = [from_mlx(x) for x in mx.quantize(to_mlx(w), 64, 4)]
    assert [bits_of(a) for a in ours] == [bits_of(a) for a in theirs]

    restored = run({"op": "dequantize_mlx", "bits": 4, "group_size": 64}, ours)
    assert bits_of(restored[0]) == bits_of(from_mlx(mx.dequantize(*(to_mlx(a) for a in theirs), 64, 4)))


@pytest.mark.parametrize("bits", MLX_BITS)
def test_dequantize_mlx_is_mx_dequantize_and_exact_in_float32(bits):
    w = random((8, 256), ml_dtypes.bfloat16, scale_rows=True)
    q, s, b = run({"op": "quantize_mlx", "bits": bits, "group_size": 32}, [w])
    [ours] = run({"op": "dequantize_mlx", "bits": bits, "group_size": 32}, [q, s, b])
    theirs = from_mlx(mx.dequantize(to_mlx(q), to_mlx(s), to_mlx(b), 32, bits))
    assert bits_of(ours) == bits_of(theirs)
    # F32: scale * code + bias exactly (float64 has room), from codes unpacked without mlx
    [wide] = run({"op": "dequantize_mlx", "bits": bits, "group_size": 32, "dtype": "float32"}, [q, s, b])
    codes = codes_of(q, bits, 256).reshape(8, -1, 32)
    exact = codes * s.astype(np.float64)[..., None] + b.astype(np.float64)[..., None]
    assert np.array_equal(wide, exact.reshape(8, 256))
    raw = {"op": "dequantize_mlx", "bits": bits, "group_size": 32}
    assert build_op({**raw, "dtype": "F32"}, {}).loss(types_of([q, s, b])) is None
    assert build_op(raw, {}).loss(types_of([q, s, b])).claim == "rounding"


def test_quantization_loss_is_named_and_measured_within_its_bound():
    w = random((16, 256), np.float32, scale_rows=True)
    op = build_op({"op": "quantize_mlx", "bits": 3, "group_size": 64}, {})
    assert op.loss(types_of([w])).claim == "quantization"
    q, s, b = op.apply([w])
    [finding] = op.check([w])
    assert finding.claim == "quantization" and finding.holds is None
    error = np.abs(w - run({"op": "dequantize_mlx", "bits": 3, "group_size": 64}, [q, s, b])[0]).reshape(16, 4, 64)
    assert finding.magnitude == error.max() > 0
    assert (error.max(-1) <= np.abs(s) + np.abs(b) / 256).all()  # the bound the loss states


def test_quantizing_stacked_experts_is_quantizing_each_and_stacking():
    experts = [random((32, 128), ml_dtypes.bfloat16) for _ in range(3)]
    raw = {"op": "quantize_mlx", "bits": 4, "group_size": 64}
    stacked = run(raw, [np.stack(experts)])
    each = [run(raw, [e]) for e in experts]
    assert [bits_of(a) for a in stacked] == [bits_of(np.stack(parts)) for parts in zip(*each)]


@pytest.mark.parametrize(
    "raw, inputs, fragment",
    [
        ({"op": "quantize_mlx", "group_size": 64}, [((4, 96), "BF16")], "not a multiple of group_size"),
        ({"op": "quantize_mlx"}, [((128,), "BF16")], "two or more axes"),
        ({"op": "quantize_mlx"}, [((4, 128), "I32")], "two or more axes"),
        ({"op": "quantize_mlx", "bits": 7}, [((4, 128), "BF16")], "bits 7"),
        ({"op": "quantize_mlx", "group_size": 16}, [((4, 128), "BF16")], "group_size 16"),
        ({"op": "quantize_mlx", "mode": "mxfp4"}, [((4, 128), "BF16")], "mode"),
        ({"op": "dequantize_mlx"}, [((4, 16), "U32"), ((4, 2), "BF16")], "consecutive"),
        ({"op": "dequantize_mlx"}, [((4, 16), "U32"), ((4, 2), "BF16"), ((4, 2), "F32")], "same shape and dtype"),
        ({"op": "dequantize_mlx"}, [((4, 16), "U32"), ((4, 4), "BF16"), ((4, 4), "BF16")], "scales"),
        ({"op": "dequantize_mlx"}, [((4, 16), "F32"), ((4, 2), "BF16"), ((4, 2), "BF16")], "U32"),
        ({"op": "dequantize_mlx", "dtype": "I8"}, [((4, 16), "U32"), ((4, 2), "BF16"), ((4, 2), "BF16")], "dtype"),
    ],
)
def test_mlx_shape_errors_are_remap_errors_at_plan_time(raw, inputs, fragment):
    with pytest.raises(RemapError, match=fragment):
        build_op(raw, {}).types([TensorType(shape, dtype) for shape, dtype in inputs])


def test_mlx_ops_invert_into_each_other():
    raw = {"op": "quantize_mlx", "bits": 3, "group_size": 32, "input": 1}
    assert invert_ops([raw]) == [{"op": "dequantize_mlx", "bits": 3, "group_size": 32, "input": 1}]
    assert invert_ops(invert_ops([raw])) == [raw]


# -- what survives mlx -> float -> mlx ----------------------------------------------------------


def requantize(q, s, b, bits, group_size):
    restored = run({"op": "dequantize_mlx", "bits": bits, "group_size": group_size}, [q, s, b])
    return run({"op": "quantize_mlx", "bits": bits, "group_size": group_size}, restored)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bits", MLX_BITS)
def test_requantizing_is_exact_for_groups_whose_codes_span_every_level(bits, dtype):
    """mx.quantize is not idempotent: it moves each group's scale so that zero is a level, which
    can leave the far end of the group short of the top code; re-quantizing such a group fits a
    new scale. Groups whose codes run from 0 to 2^bits - 1 come back bit for bit, and the second
    round trip is exact everywhere (but in bfloat16 at 8 bits, where rounding the dequantized
    weights to bf16 moves them by up to half a level)."""
    q, s, b = run({"op": "quantize_mlx", "bits": bits, "group_size": 64}, [random((64, 512), dtype, scale_rows=True)])
    q2, s2, b2 = requantize(q, s, b, bits, 64)
    codes = codes_of(q, bits, 512).reshape(64, 8, 64)
    full = (codes.min(-1) == 0) & (codes.max(-1) == 2**bits - 1)
    same = (s2 == s) & (b2 == b) & (codes_of(q2, bits, 512).reshape(64, 8, 64) == codes).all(-1)
    if dtype == np.float32 or bits < 8:
        assert same[full].all()
        assert [bits_of(a) for a in requantize(q2, s2, b2, bits, 64)] == [bits_of(a) for a in (q2, s2, b2)]
    if bits >= 3:  # measured: ~5% of groups at 3 bits, ~20% at 8 change on the first trip
        assert not same.all() and not full.all()


# -- bit for bit what mlx_lm.convert -q writes; the layout is what mlx-lm loads ----------------------

# Widths chosen so each group size quantizes some modules and leaves others float: hidden 128
# (embeddings, q_a, kv_a, gate/up, lm_head), q_lora / kv_lora / moe widths 64, dense intermediate 96
# (only groups of 32), qk_nope 32 (embed_q: only groups of 32).
TINY = dict(
    vocab_size=320, hidden_size=128, intermediate_size=96, moe_intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
    topk_group=1, first_k_dense_replace=1, max_position_embeddings=64, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1,
)
CONVERSIONS = {  # name: mlx_lm.convert arguments, as `-q --q-bits B --q-group-size G [--quant-predicate R]`
    "4bit-g64": dict(q_bits=4, q_group_size=64),
    "3bit-g32": dict(q_bits=3, q_group_size=32),
    "8bit-g128": dict(q_bits=8, q_group_size=128),
    "mixed_4_6-g64": dict(q_group_size=64, quant_predicate="mixed_4_6"),
    "lm_head float": dict(q_bits=4, q_group_size=64, quant_predicate=lambda path, module: path != "lm_head"),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A bf16 DeepseekV3ForCausalLM saved by transformers, and mlx_lm.convert -q of it per recipe."""
    root = tmp_path_factory.mktemp("quant")
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY)).to(torch.bfloat16)
    model.save_pretrained(root / "hf")
    train_tokenizer().save_pretrained(root / "hf")
    for name, arguments in CONVERSIONS.items():
        mlx_convert(str(root / "hf"), str(root / name), quantize=True, **arguments)
    mlx_convert(str(root / "3bit-g32"), str(root / "3bit-g32 dequantized"), dequantize=True)
    # what other tools write for a module a predicate skipped; mlx-lm's loader reads it as "float"
    config = json.loads((root / "lm_head float" / "config.json").read_text())
    config["quantization"]["lm_head"] = config["quantization_config"]["lm_head"] = False
    (root / "lm_head float" / "config.json").write_text(json.dumps(config))
    return root


def _hf_sources(hf) -> dict[str, np.ndarray]:
    """The float weight of each compared mlx module, from the hf files, re-laid as mlx-lm's
    sanitize does (experts stacked; kv_b_proj split per head into embed_q / unembed_out)."""
    heads, nope = TINY["num_attention_heads"], TINY["qk_nope_head_dim"]
    kv_b = hf.read("model.layers.0.self_attn.kv_b_proj.weight").reshape(heads, nope + TINY["v_head_dim"], -1)
    experts = range(TINY["n_routed_experts"])
    return {
        "model.embed_tokens": hf.read("model.embed_tokens.weight"),
        "lm_head": hf.read("lm_head.weight"),
        "model.layers.0.self_attn.q_a_proj": hf.read("model.layers.0.self_attn.q_a_proj.weight"),
        "model.layers.0.self_attn.q_b_proj": hf.read("model.layers.0.self_attn.q_b_proj.weight"),
        "model.layers.0.mlp.down_proj": hf.read("model.layers.0.mlp.down_proj.weight"),
        "model.layers.0.self_attn.embed_q": np.ascontiguousarray(kv_b[:, :nope, :].swapaxes(1, 2)),
        "model.layers.0.self_attn.unembed_out": np.ascontiguousarray(kv_b[:, nope:, :]),
        **{f"model.layers.1.mlp.switch_mlp.{proj}": np.stack(
            [hf.read(f"model.layers.1.mlp.experts.{e}.{proj}.weight") for e in experts])
           for proj in ("gate_proj", "down_proj")},
    }


@pytest.mark.parametrize("name", CONVERSIONS)
def test_quantize_mlx_writes_what_mlx_lm_convert_writes(name, converted):
    out = converted / name
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    with open_checkpoint(str(converted / "hf")) as hf, open_checkpoint(str(out)) as mlx:
        sources = _hf_sources(hf)
        assert {a.dtype for a in sources.values()} == {np.dtype(ml_dtypes.bfloat16)}
        packed = 0
        for module, weight in sources.items():
            if f"{module}.scales" not in mlx.tensors:
                assert bits_of(mlx.read(f"{module}.weight")) == bits_of(weight), module
                continue
            own = quantization.get(module) or quantization
            raw = {"op": "quantize_mlx", "bits": own["bits"], "group_size": own["group_size"]}
            ours = run(raw, [weight])
            theirs = [mlx.read(f"{module}.{part}") for part in ("weight", "scales", "biases")]
            assert [bits_of(a) for a in ours] == [bits_of(a) for a in theirs], module
            packed += 1
    assert "model.layers.1.mlp.switch_mlp.gate_proj" in sources and packed >= 4


def test_dequantize_mlx_writes_what_mlx_lm_convert_dequantize_writes(converted):
    with open_checkpoint(converted / "3bit-g32") as q, open_checkpoint(converted / "3bit-g32 dequantized") as d:
        modules = [n.removesuffix(".scales") for n in q.tensors if n.endswith(".scales")]
        # mlx-lm 0.32's dequantize_model knows Linear, SwitchLinear and Embedding only: it leaves
        # MultiLinear (embed_q / unembed_out) packed yet drops `quantization` from config.json,
        # so its output does not load. remap's dequantize_mlx takes every module alike.
        skipped = [m for m in modules if f"{m}.scales" in d.tensors]
        assert skipped and all(m.endswith(("embed_q", "unembed_out")) for m in skipped)
        compared = [m for m in modules if m not in skipped]
        assert len(compared) > 15
        for module in compared:
            parts = [q.read(f"{module}.{part}") for part in ("weight", "scales", "biases")]
            [ours] = run({"op": "dequantize_mlx", "bits": 3, "group_size": 32}, parts)
            assert bits_of(ours) == bits_of(d.read(f"{module}.weight")), module


def _named_shapes(expected) -> dict[str, tuple[tuple[int, ...], str]]:
    return {name: (e.shape, e.dtype) for name, e in expected.items()}


@pytest.mark.parametrize("name", CONVERSIONS)
def test_quantized_mlx_layout_is_what_mlx_lm_loads_and_writes(name, converted):
    out = converted / name
    expected = MLX.expected(MLX.read_config(json.loads((out / "config.json").read_text())), "embed_q")
    model, _ = load_model(out)  # strict: every file tensor is a model parameter and back
    held = {n: (tuple(a.shape), U32 if a.dtype == mx.uint32 else FLOAT) for n, a in tree_flatten(model.parameters())}
    assert held == _named_shapes(expected)
    with open_checkpoint(str(out)) as files:
        on_disk = {n: (info.shape, U32 if info.dtype == "U32" else FLOAT) for n, info in files.tensors.items()}
    assert on_disk == _named_shapes(expected)
    # float stays what mlx-lm never quantizes, quantized is what the recipe asked for
    for module in ("model.layers.1.mlp.gate", "model.norm", "model.layers.0.input_layernorm"):
        assert expected[f"{module}.weight"].dtype == FLOAT
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in expected
    assert ("lm_head.scales" in expected) == (name != "lm_head float")


def test_mixed_recipe_bits_are_read_per_module(converted):
    config = json.loads((converted / "mixed_4_6-g64" / "config.json").read_text())
    expected = MLX.expected(MLX.read_config(config), "embed_q")
    # mixed_4_6 on two layers: lm_head and the last layer's down_proj at 6 bits, the rest at 4
    assert config["quantization"]["lm_head"]["bits"] == 6
    assert expected["lm_head.weight"].shape == (320, 128 * 6 // 32)
    assert expected["model.layers.1.mlp.switch_mlp.down_proj.weight"].shape == (4, 128, 64 * 6 // 32)
    assert expected["model.layers.0.self_attn.q_a_proj.weight"].shape == (64, 128 * 4 // 32)


def test_quantized_kv_b_proj_variant_is_what_mlx_lm_sanitizes(converted, tmp_path):
    """Older mlx checkpoints hold a quantized kv_b_proj; mlx-lm dequantizes, splits and
    requantizes it at load. Files laid out by the kv_b_proj variant load strictly."""
    config = json.loads((converted / "3bit-g32" / "config.json").read_text())
    read = MLX.read_config(config)
    tensors = {}
    for name, e in MLX.expected(read, "kv_b_proj").items():
        if e.dtype == U32:
            tensors[name] = mx.array(RNG.integers(0, 2**32, e.shape, dtype=np.uint32))
        else:
            tensors[name] = mx.array(RNG.uniform(0.01, 0.1, e.shape).astype(np.float32)).astype(mx.bfloat16)
    assert tensors["model.layers.0.self_attn.kv_b_proj.weight"].dtype == mx.uint32
    mx.save_safetensors(str(tmp_path / "model.safetensors"), tensors)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, _ = load_model(tmp_path)
    held = {n: tuple(a.shape) for n, a in tree_flatten(model.parameters())}
    assert held == {n: e.shape for n, e in MLX.expected(read, "embed_q").items()}


@pytest.mark.parametrize(
    "quantization, fragment",
    [
        ([4, 64], "an object"),
        ({"bits": 4}, "group_size"),
        ({"group_size": 64, "bits": 0}, "bits"),
        ({"group_size": 32, "bits": 4, "mode": "mxfp4"}, "affine"),
        ({"group_size": 64, "bits": 4, "lm_head": {"group_size": 64, "bits": True}}, "lm_head bits"),
        ({"group_size": 64, "bits": 4, "lm_head": "yes"}, "false or an object"),
    ],
)
def test_unreadable_quantization_is_a_config_error(quantization, fragment):
    raw = json.loads((FIXTURES / "mlx" / "config.json").read_text())
    with pytest.raises(RemapError, match=fragment):
        MLX.read_config({**raw, "quantization": quantization})


def test_a_module_override_that_cannot_pack_is_a_config_error():
    raw = json.loads((FIXTURES / "mlx" / "config.json").read_text())  # hidden 64, q_lora_rank 48
    q = {"group_size": 32, "bits": 4, "model.layers.0.self_attn.q_b_proj": {"group_size": 32, "bits": 4}}
    with pytest.raises(RemapError, match="q_b_proj of input width 48"):
        MLX.expected(MLX.read_config({**raw, "quantization": q}))


# -- quant_fp8: DeepSeek-V3's block quantization ----------------------------------------------------


def deepseek_quant(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block, DeepSeek-V3 inference/kernel.py act_quant's arithmetic (s = amax / 448,
    y = x / s, cast to e4m3) in torch, one block at a time; an all-zero block gets scale 1."""
    x = weight.float()
    rows, cols = x.shape
    codes = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
    scales = torch.empty((-(-rows // block[0]), -(-cols // block[1])), dtype=torch.float32)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            tile = x[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            amax = tile.abs().max()
            s = amax / 448.0 if amax > 0 else torch.tensor(1.0)
            codes[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = (tile / s).to(
                torch.float8_e4m3fn)
            scales[i, j] = s
    return codes, scales


def fp8_weight(shape, dtype):
    w = random(shape, np.float32, scale_rows=True)
    w[: min(16, shape[0]), : min(16, shape[1])] = 0.0  # an all-zero block where the block is 16
    return w.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("shape, block", [((48, 80), (16, 16)), ((40, 70), (16, 32)), ((130, 260), (128, 128))])
def test_quant_fp8_is_deepseek_arithmetic_in_torch(shape, block, dtype):
    w = fp8_weight(shape, dtype)
    codes, scales = run({"op": "quant_fp8", "block": list(block)}, [w])
    ref_codes, ref_scales = deepseek_quant(torch.from_numpy(w.astype(np.float32)), block)
    assert bits_of(codes) == bits_of(ref_codes.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn))
    assert bits_of(scales) == bits_of(ref_scales.numpy())
    if block == (16, 16):
        assert scales[0, 0] == 1.0 and not codes[:16, :16].astype(np.float32).any()


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
def test_quant_fp8_error_is_within_its_stated_bound(dtype):
    w = fp8_weight((256, 384), dtype)
    op = build_op({"op": "quant_fp8", "block": [64, 128]}, {})
    codes, scales = op.apply([w])
    [restored] = run({"op": "dequant_fp8", "block": [64, 128], "dtype": "F32"}, [codes, scales])
    per_weight = np.repeat(np.repeat(scales, 64, 0), 128, 1)
    error = np.abs(w.astype(np.float32) - restored)
    # e4m3: 3 mantissa bits (half a step is |w| / 16), subnormal steps of scale / 512
    assert (error <= np.abs(w.astype(np.float32)) / 16 + per_weight / 1024).all()
    [finding] = op.check([w])
    assert finding.claim == "quantization" and finding.magnitude == error.max() > 0
    assert op.loss(types_of([w])).claim == "quantization"
    assert invert_ops([{"op": "quant_fp8", "block": [64, 128]}]) == [
        {"op": "dequant_fp8", "block": [64, 128], "input": 0}]


@pytest.mark.parametrize("source", [np.float32, ml_dtypes.bfloat16], ids=["from-f32", "from-bf16"])
def test_fp8_requantizing_its_float32_dequantization_is_exact(source):
    """Every (codes, scale) quant_fp8 makes comes back bit for bit through float32: each nonzero
    block holds a +-448 code, q * s rounds back to q, and f32(f32(448 s) / 448) == s for every
    s = f32(a / 448) (checked for all float32 significands; exponents only shift)."""
    codes, scales = run({"op": "quant_fp8", "block": [16, 16]}, [fp8_weight((64, 96), source)])
    restored = run({"op": "dequant_fp8", "block": [16, 16], "dtype": "F32"}, [codes, scales])
    again = run({"op": "quant_fp8", "block": [16, 16]}, restored)
    assert [bits_of(a) for a in again] == [bits_of(codes), bits_of(scales)]
    significands = (np.arange(2**23, dtype=np.uint32) | np.uint32(127 << 23)).view(np.float32)
    s = (significands / np.float32(448)).astype(np.float32)
    assert np.array_equal((s * np.float32(448)) / np.float32(448), s)


def test_fp8_requantizing_its_bf16_dequantization_keeps_codes_and_bf16_born_scales():
    """Through bfloat16 the codes always survive; a scale survives when its block's amax is a
    bf16 value (a bf16 source), and otherwise moves by at most 2^-8 (bf16 rounding of 448 s)."""
    raw, back = {"op": "quant_fp8", "block": [32, 32]}, {"op": "dequant_fp8", "block": [32, 32], "dtype": "BF16"}
    for source in (ml_dtypes.bfloat16, np.float32):
        codes, scales = run(raw, [fp8_weight((96, 128), source)])
        codes2, scales2 = run(raw, run(back, [codes, scales]))
        assert bits_of(codes2) == bits_of(codes)
        if source == ml_dtypes.bfloat16:
            assert bits_of(scales2) == bits_of(scales)
        else:
            assert not np.array_equal(scales2, scales) and (np.abs(scales2 / scales - 1) <= 2.0**-8).all()
            assert [bits_of(a) for a in run(raw, run(back, [codes2, scales2]))] == [bits_of(codes2), bits_of(scales2)]


def test_fp8_blocks_quant_fp8_never_makes_change_but_keep_their_values():
    """A block with no +-448 code (max 224 here) gets a scale half as large and codes twice as
    large: other bits, the same dequantized values. A zero block's scale becomes 1."""
    codes = (random((16, 16)) * 50).clip(-224, 224).astype(ml_dtypes.float8_e4m3fn)
    codes[0, 0] = 224.0
    scale = np.array([[0.25]], np.float32)
    restored = run({"op": "dequant_fp8", "block": [16, 16], "dtype": "F32"}, [codes, scale])
    codes2, scale2 = run({"op": "quant_fp8", "block": [16, 16]}, restored)
    assert scale2[0, 0] == 0.125 and np.array_equal(codes2.astype(np.float32), 2 * codes.astype(np.float32))
    back = {"op": "dequant_fp8", "block": [16, 16], "dtype": "F32"}
    assert np.array_equal(run(back, [codes2, scale2])[0], restored[0])
    zero = np.zeros((16, 16), ml_dtypes.float8_e4m3fn)
    assert run({"op": "quant_fp8", "block": [16, 16]}, run(back, [zero, scale]))[1][0, 0] == 1.0


def test_bundled_fp8_fixture_requantizes_bit_for_bit():
    with open_checkpoint(str(FIXTURES / "hf-fp8-mtp")) as fp8:
        config = json.loads((FIXTURES / "hf-fp8-mtp" / "config.json").read_text())
        block = config["quantization_config"]["weight_block_size"]
        names = [n.removesuffix("_scale_inv") for n in fp8.tensors if n.endswith(".weight_scale_inv")]
        assert len(names) > 20
        for name in names:
            codes, scales = fp8.read(name), fp8.read(f"{name}_scale_inv")
            restored = run({"op": "dequant_fp8", "block": block, "dtype": "F32"}, [codes, scales])
            again = run({"op": "quant_fp8", "block": block}, restored)
            assert [bits_of(a) for a in again] == [bits_of(codes), bits_of(scales)], name


@pytest.mark.parametrize(
    "raw, shape, dtype, fragment",
    [
        ({"op": "quant_fp8", "block": [128]}, (4, 4), "F32", "block"),
        ({"op": "quant_fp8", "block": [0, 128]}, (4, 4), "F32", "block"),
        ({"op": "quant_fp8"}, (4, 4, 4), "F32", "2-D"),
        ({"op": "quant_fp8"}, (4, 4), "F8_E4M3", "2-D"),
    ],
)
def test_quant_fp8_errors_are_remap_errors(raw, shape, dtype, fragment):
    with pytest.raises(RemapError, match=fragment):
        build_op(raw, {}).types([TensorType(shape, dtype)])


# -- non-finite weights: found, never spread silently ---------------------------------------------


@pytest.mark.parametrize("args", [["--spec", "hf-to-hf-fp8"], ["--spec", "hf-to-mlx", "--quantize", "4"]])
def test_nan_and_inf_in_a_quantized_weight_are_refused_unless_allowed(tmp_path, args):
    """An Inf would move its FP8 block's scale and zero its finite neighbours; a NaN would make its
    whole 4-bit group NaN. remap refuses, naming the tensor; --allow-nonfinite converts and
    --check-data then lists where they are."""
    import shutil
    import subprocess
    import sys

    from safetensors.numpy import load_file, save_file

    source = tmp_path / "src"
    shutil.copytree(FIXTURES / "hf-bf16", source)
    tensors = load_file(str(source / "model.safetensors"))
    name = "model.layers.1.self_attn.o_proj.weight"
    weight = tensors[name].astype(np.float32)
    weight[0, 0], weight[1, 3] = np.nan, np.inf
    tensors[name] = weight.astype(tensors[name].dtype)
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})

    def remap(*more):
        return subprocess.run([sys.executable, "-m", "remap.cli", "convert", str(source), str(tmp_path / "out"), *args,
                               "--quiet", *more], capture_output=True, text=True, cwd=FIXTURES.parent)

    refused = remap()
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert name in refused.stderr and "1 NaN and 1 Inf" in refused.stderr and "--allow-nonfinite" in refused.stderr
    assert not (tmp_path / "out").exists()
    assert remap("--allow-nonfinite", "--force").returncode == 0  # --force: discards the refused run's partial
    report = subprocess.run([sys.executable, "-m", "remap.cli", "report", str(source), *args, "--allow-nonfinite",
                             "--check-data", "--json", str(tmp_path / "report.json")], capture_output=True, text=True,
                            cwd=FIXTURES.parent)
    where = [loss["where"] for loss in json.loads((tmp_path / "report.json").read_text())["losses"] if loss["where"]]
    assert report.returncode == 1 and where == [f"{name}: 1 NaN and 1 Inf values in the input"]

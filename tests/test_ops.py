"""The ops: planned types agree with computed arrays, inverses undo exactly, claims are measured,
bad shapes are RemapErrors, and FP8 dequantisation is bit-for-bit DeepSeek's own arithmetic."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from remap import dtypes
from remap.errors import RemapError
from remap.ops import OPS, Loss, NotInvertible, TensorType, build_op, invert_ops, tensor_types

RNG = np.random.default_rng(0)
NAMES = {"heads": 4, "nope": 3, "rope": 2, "v": 5, "rank": 6}


def random(shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(np.float32).astype(dtype)


def types_of(arrays):
    return [TensorType(a.shape, dtypes.dtype_name(a.dtype)) for a in arrays]


def run(raws, arrays, names=NAMES):
    """Apply `raws` in turn, checking at every step that the planned types are the computed ones."""
    planned = types_of(arrays)
    for raw in raws:
        op = build_op(raw, names)
        planned = op.types(planned)
        arrays = op.apply(arrays)
        assert types_of(arrays) == planned, raw
    return arrays


def bits(array):
    """The bytes of an array, so that equality is bit equality (-0.0 vs 0.0, bf16 included)."""
    return array.shape, array.dtype, np.ascontiguousarray(array).view(np.uint8).tobytes()


# (op, input shapes): one element of the rule's list per shape
SHAPE_CASES = [
    ({"op": "lossy", "input": 1, "reason": "routed differently"}, [(3,), (2, 5)]),
    ({"op": "concat", "sizes": [3, 5]}, [(3, 4), (5, 4)]),
    ({"op": "concat", "axis": 1, "count": 2}, [(2, 3), (2, 1), (7,)]),
    ({"op": "concat", "input": 1, "axis": -1}, [(9,), (2, 3), (2, 5)]),
    ({"op": "split", "sizes": [1, 2, 4]}, [(7, 3)]),
    ({"op": "split", "axis": -1, "sizes": [3, 7], "input": 1}, [(2,), (3, 10), (4,)]),
    ({"op": "split", "axis": 1, "sizes": ["nope", "v"]}, [(4, 8, 6)]),
    ({"op": "split_heads", "heads": "heads"}, [(12, 5)]),
    ({"op": "split_heads", "heads": 4, "axis": 1}, [(5, 12)]),
    ({"op": "split_heads", "heads": 2, "axis": -1, "input": 1}, [(3,), (5, 6)]),
    ({"op": "merge_heads", "heads": 4}, [(4, 3, 5)]),
    ({"op": "merge_heads", "axis": 1}, [(2, 4, 3)]),
    ({"op": "merge_heads", "axis": -2}, [(2, 4, 3)]),
    ({"op": "transpose"}, [(3, 5)]),
    ({"op": "transpose", "axes": [2, 0, 1]}, [(2, 3, 4)]),
    ({"op": "slice", "start": 1, "stop": 3, "size": 5, "claim": "zero"}, [(5, 2)]),
    ({"op": "slice", "axis": 1, "stop": "nope", "claim": "unused"}, [(2, 5)]),
    ({"op": "slice", "axis": -1, "stop": 2, "claim": "redundant", "input": 1}, [(1,), (3, 6)]),
    ({"op": "pad", "before": 1, "after": 2}, [(3, 4)]),
    ({"op": "pad", "axis": 1, "to": 8, "size": 4}, [(3, 4)]),
    ({"op": "repeat", "axis": 1, "times": 3}, [(2, 3)]),
    ({"op": "rope_permute", "dim": "rope * 2", "order": "interleave"}, [(8, 3)]),
    ({"op": "rope_permute", "axis": -1, "dim": 2, "order": "deinterleave", "input": 1}, [(1,), (3, 6)]),
    ({"op": "low_rank_fuse", "rank": "rank"}, [(5, 6), (6, 3)]),
    ({"op": "low_rank_fuse", "input": 1}, [(2,), (4, 2), (2, 3), (1,)]),
    ({"op": "low_rank_split", "rank": "rank"}, [(7, 9)]),
    ({"op": "low_rank_split", "rank": 1, "input": 1}, [(2,), (3, 2)]),
]


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("raw, shapes", SHAPE_CASES, ids=[c[0]["op"] + str(k) for k, c in enumerate(SHAPE_CASES)])
def test_types_agree_with_apply(raw, shapes, dtype):
    run([raw], [random(s, dtype) for s in shapes])


@pytest.mark.parametrize("source, target", [("F32", "BF16"), ("BF16", "F32"), ("BF16", "F16"), ("F32", "F8_E4M3")])
def test_cast_types_agree_with_apply(source, target):
    out = run([{"op": "cast", "dtype": target, "source": source}, {"op": "cast", "dtype": "F32"}],
              [random((3, 4), dtypes.numpy_dtype(source))])
    assert out[0].dtype == np.float32


@pytest.mark.parametrize("source, target, past", [("BF16", "F16", 7e4), ("F32", "BF16", 3.4e38), ("F32", "F8_E4M3", 500.0)])
def test_a_cast_refuses_to_make_inf_or_nan_of_finite_values_unless_told_to_keep(source, target, past):
    values = np.array([1.0, -past, np.inf, np.nan], dtype=dtypes.numpy_dtype(source))  # Inf and NaN given: kept
    with pytest.raises(RemapError, match=rf"cast to {target}: finite values out of its range .* \(1 of them\)"):
        build_op({"op": "cast", "dtype": target}, {}).apply([values])
    kept = build_op({"op": "cast", "dtype": target, "nonfinite": "keep"}, {}).apply([values])[0].astype(np.float32)
    assert not np.isfinite(kept[1]) and kept[0] == 1
    inside = build_op({"op": "cast", "dtype": target}, {}).apply([values[[0, 2, 3]]])[0].astype(np.float32)
    assert inside[0] == 1 and not np.isfinite(inside[1:]).any()


def test_every_op_is_exercised():
    # cast and dequant_fp8 are checked below; the quantization ops in tests/test_quant.py
    quantization = {"quantize_mlx", "dequantize_mlx", "quant_fp8"}
    assert {raw["op"] for raw, _ in SHAPE_CASES} | {"cast", "dequant_fp8"} | quantization == set(OPS)


# -- inverses: forward then the inverse built from the inverted raw dicts is the identity ------


def _zero_outside(shape, axis, start, stop, dtype):
    x = random(shape, dtype)
    keep = np.zeros(shape[axis], bool)
    keep[start:stop] = True
    return np.where(np.expand_dims(keep, [d for d in range(len(shape)) if d != axis]), x, 0).astype(dtype)


def _tiled(shape, axis, copies, dtype):
    block = list(shape)
    block[axis] //= copies
    return np.concatenate([random(block, dtype)] * copies, axis=axis)


# (forward ops, input arrays given a dtype): data that satisfies every claim the ops make
ROUND_TRIPS = {
    "concat": ([{"op": "concat", "sizes": [3, 5]}], lambda d: [random((3, 4), d), random((5, 4), d)]),
    "concat-count": ([{"op": "concat", "axis": 1, "sizes": ["nope", "v"], "input": 1, "count": 2}],
                     lambda d: [random((2,), d), random((2, 3), d), random((2, 5), d), random((1,), d)]),
    "split": ([{"op": "split", "axis": -1, "sizes": [1, 2, 4]}], lambda d: [random((3, 7), d)]),
    "split-input": ([{"op": "split", "sizes": "v", "input": 1}], lambda d: [random((2,), d), random((5, 2), d)]),
    "split_heads": ([{"op": "split_heads", "heads": "heads", "axis": 1}], lambda d: [random((3, 8), d)]),
    "split_heads-neg": ([{"op": "split_heads", "heads": 2, "axis": -1}], lambda d: [random((3, 8), d)]),
    "split_heads-neg2": ([{"op": "split_heads", "heads": 2, "axis": -2}], lambda d: [random((6, 3), d)]),
    "merge_heads": ([{"op": "merge_heads", "heads": 4}], lambda d: [random((4, 3, 2), d)]),
    "merge_heads-neg": ([{"op": "merge_heads", "heads": 3, "axis": -2}], lambda d: [random((2, 3, 4), d)]),
    "transpose": ([{"op": "transpose"}], lambda d: [random((3, 5), d)]),
    "transpose-3d": ([{"op": "transpose", "axes": [2, 0, 1]}], lambda d: [random((2, 3, 4), d)]),
    "slice-zero": ([{"op": "slice", "axis": 1, "start": 1, "stop": 4, "size": 6, "claim": "zero"}],
                   lambda d: [_zero_outside((2, 6), 1, 1, 4, d)]),
    "slice-unused": ([{"op": "slice", "stop": "nope", "size": "nope + rope", "claim": "unused"}],
                     lambda d: [_zero_outside((5, 2), 0, 0, 3, d)]),
    "slice-redundant": ([{"op": "slice", "axis": 1, "stop": 2, "size": 6, "claim": "redundant"}],
                        lambda d: [_tiled((3, 6), 1, 3, d)]),
    "pad": ([{"op": "pad", "axis": 1, "before": 1, "after": 2, "size": 3}], lambda d: [random((2, 3), d)]),
    "pad-to": ([{"op": "pad", "to": 7, "size": 4}], lambda d: [random((4, 2), d)]),
    "repeat": ([{"op": "repeat", "axis": 0, "times": 3, "size": 2, "input": 1}],
               lambda d: [random((1,), d), random((2, 5), d)]),
    "rope_permute": ([{"op": "rope_permute", "dim": "rope * 4", "order": "interleave"}], lambda d: [random((24, 3), d)]),
    "rope_permute-per-head": ([{"op": "split_heads", "heads": "heads"},
                               {"op": "rope_permute", "axis": 1, "dim": 6, "order": "deinterleave"}],
                              lambda d: [random((4 * 6, 5), d)]),
    "kv_b_proj to embed_q/unembed_out": (
        [{"op": "split_heads", "heads": "heads"},
         {"op": "split", "axis": 1, "sizes": ["nope", "v"]},
         {"op": "transpose", "axes": [0, 2, 1]}],
        lambda d: [random((4 * 8, 6), d)],
    ),
}


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_inverse_undoes_exactly(case, dtype):
    forward, make = ROUND_TRIPS[case]
    arrays = make(dtype)
    back = run(invert_ops(forward), run(forward, arrays))
    assert [bits(a) for a in back] == [bits(a) for a in arrays]
    # and the inverse of the inverse does what the forward ops do
    twice = invert_ops(invert_ops(forward))
    assert [bits(a) for a in run(twice, arrays)] == [bits(a) for a in run(forward, arrays)]


def test_inverse_of_narrowing_cast_is_exact_on_values_the_narrow_type_holds():
    forward = [{"op": "cast", "dtype": "BF16", "source": "F32"}]
    representable = random((4, 5), ml_dtypes.bfloat16).astype(np.float32)
    assert bits(run(invert_ops(forward), run(forward, [representable]))[0]) == bits(representable)
    widening = [{"op": "cast", "dtype": "float32", "source": "bfloat16"}]
    x = random((4, 5), ml_dtypes.bfloat16)
    assert bits(run(invert_ops(widening), run(widening, [x]))[0]) == bits(x)


def test_lossy_steps_are_named():
    f32, bf16 = [TensorType((2,), "F32")], [TensorType((2,), "BF16")]
    assert build_op({"op": "cast", "dtype": "BF16"}, {}).loss(f32).claim == "rounding"
    assert build_op({"op": "cast", "dtype": "F16"}, {}).loss(bf16).claim == "rounding"  # range, not mantissa
    assert build_op({"op": "cast", "dtype": "F32"}, {}).loss(bf16) is None
    assert build_op({"op": "cast", "dtype": "I32"}, {}).loss(f32).claim == "rounding"
    full = build_op({"op": "slice", "stop": 2}, {})
    assert full.loss(f32) is None  # keeps everything: nothing to claim
    part = build_op({"op": "slice", "stop": 1, "claim": "zero", "reason": "why"}, {})
    assert part.loss(f32) == Loss("zero", "input 0 axis 0: kept [0:1] of 2", "why")


@pytest.mark.parametrize(
    "raw",
    [
        {"op": "concat"},
        {"op": "merge_heads"},
        {"op": "slice", "stop": 2, "size": 4},  # lossy by default
        {"op": "slice", "stop": 2, "claim": "zero"},  # no size: the inverse cannot know the extent
        {"op": "slice", "size": 4, "claim": "zero"},
        {"op": "pad", "after": 1},
        {"op": "repeat", "times": 2},
        {"op": "cast", "dtype": "BF16"},
        {"op": "dequant_fp8"},
        {"op": "split"},
        {"op": "low_rank_fuse"},  # no rank: the inverse split would not know the factors' inner size
        {"op": "rope_permute", "dim": 4},
    ],
)
def test_not_invertible(raw):
    with pytest.raises(NotInvertible):
        invert_ops([{"op": "transpose"}, raw])
    assert issubclass(NotInvertible, RemapError)


# -- a per-head interleave (how kv_b_proj is built), against a plain per-head loop -------------


def test_kv_b_proj_build_matches_a_per_head_loop():
    h, nope, rope, v, rank = NAMES["heads"], NAMES["nope"], NAMES["rope"], NAMES["v"], NAMES["rank"]
    k_decompress = random((h * (nope + rope), rank))  # per head: nope rows used, rope rows not
    v_decompress = random((h * v, rank))
    ops = [
        {"op": "split_heads", "heads": "heads"},
        {"op": "slice", "axis": 1, "stop": "nope", "size": "nope + rope", "claim": "unused"},
        {"op": "split_heads", "heads": "heads", "input": 1},
        {"op": "concat", "axis": 1, "sizes": ["nope", "v"]},
        {"op": "merge_heads", "heads": "heads"},
    ]
    [kv_b_proj] = run(ops, [k_decompress, v_decompress])

    expected = []
    for head in range(h):
        k_rows = k_decompress[head * (nope + rope) : head * (nope + rope) + nope]
        v_rows = v_decompress[head * v : (head + 1) * v]
        expected.extend([*k_rows, *v_rows])
    assert bits(kv_b_proj) == bits(np.array(expected, dtype=np.float32))

    # back: v exactly; k with each head's unused rope rows as zeros
    k_back, v_back = run(invert_ops(ops), [kv_b_proj])
    assert bits(v_back) == bits(v_decompress)
    k_zeroed = k_decompress.reshape(h, nope + rope, rank).copy()
    k_zeroed[:, nope:] = 0
    assert bits(k_back) == bits(k_zeroed.reshape(h * (nope + rope), rank))


# -- Slice.check: what --check-data measures ---------------------------------------------------


def test_check_zero_claim():
    x = np.zeros((4, 3), np.float32)
    x[:2] = random((2, 3))
    op = build_op({"op": "slice", "stop": 2, "claim": "zero"}, {})
    [found] = op.check([x])
    assert (found.claim, found.magnitude, found.holds) == ("zero", 0.0, True)
    x[3, 1] = -0.75
    [found] = op.check([x])
    assert (found.magnitude, found.holds) == (0.75, False)


def test_check_redundant_claim():
    x = _tiled((2, 6), 1, 3, np.float32)
    op = build_op({"op": "slice", "axis": 1, "stop": 2, "claim": "redundant"}, {})
    [found] = op.check([x])
    assert (found.magnitude, found.holds) == (0.0, True)
    x[1, 4] += 0.25  # the third copy drifts from the first
    [found] = op.check([x])
    assert found.magnitude == pytest.approx(0.25) and found.holds is False


def test_check_unused_claim_reports_magnitude_but_cannot_tell():
    x = random((5, 2))
    op = build_op({"op": "slice", "start": 1, "stop": 3, "claim": "unused"}, {})
    [found] = op.check([x])
    assert found.magnitude == np.abs(np.delete(x, [1, 2], axis=0)).max()
    assert found.holds is None


def test_check_lossy_claim_measures_what_is_lost():
    x = random((3, 4), ml_dtypes.bfloat16)
    op = build_op({"op": "slice", "axis": -1, "stop": 3}, {})
    [found] = op.check([x])
    assert found.claim == "lossy"
    assert found.magnitude == np.abs(x[:, 3].astype(np.float32)).max()


def test_check_reads_its_own_input():
    x = np.ones((4,), np.float32)
    op = build_op({"op": "slice", "stop": 2, "claim": "zero", "input": 1}, {})
    [found] = op.check([np.zeros((9,), np.float32), x])
    assert found.magnitude == 1.0 and found.holds is False


def test_check_of_a_full_slice_finds_nothing():
    assert build_op({"op": "slice", "stop": 3, "claim": "zero"}, {}).check([random((3, 2))]) == []


# -- bad shapes are user errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, shapes, fragment",
    [
        ({"op": "split", "sizes": [2, 2]}, [(5, 3)], "do not cover"),
        ({"op": "split", "sizes": [4, 2]}, [(5, 3)], "do not cover"),
        ({"op": "split", "sizes": [5, 0]}, [(5, 3)], "do not cover"),
        ({"op": "split", "sizes": [6, -1]}, [(5, 3)], "do not cover"),
        ({"op": "pad", "to": 3}, [(5, 3)], "negative padding"),
        ({"op": "pad", "before": -1, "after": 2}, [(5, 3)], "negative padding"),
        ({"op": "pad", "after": 1, "to": 9}, [(5, 3)], "exactly one"),
        ({"op": "pad"}, [(5, 3)], "exactly one"),
        ({"op": "pad", "after": 1, "size": 4}, [(5, 3)], "is 5"),
        ({"op": "split_heads", "heads": 4}, [(10, 3)], "does not split into 4 heads"),
        ({"op": "split_heads", "heads": 0}, [(10, 3)], "does not split into 0 heads"),
        ({"op": "merge_heads", "heads": 3}, [(4, 2, 2)], "is not 3 heads"),
        ({"op": "merge_heads", "axis": 1}, [(4, 2)], "no axis after"),
        ({"op": "concat"}, [(2, 3), (2, 4)], "differ off that axis"),
        ({"op": "concat", "sizes": [2, 3]}, [(2, 3), (2, 3)], "input sizes"),
        ({"op": "concat", "count": 3}, [(2, 3), (2, 3)], "out of range"),
        ({"op": "transpose", "axes": [0, 0]}, [(2, 3)], "not a permutation"),
        ({"op": "transpose", "axes": [1, 0]}, [(2, 3, 4)], "not a permutation"),
        ({"op": "slice", "start": 2, "stop": 2}, [(5,)], "out of range"),
        ({"op": "slice", "stop": 6}, [(5,)], "out of range"),
        ({"op": "slice", "start": 1, "stop": 3, "claim": "redundant"}, [(6,)], "redundant"),
        ({"op": "slice", "stop": 4, "claim": "redundant"}, [(6,)], "redundant"),
        ({"op": "repeat", "times": 0}, [(2,)], "times"),
        ({"op": "split", "axis": 2, "sizes": [1]}, [(1, 1)], "axis 2 out of range"),
        ({"op": "transpose", "input": 1}, [(2, 3)], "input 1 out of range"),
        ({"op": "cast", "dtype": "BF16", "source": "F16"}, [(2,)], "input dtype is F32"),
        ({"op": "rope_permute", "dim": 4, "order": "interleave"}, [(6, 3)], "rope_permute: extent 6 .* multiple of 4"),
        ({"op": "rope_permute", "axis": 2, "dim": 4, "order": "interleave"}, [(8, 3)], "axis 2 out of range"),
        ({"op": "low_rank_fuse"}, [(2, 3), (4, 5)], r"low_rank_fuse: F32 \[2, 3\] @ F32 \[4, 5\].*\[m, k\] @ \[k, n\]"),
        ({"op": "low_rank_fuse", "rank": 2}, [(2, 3), (3, 5)], "low_rank_fuse: the factors' inner size is 3.*rank 2"),
        ({"op": "low_rank_fuse"}, [(2, 3)], "low_rank_fuse: inputs 0 and 1 out of range.*consecutive"),
        ({"op": "low_rank_fuse"}, [(2, 3, 1), (3, 1, 1)], "low_rank_fuse: left is F32 .*2-D"),
        ({"op": "low_rank_split", "rank": 4}, [(3, 5)], r"low_rank_split: rank 4 .*1\.\.3"),
        ({"op": "low_rank_split", "rank": 0}, [(3, 5)], "low_rank_split: rank 0"),
        ({"op": "low_rank_split"}, [(3, 5)], "low_rank_split: rank None"),
        ({"op": "low_rank_split", "rank": 1}, [(3,)], "low_rank_split: the matrix is F32 .*2-D"),
    ],
)
def test_shape_errors(raw, shapes, fragment):
    op = build_op(raw, NAMES)
    with pytest.raises(RemapError, match=fragment):
        op.types([TensorType(s, "F32") for s in shapes])


def test_concat_refuses_mixed_dtypes():
    with pytest.raises(RemapError, match="dtypes differ"):
        build_op({"op": "concat"}, {}).types([TensorType((2,), "F32"), TensorType((2,), "BF16")])


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"op": "split", "sizes": [1], "widths": 2}, "no parameter 'widths'"),
        ({"op": "split", "sizes": ["unknown_key"]}, "unknown name 'unknown_key'"),
        ({"op": "split_heads", "heads": "heads / 3"}, "an integer"),
        ({"op": "slice", "stop": 1, "claim": "probably"}, "claim 'probably'"),
        ({"op": "cast", "dtype": "F12"}, "unknown dtype"),
        ({"op": "dequant_fp8", "block": [0, 128]}, "block"),
        ({"op": "dequant_fp8", "block": 128}, "block"),
        ({"op": "reshape"}, "unknown op 'reshape'"),
        ({"op": "rope_permute", "dim": 3, "order": "interleave"}, r"rope_permute: dim 3 .*positive even"),
        ({"op": "rope_permute", "order": "interleave"}, "rope_permute: dim None"),
        ({"op": "rope_permute", "dim": 4}, r"rope_permute: order None .*interleave \| deinterleave"),
        ({"op": "rope_permute", "dim": 4, "order": "half"}, "rope_permute: order 'half'"),
        ({"op": "low_rank_split", "rank": "rank / 4"}, "an integer"),
    ],
)
def test_build_errors(raw, fragment):
    with pytest.raises(RemapError, match=fragment):
        build_op(raw, NAMES)


# -- FP8 block dequantisation against DeepSeek's fp8_cast_bf16 arithmetic, in torch -------------


def deepseek_fp8_cast_bf16(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek-V3 inference/fp8_cast_bf16.py -> kernel.weight_dequant, one block at a time:
    y = x.to(float32) * s for the block's scale, stored as bfloat16. Edge blocks are partial."""
    rows, cols = weight.shape
    out = torch.empty(rows, cols, dtype=torch.bfloat16)
    for bi in range(scale_inv.shape[0]):
        for bj in range(scale_inv.shape[1]):
            r, c = slice(bi * block[0], (bi + 1) * block[0]), slice(bj * block[1], (bj + 1) * block[1])
            out[r, c] = (weight[r, c].to(torch.float32) * scale_inv[bi, bj]).to(torch.bfloat16)
    return out


@pytest.mark.parametrize("block", [(128, 128), (64, 32), (7, 5)])
@pytest.mark.parametrize("rows, cols", [(200, 72), (131, 71)])  # odd widths decode code by code
def test_dequant_fp8_matches_deepseek_bit_for_bit(block, rows, cols):
    # neither a multiple of 128 nor of 64 x 32: partial edge blocks
    codes = RNG.integers(0, 256, size=(rows, cols), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # e4m3fn's only NaNs; every other code, subnormals included
    weight = codes.view(ml_dtypes.float8_e4m3fn)
    scale = np.exp(RNG.standard_normal((-(-rows // block[0]), -(-cols // block[1])))).astype(np.float32)

    [ours] = run([{"op": "dequant_fp8", "block": list(block)}], [weight, scale])

    reference = deepseek_fp8_cast_bf16(
        torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn), torch.from_numpy(scale), block
    )
    assert ours.dtype == ml_dtypes.bfloat16
    assert np.array_equal(ours.view(np.uint16), reference.view(torch.int16).numpy().view(np.uint16))


@pytest.mark.parametrize("out", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("scale_dtype", [np.float32, ml_dtypes.bfloat16, np.float16, np.uint8])
def test_dequant_fp8_by_table_is_each_weights_product_for_every_code(out, scale_dtype):
    """dequant_fp8 looks each weight up in its block's 256 products: the bits of computing each
    weight (float32 product, through a 16-bit scale's dtype, rounded to the output dtype) for all
    256 codes, NaN codes too, in full and partial blocks, with scales that round, overflow the
    output dtype, are subnormal, zero or negative."""
    block, rows, cols = (16, 32), 40, 280  # 3 x 9 blocks, the last row and column of blocks partial
    codes = np.concatenate([np.arange(256, dtype=np.uint8)] * (rows * cols // 256 + 1))[: rows * cols]
    codes = RNG.permutation(codes).reshape(rows, cols)
    codes[:2, :128] = np.arange(256, dtype=np.uint8).reshape(2, 128)  # every code in one block
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    specials = [1.0, 3.0e-3, -0.7, 0.0, 1e-30, 7e4, 3e38, 1.0 + 2**-20, 5e-8]
    scale = np.resize(np.array(specials + list(np.exp(RNG.standard_normal(27) * 3)), np.float32), grid)
    if scale_dtype == np.uint8:  # E8M0 bytes: 2^(byte - 127), 0xFF NaN
        scale = np.resize(np.array([127, 0, 1, 254, 255, 100, 140, 120, 133], np.uint8), grid)
    else:
        with np.errstate(over="ignore"):
            scale = scale.astype(scale_dtype)

    [ours] = run([{"op": "dequant_fp8", "block": list(block), "dtype": out}], [codes.view(ml_dtypes.float8_e4m3fn), scale])

    values = scale.view(ml_dtypes.float8_e8m0fnu) if scale_dtype == np.uint8 else scale
    per_weight = np.repeat(np.repeat(values.astype(np.float32), block[0], 0), block[1], 1)[:rows, :cols]
    with np.errstate(over="ignore", invalid="ignore"):
        product = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32) * per_weight
        if scale_dtype in (ml_dtypes.bfloat16, np.float16):
            product = product.astype(scale_dtype)
        expected = product.astype(dtypes.numpy_dtype(out))
    assert bits(ours) == bits(expected)


def test_dequant_fp8_in_float32_is_the_exact_product():
    weight = random((5, 3)).astype(ml_dtypes.float8_e4m3fn)
    scale = np.array([[2.0, 0.5], [3.0, 0.25]], np.float32)
    [out] = run([{"op": "dequant_fp8", "block": [4, 2], "dtype": "F32"}], [weight, scale])
    w = weight.astype(np.float32)
    expected = w * np.array([[2, 2, 0.5]] * 4 + [[3, 3, 0.25]], np.float32)
    assert bits(out) == bits(expected)
    assert build_op({"op": "dequant_fp8", "dtype": "F32"}, {}).loss(types_of([weight, scale])) is None


@pytest.mark.parametrize(
    "shapes, dtypes_, fragment",
    [
        ([(200, 72), (2, 2)], ["F8_E4M3", "F32"], r"expected \[2, 1\]"),
        ([(200, 72)], ["F8_E4M3"], "consecutive inputs"),
        ([(200, 72), (2, 1)], ["BF16", "F32"], "2-D F8_E4M3"),
        ([(200,), (2,)], ["F8_E4M3", "F32"], "2-D F8_E4M3"),
    ],
)
def test_dequant_fp8_shape_errors(shapes, dtypes_, fragment):
    with pytest.raises(RemapError, match=fragment):
        build_op({"op": "dequant_fp8"}, {}).types([TensorType(s, d) for s, d in zip(shapes, dtypes_)])



def test_lossy_passes_bytes_and_names_what_it_changes():
    x = random((4, 3))
    op = build_op({"op": "lossy", "reason": "the router scores by sigmoid there"}, {})
    [y] = op.apply([x])
    assert y is x
    loss = op.loss([TensorType((4, 3), "F32")])
    assert (loss.claim, loss.reason) == ("lossy", "the router scores by sigmoid there")
    assert invert_ops([{"op": "lossy", "reason": "r"}]) == [{"op": "lossy", "reason": "r"}]


@pytest.mark.parametrize("one_dtype_per_shape_object", [True, False])
def test_tensor_types_gives_one_object_per_distinct_type(one_dtype_per_shape_object):
    """Shared shape tuples, equal ones apart, lists, and a dtype telling two shapes apart: where a
    shape object goes with one dtype (keyed by it alone), and where one goes with two."""
    shared, equal, other = tuple([4, 8]), tuple([4, 8]), tuple([4, 8])  # (literals would be one constant)
    names = ["a", "b", "c", "d", "e"]
    shapes = [shared, shared, equal, [4, 8], other if one_dtype_per_shape_object else shared]
    types = tensor_types(names, shapes, ["BF16", "BF16", "BF16", "BF16", "F32"])
    assert [types[n] for n in names] == [TensorType((4, 8), "BF16")] * 4 + [TensorType((4, 8), "F32")]
    assert len({id(t) for t in types.values()}) == 2
    assert all(type(t.shape) is tuple for t in types.values())

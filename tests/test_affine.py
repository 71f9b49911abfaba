"""remap/ops/affine.py (mx.quantize's arithmetic in numpy) against mx.quantize itself, bit for bit,
on the groups where float32 arithmetic is easiest to get subtly wrong."""

from __future__ import annotations

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest

from remap.ops import affine

RNG = np.random.default_rng(7)
DTYPES = {"BF16": (ml_dtypes.bfloat16, mx.bfloat16), "F16": (np.float16, mx.float16), "F32": (np.float32, mx.float32)}


def edge_groups(group_size: int, dtype) -> np.ndarray:
    """Rows of one group each: constant, zero (both signs), tiny and huge, half-way codes, one
    outlier, ties between |min| and |max|, near the 1e-7 scale floor; then random rows of very
    different magnitudes."""
    finfo = ml_dtypes.finfo(dtype)
    ramp = np.linspace(0, 1, group_size, dtype=np.float64)
    rows = [
        np.full(group_size, 0.0), np.full(group_size, -0.0), np.full(group_size, 3.0), np.full(group_size, -2.5),
        np.where(ramp > 0.5, -0.0, 0.0),
        np.full(group_size, float(finfo.smallest_subnormal)), -np.full(group_size, float(finfo.tiny)),
        ramp * float(finfo.max), -ramp * float(finfo.max) * 0.999, (ramp - 0.5) * float(finfo.max),
        np.arange(group_size) % 16 + 0.5, np.arange(group_size) % 4 - 1.5, np.arange(group_size) * 0.5,
        np.r_[np.zeros(group_size - 1), 1e4], np.r_[-np.ones(group_size - 1), 1.0],
        np.r_[1.0, -1.0, np.zeros(group_size - 2)], np.r_[-1.0, 1.0, np.zeros(group_size - 2)],
        ramp * 1e-6, ramp * 1.5e-6 - 7e-7, ramp * 3e-7, (ramp - 0.3) * 1e-5,
    ]
    random = RNG.standard_normal((64, group_size)) * 10.0 ** RNG.uniform(-8, 4, (64, 1))
    with np.errstate(over="ignore"):
        values = np.concatenate([np.stack(rows), random]).astype(dtype)
    return values[np.isfinite(values.astype(np.float32)).all(axis=1)]


def mlx_quantize(x: np.ndarray, group_size: int, bits: int, mx_dtype) -> list[np.ndarray]:
    wide = mx.array(x.astype(np.float32)).astype(mx_dtype)  # exact: x holds values of its dtype
    out = mx.quantize(wide, group_size, bits, stream=mx.cpu)
    return [np.array(a.view(mx.uint16) if a.dtype in (mx.bfloat16, mx.float16) else a) for a in out]


def ours(x: np.ndarray, group_size: int, bits: int) -> list[np.ndarray]:
    rows, width = x.shape
    outs = [np.empty((rows, width * bits // 32), np.uint32), np.empty((rows, width // group_size), x.dtype),
            np.empty((rows, width // group_size), x.dtype)]
    assert affine.quantize_into(x, group_size, bits, *outs)
    return [a.view(np.uint16) if a.dtype.itemsize == 2 else a for a in outs]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_numpy_affine_quantization_is_mx_quantize_bit_for_bit(bits, group_size, dtype):
    np_dtype, mx_dtype = DTYPES[dtype]
    groups = edge_groups(group_size, np_dtype)
    x = np.concatenate([groups[RNG.permutation(len(groups))] for _ in range(4)], axis=1)  # rows of 4 groups
    theirs = mlx_quantize(x, group_size, bits, mx_dtype)
    assert all(np.array_equal(a, b) for a, b in zip(ours(x, group_size, bits), theirs))


def test_chunks_of_rows_are_one_pass(monkeypatch):
    """Rows quantized a few at a time (the last chunk short) give what one pass gives."""
    x = (RNG.standard_normal((11, 256)) * 10.0 ** RNG.uniform(-3, 1, (11, 1))).astype(ml_dtypes.bfloat16)
    whole = ours(x, 64, 4)
    monkeypatch.setattr(affine, "_CHUNK", 3 * 256)
    assert all(np.array_equal(a, b) for a, b in zip(ours(x, 64, 4), whole))
    assert all(np.array_equal(a, b) for a, b in zip(whole, mlx_quantize(x, 64, 4, mx.bfloat16)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_rows_are_left_to_mlx(bad):
    """A NaN or an Inf in any chunk is told (False), not quantized: numpy's max spreads NaN where
    mlx's skips it, so those bytes are mx.quantize's to make (or the op's to refuse)."""
    x = RNG.standard_normal((6, 128)).astype(np.float32)
    x[4, 77] = bad
    outs = [np.empty((6, 16), np.uint32), np.empty((6, 2), np.float32), np.empty((6, 2), np.float32)]
    assert not affine.quantize_into(x, 64, 4, *outs)
    assert affine.quantize_into(x[:4], 64, 4, *(o[:4] for o in outs))


def test_widths_mlx_packs_otherwise_are_left_to_mlx():
    assert [bits for bits in (1, 2, 3, 4, 5, 6, 8) if affine.handles(bits)] == [2, 4, 8]


def test_quantize_mlx_keeping_nonfinite_values_writes_mx_quantizes_bytes():
    from remap.ops import build_op

    x = (RNG.standard_normal((5, 256)) * 3).astype(ml_dtypes.bfloat16)
    x[1, 3], x[3, 200] = np.nan, -np.inf
    got = build_op({"op": "quantize_mlx", "bits": 4, "group_size": 64, "nonfinite": "keep"}, {}).apply([x])
    theirs = mlx_quantize(x, 64, 4, mx.bfloat16)
    assert all(np.array_equal(a.view(np.uint16) if a.dtype.itemsize == 2 else a, b) for a, b in zip(got, theirs))

"""mx.quantize's affine quantization, bit for bit, in numpy: about a third less CPU than mlx's kernel.

mlx's CPU kernel (mlx/backend/cpu/quantized.cpp, `quantize`, mlx 0.31-0.32) walks one group at a
time in scalar code, dividing per weight. The same float32 operations, in the same order, on a
whole block of groups at once give the same bits: every step is one IEEE operation (no fused
multiply-add can form), rint rounds half to even in both, and the scales and biases round to the
weight's dtype to nearest even (mlx's own bfloat16 and float16 conversions). Per group of `g`:

    scale = max((max - min) / (2^bits - 1), 1e-7), negated unless |min| > |max|
    edge = min if |min| > |max| else max; q0 = rint(edge / scale)
    if q0 != 0: scale = edge / q0; bias = edge        else: bias = 0
    code = clamp(rint((w - bias) / scale), 0, 2^bits - 1), packed low bits first

Only 2, 4 and 8 bits (whole codes per uint32): 3, 5 and 6 bits straddle words, and 1 bit is
another mlx path (not affine_quantize); those stay with mlx. Finite inputs only: mlx's std::max
skips a NaN where numpy's spreads it. tests/test_affine.py compares both on edge cases (constant,
zero, tiny, huge, half-way groups).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

EPS = 1e-7  # mlx's floor on a group's scale
_CHUNK = 1 << 18  # weights per pass: the float32 working set (1 MB) stays in cache


def handles(bits: int) -> bool:
    """Whether `quantize_into` computes this width (else mx.quantize must)."""
    return bits in (2, 4, 8) and sys.byteorder == "little"  # (words are written as their two halves)


def quantize_into(x: np.ndarray, group_size: int, bits: int, weight: np.ndarray, scales: np.ndarray,
                  biases: np.ndarray) -> bool:
    """Quantize the rows `x` [rows, width] into `weight` (uint32 [rows, width * bits / 32], C-contiguous),
    `scales` and `biases` ([rows, width / group_size], x's dtype), a chunk of rows at a time.
    False, with the outputs part-written, where `x` holds a NaN or an Inf (mx.quantize's to handle)."""
    rows, width = x.shape
    step = max(1, _CHUNK // max(1, width))
    for start in range(0, rows, step):
        block = slice(start, start + step)
        if not _quantize_chunk(x[block], group_size, bits, weight[block], scales[block], biases[block]):
            return False
    return True


def _quantize_chunk(x: np.ndarray, group_size: int, bits: int, weight: np.ndarray, scales: np.ndarray,
                    biases: np.ndarray) -> bool:
    import numpy as np

    rows = x.shape[0]
    f = _groups_down_columns(x, group_size)  # [group_size, groups]
    hi, lo = f.max(axis=0), f.min(axis=0)
    if not (np.isfinite(hi).all() and np.isfinite(lo).all()):  # max and min spread NaN; Inf is one
        return False
    levels = np.float32((1 << bits) - 1)
    low_edge = np.abs(lo) > np.abs(hi)
    scale = np.maximum((hi - lo) / levels, np.float32(EPS))
    scale = np.where(low_edge, scale, -scale)
    edge = np.where(low_edge, lo, hi)
    q0 = np.rint(edge / scale)
    shifted = q0 != 0
    scale = np.where(shifted, edge / np.where(shifted, q0, np.float32(1)), scale)
    bias = np.where(shifted, edge, np.float32(0))
    f -= bias
    f /= scale
    np.rint(f, out=f)
    # mlx also clamps at 0, which finite inputs never pass: w - edge has the sign of the scale
    # (edge is the group's min or max), and with q0 == 0, w / scale >= edge / scale >= -0.5
    np.minimum(f, levels, out=f)
    halves = _halves(f, bits)
    # uint32 words as their (little-endian) 16-bit halves: group by group, low half first
    weight.view(np.uint16).reshape(f.shape[-1], -1)[...] = halves.T
    scales[...] = scale.reshape(rows, -1).astype(scales.dtype)  # rounded to nearest even, as mlx rounds
    biases[...] = bias.reshape(rows, -1).astype(biases.dtype)  # exact: an input value or zero
    return True


def _groups_down_columns(x: np.ndarray, group_size: int) -> np.ndarray:
    """x's values as float32 (exactly), one group per column ([position in the group, group]), so
    that reductions and per-group arithmetic run along contiguous rows, vectorized (a reduction
    over each short group is a loop per group). Transposed 8 bytes at a time (4 bf16 or f16, 2 f32):
    numpy's transposing copy costs per element moved, not per byte."""
    import ml_dtypes
    import numpy as np

    units = np.ascontiguousarray(x).reshape(-1, group_size).view(np.uint64)  # [groups, 8-byte units]
    moved = np.ascontiguousarray(units.T).view(x.dtype)  # [units, groups * values per unit]
    moved = moved.reshape(units.shape[1], units.shape[0], -1)  # [unit, group, value in unit]
    per_unit = moved.shape[-1]
    bf16 = x.dtype == ml_dtypes.bfloat16
    out = np.empty((units.shape[1], per_unit, units.shape[0]), np.uint32 if bf16 else np.float32)
    for i in range(per_unit):
        out[:, i] = moved[..., i].view(np.uint16) if bf16 else moved[..., i]
    if bf16:  # bfloat16 is float32's upper half
        out <<= 16
        out = out.view(np.float32)
    return out.reshape(group_size, -1)


def _halves(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [position in the group, group] (whole floats below 2^bits) -> each 16-bit half word's
    value [half word, group]: sum of its codes times 2^(bits * i), the first code lowest. Exact in
    float32 (below 2^16), so only these sums are converted to integers."""
    import numpy as np

    per_half = 16 // bits
    codes = codes.reshape(-1, per_half, codes.shape[-1])
    radix = np.float32(1 << bits)
    total = codes[:, -1].copy()
    for i in range(per_half - 2, -1, -1):
        total *= radix
        total += codes[:, i]
    return total

"""Ops that change numbers, not layout: dtype casts and FP8 block dequantisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from remap import dtypes
from remap.errors import RemapError
from remap.ops.base import Loss, NotInvertible, Op, TensorType


# (exponent bits, mantissa bits) of each float dtype.
# Every e4m3 code's float32 value: decoding by table lookup is exact (each code has one value).
_E4M3_TO_F32 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
# ... and of each pair of codes (a uint16, little-endian: the low byte is the first value), as one
# uint64: decoding two at a time halves the lookups. 512 KB, so it stays in cache.
_E4M3_PAIRS_TO_F32 = np.stack(np.meshgrid(_E4M3_TO_F32, _E4M3_TO_F32), -1).reshape(-1, 2).view(np.uint64).ravel()
_FLOAT_BITS = {"F8_E4M3": (4, 3), "F8_E5M2": (5, 2), "BF16": (8, 7), "F16": (5, 10), "F32": (8, 23), "F64": (11, 52)}


def _decode_e4m3(codes: np.ndarray) -> np.ndarray:
    """e4m3 codes -> their float32 values, exactly (~4x faster than ml_dtypes' cast)."""
    codes = np.ascontiguousarray(codes).view(np.uint8)
    if codes.shape[-1] % 2:
        return _E4M3_TO_F32[codes]
    return _E4M3_PAIRS_TO_F32[codes.view(np.uint16)].view(np.float32)


def _narrows(source: str, target: str) -> bool:
    """Whether some `source` value does not survive in `target`: fewer mantissa bits round, fewer
    exponent bits overflow (BF16 -> F16 keeps every mantissa bit but not 1e38)."""
    if source not in _FLOAT_BITS or target not in _FLOAT_BITS:
        return source in _FLOAT_BITS  # float -> integer drops the fraction
    return any(t < s for s, t in zip(_FLOAT_BITS[source], _FLOAT_BITS[target]))


@dataclass(frozen=True)
class Cast(Op):
    """Change dtype; narrowing (f32 -> bf16) is named as rounding in the plan."""

    name = "cast"
    per_slab = True
    dtype: str = "BF16"
    source: str | None = None  # the dtype being cast from: declared so the inverse can cast back

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtypes.canonical(self.dtype))

    def types(self, inputs: list[TensorType]) -> list[TensorType]:
        t = self._pick(inputs)
        if self.source is not None and dtypes.canonical(self.source) != t.dtype:
            raise RemapError(f"cast: input dtype is {t.dtype}", expected=dtypes.canonical(self.source))
        return self._replace(inputs, TensorType(t.shape, self.dtype))

    def apply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return self._replace(arrays, self._pick(arrays).astype(dtypes.numpy_dtype(self.dtype)))

    def loss(self, inputs: list[TensorType]) -> Loss | None:
        source = self._pick(inputs).dtype
        if _narrows(source, self.dtype):
            return Loss("rounding", f"input {self.input}: {source} -> {self.dtype}")
        return None

    @classmethod
    def invert(cls, raw: Mapping[str, Any]) -> list[dict]:
        if raw.get("source") is None:
            raise NotInvertible("cast needs `source` (the dtype it casts from) to be inverted")
        return [{"op": "cast", "dtype": raw["source"], "source": raw.get("dtype", "BF16"), "input": raw.get("input", 0)}]


@dataclass(frozen=True)
class DequantFP8(Op):
    """[e4m3 weight, f32 weight_scale_inv] -> weight in `dtype`: w * scale of its block.

    The scale tensor holds one factor per `block` tile, ceil(out/b0) x ceil(in/b1), so edges that
    are not a multiple of the block use the last tile's scale (as DeepSeek's fp8_cast_bf16 and
    mlx-lm do). Computed in float32 and rounded once to `dtype`.
    """

    name = "dequant_fp8"
    list_params = ("block",)
    block: tuple[int, ...] = (128, 128)
    dtype: str = "BF16"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtypes.canonical(self.dtype))
        if len(self.block) != 2 or min(self.block) < 1:
            raise RemapError(f"dequant_fp8: block {list(self.block)}", expected="two positive sizes, e.g. [128, 128]")

    def types(self, inputs: list[TensorType]) -> list[TensorType]:
        if self.input + 1 >= len(inputs):
            raise RemapError("dequant_fp8 needs the weight and its weight_scale_inv as consecutive inputs")
        w, s = inputs[self.input], inputs[self.input + 1]
        if w.dtype != "F8_E4M3" or len(w.shape) != 2:
            raise RemapError(f"dequant_fp8: weight is {w.dtype} {list(w.shape)}", expected="a 2-D F8_E4M3 tensor")
        blocks = tuple(-(-n // b) for n, b in zip(w.shape, self.block))
        if s.shape != blocks:
            raise RemapError(
                f"dequant_fp8: scale shape {list(s.shape)} for weight {list(w.shape)}",
                expected=f"{list(blocks)} (blocks of {list(self.block)})",
            )
        return [*inputs[: self.input], TensorType(w.shape, self.dtype), *inputs[self.input + 2 :]]

    def apply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        w, s = arrays[self.input], arrays[self.input + 1]
        rows, cols = w.shape
        b0, b1 = self.block
        out = np.empty((rows, cols), dtypes.numpy_dtype(self.dtype))
        # One band of b0 rows at a time (they share a row of scales), so the float32 values stay
        # in cache between decoding, scaling and rounding; edge tiles use their own scale.
        for k, start in enumerate(range(0, rows, b0)):
            band = _decode_e4m3(w[start : start + b0])
            band *= np.repeat(s[k].astype(np.float32), b1)[:cols]
            out[start : start + b0] = band  # rounded once, to nearest even
        return [*arrays[: self.input], out, *arrays[self.input + 2 :]]

    def loss(self, inputs: list[TensorType]) -> Loss | None:
        if self.dtype == "F32":
            return None
        return Loss("rounding", f"fp8 x block scale rounded to {self.dtype}")


@dataclass(frozen=True)
class Lossy(Op):
    """The tensor passes unchanged, but the target runtime computes with it differently, so the
    conversion changes the function here (a router whose scores become sigmoids; an RMSNorm that
    adds its eps inside the root). A claim no data can make hold: the report names it, and
    parity measures what it costs."""

    name = "lossy"
    per_slab = True
    reason: str = ""

    def types(self, inputs: list[TensorType]) -> list[TensorType]:
        self._pick(inputs)
        return list(inputs)

    def apply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return list(arrays)

    @classmethod
    def invert(cls, raw: Mapping[str, Any]) -> list[dict]:
        return [dict(raw)]  # the way back changes the function just as much

    def loss(self, inputs: list[TensorType]) -> Loss | None:
        return Loss("lossy", f"input {self.input}: used differently by the target runtime", self.reason)

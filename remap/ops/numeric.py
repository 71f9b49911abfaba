"""Ops that change numbers, not layout: dtype casts and FP8 block dequantisation."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from remap import dtypes
from remap.errors import RemapError
from remap.ops.base import Loss, NotInvertible, Op, TensorType, any_nonfinite

if TYPE_CHECKING:  # numpy is imported by the functions that compute on arrays (remap/ops/base.py)
    import numpy as np

# (exponent bits, mantissa bits) of each float dtype.
_FLOAT_BITS = {"F8_E4M3": (4, 3), "F8_E5M2": (5, 2), "BF16": (8, 7), "F16": (5, 10), "F32": (8, 23), "F64": (11, 52)}


@functools.cache
def _e4m3_tables() -> tuple[np.ndarray, np.ndarray]:
    """Every e4m3 code's float32 value (decoding by table lookup is exact: each code has one value),
    and each pair of codes' (a uint16, little-endian: the low byte is the first value) as one
    uint64: decoding two at a time halves the lookups. 512 KB, so it stays in cache."""
    import ml_dtypes
    import numpy as np

    single = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    pairs = np.stack(np.meshgrid(single, single), -1).reshape(-1, 2).view(np.uint64).ravel()
    return single, pairs


def _decode_e4m3(codes: np.ndarray) -> np.ndarray:
    """e4m3 codes -> their float32 values, exactly (~4x faster than ml_dtypes' cast)."""
    import numpy as np

    single, pairs = _e4m3_tables()
    codes = np.ascontiguousarray(codes).view(np.uint8)
    if codes.shape[-1] % 2:
        return single[codes]
    return pairs[codes.view(np.uint16)].view(np.float32)


def _made_nonfinite(source: np.ndarray, cast: np.ndarray, block: int = 1 << 22) -> int:
    """How many finite values of `source` are Inf or NaN in `cast` (given ones stay what they were),
    a block at a time: a whole tensor in float32 would double its memory."""
    import numpy as np

    before, after, made = source.reshape(-1), cast.reshape(-1), 0
    for start in range(0, before.size, block):
        finite = np.isfinite(before[start:start + block].astype(np.float32))
        made += int(np.count_nonzero(finite & ~np.isfinite(after[start:start + block].astype(np.float32))))
    return made


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
    finite_inputs = True  # refuses what it would make non-finite (overflow), unless `nonfinite: keep`
    param_schema = {"nonfinite": {"enum": ["refuse", "keep"]}}
    dtype: str = "BF16"
    source: str | None = None  # the dtype being cast from: declared so the inverse can cast back
    nonfinite: str = "refuse"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtypes.canonical(self.dtype))

    def types(self, inputs: list[TensorType]) -> list[TensorType]:
        t = self._pick(inputs)
        if self.source is not None and dtypes.canonical(self.source) != t.dtype:
            raise RemapError(f"cast: input dtype is {t.dtype}", expected=dtypes.canonical(self.source))
        return self._replace(inputs, TensorType(t.shape, self.dtype))

    def apply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import numpy as np

        source = self._pick(arrays)
        with np.errstate(over="ignore"):  # overflow is refused below, or kept when asked: no warning line
            cast = source.astype(dtypes.numpy_dtype(self.dtype))
        if self.nonfinite != "keep" and cast.dtype.kind in "fV" and any_nonfinite(cast):
            if made := _made_nonfinite(source, cast):
                raise RemapError(f"cast to {self.dtype}: finite values out of its range would become Inf or NaN "
                                 f"({made} of them)", expected=f"values within {self.dtype}'s range, a wider --dtype, "
                                 "or --allow-nonfinite to write them as torch's cast does")
        return self._replace(arrays, cast)

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


# Dtypes a scale may come in: floats as they are; E8M0 (a power of two per byte: DeepSeek's
# ue8m0 format, MX scales) decodes exactly, and a U8 scale is E8M0 bytes, as transformers reads one.
_SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0", "U8")


def _scale_values(scale: np.ndarray) -> np.ndarray:
    """A scale tensor's float32 values: 2^(byte - 127) for E8M0 bytes (0xFF is NaN)."""
    import ml_dtypes
    import numpy as np

    if scale.dtype == np.uint8:
        scale = scale.view(ml_dtypes.float8_e8m0fnu)
    return scale.astype(np.float32)


@dataclass(frozen=True)
class DequantFP8(Op):
    """[e4m3 weight, its scale] -> weight in `dtype`: w * scale.

    With `block`, the scale holds one factor per block tile, ceil(out/b0) x ceil(in/b1), so edges
    that are not a multiple of the block use the last tile's scale (DeepSeek's fp8_cast_bf16,
    mlx-lm, transformers' weight_scale_inv). With `block: null` it broadcasts: one factor for the
    tensor ([], [1], [1, 1]) or one per output row ([out, 1]) (compressed-tensors' and fbgemm's
    weight_scale, transformers' per-tensor weight_scale_inv, mlx-lm's broadcasting dequant).
    Computed in float32 and rounded once to `dtype` (through the scale's dtype first where that
    is a 16-bit float, as compressed-tensors computes).
    """

    name = "dequant_fp8"
    list_params = ("block",)
    block: tuple[int, ...] | None = (128, 128)
    dtype: str = "BF16"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtypes.canonical(self.dtype))
        if self.block is not None and (len(self.block) != 2 or min(self.block) < 1):
            raise RemapError(f"dequant_fp8: block {list(self.block)}",
                             expected="two positive sizes, e.g. [128, 128], or null (a broadcasting scale)")

    def types(self, inputs: list[TensorType]) -> list[TensorType]:
        if self.input + 1 >= len(inputs):
            raise RemapError("dequant_fp8 needs the weight and its scale as consecutive inputs")
        w, s = inputs[self.input], inputs[self.input + 1]
        if w.dtype != "F8_E4M3" or len(w.shape) != 2:
            raise RemapError(f"dequant_fp8: weight is {w.dtype} {list(w.shape)}", expected="a 2-D F8_E4M3 tensor")
        if s.dtype not in _SCALE_DTYPES:
            raise RemapError(f"dequant_fp8: scale is {s.dtype}", expected=" or ".join(_SCALE_DTYPES))
        if s.shape not in self._scale_shapes(w.shape):
            wanted = " or ".join(str(list(shape)) for shape in self._scale_shapes(w.shape))
            how = f"blocks of {list(self.block)}" if self.block else "one per tensor or per output row"
            raise RemapError(f"dequant_fp8: scale shape {list(s.shape)} for weight {list(w.shape)}",
                             expected=f"{wanted} ({how})")
        return [*inputs[: self.input], TensorType(w.shape, self.dtype), *inputs[self.input + 2 :]]

    def _scale_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        if self.block is not None:
            return (tuple(-(-n // b) for n, b in zip(shape, self.block)),)
        return (), (1,), (1, 1), (shape[0], 1)

    def apply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import ml_dtypes
        import numpy as np

        w, s = arrays[self.input], _scale_values(arrays[self.input + 1])
        # A 16-bit float scale: the product rounds to its dtype first, as compressed-tensors
        # computes in the scale's dtype (for bf16 the same bits: 4 x 8 significant bits are exact)
        narrow = arrays[self.input + 1].dtype
        narrow = narrow if narrow in (np.float16, ml_dtypes.bfloat16) else None
        out = np.empty(w.shape, dtypes.numpy_dtype(self.dtype))
        if self.block is not None:
            _dequant_by_table(w, s, self.block, narrow, out)
            return [*arrays[: self.input], out, *arrays[self.input + 2 :]]
        rows = w.shape[0]
        # One band of 128 rows at a time, so the float32 values stay in cache between decoding,
        # scaling and rounding.
        for start in range(0, rows, 128):
            band = _decode_e4m3(w[start : start + 128])  # times a [1, 1] or [rows, 1] column: this band's rows
            band *= s.reshape(-1, 1)[start : start + 128] if s.size == rows and s.size > 1 else s.reshape(())
            out[start : start + 128] = band if narrow is None else band.astype(narrow)  # rounded to nearest even
        return [*arrays[: self.input], out, *arrays[self.input + 2 :]]

    def loss(self, inputs: list[TensorType]) -> Loss | None:
        scale = inputs[self.input + 1].dtype if self.input + 1 < len(inputs) else "F32"
        if self.dtype == "F32" and scale not in ("BF16", "F16"):
            return None  # the float32 product, as every runtime computes it
        kind = "block scale" if self.block is not None else "scale"
        return Loss("rounding", f"fp8 x {kind} rounded to {self.dtype if self.dtype != 'F32' else scale}")


def _dequant_by_table(w: np.ndarray, s: np.ndarray, block: tuple[int, ...], narrow: Any, out: np.ndarray) -> None:
    """out = e4m3 codes `w` x their block's scale in `s`, rounded to out's dtype (through `narrow` first
    where given), by table: within one block every weight is one of 256 codes times one scale, so
    the 256 products of each block, computed as each weight's would be (float32 product, the same
    casts), are looked up by code: one gather per weight, bit for bit the product's rounding (NaN
    codes included). A band of b0 rows at a time: its tables, [blocks across, 256], stay in cache."""
    import numpy as np

    single, _ = _e4m3_tables()
    rows, cols = w.shape
    b0, b1 = block
    index = np.uint16 if s.shape[1] * 256 <= 1 << 16 else np.uint32
    offsets = (np.arange(cols) // b1 * 256).astype(index)  # each column's block's table
    codes = np.ascontiguousarray(w).view(np.uint8)
    for k, start in enumerate(range(0, rows, b0)):
        with np.errstate(over="ignore", invalid="ignore"):  # (codes no weight may hold: no warning)
            products = single * s[k][:, None]  # [blocks across, 256], float32
            table = (products if narrow is None else products.astype(narrow)).astype(out.dtype).reshape(-1)
        # (mode="clip": every index is in the table, and numpy buffers `out` for mode="raise")
        np.take(table, np.add(codes[start : start + b0], offsets, dtype=index), out=out[start : start + b0], mode="clip")


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

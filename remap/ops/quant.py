"""Ops that quantize and dequantize: MLX affine (weight / scales / biases, computed by mlx itself)
and DeepSeek-V3's FP8 block quantization (the inverse of `dequant_fp8`).

Both quantizations keep far fewer values than their input holds, so each names a
"quantization" loss; dequantizing only rounds (or is exact, where the output dtype can hold every
product). What survives a round trip is measured in tests/test_quant.py and written up in
docs/specs.md ("Quantization").
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from remap import dtypes
from remap.errors import RemapError
from remap.ops import affine
from remap.ops.base import Finding, Loss, Op, Shape, TensorType, any_nonfinite, max_abs, nonfinite, refuse_nonfinite
from remap.ops.numeric import DequantFP8
from remap.quant_sizes import MLX_BITS, MLX_GROUP_SIZES

if TYPE_CHECKING:  # numpy is imported by the functions that compute on arrays (remap/ops/base.py)
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

# What mx.quantize accepts in affine mode (its documented table, mlx 0.32).
MLX_MODES = ("affine",)
# The float dtypes mlx computes in; scales and biases come back in the weight's own dtype.
_MLX_FLOATS = ("BF16", "F16", "F32")

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
_CHUNK_BYTES = 8 << 20  # rows quantized per mlx call: small enough to stay in cache


# -- FP8 block quantization ---------------------------------------------------------------------


@dataclass(frozen=True)
class QuantFP8(Op):
    """float weight [out, in] -> [e4m3 weight, f32 weight_scale_inv] as DeepSeek-V3's checkpoints hold it.

    Per `block` tile (edge tiles partial): scale = amax / 448 in float32, weight = weight / scale
    rounded to nearest-even e4m3, saturating at +-448; `weight_scale_inv` stores the scale, so
    `dequant_fp8` multiplies. An all-zero tile gets scale 1.0 (as transformers' FP8 quantizer
    does): its codes are zeros, and zeros times any scale dequantize exactly.
    """

    name = "quant_fp8"
    list_params = ("block",)
    finite_inputs = True
    param_schema = {"nonfinite": {"enum": ["refuse", "keep"]}}
    block: tuple[int, ...] = (128, 128)
    nonfinite: str = "refuse"

    def __post_init__(self) -> None:
        if len(self.block) != 2 or min(self.block) < 1:
            raise RemapError(f"quant_fp8: block {list(self.block)}", expected="two positive sizes, e.g. [128, 128]")

    def types(self, inputs: list[TensorType]) -> list[TensorType]:
        t = self._pick(inputs)
        if t.dtype not in ("BF16", "F16", "F32") or len(t.shape) != 2:
            raise RemapError(f"quant_fp8: weight is {t.dtype} {list(t.shape)}",
                             expected="a 2-D BF16 | F16 | F32 tensor")
        blocks = tuple(-(-n // b) for n, b in zip(t.shape, self.block))
        codes, scales = TensorType(t.shape, "F8_E4M3"), TensorType(blocks, "F32")
        return [*inputs[: self.input], codes, scales, *inputs[self.input + 1 :]]

    def apply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import ml_dtypes
        import numpy as np

        x = self._pick(arrays).astype(np.float32)
        refuse_nonfinite(self, x)
        rows, cols = x.shape
        starts = [range(0, n, b) for n, b in zip(x.shape, self.block)]
        amax = np.maximum.reduceat(np.maximum.reduceat(np.abs(x), starts[0], axis=0), starts[1], axis=1)
        scale = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1.0)).astype(np.float32)
        per_weight = np.repeat(np.repeat(scale, self.block[0], 0)[:rows], self.block[1], 1)[:, :cols]
        # float32 division can land a hair past 448 for the tile's largest value: saturate, as
        # torch's e4m3 cast does (ml_dtypes would give NaN past 464)
        codes = np.clip(x / per_weight, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
        return [*arrays[: self.input], codes, scale, *arrays[self.input + 1 :]]

    def loss(self, inputs: list[TensorType]) -> Loss | None:
        t = self._pick(inputs)
        block = "x".join(map(str, self.block))
        return Loss("quantization", f"input {self.input}: {t.dtype} -> F8_E4M3 with a float32 scale per {block} block",
                    "e4m3 keeps 3 mantissa bits: |error| <= |w| / 16 + scale / 1024 per weight")

    def check(self, arrays: list[np.ndarray]) -> list[Finding]:
        import numpy as np

        x = self._pick(arrays)
        if (found := _nonfinite_finding(x)) is not None:
            return [found]
        restored = DequantFP8(self.input, self.block, "F32").apply(self.apply(arrays))[self.input]
        error = max_abs(x.astype(np.float32) - restored)
        return [Finding("quantization", self.loss([TensorType(x.shape, dtypes.dtype_name(x.dtype))]).what, error, None)]

    @classmethod
    def invert(cls, raw: Mapping[str, Any]) -> list[dict]:
        return [{"op": "dequant_fp8", "block": raw.get("block", [128, 128]), "input": raw.get("input", 0)}]


def _nonfinite_finding(x: np.ndarray) -> Finding | None:
    """A broken quantization claim where the input holds NaN or Inf (what they would become is
    not a rounding)."""
    nan, inf = nonfinite(x)
    if not (nan or inf):
        return None
    return Finding("quantization", f"{nan} NaN and {inf} Inf values in the input", float("inf"), False)


# -- numpy <-> mlx ------------------------------------------------------------------------------


@functools.cache
def _mx() -> Any:
    import mlx.core as mx  # on first use: planning never needs mlx

    # mlx keeps freed buffers for reuse; a conversion quantizing tensor after tensor must not hold
    # them all. A zero cache limit frees each at once. (mx.clear_cache() after each call did the
    # same but serialized the threads that work side by side.)
    mx.set_cache_limit(0)
    return mx


def _to_mlx(array: np.ndarray) -> Any:
    import ml_dtypes
    import numpy as np

    mx = _mx()
    array = np.ascontiguousarray(array)
    if array.dtype == ml_dtypes.bfloat16:  # mlx reads no ml_dtypes: move the bits as uint16
        return mx.array(array.view(np.uint16)).view(mx.bfloat16)
    return mx.array(array)


def _view(x: Any) -> np.ndarray:
    """A numpy view of an mlx array's memory (it evaluates the array; the view keeps it alive)."""
    import ml_dtypes
    import numpy as np

    mx = _mx()
    if x.dtype == mx.bfloat16:  # numpy has no bfloat16 of its own: read the bits as uint16
        return np.asarray(x.view(mx.uint16)).view(ml_dtypes.bfloat16)
    return np.asarray(x)


_CORES = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@functools.cache
def _threads() -> ThreadPoolExecutor:
    """A thread per core, to evaluate blocks of one tensor side by side. Since mlx 0.31.2 each
    thread has its own default stream, so blocks made and evaluated in one thread run in parallel."""
    from concurrent.futures import ThreadPoolExecutor  # (and its logging): only where mlx quantizes

    return ThreadPoolExecutor(_CORES, thread_name_prefix="remap-mlx")


def _by_row_blocks(fill: Callable[[list[np.ndarray], list[np.ndarray]], None], inputs: list[np.ndarray],
                   outputs: list[np.ndarray]) -> None:
    """Fill `outputs` (2-D) with `fill(input rows, output rows)` run on blocks of rows, side by side
    on the threads. For ops whose rows are independent (a quantization group never crosses a row),
    so the bytes equal one call on the whole tensor, while the working memory stays one block per
    thread (an embedding of 129280 x 7168 would otherwise take several GB of temporaries) and every
    core gets work (mlx's CPU kernels are single-threaded; numpy's release the GIL)."""
    rows = inputs[0].shape[0]
    row_bytes = max(1, sum(a[:1].nbytes for a in inputs))
    step = max(1, min(_CHUNK_BYTES // row_bytes, -(-rows // _CORES)))

    def run(block: slice) -> None:
        fill([a[block] for a in inputs], [o[block] for o in outputs])

    list(_threads().map(run, [slice(start, start + step) for start in range(0, rows, step)]))


def _store(outputs: list[np.ndarray], results: Sequence[Any]) -> None:
    """mlx results into their numpy places (copied once)."""
    for out, result in zip(outputs, results):
        out[...] = _view(result)


def _mlx_dtype(name: str) -> Any:
    mx = _mx()
    return {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32}[name]


# -- MLX affine ---------------------------------------------------------------------------------


def _check_mlx_params(op: Op, bits: int, group_size: int, mode: str) -> None:
    if bits not in MLX_BITS:
        raise RemapError(f"{op.name}: bits {bits!r}", expected=" | ".join(map(str, MLX_BITS)))
    if group_size not in MLX_GROUP_SIZES:
        raise RemapError(f"{op.name}: group_size {group_size!r}", expected=" | ".join(map(str, MLX_GROUP_SIZES)))
    if mode not in MLX_MODES:
        raise RemapError(f"{op.name}: mode {mode!r}", expected=" | ".join(MLX_MODES))


@dataclass(frozen=True)
class QuantizeMLX(Op):
    """float weight [..., out, in] -> [weight U32 [..., out, in*bits/32], scales [..., out, in/group_size],
    biases (as scales)], in place of the input: `mx.quantize` itself, so the bytes are mlx-lm's.

    Computed on the CPU stream, whatever the default device, so the output does not depend on the
    machine. Scales and biases keep the weight's dtype (what mlx-lm writes). Quantizing a stack of
    experts [E, out, in] at once equals quantizing each expert and stacking: groups never cross rows.
    """

    name = "quantize_mlx"
    per_slab = True
    finite_inputs = True
    int_params = ("bits", "group_size")
    param_schema = {"mode": {"enum": list(MLX_MODES)}, "nonfinite": {"enum": ["refuse", "keep"]}}
    bits: int = 4  # mlx-lm's defaults
    group_size: int = 64
    mode: str = "affine"
    nonfinite: str = "refuse"

    def __post_init__(self) -> None:
        _check_mlx_params(self, self.bits, self.group_size, self.mode)

    def types(self, inputs: list[TensorType]) -> list[TensorType]:
        t = self._pick(inputs)
        if t.dtype not in _MLX_FLOATS or len(t.shape) < 2:
            raise RemapError(f"quantize_mlx: input is {t.dtype} {list(t.shape)}",
                             expected=f"a {' | '.join(_MLX_FLOATS)} tensor of two or more axes")
        *lead, width = t.shape
        if width % self.group_size:
            raise RemapError(f"quantize_mlx: input width {width} (shape {list(t.shape)}) is not a multiple of "
                             "group_size", expected=f"a multiple of {self.group_size}")
        weight = TensorType((*lead, width * self.bits // 32), "U32")
        scales = TensorType((*lead, width // self.group_size), t.dtype)
        return [*inputs[: self.input], weight, scales, scales, *inputs[self.input + 1 :]]

    def apply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import numpy as np

        mx = _mx()
        x = self._pick(arrays)
        rows = x.reshape(-1, x.shape[-1])
        width = rows.shape[1]
        outputs = [np.empty((rows.shape[0], width * self.bits // 32), np.uint32),
                   *(np.empty((rows.shape[0], width // self.group_size), x.dtype) for _ in range(2))]

        def quantize(blocks: list[np.ndarray], outs: list[np.ndarray]) -> None:
            # mlx's arithmetic in numpy where it has it (less CPU); it declines a block holding NaN or
            # Inf, checked here, on the block's thread (a whole embedding as float32 would double memory)
            if affine.handles(self.bits) and affine.quantize_into(blocks[0], self.group_size, self.bits, *outs):
                return
            if self.nonfinite != "keep" and any_nonfinite(blocks[0]):
                refuse_nonfinite(self, x)
            _store(outs, mx.quantize(_to_mlx(blocks[0]), self.group_size, self.bits, mode=self.mode, stream=mx.cpu))

        _by_row_blocks(quantize, [rows], outputs)
        outputs = [o.reshape(*x.shape[:-1], -1) for o in outputs]
        return [*arrays[: self.input], *outputs, *arrays[self.input + 1 :]]

    def loss(self, inputs: list[TensorType]) -> Loss | None:
        t = self._pick(inputs)
        what = f"input {self.input}: {t.dtype} -> {self.bits}-bit {self.mode}, groups of {self.group_size}"
        return Loss("quantization", what, "2^bits levels per group: |error| <= |scale| + |bias| / 256 per weight")

    def check(self, arrays: list[np.ndarray]) -> list[Finding]:
        import numpy as np

        x = self._pick(arrays)
        if (found := _nonfinite_finding(x)) is not None:
            return [found]
        restored = DequantizeMLX(self.input, self.bits, self.group_size, self.mode).apply(self.apply(arrays))
        error = max_abs(x.astype(np.float32) - restored[self.input].astype(np.float32))
        return [Finding("quantization", self.loss([TensorType(x.shape, dtypes.dtype_name(x.dtype))]).what, error, None)]

    @classmethod
    def invert(cls, raw: Mapping[str, Any]) -> list[dict]:
        # dequantizing without `dtype` gives back the quantized weight's own dtype (the scales')
        return [{"op": "dequantize_mlx", **_mlx_raw_params(raw)}]


@dataclass(frozen=True)
class DequantizeMLX(Op):
    """[weight U32, scales, biases] (consecutive, from `input`) -> the float weight, scale * q + bias.

    Without `dtype` this is `mx.dequantize` in the scales' dtype, bit for bit what
    `mlx_lm.convert --dequantize` writes (mlx rounds the product and the sum separately there).
    With `dtype: F32` from 16-bit scales the scales are widened first and the result is exact:
    q * scale needs at most 19 significant bits and mx.quantize makes |bias| >= |scale|, so the sum
    fits float32's 24.
    """

    name = "dequantize_mlx"
    per_slab = True
    int_params = ("bits", "group_size")
    param_schema = {"mode": {"enum": list(MLX_MODES)}}
    bits: int = 4
    group_size: int = 64
    mode: str = "affine"
    dtype: str | None = None  # default: the scales' dtype

    def __post_init__(self) -> None:
        _check_mlx_params(self, self.bits, self.group_size, self.mode)
        if self.dtype is not None:
            dtype = dtypes.canonical(str(self.dtype))
            if dtype not in _MLX_FLOATS:
                raise RemapError(f"dequantize_mlx: dtype {self.dtype}", expected=" | ".join(_MLX_FLOATS))
            object.__setattr__(self, "dtype", dtype)

    def types(self, inputs: list[TensorType]) -> list[TensorType]:
        if not 0 <= self.input <= len(inputs) - 3:
            raise RemapError("dequantize_mlx needs the weight, its scales and its biases as consecutive inputs")
        w, s, b = inputs[self.input : self.input + 3]
        if w.dtype != "U32" or len(w.shape) < 2:
            raise RemapError(f"dequantize_mlx: weight is {w.dtype} {list(w.shape)}",
                             expected="a U32 tensor of two or more axes")
        if s.dtype not in _MLX_FLOATS or b != s:
            raise RemapError(f"dequantize_mlx: scales {s.dtype} {list(s.shape)}, biases {b.dtype} {list(b.shape)}",
                             expected=f"the same shape and dtype, one of {' | '.join(_MLX_FLOATS)}")
        *lead, packed = w.shape
        width = packed * 32 // self.bits
        expected: Shape = (*lead, width // self.group_size)
        if packed * 32 % self.bits or width % self.group_size or s.shape != expected:
            raise RemapError(f"dequantize_mlx: scales {list(s.shape)} for packed weight {list(w.shape)}",
                             expected=f"{list(expected)} ({self.bits} bits, groups of {self.group_size})")
        out = TensorType((*lead, width), self.dtype or s.dtype)
        return [*inputs[: self.input], out, *inputs[self.input + 3 :]]

    def apply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import numpy as np

        mx = _mx()
        w, scales, biases = arrays[self.input : self.input + 3]
        target = self.dtype or dtypes.dtype_name(scales.dtype)
        # widening first is exact (see the class doc), where mlx's own dtype= is not
        widen = (lambda a: a.astype(mx.float32)) if target == "F32" else (lambda a: a)

        def dequantize(blocks: list[np.ndarray], outs: list[np.ndarray]) -> None:
            w, s, b = (_to_mlx(a) for a in blocks)
            out = mx.dequantize(w, widen(s), widen(b), self.group_size, self.bits, mode=self.mode, stream=mx.cpu)
            _store(outs, [out.astype(_mlx_dtype(target), stream=mx.cpu)])

        *lead, packed = w.shape
        out = np.empty((int(np.prod(lead)), packed * 32 // self.bits), dtypes.numpy_dtype(target))
        _by_row_blocks(dequantize, [a.reshape(-1, a.shape[-1]) for a in (w, scales, biases)], [out])
        return [*arrays[: self.input], out.reshape(*lead, -1), *arrays[self.input + 3 :]]

    def loss(self, inputs: list[TensorType]) -> Loss | None:
        scales = inputs[self.input + 1].dtype
        target = self.dtype or scales
        if target == "F32" and scales in ("BF16", "F16"):
            return None
        return Loss("rounding", f"scale * q + bias rounded to {target}")

    @classmethod
    def invert(cls, raw: Mapping[str, Any]) -> list[dict]:
        # not exact in general: mx.quantize is not idempotent (docs/specs.md, "Quantization")
        return [{"op": "quantize_mlx", **_mlx_raw_params(raw)}]


def _mlx_raw_params(raw: Mapping[str, Any]) -> dict[str, Any]:
    params = {key: raw[key] for key in ("bits", "group_size", "mode") if key in raw}
    return {**params, "input": raw.get("input", 0)}

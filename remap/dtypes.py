"""safetensors dtype names <-> numpy dtypes (bf16 and fp8 through ml_dtypes)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from remap.errors import RemapError

NUMPY = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in NUMPY.items()}
FLOATS = ("F8_E4M3", "F8_E5M2", "BF16", "F16", "F32", "F64")
# Friendly spellings accepted on the command line and in specs.
ALIASES = {"bfloat16": "BF16", "bf16": "BF16", "float16": "F16", "fp16": "F16", "f16": "F16",
           "float32": "F32", "fp32": "F32", "f32": "F32", "float8_e4m3fn": "F8_E4M3", "fp8": "F8_E4M3"}


def numpy_dtype(name: str) -> np.dtype:
    try:
        return NUMPY[name]
    except KeyError:
        raise RemapError(f"unknown dtype '{name}'", expected=", ".join(NUMPY)) from None


def dtype_name(dtype: np.dtype) -> str:
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        raise RemapError(f"no safetensors dtype for numpy {dtype}") from None


def canonical(name: str) -> str:
    """'bfloat16' / 'bf16' / 'BF16' -> 'BF16'."""
    key = ALIASES.get(name.lower(), name.upper())
    numpy_dtype(key)
    return key


def itemsize(name: str) -> int:
    return numpy_dtype(name).itemsize


def is_float(name: str) -> bool:
    return name in FLOATS


def bits(name: str) -> int:
    return itemsize(name) * 8

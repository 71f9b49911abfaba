"""The safetensors dtypes: names, sizes, and the numpy (ml_dtypes) types that hold them.

One table for the whole package: io reads and writes bytes by it, ops compute in its numpy types,
specs and the CLI name dtypes by its names (with friendly aliases: bf16, float32, fp8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from remap.errors import RemapError

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its size in bits and the numpy dtype that holds it (None when
    numpy has no packed form, as for the 4- and 6-bit microscaling formats)."""

    name: str
    bits: int

    @property
    def numpy(self) -> np.dtype | None:
        return _numpy_types()[self.name]


# In the order of the crate's `Dtype` enum, which is increasing alignment: writers sort tensors
# by this order (descending) so every tensor starts aligned to its element size. With each, the
# module and name of the numpy type that holds it.
_ROWS = (
    ("BOOL", 8, "numpy", "bool_"),
    ("F4", 4, None, None),
    ("F6_E2M3", 6, None, None),
    ("F6_E3M2", 6, None, None),
    ("U8", 8, "numpy", "uint8"),
    ("I8", 8, "numpy", "int8"),
    ("F8_E5M2", 8, "ml_dtypes", "float8_e5m2"),
    ("F8_E4M3", 8, "ml_dtypes", "float8_e4m3fn"),
    ("F8_E8M0", 8, "ml_dtypes", "float8_e8m0fnu"),
    ("F8_E4M3FNUZ", 8, "ml_dtypes", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", 8, "ml_dtypes", "float8_e5m2fnuz"),
    ("I16", 16, "numpy", "int16"),
    ("U16", 16, "numpy", "uint16"),
    ("F16", 16, "numpy", "float16"),
    ("BF16", 16, "ml_dtypes", "bfloat16"),
    ("I32", 32, "numpy", "int32"),
    ("U32", 32, "numpy", "uint32"),
    ("F32", 32, "numpy", "float32"),
    ("C64", 64, "numpy", "complex64"),
    ("F64", 64, "numpy", "float64"),
    ("I64", 64, "numpy", "int64"),
    ("U64", 64, "numpy", "uint64"),
)
DTYPES: dict[str, DType] = {name: DType(name, bits) for name, bits, _, _ in _ROWS}


@lru_cache(maxsize=1)
def _numpy_types() -> dict[str, Any]:
    """name -> numpy dtype (or None), built on first use: reading headers and planning need only
    names and sizes, and numpy with ml_dtypes costs ~0.1 s to import."""
    import ml_dtypes
    import numpy as np

    modules = {"numpy": np, "ml_dtypes": ml_dtypes}
    return {name: None if module is None else np.dtype(getattr(modules[module], attr))
            for name, _, module, attr in _ROWS}


@lru_cache(maxsize=1)
def _by_numpy_name() -> dict[str, str]:
    # numpy's dtype names equal torch's ("bfloat16", "float8_e4m3fn"), so one table names both.
    return {d.numpy.name: d.name for d in DTYPES.values() if d.numpy is not None}


def safetensors_dtype(numpy_or_torch_name: str) -> str | None:
    """The safetensors dtype for a numpy dtype name ("bfloat16") or a torch dtype as text
    ("torch.bfloat16"); None if safetensors has none."""
    return _by_numpy_name().get(numpy_or_torch_name.removeprefix("torch."))


def byte_size(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes that `shape` elements of `dtype` take; RemapError if they do not fill whole bytes."""
    bits = math.prod(shape) * DTYPES[dtype].bits
    if bits % 8:
        raise RemapError(f"{math.prod(shape)} elements of {dtype} do not fill whole bytes", expected="whole bytes")
    return bits // 8


# Friendly spellings accepted on the command line and in specs.
ALIASES = {"bfloat16": "BF16", "bf16": "BF16", "float16": "F16", "fp16": "F16", "f16": "F16",
           "float32": "F32", "fp32": "F32", "f32": "F32", "float8_e4m3fn": "F8_E4M3", "fp8": "F8_E4M3",
           "uint32": "U32"}
FLOATS = ("F8_E4M3", "F8_E5M2", "BF16", "F16", "F32", "F64")


# The dtypes numpy holds, known from the table without importing numpy (a plan checks dtype names).
_HELD = tuple(name for name, _, module, _ in _ROWS if module is not None)


def _check_held(name: str) -> None:
    if name not in _HELD:
        raise RemapError(f"unknown dtype '{name}'", expected=", ".join(_HELD))


def numpy_dtype(name: str) -> np.dtype:
    _check_held(name)
    return DTYPES[name].numpy


def dtype_name(dtype: np.dtype) -> str:
    import numpy as np

    name = _by_numpy_name().get(np.dtype(dtype).name)
    if name is None:
        raise RemapError(f"no safetensors dtype for numpy {dtype}")
    return name


def canonical(name: str) -> str:
    """'bfloat16' / 'bf16' / 'BF16' -> 'BF16'."""
    key = ALIASES.get(name.lower(), name.upper())
    _check_held(key)
    return key


def itemsize(name: str) -> int:
    return numpy_dtype(name).itemsize


def is_float(name: str) -> bool:
    return name in FLOATS

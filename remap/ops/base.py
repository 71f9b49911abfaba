"""What every op is: a small pure step on the list of tensors a rule is building.

A rule starts with its source tensors as a list, in `from` order; each op takes that list and
returns a new one (most act on one element, picked by `input`). An op knows four things:
- `types`: output shapes and dtypes from input shapes and dtypes (planning reads no bytes);
- `apply`: the numpy computation (pure: no I/O);
- `invert`: the op(s) that undo it, written as spec YAML (so `remap invert` can emit a spec);
- `loss`: what it discards, with the claim that makes discarding safe (or "lossy").

Ops are built from a YAML mapping whose values may be expressions over the config; `build`
evaluates them once at plan time, so a planned op holds plain integers.

Defining an Op subclass with a `name` registers it (REGISTRY): specs can use it, and the op part
of schemas/spec.schema.json is generated from the classes (remap/ops/schema.py).

numpy (and ml_dtypes) are imported by the functions that compute on arrays (`apply`, `check` and
their helpers), in every op module: planning from headers (`report`, `inspect`, a convert's plan)
runs `types` and `loss` only, and skips their ~70 ms of start-up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from operator import itemgetter
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping, Sequence

from remap.dtypes import byte_size
from remap.errors import RemapError
from remap.expr import evaluate, evaluate_int, names_in

if TYPE_CHECKING:
    import numpy as np

Shape = tuple[int, ...]

# What a discarded piece of data is claimed to be. Only "lossy" changes the function; the
# others are promises that `--check-data` verifies where data can show it.
CLAIMS = ("zero", "redundant", "unused", "lossy")


@dataclass(frozen=True)
class TensorType:
    shape: Shape
    dtype: str  # safetensors dtype name: BF16, F32, F8_E4M3, ...

    @property
    def nbytes(self) -> int:
        return byte_size(self.dtype, self.shape)

    def with_shape(self, shape: Sequence[int]) -> "TensorType":
        return TensorType(tuple(int(s) for s in shape), self.dtype)


def tensor_types(names: Iterable[str], shapes: Iterable[Sequence[int]], dtypes: Iterable[str]) -> dict[str, TensorType]:
    """name -> TensorType, from the names and their shapes and dtypes: one object per distinct
    type. The 45k experts of one shape share theirs, so a step tells that its types are the step
    before's by identity. (Columns, so that the 140k tensors of Kimi-K2 map in C.)"""
    shapes, dtypes = list(shapes), list(dtypes)  # (held while their ids key them below)
    # keyed by the shape object's id: a header reader shares one tuple among a file's tensors of
    # one shape, so 92k keys are a few thousand, and ints hash in C where tuples do not. Where a
    # shape object goes with one dtype (as a header's do), its id alone is the key; else with the dtype.
    ids = list(map(id, shapes))
    dtype_of = dict(zip(ids, dtypes))
    if list(map(dtype_of.__getitem__, ids)) == dtypes:
        keys, dtype_for = ids, dtype_of.__getitem__
    else:
        keys, dtype_for = list(zip(ids, dtypes)), itemgetter(1)
    alike: dict[tuple, TensorType] = {}  # (shape, dtype) -> its one TensorType
    types: dict = {}
    for key, shape in dict(zip(keys, shapes)).items():
        kind = (tuple(shape), dtype_for(key))
        types[key] = alike.setdefault(kind, TensorType(*kind))
    return dict(zip(names, map(types.__getitem__, keys)))


@dataclass(frozen=True)
class Loss:
    """Data a step discards or changes, and why that is (or is not) safe."""

    claim: str  # one of CLAIMS; "rounding" for a narrowing cast; "quantization" for a quantizer;
    # "low_rank" for a factorization (exact while the matrix has at most that rank)
    what: str  # human description: "rows 32:64 of each head of input 0"
    reason: str = ""


@dataclass(frozen=True)
class Finding:
    """What the bytes say about a claim: the largest magnitude the claim says is irrelevant."""

    claim: str
    what: str
    magnitude: float  # max |discarded| for zero, max |difference| for redundant, ...
    holds: bool | None  # None where data cannot tell (an "unused" claim)


class NotInvertible(RemapError):
    pass


# Every op class by name, in definition order: the schema's op enum lists them in this order, so
# "unknown op" messages do too (remap/ops/__init__.py imports the op modules in a fixed order).
_REGISTRY: dict[str, type["Op"]] = {}
REGISTRY: Mapping[str, type["Op"]] = MappingProxyType(_REGISTRY)  # read-only: classes register themselves


@dataclass(frozen=True)
class Op:
    name: ClassVar[str]
    # Parameters that are size expressions (evaluated to int) or lists of them.
    int_params: ClassVar[tuple[str, ...]] = ()
    list_params: ClassVar[tuple[str, ...]] = ()

    # True where applying the op to each slab along axis 0 and stacking the results equals
    # applying it to the whole: a later stage may then run it on an earlier stage's stacked
    # tensor one slab at a time (compute.step_pieces).
    per_slab: ClassVar[bool] = False

    # True for an op that would spread a NaN or Inf (a quantizer: one NaN makes its whole group NaN,
    # an Inf moves its block's scale and zeroes its neighbours) or make one (a cast that overflows):
    # it refuses them unless built with `nonfinite: keep` (what `--allow-nonfinite` sets).
    finite_inputs: ClassVar[bool] = False

    # JSON Schema of a parameter where the default does not fit (an enum, a list of literal
    # integers); see remap/ops/schema.py for the defaults.
    param_schema: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    input: int = 0  # which element of the list the op acts on, for single-input ops

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:  # a shared base for ops, not an op
            return
        known = _REGISTRY.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"op '{name}' is defined twice: {known.__module__}.{known.__qualname__} and "
                            f"{cls.__module__}.{cls.__qualname__}")
        _REGISTRY[name] = cls  # the same class again is a module reload: the new one replaces it

    @classmethod
    def build(cls, raw: Mapping[str, Any], names: Mapping[str, Any]) -> "Op":
        values: dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in raw.items():
            if key == "op":
                continue
            if key not in known:
                raise RemapError(f"op '{cls.name}' has no parameter '{key}'", expected=", ".join(sorted(known)))
            if key in cls.int_params or key == "input":
                values[key] = evaluate_int(value, names)
            elif key in cls.list_params:
                if isinstance(value, str):  # one expression giving the whole list (or null: none)
                    value = evaluate(value, names)
                values[key] = None if value is None else tuple(evaluate_int(v, names) for v in _as_list(value))
            else:  # words (claim, dtype, reason) are literal, never expressions
                values[key] = value
        try:
            return cls(**values)
        except TypeError as exc:
            raise RemapError(f"op '{cls.name}': {exc}") from None

    @classmethod
    def names_read(cls, raw: Mapping[str, Any]) -> set[str]:
        """The config (or rule variable) names this op's expressions read."""
        names: set[str] = set()
        for key in (*cls.int_params, *cls.list_params, "input"):
            for value in _as_list(raw.get(key)):
                names |= names_in(value)
        return names

    # -- the four things an op knows -------------------------------------------------------
    def types(self, inputs: list[TensorType]) -> list[TensorType]:
        raise NotImplementedError

    def apply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    @classmethod
    def invert(cls, raw: Mapping[str, Any]) -> list[dict]:
        raise NotInvertible(f"op '{cls.name}' has no inverse")

    def loss(self, inputs: list[TensorType]) -> Loss | None:
        return None

    def check(self, arrays: list[np.ndarray]) -> list[Finding]:
        """Measure what `loss` discards, on real data (for --check-data)."""
        return []

    # -- helpers for single-input ops ------------------------------------------------------
    def _pick(self, items: list) -> Any:
        if not 0 <= self.input < len(items):
            raise RemapError(
                f"op '{self.name}' input {self.input} out of range", expected=f"0..{len(items) - 1}"
            )
        return items[self.input]

    def _replace(self, items: list, value: Any) -> list:
        return [value if k == self.input else item for k, item in enumerate(items)]

    def _axis(self, shape: Shape, axis: int) -> int:
        if not -len(shape) <= axis < len(shape):
            raise RemapError(f"op '{self.name}': axis {axis} out of range for shape {list(shape)}")
        return axis % len(shape)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def expr_text(value: Any) -> str:
    """An expression as text, parenthesised so it can be combined into a larger one."""
    return f"({value})" if isinstance(value, str) else str(value)


def nonfinite(array: np.ndarray, block: int = 1 << 22) -> tuple[int, int]:
    """(NaN count, Inf count) of a float array, `block` values at a time (bf16 has no numpy float
    kind: a whole tensor converted to float32 at once would double its memory)."""
    import numpy as np

    flat, nan, inf = np.asarray(array).reshape(-1), 0, 0
    for start in range(0, flat.size, block):
        values = flat[start:start + block]
        values = values.astype(np.float32) if values.dtype.kind != "f" else values
        nan += int(np.isnan(values).sum())
        inf += int(np.isinf(values).sum())
    return nan, inf


# bits of the exponent of 2-byte floats: all ones is NaN or Inf (a test on the integers, no float32 copy)
_EXPONENT = {"bfloat16": 0x7F80, "float16": 0x7C00}


def any_nonfinite(array: np.ndarray) -> bool:
    """Whether a float array holds a NaN or an Inf, as cheaply as its dtype allows."""
    import numpy as np

    mask = _EXPONENT.get(array.dtype.name)
    if mask is None:
        return any(nonfinite(array))
    return bool(((np.ascontiguousarray(array).view(np.uint16) & mask) == mask).any())


def refuse_nonfinite(op: "Op", array: np.ndarray) -> None:
    """An error naming what the op would do to non-finite inputs, unless it keeps them."""
    if getattr(op, "nonfinite", "refuse") == "keep":
        return
    nan, inf = nonfinite(array)
    if nan or inf:
        raise RemapError(f"{op.name}: {nan} NaN and {inf} Inf values in the input; quantizing would spread them "
                         "over their groups silently", expected="finite weights, or --allow-nonfinite "
                         "(then --check-data lists where they are)")


def max_abs(array: np.ndarray) -> float:
    import numpy as np

    return float(np.max(np.abs(array.astype(np.float32)))) if array.size else 0.0

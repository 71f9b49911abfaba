"""Ops that only change how a tensor's elements are grouped: per-head views and transposes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from remap.errors import RemapError
from remap.ops.base import NotInvertible, Op, TensorType


@dataclass(frozen=True)
class SplitHeads(Op):
    """[.., H*d, ..] -> [.., H, d, ..]: view one axis as heads (what builds kv_b_proj per head)."""

    name = "split_heads"
    int_params = ("heads", "axis")
    heads: int = 1
    axis: int = 0

    def types(self, inputs: list[TensorType]) -> list[TensorType]:
        t = self._pick(inputs)
        axis = self._axis(t.shape, self.axis)
        if self.heads <= 0 or t.shape[axis] % self.heads:
            raise RemapError(
                f"split_heads: axis {axis} of shape {list(t.shape)} does not split into {self.heads} heads",
                expected=f"a multiple of {self.heads} on axis {axis}",
            )
        shape = t.shape[:axis] + (self.heads, t.shape[axis] // self.heads) + t.shape[axis + 1 :]
        return self._replace(inputs, t.with_shape(shape))

    def apply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        x = self._pick(arrays)
        axis = self.axis % x.ndim
        shape = x.shape[:axis] + (self.heads, x.shape[axis] // self.heads) + x.shape[axis + 1 :]
        return self._replace(arrays, x.reshape(shape))

    @classmethod
    def invert(cls, raw: Mapping[str, Any]) -> list[dict]:
        # Counted from the end, the heads axis sits one further left once d follows it.
        return [_with(raw, op="merge_heads", axis=_shift_negative(raw.get("axis", 0), -1))]


@dataclass(frozen=True)
class MergeHeads(Op):
    """[.., H, d, ..] -> [.., H*d, ..]: merge `axis` with the axis after it."""

    name = "merge_heads"
    int_params = ("heads", "axis")
    axis: int = 0
    heads: int | None = None  # optional check, and what the inverse splits back into

    def types(self, inputs: list[TensorType]) -> list[TensorType]:
        t = self._pick(inputs)
        axis = self._axis(t.shape, self.axis)
        if axis + 1 >= len(t.shape):
            raise RemapError(f"merge_heads: shape {list(t.shape)} has no axis after {axis} to merge")
        if self.heads is not None and t.shape[axis] != self.heads:
            raise RemapError(f"merge_heads: axis {axis} of shape {list(t.shape)} is not {self.heads} heads",
                             expected=f"{self.heads} on axis {axis}")
        shape = t.shape[:axis] + (t.shape[axis] * t.shape[axis + 1],) + t.shape[axis + 2 :]
        return self._replace(inputs, t.with_shape(shape))

    def apply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        x = self._pick(arrays)
        axis = self.axis % x.ndim
        shape = x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2 :]
        return self._replace(arrays, x.reshape(shape))

    @classmethod
    def invert(cls, raw: Mapping[str, Any]) -> list[dict]:
        if raw.get("heads") is None:
            raise NotInvertible("merge_heads needs `heads` to be inverted")
        return [_with(raw, op="split_heads", axis=_shift_negative(raw.get("axis", 0), +1))]


@dataclass(frozen=True)
class Transpose(Op):
    """Permute axes (`axes` as in numpy.transpose; default reverses a 2-D tensor)."""

    name = "transpose"
    list_params = ("axes",)
    # literal integers, not expressions: `invert` computes the inverse permutation from them
    param_schema = {"axes": {"type": "array", "items": {"type": "integer"}}}
    axes: tuple[int, ...] = (1, 0)

    def types(self, inputs: list[TensorType]) -> list[TensorType]:
        t = self._pick(inputs)
        if sorted(self.axes) != list(range(len(t.shape))):
            raise RemapError(f"transpose: axes {list(self.axes)} are not a permutation for shape {list(t.shape)}",
                             expected=f"a permutation of 0..{len(t.shape) - 1}")
        return self._replace(inputs, t.with_shape([t.shape[a] for a in self.axes]))

    def apply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return self._replace(arrays, np.ascontiguousarray(self._pick(arrays).transpose(self.axes)))

    @classmethod
    def invert(cls, raw: Mapping[str, Any]) -> list[dict]:
        axes = [int(a) for a in raw.get("axes", (1, 0))]
        return [_with(raw, axes=[axes.index(k) for k in range(len(axes))])]


def _with(raw: Mapping[str, Any], **changes: Any) -> dict:
    return {**raw, **changes}


def _shift_negative(axis: int | str, by: int) -> int | str:
    """`axis` moved by `by` if it counts from the end (negative); a non-negative axis stays."""
    if isinstance(axis, str):
        return f"({axis}) + ({by}) if ({axis}) < 0 else ({axis})"
    return axis + by if axis < 0 else axis

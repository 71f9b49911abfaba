"""Ops that join tensors or take one apart: concat and split, with uneven sizes kept exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from remap.errors import RemapError
from remap.ops.base import NotInvertible, Op, TensorType

if TYPE_CHECKING:  # numpy is imported by the functions that compute on arrays (remap/ops/base.py)
    import numpy as np


@dataclass(frozen=True)
class Concat(Op):
    """Join elements input..input+count-1 (default: to the end) along `axis` into one.

    `sizes`, when given, is checked against the inputs and is what makes the concat invertible
    (the inverse split must know where the pieces were joined).
    """

    name = "concat"
    int_params = ("axis", "count")
    list_params = ("sizes",)
    axis: int = 0
    count: int | None = None
    sizes: tuple[int, ...] | None = None

    def _span(self, n: int) -> range:
        stop = n if self.count is None else self.input + self.count
        if not 0 <= self.input < stop <= n:
            raise RemapError(f"concat: elements {self.input}..{stop - 1} out of range for {n} inputs")
        return range(self.input, stop)

    def types(self, inputs: list[TensorType]) -> list[TensorType]:
        span = self._span(len(inputs))
        parts = [inputs[k] for k in span]
        first = parts[0]
        axis = self._axis(first.shape, self.axis)
        for p in parts:
            rest = p.shape[:axis] + p.shape[axis + 1 :]
            if len(p.shape) != len(first.shape) or rest != first.shape[:axis] + first.shape[axis + 1 :]:
                raise RemapError(
                    f"concat on axis {axis}: shapes {[list(q.shape) for q in parts]} differ off that axis",
                    expected=f"shapes equal except on axis {axis}",
                )
            if p.dtype != first.dtype:
                raise RemapError(f"concat: dtypes differ ({', '.join(q.dtype for q in parts)})")
        sizes = tuple(p.shape[axis] for p in parts)
        if self.sizes is not None and sizes != self.sizes:
            raise RemapError(f"concat: input sizes on axis {axis} are {list(sizes)}", expected=str(list(self.sizes)))
        joined = first.with_shape(first.shape[:axis] + (sum(sizes),) + first.shape[axis + 1 :])
        return [*inputs[: span.start], joined, *inputs[span.stop :]]

    def apply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import numpy as np

        span = self._span(len(arrays))
        joined = np.concatenate([arrays[k] for k in span], axis=self.axis)
        return [*arrays[: span.start], joined, *arrays[span.stop :]]

    @classmethod
    def invert(cls, raw: Mapping[str, Any]) -> list[dict]:
        if raw.get("sizes") is None:
            raise NotInvertible("concat needs `sizes` to be inverted (where to split back)")
        inverse = {"op": "split", "axis": raw.get("axis", 0), "sizes": raw["sizes"]}
        if raw.get("input", 0):
            inverse["input"] = raw["input"]
        return [inverse]


@dataclass(frozen=True)
class Split(Op):
    """Cut element `input` along `axis` into pieces of `sizes` (uneven allowed), in place."""

    name = "split"
    int_params = ("axis",)
    list_params = ("sizes",)
    axis: int = 0
    sizes: tuple[int, ...] = ()

    def types(self, inputs: list[TensorType]) -> list[TensorType]:
        t = self._pick(inputs)
        axis = self._axis(t.shape, self.axis)
        if sum(self.sizes) != t.shape[axis] or any(s <= 0 for s in self.sizes):
            raise RemapError(
                f"split: sizes {list(self.sizes)} do not cover axis {axis} of shape {list(t.shape)}",
                expected=f"positive sizes summing to {t.shape[axis]}",
            )
        pieces = [t.with_shape(t.shape[:axis] + (s,) + t.shape[axis + 1 :]) for s in self.sizes]
        return [*inputs[: self.input], *pieces, *inputs[self.input + 1 :]]

    def apply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import numpy as np

        x = self._pick(arrays)
        cuts = np.cumsum(self.sizes)[:-1]
        pieces = np.split(x, cuts, axis=self.axis)
        return [*arrays[: self.input], *pieces, *arrays[self.input + 1 :]]

    @classmethod
    def invert(cls, raw: Mapping[str, Any]) -> list[dict]:
        if raw.get("sizes") is None:
            raise NotInvertible("split needs `sizes` to be inverted")
        sizes = raw["sizes"] if isinstance(raw["sizes"], list) else [raw["sizes"]]  # one expression, one piece
        inverse = {"op": "concat", "axis": raw.get("axis", 0), "sizes": sizes, "count": len(sizes)}
        if raw.get("input", 0):
            inverse["input"] = raw["input"]
        return [inverse]

"""Ops that keep part of a tensor or extend it: slice (with a claim about what it drops), zero
pad, and repeat (the exact inverse of keeping one of several identical copies)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from remap.errors import RemapError
from remap.ops.base import CLAIMS, Finding, Loss, NotInvertible, Op, TensorType, expr_text, max_abs

if TYPE_CHECKING:  # numpy is imported by the functions that compute on arrays (remap/ops/base.py)
    import numpy as np


def _check_size(op: Op, shape: tuple[int, ...], axis: int, size: int | None) -> None:
    """`size` is always the input's extent on `axis`: declared so the inverse can restore it."""
    if size is not None and shape[axis] != size:
        raise RemapError(f"{op.name}: axis {axis} of shape {list(shape)} is {shape[axis]}", expected=str(size))


@dataclass(frozen=True)
class Slice(Op):
    """Keep [start, stop) on `axis`; the rest is discarded under `claim` (zero, redundant, unused, lossy)."""

    name = "slice"
    int_params = ("axis", "start", "stop", "size")
    param_schema = {"claim": {"enum": list(CLAIMS)}, "reason": {"type": "string"}}
    axis: int = 0
    start: int = 0
    stop: int | None = None
    size: int | None = None
    claim: str = "lossy"
    reason: str = ""

    def __post_init__(self) -> None:
        if self.claim not in CLAIMS:
            raise RemapError(f"slice: claim '{self.claim}'", expected=" | ".join(CLAIMS))

    def _bounds(self, extent: int) -> tuple[int, int]:
        stop = extent if self.stop is None else self.stop
        if not 0 <= self.start < stop <= extent:
            raise RemapError(f"slice: [{self.start}:{stop}] out of range for extent {extent}")
        return self.start, stop

    def types(self, inputs: list[TensorType]) -> list[TensorType]:
        t = self._pick(inputs)
        axis = self._axis(t.shape, self.axis)
        _check_size(self, t.shape, axis, self.size)
        start, stop = self._bounds(t.shape[axis])
        if self.claim == "redundant" and (start != 0 or t.shape[axis] % (stop - start)):
            raise RemapError("slice: a 'redundant' claim keeps the first of equal blocks (start 0, extent a multiple)")
        return self._replace(inputs, t.with_shape(t.shape[:axis] + (stop - start,) + t.shape[axis + 1 :]))

    def apply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import numpy as np

        x = self._pick(arrays)
        start, stop = self._bounds(x.shape[self.axis])
        return self._replace(arrays, np.ascontiguousarray(np.take(x, range(start, stop), axis=self.axis)))

    def loss(self, inputs: list[TensorType]) -> Loss | None:
        t = self._pick(inputs)
        axis = self.axis % len(t.shape)
        start, stop = self._bounds(t.shape[axis])
        if (start, stop) == (0, t.shape[axis]):
            return None
        what = f"input {self.input} axis {axis}: kept [{start}:{stop}] of {t.shape[axis]}"
        return Loss(self.claim, what, self.reason)

    def check(self, arrays: list[np.ndarray]) -> list[Finding]:
        import numpy as np

        x = self._pick(arrays).astype(np.float32)
        start, stop = self._bounds(x.shape[self.axis])
        loss = self.loss([TensorType(a.shape, "F32") for a in arrays])
        if loss is None:
            return []
        if self.claim == "redundant":
            kept = np.take(x, range(start, stop), axis=self.axis)
            reps = x.shape[self.axis] // (stop - start)
            magnitude = max_abs(x - np.concatenate([kept] * reps, axis=self.axis))
            return [Finding(self.claim, loss.what, magnitude, magnitude == 0.0)]
        dropped = np.delete(x, range(start, stop), axis=self.axis)
        magnitude = max_abs(dropped)
        holds = None if self.claim == "unused" else magnitude == 0.0
        return [Finding(self.claim, loss.what, magnitude, holds)]

    @classmethod
    def invert(cls, raw: Mapping[str, Any]) -> list[dict]:
        claim = raw.get("claim", "lossy")
        size, start, stop = raw.get("size"), raw.get("start", 0), raw.get("stop")
        if claim == "lossy":
            raise NotInvertible("a lossy slice cannot be undone")
        if size is None or stop is None:
            raise NotInvertible("slice needs `size` and `stop` to be inverted")
        axis, inp = raw.get("axis", 0), raw.get("input", 0)
        kept = f"{expr_text(stop)} - {expr_text(start)}"
        if claim == "redundant":
            return [{"op": "repeat", "axis": axis, "times": f"{expr_text(size)} // ({kept})", "size": kept, "input": inp}]
        # zero or unused: what was dropped comes back as zeros (the claim says zeros are faithful)
        after = f"{expr_text(size)} - {expr_text(stop)}"
        return [{"op": "pad", "axis": axis, "before": start, "after": after, "size": kept, "input": inp}]


@dataclass(frozen=True)
class Pad(Op):
    """Zero-pad `axis`: `before` and `after`, or up to `to`. Exact: zeros add nothing to a matmul."""

    name = "pad"
    int_params = ("axis", "before", "after", "to", "size")
    axis: int = 0
    before: int = 0
    after: int | None = None
    to: int | None = None
    size: int | None = None

    def _widths(self, extent: int) -> tuple[int, int]:
        if (self.after is None) == (self.to is None):
            raise RemapError("pad: give exactly one of `after` and `to`")
        after = self.after if self.after is not None else self.to - self.before - extent
        if self.before < 0 or after < 0:
            raise RemapError(f"pad: cannot pad extent {extent} to {extent + self.before + after} (negative padding)")
        return self.before, after

    def types(self, inputs: list[TensorType]) -> list[TensorType]:
        t = self._pick(inputs)
        axis = self._axis(t.shape, self.axis)
        _check_size(self, t.shape, axis, self.size)
        before, after = self._widths(t.shape[axis])
        return self._replace(inputs, t.with_shape(t.shape[:axis] + (t.shape[axis] + before + after,) + t.shape[axis + 1 :]))

    def apply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import numpy as np

        x = self._pick(arrays)
        widths = [(0, 0)] * x.ndim
        widths[self.axis % x.ndim] = self._widths(x.shape[self.axis])
        return self._replace(arrays, np.pad(x, widths))

    @classmethod
    def invert(cls, raw: Mapping[str, Any]) -> list[dict]:
        size = raw.get("size")
        if size is None:
            raise NotInvertible("pad needs `size` (the extent before padding) to be inverted")
        before = raw.get("before", 0)
        total = raw["to"] if raw.get("to") is not None else f"{expr_text(before)} + {expr_text(size)} + {expr_text(raw.get('after'))}"
        return [{
            "op": "slice", "axis": raw.get("axis", 0), "start": before,
            "stop": f"{expr_text(before)} + {expr_text(size)}", "size": total, "claim": "zero",
            "reason": "removes the zero padding added by the forward conversion", "input": raw.get("input", 0),
        }]


@dataclass(frozen=True)
class Repeat(Op):
    """Tile `axis` `times` over: gives back every copy a 'redundant' slice kept one of."""

    name = "repeat"
    int_params = ("axis", "times", "size")
    axis: int = 0
    times: int = 1
    size: int | None = None

    def types(self, inputs: list[TensorType]) -> list[TensorType]:
        t = self._pick(inputs)
        axis = self._axis(t.shape, self.axis)
        _check_size(self, t.shape, axis, self.size)
        if self.times < 1:
            raise RemapError(f"repeat: times must be >= 1, got {self.times}")
        return self._replace(inputs, t.with_shape(t.shape[:axis] + (t.shape[axis] * self.times,) + t.shape[axis + 1 :]))

    def apply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import numpy as np

        x = self._pick(arrays)
        return self._replace(arrays, np.concatenate([x] * self.times, axis=self.axis))

    @classmethod
    def invert(cls, raw: Mapping[str, Any]) -> list[dict]:
        size = raw.get("size")
        if size is None:
            raise NotInvertible("repeat needs `size` to be inverted")
        return [{
            "op": "slice", "axis": raw.get("axis", 0), "start": 0, "stop": size,
            "size": f"{expr_text(size)} * {expr_text(raw.get('times', 1))}", "claim": "redundant",
            "reason": "the copies are identical", "input": raw.get("input", 0),
        }]

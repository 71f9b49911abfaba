"""Ops that only change how a tensor's elements are grouped: per-head views, transposes, and the
row permutation between the two RoPE pairings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from remap.errors import RemapError
from remap.ops.base import NotInvertible, Op, TensorType

if TYPE_CHECKING:  # numpy is imported by the functions that compute on arrays (remap/ops/base.py)
    import numpy as np


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
        import numpy as np

        return self._replace(arrays, np.ascontiguousarray(self._pick(arrays).transpose(self.axes)))

    @classmethod
    def invert(cls, raw: Mapping[str, Any]) -> list[dict]:
        axes = [int(a) for a in raw.get("axes", (1, 0))]
        return [_with(raw, axes=[axes.index(k) for k in range(len(axes))])]


ROPE_ORDERS = ("interleave", "deinterleave")


@dataclass(frozen=True)
class RopePermute(Op):
    """Reorder the rope rows of a q or k projection between RoPE's two pairings.

    Half-split RoPE (`rotate_half`) turns dims j and j + dim/2 together; interleaved RoPE
    (DeepSeek-V3, transformers' `rope_interleave=True`, mlx's `traditional=True`) turns 2j and 2j+1.
    `interleave` moves row j to 2j and row j + dim/2 to 2j+1, so that interleaved RoPE on the new
    rows gives the rotated vector half-split RoPE gave, permuted alike in q and k: q.k is
    unchanged. `deinterleave` is the inverse. `axis` is cut into consecutive blocks of `dim` rows,
    each permuted alone, so a flat [heads * dim, in] weight and a per-head axis both work.

    Not `per_slab`: a slab of a stacked tensor has one axis fewer, so a non-negative `axis` would
    name another axis in the slab than in the whole (only a negative one names the same).
    """

    name = "rope_permute"
    int_params = ("axis", "dim")
    param_schema = {"order": {"enum": list(ROPE_ORDERS)}}
    axis: int = 0
    dim: int | None = None  # the rope head dim (qk_rope_head_dim)
    order: str | None = None

    def __post_init__(self) -> None:
        if self.order not in ROPE_ORDERS:
            raise RemapError(f"rope_permute: order {self.order!r}", expected=" | ".join(ROPE_ORDERS))
        if self.dim is None or self.dim <= 0 or self.dim % 2:
            raise RemapError(f"rope_permute: dim {self.dim}", expected="the rope dim, a positive even size")

    def _check_extent(self, extent: int) -> None:
        if extent % self.dim:
            raise RemapError(f"rope_permute: extent {extent} does not cut into blocks of dim {self.dim}",
                             expected=f"a multiple of {self.dim}")

    def _rows(self, extent: int) -> np.ndarray:
        """Which input row each output row takes, along an axis of `extent` rows."""
        import numpy as np

        self._check_extent(extent)
        pairs = (2, self.dim // 2) if self.order == "interleave" else (self.dim // 2, 2)
        block = np.arange(self.dim).reshape(pairs).T.ravel()  # interleave: [0, d/2, 1, d/2+1, ...]
        return (np.arange(0, extent, self.dim)[:, None] + block).ravel()

    def types(self, inputs: list[TensorType]) -> list[TensorType]:
        t = self._pick(inputs)
        self._check_extent(t.shape[self._axis(t.shape, self.axis)])
        return inputs

    def apply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import numpy as np

        x = self._pick(arrays)
        return self._replace(arrays, np.take(x, self._rows(x.shape[self.axis]), axis=self.axis))

    @classmethod
    def invert(cls, raw: Mapping[str, Any]) -> list[dict]:
        order = raw.get("order")
        if order not in ROPE_ORDERS:
            raise NotInvertible(f"rope_permute: order {order!r}", expected=" | ".join(ROPE_ORDERS))
        return [_with(raw, order=ROPE_ORDERS[1 - ROPE_ORDERS.index(order)])]


def _with(raw: Mapping[str, Any], **changes: Any) -> dict:
    return {**raw, **changes}


def _shift_negative(axis: int | str, by: int) -> int | str:
    """`axis` moved by `by` if it counts from the end (negative); a non-negative axis stays."""
    if isinstance(axis, str):
        return f"({axis}) + ({by}) if ({axis}) < 0 else ({axis})"
    return axis + by if axis < 0 else axis

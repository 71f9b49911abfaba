"""The op set specs are written in. Each op is small and pure; see base.py for the contract."""

from __future__ import annotations

from typing import Any, Mapping

from remap.errors import RemapError
from remap.ops.base import CLAIMS, Finding, Loss, NotInvertible, Op, TensorType
from remap.ops.combine import Concat, Split
from remap.ops.numeric import Cast, DequantFP8
from remap.ops.quant import DequantizeMLX, QuantFP8, QuantizeMLX
from remap.ops.reshape import MergeHeads, SplitHeads, Transpose
from remap.ops.select import Pad, Repeat, Slice

OPS: dict[str, type[Op]] = {
    cls.name: cls
    for cls in (
        Concat, Split, SplitHeads, MergeHeads, Transpose, Slice, Pad, Repeat, Cast, DequantFP8, QuantFP8, QuantizeMLX,
        DequantizeMLX,
    )
}


def op_class(name: str) -> type[Op]:
    try:
        return OPS[name]
    except KeyError:
        raise RemapError(f"unknown op '{name}'", expected=" | ".join(OPS)) from None


def build_op(raw: Mapping[str, Any], names: Mapping[str, Any]) -> Op:
    return op_class(raw["op"]).build(raw, names)


def invert_ops(raws: list[Mapping[str, Any]]) -> list[dict]:
    """The op list that undoes `raws`: each op's inverse, in reverse order."""
    inverse: list[dict] = []
    for raw in reversed(raws):
        inverse.extend(op_class(raw["op"]).invert(raw))
    return inverse


__all__ = ["CLAIMS", "OPS", "Finding", "Loss", "NotInvertible", "Op", "TensorType", "build_op", "invert_ops", "op_class"]

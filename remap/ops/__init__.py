"""The op set specs are written in. Each op is small and pure; see base.py for the contract.

An op is one class: defining it registers it (base.REGISTRY), which is all `op_class`,
`build_op` and `invert_ops` read. After adding or changing one, regenerate the schema:
`python -m remap.ops.schema --write`.
"""

from __future__ import annotations

from typing import Any, Mapping

from remap.errors import RemapError
from remap.ops.base import CLAIMS, REGISTRY, Finding, Loss, NotInvertible, Op, TensorType, tensor_types

# Importing the op modules defines, so registers, their ops, in this order: the order the schema and
# "unknown op" messages list ops in. Keep it (unsorted).
from remap.ops import combine, reshape, select, numeric, quant, lowrank  # noqa: F401  # isort: skip

# name -> op class, every registered op (a read-only view of the registry).
OPS: Mapping[str, type[Op]] = REGISTRY


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


__all__ = ["CLAIMS", "OPS", "Finding", "Loss", "NotInvertible", "Op", "TensorType", "build_op", "invert_ops", "op_class", "tensor_types"]

"""What a rule's ops make of their inputs' types, for the planner: ops built once per distinct
value of the variables they read, output types and losses worked out once per distinct ops,
input types and --dtype casts (45,808 experts of one shape ask one question)."""

from __future__ import annotations

from typing import Any, Mapping

from remap import dtypes
from remap.layouts import Layout
from remap.ops import Loss, Op, TensorType, build_op, op_class
from remap.spec.load import Rule


class OpTypes:
    def __init__(self, namespace: Mapping[str, Any], dtype: str | None, target: Layout, allow_nonfinite: bool = False):
        self.namespace, self.dtype, self.target, self.allow_nonfinite = namespace, dtype, target, allow_nonfinite
        self.built: dict[tuple, tuple[Op, ...]] = {}
        self.read: dict[int, list[str]] = {}  # rule -> the names its ops' expressions read
        self.answers: dict[tuple, tuple[list[TensorType], tuple[Op, ...], list[Loss]]] = {}
        self.last: tuple | None = None  # (ops, input types, casts, their answers entry): the last asked

    def ops(self, rule: Rule, binding: dict) -> tuple[Op, ...]:
        """The rule's ops, built once per distinct value of the variables they read (usually
        once per rule: 15,000 expert steps share one `pad`)."""
        reads = self.reads(rule)
        key = (rule.index, tuple((k, binding[k]) for k in reads if k in binding) if reads else ())
        if key not in self.built:
            self.built[key] = tuple(build_op(self._nonfinite(raw), {**self.namespace, **binding}) for raw in rule.ops)
        return self.built[key]

    def reads(self, rule: Rule) -> list[str]:
        """The names the expressions of the rule's ops read."""
        reads = self.read.get(rule.index)
        if reads is None:
            reads = self.read[rule.index] = sorted({n for raw in rule.ops for n in op_class(raw["op"]).names_read(raw)})
        return reads

    def _nonfinite(self, raw: Mapping[str, Any]) -> Mapping[str, Any]:
        """--allow-nonfinite: the ops that refuse NaN and Inf take them."""
        return {**raw, "nonfinite": "keep"} if self.allow_nonfinite and op_class(raw["op"]).finite_inputs else raw

    def types(self, ops: tuple[Op, ...], types: list[TensorType], losses: list[Loss], outputs: list[str]):
        """The output types of `ops` on `types` (and the ops with --dtype's casts added), adding
        their losses to `losses`. Computed once per distinct ops, input types and cast choices:
        45,808 experts of one shape ask the same question."""
        casts = tuple(self.target.keeps_dtype(o) for o in outputs) if self.dtype else ()
        last = self.last
        # a rule's steps come name shape by name shape: most ask what the step before asked, and
        # comparing with it is cheap (equal types are one object: `types ==` compares identities)
        if last is not None and last[0] is ops and last[2] == casts and last[1] == types:
            out, ops, found = last[3]
        else:
            key = (id(ops), tuple(types), casts)  # (ops are held by `built`, so their id stays theirs)
            if key not in self.answers:
                found = []
                self.answers[key] = (*self._types(ops, list(types), found, outputs), found)
            self.last = (ops, list(types), casts, self.answers[key])
            out, ops, found = self.answers[key]
        losses.extend(found)
        return list(out), ops

    def _types(self, ops: tuple[Op, ...], types: list[TensorType], losses: list[Loss], outputs: list[str]):
        for op in ops:
            loss = op.loss(types)
            types = op.types(types)
            if loss:
                losses.append(loss)
        if self.dtype:  # --dtype: a final cast of every floating output (not fp8 codes: those are data)
            extra = []
            for k, t in enumerate(types):
                if self.casts(t.dtype, outputs[k] if k < len(outputs) else None):
                    cast = build_op(self._nonfinite({"op": "cast", "dtype": self.dtype, "input": k}), {})
                    if (loss := cast.loss(types)):
                        losses.append(loss)
                    types = cast.types(types)
                    extra.append(cast)
            ops = ops + tuple(extra)
        return types, ops

    def casts(self, dtype: str, output: str | None) -> bool:
        """Whether --dtype casts an output of `dtype`: floats, not fp8 codes (data), not what the
        target layout keeps in its own dtype (float32 scales)."""
        keep = output is not None and self.target.keeps_dtype(output)
        return dtypes.is_float(dtype) and not dtype.startswith("F8") and dtype != self.dtype and not keep

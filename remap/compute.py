"""Carry out one plan step on arrays: the numeric heart shared by convert, --check-data and parity.

`Source` is how a step gets its inputs: a function from a source tensor name to an array. For a
composed plan it computes an earlier stage's output on demand, so nothing intermediate is ever
written or held beyond the step that needs it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterator

import numpy as np

from remap import dtypes
from remap.errors import RemapError
from remap.ops import Finding
from remap.plan import Plan, Step

Reader = Callable[[str], np.ndarray]


def step_pieces(step: Step, read: Reader) -> Iterator[tuple[int | None, list[np.ndarray]]]:
    """Yield (stack index or None, one array per output) — a stacked step yields one slab per
    element, so a 7.5 GB stacked expert tensor never exists in memory at once."""
    if step.fill is not None:
        make = np.zeros if step.fill == "zeros" else np.ones
        yield None, [make(o.shape, dtype=dtypes.numpy_dtype(o.dtype)) for o in step.outputs]
        return
    for index, group in enumerate(step.groups):
        arrays = _inputs(step, group, read)
        for op in step.ops:
            arrays = op.apply(arrays)
        yield (index if step.stacked else None), arrays


def _inputs(step: Step, group: tuple[str, ...], read: Reader) -> list[np.ndarray]:
    """One group's source arrays, as the step's ops take them (an unstacking step's element)."""
    arrays = [read(name) for name in group]
    return arrays if step.take is None else [a[step.take] for a in arrays]


def step_outputs(step: Step, read: Reader) -> list[np.ndarray]:
    """Whole output arrays of a step (stacked steps assembled)."""
    pieces = list(step_pieces(step, read))
    if not step.stacked:
        return pieces[0][1]
    return [np.stack([arrays[j] for _, arrays in pieces]) for j in range(len(step.outputs))]


def step_findings(step: Step, read: Reader) -> list[Finding]:
    """What the data says about each claim a step's ops make (the ops' `check`)."""
    findings: list[Finding] = []
    for group in step.groups:
        arrays = _inputs(step, group, read)
        for op in step.ops:
            findings.extend(op.check(arrays))
            arrays = op.apply(arrays)
    return findings


class StagedReader:
    """Reads a plan stage's sources: from the checkpoint for the first stage, otherwise by
    computing the earlier stage's step that produces the tensor. Only steps with several outputs
    are cached (a split feeds several later steps in a row), and only the last one or two: a
    cached embedding is hundreds of MB that nothing will read again."""

    def __init__(self, plan: Plan, read_source: Reader, cache_steps: int = 2):
        self.read_source = read_source
        self.upstream = StagedReader(plan.upstream, read_source, cache_steps) if plan.upstream else None
        self.producer: dict[str, tuple[Step, int]] = {}
        if plan.upstream is not None:
            for step in plan.upstream.steps:
                for j, output in enumerate(step.outputs):
                    self.producer[output.name] = (step, j)
        self._cache: OrderedDict[int, list[np.ndarray]] = OrderedDict()
        self._cache_steps = cache_steps

    def __call__(self, name: str) -> np.ndarray:
        if self.upstream is None:
            return self.read_source(name)
        if name not in self.producer:
            raise RemapError(f"no earlier stage produces '{name}'", tensor=name)
        step, j = self.producer[name]
        if len(step.outputs) == 1:
            return step_outputs(step, self.upstream)[0]
        key = id(step)
        if key not in self._cache:
            self._cache[key] = step_outputs(step, self.upstream)
            if len(self._cache) > self._cache_steps:
                self._cache.popitem(last=False)
        return self._cache[key][j]

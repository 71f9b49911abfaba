"""Carry out one plan step on arrays: the numeric heart shared by convert, --check-data and parity.

`Source` is how a step gets its inputs: a function from a source tensor name to an array. For a
composed plan it computes an earlier stage's output on demand, so nothing intermediate is ever
written or held beyond the step that needs it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from remap import dtypes
from remap.errors import RemapError
from remap.ops import Finding
from remap.plan import Stage, Step

if TYPE_CHECKING:  # numpy (~0.1 s to import) only once a step computes: a plan of byte moves never needs it
    import numpy as np

Reader = Callable[[str], "np.ndarray"]


def step_pieces(step: Step, read: Reader) -> Iterator[tuple[int | None, list[np.ndarray]]]:
    """Yield (index on axis 0 or None, one array per output). A stacked step yields one slab per
    element, so a 7.5 GB stacked expert tensor never exists in memory at once; so does a step of a
    later stage whose ops act slab by slab on a tensor an earlier stage stacks (quantizing the
    stacked experts quantizes one expert at a time)."""
    if step.fill is not None:
        from remap.fills import fill_values

        yield None, [fill_values(step.fill, o.shape, dtypes.numpy_dtype(o.dtype)) for o in step.outputs]
        return
    if isinstance(read, StagedReader) and (slabs := read.slabs(step)) is not None:
        for index, slab in slabs:
            yield index, _apply(step, [slab])
        return
    for index, group in enumerate(step.groups):
        yield (index if step.stacked else None), _apply(step, _inputs(step, group, read))


def _apply(step: Step, arrays: list[np.ndarray]) -> list[np.ndarray]:
    for op in step.ops:
        arrays = op.apply(arrays)
    return arrays


def _inputs(step: Step, group: tuple[str, ...], read: Reader) -> list[np.ndarray]:
    """One group's source arrays, as the step's ops take them (an unstacking step's element)."""
    arrays = [read(name) for name in group]
    return arrays if step.take is None else [a[step.take] for a in arrays]


def step_outputs(step: Step, read: Reader) -> list[np.ndarray]:
    """Whole output arrays of a step (slabs written into place as they come)."""
    import numpy as np

    whole: list[np.ndarray] = []
    for index, arrays in step_pieces(step, read):
        if index is None:
            return arrays
        if not whole:
            whole = [np.empty(o.shape, a.dtype) for o, a in zip(step.outputs, arrays)]
        for out, array in zip(whole, arrays):
            out[index] = array
    return whole


def step_findings(step: Step, read: Reader) -> list[Finding]:
    """What the data says about each claim a step's ops make (the ops' `check`)."""
    findings: list[Finding] = []
    for group in step.groups:
        arrays = _inputs(step, group, read)
        try:
            for op in step.ops:
                findings.extend(op.check(arrays))
                arrays = op.apply(arrays)
        except RemapError as exc:  # an op refusing its data (NaN in a quantizer): say which tensor, which rule
            raise exc.within(tensor=group[0], rule=step.rule)
    return findings


class StagedReader:
    """Reads the sources of the last of `stages`: from the checkpoint for the first stage,
    otherwise by computing the earlier stage's step that produces the tensor. Only steps with
    several outputs are cached (a split feeds several later steps in a row), and only the last one
    or two: a cached embedding is hundreds of MB that nothing will read again."""

    def __init__(self, stages: Sequence[Stage], read_source: Reader, cache_steps: int = 2):
        *earlier, self.stage = stages
        self.read_source = read_source
        self.upstream = StagedReader(earlier, read_source, cache_steps) if earlier else None
        self.producers = earlier[-1].producers if earlier else {}
        self._cache: OrderedDict[int, list[np.ndarray]] = OrderedDict()
        self._cache_steps = cache_steps
        self._lock = threading.Lock()

    def _slab_producer(self, step: Step) -> Step | None:
        """The earlier stage's stacking step whose output is `step`'s one source, where every op
        of `step` acts on each slab alone (so the two can run slab by slab); None otherwise."""
        if self.upstream is None or step.stacked or step.take is not None or len(step.sources) != 1:
            return None
        producer = self.producers.get(step.sources[0])
        if producer is None or not producer.stacked or len(producer.outputs) != 1:
            return None
        return producer if all(op.per_slab for op in step.ops) else None

    def slabs(self, step: Step) -> Iterator[tuple[int, np.ndarray]] | None:
        """`step`'s one source, slab by slab as the earlier stage stacks it (see _slab_producer)."""
        producer = self._slab_producer(step)
        if producer is None:
            return None
        return ((index, arrays[0]) for index, arrays in step_pieces(producer, self.upstream))

    def piece_nbytes(self, step: Step) -> int:
        """Bytes of the sources of the largest piece `step` computes at once."""
        if step.fill is not None or not step.groups:
            return sum(o.nbytes for o in step.outputs)
        if (producer := self._slab_producer(step)) is not None:
            (output,) = producer.outputs
            return output.nbytes // max(1, output.shape[0])
        size = max(sum(self.stage.source_tensors[n].nbytes for n in group) for group in step.groups)
        return size // max(1, self.stage.source_tensors[step.sources[0]].shape[0]) if step.take is not None else size

    def __call__(self, name: str) -> np.ndarray:
        if self.upstream is None:
            return self.read_source(name)
        step = self.producers.get(name)
        if step is None:
            raise RemapError(f"no earlier stage produces '{name}'", tensor=name)
        if len(step.outputs) == 1:
            return step_outputs(step, self.upstream)[0]
        key = id(step)
        with self._lock:  # the executor's threads read side by side
            outputs = self._cache.get(key)
        if outputs is None:  # (two threads may both compute it: the same arrays, no harm)
            outputs = step_outputs(step, self.upstream)
            with self._lock:
                self._cache[key] = outputs
                if len(self._cache) > self._cache_steps:
                    self._cache.popitem(last=False)
        return outputs[next(j for j, o in enumerate(step.outputs) if o.name == name)]

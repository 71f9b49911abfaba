"""The plan: what every output tensor of a conversion is made of, as plain data. No tensor bytes.

The plan is the heart of remap: the report prints it, the executor carries it out, parity uses
it to name the rules behind a diverging layer. `remap.planner` builds it from a spec, the source's
headers and its config; `to_dict` gives JSON.

Accounting is strict: every source tensor ends up used by exactly one rule (tied weights may be
re-read by a rule marked `reuse`), dropped by a rule that says why, or listed as unmatched.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import attrgetter
from typing import Any, Iterable, Mapping, NamedTuple

from remap import dtypes
from remap.names import natural_key  # noqa: F401  (re-exported: callers found it here)
from remap.ops import Loss, Op, TensorType
from remap.records import one_value
from remap.spec.load import Spec


class Output(NamedTuple):  # one per tensor, built in C (remap.records)
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return dtypes.byte_size(self.dtype, self.shape)


class Step(NamedTuple):  # one per output tensor or stack, built in C (remap.records); made with keywords
    """One rule applied to one binding of its variables: sources -> ops -> outputs.

    `groups` holds the source names: one group normally; one group per stacked element when the
    rule stacks (each group goes through `ops` alone and lands at its index of the new axis 0).
    `take` is the index an unstacking rule reads from axis 0 of every source.
    """

    rule: str
    outputs: tuple[Output, ...]
    groups: tuple[tuple[str, ...], ...] = ()
    ops: tuple[Op, ...] = ()
    stacked: bool = False
    take: int | None = None
    fill: str | None = None
    losses: tuple[Loss, ...] = ()

    @property
    def sources(self) -> list[str]:
        return list(chain.from_iterable(self.groups))


@dataclass(frozen=True)
class Dropped:
    name: str
    rule: str
    claim: str
    reason: str
    same_as: str | None = None
    equals: str | None = None  # what the tensor holds by construction (remap.fills.EQUALS)


@dataclass(frozen=True)
class Stage:
    """One spec applied to one set of source tensors: what makes each output, what is dropped and
    why, what no rule took. Immutable once planned."""

    spec: Spec
    source_tensors: Mapping[str, TensorType]
    source_config: Mapping[str, Any]  # config.json of the source, as given
    target_config: Mapping[str, Any]  # config.json to write for the target
    names: Mapping[str, Any]  # the namespace expressions were evaluated in
    steps: tuple[Step, ...] = ()
    dropped: tuple[Dropped, ...] = ()
    unmatched: tuple[str, ...] = ()
    reused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # tensor -> rules re-reading it
    variant_pinned: bool = True  # False: the target variant is whichever the outputs turn out to be
    makers: Mapping[str, int] | None = None  # output name -> index in `steps` of the step making it

    @property
    def name(self) -> str:
        return self.spec.name

    def __post_init__(self) -> None:
        if self.makers is None:  # (the planner gives its own; one made of steps by hand is worked out)
            outputs = list(map(attrgetter("outputs"), self.steps))
            names = map(attrgetter("name"), chain.from_iterable(outputs))
            object.__setattr__(self, "makers", dict(zip(names, chain.from_iterable(map(repeat, range(len(self.steps)), map(len, outputs))))))

    @functools.cached_property
    def producers(self) -> dict[str, Step]:
        """Output name -> the step that makes it."""
        return dict(zip(self.makers, map(self.steps.__getitem__, self.makers.values())))

    @property
    def outputs(self) -> list[Output]:
        return [o for step in self.steps for o in step.outputs]

    @property
    def losses(self) -> list[tuple[str, Loss]]:
        return [(step.rule, loss) for step in self.steps for loss in step.losses]

    def to_dict(self) -> dict:
        return {
            "spec": self.spec.name,
            "from": self.spec.source_layout,
            "to": self.spec.target_layout,
            "source_variant": self.names["source_variant"],
            "target_variant": self.names["target_variant"],
            "source_config": self.source_config,
            "target_config": self.target_config,
            "steps": [_step_dict(s) for s in self.steps],
            "dropped": [dataclasses.asdict(d) for d in self.dropped],
            "unmatched": list(self.unmatched),
            "reused": {name: list(rules) for name, rules in self.reused.items()},
        }


@dataclass(frozen=True)
class Plan:
    """A conversion's pipeline: its stages in order (one for a plain spec; a composed spec's later
    stage reads the earlier stage's outputs, computed on demand, never written). What the
    conversion writes is the last stage's outputs; what it reads, the first stage's sources."""

    stages: tuple[Stage, ...]
    name: str  # the spec's name (a composed or quantized spec's own)
    recipe: Any = None  # the Conversion it carries out, where a caller planned one (api.plan)

    @property
    def first(self) -> Stage:
        return self.stages[0]

    @property
    def last(self) -> Stage:
        return self.stages[-1]

    @property
    def source_layout(self) -> str:
        return self.first.spec.source_layout

    @property
    def target_layout(self) -> str:
        return self.last.spec.target_layout

    # What the conversion writes: the last stage's.
    @property
    def steps(self) -> tuple[Step, ...]:
        return self.last.steps

    @property
    def outputs(self) -> list[Output]:
        return self.last.outputs

    @property
    def names(self) -> Mapping[str, Any]:
        return self.last.names

    @property
    def target_config(self) -> Mapping[str, Any]:
        return self.last.target_config

    @property
    def variant_pinned(self) -> bool:
        return self.last.variant_pinned

    def lineage(self, step: Step) -> tuple[list[str], list[str]]:
        """The first stage's source tensors a last-stage step reads, and the names of the ops
        applied on the way, through any earlier stages."""
        names, ops = step.sources, _op_names(step)
        for stage in reversed(self.stages[:-1]):
            where = list(map(stage.makers.get, names))
            if None not in where:  # each made by this stage: in C (256 experts a step)
                makers = list(map(stage.steps.__getitem__, where))
                ops = list(dict.fromkeys(chain.from_iterable(map(_op_names, _alike_once(makers))))) + ops
                names = list(_sources(makers))
                continue
            before = [stage.producers[n] for n in names if n in stage.producers]
            ops = list(dict.fromkeys(name for s in before for name in _op_names(s))) + ops
            names = [n for name in names for n in (stage.producers[name].sources if name in stage.producers else [name])]
        return names, ops

    def fates(self) -> dict[str, tuple[str, str | None]]:
        """Each source tensor of the first stage: ("used", None) when it reaches a final output,
        ("dropped", claim) when it is dropped (here or, through what it became, in a later
        stage), ("unmatched", None) when no rule took it (or what it became)."""
        fates = dict.fromkeys(self.stages[0].source_tensors, ("used", None))  # most are
        fates.update(self._unused())
        return fates

    def fate_counts(self) -> Counter:
        """Counter(fates().values()), counting the used without a fate each (92k for DeepSeek-V3)."""
        unused = self._unused()
        return Counter({("used", None): len(self.stages[0].source_tensors) - len(unused), **Counter(unused.values())})

    def _unused(self) -> dict[str, tuple[str, str | None]]:
        """The fates of the source tensors that reach no final output, in source order. Worked back
        from the last stage through what is not needed (drops, unmatched, what only they are made
        of): a few hundred names for DeepSeek-V3, never the 92k that are needed."""
        gone: dict[str, str | None] = {}
        unmatched: set[str] = set()
        for stage in reversed(self.stages):
            gone, unmatched = _unneeded(stage, gone, unmatched)
        left = gone.keys() | unmatched
        return {name: ("unmatched", None) if name in unmatched or gone[name] is None else ("dropped", gone[name])
                for name in filter(left.__contains__, self.stages[0].source_tensors)}

    def to_dict(self) -> dict:
        if len(self.stages) > 1:
            return {"spec": self.name, "stages": [stage.to_dict() for stage in self.stages]}
        return self.last.to_dict()


def _unneeded(stage: Stage, claims: dict[str, str | None], unmatched: set[str]) -> tuple[dict[str, str | None], set[str]]:
    """The source tensors of `stage` that reach no final output: those dropped or read only by steps
    making nothing needed, each with its claim (None: unmatched, as what it became), and those no
    rule took. `claims` and `unmatched` say the same of the stage's outputs (nothing, for the last)."""
    gone = {d.name: d.claim for d in stage.dropped}
    steps, unneeded, idle = stage.steps, claims.keys() | unmatched, set()  # idle: steps making nothing needed
    if unneeded:
        where = stage.makers
        for k in sorted({where[n] for n in unneeded if n in where}):  # in step order: the first claim on a source counts
            outputs = [o.name for o in steps[k].outputs]
            if unneeded.issuperset(outputs):  # (a step making anything needed is needed)
                claim = next((claims[o] for o in outputs if o in claims), None)
                gone.update((n, claim) for n in steps[k].sources if n not in gone)
                idle.add(k)
    suspects = gone.keys() & stage.reused.keys()  # read by a needed step too (a `reuse` rule), they are needed
    for k in range(len(steps)) if suspects else ():
        for name in () if k in idle else suspects.intersection(steps[k].sources):
            del gone[name]
            suspects.discard(name)
    return gone, set(stage.unmatched)


def _sources(steps: Iterable[Step]) -> Iterable[str]:
    """The source names of `steps`, one after another (in C: 92k names for DeepSeek-V3)."""
    return chain.from_iterable(chain.from_iterable(map(attrgetter("groups"), steps)))


def _alike_once(steps: list[Step]) -> Iterable[Step]:
    """One of each kind of step in `steps`, in first-seen order of kinds: steps with the same fill and
    ops tuple (a rule's steps share theirs) have the same _op_names."""
    fills, ops = list(map(attrgetter("fill"), steps)), list(map(attrgetter("ops"), steps))
    if steps and one_value(fills) and one_value(ops):
        return steps[:1]  # (one kind: a stack's 256 experts, counted in C; equal ops name alike)
    return dict(zip(zip(fills, map(id, ops)), steps)).values()


def _op_names(step: Step) -> list[str]:
    return [f"fill {step.fill}"] if step.fill else [op.name for op in step.ops]


def _step_dict(step: Step) -> dict:
    return {
        "rule": step.rule,
        "outputs": [o._asdict() for o in step.outputs],
        "sources": [list(g) for g in step.groups],
        "ops": [{"op": op.name, **{k: v for k, v in dataclasses.asdict(op).items() if v is not None}} for op in step.ops],
        "stacked": step.stacked,
        "take": step.take,
        "fill": step.fill,
        "losses": [dataclasses.asdict(loss) for loss in step.losses],
    }

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
import re
from dataclasses import dataclass, field
from typing import Any

from remap import dtypes
from remap.ops import Loss, Op, TensorType
from remap.spec.load import Spec


@dataclass(frozen=True)
class Output:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return dtypes.byte_size(self.dtype, self.shape)


@dataclass(frozen=True, kw_only=True)
class Step:
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
        return [name for group in self.groups for name in group]


@dataclass(frozen=True)
class Dropped:
    name: str
    rule: str
    claim: str
    reason: str
    same_as: str | None = None


@dataclass
class Plan:
    spec: Spec
    source_tensors: dict[str, TensorType]
    source_config: dict  # config.json of the source, as given
    target_config: dict  # config.json to write for the target
    names: dict  # the namespace expressions were evaluated in
    steps: list[Step] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    reused: dict[str, list[str]] = field(default_factory=dict)  # tensor -> rules re-reading it
    # A composed spec plans stage by stage; a later stage's sources are the earlier stage's
    # outputs, computed on demand when the plan runs (nothing intermediate is written).
    upstream: "Plan | None" = None
    name: str = ""
    variant_pinned: bool = True  # False: the target variant is whichever the outputs turn out to be
    recipe: Any = None  # the Conversion this plan carries out, where a caller planned one (api.plan)

    @property
    def stages(self) -> list["Plan"]:
        chain, plan = [], self
        while plan is not None:
            chain.append(plan)
            plan = plan.upstream
        return chain[::-1]

    @property
    def first(self) -> "Plan":
        return self.stages[0]

    @functools.cached_property
    def producers(self) -> dict[str, Step]:
        """Output name -> the step that makes it."""
        return {o.name: step for step in self.steps for o in step.outputs}

    def lineage(self, step: Step) -> tuple[list[str], list[str]]:
        """The first stage's source tensors a step reads, and the names of the ops applied on
        the way, through any earlier stages."""
        names, ops, plan = step.sources, _op_names(step), self.upstream
        while plan is not None:
            before = [plan.producers[n] for n in names if n in plan.producers]
            ops = list(dict.fromkeys(name for s in before for name in _op_names(s))) + ops
            names = [n for name in names for n in (plan.producers[name].sources if name in plan.producers else [name])]
            plan = plan.upstream
        return names, ops

    def fates(self) -> dict[str, tuple[str, str | None]]:
        """Each source tensor of the first stage: ("used", None) when it reaches a final output,
        ("dropped", claim) when it is dropped (here or, through what it became, in a later
        stage), ("unmatched", None) when no rule took it."""
        stages = self.stages
        needed = {n for step in stages[-1].steps for n in step.sources}
        dropped = {d.name: d.claim for d in stages[-1].dropped}
        for stage in reversed(stages[:-1]):
            reached, claims = set(), {d.name: d.claim for d in stage.dropped}
            for step in stage.steps:
                outputs = [o.name for o in step.outputs]
                if any(o in needed for o in outputs):
                    reached.update(step.sources)
                else:
                    claim = next((dropped[o] for o in outputs if o in dropped), None)
                    claims.update((n, claim) for n in step.sources if n not in claims)
            needed, dropped = reached, claims
        unmatched = set(stages[0].unmatched)
        return {
            name: ("used", None) if name in needed else ("unmatched", None) if name in unmatched
            else ("dropped", dropped.get(name))
            for name in stages[0].source_tensors
        }

    @property
    def outputs(self) -> list[Output]:
        return [o for step in self.steps for o in step.outputs]

    @property
    def losses(self) -> list[tuple[str, Loss]]:
        return [(step.rule, loss) for step in self.steps for loss in step.losses]

    def to_dict(self) -> dict:
        if self.upstream is not None:
            return {"spec": self.name, "stages": [stage._stage_dict() for stage in self.stages]}
        return self._stage_dict()

    def _stage_dict(self) -> dict:
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
            "unmatched": self.unmatched,
            "reused": self.reused,
        }


def natural_key(name: str) -> tuple:
    """layers.2 sorts before layers.10."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _op_names(step: Step) -> list[str]:
    return [f"fill {step.fill}"] if step.fill else [op.name for op in step.ops]


def _step_dict(step: Step) -> dict:
    return {
        "rule": step.rule,
        "outputs": [dataclasses.asdict(o) for o in step.outputs],
        "sources": [list(g) for g in step.groups],
        "ops": [{"op": op.name, **{k: v for k, v in dataclasses.asdict(op).items() if v is not None}} for op in step.ops],
        "stacked": step.stacked,
        "take": step.take,
        "fill": step.fill,
        "losses": [dataclasses.asdict(loss) for loss in step.losses],
    }

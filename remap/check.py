"""--check-data: read the bytes behind every claim a plan makes, and measure them.

A claim is a promise ("this bias is zero", "these rope heads are equal", "this padding is
zero"); only data can keep it. Each finding carries the magnitude of what the claim says does
not matter, so a report can say *how* lossy a conversion is, not only that it might be.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import compress
from operator import and_, attrgetter
from typing import TYPE_CHECKING, Callable, Collection, Iterator, Sequence

from remap.ops import Finding
from remap.ops.base import max_abs
from remap.plan import Dropped, Plan, Step

# numpy and the step computations (remap.compute, remap.fills) are imported where bytes are read:
# a report whose plan makes no claim to measure (most, by default) reads none.
if TYPE_CHECKING:
    from remap.compute import Reader


Progress = Callable[[str, int, int], None]  # (what is read now, items done, items in all)


@dataclass(frozen=True)
class RuleFinding:
    stage: str  # the spec (stage) that made the claim
    rule: str
    tensor: str  # the tensor (or first source tensor) the finding is about
    finding: Finding


def drop_finding(drop: Dropped, read: Reader) -> Finding:
    import numpy as np

    from remap.fills import difference

    data = read(drop.name)
    what = f"dropped {drop.name}"
    if drop.equals:
        magnitude, holds = difference(drop.equals, data)
        return Finding("redundant", f"{what} (what the target computes: {drop.equals})", magnitude, holds)
    if drop.claim == "redundant" and drop.same_as:
        magnitude = max_abs(data.astype(np.float32) - read(drop.same_as).astype(np.float32))
        return Finding("redundant", f"{what} (same as {drop.same_as})", magnitude, magnitude == 0.0)
    magnitude = max_abs(data)
    holds = None if drop.claim in ("unused", "redundant") else magnitude == 0.0
    return Finding(drop.claim, what, magnitude, holds)


# The claims the bytes can break: measured by default (reading a dropped bias or a rope head costs
# little); an `unused` tensor's size, a rounding's or a quantization's, only when asked.
BREAKABLE = ("zero", "redundant")


def _claiming(steps: Sequence[Step], wanted: Callable[[str], bool]) -> Iterator[Step]:
    """The steps that read sources and make a wanted claim, decided once per `losses` tuple (a
    rule's steps share theirs: the 46k steps of DeepSeek-V3's FP8 stage hold 15), filtered in C."""
    losses = list(map(attrgetter("losses"), steps))
    ids = list(map(id, losses))
    decided = {key: any(wanted(loss.claim) for loss in own) for key, own in dict(zip(ids, losses)).items()}
    if not any(decided.values()):  # (an FP8 stage's roundings, by default: no step to look at)
        return iter(())
    return compress(steps, map(and_, map(decided.__getitem__, ids), map(bool, map(attrgetter("groups"), steps))))


def check_data(plan: Plan, read_source: Reader, claims: Collection[str] | None = None,
               progress: Progress | None = None) -> list[RuleFinding]:
    """Every claim of every stage (or those of the kinds in `claims`), measured. Steps without
    such claims read nothing. `progress` is told each tensor read, with how many of how many."""
    wanted = (lambda claim: True) if claims is None else (lambda claim: claim in claims)
    work = []  # (stage index, a drop or a step), listed first so that progress knows the total
    for k, stage in enumerate(plan.stages):
        work += [(k, drop) for drop in stage.dropped if wanted(drop.claim)]
        work += [(k, step) for step in _claiming(stage.steps, wanted)]
    if not work:
        return []
    from remap.compute import StagedReader, step_findings

    readers = [StagedReader(plan.stages[: k + 1], read_source) for k in range(len(plan.stages))]
    findings: list[RuleFinding] = []
    for done, (k, item) in enumerate(work):
        stage, read = plan.stages[k], readers[k]
        if progress:
            progress(item.name if isinstance(item, Dropped) else item.groups[0][0], done, len(work))
        if isinstance(item, Dropped):
            findings.append(RuleFinding(stage.name, item.rule, item.name, drop_finding(item, read)))
            continue
        findings += [RuleFinding(stage.name, item.rule, item.groups[0][0], finding)
                     for finding in step_findings(item, read) if wanted(finding.claim)]
    if progress:
        progress("done", len(work), len(work))
    return findings

"""The shape-verification report: the plan checked against the target layout, as plain data.

`build_report` turns a plan (and, with --check-data, measured findings) into a `Report`;
remap.render.report prints it as rich tables, JSON (schemas/report.schema.json) or Markdown. The
exit code rule lives here too: 0 when the target layout is met and every source tensor is
accounted for, 1 otherwise. No rich here: the Python API builds reports without it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from itertools import chain, repeat
from operator import attrgetter
from typing import Any, Collection, Mapping, Sequence

from remap import __version__
from remap.check import RuleFinding
from remap.errors import one_line
from remap.layouts import get_layout
from remap.layouts.base import FLOAT, Expected, Layout
from remap.ops import Loss as PlanLoss, TensorType
from remap.plan import Dropped, Output, Plan, Step
from remap import dtypes


@dataclass
class Row:
    name: str
    shape: list[int]
    dtype: str
    sources: list[str]
    ops: list[str]
    rule: str
    status: str  # "ok", "unexpected", "shape: expected [..]", "dtype: expected .."


@dataclass
class Loss:
    stage: str
    rule: str
    claim: str
    what: str
    reason: str
    count: int
    magnitude: float | None = None  # max over measured findings (with --check-data)
    holds: bool | None = None  # False when any finding breaks the claim
    where: str | None = None  # the first tensor whose data breaks it, and what the data showed


@dataclass
class Report:
    spec: str
    source: dict
    target: dict
    rows: list[Row]
    missing: list[dict]
    coverage: dict
    dropped: list[dict]
    unmatched: list[str]
    losses: list[Loss]
    checked_data: bool
    measured: list[str] | None = None  # the claim kinds measured on the bytes (None: every kind, or none)
    remap_version: str = __version__
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def caveats(self) -> list[str]:
        """Why an OK is not a bare OK: what the conversion changes by design (lossy claims,
        rounding, quantization) and which claims no data was read for."""
        out = []
        changed = sorted({loss.rule for loss in self.losses if loss.claim not in CHECKABLE})
        if changed:
            out.append(f"changes the function by design in {_count(len(changed), 'rule')}, e.g. {changed[0]}")
        unmeasured = [loss for loss in self.losses if loss.claim in ("zero", "redundant") and loss.holds is None]
        if unmeasured:
            out.append(f"{_count(len(unmeasured), 'claim')} not measured (--check-data), e.g. {unmeasured[0].rule}")
        return out

    @property
    def only_claims_broken(self) -> bool:
        """NOT OK only because the data breaks claims: the conversion runs, and loses what they say."""
        structural = any(r.status != "ok" for r in self.rows) or self.missing or self.unmatched
        return bool(self.problems) and not structural

    @property
    def verdict(self) -> str:
        """One line: NOT OK, a bare OK only when nothing is lost or unmeasured, else OK with caveats."""
        if not self.ok:
            return "NOT OK"
        return "; ".join(["OK: target layout met, every source tensor accounted for", *self.caveats])

    def to_dict(self) -> dict:
        # rows and dropped (flat dicts of text) copied by hand: asdict's field-by-field deep copy of
        # 90k source names took ~0.4 s, of 788 drops a tenth of the JSON's time
        rows = [{**vars(r), "shape": list(r.shape), "sources": list(r.sources), "ops": list(r.ops)} for r in self.rows]
        dropped = [dict(d) for d in self.dropped]
        return {**asdict(replace(self, rows=[], dropped=[])), "rows": rows, "dropped": dropped, "ok": self.ok,
                "caveats": self.caveats}


# Claims the bytes can confirm: zero, redundant (an "unused" tensor is exact whatever it holds).
CHECKABLE = ("zero", "redundant", "unused")


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" if n == 1 else f"{n} {thing}s"


def _dtype_fits(dtype: str, want: str) -> bool:
    """A layout's FLOAT accepts any floating dtype a runtime computes in (not fp8); others are exact."""
    if want == FLOAT:
        return dtypes.is_float(dtype) and not dtype.startswith("F8")
    return dtypes.canonical(want) == dtype


def build_report(plan: Plan, findings: list[RuleFinding] | None = None, *,
                 measured: Collection[str] | None = None) -> Report:
    """The report of `plan`; `findings` are measured claims (of the kinds in `measured`, or all)."""
    target_layout = get_layout(plan.target_layout)
    target_config = target_layout.read_config(plan.target_config)
    variant = _target_variant(plan, target_layout, target_config)
    expected = target_layout.expected(target_config, variant)
    # Cut the outputs into files as convert will: a cut the layout refuses (--param mp not dividing
    # the experts or a sliced dim) fails the report with the error convert gives.
    target_layout.check_files(plan.outputs, plan.recipe.max_shard_size if plan.recipe else "5GB", plan.names)
    rows = _rows(plan, expected)
    produced = {r.name for r in rows}
    missing = [{"name": e.name, "shape": list(e.shape), "dtype": e.dtype} for e in expected.values() if e.name not in produced]
    unmatched = [n for s in plan.stages for n in s.unmatched]
    report = Report(
        spec=plan.name,
        source={"layout": plan.first.spec.source_layout, "variant": plan.first.names["source_variant"]},
        target={"layout": plan.target_layout, "variant": variant},
        rows=rows, missing=missing, coverage=_coverage(plan, rows, unmatched),
        dropped=[{"stage": s.name, **_fields_of(d)} for s in plan.stages for d in s.dropped], unmatched=unmatched,
        losses=_losses(plan, findings), checked_data=findings is not None,
        measured=list(measured) if findings is not None and measured is not None else None,
    )
    report.problems.extend(_problems(report))
    return report


def _fields_of(drop: Dropped) -> dict[str, Any]:
    """asdict(drop), as its fields are all text: without asdict's deep copy, 788 times for DeepSeek-V3."""
    return dict(zip(_DROPPED_FIELDS, _DROPPED_VALUES(drop)))


_DROPPED_FIELDS = tuple(f.name for f in fields(Dropped))
_DROPPED_VALUES = attrgetter(*_DROPPED_FIELDS)


def _target_variant(plan: Plan, target_layout: Layout, target_config: Mapping[str, Any]) -> str:
    """The variant the plan targets; when the spec does not pin one (e.g. an MTP layer passed
    through), whichever variant the outputs turn out to be."""
    variant = plan.names["target_variant"]
    if plan.variant_pinned:
        return variant
    produced_names = {o.name for o in plan.outputs}
    return next((v for v in target_layout.variants
                 if set(target_layout.expected(target_config, v)) == produced_names), variant)


def _rows(plan: Plan, expected: Mapping[str, Expected]) -> list[Row]:
    rows = []
    for step in plan.steps:
        sources, ops = plan.lineage(step)  # once a step (512 sources, through an earlier stage); lists of its own a row
        for output in step.outputs:
            status = _status(output, expected.get(output.name))
            rows.append(Row(output.name, list(output.shape), output.dtype, list(sources), list(ops), step.rule, status))
    return rows


def _status(output: Output, want: Expected | None) -> str:
    """How one produced tensor fits the layout's expectation of it."""
    if want is None:
        return "unexpected"
    if tuple(want.shape) != tuple(output.shape):
        return f"shape: expected {list(want.shape)}"
    if not _dtype_fits(output.dtype, want.dtype):
        return f"dtype: expected {want.dtype}"
    return "ok"


def _coverage(plan: Plan, rows: list[Row], unmatched: list[str]) -> dict:
    """Where every source tensor went (used, dropped by which claim, unmatched), and the sizes."""
    first = plan.first
    fates = plan.fate_counts()
    by_claim = Counter()
    for (fate, claim), n in fates.items():
        if fate == "dropped":
            by_claim[claim] += n
    return {
        "source_tensors": len(first.source_tensors),
        "used": fates[("used", None)],
        "dropped": sum(by_claim.values()),
        "dropped_by_claim": dict(by_claim),
        "unmatched": fates[("unmatched", None)],
        "intermediate_unmatched": len(unmatched) - len(first.unmatched),
        "target_tensors": len(rows),
        "source_bytes": _total_bytes(first.source_tensors.values()),
        "target_bytes": sum(o.nbytes for o in plan.outputs),
    }


def _total_bytes(types: Collection[TensorType]) -> int:
    """The bytes of tensors of `types`, each distinct object's size computed once: tensors of one
    type share one TensorType (tensor_types), so 92k are a few dozen sizes, counted in C."""
    counts = Counter(map(id, types))
    distinct = dict(zip(map(id, types), types))
    return sum(distinct[key].nbytes * n for key, n in counts.items())


def _problems(report: Report) -> list[str]:
    """What makes the report NOT OK (and the exit code 1), each with its first example."""
    problems, layout = [], report.target["layout"]
    bad_rows = [r for r in report.rows if r.status != "ok"]
    if bad_rows:
        problems.append(f"{len(bad_rows)} target tensors do not fit the {layout} layout, e.g. {bad_rows[0].name}: {bad_rows[0].status}")
    if report.missing:
        problems.append(f"{len(report.missing)} tensors the {layout} layout needs are not produced, e.g. {report.missing[0]['name']}")
    if report.unmatched:
        problems.append(f"{len(report.unmatched)} source tensors match no rule, e.g. {report.unmatched[0]}")
    broken = [l for l in report.losses if l.holds is False]
    if broken:
        problems.append(f"{len(broken)} claims do not hold on the data, e.g. {broken[0].rule}: {broken[0].what} (max |x| {broken[0].magnitude:.3g})")
    return [one_line(problem) for problem in problems]  # names come from files: never a forged line


def _losses(plan: Plan, findings: list[RuleFinding] | None) -> list[Loss]:
    losses: dict[tuple, Loss] = {}
    for stage in plan.stages:
        for (rule, loss), count in _counted_losses(stage.steps):
            key = (stage.name, rule, loss.claim, loss.reason)
            if key in losses:
                losses[key].count += count
            else:
                losses[key] = Loss(stage.name, rule, loss.claim, loss.what, loss.reason, count)
        for drop in stage.dropped:
            key = (stage.name, drop.rule, drop.claim, drop.reason)
            if key in losses:
                losses[key].count += 1
            else:
                losses[key] = Loss(stage.name, drop.rule, drop.claim, f"drops {drop.name}", drop.reason, 1)
            if losses[key].count == 2:
                losses[key].what = f"drops e.g. {drop.name}"
    for f in findings or []:
        for (stage, rule, claim, _), loss in losses.items():
            if stage == f.stage and rule == f.rule and claim == f.finding.claim:
                loss.magnitude = max(loss.magnitude or 0.0, f.finding.magnitude)
                if f.finding.holds is not None:
                    loss.holds = f.finding.holds if loss.holds is None else (loss.holds and f.finding.holds)
                if f.finding.holds is False and loss.where is None:
                    loss.where = f"{f.tensor}: {f.finding.what}"
                break
    return list(losses.values())


def _counted_losses(steps: Sequence[Step]) -> list[tuple[tuple[str, PlanLoss], int]]:
    """Each distinct (rule, loss) of `steps` (as Stage.losses lists them) with its count, in
    first-seen order. Counted in C by the loss's identity: a rule's steps share their Loss objects
    (DeepSeek-V3's 46k rounding losses are 9 objects), and a Loss's own hash would run Python."""
    per_step = list(map(attrgetter("losses"), steps))
    rules = chain.from_iterable(map(repeat, map(attrgetter("rule"), steps), map(len, per_step)))
    losses = list(chain.from_iterable(per_step))
    counts = Counter(zip(rules, map(id, losses)))
    by_id = dict(zip(map(id, losses), losses))
    return [((rule, by_id[key]), n) for (rule, key), n in counts.items()]

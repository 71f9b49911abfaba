"""The shape-verification report: the plan printed, and checked against the target layout.

`build_report` turns a plan (and, with --check-data, measured findings) into plain data;
`render_*` print it as rich tables, JSON (schemas/report.schema.json) or Markdown. The exit code
rule lives here too: 0 when the target layout is met and every source tensor is accounted for,
1 otherwise.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from remap import __version__
from remap.check import RuleFinding
from remap.layouts import get_layout
from remap.layouts.base import FLOAT
from remap.names import collapse
from remap.plan import Plan
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
    remap_version: str = __version__
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _dtype_fits(dtype: str, want: str) -> bool:
    """A layout's FLOAT accepts any floating dtype a runtime computes in (not fp8); others are exact."""
    if want == FLOAT:
        return dtypes.is_float(dtype) and not dtype.startswith("F8")
    return dtypes.canonical(want) == dtype


def build_report(plan: Plan, findings: list[RuleFinding] | None = None) -> Report:
    first, spec = plan.first, plan.spec
    target_layout = get_layout(spec.target_layout)
    target_config = target_layout.read_config(plan.target_config)
    variant = plan.names["target_variant"]
    if not plan.variant_pinned:  # e.g. an MTP layer passed through: whichever variant the outputs are
        produced_names = {o.name for o in plan.outputs}
        variant = next((v for v in target_layout.variants
                        if set(target_layout.expected(target_config, v)) == produced_names), variant)
    expected = target_layout.expected(target_config, variant)

    rows = []
    for step in plan.steps:
        for output in step.outputs:
            want = expected.get(output.name)
            if want is None:
                status = "unexpected"
            elif tuple(want.shape) != tuple(output.shape):
                status = f"shape: expected {list(want.shape)}"
            elif not _dtype_fits(output.dtype, want.dtype):
                status = f"dtype: expected {want.dtype}"
            else:
                status = "ok"
            sources, ops = plan.lineage(step)
            rows.append(Row(output.name, list(output.shape), output.dtype, sources, ops, step.rule, status))
    produced = {r.name for r in rows}
    missing = [{"name": e.name, "shape": list(e.shape), "dtype": e.dtype} for e in expected.values() if e.name not in produced]

    dropped = [{"stage": s.name, **asdict(d)} for s in plan.stages for d in s.dropped]
    unmatched = [n for s in plan.stages for n in s.unmatched]
    fates = Counter(plan.fates().values())
    by_claim = Counter()
    for (fate, claim), n in fates.items():
        if fate == "dropped":
            by_claim[claim] += n
    coverage = {
        "source_tensors": len(first.source_tensors),
        "used": fates[("used", None)],
        "dropped": sum(by_claim.values()),
        "dropped_by_claim": dict(by_claim),
        "unmatched": fates[("unmatched", None)],
        "intermediate_unmatched": len(unmatched) - len(first.unmatched),
        "target_tensors": len(rows),
        "source_bytes": sum(t.nbytes for t in first.source_tensors.values()),
        "target_bytes": sum(o.nbytes for o in plan.outputs),
    }

    report = Report(
        spec=plan.name,
        source={"layout": first.spec.source_layout, "variant": first.names["source_variant"]},
        target={"layout": spec.target_layout, "variant": variant},
        rows=rows, missing=missing, coverage=coverage, dropped=dropped, unmatched=unmatched,
        losses=_losses(plan, findings), checked_data=findings is not None,
    )
    bad_rows = [r for r in rows if r.status != "ok"]
    if bad_rows:
        report.problems.append(f"{len(bad_rows)} target tensors do not fit the {spec.target_layout} layout, e.g. {bad_rows[0].name}: {bad_rows[0].status}")
    if missing:
        report.problems.append(f"{len(missing)} tensors the {spec.target_layout} layout needs are not produced, e.g. {missing[0]['name']}")
    if unmatched:
        report.problems.append(f"{len(unmatched)} source tensors match no rule, e.g. {unmatched[0]}")
    broken = [l for l in report.losses if l.holds is False]
    if broken:
        report.problems.append(f"{len(broken)} claims do not hold on the data, e.g. {broken[0].rule}: {broken[0].what} (max |x| {broken[0].magnitude:.3g})")
    return report


def _losses(plan: Plan, findings: list[RuleFinding] | None) -> list[Loss]:
    losses: dict[tuple, Loss] = {}
    for stage in plan.stages:
        for rule, loss in stage.losses:
            key = (stage.name, rule, loss.claim, loss.reason)
            if key in losses:
                losses[key].count += 1
            else:
                losses[key] = Loss(stage.name, rule, loss.claim, loss.what, loss.reason, 1)
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
                break
    return list(losses.values())


# -- rendering ---------------------------------------------------------------------------------
def _collapsed_rows(rows: list[Row], full: bool) -> list[tuple[str, list[str], Row]]:
    """(name, collapsed source names, first row) per group of rows alike but for indices."""
    if full:
        return [(r.name, _collapse_names(r.sources), r) for r in rows]
    key = lambda r: (tuple(r.shape), r.dtype, tuple(r.ops), r.status, r.rule)
    return [(name, _collapse_names([s for m in members for s in m.sources]), members[0])
            for name, members in collapse(rows, lambda r: r.name, key)]


def _from_column(name: str, sources: list[str]) -> list[str]:
    """A tensor that keeps its name shows `=` instead of repeating it."""
    return ["="] if sources == [name] else sources


def _collapse_names(names: list[str]) -> list[str]:
    return [c for c, _ in collapse(dict.fromkeys(names), lambda n: n)]


def coverage_line(report: Report) -> str:
    c = report.coverage
    total = c["source_tensors"] or 1
    claims = ", ".join(f"{n} {claim}" for claim, n in sorted(c["dropped_by_claim"].items()))
    line = (f"{c['source_tensors']} source tensors: {c['used']} used ({100 * c['used'] / total:.1f}%), "
            f"{c['dropped']} dropped ({100 * c['dropped'] / total:.1f}%{': ' + claims if claims else ''}), "
            f"{c['unmatched']} unmatched -> {c['target_tensors']} target tensors")
    return line


def render_rich(report: Report, console: Console, *, full: bool = False) -> None:
    src, tgt = report.source, report.target
    console.print(f"[bold]{escape(report.spec)}[/]: {src['layout']} ({src['variant']}) -> {tgt['layout']} ({tgt['variant']})")
    table = Table(show_lines=False, header_style="bold")
    for column in ("target tensor", "shape", "dtype", "from", "ops", "status"):
        table.add_column(column, overflow="fold")
    for name, sources, row in _collapsed_rows(report.rows, full):
        status = "[green]ok[/]" if row.status == "ok" else f"[red]{row.status}[/]"
        table.add_row(escape(name), str(row.shape), row.dtype, escape("\n".join(_from_column(name, sources))),
                      " > ".join(row.ops), status)
    console.print(table)
    for m in report.missing:
        console.print(f"[red]missing[/] {escape(m['name'])} {m['shape']}")
    console.print(coverage_line(report))
    if report.unmatched:
        console.print("[red]unmatched:[/] " + escape(", ".join(_collapse_names(report.unmatched))))
    if report.losses:
        stages = {loss.stage for loss in report.losses} | {report.spec}
        losses = Table(title="what the conversion discards or rounds", header_style="bold")
        for column in ("rule", "claim", "what", "x", "measured", "exact when"):
            losses.add_column(column, overflow="fold")
        for loss in report.losses:
            measured = "" if loss.magnitude is None else f"max |x| {loss.magnitude:.3g}"
            if loss.holds is False:
                measured = f"[red]{measured} LOSSY[/]"
            elif loss.holds:
                measured = f"[green]{measured} holds[/]"
            rule = loss.rule if len(stages) == 1 else f"{loss.stage}: {loss.rule}"
            losses.add_row(escape(rule), loss.claim, escape(loss.what), str(loss.count), measured, escape(loss.reason))
        console.print(losses)
    for problem in report.problems:
        console.print(f"[red]problem:[/] {escape(problem)}")
    console.print("[green]OK[/]: target layout met, every source tensor accounted for" if report.ok else "[red]NOT OK[/]")


def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2)


def render_markdown(report: Report, *, full: bool = False) -> str:
    src, tgt = report.source, report.target
    lines = [f"## remap report: {report.spec}", "",
             f"{src['layout']} ({src['variant']}) -> {tgt['layout']} ({tgt['variant']}): **{'OK' if report.ok else 'NOT OK'}**", "",
             coverage_line(report), "",
             "| target tensor | shape | dtype | from | ops | status |", "|---|---|---|---|---|---|"]
    for name, sources, row in _collapsed_rows(report.rows, full):
        lines.append(f"| `{name}` | {row.shape} | {row.dtype} | {'<br>'.join(f'`{s}`' for s in _from_column(name, sources))} | {' > '.join(row.ops)} | {row.status} |")
    if report.missing:
        lines += ["", "Missing: " + ", ".join(f"`{m['name']}`" for m in report.missing)]
    if report.losses:
        lines += ["", "| rule | claim | what | x | measured | why |", "|---|---|---|---|---|---|"]
        for l in report.losses:
            measured = "" if l.magnitude is None else f"{l.magnitude:.3g}" + (" (breaks claim)" if l.holds is False else "")
            lines.append(f"| {l.rule} | {l.claim} | {l.what} | {l.count} | {measured} | {l.reason} |")
    lines += [f"- {p}" for p in report.problems]
    return "\n".join(lines) + "\n"

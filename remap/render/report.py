"""A shape-verification report (remap.report.Report) printed: rich tables for a terminal, JSON
(schemas/report.schema.json) or Markdown (for a CI job summary)."""

from __future__ import annotations

from itertools import chain
from operator import attrgetter

from rich.console import Console
from remap.render import escape, jsontext
from remap.render.card import coverage_text
from remap.render.table import print_table

from remap.names import collapse, collapse_names
from remap.report import Report, Row


def _collapsed_rows(rows: list[Row], full: bool) -> list[tuple[str, list[str], Row]]:
    """(name, collapsed source names, first row) per group of rows alike but for indices."""
    if full:
        return [(r.name, collapse_names(r.sources), r) for r in rows]
    key = lambda r: (tuple(r.shape), r.dtype, tuple(r.ops), r.status, r.rule)
    return [(name, collapse_names(chain.from_iterable(map(attrgetter("sources"), members))), members[0])
            for name, members in collapse(rows, attrgetter("name"), key)]


def _from_column(name: str, sources: list[str]) -> list[str]:
    """A tensor that keeps its name shows `=` instead of repeating it."""
    return ["="] if sources == [name] else sources


def coverage_line(report: Report) -> str:
    return coverage_text(report.coverage)


def render_rich(report: Report, console: Console, *, full: bool = False) -> None:
    src, tgt = report.source, report.target
    console.print(f"[bold]{escape(report.spec)}[/]: {src['layout']} ({src['variant']}) -> {tgt['layout']} ({tgt['variant']})")
    rows = []
    for name, sources, row in _collapsed_rows(report.rows, full):
        status = "[green]ok[/]" if row.status == "ok" else f"[red]{escape(row.status)}[/]"
        rows.append((escape(name), str(row.shape), row.dtype, "\n".join(escape(s) for s in _from_column(name, sources)),
                     " > ".join(row.ops), status))
    print_table(console, ("target tensor", "shape", "dtype", "from", "ops", "status"), rows)
    for m in report.missing:
        console.print(f"[red]missing[/] {escape(m['name'])} {m['shape']}")
    console.print(coverage_line(report))
    if report.unmatched:
        console.print("[red]unmatched:[/] " + escape(", ".join(collapse_names(report.unmatched))))
    if report.losses:
        print_table(console, ("rule", "claim", "what", "x", "measured", "exact when"), _loss_rows(report),
                    title="what the conversion discards or rounds")
    for problem in report.problems:
        console.print(f"[red]problem:[/] {escape(problem)}")
    console.print(f"[green]{escape(report.verdict)}[/]" if report.ok else "[red]NOT OK[/]")


def _loss_rows(report: Report) -> list[tuple[str, ...]]:
    stages = {loss.stage for loss in report.losses} | {report.spec}
    rows = []
    for loss in report.losses:
        measured = "" if loss.magnitude is None else f"max |x| {loss.magnitude:.3g}"
        if loss.holds is False:
            measured = f"[red]{measured} LOSSY[/]" + (f"\nat {escape(loss.where)}" if loss.where else "")
        elif loss.holds:
            measured = f"[green]{measured} holds[/]"
        rule = loss.rule if len(stages) == 1 else f"{loss.stage}: {loss.rule}"
        rows.append((escape(rule), loss.claim, escape(loss.what), str(loss.count), measured, escape(loss.reason)))
    return rows


def render_json(report: Report) -> str:
    return jsontext.dumps(report.to_dict())


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

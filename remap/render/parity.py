"""A parity result (remap.parity.ParityResult) printed: rich text for a terminal, JSON
(schemas/parity.schema.json), JUnit XML (one testcase per check, for CI test reporters) and
Markdown (for a CI job summary)."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from remap.render import escape
from remap.render.table import print_table

from remap.parity import ParityResult
from remap.parity.compare import LABELS, Check, RuleRef
from remap.parity.stream import size_text
from remap.report import Loss


def _value(metric: str, value: float) -> str:
    if metric in ("top1", "top5"):
        return f"{100 * value:.1f}%"
    if metric == "cosine":
        return f"{value:.7f}"
    return f"{value:.3g}"


def _limit(check: Check) -> str:
    limit = f"{100 * check.limit:g}%" if check.metric in ("top1", "top5") else f"{check.limit:g}"
    return f"{'<=' if check.at_most else '>='} {limit}"


def _side(result: ParityResult, which: str) -> str:
    side = getattr(result, which)
    variant = f" ({side.variant})" if side.variant else ""
    return f"{side.path}: {side.layout}{variant}, {side.weights} weights, run by {side.runtime}"


def _setup(result: ParityResult) -> str:
    spec = f"spec {result.spec}; " if result.spec else ""
    return (f"{spec}{result.batch} x {result.tokens} tokens (seed {result.seed}) computed in {result.dtype}; "
            f"{result.profile} tolerances; {result.seconds:.1f}s")


def _streaming(result: ParityResult) -> list[str]:
    """For a layer-streamed run: what it loaded and its peak memory, then any layer whose two
    routers pick different experts on the same input (the source's hidden state)."""
    info = result.streamed
    if info is None:
        return []
    loaded = [f"{layer} {ours}/{theirs}" for layer, (ours, theirs) in info.experts.items()]
    lines = [f"streamed one decoder layer at a time ({info.reason}); read {size_text(info.bytes_read[0])} of the "
             f"source, {size_text(info.bytes_read[1])} of the target; peak RSS {size_text(result.peak_rss)}"
             + (f"; routed experts loaded (source/target): {', '.join(loaded)}" if loaded else "")]
    for r in info.routing:
        lines.append(f"layer {r['layer']}: the routers pick different experts for {r['tokens']} of {r['of']} tokens "
                     f"given the same input (first: token {r['first_token']}); only the source picks experts "
                     f"{r['source_only']}, only the target {r['target_only']}")
    return lines


def _logit_rows(result: ParityResult) -> list[tuple[str, str, str, Check | None]]:
    """(metric, value, tolerance, check) for the logits table."""
    logits, by_metric = result.logits, {c.metric: c for c in result.checks if c.section == "logits"}
    rows = []
    for metric in ("max_rel", "mean_abs", "rms_rel", "cosine", "top1", "top5", "kl"):
        check = by_metric.get(metric)
        if metric == "max_rel":
            label = "max abs error"
            value = f"{logits['max_abs']:.3g} ({logits['max_rel']:.3g} of max |logit| {logits['scale']:.3g})"
        elif metric == "mean_abs":
            label, value = "mean abs error", f"{logits['mean_abs']:.3g}"
        else:
            label, value = LABELS[metric], _value(metric, logits[metric])
        rows.append((label, value, _limit(check) if check else "", check))
    return rows


NO_SPEC = "no spec known: pass --spec to name the rules that made these tensors"
HIDDEN_COLUMNS = ("after", "max abs error", "max rel", "RMS rel", "cosine", "")


def _hidden_values(metrics: dict) -> tuple[str, ...]:
    return (f"{metrics['max_abs']:.3g}", f"{metrics['max_rel']:.3g}", f"{metrics['rms_rel']:.3g}",
            _value("cosine", metrics["cosine"]))


def _hidden_status(result: ParityResult, section: str) -> bool:
    return all(c.ok for c in result.checks if c.section == section)


def _verdict(result: ParityResult) -> str:
    if result.ok:
        return f"PASS: all {len(result.checks)} checks within tolerance"
    first = result.failures[0]
    verdict = f"FAIL: {len(result.failures)} of {len(result.checks)} checks out of tolerance, e.g. {first.describe()}"
    if result.runtimes_disagree:
        verdict += (f". The conversion loses nothing (every step moves the same bytes, every claim holds): "
                    f"{result.source.runtime} and {result.target.runtime} compute this model differently by themselves")
    return verdict


# -- rich -----------------------------------------------------------------------------------------


def render_rich(result: ParityResult, console: Console) -> None:
    verdict = "[green]PASS[/]" if result.ok else "[red]FAIL[/]"
    console.print(f"[bold]remap parity[/] {verdict}")
    console.print(f"  source  {escape(_side(result, 'source'))}")
    console.print(f"  target  {escape(_side(result, 'target'))}")
    console.print(f"  {escape(_setup(result))}")
    for line in _streaming(result):
        console.print(f"  {escape(line)}")

    print_table(console, ("metric", "value", "tolerance", ""),
                [(escape(label), escape(value), escape(limit), _status(check and check.ok))
                 for label, value, limit, check in _logit_rows(result)], title="logits")
    rows = []
    for section, metrics in result.hidden.items():
        mark = " [red]<- first divergence[/]" if section == result.divergence else ""
        rows.append((escape(section), *_hidden_values(metrics), _status(_hidden_status(result, section)) + mark))
    print_table(console, HIDDEN_COLUMNS, rows, title="hidden states (before the final norm)")

    if result.divergence:
        console.print(f"[red]first divergence[/]: [bold]{result.divergence}[/]")
        if result.rules:
            print_table(console, ("stage", "rule", "where", "tensors"),
                        [(escape(ref.stage), escape(ref.rule), escape(_where(ref)), "\n".join(escape(t) for t in ref.tensors))
                         for ref in result.rules], title=f"spec rules that made the {result.divergence} tensors")
        elif result.spec is None:
            console.print(f"  ({NO_SPEC})")
        for loss in result.starts_in:
            console.print(f"[bold]the drift starts in {escape(result.divergence)}, where [red]{escape(loss.rule)}[/] "
                          f"({loss.claim}) " + (escape(_measured(loss)) if _measured(loss) else "loses by design") + "[/]")
        if result.claims:
            console.print("claims of the spec that the source breaks, or steps that lose by design:")
            for loss in result.claims:
                console.print(f"  {escape(loss.stage)}: {escape(loss.rule)}: [bold]{loss.claim}[/], "
                              f"{escape(loss.what)}" + (f"; [red]{escape(_measured(loss))}[/]" if _measured(loss) else ""))
    console.print(("[green]" if result.ok else "[red]") + escape(_verdict(result)) + "[/]")


def _where(ref: RuleRef) -> str:
    """The spec file's name and line: its directory is the install's, noise in a summary."""
    return Path(ref.where).name


def _status(ok: bool | None) -> str:
    return "" if ok is None else "[green]ok[/]" if ok else "[red]FAIL[/]"


def _measured(loss: Loss) -> str:
    if loss.magnitude is None:
        return ""
    return f"max |x| {loss.magnitude:.3g}" + (": does not hold" if loss.holds is False else "")


# -- JSON -----------------------------------------------------------------------------------------


def render_json(result: ParityResult) -> str:
    return json.dumps(_finite(result.to_dict()), indent=2) + "\n"


def _finite(value):
    """JSON has no NaN or infinity (a broken model can produce both): those become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# -- JUnit XML ------------------------------------------------------------------------------------


def render_junit(result: ParityResult) -> str:
    """One <testcase> per check; a failing one carries the divergence and its rules."""
    failures = str(len(result.failures))
    suites = ET.Element("testsuites", name="remap parity", tests=str(len(result.checks)), failures=failures,
                        errors="0", time=f"{result.seconds:.3f}")
    suite = ET.SubElement(suites, "testsuite", name=f"remap parity: {result.source.path} -> {result.target.path}",
                          tests=str(len(result.checks)), failures=failures, errors="0", skipped="0",
                          time=f"{result.seconds:.3f}", timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    properties = ET.SubElement(suite, "properties")
    for name, value in (("source", _side(result, "source")), ("target", _side(result, "target")),
                        ("spec", result.spec or ""), ("setup", _setup(result)),
                        *(("streamed", line) for line in _streaming(result))):
        ET.SubElement(properties, "property", name=name, value=value)
    detail = _failure_detail(result)
    for check in result.checks:
        case = ET.SubElement(suite, "testcase", classname=f"remap.parity.{check.section.replace(' ', '_')}",
                             name=check.name, time="0")
        if not check.ok:
            failure = ET.SubElement(case, "failure", message=check.describe(), type="ParityFailure")
            failure.text = detail
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _failure_detail(result: ParityResult) -> str:
    lines = [f"first divergence: {result.divergence}"]
    lines += [f"rule: {r.stage}: {r.rule} ({r.where})" for r in result.rules]
    lines += [f"claim: {c.stage}: {c.rule}: {c.claim}, {c.what}" + (f"; {_measured(c)}" if _measured(c) else "")
              for c in result.claims]
    return "\n".join(lines)


# -- Markdown -------------------------------------------------------------------------------------


def render_markdown(result: ParityResult) -> str:
    lines = [f"## remap parity: {'PASS' if result.ok else 'FAIL'}", "",
             f"- source: {_side(result, 'source')}", f"- target: {_side(result, 'target')}", f"- {_setup(result)}",
             *(f"- {line}" for line in _streaming(result)), "",
             _row("logits", "value", "tolerance", ""), _rule(4)]
    lines += [_row(label, value, limit, _md_status(check and check.ok)) for label, value, limit, check in _logit_rows(result)]
    lines += ["", _row("hidden state " + HIDDEN_COLUMNS[0], *HIDDEN_COLUMNS[1:]), _rule(len(HIDDEN_COLUMNS))]
    for section, metrics in result.hidden.items():
        mark = " (first divergence)" if section == result.divergence else ""
        lines.append(_row(section, *_hidden_values(metrics), _md_status(_hidden_status(result, section)) + mark))
    if result.divergence:
        lines += ["", f"**First divergence: {result.divergence}.**"]
        if result.rules:
            lines += ["", f"Spec rules that made the {result.divergence} tensors:", "",
                      _row("stage", "rule", "where", "tensors"), _rule(4)]
            lines += [_row(r.stage, r.rule, f"`{_where(r)}`", "<br>".join(f"`{t}`" for t in r.tensors)) for r in result.rules]
        elif result.spec is None:
            lines += ["", NO_SPEC]
        if result.claims:
            lines += ["", "Claims of the spec that do not hold on the source, or lose by design:", "",
                      _row("stage", "rule", "claim", "what", "measured", "exact when"), _rule(6)]
            lines += [_row(c.stage, c.rule, c.claim, c.what, _measured(c), c.reason.strip()) for c in result.claims]
    lines += ["", _verdict(result)]
    return "\n".join(lines) + "\n"


def _row(*cells: str) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _rule(columns: int) -> str:
    return "|---" * columns + "|"


def _md_status(ok: bool | None) -> str:
    return "" if ok is None else "ok" if ok else "**FAIL**"

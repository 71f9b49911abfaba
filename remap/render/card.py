"""The model card (README.md) of a converted checkpoint: where it came from, the recipe that made
it, what each claim of the conversion measured, the parity result once one ran, and how to load it.

Pure text from data (the manifest, the report as JSON, the target layout's hub metadata and
loading lines), with no rich: the executor writes the card beside config.json. The parity result
lives between two markers, so `remap parity SRC DST` replaces that section and nothing else.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import PurePath
from typing import Any, Mapping

import yaml

from remap.errors import flattened

PARITY_START, PARITY_END = "<!-- remap parity -->", "<!-- /remap parity -->"
_PARITY = re.compile(re.escape(PARITY_START) + r".*?" + re.escape(PARITY_END), re.S)
_FRONT = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.S)


def render_card(manifest: Mapping[str, Any], report: Mapping[str, Any] | None, *, metadata: Mapping[str, Any],
                usage: tuple[str, str] | None, source_card: Mapping[str, Any] | None = None,
                source_metadata: Mapping[str, Any] | None = None, source_card_problem: str | None = None) -> str:
    """The card of the conversion `manifest` records. `metadata`: the hub's front matter for the
    target layout (mlx_lm.convert's keys for mlx); `usage`: (language, code) that loads it from
    DST; `source_card`: the front matter of SRC's own card, `source_metadata` what SRC's layout
    puts there (both carried as front_matter says), `source_card_problem` why it is not. The card
    names its own directory DST: it is copied and uploaded, and the same conversion writes the
    same bytes wherever it writes them."""
    recipe = manifest.get("recipe") or {}
    source, revision = recipe.get("source", manifest.get("source")), recipe.get("revision")
    hub = _hub_id(source)
    front = front_matter(source_card or {}, source_metadata or {}, metadata, source if hub else None)
    target = manifest.get("target", {})
    lines = ["---", yaml.safe_dump(front, sort_keys=True).rstrip("\n"), "---", "",
             f"# {PurePath(str(source)).name} for {target.get('layout')}", "",
             f"Converted by remap {manifest.get('remap_version')} from {'the hub repo ' if hub else ''}`{source}`"
             + (f" at revision `{revision}`" if revision else "")
             + f" to the {target.get('layout')} layout ({target.get('variant')}) by the spec `{manifest.get('spec')}`.", "",
             *([f"The source's model card metadata is not carried: {source_card_problem}.", ""] if source_card_problem else []),
             "## Recipe", "", "```bash", _command(recipe, lossy=bool(report and not report.get("ok"))), "```", ""]
    if report is not None:
        lines += _report(report)
    parity = shlex.join(["remap", "parity", str(source), "DST"])
    lines += ["## Parity", "", PARITY_START, f"Not run yet: `{parity}` runs both checkpoints in their own runtimes "
              "and writes its result here.", PARITY_END, ""]
    lines += ["## Use", ""]
    if usage is None:
        lines += [f"No library loads the {target.get('layout')} layout directly.", ""]
    else:
        lines += ["DST: this directory, or its hub repo id once uploaded.", "", f"```{usage[0]}", usage[1].rstrip("\n"),
                  "```", ""]
    # text from files (tensor names, paths) cannot open a comment that would hide or fake a marker
    return "\n".join(line if line in (PARITY_START, PARITY_END) else _safe(line) for line in lines)


def front_matter(source: Mapping[str, Any], source_layout: Mapping[str, Any], target: Mapping[str, Any],
                 hub_id: str | None) -> dict[str, Any]:
    """The card's metadata: SRC's card's (license, language, datasets: what its authors declared
    holds for a conversion too, as mlx_lm.convert carries it) over the target layout's defaults,
    less what SRC's own layout put there (its library, its tags); the library and pipeline that
    load DST are the target's; tags from both. base_model: SRC's hub id, else none (a local
    directory's card names its own parents, not this conversion's)."""
    own_tags = set(source_layout.get("tags") or [])
    tags = [t for t in (source.get("tags") or []) if isinstance(t, str) and t not in own_tags]
    front = {**target, **{k: v for k, v in source.items() if k not in ("base_model", "tags")}}
    front.update({k: target[k] for k in ("library_name", "pipeline_tag") if k in target})
    tags += [t for t in target.get("tags") or [] if t not in tags]
    if not tags:
        front.pop("tags", None)
    else:
        front["tags"] = tags
    return {**front, **({"base_model": hub_id} if hub_id else {})}


def read_front_matter(text: str) -> dict[str, Any]:
    """The YAML between a card's opening `---` lines, as the hub reads it; {} when it has none.
    Raises ValueError when it is not a YAML mapping (aliases refused: a card is short)."""
    from remap.spec.yaml_lines import load, plain

    match = _FRONT.match(text)
    if not match:
        return {}
    try:
        data = load(match.group(1))
    except yaml.YAMLError as exc:
        raise ValueError(f"its YAML front matter does not parse: {flattened(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("its front matter is not a YAML mapping")
    return plain(data)


def with_parity(card: str, section: str) -> str | None:
    """`card` with its parity section replaced by `section` (Markdown); None when it has none."""
    if not _PARITY.search(card):
        return None
    nested = re.sub(r"^(#+) ", r"\1# ", _safe(section.strip()), flags=re.M)  # under the card's own "## Parity"
    return _PARITY.sub(lambda _: f"{PARITY_START}\n{nested}\n{PARITY_END}", card, count=1)


def coverage_text(coverage: Mapping[str, Any]) -> str:
    """Where every source tensor went, in one line (the report's coverage)."""
    c, total = coverage, coverage["source_tensors"] or 1
    claims = ", ".join(f"{n} {claim}" for claim, n in sorted(c["dropped_by_claim"].items()))
    return (f"{c['source_tensors']} source tensors: {c['used']} used ({100 * c['used'] / total:.1f}%), "
            f"{c['dropped']} dropped ({100 * c['dropped'] / total:.1f}%{': ' + claims if claims else ''}), "
            f"{c['unmatched']} unmatched -> {c['target_tensors']} target tensors")


def _report(report: Mapping[str, Any]) -> list[str]:
    """The verdict, the coverage, and every claim with its measured size (max |x| over its tensors:
    of what it drops, or of the rounding it makes)."""
    if report.get("ok"):
        verdict = "; ".join(["OK: target layout met, every source tensor accounted for", *report.get("caveats", [])])
    else:
        verdict = "NOT OK, converted with --allow-lossy: " + "; ".join(report.get("problems", []))
    lines = ["## Report", "", verdict, "", coverage_text(report["coverage"]), ""]
    losses = report.get("losses", [])
    if not losses:
        return lines + ["No claims: every tensor is carried over exactly.", ""]
    lines += [_row("rule", "claim", "what", "tensors", "measured", "why"), "|---" * 6 + "|"]
    for loss in losses:
        lines.append(_row(f"{loss['stage']}: {loss['rule']}", loss["claim"], loss["what"], str(loss["count"]),
                          _measured(loss), loss["reason"].strip()))
    if not report.get("checked_data"):
        lines += ["", "No claim was measured on the bytes (converted with `--no-check-data`)."]
    elif report.get("measured"):
        lines += ["", f"Measured on the bytes: the {', '.join(report['measured'])} claims (`--check-data` measures every kind)."]
    return lines + [""]


def _measured(loss: Mapping[str, Any]) -> str:
    if loss.get("magnitude") is None:
        return "not measured"
    text = f"max |x| {loss['magnitude']:.3g}"
    if loss.get("holds") is False:
        return f"{text}, **breaks the claim**" + (f" at `{loss['where']}`" if loss.get("where") else "")
    return f"{text}, holds" if loss.get("holds") else text


def _command(recipe: Mapping[str, Any], *, lossy: bool) -> str:
    """The `remap convert` line that makes this checkpoint again."""
    words = ["remap", "convert", recipe.get("source", "SRC"), "DST", "--spec", recipe.get("spec", "?")]
    if recipe.get("revision"):
        words += ["--revision", recipe["revision"]]
    if recipe.get("inverse"):
        words.append("--inverse")
    if recipe.get("variant"):
        words += ["--variant", recipe["variant"]]
    for flag, pairs in (("--param", recipe.get("params") or {}), ("--set", recipe.get("settings") or {})):
        words += [w for key, value in pairs.items() for w in (flag, f"{key}={_value(value)}")]
    quantize = recipe.get("quantize")
    if quantize is not None:  # as mlx_lm.convert takes them
        words += ["-q", "--q-bits" if str(quantize).isdigit() else "--quant-predicate", str(quantize),
                  "--q-group-size", str(recipe.get("group_size", 64))]
    if recipe.get("dtype"):
        words += ["--dtype", recipe["dtype"]]
    if str(recipe.get("max_shard_size", "5GB")) != "5GB":
        words += ["--max-shard-size", str(recipe["max_shard_size"])]
    if recipe.get("allow_nonfinite"):
        words.append("--allow-nonfinite")
    if lossy:
        words.append("--allow-lossy")
    return shlex.join(str(w) for w in words)


def _value(value: Any) -> str:
    """As --param reads it back: true / false / null, numbers, text."""
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)


def _hub_id(source: Any) -> bool:
    """A hub repo id rather than a path: recorded as given, where a local path is absolute."""
    text = str(source or "")
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not text.startswith(("/", "."))


def _safe(text: str) -> str:
    return text.replace("<!--", "&lt;!--")


def _row(*cells: str) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"

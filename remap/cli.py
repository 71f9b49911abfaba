"""The `remap` command. Every command is a thin shell over remap.api: parse, call, print.

Exit codes: 0 success, 1 a check failed (report not OK, parity drift), 2 bad input (a
RemapError: one line saying which file / tensor / rule and what was expected; --debug for the
traceback).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from remap.render import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from remap import __version__, api
from remap.errors import RemapError
from remap.execute import check_destination
from remap.names import collapse
from remap.expr import evaluate
from remap.render.report import render_json, render_markdown, render_rich
from remap.spec.invert import invert_document
from remap.spec.load import bundled_specs, dump_spec, load_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Plan, convert, verify and parity-check DeepSeek-V3-family checkpoints.")
console = Console()
err = Console(stderr=True)
_state = {"debug": False}


@app.callback(invoke_without_command=True)
def main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    _state["debug"] = debug
    if version:
        console.print(f"remap {__version__}")
        raise typer.Exit(0)


def _params(values: List[str], flag: str = "--param") -> dict[str, Any]:
    """KEY=VALUE pairs: numbers, true / false / null as such, anything else as text."""
    params = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RemapError(f"{flag} {item!r}", expected="KEY=VALUE")
        params[key] = evaluate(value, {}) if value[:1].isdigit() or value in ("true", "false", "null") else value
    return params


SpecOption = typer.Option(..., "--spec", "-s", help="A bundled spec name (see `remap specs`) or a YAML file.")
InverseOption = typer.Option(False, "--inverse", help="Run the spec backwards.")
VariantOption = typer.Option(None, "--variant", help="Target layout variant (e.g. mlx: embed_q | kv_b_proj).")
DtypeOption = typer.Option(None, "--dtype", help="Cast floating outputs to this dtype (bf16, f16, f32).")
ParamOption = typer.Option([], "--param", "-p", help="Spec parameter KEY=VALUE (repeatable).")
RevisionOption = typer.Option(None, "--revision", help="Hub revision (branch, tag, commit) for a repo id.")
AllowPickleOption = typer.Option(False, "--allow-pickle", help="Let a .pt/.bin file hold Python objects: runs their pickle code, so only for a file you trust.")
QuantizeOption = typer.Option(None, "--quantize", "-Q", help="MLX targets: quantize as mlx-lm does, to this many bits (2-8) or by a mixed recipe (mixed_2_6, mixed_3_4, mixed_3_6, mixed_4_6).")
GroupOption = typer.Option(64, "--q-group-size", help="With --quantize: the group size (32, 64, 128).")
CheckDataOption = typer.Option(None, "--check-data/--no-check-data", help="Measure every claim on the bytes, the sizes of unused and rounded data too (default: the claims data can break, zero and redundant; --no-check-data: headers only).")
NonfiniteOption = typer.Option(False, "--allow-nonfinite", help="Let quantization take NaN and Inf weights (refused otherwise: they spread over their groups); --check-data then lists where they are.")
SetOption = typer.Option([], "--set", help="Override a key of the source's config.json (or of the one read off the shapes) KEY=VALUE (repeatable).")


def _emit_report(report, *, full: bool, json_file: Optional[Path], markdown_file: Optional[Path]) -> None:
    render_rich(report, console, full=full)
    if json_file:
        json_file.write_text(render_json(report) + "\n")
    if markdown_file:
        markdown_file.write_text(render_markdown(report, full=full))


@app.command()
def inspect(
    checkpoint: str = typer.Argument(..., help="Directory, .safetensors file, .pt/.bin, or hub repo id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    full: bool = typer.Option(False, "--full", help="One row per tensor (no collapsing of layer indices)."),
    revision: Optional[str] = RevisionOption,
    allow_pickle: bool = AllowPickleOption,
) -> None:
    """What a checkpoint is: its tensors, the detected layout and variant, its config."""
    ckpt = api.open_source(checkpoint, revision=revision, allow_pickle=allow_pickle)
    tensors = ckpt.tensors
    detection = api.identify(ckpt)
    summary = {
        "source": ckpt.source,
        "files": list(ckpt.files),
        "tensors": len(tensors),
        "bytes": sum(t.nbytes for t in tensors.values()),
        "layout": detection.layout,
        "variant": detection.variant,
        "mp": ckpt.ranks,  # model-parallel ranks, put together into the tensors listed
        "detail": detection.describe(),
        "config": {k: v for k, v in (detection.config or ckpt.config or {}).items() if not isinstance(v, (dict, list))},
        "config_source": "tensor shapes" if detection.inferred else "config.json" if ckpt.config is not None else None,
        "assumed": list(_assumed(detection)),
    }
    if as_json:
        summary["tensor_list"] = [{"name": n, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes} for n, t in tensors.items()]
        print(json.dumps(summary, indent=2))
    else:
        table = Table(title=f"{ckpt.source}: {len(tensors)} tensors, {summary['bytes'] / 2**20:.1f} MiB", header_style="bold")
        for column in ("tensor", "shape", "dtype", "MiB"):
            table.add_column(column, overflow="fold")
        items = sorted(tensors.values(), key=lambda t: _natural(t.name))
        groups = [(t.name, [t]) for t in items] if full else collapse(items, lambda t: t.name, lambda t: (tuple(t.shape), t.dtype))
        for name, members in groups:
            t = members[0]
            table.add_row(escape(name), str(list(t.shape)), t.dtype, f"{sum(m.nbytes for m in members) / 2**20:.2f}")
        console.print(table)
        shown = ", ".join(f"{k}={v}" for k, v in summary["config"].items() if k in _CONFIG_SUMMARY)
        console.print(f"config: {escape(shown) or '(no config.json)'}")
        if detection.inferred:
            assumed = ", ".join(f"{k}={detection.raw_config[k]}" for k in summary["assumed"])
            console.print("config read off the tensors' shapes (no config.json)"
                          + (f"; assumed {assumed}: override with --set KEY=VALUE" if assumed else ""), soft_wrap=True)
        mp = f", mp={ckpt.ranks} (model-parallel files, read as whole tensors)" if ckpt.ranks > 1 else ""
        console.print(f"layout: [bold]{detection.describe()}[/]{mp}" if detection.layout else f"[red]layout: {detection.describe()}[/]")
    if detection.layout is None:
        raise typer.Exit(2 if len(detection.unmatched) == detection.total else 1)


def _assumed(detection) -> tuple[str, ...]:
    """The config keys the detected layout could not read off the shapes, where it had to."""
    from remap.layouts import get_layout

    return get_layout(detection.layout).assumed if detection.inferred else ()


_CONFIG_SUMMARY = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
                   "n_routed_experts", "n_shared_experts", "moe_intermediate_size", "first_k_dense_replace", "vocab_size")


def _natural(name: str):
    from remap.plan import natural_key
    return natural_key(name)


@app.command()
def report(
    src: str = typer.Argument(..., help="Source checkpoint."),
    spec: str = SpecOption,
    inverse: bool = InverseOption,
    variant: Optional[str] = VariantOption,
    dtype: Optional[str] = DtypeOption,
    param: List[str] = ParamOption,
    settings: List[str] = SetOption,
    allow_nonfinite: bool = NonfiniteOption,
    check_data: Optional[bool] = CheckDataOption,
    quantize: Optional[str] = QuantizeOption,
    q_group_size: int = GroupOption,
    full: bool = typer.Option(False, "--full", help="One row per tensor."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON here."),
    markdown_file: Optional[Path] = typer.Option(None, "--markdown", help="Also write the report as Markdown here."),
    revision: Optional[str] = RevisionOption,
    allow_pickle: bool = AllowPickleOption,
) -> None:
    """Plan a conversion from headers alone and verify it against the target layout."""
    plan, ckpt = api.plan(src, spec, inverse=inverse, params=_params(param), settings=_params(settings, "--set"),
                          dtype=dtype, variant=variant, revision=revision, allow_nonfinite=allow_nonfinite,
                          quantize=quantize, group_size=q_group_size, allow_pickle=allow_pickle)
    result = api.report(plan, ckpt, check=check_data)
    _emit_report(result, full=full, json_file=json_file, markdown_file=markdown_file)
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def convert(
    src: str = typer.Argument(..., help="Source checkpoint: directory, file, or hub repo id."),
    dst: Path = typer.Argument(..., help="Output directory (must not exist unless --force)."),
    spec: str = SpecOption,
    inverse: bool = InverseOption,
    variant: Optional[str] = VariantOption,
    dtype: Optional[str] = DtypeOption,
    param: List[str] = ParamOption,
    settings: List[str] = SetOption,
    allow_nonfinite: bool = NonfiniteOption,
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output file, e.g. 5GB."),
    workers: int = typer.Option(2, "--workers", min=1, help="Steps computed in parallel."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the report; write nothing."),
    check_data: Optional[bool] = CheckDataOption,
    allow_lossy: bool = typer.Option(False, "--allow-lossy", help="Convert even where the data breaks a claim (the report and manifest record each break and its size)."),
    quantize: Optional[str] = QuantizeOption,
    q_group_size: int = GroupOption,
    force: bool = typer.Option(False, "--force", help="Replace an existing DST (only once the new one is complete)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from DST.partial."),
    checksums: bool = typer.Option(True, "--checksums/--no-checksums", help="sha256 of every output file in the manifest (one extra pass over the data)."),
    fsync: bool = typer.Option(False, "--fsync", help="fsync every file before DST appears (survive power loss, not only a crash)."),
    full: bool = typer.Option(False, "--full", help="One row per tensor in the report."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print the report only when it is not OK."),
    revision: Optional[str] = RevisionOption,
    allow_pickle: bool = AllowPickleOption,
) -> None:
    """Convert SRC into DST with a spec, streaming, with memory bounded by the largest piece."""
    plan, ckpt = api.plan(src, spec, inverse=inverse, params=_params(param), settings=_params(settings, "--set"),
                          dtype=dtype, variant=variant, revision=revision, allow_nonfinite=allow_nonfinite,
                          quantize=quantize, group_size=q_group_size, max_shard_size=max_shard_size,
                          allow_pickle=allow_pickle)
    check_destination(dst, ckpt)  # before the report prints: a refused output needs no report
    result = api.report(plan, ckpt, check=check_data)
    if not quiet or dry_run or not result.ok:
        render_rich(result, console, full=full)
    lossy_by_choice = allow_lossy and result.only_claims_broken
    if dry_run or not (result.ok or lossy_by_choice):
        if not (result.ok or lossy_by_choice):
            hint = " (--allow-lossy to convert anyway)" if result.only_claims_broken else ""
            err.print(f"[red]not converting[/]: {escape(result.problems[0])}{hint}", soft_wrap=True)
        raise typer.Exit(0 if result.ok else 1)
    try:
        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), console=err, transient=True,
                      disable=not err.is_terminal) as bar:  # a bar is for eyes; in a log it is noise
            task = bar.add_task(f"{plan.name} -> {dst}", total=result.coverage["target_bytes"])
            done = api.convert(plan, ckpt, dst, report=result.to_dict(), workers=workers, force=force, resume=resume, sync=fsync, checksums=checksums,
                               progress=lambda n: bar.advance(task, n))
    except KeyboardInterrupt:  # here, not in run(): typer turns it into a silent exit 130
        err.print("[red]interrupted[/]: the destination was not written (its .partial directory can be --resume'd)", soft_wrap=True)
        raise typer.Exit(130) from None
    console.print(f"wrote {dst}: {len(done.files)} files, {done.bytes_written / 2**20:.1f} MiB in {done.seconds:.1f}s "
                  f"({result.coverage['target_tensors']} tensors; {_coverage(result)})")


def _coverage(result) -> str:
    from remap.render.report import coverage_line
    return coverage_line(result).split(" -> ")[0]


@app.command()
def invert(
    spec: str = typer.Argument(..., help="Spec to invert (bundled name or file)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the inverted spec here (default: stdout)."),
) -> None:
    """Write the inverse of a spec (every rule run backwards), or say which rule cannot invert."""
    text = dump_spec(invert_document(load_spec(spec)))
    if output:
        output.write_text(text)
        console.print(f"wrote {output}")
    else:
        print(text, end="")


@app.command()
def verify(dst: Path = typer.Argument(..., help="A directory written by `remap convert`.")) -> None:
    """Re-check a converted checkpoint: every file's sha256 and every tensor's header."""
    result = api.verify(dst)
    for problem in result.problems:
        console.print(f"[red]problem:[/] {escape(problem)}")
    status = ("[green]OK[/]" if result.hashed else "[yellow]OK, headers only[/]") if result.ok else "[red]NOT OK[/]"
    evidence = f" ({'; '.join(result.evidence)})" if result.evidence else ""
    console.print(f"{status}: {result.checked_files} files, {result.checked_tensors} tensors checked{escape(evidence)}")
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def parity(
    src: str = typer.Argument(..., help="Source checkpoint, run by the runtime of its layout (transformers, ScratchModel, mlx-lm)."),
    dst: Optional[str] = typer.Argument(None, help="Its conversion, run by its own runtime; leave out to convert SRC with --spec into a temporary directory."),
    spec: Optional[str] = typer.Option(None, "--spec", "-s", help="Spec that converts SRC (without DST), or that made DST (names the rules behind a divergence; default: DST's manifest)."),
    inverse: bool = InverseOption,
    variant: Optional[str] = VariantOption,
    param: List[str] = ParamOption,
    settings: List[str] = SetOption,
    torch_model: Optional[Path] = typer.Option(None, "--torch-model", help="Run SRC with your own PyTorch model code: a .py file defining build(config, state_dict) and forward(model, input_ids), optionally layers(model)."),
    quantize: Optional[str] = QuantizeOption,
    q_group_size: int = GroupOption,
    tokens: int = typer.Option(32, "--tokens", min=1, help="Tokens per sequence."),
    batch: int = typer.Option(2, "--batch", min=1, help="Sequences."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random token ids."),
    dtype: str = typer.Option("float32", "--dtype", help="Compute dtype on both sides: float32 | bfloat16 | float16."),
    max_error: Optional[float] = typer.Option(None, "--max-error", help="Largest |logit difference|, as a fraction of max |source logit|."),
    min_cosine: Optional[float] = typer.Option(None, "--min-cosine", help="Lowest mean cosine similarity of the logits."),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", help="Lowest fraction of positions whose top-1 token agrees."),
    min_top5: Optional[float] = typer.Option(None, "--min-top5", help="Lowest mean overlap of the top-5 tokens."),
    max_kl: Optional[float] = typer.Option(None, "--max-kl", help="Largest mean KL(source || target), in nats."),
    max_hidden_error: Optional[float] = typer.Option(None, "--max-hidden-error", help="Largest |difference| of a hidden state, as a fraction of its max |source value|."),
    max_hidden_rms: Optional[float] = typer.Option(None, "--max-hidden-rms", help="Largest RMS difference of a hidden state, as a fraction of its RMS."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON here."),
    junit_file: Optional[Path] = typer.Option(None, "--junit", help="Also write JUnit XML here (one testcase per check)."),
    markdown_file: Optional[Path] = typer.Option(None, "--markdown", help="Also write the result as Markdown here."),
    revision: Optional[str] = RevisionOption,
    allow_pickle: bool = AllowPickleOption,
) -> None:
    """Run SRC and its conversion on the same tokens; compare logits and every layer's hidden state."""
    from remap.parity import run_parity
    from remap.render.parity import render_json, render_junit, render_markdown, render_rich

    limits = dict(max_error=max_error, min_cosine=min_cosine, min_top1=min_top1, min_top5=min_top5, max_kl=max_kl,
                  max_hidden_error=max_hidden_error, max_hidden_rms=max_hidden_rms)
    result = run_parity(src, dst, spec=spec, inverse=inverse, variant=variant, params=_params(param),
                        settings=_params(settings, "--set"), torch_model=torch_model, revision=revision,
                        quantize=quantize, group_size=q_group_size, allow_pickle=allow_pickle,
                        tokens=tokens, batch=batch, seed=seed, dtype=dtype, tolerances=limits)
    render_rich(result, console)
    for path, render in ((json_file, render_json), (junit_file, render_junit), (markdown_file, render_markdown)):
        if path:
            path.write_text(render(result))
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def specs() -> None:
    """List the bundled mapping specs."""
    table = Table(header_style="bold")
    for column in ("spec", "from", "to", "description"):
        table.add_column(column, overflow="fold")
    for path in bundled_specs():
        s = load_spec(path)
        table.add_row(s.name, s.source_layout, s.target_layout, s.description.strip())
    console.print(table)


def run() -> None:
    """Entry point: click handles usage errors (exit 2) and exit codes; a RemapError is bad
    input, printed as one line."""
    try:
        app()
    except (RemapError, OSError) as exc:
        if _state["debug"]:
            raise
        if isinstance(exc, OSError):  # a path the user gave: missing folder, name too long, no permission
            exc = RemapError(exc.strerror or str(exc), file=str(exc.filename) if exc.filename else None)
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    run()

"""The `remap` command. Every command is a thin shell over remap.api: parse, call, print.

Exit codes: 0 success, 1 a check failed (report not OK, parity drift), 2 bad input (a
RemapError: one line saying which file / tensor / rule and what was expected; --debug for the
traceback). Every flag is checked before any work.
"""

from __future__ import annotations

import json
from operator import attrgetter
from pathlib import Path
from typing import Any, List, Optional

import typer

from remap import __version__, flags
from remap.cli_shell import Command, Group, run_guarded
from remap.errors import RemapError
from remap.heap import leave_to_exit, paused_gc
from remap.render import escape
from remap.render.table import FittingConsole

# Each command imports what it uses inside itself: `remap --version` or `inspect` must not pay
# for numpy, jsonschema and the planner at start-up.

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=Group,
                  help="Plan, convert, verify and parity-check DeepSeek-V3-family checkpoints.")
console = FittingConsole()
err = FittingConsole(stderr=True)
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


SpecOption = typer.Option(None, "--spec", "-s", help="A bundled spec name (see `remap specs`) or a YAML file (wins over --to).")
ToOption = typer.Option(None, "--to", metavar="LAYOUT", help="Target layout (hf, mlx, deepseek, scratch): remap reads what SRC is and picks the bundled spec.")
InverseOption = typer.Option(False, "--inverse", help="Run the spec backwards.")
VariantOption = typer.Option(None, "--variant", help="Target layout variant (e.g. mlx: embed_q | kv_b_proj).")
DtypeOption = typer.Option(None, "--dtype", help="Cast floating outputs to bfloat16, float16 or float32 (or bf16, f16, f32), as mlx_lm.convert --dtype does.")
ParamOption = typer.Option([], "--param", "-p", help="Spec parameter KEY=VALUE (repeatable).")
RevisionOption = typer.Option(None, "--revision", help="Hub revision (branch, tag, commit) for a repo id.")
AllowPickleOption = typer.Option(False, "--allow-pickle", help="Let a .pt/.bin file hold Python objects: runs their pickle code, so only for a file you trust.")
QOption = typer.Option(False, "-q", help="MLX targets: quantize as mlx_lm.convert -q does: --q-bits (default 4), --q-group-size (default 64), or --quant-predicate.")
QuantizeOption = typer.Option(None, "--quantize", "-Q", metavar="[BITS|RECIPE]", help="MLX targets: quantize; alone as -q, BITS as --q-bits, RECIPE as --quant-predicate.")
BitsOption = typer.Option(None, "--q-bits", help=f"Bits per weight: {flags.BITS} (what mlx.core.quantize takes). Implies -q.")
GroupOption = typer.Option(None, "--q-group-size", help=f"Weights per scale and bias: {flags.GROUPS} (default 64). Implies -q.")
PredicateOption = typer.Option(None, "--quant-predicate", metavar="RECIPE", help=f"mlx-lm's mixed-bit recipe: {flags.RECIPES}. Implies -q.")
CheckDataOption = typer.Option(None, "--check-data/--no-check-data", help="Measure every claim on the bytes, the sizes of unused and rounded data too (default: the claims data can break, zero and redundant; --no-check-data: headers only).")
NonfiniteOption = typer.Option(False, "--allow-nonfinite", help="Let quantization take NaN and Inf weights (refused otherwise: they spread over their groups; --check-data then lists where they are), and a --dtype cast write values past its range as Inf (refused otherwise).")
SetOption = typer.Option([], "--set", help="Override a key of the source's config.json (or of the one read off the shapes) KEY=VALUE (repeatable).")


def JsonOption(what: str) -> Any:
    return typer.Option(None, "--json", metavar="[PATH|-]", help=f"Write {what} as JSON to PATH; - or alone: to stdout, and nothing else there.")


@app.command(cls=Command)
@paused_gc  # short commands holding ~1M small acyclic objects: collections are pure cost
def inspect(
    checkpoint: str = typer.Argument(..., help="Directory, .safetensors file, .pt/.bin, or hub repo id."),
    json_file: Optional[str] = JsonOption("the summary and every tensor"),
    full: bool = typer.Option(False, "--full", help="One row per tensor (no collapsing of layer indices)."),
    revision: Optional[str] = RevisionOption,
    allow_pickle: bool = AllowPickleOption,
) -> None:
    """What a checkpoint is: its tensors, the detected layout and variant, its config."""
    from remap import api
    from remap.layouts import LAYOUTS
    from remap.render import jsontext
    from remap.render.listing import render_inspect

    outputs = flags.Outputs(json=json_file, reads=flags.inputs(checkpoint))
    with outputs.working():
        ckpt = api.open_source(checkpoint, revision=revision, allow_pickle=allow_pickle)
        tensors = ckpt.tensors
        sizes = [t.nbytes for t in tensors.values()]  # once, for the total and the JSON's rows
        detection = api.identify(ckpt)
        summary = {
            "source": ckpt.source,
            "files": list(ckpt.files),
            "tensors": len(tensors),
            "bytes": sum(sizes),
            "layout": detection.layout,
            "variant": detection.variant,
            "mp": ckpt.ranks,  # model-parallel ranks, put together into the tensors listed
            "detail": detection.describe(),
            "config": {k: v for k, v in (detection.config or ckpt.config or {}).items() if not isinstance(v, (dict, list))},
            "config_source": "tensor shapes" if detection.inferred else "config.json" if ckpt.config is not None else None,
            "assumed": list(_assumed(detection)),
        }
        if not outputs.piped:
            render_inspect(summary, list(tensors.values()), detection, console, full=full)
    outputs.write(json=lambda: jsontext.dumps({**summary, "tensor_list": _tensor_list(tensors, sizes)}) + "\n")
    leave_to_exit(ckpt, tensors, sizes, detection)
    if detection.layout is None and len(detection.unmatched) == detection.total:
        raise RemapError(detection.describe(), file=ckpt.source, expected=f"a checkpoint of a layout remap knows: {flags.listed(LAYOUTS)}")
    if detection.layout is None:
        raise typer.Exit(1)


def _tensor_list(tensors: dict, sizes: list[int]) -> Any:
    """inspect's JSON rows, made only for --json, as columns (not 92k dicts for DeepSeek-V3)."""
    from remap.render.jsontext import Columns

    infos = tensors.values()
    return Columns(name=list(tensors), shape=list(map(attrgetter("shape"), infos)), dtype=list(map(attrgetter("dtype"), infos)),
                   bytes=sizes)


def _assumed(detection) -> tuple[str, ...]:
    """The config keys the detected layout could not read off the shapes, where it had to."""
    from remap.layouts import get_layout

    return get_layout(detection.layout).assumed if detection.inferred else ()


@app.command(cls=Command)
@paused_gc
def report(
    src: str = typer.Argument(..., help="Source checkpoint."),
    spec: Optional[str] = SpecOption,
    to: Optional[str] = ToOption,
    inverse: bool = InverseOption,
    variant: Optional[str] = VariantOption,
    dtype: Optional[str] = DtypeOption,
    param: List[str] = ParamOption,
    settings: List[str] = SetOption,
    allow_nonfinite: bool = NonfiniteOption,
    check_data: Optional[bool] = CheckDataOption,
    q: bool = QOption,
    quantize: Optional[str] = QuantizeOption,
    q_bits: Optional[int] = BitsOption,
    q_group_size: Optional[int] = GroupOption,
    quant_predicate: Optional[str] = PredicateOption,
    full: bool = typer.Option(False, "--full", help="One row per tensor."),
    json_file: Optional[str] = JsonOption("the report (schemas/report.schema.json)"),
    markdown_file: Optional[str] = typer.Option(None, "--markdown", metavar="PATH|-", help="Write the report as Markdown to PATH (- : stdout)."),
    revision: Optional[str] = RevisionOption,
    allow_pickle: bool = AllowPickleOption,
) -> None:
    """Plan a conversion from headers alone and verify it against the target layout."""
    from remap import api, route
    from remap.render.progress import step_bar
    from remap.render.report import render_json, render_markdown, render_rich

    quantization, group_size = flags.quantization(q, quantize, q_bits, q_group_size, quant_predicate)
    dtype, outputs = flags.cast("--dtype", dtype), flags.Outputs(json=json_file, markdown=markdown_file, reads=flags.inputs(src, spec))
    route_options = dict(params=flags.pairs(param), settings=flags.pairs(settings, "--set"), variant=variant)
    flags.layout("--to", to)
    with outputs.working():
        ckpt = api.open_source(src, revision=revision, allow_pickle=allow_pickle)
        spec, inverse = route.resolve(ckpt, spec, to, inverse, quantization, **route_options)
        plan, ckpt = api.plan(ckpt, spec, inverse=inverse, dtype=dtype, revision=revision, allow_nonfinite=allow_nonfinite,
                              quantize=quantization, group_size=group_size, **route_options)
        with step_bar(err, "measuring claims", enabled=not outputs.piped) as step:
            result = api.report(plan, ckpt, check=check_data, progress=step)
        route.check_report(ckpt, spec, inverse, result, **route_options)
        if not outputs.piped:
            render_rich(result, console, full=full)
    outputs.write(json=lambda: render_json(result) + "\n", markdown=lambda: render_markdown(result, full=full))
    leave_to_exit(ckpt, plan, result)
    raise typer.Exit(0 if result.ok else 1)


@app.command(cls=Command)
def convert(
    src: str = typer.Argument(..., help="Source checkpoint: directory, file, or hub repo id."),
    dst: Path = typer.Argument(..., help="Output directory (must not exist unless --force)."),
    spec: Optional[str] = SpecOption,
    to: Optional[str] = ToOption,
    inverse: bool = InverseOption,
    variant: Optional[str] = VariantOption,
    dtype: Optional[str] = DtypeOption,
    param: List[str] = ParamOption,
    settings: List[str] = SetOption,
    allow_nonfinite: bool = NonfiniteOption,
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output file: bytes, or with KB, MB, GB, TB (5GB)."),
    workers: int = typer.Option(2, "--workers", min=1, help="Steps computed in parallel."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the report; write nothing (exit 2 where convert would refuse DST)."),
    check_data: Optional[bool] = CheckDataOption,
    allow_lossy: bool = typer.Option(False, "--allow-lossy", help="Convert even where the data breaks a claim (the report and manifest record each break and its size)."),
    q: bool = QOption,
    quantize: Optional[str] = QuantizeOption,
    q_bits: Optional[int] = BitsOption,
    q_group_size: Optional[int] = GroupOption,
    quant_predicate: Optional[str] = PredicateOption,
    force: bool = typer.Option(False, "--force", help="Replace an existing DST (only once the new one is complete)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from DST.partial."),
    checksums: bool = typer.Option(True, "--checksums/--no-checksums", help="A digest of every output file in the manifest (BLAKE3, as b3sum prints it, hashed as each file is written)."),
    sha256: bool = typer.Option(False, "--sha256", help="Plain sha256 of each whole file instead (the hub's LFS ids; serial per file, slower)."),
    fsync: bool = typer.Option(False, "--fsync", help="fsync every file before DST appears (survive power loss, not only a crash)."),
    full: bool = typer.Option(False, "--full", help="One row per tensor in the report."),
    quiet: bool = typer.Option(False, "--quiet", help="Print the report only when it is not OK (-q quantizes, as in mlx_lm.convert)."),
    revision: Optional[str] = RevisionOption,
    allow_pickle: bool = AllowPickleOption,
) -> None:
    """Convert SRC into DST with a spec, streaming, with memory bounded by the largest piece."""
    from remap import api, route
    from remap.render.progress import step_bar
    from remap.render.report import render_rich

    quantization, group_size = flags.quantization(q, quantize, q_bits, q_group_size, quant_predicate)
    dtype, _, _ = flags.cast("--dtype", dtype), flags.shard_size_flag(max_shard_size), flags.layout("--to", to)
    route_options = dict(params=flags.pairs(param), settings=flags.pairs(settings, "--set"), variant=variant)
    ckpt = api.open_source(src, revision=revision, allow_pickle=allow_pickle)
    spec, inverse = route.resolve(ckpt, spec, to, inverse, quantization, **route_options)
    plan, ckpt = api.plan(ckpt, spec, inverse=inverse, dtype=dtype, revision=revision, allow_nonfinite=allow_nonfinite,
                          quantize=quantization, group_size=group_size, max_shard_size=max_shard_size, **route_options)
    _check_destination(dst, ckpt, force=force, resume=resume, dry_run=dry_run)
    with step_bar(err, "measuring claims", enabled=not quiet) as step:
        result = api.report(plan, ckpt, check=check_data, progress=step)
    route.check_report(ckpt, spec, inverse, result, **route_options)
    if not quiet or dry_run or not result.ok:
        render_rich(result, console, full=full)
    lossy_by_choice = allow_lossy and result.only_claims_broken
    if dry_run or not (result.ok or lossy_by_choice):
        if not (result.ok or lossy_by_choice):
            hint = " (--allow-lossy to convert anyway)" if result.only_claims_broken else ""
            err.print(f"[red]not converting[/]: {escape(result.problems[0])}{hint}", soft_wrap=True)
        raise typer.Exit(0 if result.ok else 1)
    _write(plan, ckpt, dst, result, workers=workers, force=force, resume=resume, sync=fsync, checksums=checksums, sha256=sha256)


def _write(plan, ckpt, dst: Path, result, *, sha256: bool, **options: Any) -> None:
    """Convert, with a byte bar, and say what was written."""
    from remap import api
    from remap.io.hashing import BLAKE3, SHA256
    from remap.render.progress import byte_bar

    try:
        with byte_bar(err, f"{plan.name} -> {escape(dst)}", result.coverage["target_bytes"]) as advance:
            done = api.convert(plan, ckpt, dst, report=result.to_dict(), digest=SHA256 if sha256 else BLAKE3, progress=advance,
                               **options)
    except KeyboardInterrupt:  # here, not in run(): typer turns it into a silent exit 130
        err.print("[red]interrupted[/]: the destination was not written (its .partial directory can be --resume'd)", soft_wrap=True)
        raise typer.Exit(130) from None
    console.print(f"wrote {escape(dst)}: {len(done.files)} files, {done.bytes_written / 2**20:.1f} MiB in {done.seconds:.1f}s "
                  f"({result.coverage['target_tensors']} tensors; {_coverage(result)})")


def _check_destination(dst: Path, ckpt, *, force: bool, resume: bool, dry_run: bool) -> None:
    """Before the report prints: a refused output needs no report, and a dry run says it would be refused."""
    from remap.destination import check_destination

    try:
        check_destination(dst, ckpt, force=force, resume=resume)
    except RemapError as exc:
        if dry_run:
            exc.message = f"convert would refuse it (--dry-run wrote nothing): {exc.message}"
        raise


def _coverage(result) -> str:
    from remap.render.report import coverage_line
    return coverage_line(result).split(" -> ")[0]


@app.command(cls=Command)
def invert(
    spec: str = typer.Argument(..., help="Spec to invert (bundled name or file)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write the inverted spec here (default, or -: stdout)."),
) -> None:
    """Write the inverse of a spec (every rule run backwards), or say which rule cannot invert and
    why a whole inverse cannot run on the layout it reads."""
    from remap.inverse_check import check_inverse
    from remap.spec.invert import invert_document
    from remap.spec.load import dump_spec, load_spec

    flags.output("--output", output, reads=flags.spec_file(spec))
    forward = load_spec(spec)
    check_inverse(forward)
    text = dump_spec(invert_document(forward))
    if output and output != "-":
        flags.write_output("--output", output, text)
        console.print(f"wrote {escape(output)}")
    else:
        print(text, end="")


@app.command(cls=Command)
def verify(
    dst: Path = typer.Argument(..., help="A directory written by `remap convert`."),
    json_file: Optional[str] = JsonOption("the result"),
) -> None:
    """Re-check a converted checkpoint: every file's digest (as its manifest names it) and every tensor's header."""
    from remap import api
    from remap.render.listing import render_verify

    outputs = flags.Outputs(json=json_file, reads=flags.inputs(str(dst)))
    with outputs.working():
        result = api.verify(dst)
        if not outputs.piped:
            render_verify(result, console)
    outputs.write(json=lambda: json.dumps({"dst": str(dst), **result.to_dict()}, indent=2) + "\n")
    raise typer.Exit(0 if result.ok else 1)


@app.command(cls=Command)
def parity(
    src: str = typer.Argument(..., help="Source checkpoint, run by the runtime of its layout (transformers, ScratchModel, mlx-lm)."),
    dst: Optional[str] = typer.Argument(None, help="Its conversion, run by its own runtime; leave out to convert SRC with --spec into a temporary directory."),
    spec: Optional[str] = typer.Option(None, "--spec", "-s", help="Spec that converts SRC (without DST), or that made DST (names the rules behind a divergence; default: DST's manifest)."),
    to: Optional[str] = typer.Option(None, "--to", metavar="LAYOUT", help="Without DST: convert SRC to this layout by the bundled spec remap picks for it."),
    inverse: bool = InverseOption,
    variant: Optional[str] = VariantOption,
    param: List[str] = ParamOption,
    settings: List[str] = SetOption,
    torch_model: Optional[Path] = typer.Option(None, "--torch-model", help="Run SRC with your own PyTorch model code: a .py file defining build(config, state_dict) and forward(model, input_ids), optionally layers(model)."),
    q: bool = QOption,
    quantize: Optional[str] = QuantizeOption,
    q_bits: Optional[int] = BitsOption,
    q_group_size: Optional[int] = GroupOption,
    quant_predicate: Optional[str] = PredicateOption,
    tokens: int = typer.Option(32, "--tokens", min=1, help="Tokens per sequence."),
    batch: int = typer.Option(2, "--batch", min=1, help="Sequences."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random token ids."),
    dtype: str = typer.Option("float32", "--dtype", help="Compute dtype on both sides: float32, bfloat16 or float16 (or f32, bf16, f16)."),
    max_error: Optional[float] = typer.Option(None, "--max-error", help="Largest |logit difference|, as a fraction of max |source logit|."),
    min_cosine: Optional[float] = typer.Option(None, "--min-cosine", help="Lowest mean cosine similarity of the logits."),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", help="Lowest fraction of positions whose top-1 token agrees."),
    min_top5: Optional[float] = typer.Option(None, "--min-top5", help="Lowest mean overlap of the top-5 tokens."),
    max_kl: Optional[float] = typer.Option(None, "--max-kl", help="Largest mean KL(source || target), in nats."),
    max_hidden_error: Optional[float] = typer.Option(None, "--max-hidden-error", help="Largest |difference| of a hidden state, as a fraction of its max |source value|."),
    max_hidden_rms: Optional[float] = typer.Option(None, "--max-hidden-rms", help="Largest RMS difference of a hidden state, as a fraction of its RMS."),
    stream: bool = typer.Option(False, "--stream", help="Run both sides one decoder layer at a time, loading only that layer (and the routed experts the tokens pick)."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", metavar="SIZE", help="Stream when both models whole would need more than SIZE (e.g. 8GB) [default: 80% of the memory available]."),
    json_file: Optional[str] = JsonOption("the result (schemas/parity.schema.json)"),
    junit_file: Optional[str] = typer.Option(None, "--junit", metavar="PATH|-", help="Write JUnit XML to PATH, one testcase per check (- : stdout)."),
    markdown_file: Optional[str] = typer.Option(None, "--markdown", metavar="PATH|-", help="Write the result as Markdown to PATH (- : stdout)."),
    revision: Optional[str] = RevisionOption,
    allow_pickle: bool = AllowPickleOption,
) -> None:
    """Run SRC and its conversion on the same tokens; compare logits and every layer's hidden state."""
    from remap.parity import run_parity
    from remap.render.progress import step_bar
    from remap.render.parity import render_json, render_junit, render_markdown, render_rich

    quantization, group_size = flags.quantization(q, quantize, q_bits, q_group_size, quant_predicate)
    dtype, outputs = flags.cast("--dtype", dtype), flags.Outputs(json=json_file, junit=junit_file, markdown=markdown_file,
                                                     reads=flags.inputs(src, spec, dst, torch_model))
    limits = dict(max_error=max_error, min_cosine=min_cosine, min_top1=min_top1, min_top5=min_top5, max_kl=max_kl, max_hidden_error=max_hidden_error, max_hidden_rms=max_hidden_rms)
    route_options = dict(params=flags.pairs(param), settings=flags.pairs(settings, "--set"), variant=variant)
    if flags.layout("--to", to) is not None and dst is not None:
        raise RemapError(f"--to {to} with DST {dst}", expected="DST (parity against it) or --to (convert SRC first), not both")
    with outputs.working():
        if dst is None and (spec is not None or to is not None or quantization is not None):
            spec, inverse = _spec_to_convert(src, spec, to, inverse, quantization, route_options, revision, allow_pickle)
        with step_bar(err, "parity", enabled=not outputs.piped) as step:  # each side loaded, run (or each layer)
            result = run_parity(src, dst, spec=spec, inverse=inverse, torch_model=torch_model, revision=revision,
                                quantize=quantization, group_size=group_size, allow_pickle=allow_pickle, tokens=tokens,
                                batch=batch, seed=seed, dtype=dtype, tolerances=limits, stream=stream,
                                memory_budget=memory_budget, progress=step, **route_options)
        if not outputs.piped:
            render_rich(result, console)
    outputs.write(json=lambda: render_json(result), junit=lambda: render_junit(result), markdown=lambda: render_markdown(result))
    if dst is not None:
        _record_parity(dst, render_markdown(result))
    raise typer.Exit(0 if result.ok else 1)


def _record_parity(dst: str, markdown: str) -> None:
    """The result into DST's model card and manifest, and a line saying so (or why not)."""
    from remap.model_card import record_parity

    if recorded := record_parity(dst, markdown):
        err.print(escape(recorded), soft_wrap=True, highlight=False)


def _spec_to_convert(src: str, spec, to, inverse: bool, quantize, route_options: dict, revision: Optional[str],
                     allow_pickle: bool) -> tuple[Any, bool]:
    """The spec parity converts SRC with (no DST): --spec, or the route --to (or -q) picks; checked to fit."""
    from remap import api, route

    source = api.open_source(src, revision=revision, allow_pickle=allow_pickle)
    spec, inverse = route.resolve(source, spec, to, inverse, quantize, **route_options)
    route.check_spec(source, spec, inverse, **route_options)
    return spec, inverse


@app.command(cls=Command)
def specs(full: bool = typer.Option(False, "--full", help="Each spec's whole description.")) -> None:
    """List the bundled mapping specs: name, from -> to, what each does."""
    from remap.render.listing import render_specs
    from remap.spec.load import bundled_specs, load_spec

    render_specs([load_spec(path) for path in bundled_specs()], console, full=full)


def run() -> None:
    """Entry point: exit 0, 1 (a check failed) or 2 (bad input, one line: remap.cli_shell)."""
    run_guarded(app, err, lambda: _state["debug"])


if __name__ == "__main__":
    run()

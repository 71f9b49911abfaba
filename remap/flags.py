"""Command-line flags, checked before any work, as remap's users spell them (many come from
mlx_lm.convert): what quantization -q / --quantize / --q-bits / --q-group-size / --quant-predicate
ask for, a --dtype, a --max-shard-size, where --json / --markdown / --junit write (`-`: stdout).
Each error names the flag as typed. remap/cli.py declares the flags (typer); this holds what they
mean, without typer."""

from __future__ import annotations

import errno
import os
import sys
from contextlib import nullcontext, redirect_stdout
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from remap import dtypes
from remap.errors import RemapError
from remap.layouts.mlx import MIXED_RECIPES
from remap.quant_sizes import MLX_BITS, MLX_GROUP_SIZES


def listed(values) -> str:
    """'1, 2 or 3'"""
    values = [str(v) for v in values]
    return ", ".join(values[:-1]) + " or " + values[-1]


BITS, GROUPS, RECIPES = listed(MLX_BITS), listed(MLX_GROUP_SIZES), listed(MIXED_RECIPES)
MLX_LM_DEFAULT = (4, 64)  # mlx_lm.convert -q: affine, 4 bits, groups of 64
CASTS = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}  # --dtype: mlx_lm.convert's names


def quantization(q: bool, quantize: Optional[str], bits: Optional[int], group: Optional[int],
                 recipe: Optional[str]) -> tuple[int | str | None, int]:
    """What mlx_lm.convert's flags (-q, --q-bits, --q-group-size, --quant-predicate) and remap's
    --quantize [BITS|RECIPE] ask for, as (bits or recipe, group size); (None, 64) for nothing.
    Any of them quantizes: a flag that names bits is never silently ignored."""
    given: list[tuple[str, int | str]] = []
    if bits is not None:
        if bits not in MLX_BITS:
            raise RemapError(f"--q-bits {bits}", expected=f"bits mlx quantizes to: {BITS}")
        given.append(("--q-bits", bits))
    if recipe is not None:
        if recipe not in MIXED_RECIPES:
            raise RemapError(f"--quant-predicate {recipe!r}", expected=f"a mixed recipe: {RECIPES}")
        given.append(("--quant-predicate", recipe))
    if quantize:  # "": --quantize alone
        value = int(quantize) if quantize.isdigit() else quantize
        if value not in MLX_BITS and value not in MIXED_RECIPES:
            raise RemapError(f"--quantize {quantize!r}", expected=f"bits {BITS}, or a mixed recipe: {RECIPES}")
        given.append(("--quantize", value))
    if group is not None and group not in MLX_GROUP_SIZES:
        raise RemapError(f"--q-group-size {group}", expected=f"a group size mlx quantizes with: {GROUPS}")
    recipes = {v for _, v in given if isinstance(v, str)}
    if len(recipes) > 1 or len({MIXED_RECIPES[v][0] if isinstance(v, str) else v for _, v in given}) > 1:
        flags = " and ".join(f"{flag} {value}" for flag, value in given)
        raise RemapError(f"{flags} disagree", expected="one number of bits, or one recipe (alone, or with its own low bits)")
    if not (q or quantize is not None or given or group is not None):
        return None, MLX_LM_DEFAULT[1]
    return (recipes.pop() if recipes else given[0][1] if given else MLX_LM_DEFAULT[0]), group or MLX_LM_DEFAULT[1]


def pairs(values: Iterable[str], flag: str = "--param") -> dict[str, Any]:
    """KEY=VALUE pairs (--param, --set): numbers, true / false / null as such, anything else as text."""
    from remap.expr import evaluate

    found = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RemapError(f"{flag} {item!r}", expected="KEY=VALUE")
        found[key] = evaluate(value, {}) if value[:1].isdigit() or value in ("true", "false", "null") else value
    return found


def cast(flag: str, value: Optional[str]) -> Optional[str]:
    """A float dtype by mlx_lm.convert's name (bfloat16, float16, float32) or remap's (bf16, f16, f32)."""
    if value is None:
        return None
    name = dtypes.ALIASES.get(value.lower(), value.upper())
    if name not in CASTS:
        raise RemapError(f"{flag} {value!r}", expected="bfloat16, float16 or float32 (or bf16, f16, f32)")
    return CASTS[name]


def output(flag: str, value: Optional[str], reads: Iterable[Path] = ()) -> Optional[str]:
    """`-` (stdout), or a file to write once the work is done, checked now: a parity run of
    minutes should not end on a typo, nor overwrite the checkpoint it read (or `reads`)."""
    if value is None or value == "-":
        return value
    path = Path(value)
    if path.is_file() and any(read.is_file() and path.samefile(read) for read in reads):
        raise RemapError(f"{flag} {value}: is a file this command reads", expected="a new file, or - for stdout")
    if path.is_dir():
        raise RemapError(f"{flag} {value}: is a directory", expected="a file path, or - for stdout")
    if not path.parent.is_dir():
        raise RemapError(f"{flag} {value}: No such file or directory: {path.parent}",
                         expected="a file in an existing directory, or - for stdout")
    if path.exists() and (path.suffix in (".safetensors", ".pt", ".pth", ".bin") or _beside_weights(path)):
        raise RemapError(f"{flag} {value}: would overwrite a checkpoint file", expected="a new file, or - for stdout")
    return value


def _beside_weights(path: Path) -> bool:
    """A file in a checkpoint's folder (its config.json, tokenizer, index, manifest): remap reads
    those and never writes over them."""
    folder = path.parent
    return any(folder.glob("*.safetensors")) or any((folder / name).exists() for name in (
        "model.safetensors.index.json", "remap-manifest.json"))


class Outputs:
    """--json / --markdown / --junit, each a file or `-` for stdout. With `-`, stdout holds that
    and nothing else: the text for a reader is left out, and whatever else prints while the work
    runs (a library's print) goes to stderr."""

    def __init__(self, reads: Iterable[Path] = (), **paths: Optional[str]):
        reads = list(reads)
        self.paths = {f"--{flag}": output(f"--{flag}", value, reads) for flag, value in paths.items() if value is not None}
        piped = [flag for flag, value in self.paths.items() if value == "-"]
        if len(piped) > 1:
            raise RemapError(f"{' and '.join(piped)} both to stdout", expected="- for one of them at most")
        self.piped, self._stdout = bool(piped), sys.stdout

    def working(self):
        return redirect_stdout(sys.stderr) if self.piped else nullcontext()

    def write(self, **renders: Callable[[], str]) -> None:
        for flag, path in self.paths.items():
            text = renders[flag[2:]]()
            if path == "-":
                self._stdout.write(text)
                self._stdout.flush()
            else:
                write_output(flag, path, text)


def write_output(flag: str, path: str, text: str) -> None:
    """Write an output file, or into a pipe (`--json >(jq .)`): opened without blocking, so a FIFO
    nobody reads is an error line, not a hang."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK, 0o666)
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise
        raise RemapError(f"{flag} {path}: a pipe nobody reads", expected="a file, a pipe with a reader, or - for stdout") from None
    os.set_blocking(fd, True)
    with open(fd, "w", encoding="utf-8") as file:
        file.write(text)


def inputs(*given: object) -> list[Path]:
    """The files a command reads, from its arguments (a checkpoint folder's files, a file, a
    spec by name or path; None and hub ids give none): an output file must be none of them."""
    files: list[Path] = []
    for value in given:
        if value is None:
            continue
        path = Path(str(value))
        if path.is_dir():
            files += [p for p in path.iterdir() if p.is_file()]
        elif path.is_file():
            files.append(path)
        else:
            files += spec_file(str(value))
    return files


def shard_size_flag(value: str) -> None:
    """--max-shard-size checked before the source is even opened (a model-parallel target, which
    cuts no shards, would otherwise never read it)."""
    from remap.io.shards import shard_size  # huggingface_hub: only where the flag is checked

    try:
        shard_size(value)
    except RemapError as exc:
        raise RemapError(f"--max-shard-size {value!r}", expected=exc.expected) from None


def spec_file(name_or_path: str) -> list[Path]:
    """The file a spec argument names ([] when it names none: the loader says so)."""
    from remap.spec.load import resolve

    try:
        return [resolve(name_or_path)]
    except RemapError:
        return []


def layout(flag: str, value: Optional[str]) -> Optional[str]:
    """A layout remap knows (--to), checked before the source is opened."""
    from remap.layouts import LAYOUTS

    if value is not None and value not in LAYOUTS:
        raise RemapError(f"{flag} {value!r}", expected=f"a layout: {listed(LAYOUTS)}")
    return value

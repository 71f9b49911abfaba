"""How the `remap` command parses and fails, apart from what its commands do (remap/cli.py).

Options that may stand alone, flags without a value column in --help, values turned into their
types without pydantic where they plainly are, and the one boundary every error crosses: a
RemapError, an OSError on a path the user gave, or a usage error of click's becomes one `error:`
line on stderr and exit 2 (--debug: the traceback instead).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable, List

from typer._click import exceptions as click  # typer 0.29 parses with its own copy of click
from typer._coercion import build_runtime_param
from typer._param_types import coerce_cli_path
from typer.core import TyperCommand, TyperGroup
from typer.exceptions import Abort

from remap.errors import RemapError
from remap import heap
from remap.render import escape

# Options that may stand alone, as mlx_lm.convert's -q does and `inspect --json` always did; alone,
# each takes this value. (typer builds options through its own click, which has no flag_value.)
BARE = {"--json": "-", "--quantize": "", "-Q": ""}


def bare_values(args: List[str], options: set) -> List[str]:
    """`args` with the value a BARE option takes alone put in after it (the end, another option)."""
    out: List[str] = []
    for k, arg in enumerate(args):
        if arg == "--":
            return out + args[k:]
        out.append(arg)
        following = args[k + 1] if k + 1 < len(args) else None
        if arg in BARE and arg in options and (following is None or (following.startswith("-") and following != "-")):
            out.append(BARE[arg])
    return out


class _Flags:
    """--help shows `<bool>` after every flag in typer 0.29 (its type column): flags take no
    value, so they show none; and the BARE options may stand alone."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params

    def parse_args(self, ctx, args):
        params = self.get_params(ctx)
        for param in params:
            if getattr(param, "_runtime_param", False) is None and hasattr(param, "type_descriptor"):
                param._runtime_param = PlainValues(param.type_descriptor)  # typer builds its own when asked
        return super().parse_args(ctx, bare_values(list(args), {o for p in params for o in p.opts}))


_DIGITS = re.compile(r"0|[1-9][0-9]{0,17}")  # an int as pydantic reads it from text, beyond doubt


class PlainValues:
    """typer's coercion of one parameter, without pydantic for what the command line plainly gives:
    text for a str, a Path or a list of str, digits (or the default) for an int in its bounds, a
    bool. typer 0.29 builds a pydantic TypeAdapter per parameter, and importing pydantic alone
    costs ~60 ms of every command; any other value goes to typer's own coercion, so the results
    and the words of every error stay typer's."""

    def __init__(self, descriptor: Any):
        self._descriptor, self._typer = descriptor, None

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        if value is None and not (param.multiple or param.nargs == -1):
            return None
        kind, info = self._descriptor.annotation, self._descriptor.parameter_info
        if kind is str and type(value) is str or kind is bool and type(value) is bool:
            return value
        if kind == List[str] and type(value) in (list, tuple) and all(type(v) is str for v in value):
            return list(value)
        if kind is Path and type(value) is str and info.parser is None and info.path_type is None:
            return coerce_cli_path(Path(value), info, path_type=Path, param=param, ctx=ctx)
        if kind is int and not info.clamp and info.max is None:
            number = int(value) if type(value) is str and _DIGITS.fullmatch(value) else value
            if type(number) is int and (info.min is None or number >= info.min):
                return number
        if self._typer is None:
            self._typer = build_runtime_param(self._descriptor)
        return self._typer.coerce(value, param=param, ctx=ctx)


class Command(_Flags, TyperCommand):
    pass


class Group(_Flags, TyperGroup):
    pass


def usage_error(exc: click.ClickException) -> RemapError:
    """click's usage error (a boxed message of several lines) as one line saying where to look."""
    ctx = getattr(exc, "ctx", None)
    path = ctx.command_path if ctx is not None else "remap"
    if isinstance(exc, click.NoArgsIsHelpError):
        commands = getattr(ctx.command, "commands", {})
        print(exc.format_message())  # the help, on stdout as before; the reason on stderr
        return RemapError(f"{path}: no command given", expected=f"one of {', '.join(commands)}")
    return RemapError(f"{path}: {exc.format_message()}", expected=f"what `{path} --help` lists")


def run_guarded(app: Callable, err, debug: Callable[[], bool]) -> None:
    """Run the typer app; every error a user can cause is one line on stderr and exit 2. However
    it ends, the process ends next: what it made is kept from the collector, and what a command
    left to the exit is never freed (remap.heap)."""
    heap.ends_with_command = True
    try:
        _run(app, err, debug)
    except SystemExit as exc:
        heap.end_process(exc.code)
        raise
    finally:
        heap.freeze_for_exit()


def _run(app: Callable, err, debug: Callable[[], bool]) -> None:
    try:
        code = app(standalone_mode=False)  # click raises its usage errors here instead of boxing them
    except (RemapError, OSError, click.ClickException) as exc:
        if debug():
            raise
        if isinstance(exc, click.ClickException):
            exc = usage_error(exc)
        elif isinstance(exc, OSError):  # a path the user gave: missing folder, name too long, no permission
            exc = RemapError(exc.strerror or str(exc), file=str(exc.filename) if exc.filename else None)
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Abort:  # typer's, for an EOF at a prompt
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)

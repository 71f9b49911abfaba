"""How the `remap` command parses and fails, apart from what its commands do (remap/cli.py).

Options that may stand alone, flags without a value column in --help, and the one boundary every
error crosses: a RemapError, an OSError on a path the user gave, or a usage error of click's
becomes one `error:` line on stderr and exit 2 (--debug: the traceback instead).
"""

from __future__ import annotations

import sys
from typing import Callable, List

from typer._click import exceptions as click  # typer 0.29 parses with its own copy of click
from typer.core import TyperCommand, TyperGroup
from typer.exceptions import Abort

from remap.errors import RemapError
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
        return super().parse_args(ctx, bare_values(list(args), {o for p in self.get_params(ctx) for o in p.opts}))


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
    """Run the typer app; every error a user can cause is one line on stderr and exit 2."""
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

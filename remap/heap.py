"""Pausing Python's cycle collector while headers are read and plans are built, and keeping it
off what a command leaves behind when the process ends.

Planning the full DeepSeek-V3 makes ~1M small objects (tensor infos, bindings, steps) that all
live until the plan is done. Each time the young generation fills, the collector walks them,
and the full collections it then triggers walk everything again: ~30% of `remap report`'s time,
for no garbage (these objects hold no cycles). Paused for the call; collections resume after,
and anything cyclic made meanwhile is still collected then.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable)


def paused_gc(function: F) -> F:
    """`function` runs with the cycle collector paused (as it was again after, even if nested)."""

    @functools.wraps(function)
    def paused(*args, **kwargs):
        if not gc.isenabled():
            return function(*args, **kwargs)
        gc.disable()
        try:
            return function(*args, **kwargs)
        finally:
            if ends_with_command:
                # Every object made meanwhile waits in the young generation: the first allocation
                # after enable() would walk them all (~1M for DeepSeek-V3, ~40 ms). The process
                # ends with the command, so they are moved out of reach instead (in O(1)).
                gc.freeze()
            gc.enable()

    return paused  # type: ignore[return-value]


def freeze_for_exit() -> None:
    """Called as a command ends: every object is moved out of the collector's reach
    (gc.freeze), so the collections of interpreter shutdown walk none of them: ~40 ms after
    convert's last byte (numpy's, mlx's, typer's and rich's modules, the plan), to free memory
    the OS takes back anyway. Objects are still freed by their reference counts; only cycles
    among them stay, as garbage of an ending process."""
    gc.freeze()


# Set by the `remap` entry point: this process ends when the command does (False under a test
# runner calling the app in-process, which must neither keep what commands made nor exit).
ends_with_command = False
_left: list[Any] = []


def leave_to_exit(*objects: Any) -> None:
    """Called by a command that writes no files (report, inspect) once its output is written:
    `objects` (its checkpoint, plan, report) are never freed, and the process ends without the
    interpreter's teardown (end_process). Freeing DeepSeek-V3's ~1M small objects, one by one,
    cost ~0.2 s of report's ~2 s, for memory the OS takes back at once. (mypy ends the same way.)"""
    if ends_with_command:
        _left.extend(objects)


def end_process(code: Any) -> None:
    """Ends the process now with exit status `code` (as sys.exit reads it) when a command left
    its objects to the exit; else returns. stdout and stderr are flushed first; no atexit
    handler runs, which is why only commands that write no files may ask."""
    if not _left:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (| head), a closed stream
            pass
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)

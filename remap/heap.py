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
from typing import Callable, TypeVar

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
            gc.enable()

    return paused  # type: ignore[return-value]


def freeze_for_exit() -> None:
    """Called as a command ends: every object is moved out of the collector's reach
    (gc.freeze), so the collections of interpreter shutdown walk none of them: ~40 ms after
    convert's last byte (numpy's, mlx's, typer's and rich's modules, the plan), to free memory
    the OS takes back anyway. Objects are still freed by their reference counts; only cycles
    among them stay, as garbage of an ending process."""
    gc.freeze()

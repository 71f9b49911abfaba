"""Tensor names in natural order (layers.2 before layers.10), without the planner's imports:
`remap inspect` sorts by it and loads no planner. (remap/plan.py keeps its own copy until the
planner's branch lands; then it should import this one.)"""

from __future__ import annotations

import re

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """layers.2 sorts before layers.10."""
    parts: list = _DIGITS.split(name)  # text at even positions, digit runs at odd ones
    parts[1::2] = map(int, parts[1::2])
    return tuple(parts)

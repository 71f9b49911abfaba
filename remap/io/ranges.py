"""Bookkeeping of the byte ranges already written, so that each byte is written exactly once.

Shared by ShardWriter (the ranges of each tensor) and the following hash (the ranges of the
whole file, whose contiguous prefix it hashes).
"""

from __future__ import annotations

import bisect
from pathlib import Path

from remap.errors import RemapError


def claim_range(written: list[tuple[int, int]], lo: int, hi: int, path: Path, name: str) -> None:
    """Record bytes [lo, hi) of a tensor as written, in a sorted list of disjoint ranges that
    merges neighbours (so a tensor written in order stays one range); a range written twice is
    an error."""
    i = bisect.bisect_left(written, (lo,))
    if (i > 0 and written[i - 1][1] > lo) or (i < len(written) and written[i][0] < hi):
        raise RemapError(
            f"bytes [{lo}, {hi}) overlap bytes already written", file=str(path), tensor=name, expected="each byte once"
        )
    if i > 0 and written[i - 1][1] == lo:
        i -= 1
        lo = written.pop(i)[0]
    if i < len(written) and written[i][0] == hi:
        hi = written.pop(i)[1]
    written.insert(i, (lo, hi))

"""Reading a file at an offset into a buffer of the caller's: the one loop step behind loading a
tensor where no pages can be mapped, and hashing a file where it cannot be mapped."""

from __future__ import annotations

import os


def read_into(fd: int, view: memoryview, offset: int, end: int) -> int:
    """Read bytes of the file at `offset` into `view` (writable): how many, at least one. OSError
    where the file ends at `offset`, `end` (the offset the caller reads up to) expected. preadv
    reads in place and leaves the descriptor's position alone; where there is none (Windows), the
    position is moved and a read copied in, so there a descriptor must not be shared by threads."""
    if hasattr(os, "preadv"):
        n = os.preadv(fd, [view], offset)
    else:
        os.lseek(fd, offset, os.SEEK_SET)
        data = os.read(fd, len(view))
        view[: len(data)] = data
        n = len(data)
    if n == 0:
        raise OSError(f"file ended at {offset} bytes, {end} expected")
    return n

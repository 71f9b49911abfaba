"""A file's pages mapped copy-on-write, released with the last array that uses them.

Why not mmap.mmap(access=ACCESS_COPY): before Python 3.13 it keeps a duplicate of the file
descriptor open as long as the mapping lives, and a step stacking 384 experts holds 384 of them
(past a low `ulimit -n`). libc's mmap needs no open descriptor once the mapping is made.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref

from remap.io.libc import libc as _libc
from remap.io.positional import read_into


def private_pages(fd: int, offset: int, length: int) -> ctypes.Array | bytearray:
    """`length` bytes of the file at `offset` (a multiple of mmap.ALLOCATIONGRANULARITY) as a
    writable buffer: reads come from the page cache in place, a write copies its page. Unmapped
    when the buffer (and every numpy array made from it) is gone. Where there is no POSIX libc
    (Windows), the bytes are read into memory of the process's own instead."""
    try:
        libc = _libc()
    except (OSError, AttributeError):
        return _read(fd, offset, length)
    address = libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, offset)
    if address is None or address == ctypes.c_void_p(-1).value:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    if hasattr(mmap, "MADV_WILLNEED"):  # read ahead all of it at once, where it is not cached yet
        libc.madvise(address, length, mmap.MADV_WILLNEED)
    pages = (ctypes.c_char * length).from_address(address)
    weakref.finalize(pages, libc.munmap, address, length)
    return pages


def _read(fd: int, offset: int, length: int) -> bytearray:
    buffer = bytearray(length)
    view, done = memoryview(buffer), 0
    while done < length:
        done += read_into(fd, view[done:], offset + done, offset + length)
    return buffer

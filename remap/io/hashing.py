"""sha256 of output files, for the manifest and `remap verify`.

FollowingHash hashes a file while ShardWriter writes it, so a 1 TB conversion costs no second
pass over its output; sha256_file reads a finished file back from disk.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from remap.io.ranges import claim_range


class FollowingHash:
    """sha256 of a file being written in pieces, computed by a thread of its own that follows the
    bytes written contiguously from the start, reading them back (from the page cache) as that
    prefix grows. Its own thread, so the writers never wait for it: sha256 is serial per file,
    and two files being written are hashed side by side."""

    def __init__(self, path: Path, fd: int, size: int, header: int):
        self._path, self._fd, self._size = path, fd, size
        self._filled: list[tuple[int, int]] = [(0, header)]  # absolute ranges, merged
        self._changed = threading.Condition()
        self._stopped = False
        self._error: Exception | None = None
        self._digest = hashlib.sha256()
        self._thread = threading.Thread(target=self._follow, name="remap-sha256", daemon=True)
        self._thread.start()

    def written(self, start: int, nbytes: int) -> None:
        with self._changed:
            claim_range(self._filled, start, start + nbytes, self._path, "(the file)")
            self._changed.notify()

    def finish(self) -> str:
        """The digest, once every byte is written."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify()
        self._thread.join()

    def _follow(self) -> None:
        buffer = memoryview(bytearray(1 << 22))
        hashed = 0
        try:
            while hashed < self._size:
                with self._changed:
                    while self._filled[0][1] <= hashed and not self._stopped:
                        self._changed.wait()
                    if self._stopped:
                        return
                    end = self._filled[0][1]
                while hashed < end and not self._stopped:  # (stop() waits for this loop)
                    n = os.preadv(self._fd, [buffer[: min(end - hashed, len(buffer))]], hashed)
                    if n == 0:
                        raise OSError(f"file ended at {hashed} bytes, {self._size} expected")
                    self._digest.update(buffer[:n])
                    hashed += n
        except Exception as exc:  # finish() raises it: a digest of part of the file must never pass
            self._error = exc


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (files here can be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()

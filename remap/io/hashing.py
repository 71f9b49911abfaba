"""Digests of output files, for the manifest and `remap verify`.

Three algorithms, named in the manifest (`digest`):
- `blake3` (the default): BLAKE3 of the whole file, as `b3sum FILE` prints it. One thread per
  file follows its bytes as they are written (the writer tells it every 8 MB), reading them in
  place from the page cache through a mapped window, each piece hashed on every core (BLAKE3's
  own threads, as b3sum hashes; the digest is the same however many). BLAKE3 runs at ~4-6 GB/s
  on one core here (sha256 at ~1.7): about the speed of a copy within the page cache, so one
  core of it can fall behind the copy (it did, in slow spells of this shared host), and a disk
  faster than one core would wait for it. Where one core keeps up it costs a little: 1.6 GB
  hf -> mlx took 0.806 s against 0.777 (bench/ab.py, 15 runs by turns, a fast spell). It takes a
  quarter of sha256's CPU away from the copy. (A mapped page that cannot be read, an I/O
  error on a page evicted and read again, stops the process with SIGBUS rather than an error:
  the page was written moments before, and the file stays `.incomplete` for --resume.)
- `sha256-tree-64MiB`: the sha256 of the concatenated sha256 digests of the file's 64 MiB chunks,
  in order, chunks hashed on every core as each is written; what manifests of remap 0.1 before
  BLAKE3 hold. By hand: `split -b 64M FILE c. && cat c.* | ...` (each chunk's binary sha256,
  concatenated, then sha256sum).
- `sha256`: plain sha256 of the whole file (what the hub shows as a file's LFS id; `--sha256`),
  serial per file; what manifests written before the tree hash hold.

TreeHash and FollowingHash hash a file while ShardWriter writes it (no second pass over a 1 TB
output); file_digest reads a finished file back from disk. `remap verify` checks a manifest by
the algorithm it names, old ones included.
"""

from __future__ import annotations

import bisect
import hashlib
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from remap.io.positional import read_into
from remap.io.ranges import claim_range

BLAKE3 = "blake3"
TREE = "sha256-tree-64MiB"
SHA256 = "sha256"
ALGORITHMS = (BLAKE3, TREE, SHA256)
_FOLLOWING = {SHA256: hashlib.sha256, BLAKE3: lambda: _blake3()(max_threads=_blake3().AUTO)}  # whole-file digests, in order
CHUNK = 64 << 20
_READ = 1 << 22  # read-back buffer: 4 MB per hashing thread, whatever the chunk size
_WINDOW = 16 << 20  # how much of a file a following hash maps at once (a multiple of the page size)

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_buffers = threading.local()


def _hash_pool() -> ThreadPoolExecutor:
    """One pool of a thread per core for every file being hashed: hashlib releases the GIL on
    large inputs, so the chunks of all open files share the cores."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="remap-hash")
        return _pool


def _chunk_digest(fd: int, start: int, end: int) -> bytes:
    """sha256 of bytes [start, end) of an open file, read in 4 MB pieces (memory stays flat)."""
    buffer = getattr(_buffers, "buffer", None)
    if buffer is None:
        buffer = _buffers.buffer = memoryview(bytearray(_READ))
    digest = hashlib.sha256()
    while start < end:
        n = read_into(fd, buffer[: min(end - start, _READ)], start, end)
        digest.update(buffer[:n])
        start += n
    return digest.digest()


def _root(leaves: list[bytes]) -> str:
    return hashlib.sha256(b"".join(leaves)).hexdigest()


class TreeHash:
    """The sha256-tree-64MiB digest of a file being written in pieces, in any order: each chunk
    is hashed (read back from the page cache) on the shared pool as soon as all its bytes are
    written."""

    def __init__(self, path: Path, fd: int, size: int, header: int):
        self._path, self._fd, self._size = path, fd, size
        self._filled: list[tuple[int, int]] = [(0, header)] if header else []
        self._lock = threading.Lock()
        self._chunks: dict[int, Future] = {}
        self._stopped = False
        self.written(0, 0)  # chunks the header alone fills

    def written(self, start: int, nbytes: int) -> None:
        with self._lock:
            if nbytes:
                claim_range(self._filled, start, start + nbytes, self._path, "(the file)")
            if self._stopped:
                return
            last = max(start + nbytes - 1, start) // CHUNK
            for k in range(start // CHUNK, last + 1):
                lo, hi = k * CHUNK, min((k + 1) * CHUNK, self._size)
                if k not in self._chunks and lo < hi and self._covers(lo, hi):
                    self._chunks[k] = _hash_pool().submit(_chunk_digest, self._fd, lo, hi)

    def _covers(self, lo: int, hi: int) -> bool:
        i = bisect.bisect_right(self._filled, (lo, float("inf"))) - 1
        return i >= 0 and self._filled[i][0] <= lo and self._filled[i][1] >= hi

    def finish(self) -> str:
        """The digest, once every byte is written (raises what a chunk's read-back raised: a
        digest of part of the file must never pass)."""
        count = -(-self._size // CHUNK)
        missing = [k for k in range(count) if k not in self._chunks]
        if missing:
            raise OSError(f"chunk {missing[0]} of {self._path} was never fully written")
        return _root([self._chunks[k].result() for k in range(count)])

    def stop(self) -> None:
        """Abandon: no new chunk starts, and none still reads the file when this returns (its
        descriptor is closed next)."""
        with self._lock:
            self._stopped = True
            chunks = list(self._chunks.values())
        for future in chunks:
            future.cancel()
        for future in chunks:
            if not future.cancelled():
                future.exception()


class FollowingHash:
    """A whole-file digest (sha256, BLAKE3) of a file being written in pieces, computed by a thread
    of its own that follows the bytes written contiguously from the start, reading them back (from
    the page cache) as that prefix grows. Its own thread, so the writers never wait for it: the
    digest is serial per file, and two files being written are hashed side by side."""

    def __init__(self, path: Path, fd: int, size: int, header: int, algorithm: str = SHA256):
        self._path, self._fd, self._size = path, fd, size
        self._filled: list[tuple[int, int]] = [(0, header)]  # absolute ranges, merged
        self._changed = threading.Condition()
        self._stopped = False
        self._error: Exception | None = None
        self._digest = _FOLLOWING[algorithm]()
        self._thread = threading.Thread(target=self._follow, name=f"remap-{algorithm}", daemon=True)
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
        reader = _MappedReader(self._fd, self._size)
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
                    hashed += reader.update(self._digest, hashed, end)
        except Exception as exc:  # finish() raises it: a digest of part of the file must never pass
            self._error = exc
        finally:
            reader.close()


class _MappedReader:
    """Feeds a digest bytes of an open file straight from the page cache, through a mapped window
    of it: reading into a buffer first (pread) copied every byte once more, ~0.15 s of CPU per
    1.5 GB (about 40% of BLAKE3's own), on cores the copy needs. One window at a time, unmapped as
    the next is mapped: mapped pages count as resident, and a whole 5 GB file mapped would show so.
    Where the file cannot be mapped, reads into a buffer instead."""

    def __init__(self, fd: int, size: int):
        self._fd, self._size = fd, size
        self._map: mmap.mmap | None = None
        self._lo = self._hi = 0
        self._buffer: memoryview | None = None  # set once mapping failed

    def update(self, digest, start: int, end: int) -> int:
        """Hash bytes from `start` towards `end` (at least one); how many were hashed."""
        if self._buffer is None and not self._lo <= start < self._hi:
            self._remap(start)
        if self._buffer is not None:
            n = read_into(self._fd, self._buffer[: min(end - start, len(self._buffer))], start, self._size)
            digest.update(self._buffer[:n])
            return n
        stop = min(end, self._hi)
        with memoryview(self._map) as whole, whole[start - self._lo: stop - self._lo] as part:
            digest.update(part)
        return stop - start

    def _remap(self, start: int) -> None:
        self.close()
        lo = start - start % mmap.ALLOCATIONGRANULARITY
        hi = min(lo + _WINDOW, self._size)
        try:
            self._map = mmap.mmap(self._fd, hi - lo, offset=lo, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # a file system without mmap
            self._buffer = memoryview(bytearray(_READ))
            return
        self._lo, self._hi = lo, hi

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
            self._lo = self._hi = 0


def following_hash(algorithm: str, path: Path, fd: int, size: int, header: int) -> TreeHash | FollowingHash:
    """The hash that follows a file's writing, for `algorithm` (one of ALGORITHMS)."""
    if algorithm == TREE:
        return TreeHash(path, fd, size, header)
    return FollowingHash(path, fd, size, header, algorithm)


def sha256_file(path: str | os.PathLike, chunk_size: int = _READ) -> str:
    """Hex sha256 of a file, read in chunks (files here can be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def tree_file(path: str | os.PathLike) -> str:
    """The sha256-tree-64MiB digest of a finished file, its chunks hashed on every core."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pool = _hash_pool()
        chunks = [pool.submit(_chunk_digest, fd, lo, min(lo + CHUNK, size)) for lo in range(0, size, CHUNK)]
        try:
            return _root([chunk.result() for chunk in chunks])
        finally:
            for chunk in chunks:  # none may read the descriptor once it is closed
                chunk.cancel()
            for chunk in chunks:
                if not chunk.cancelled():
                    chunk.exception()
    finally:
        os.close(fd)


def blake3_file(path: str | os.PathLike) -> str:
    """BLAKE3 of a finished file (as `b3sum` prints it), mapped and hashed on every core."""
    blake3 = _blake3()
    if not os.path.getsize(path):  # nothing to map
        return blake3().hexdigest()
    return blake3(max_threads=blake3.AUTO).update_mmap(os.fspath(path)).hexdigest()


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    """A finished file's digest by `algorithm` (one of ALGORITHMS)."""
    return {TREE: tree_file, BLAKE3: blake3_file, SHA256: sha256_file}[algorithm](path)


def _blake3():
    from blake3 import blake3  # here: only a command that writes or checks digests needs it

    return blake3

"""Writing one safetensors file: streamed, in pieces, under its name only once complete.

Why not safetensors' save_file: it needs every tensor of a file in memory at once. One stacked
expert tensor of the full DeepSeek-V3 is 7.5 GB and a bf16 conversion is 1.3 TB, more than any
machine's RAM. So ShardWriter writes the header first, sizes the file, and then takes each
tensor, or any piece of one (one expert of a stacked tensor), at its byte offset. For the same
tensors the files are byte-identical to safetensors' own.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from remap.errors import RemapError
from remap.io.atomic import INCOMPLETE_SUFFIX, disk_errors
from remap.io.hashing import SHA256, following_hash
from remap.io.libc import reserve
from remap.io.mlx_safetensors import header as mlx_header
from remap.io.ranges import claim_range
from remap.io.shards import EntryLike, TensorEntry, checked_entry, file_order
from remap.dtypes import DTYPES

if TYPE_CHECKING:  # arrays come from code that imported numpy; a conversion of byte moves never does
    import numpy as np

_STEP = 8 << 20  # bytes written (or copied) between two reports to the following hash


def _layout(
    entries: Iterable[TensorEntry], metadata: dict[str, str] | None, style: str = "safetensors"
) -> tuple[bytes, dict[str, tuple[int, int]], int]:
    """The file's header (length prefix included), each tensor's absolute byte span, and the
    file size.

    As the safetensors crate lays a file out (`prepare`): tensors by descending dtype alignment,
    then by name, so each starts aligned to its element size; compact JSON, `__metadata__`
    first; padded with spaces to a multiple of 8 bytes. (Metadata keys keep the given order; the
    crate's HashMap writes several keys in an arbitrary order, so identity holds for up to one.)
    """
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise RemapError(f"metadata {metadata!r} is not a map of strings", expected='{"format": "pt"}')
    if style == "mlx":  # as mx.save_safetensors: bytes in the given order (remap/io/mlx_safetensors.py)
        return mlx_header(entries, metadata)
    entries = file_order(entries)
    spans: dict[str, tuple[int, int]] = {}
    offset = 0
    for entry in entries:
        if entry.name in spans or entry.name == "__metadata__":
            raise RemapError("a file cannot hold two tensors of this name", tensor=entry.name)
        spans[entry.name] = (offset, offset + entry.nbytes)
        offset += entry.nbytes

    header: dict[str, object] = {} if metadata is None else {"__metadata__": metadata}
    for entry in entries:
        begin, end = spans[entry.name]
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [begin, end]}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    prefix = len(text).to_bytes(8, "little") + text
    absolute = {name: (len(prefix) + begin, len(prefix) + end) for name, (begin, end) in spans.items()}
    return prefix, absolute, len(prefix) + offset


class ShardWriter:
    """Writes one safetensors file in pieces, in any order, each at its byte offset.

    The file is written as `<name>.incomplete` and takes its name in close() only once every
    byte of every tensor was written exactly once: a file under its final name is complete,
    which is what resuming an interrupted conversion relies on.

    With `checksum` (True: sha256; or an algorithm of remap.io.hashing), the file's digest
    (`.digest` after close, by the algorithm asked for) is computed while it is written: bytes are
    hashed in place in the page cache as they land (told every `_STEP` bytes), so the file costs no
    extra pass at the end.
    Safe to call from several threads at once. `style` "mlx" lays the file out as mx.save_safetensors
    does (entries' bytes in the given order).

        with ShardWriter(out / plan.file, plan.entries, {"format": "pt"}) as shard:
            for e, expert in enumerate(experts):
                shard.write("mlp.switch_mlp.up_proj.weight", expert, offset=e * expert.nbytes)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        entries: Iterable[EntryLike],
        metadata: dict[str, str] | None = None,
        *,
        sync: bool = False,
        checksum: bool | str = False,
        style: str = "safetensors",
    ):
        self.path = Path(path)
        self.sync = sync  # fsync before naming the file: survives power loss, not only a crash
        entries = [checked_entry(entry) for entry in entries]
        self._dtypes = {entry.name: entry.dtype for entry in entries}
        header, self._spans, file_size = _layout(entries, metadata, style)
        self._written: dict[str, list[tuple[int, int]]] = {name: [] for name in self._spans}
        self._lock = threading.Lock()  # guards the written ranges
        self._hash = None
        self.digest: str | None = None
        self._incomplete = self.path.with_name(self.path.name + INCOMPLETE_SUFFIX)
        self._fd: int | None = None
        try:
            with disk_errors(self.path):
                self._fd = os.open(self._incomplete, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                _pwrite_all(self._fd, memoryview(header), 0)
                # final size from the start, so pieces can land at any offset: reserved on disk
                # where the file system can (a full disk fails here), else sparse until written
                os.ftruncate(self._fd, file_size)
                reserve(self._fd, file_size)
                if checksum:
                    algorithm = SHA256 if checksum is True else checksum
                    self._hash = following_hash(algorithm, self.path, self._fd, file_size, len(header))
        except BaseException:
            self._abandon()
            raise

    def write(self, name: str, data: np.ndarray | bytes | bytearray | memoryview, offset: int = 0) -> None:
        """Write `data` at byte `offset` within tensor `name`. An array must have the tensor's
        dtype; bytes are taken as they are."""
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        if name not in self._spans:
            raise RemapError("not a tensor of this file", file=str(self.path), tensor=name)
        piece = _as_bytes(data, self._dtypes[name], name)
        begin, end = self._spans[name]
        if offset < 0 or offset + piece.nbytes > end - begin:
            raise RemapError(
                f"a piece of {piece.nbytes} bytes at offset {offset} does not fit",
                file=str(self.path),
                tensor=name,
                expected=f"pieces within the tensor's {end - begin} bytes",
            )
        if piece.nbytes:
            self._claim(name, offset, offset + piece.nbytes)
            with disk_errors(self.path, name):
                for done in range(0, piece.nbytes, _STEP):  # in steps, as copy_from
                    _pwrite_all(self._fd, piece[done: done + _STEP], begin + offset + done)
                    self._written_at(begin + offset + done, min(_STEP, piece.nbytes - done))

    def copy_from(self, name: str, source: str | os.PathLike, start: int, nbytes: int, offset: int = 0) -> None:
        """Copy `nbytes` at `start` of file `source` into tensor `name` at `offset`, inside the
        kernel (copy_file_range): a tensor that only changes name never passes through our
        memory, so moving 1 TB costs no resident memory at all."""
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        if name not in self._spans:
            raise RemapError("not a tensor of this file", file=str(self.path), tensor=name)
        begin, end = self._spans[name]
        if offset < 0 or offset + nbytes > end - begin:
            raise RemapError(f"a piece of {nbytes} bytes at offset {offset} does not fit", file=str(self.path), tensor=name)
        if not nbytes:
            return
        self._claim(name, offset, offset + nbytes)
        with disk_errors(self.path, name), open(source, "rb", buffering=0) as f:
            # in steps, each told to the following hash as it lands: it hashes a tensor's first
            # bytes while the rest is copied, and is done soon after the file's last byte, instead
            # of starting on a 400 MB embedding only once all of it is copied
            for done in range(0, nbytes, _STEP):
                n = min(_STEP, nbytes - done)
                _copy_range(f.fileno(), start + done, self._fd, begin + offset + done, n, where=(str(source), name))
                self._written_at(begin + offset + done, n)

    def _claim(self, name: str, lo: int, hi: int) -> None:
        with self._lock:
            claim_range(self._written[name], lo, hi, self.path, name)

    def _written_at(self, start: int, nbytes: int) -> None:
        if self._hash is not None:
            self._hash.written(start, nbytes)

    def close(self) -> None:
        """Check that every byte was written, flush to disk, and give the file its name."""
        if self._fd is None:
            return
        missing = [
            (name, end - begin - sum(hi - lo for lo, hi in self._written[name]))
            for name, (begin, end) in self._spans.items()
            if self._written[name] != [(0, end - begin)] and end > begin
        ]
        if missing:
            self._abandon()
            listed = ", ".join(f"'{name}' ({left} bytes)" for name, left in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise RemapError(
                f"{len(missing)} tensors not fully written: {listed}{more}",
                file=str(self.path),
                expected="every byte of every tensor written before close",
            )
        try:
            with disk_errors(self.path):
                if self._hash is not None:
                    self.digest = self._hash.finish()
                if self.sync:
                    os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
                os.replace(self._incomplete, self.path)
        except BaseException:
            self._abandon()
            raise

    def _abandon(self) -> None:
        if self._hash is not None:
            self._hash.stop()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._incomplete.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abandon()


def shard_is_complete(
    path: str | os.PathLike, entries: Iterable[EntryLike], metadata: dict[str, str] | None = None,
    style: str = "safetensors",
) -> bool:
    """Whether `path` is the finished file ShardWriter makes for these entries (same header and
    size), so a resumed run can skip it. Only ShardWriter.close() names a file, after checking
    every byte was written; the data itself is not re-read."""
    header, _, file_size = _layout([checked_entry(entry) for entry in entries], metadata, style)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(len(header))
    except FileNotFoundError:
        return False
    return head == header and size == file_size


def _as_bytes(data: np.ndarray | bytes | bytearray | memoryview, dtype: str, name: str) -> memoryview:
    np = sys.modules.get("numpy")  # not imported: `data` cannot be an array
    if np is not None and isinstance(data, np.ndarray):
        expected = DTYPES[dtype].numpy
        if expected is None or data.dtype != expected:  # (a dtype compares equal to None as float64)
            raise RemapError(
                f"piece is {data.dtype}, the tensor is {dtype}", tensor=name, expected=f"a {expected} array or bytes"
            )
        return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    return memoryview(data).cast("B")


def _copy_range(src: int, src_offset: int, dst: int, dst_offset: int, nbytes: int, where: tuple[str, str]) -> None:
    """copy_file_range where the kernel and filesystem allow it, else pread/pwrite in 64 MiB chunks."""
    while nbytes:
        try:
            n = os.copy_file_range(src, dst, nbytes, src_offset, dst_offset)
        except (AttributeError, OSError):
            n = 0
        if n == 0:  # unsupported here (or across filesystems on old kernels): copy through a buffer
            chunk = os.pread(src, min(nbytes, 64 << 20), src_offset)
            if not chunk:
                raise RemapError("source file ended early (changed since it was planned?)", file=where[0], tensor=where[1],
                                 expected=f"{nbytes} more bytes at offset {src_offset}")
            _pwrite_all(dst, memoryview(chunk), dst_offset)
            n = len(chunk)
        src_offset, dst_offset, nbytes = src_offset + n, dst_offset + n, nbytes - n


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    # pwrite may write less than asked (Linux caps one call near 2 GiB)
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written

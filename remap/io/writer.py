"""Writing safetensors outputs: streamed, sharded, into a directory that appears only when done.

Why not safetensors' save_file: it needs every tensor of a file in memory at once. One stacked
expert tensor of the full DeepSeek-V3 is 7.5 GB and a bf16 conversion is 1.3 TB, more than any
machine's RAM. So ShardWriter writes the header first, sizes the file, and then takes each
tensor, or any piece of one (one expert of a stacked tensor), at its byte offset. For the same
tensors the files are byte-identical to safetensors' own.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
from huggingface_hub.serialization import split_state_dict_into_shards_factory

from remap.errors import RemapError
from remap.io.checkpoint import INDEX_NAME
from remap.dtypes import DTYPES, byte_size

INCOMPLETE_SUFFIX = ".incomplete"
PARTIAL_SUFFIX = ".partial"
_ALIGNMENT_RANK = {name: rank for rank, name in enumerate(DTYPES)}


# (name, safetensors dtype, shape): what TensorEntry holds, or any tuple of the same
EntryLike = tuple[str, str, tuple[int, ...]]


class TensorEntry(NamedTuple):
    """One tensor a file will hold."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return byte_size(self.dtype, self.shape)


@dataclass(frozen=True)
class ShardPlan:
    """One output file and the tensors it holds. Build these directly for names plan_shards
    does not make (DeepSeek's `model{r}-mp{N}.safetensors`)."""

    file: str
    entries: tuple[TensorEntry, ...]

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries)


def plan_shards(entries: Iterable[EntryLike], max_shard_size: int | str = "5GB") -> list[ShardPlan]:
    """Split tensors into files as transformers' save_pretrained does, with huggingface_hub's own
    splitter: shards filled in the given order; a tensor bigger than `max_shard_size` gets a shard
    of its own, placed before the one being filled. One file is `model.safetensors`, several are
    `model-00001-of-0000N.safetensors`."""
    by_name: dict[str, TensorEntry] = {}
    for entry in map(_entry, entries):
        if entry.name in by_name:
            raise RemapError("two output tensors have this name", tensor=entry.name)
        by_name[entry.name] = entry
    try:
        split = split_state_dict_into_shards_factory(
            by_name,
            get_storage_size=lambda entry: entry.nbytes,
            filename_pattern="model{suffix}.safetensors",
            max_shard_size=max_shard_size,
        )
    except ValueError as e:
        raise RemapError(f"bad shard size {max_shard_size!r}: {e}", expected="bytes, or a size like '5GB'") from e
    return [
        ShardPlan(file, tuple(by_name[name] for name in names)) for file, names in split.filename_to_tensors.items()
    ]


def _entry(entry: EntryLike) -> TensorEntry:
    name, dtype, shape = entry
    shape = tuple(int(size) for size in shape)
    if dtype not in DTYPES or min(shape, default=0) < 0:
        raise RemapError(
            f"no tensor has dtype {dtype!r} and shape {list(shape)}",
            tensor=name,
            expected="a safetensors dtype (" + ", ".join(DTYPES) + ") and non-negative sizes",
        )
    return TensorEntry(name, dtype, shape)


def file_order(entries: Iterable[TensorEntry]) -> list[TensorEntry]:
    """The order tensors take in a safetensors file: by descending dtype alignment, then name."""
    return sorted(entries, key=lambda entry: (-_ALIGNMENT_RANK[entry.dtype], entry.name))


def _layout(
    entries: Iterable[TensorEntry], metadata: dict[str, str] | None
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

    With `checksum`, the file's sha256 (`.sha256` after close) is computed while it is written:
    whenever the bytes written from the start of the file grow, the new ones are read back (from
    the page cache) and hashed, so a file written roughly in order costs no extra pass at the end.
    Safe to call from several threads at once.

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
        checksum: bool = False,
    ):
        self.path = Path(path)
        self.sync = sync  # fsync before naming the file: survives power loss, not only a crash
        entries = [_entry(entry) for entry in entries]
        self._dtypes = {entry.name: entry.dtype for entry in entries}
        header, self._spans, file_size = _layout(entries, metadata)
        self._written: dict[str, list[tuple[int, int]]] = {name: [] for name in self._spans}
        self._lock = threading.Lock()  # guards the written ranges
        self._hash: _FollowingHash | None = None
        self.sha256: str | None = None
        self._incomplete = self.path.with_name(self.path.name + INCOMPLETE_SUFFIX)
        self._fd: int | None = None
        try:
            with disk_errors(self.path):
                self._fd = os.open(self._incomplete, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                _pwrite_all(self._fd, memoryview(header), 0)
                # final size from the start (sparse until written), so pieces can land at any offset
                os.ftruncate(self._fd, file_size)
                if checksum:
                    self._hash = _FollowingHash(self.path, self._fd, file_size, len(header))
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
                _pwrite_all(self._fd, piece, begin + offset)
            self._written_at(begin + offset, piece.nbytes)

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
            _copy_range(f.fileno(), start, self._fd, begin + offset, nbytes, where=(str(source), name))
        self._written_at(begin + offset, nbytes)

    def _claim(self, name: str, lo: int, hi: int) -> None:
        with self._lock:
            _claim(self._written[name], lo, hi, self.path, name)

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
                    self.sha256 = self._hash.finish()
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


class _FollowingHash:
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
            _claim(self._filled, start, start + nbytes, self._path, "(the file)")
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


def shard_is_complete(
    path: str | os.PathLike, entries: Iterable[EntryLike], metadata: dict[str, str] | None = None
) -> bool:
    """Whether `path` is the finished file ShardWriter makes for these entries (same header and
    size), so a resumed run can skip it. Only ShardWriter.close() names a file, after checking
    every byte was written; the data itself is not re-read."""
    header, _, file_size = _layout([_entry(entry) for entry in entries], metadata)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(len(header))
    except FileNotFoundError:
        return False
    return head == header and size == file_size


def write_index(
    directory: str | os.PathLike, shards: Iterable[ShardPlan], metadata: dict[str, object] | None = None
) -> Path:
    """model.safetensors.index.json as transformers writes it (sorted keys, indent 2); extra
    `metadata` (e.g. total_parameters) goes beside total_size."""
    shards = list(shards)
    index = {
        "metadata": {"total_size": sum(shard.nbytes for shard in shards), **(metadata or {})},
        "weight_map": {entry.name: shard.file for shard in shards for entry in shard.entries},
    }
    path = Path(directory) / INDEX_NAME
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


@contextmanager
def atomic_output(
    dst: str | os.PathLike, *, force: bool = False, resume: bool = False, sync: bool = False
) -> Iterator[Path]:
    """A directory to build an output in, which becomes `dst` only if the block succeeds.

    Work goes into the sibling `<dst>.partial/`. On success it is renamed to `dst` (with `sync`,
    after every file and directory is fsynced: rename alone is atomic for a crash or a kill of
    this process, the fsyncs make it so for a power loss too, at the cost of waiting for the
    disk); an existing `dst` is an error unless `force`, and is replaced only then.
    On any failure, Ctrl-C included, `dst` is untouched and `.partial` stays with the shards
    already finished (only complete files carry their final names), because a 1 TB conversion
    interrupted at 90% should continue, not restart: `resume=True` reuses it. Without `resume`
    a leftover `.partial` is an error, or discarded with `force`.
    """
    dst = Path(os.path.abspath(dst))
    partial = dst.with_name(dst.name + PARTIAL_SUFFIX)
    if dst.exists() and not force:
        raise RemapError("output already exists", file=str(dst), expected="a new path, or --force to replace it")
    if partial.exists() and not resume:
        if not force:
            raise RemapError(
                "a previous run left partial output here",
                file=str(partial),
                expected="--resume to continue it, or --force to start over",
            )
        _remove(partial)
    with disk_errors(partial):
        partial.mkdir(parents=True, exist_ok=True)

    yield partial

    if sync:
        _fsync_tree(partial)
    if dst.exists():
        replaced = dst.with_name(dst.name + ".replaced")
        _remove(replaced)
        dst.rename(replaced)
        partial.rename(dst)
        _remove(replaced)
    else:
        partial.rename(dst)
    if sync:
        _fsync(dst.parent)


@contextmanager
def disk_errors(path: str | os.PathLike, tensor: str | None = None) -> Iterator[None]:
    """An OSError (disk full, read-only or missing directory, I/O error) as a RemapError naming
    the file: a 1 TB conversion that runs out of space stops with one line, and the files it
    finished stay in DST.partial for --resume."""
    try:
        yield
    except OSError as exc:
        raise RemapError(
            exc.strerror or str(exc),
            file=str(exc.filename or path),
            tensor=tensor,
            expected="a writable destination with free space; finished files stay in DST.partial for --resume",
        ) from exc


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (files here can be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _as_bytes(data: np.ndarray | bytes | bytearray | memoryview, dtype: str, name: str) -> memoryview:
    if isinstance(data, np.ndarray):
        expected = DTYPES[dtype].numpy
        if expected is None or data.dtype != expected:  # (a dtype compares equal to None as float64)
            raise RemapError(
                f"piece is {data.dtype}, the tensor is {dtype}", tensor=name, expected=f"a {expected} array or bytes"
            )
        return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    return memoryview(data).cast("B")


def _claim(written: list[tuple[int, int]], lo: int, hi: int, path: Path, name: str) -> None:
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync(Path(directory) / name)
        _fsync(Path(directory))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()

"""The output directory, which appears under its name only once the whole conversion is done.

remap never writes into, replaces or deletes what it did not make: an output must not overlap its
source (the same path, one inside the other, through symlinks too); `--force` replaces only an
empty directory or one the caller recognises as its own output (`ours`), and `--resume` continues
only a real directory of its own. Also turns disk failures (full, read-only, I/O error) into
one-line errors that name the file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from remap.errors import RemapError

PARTIAL_SUFFIX = ".partial"
INCOMPLETE_SUFFIX = ".incomplete"  # a file being written (remap.io.writer), renamed once whole


def refuse_overlap(dst: str | os.PathLike, sources: Iterable[str | os.PathLike]) -> None:
    """An error where the output (or its .partial) and a source are the same path or one holds the
    other, symlinks resolved: writing there could overwrite, and --force delete, the source."""
    outputs = [Path(os.path.realpath(dst)), Path(os.path.realpath(f"{os.fspath(dst)}{PARTIAL_SUFFIX}"))]
    for source in sources:
        src = Path(os.path.realpath(source))
        for out in outputs:
            if out == src or src in out.parents or (out in src.parents):
                where = "is the source" if out == src else "is inside the source" if src in out.parents else "holds the source"
                raise RemapError(f"the output {where} ({src})", file=str(dst),
                                 expected="an output path apart from the checkpoint it is converted from")


def _empty(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


@contextmanager
def atomic_output(
    dst: str | os.PathLike, *, force: bool = False, resume: bool = False, sync: bool = False,
    ours: Callable[[Path], bool] = _empty,
) -> Iterator[Path]:
    """A directory to build an output in, which becomes `dst` only if the block succeeds.

    Work goes into the sibling `<dst>.partial/`. On success it is renamed to `dst` (with `sync`,
    after every file and directory is fsynced: rename alone is atomic for a crash or a kill of
    this process, the fsyncs make it so for a power loss too, at the cost of waiting for the
    disk); an existing `dst` is an error unless `force`, and is replaced only then, and only when
    `ours(dst)` (default: an empty directory). On any failure, Ctrl-C included, `dst` is untouched
    and `.partial` stays with the shards already finished (only complete files carry their final
    names), because a 1 TB conversion interrupted at 90% should continue, not restart:
    `resume=True` reuses it. Without `resume` a leftover `.partial` is an error, or discarded with
    `force` when `ours(partial)`.
    """
    dst = Path(os.path.abspath(dst))
    partial = dst.with_name(dst.name + PARTIAL_SUFFIX)
    _check_existing(dst, partial, force, resume, ours)
    if partial.exists() and not resume:
        _remove(partial)  # force, and ours: checked above
    with disk_errors(partial):
        partial.mkdir(parents=True, exist_ok=True)

    yield partial

    if sync:
        _fsync_tree(partial)
    if dst.exists() or dst.is_symlink():
        # moved aside under a name made here, never one a user may hold, then removed
        aside = Path(tempfile.mkdtemp(prefix=f".{dst.name}.replaced-", dir=dst.parent))
        dst.rename(aside / "old")
        partial.rename(dst)
        _remove(aside)
    else:
        partial.rename(dst)
    if sync:
        _fsync(dst.parent)


def refuse_existing(dst: str | os.PathLike, *, force: bool = False, resume: bool = False,
                    ours: Callable[[Path], bool] = _empty) -> None:
    """What atomic_output would refuse about an existing `dst` or `.partial`, said before any work."""
    dst = Path(os.path.abspath(dst))
    _check_existing(dst, dst.with_name(dst.name + PARTIAL_SUFFIX), force, resume, ours)


def _check_existing(dst: Path, partial: Path, force: bool, resume: bool, ours: Callable[[Path], bool]) -> None:
    if dst.exists() or dst.is_symlink():
        if not force:
            raise RemapError("output already exists", file=str(dst), expected="a new path, or --force to replace it")
        if not (_empty(dst) or (dst.is_dir() and not dst.is_symlink() and ours(dst))):
            raise RemapError("output exists and is not one remap wrote: --force replaces only those", file=str(dst),
                             expected="a new path, or remove it yourself")
    if not (partial.exists() or partial.is_symlink()):
        return
    if partial.is_symlink() or not partial.is_dir():
        raise RemapError("is not a directory remap made", file=str(partial), expected="remove it yourself, then run again")
    if resume and not (_empty(partial) or ours(partial)):
        raise RemapError("partial output that is not remap's: --resume continues only its own", file=str(partial),
                         expected="remove it yourself, then run again")
    if resume:
        return
    if not force:
        raise RemapError("a previous run left partial output here", file=str(partial),
                         expected="--resume to continue it, or --force to start over")
    if not (_empty(partial) or ours(partial)):
        raise RemapError("partial output that is not remap's: --force discards only its own", file=str(partial),
                         expected="remove it yourself, then run again")


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


def replace_text(path: Path, text: str) -> None:
    """`path` holds `text` whole or its old content, never half of either (a kill mid-write)."""
    temporary = path.with_name(f".{path.name}.remap-tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)

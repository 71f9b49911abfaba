"""The output directory, which appears under its name only once the whole conversion is done.

Also turns disk failures (full, read-only, I/O error) into one-line errors that name the file.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from remap.errors import RemapError

PARTIAL_SUFFIX = ".partial"


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

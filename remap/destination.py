"""Where a conversion may write: the names of remap's own files in an output, and the checks made
before any work (an output over its source, inside another remap output, or onto a folder remap
did not write)."""

from __future__ import annotations

import os
from pathlib import Path

from remap.errors import RemapError
from remap.io.atomic import PARTIAL_SUFFIX, disk_errors, refuse_existing, refuse_overlap
from remap.io.checkpoint import Checkpoint
from remap.io.textfiles import read_json
from remap.io.atomic import INCOMPLETE_SUFFIX

MANIFEST = "remap-manifest.json"
REPORT = "remap-report.json"
CARD = "README.md"  # the model card (remap/render/card.py)
RESUME = "remap-resume.json"  # in DST.partial only: which conversion it holds the pieces of


def check_destination(dst: str | Path, checkpoint: Checkpoint, *, force: bool | None = None,
                      resume: bool = False) -> None:
    """Refuse, before any work, an output that overlaps what the conversion reads, or a path the
    system cannot hold (a name too long, a parent that is a file); given `force`, also an existing
    output (or `.partial`) that convert(force=force, resume=resume) would refuse."""
    with disk_errors(dst):
        for path in (Path(dst), Path(f"{dst}{PARTIAL_SUFFIX}")):
            path.exists()  # raises for a name too long, a loop of links, no permission
    refuse_overlap(dst, _source_paths(checkpoint))
    _refuse_inside_an_output(Path(dst))
    if force is not None:
        refuse_existing(dst, force=force, resume=resume, ours=made_by_remap)


def _refuse_inside_an_output(dst: Path) -> None:
    """An output inside another remap output would add what that one's manifest does not name
    (`remap verify` would fail it) and be deleted by its next --force."""
    for parent in Path(os.path.realpath(dst)).parents:
        if (parent / MANIFEST).is_file():
            raise RemapError(f"the output is inside {parent}, an output remap wrote (its manifest names every file "
                             "it holds)", file=str(dst), expected="an output path outside other remap outputs")


def made_by_remap(path: Path) -> bool:
    """A directory remap wrote, holding nothing its manifest does not name (a file a user put
    there since would be lost to --force), or one it was writing (its resume record, or that
    record's temporary when a run was killed while writing it)."""
    if (path / MANIFEST).is_file():
        try:
            listed = read_json(path / MANIFEST, "manifest").get("files")
        except (RemapError, AttributeError):  # unreadable, or not an object
            return False
        return isinstance(listed, dict) and all(name in listed or name in (MANIFEST, RESUME) for name in os.listdir(path))
    return (path / RESUME).is_file() or (path / f"{RESUME}{INCOMPLETE_SUFFIX}").is_file()


def _source_paths(checkpoint: Checkpoint) -> list[Path]:
    """What the conversion reads: the checkpoint's directory (or its one file) and every file in it
    it opens, so an output can be refused where it would hold, or sit inside, any of them."""
    given = Path(checkpoint.source)
    files = {Path(info.file) for tensors in checkpoint.files.values() for info in tensors.values() if info.file}
    return [given if given.exists() else checkpoint.root, *files, *checkpoint.extra_files]

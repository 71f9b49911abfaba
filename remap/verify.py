"""`remap verify DST`: re-check a converted checkpoint against what the conversion recorded.

The manifest names every file with its sha256; the report names every tensor with its shape
and dtype. Verifying re-hashes the files and re-reads the headers, so a checkpoint copied,
synced or half-overwritten since is caught before a runtime loads garbage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from remap.errors import RemapError
from remap.execute import MANIFEST, REPORT
from remap.io.checkpoint import open_checkpoint
from remap.io.hashing import sha256_file


@dataclass
class Verification:
    checked_files: int = 0
    checked_tensors: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(dst: str | Path) -> Verification:
    dst = Path(dst)
    manifest = _json(dst / MANIFEST)
    result = Verification()
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise RemapError("manifest has no `files` map", file=str(dst / MANIFEST))
    for name, digest in sorted(listed.items()):
        path = dst / name
        if Path(name).name != name:
            result.problems.append(f"{name}: not a plain file name (refusing to look outside {dst})")
        elif not path.is_file():
            result.problems.append(f"{name}: missing")
        elif digest is not None and sha256_file(path) != digest:
            result.problems.append(f"{name}: sha256 differs from the manifest")
        result.checked_files += 1
    extra = sorted(p.name for p in dst.iterdir() if p.is_file() and p.name not in listed and p.name != MANIFEST)
    result.problems += [f"{name}: not in the manifest" for name in extra]
    if (dst / REPORT).exists() and not result.problems:
        rows = _json(dst / REPORT).get("rows", [])
        checkpoint = open_checkpoint(dst)
        headers = {n: (list(t.shape), t.dtype) for files in checkpoint.files.values() for n, t in files.items()}
        for row in rows:
            found = headers.get(row["name"])
            if found is None:
                result.problems.append(f"tensor {row['name']}: in the report, not in the files")
            elif found != (row["shape"], row["dtype"]):
                result.problems.append(f"tensor {row['name']}: {found[1]} {found[0]}, the report says {row['dtype']} {row['shape']}")
            result.checked_tensors += 1
    return result


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RemapError("not found: is this a directory remap convert wrote?", file=str(path)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RemapError(f"unreadable: {exc}", file=str(path)) from None
    if not isinstance(value, dict):
        raise RemapError("not a JSON object", file=str(path))
    return value

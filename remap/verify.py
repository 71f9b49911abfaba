"""`remap verify DST`: re-check a converted checkpoint against what the conversion recorded.

The manifest names every file with its digest (the algorithm in `digest`: the sha256 tree of
64 MiB chunks, or, in manifests from before it and with `convert --sha256`, plain sha256) and
records the conversion's recipe. Verifying re-hashes the files, then checks every file's tensors (names, dtypes, shapes: per rank for
model-parallel files) against the conversion replayed from the recipe on its source's headers,
or, where the source cannot be opened here, against the report's rows. A checkpoint copied,
synced or half-overwritten since is caught before a runtime loads garbage; `evidence` says
which checks ran.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from remap.errors import RemapError
from remap.destination import MANIFEST, REPORT
from remap.io.checkpoint import open_checkpoint
from remap.io.hashing import ALGORITHMS, SHA256, file_digest
from remap.io.textfiles import read_json


@dataclass
class Verification:
    checked_files: int = 0
    checked_tensors: int = 0
    problems: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)  # what the files and tensors were checked against
    hashed: bool = True  # False: converted with --no-checksums, so no file's bytes were checked

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, **asdict(self)}


def verify(dst: str | Path) -> Verification:
    dst = Path(dst)
    manifest = _json(dst / MANIFEST)
    result = Verification()
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise RemapError("manifest has no `files` map", file=str(dst / MANIFEST))
    # --no-checksums records it (older manifests: every digest null); a digest missing otherwise fails
    result.hashed = manifest.get("checksums", any(d is not None for d in listed.values())) is not False
    algorithm = manifest.get("digest", SHA256)  # manifests before the tree hash: plain sha256, unnamed
    if result.hashed and algorithm not in ALGORITHMS:
        raise RemapError(f"manifest names an unknown digest {algorithm!r}", file=str(dst / MANIFEST),
                         expected=" or ".join(ALGORITHMS))
    result.evidence.append(f"every file's {algorithm}" if result.hashed else
                           "no file's bytes: converted with --no-checksums, only names and headers are checked")
    for name, digest in sorted(listed.items()):
        result.problems += _file_problems(dst, name, digest, algorithm if result.hashed else None)
        result.checked_files += 1
    extra = sorted(p.name for p in dst.iterdir() if p.name not in listed and p.name != MANIFEST)
    result.problems += [f"{name}{'/' if (dst / name).is_dir() else ''}: not in the manifest" for name in extra]
    if result.problems:
        return result
    headers = {file: {n: (list(t.shape), t.dtype) for n, t in tensors.items()}
               for file, tensors in open_checkpoint(dst).files.items()}
    expected = _replayed(manifest, dst, result) or _reported(dst, headers, result)
    for file, tensors in expected.items():
        found = headers.get(file, {})
        for name, want in tensors.items():
            got = found.get(name)
            if got is None:
                result.problems.append(f"tensor {name}: not in {file}")
            elif got != want:
                result.problems.append(f"tensor {name}: {got[1]} {got[0]} in {file}, expected {want[1]} {want[0]}")
            result.checked_tensors += 1
        result.problems += [f"tensor {name}: in {file}, not in the conversion" for name in found if name not in tensors]
    return result


def _file_problems(dst: Path, name: str, digest, algorithm: str | None) -> list[str]:
    path = dst / name
    if Path(name).name != name:
        return [f"{name}: not a plain file name (refusing to look outside {dst})"]
    if not path.is_file():
        return [f"{name}: missing"]
    if algorithm is None:
        return []
    if not isinstance(digest, str):
        return [f"{name}: the manifest records no {algorithm} for it"]
    return [f"{name}: {algorithm} differs from the manifest"] if file_digest(path, algorithm) != digest else []


def _replayed(manifest: dict, dst: Path, result: Verification) -> dict[str, dict] | None:
    """file -> tensor -> (shape, dtype), from the recipe planned again on its source's headers."""
    from remap import api
    from remap.conversion import Conversion
    from remap.layouts import get_layout

    if not isinstance(manifest.get("recipe"), dict):
        result.evidence.append("no recipe in the manifest (an older remap wrote it)")
        return None
    recipe = Conversion.from_dict(manifest["recipe"], str(dst / MANIFEST))
    try:
        plan, _ = api.replay(recipe)
    except RemapError as exc:
        result.evidence.append(f"the recipe could not be replayed ({exc})")
        return None
    files = get_layout(plan.target_layout).plan_files(plan.outputs, recipe.max_shard_size, plan.names, plan.target_config)
    result.evidence.append(f"tensors against {recipe.spec} replayed on {recipe.source}")
    return {shard.file: {e.name: (list(e.shape), e.dtype) for e in shard.entries} for shard in files.shards}


def _reported(dst: Path, headers: dict[str, dict], result: Verification) -> dict[str, dict]:
    """file -> tensor -> (shape, dtype), from the report's rows (one shape per tensor)."""
    if not (dst / REPORT).exists():
        result.evidence.append("tensors not checked: no report either")
        return {}
    rows = _json(dst / REPORT).get("rows", [])
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"name", "shape", "dtype"} <= set(r) for r in rows):
        raise RemapError("its rows are not the report's", file=str(dst / REPORT),
                         expected="rows of objects with name, shape and dtype, as remap convert writes them")
    rows = {row["name"]: (row["shape"], row["dtype"]) for row in rows}
    where = {name: file for file, tensors in headers.items() for name in tensors}
    result.evidence.append("tensors against the report")
    expected: dict[str, dict] = {}
    for name, want in rows.items():
        expected.setdefault(where.get(name, "the files"), {})[name] = want
    return expected


def _json(path: Path) -> dict:
    if not (path.exists() or path.is_symlink()):
        raise RemapError("not found: is this a directory remap convert wrote?", file=str(path))
    value = read_json(path, "report" if path.name == REPORT else "manifest")
    if not isinstance(value, dict):
        raise RemapError("not a JSON object", file=str(path))
    return value

"""Carry out a plan: stream every output tensor into sharded safetensors, atomically.

Memory is bounded by the largest piece, not the model: the output headers come from the plan
and are written first; each step then computes one piece at a time (a stacked expert tensor one
expert at a time) and writes it at its byte offset. Tensors that only change name move as raw
bytes, never decoded. Everything lands in `DST.partial/` and becomes `DST` only when complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from collections import Counter, deque
from typing import Callable, Iterator

from remap import __version__
from remap.compute import StagedReader, step_pieces
from remap.destination import CARD, MANIFEST, REPORT, RESUME, check_destination, made_by_remap
from remap.errors import RemapError
from remap.io.atomic import INCOMPLETE_SUFFIX, PARTIAL_SUFFIX, atomic_output, disk_errors
from remap.io.checkpoint import Checkpoint
from remap.io.hashing import BLAKE3, file_digest
from remap.io.textfiles import read_json
from remap.io.shards import ShardPlan, file_order, write_index
from remap.io.mlx_safetensors import write_index as write_mlx_index
from remap.io.writer import ShardWriter, shard_is_complete
from remap.layouts import get_layout
from remap.layouts.base import FilePlan
from remap.model_card import source_card
from remap.plan import Plan, Step
from remap.render.card import render_card
Progress = Callable[..., None]  # (bytes written since the last call, total=bytes of every output file)


@dataclass(frozen=True)
class Result:
    dst: Path
    files: dict[str, str]  # file -> its digest (by the manifest's `digest` algorithm)
    bytes_written: int
    seconds: float


def convert(
    plan: Plan,
    checkpoint: Checkpoint,
    dst: str | Path,
    *,
    report: dict | None = None,
    max_shard_size: int | str | None = None,
    workers: int = 1,
    force: bool = False,
    resume: bool = False,
    sync: bool = False,
    checksums: bool = True,
    digest: str = BLAKE3,
    memory: int = 1 << 30,
    progress: Progress | None = None,
) -> Result:
    start = time.perf_counter()
    recipe = plan.recipe
    if max_shard_size is None:
        max_shard_size = recipe.max_shard_size if recipe is not None else "5GB"
    elif recipe is not None:
        recipe = dataclasses.replace(recipe, max_shard_size=max_shard_size)
    target = get_layout(plan.target_layout)
    metadata = {"format": target.format}
    files_plan = target.plan_files(plan.outputs, max_shard_size, plan.names, plan.target_config)
    shards, placements = files_plan.shards, files_plan.placements
    total = sum(shard.nbytes for shard in shards)

    identity = _identity(plan, checkpoint, shards, metadata)
    check_destination(dst, checkpoint)
    with disk_errors(f"{dst}{PARTIAL_SUFFIX}"), atomic_output(dst, force=force, resume=resume, sync=sync,
                                                              ours=made_by_remap) as out:
        _claim_partial(out, identity, resume)
        done = {s.file for s in shards if resume and shard_is_complete(out / s.file, s.entries, metadata, files_plan.style)}
        if progress:  # the total, told here: model-parallel files repeat replicated tensors on every rank
            progress(sum(s.nbytes for s in shards if s.file in done), total=total)
        # Shards are checksummed while they are written (ShardWriter hashes each file as its
        # bytes land); shards a resumed run kept are hashed in the background meanwhile.
        writers = _Writers(out, [s for s in shards if s.file not in done], metadata, sync, checksums and digest,
                           files_plan.style)
        hasher = ThreadPoolExecutor(1)
        hash_file = (lambda path: file_digest(path, digest)) if checksums else (lambda path: None)
        kept = {s.file: hasher.submit(hash_file, out / s.file) for s in shards if s.file in done}
        hashes: dict[str, str | None] = {}
        todo = [s for s in plan.steps if any(p.file in writers for o in s.outputs for p in placements[o.name])]
        steps = _in_file_order(todo, shards, placements, files_plan.style)
        finished = _run_steps(plan, checkpoint, steps, writers, placements, workers, memory, progress)
        try:
            hashes.update(finished)
        except BaseException:
            finished.close()  # Ctrl-C lands here too: let running steps end before their files close
            writers.abandon()
            hasher.shutdown(cancel_futures=True)
            raise
        hashes.update((file, future.result()) for file, future in kept.items())
        hasher.shutdown()
        files = _finish(out, plan, checkpoint, files_plan, report, hashes, hash_file,
                        {**_manifest(plan, checkpoint, recipe), "checksums": checksums,
                         **({"digest": digest} if checksums else {}), "conversion": identity})
    return Result(Path(dst), files, total, time.perf_counter() - start)


def _finish(out: Path, plan: Plan, checkpoint: Checkpoint, files_plan: FilePlan, report: dict | None,
            hashes: dict[str, str | None], digest: Callable, manifest: dict) -> dict[str, str | None]:
    """Everything but the shards: index, config.json, tokenizer files, report, model card, then the
    manifest with every file's digest (last: its presence means the rest is complete)."""
    if files_plan.style == "mlx":
        write_mlx_index(out, files_plan.shards, files_plan.parameters)
    elif files_plan.index:
        write_index(out, files_plan.shards)
    _write_json(out / "config.json", plan.target_config)
    for path in checkpoint.extra_files:
        shutil.copy2(path, out / path.name)
    if report is not None:
        _write_json(out / REPORT, report)
    target, carried = get_layout(plan.target_layout), source_card(checkpoint.root)
    card = render_card(manifest, report, metadata=target.card_metadata, usage=target.usage("DST"), source_card=carried[0],
                       source_metadata=get_layout(plan.source_layout).card_metadata, source_card_problem=carried[1])
    (out / CARD).write_text(card, encoding="utf-8")
    files = {p.name: hashes[p.name] if p.name in hashes else digest(p)
             for p in sorted(out.iterdir()) if p.is_file() and p.name not in (MANIFEST, RESUME)}
    # The manifest carries the identity on, so a kill between these two lines still resumes.
    _write_json(out / MANIFEST, {**manifest, "files": files})
    (out / RESUME).unlink()
    return files


class _Writers:
    """The shards still to write, each opened at its first piece and closed after its last: a
    1.3 TB output in 1 GB shards is over a thousand files, more than a process may hold open."""

    def __init__(self, out: Path, shards: list[ShardPlan], metadata: dict, sync: bool, checksums: bool | str,
                 style: str):
        self._out, self._metadata, self._sync, self._checksums, self._style = out, metadata, sync, checksums, style
        self._shards = {s.file: s for s in shards}
        self._open: dict[str, ShardWriter] = {}
        self._lock = threading.Lock()  # steps run in threads; two may reach a new shard at once

    def __contains__(self, file: str) -> bool:
        return file in self._shards

    def __getitem__(self, file: str) -> ShardWriter:
        with self._lock:
            if file not in self._open:
                shard = self._shards[file]
                self._open[file] = ShardWriter(self._out / file, shard.entries, self._metadata, sync=self._sync,
                                               checksum=self._checksums, style=self._style)
            return self._open[file]

    def get(self, file: str) -> ShardWriter | None:
        return self[file] if file in self else None

    def close(self, file: str) -> str | None:
        """Finish a shard; its digest where checksums are on."""
        writer = self[file]
        writer.close()
        with self._lock:
            del self._open[file]
        return writer.digest

    def abandon(self) -> None:
        with self._lock:
            for writer in self._open.values():
                writer._abandon()
            self._open.clear()


def _run_steps(plan, checkpoint, steps, writers, placements, workers, memory,
               progress) -> Iterator[tuple[str, str | None]]:
    """Run the steps; yields each file, with its digest, as soon as its last tensor is written and
    it is closed."""
    read = StagedReader(plan.stages, checkpoint.load)
    remaining = Counter(p.file for s in steps for o in s.outputs for p in placements[o.name] if p.file in writers)

    def run(step: Step) -> None:
        whole = all(p.dim is None for o in step.outputs for p in placements[o.name])
        if whole and (moves := _byte_moves(plan, checkpoint, step)):
            (output,) = step.outputs
            for index, info in enumerate(moves):
                for place in placements[output.name]:
                    if place.file in writers:
                        writers[place.file].copy_from(output.name, info.file, info.start, info.nbytes, index * info.nbytes)
                        if progress:
                            progress(info.nbytes)
            return
        try:
            for index, arrays in step_pieces(step, read):
                write(step, index, arrays)
        except RemapError as exc:  # an op refusing its data (NaN in a quantizer): which checkpoint, tensor, rule
            raise exc.within(file=str(checkpoint.source), tensor=step.sources[0] if step.sources else step.outputs[0].name,
                             rule=step.rule)

    def write(step: Step, index: int | None, arrays: list) -> None:
        for output, array in zip(step.outputs, arrays):  # ShardWriter checks each piece's dtype
            for place in placements[output.name]:
                writer = writers.get(place.file)
                if writer is None:
                    continue
                piece = place.cut(array)
                writer.write(output.name, piece, offset=0 if index is None else index * piece.nbytes)
                if progress:
                    progress(piece.nbytes)

    def done(step: Step) -> Iterator[tuple[str, str | None]]:
        for output in step.outputs:
            for place in placements[output.name]:
                if place.file in writers:
                    remaining[place.file] -= 1
                    if remaining[place.file] == 0:
                        yield place.file, writers.close(place.file)

    if workers <= 1:
        for step in steps:
            run(step)
            yield from done(step)
        return
    need = lambda step: 0 if _byte_moves(plan, checkpoint, step) else 3 * read.piece_nbytes(step)
    for step in _in_threads(steps, run, need, workers, memory):
        yield from done(step)


def _in_threads(steps: list[Step], run: Callable[[Step], None], need: Callable[[Step], int], workers: int,
                memory: int) -> Iterator[Step]:
    """Run steps on `workers` threads; yields each step, in order, once it has run.

    Threads: pread, copy_file_range, numpy copies and pwrite all release the GIL. Results are
    taken in order, so files close in order. Steps run side by side only while their working
    sets fit `memory` together: two embeddings decoded at once must not double the peak (a
    decoded piece is held about 3 times: the private copy, what ops make of it, what is written).

    Steps that only move bytes (need 0) run on one thread of their own, one after another in file
    order: copies into one file do not overlap in the kernel anyway (each write takes the file's
    lock), and two of them taking turns grew the file's written prefix, which its hash follows,
    at half speed: the hash finished ~0.1 s after the last byte, 200 MB behind."""
    with ThreadPoolExecutor(workers) as pool, ThreadPoolExecutor(1) as copier:
        window: deque = deque()
        in_flight = 0
        for step in steps:
            size = need(step)
            while window and (len(window) >= 2 * workers or in_flight + size > memory):
                finished, future, used = window.popleft()
                future.result()
                in_flight -= used
                yield finished
            window.append((step, (copier if size == 0 else pool).submit(run, step), size))
            in_flight += size
        while window:
            finished, future, _ = window.popleft()
            future.result()
            yield finished


def _in_file_order(steps: list[Step], shards: list[ShardPlan], placements, style: str) -> list[Step]:
    """Steps ordered by where their first bytes land (file, then offset), so each file fills
    from its start: it is hashed as it is written, and finishes (and can close) early."""
    where: dict[tuple[str, str], tuple[int, int]] = {}
    for rank, shard in enumerate(shards):
        for offset, entry in enumerate(shard.entries if style == "mlx" else file_order(shard.entries)):
            where[shard.file, entry.name] = (rank, offset)
    return sorted(steps, key=lambda step: min(where[p.file, o.name] for o in step.outputs for p in placements[o.name]))


def _byte_moves(plan: Plan, checkpoint: Checkpoint, step: Step) -> list | None:
    """The source spans of a step that only moves bytes (no ops, one source per piece, same
    dtype, a file on disk): those are copied file to file, never decoded. None otherwise."""
    if len(plan.stages) > 1 or step.ops or step.fill or step.take is not None or len(step.outputs) != 1:
        return None
    if any(len(group) != 1 for group in step.groups):
        return None
    infos = [checkpoint.tensors[group[0]] for group in step.groups]
    if any(info.start is None or info.dtype != step.outputs[0].dtype for info in infos):
        return None
    return infos


def _manifest(plan: Plan, checkpoint: Checkpoint, recipe) -> dict:
    return {
        "remap_version": __version__,
        # the whole conversion, replayable: `remap parity SRC DST` and `remap verify DST` plan it again
        "recipe": recipe.to_dict() if recipe is not None else None,
        "spec": plan.name,
        "spec_files": [str(stage.spec.path) for stage in plan.stages],
        "source": checkpoint.source,
        "source_revision": checkpoint.revision,
        "target": {"layout": plan.target_layout, "variant": plan.names["target_variant"]},
    }


def _identity(plan: Plan, checkpoint: Checkpoint, shards: list[ShardPlan], metadata: dict) -> dict:
    """What a conversion is, for telling whether a .partial directory was started by this one:
    the plan (spec, options, configs: everything that decides the bytes), the output files'
    layout, and each source file's size and modification time (a re-download or an edit
    changes them; hashing a terabyte to find out would cost as much as converting it)."""
    def fingerprint(value) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()

    sources = sorted({info.file for tensors in checkpoint.files.values() for info in tensors.values()})
    return {
        "plan": fingerprint(plan.to_dict()),
        "files": fingerprint([[s.file, [list(e) for e in s.entries]] for s in shards] + [metadata]),
        "sources": {os.path.relpath(path, checkpoint.root): [stat.st_size, stat.st_mtime_ns]
                    for path in sources for stat in [os.stat(path)]},
    }


def _claim_partial(out: Path, identity: dict, resume: bool) -> None:
    """Record what `out` is being built for, or, resuming, check it is what it was built for:
    finished shards of another conversion (another spec, source or --max-shard-size) must not
    be mixed into this one. The record is RESUME while the run lasts, then the manifest's
    `conversion`."""
    record = out / RESUME
    if resume and (before := _recorded_identity(out)) is not None:
        changed = [key for key in identity if before.get(key) != identity[key]]
        if changed:
            what = {"plan": "the plan (spec, options or config)", "files": "the output files (--max-shard-size)",
                    "sources": "the source files (size or modification time)"}
            raise RemapError(
                "was started by a different conversion: " + ", ".join(what[key] for key in changed) + " differ",
                file=str(out),
                expected="the same source, spec and options as the interrupted run, or --force to start over",
            )
        if record.exists():
            return
    elif resume and any(p.suffix == ".safetensors" for p in out.iterdir()):
        raise RemapError(
            f"has finished files but no record of which conversion made them ({RESUME})",
            file=str(out),
            expected="--force to start over",
        )
    temporary = record.with_name(record.name + INCOMPLETE_SUFFIX)
    _write_json(temporary, identity)
    os.replace(temporary, record)  # whole or absent, even if killed while writing it


def _recorded_identity(out: Path) -> dict | None:
    for path, key in ((out / RESUME, None), (out / MANIFEST, "conversion")):
        if not (path.exists() or path.is_symlink()):
            continue
        try:
            value = read_json(path, "manifest")
        except RemapError:
            return {}  # unreadable, or no regular file: matches nothing
        value = value.get(key) if key and isinstance(value, dict) else value
        return value if isinstance(value, dict) else {}
    return None


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")

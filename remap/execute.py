"""Carry out a plan: stream every output tensor into sharded safetensors, atomically.

Memory is bounded by the largest piece, not the model: the output headers come from the plan
and are written first; each step then computes one piece at a time (a stacked expert tensor one
expert at a time) and writes it at its byte offset. Tensors that only change name move as raw
bytes, never decoded. Everything lands in `DST.partial/` and becomes `DST` only when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from collections import Counter, deque
from typing import Callable, Iterator

import numpy as np

from remap import __version__, dtypes
from remap.compute import StagedReader, step_pieces
from remap.errors import RemapError
from remap.io.checkpoint import Checkpoint
from remap.io.writer import (ShardPlan, ShardWriter, TensorEntry, atomic_output, plan_shards, sha256_file,
                             shard_is_complete, write_index)
from remap.layouts import deepseek
from remap.plan import Plan, Step

MANIFEST = "remap-manifest.json"
REPORT = "remap-report.json"
# The `format` each runtime writes in safetensors metadata (transformers: pt, mlx-lm: mlx).
FORMAT = {"hf": "pt", "mlx": "mlx", "scratch": "pt", "deepseek": "pt"}

Progress = Callable[[int], None]  # called with bytes written


@dataclass(frozen=True)
class Placement:
    """Where one output tensor's bytes go: a file, and for model parallelism its rank's slice."""

    file: str
    dim: int | None = None  # None: the whole tensor
    rank: int = 0
    ranks: int = 1

    def cut(self, array):
        return array if self.dim is None else np.split(array, self.ranks, axis=self.dim)[self.rank]


def hf_files(outputs, max_shard_size, names) -> tuple[list[ShardPlan], dict[str, list[Placement]]]:
    """transformers' scheme: shards filled in order (model-0000k-of-0000n.safetensors)."""
    shards = plan_shards([(o.name, o.dtype, o.shape) for o in outputs], max_shard_size)
    return shards, {e.name: [Placement(s.file)] for s in shards for e in s.entries}


def model_parallel_files(outputs, max_shard_size, names) -> tuple[list[ShardPlan], dict[str, list[Placement]]]:
    """DeepSeek's convert.py scheme: model{r}-mp{N}.safetensors, one file per rank."""
    mp = int(names.get("mp", 1))
    experts = names["n_routed_experts"]
    if mp < 1 or experts % mp:
        raise RemapError(f"--param mp={mp} does not divide {experts} routed experts", expected="mp >= 1 dividing n_routed_experts")
    files = [deepseek.shard_file(r, mp) for r in range(mp)]
    entries: list[list[TensorEntry]] = [[] for _ in range(mp)]
    placements: dict[str, list[Placement]] = {}
    for o in outputs:
        split = deepseek.split_of(o.name)
        if split.expert is not None:
            owner = split.expert // (experts // mp)
            entries[owner].append(TensorEntry(o.name, o.dtype, o.shape))
            placements[o.name] = [Placement(files[owner])]
            continue
        shape = o.shape
        if split.dim is not None:
            if shape[split.dim] % mp:
                raise RemapError(f"dim {split.dim} of {list(shape)} does not split over {mp} ranks", tensor=o.name)
            shape = shape[: split.dim] + (shape[split.dim] // mp,) + shape[split.dim + 1 :]
        for r in range(mp):
            entries[r].append(TensorEntry(o.name, o.dtype, shape))
        placements[o.name] = [Placement(files[r], split.dim, r, mp) for r in range(mp)]
    return [ShardPlan(f, tuple(e)) for f, e in zip(files, entries)], placements


# How each target layout names and splits its files.
FILE_SCHEMES = {"deepseek": model_parallel_files}


@dataclass(frozen=True)
class Result:
    dst: Path
    files: dict[str, str]  # file -> sha256
    bytes_written: int
    seconds: float


def convert(
    plan: Plan,
    checkpoint: Checkpoint,
    dst: str | Path,
    *,
    report: dict | None = None,
    max_shard_size: int | str = "5GB",
    workers: int = 1,
    force: bool = False,
    resume: bool = False,
    sync: bool = False,
    checksums: bool = True,
    progress: Progress | None = None,
) -> Result:
    start = time.perf_counter()
    target = plan.spec.target_layout
    metadata = {"format": FORMAT.get(target, "pt")}
    scheme = FILE_SCHEMES.get(target, hf_files)
    shards, placements = scheme(plan.outputs, max_shard_size, plan.names)
    total = sum(shard.nbytes for shard in shards)

    with atomic_output(dst, force=force, resume=resume, sync=sync) as out:
        done = {s.file for s in shards if resume and shard_is_complete(out / s.file, s.entries, metadata)}
        if progress:
            progress(sum(s.nbytes for s in shards if s.file in done))
        writers = {s.file: ShardWriter(out / s.file, s.entries, metadata, sync=sync) for s in shards if s.file not in done}
        # Each shard is checksummed as soon as it is complete, in the background, while later
        # shards are still being written (hashing is the one pass over the data a copy lacks).
        hasher = ThreadPoolExecutor(1)
        digest = sha256_file if checksums else (lambda path: None)
        hashes = {s.file: hasher.submit(digest, out / s.file) for s in shards if s.file in done}
        try:
            steps = [s for s in plan.steps if any(p.file in writers for o in s.outputs for p in placements[o.name])]
            finished = _run_steps(plan, checkpoint, steps, writers, placements, workers, progress)
            for file in finished:
                hashes[file] = hasher.submit(digest, out / file)
        except BaseException:
            for writer in writers.values():
                writer._abandon()
            hasher.shutdown(cancel_futures=True)
            raise
        if len(shards) > 1 and scheme is hf_files:
            write_index(out, shards)
        _write_json(out / "config.json", plan.target_config)
        for path in checkpoint.extra_files:
            shutil.copy2(path, out / path.name)
        if report is not None:
            _write_json(out / REPORT, report)
        files = {p.name: hashes[p.name].result() if p.name in hashes else digest(p)
                 for p in sorted(out.iterdir()) if p.is_file() and p.name != MANIFEST}
        hasher.shutdown()
        _write_json(out / MANIFEST, _manifest(plan, checkpoint, files))
    return Result(Path(dst), files, total, time.perf_counter() - start)


def _run_steps(plan, checkpoint, steps, writers, placements, workers, progress) -> Iterator[str]:
    """Run the steps; yields each file as soon as its last tensor is written and it is closed."""
    read = StagedReader(plan, checkpoint.load)
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
        for index, arrays in step_pieces(step, read):
            for output, array in zip(step.outputs, arrays):
                _check_dtype(array, output.dtype, output.name)
                for place in placements[output.name]:
                    writer = writers.get(place.file)
                    if writer is None:
                        continue
                    piece = place.cut(array)
                    writer.write(output.name, piece, offset=0 if index is None else index * piece.nbytes)
                    if progress:
                        progress(piece.nbytes)

    def done(step: Step) -> Iterator[str]:
        for output in step.outputs:
            for place in placements[output.name]:
                if place.file in writers:
                    remaining[place.file] -= 1
                    if remaining[place.file] == 0:
                        writers[place.file].close()
                        yield place.file

    if workers <= 1:
        for step in steps:
            run(step)
            yield from done(step)
        return
    # Threads: pread, copy_file_range, numpy copies and pwrite all release the GIL. Results are
    # taken in order, so files close in order; a bounded window keeps memory bounded.
    with ThreadPoolExecutor(workers) as pool:
        window: deque = deque()
        for step in steps:
            window.append((step, pool.submit(run, step)))
            if len(window) > 2 * workers:
                finished, future = window.popleft()
                future.result()
                yield from done(finished)
        while window:
            finished, future = window.popleft()
            future.result()
            yield from done(finished)


def _byte_moves(plan: Plan, checkpoint: Checkpoint, step: Step) -> list | None:
    """The source spans of a step that only moves bytes (no ops, one source per piece, same
    dtype, a file on disk): those are copied file to file, never decoded. None otherwise."""
    if plan.upstream is not None or step.ops or step.fill or step.take is not None or len(step.outputs) != 1:
        return None
    if any(len(group) != 1 for group in step.groups):
        return None
    infos = [checkpoint.tensors[group[0]] for group in step.groups]
    if any(info.start is None or info.dtype != step.outputs[0].dtype for info in infos):
        return None
    return infos


def _check_dtype(array, dtype: str, name: str) -> None:
    if array.dtype != dtypes.numpy_dtype(dtype):
        raise RemapError(f"computed {array.dtype}, the plan says {dtype}", tensor=name)


def _manifest(plan: Plan, checkpoint: Checkpoint, files: dict[str, str]) -> dict:
    return {
        "remap_version": __version__,
        "spec": plan.name,
        "spec_files": [str(stage.spec.path) for stage in plan.stages],
        "source": checkpoint.source,
        "source_revision": checkpoint.revision,
        "target": {"layout": plan.spec.target_layout, "variant": plan.names["target_variant"]},
        "files": files,
    }


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")

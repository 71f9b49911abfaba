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
from typing import Callable

from remap import __version__, dtypes
from remap.compute import StagedReader, step_pieces
from remap.errors import RemapError
from remap.io.checkpoint import Checkpoint
from remap.io.writer import ShardPlan, ShardWriter, atomic_output, plan_shards, sha256_file, shard_is_complete, write_index
from remap.plan import Plan, Step

MANIFEST = "remap-manifest.json"
REPORT = "remap-report.json"
# The `format` each runtime writes in safetensors metadata (transformers: pt, mlx-lm: mlx).
FORMAT = {"hf": "pt", "mlx": "mlx", "scratch": "pt", "deepseek": "pt"}

Progress = Callable[[int], None]  # called with bytes written


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
    progress: Progress | None = None,
) -> Result:
    start = time.perf_counter()
    target = plan.spec.target_layout
    metadata = {"format": FORMAT.get(target, "pt")}
    outputs = [o for step in plan.steps for o in step.outputs]
    shards = plan_shards([(o.name, o.dtype, o.shape) for o in outputs], max_shard_size)
    shard_of = {entry.name: shard for shard in shards for entry in shard.entries}
    total = sum(shard.nbytes for shard in shards)

    with atomic_output(dst, force=force, resume=resume) as out:
        done = {s.file for s in shards if resume and shard_is_complete(out / s.file, s.entries, metadata)}
        if progress:
            progress(sum(s.nbytes for s in shards if s.file in done))
        writers = {s.file: ShardWriter(out / s.file, s.entries, metadata) for s in shards if s.file not in done}
        try:
            steps = [step for step in plan.steps if any(shard_of[o.name].file in writers for o in step.outputs)]
            _run_steps(plan, checkpoint, steps, writers, shard_of, workers, progress)
            for writer in writers.values():
                writer.close()
        except BaseException:
            for writer in writers.values():
                writer._abandon()
            raise
        if len(shards) > 1:
            write_index(out, shards)
        _write_json(out / "config.json", plan.target_config)
        for path in checkpoint.extra_files:
            shutil.copy2(path, out / path.name)
        if report is not None:
            _write_json(out / REPORT, report)
        files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file() and p.name != MANIFEST}
        _write_json(out / MANIFEST, _manifest(plan, checkpoint, files))
    return Result(Path(dst), files, total, time.perf_counter() - start)


def _run_steps(plan, checkpoint, steps, writers, shard_of, workers, progress) -> None:
    read = StagedReader(plan, checkpoint.read)

    def run(step: Step) -> None:
        for index, arrays in _pieces(plan, checkpoint, step, read):
            for output, array in zip(step.outputs, arrays):
                writer = writers.get(shard_of[output.name].file)
                if writer is None:
                    continue
                piece = array if isinstance(array, memoryview) else _as_dtype(array, output.dtype, output.name)
                nbytes = piece.nbytes
                writer.write(output.name, piece, offset=0 if index is None else index * nbytes)
                if progress:
                    progress(nbytes)

    if workers <= 1:
        for step in steps:
            run(step)
        return
    # Threads: reads (mmap page-ins), numpy copies and pwrite all release the GIL.
    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(run, step) for step in steps]:
            future.result()


def _pieces(plan: Plan, checkpoint: Checkpoint, step: Step, read):
    """A step's pieces; a pure move (no ops, one source, same dtype) is raw bytes, never decoded."""
    if plan.upstream is None and not step.ops and step.fill is None and step.take is None and len(step.outputs) == 1:
        sources = [group[0] for group in step.groups if len(group) == 1]
        if len(sources) == len(step.groups) and all(
            checkpoint.tensors[s].dtype == step.outputs[0].dtype for s in sources
        ):
            for index, name in enumerate(sources):
                yield (index if step.stacked else None), [checkpoint.read_bytes(name)]
            return
    yield from step_pieces(step, read)


def _as_dtype(array, dtype: str, name: str):
    want = dtypes.numpy_dtype(dtype)
    if array.dtype != want:
        raise RemapError(f"computed {array.dtype}, the plan says {dtype}", tensor=name)
    return array


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

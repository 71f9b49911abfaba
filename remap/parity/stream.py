"""Layer-streamed parity: both sides in their own runtime's code, one decoder layer at a time.

Whole-model parity holds both models in the compute dtype (a 5.6 GB bf16 checkpoint needed 24 GB).
Streamed, each side loads one step's tensors, runs it and frees them: the probe tokens'
embedding rows, decoder layer i (its attention, norms, router and shared expert whole; of its
routed experts only those its own router picks for the probe tokens, a chunk at a time), the
final norm and the head in vocabulary blocks (stream_torch.py, stream_mlx.py).

Layer i of the target runs on two inputs at once, batched: the source's hidden state before
layer i, and the target's own. The target's own states, propagated from its own embedding, are
what whole-model parity compares, so the metrics are the same up to float32 rounding. The
source-fed half compares the two layers on the same input: which experts each router picks
there (a disagreement is reported with the experts involved), and each layer's own error
(`local`), free of what earlier layers added.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from remap.errors import RemapError
from remap.io.checkpoint import Checkpoint
from remap.parity.compare import hidden_metrics
from remap.parity.runtimes import DTYPES, Forward
from remap.parity.stream_side import StreamedSide

# Share of the memory available when parity starts that the two models may take whole
# (the default --memory-budget); over it, parity streams.
BUDGET_SHARE = 0.8


@dataclass
class Streamed:
    """What a streamed run loaded, and what its source-fed half found."""

    reason: str  # why it streamed: "--stream", or the estimate against the budget
    layers: int
    bytes_read: list[int]  # [source, target]
    experts: dict[str, list[int]] = field(default_factory=dict)  # "layer 1": [source's experts, target's]
    routing: list[dict] = field(default_factory=list)  # layers whose routers disagree on the same input
    local: dict[str, dict] = field(default_factory=dict)  # "layer i": compare.hidden_metrics, source-fed


def streamed_side(layout: str, checkpoint: Checkpoint, dtype: str) -> StreamedSide:
    """`checkpoint` in its layout's runtime, ready to run a step at a time."""
    from remap.parity.stream_mlx import mlx_streamed
    from remap.parity.stream_torch import transformers_streamed

    runs = {"hf": transformers_streamed, "mlx": mlx_streamed}
    if dtype not in DTYPES:
        raise RemapError(f"unknown compute dtype '{dtype}'", expected=" | ".join(DTYPES))
    if layout not in runs:
        raise RemapError(f"layer-streamed parity runs hf and mlx checkpoints, not {layout}",
                         file=checkpoint.source, expected="whole-model parity (no --stream) for this one")
    return runs[layout](checkpoint, dtype)


def whole_model_bytes(checkpoints: tuple[Checkpoint, ...], dtype: str) -> int:
    """What both models take loaded whole: every float tensor in the compute dtype, packed ones as stored."""
    size = {"float32": 4}.get(dtype, 2)
    return sum(info.numel * size if info.dtype.startswith(("F", "BF")) else info.nbytes
               for checkpoint in checkpoints for info in checkpoint.tensors.values())


def default_budget() -> int:
    """BUDGET_SHARE of the memory available now (MemAvailable), or of the machine's RAM."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(available * BUDGET_SHARE)


def budget_bytes(value: int | str) -> int:
    """--memory-budget: bytes, or a number and a unit ("8GB", "500MB")."""
    from remap.io.shards import shard_size

    try:
        return shard_size(value)
    except RemapError:
        raise RemapError(f"bad memory budget {value!r}", expected="a size like '8GB' or '500MB'") from None


def size_text(count: int) -> str:
    """Bytes as people read them: "1.23 GB", "45.6 MB", "789 KB"."""
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count / 1e3:.3g} KB"


def peak_rss() -> int:
    """This process's resident-memory high-water mark, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_streamed(source: StreamedSide, target: StreamedSide, ids: np.ndarray, reason: str,
                 step: Callable[[str], None] = lambda what: None) -> tuple[Forward, Forward, Streamed]:
    """Both sides step by step on `ids`; the target's layers on the source's input and its own.
    `step` is told each step as it starts (the embedding, each layer, the logits)."""
    if source.layers != target.layers:
        raise RemapError(f"{source.layers} decoder layers (source) and {target.layers} (target)",
                         expected="the same num_hidden_layers on both sides")
    batch = ids.shape[0]
    step("embedding")
    ours, theirs = [source.embed(ids)], [target.embed(ids)]
    info = Streamed(reason, source.layers, [0, 0])
    for index in range(source.layers):
        step(f"layer {index}")
        after, ours_picked = source.layer(index, ours[-1])
        both, theirs_picked = target.layer(index, np.concatenate([ours[-1], theirs[-1]]))
        ours.append(after)
        theirs.append(both[batch:])
        info.local[f"layer {index}"] = hidden_metrics(after, both[:batch])
        if ours_picked is not None and theirs_picked is not None:
            info.experts[f"layer {index}"] = [len(np.unique(ours_picked)), len(np.unique(theirs_picked))]
            disagreement = routing_disagreement(index, ours_picked, theirs_picked[: len(ours_picked)])
            if disagreement:
                info.routing.append(disagreement)
    step("logits")
    logits = Forward(source.logits(ours[-1]), ours), Forward(target.logits(theirs[-1]), theirs)
    info.bytes_read = [source.reader.bytes_read, target.reader.bytes_read]
    return *logits, info


def routing_disagreement(layer: int, ours: np.ndarray, theirs: np.ndarray) -> dict | None:
    """Where the two routers, given the same input, pick different experts: how many tokens, and
    the experts only one side picked for them (None when they agree everywhere)."""
    differ = [n for n in range(len(ours)) if set(ours[n].tolist()) != set(theirs[n].tolist())]
    if not differ:
        return None
    source_only = sorted({int(e) for n in differ for e in set(ours[n].tolist()) - set(theirs[n].tolist())})
    target_only = sorted({int(e) for n in differ for e in set(theirs[n].tolist()) - set(ours[n].tolist())})
    return {"layer": layer, "tokens": len(differ), "of": len(ours), "first_token": differ[0],
            "source_only": source_only, "target_only": target_only}

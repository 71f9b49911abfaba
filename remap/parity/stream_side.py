"""What a layer-streamed parity run asks of each side, whatever runtime computes it.

A `StreamedSide` runs the embedding on token ids, one decoder layer on given hidden states (and
says which routed experts its router picked, per token), and the final norm and head on the last
hidden state; each step loads only its own tensors and frees them when it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from remap.io.headers import TensorInfo
from remap.parity.weights import Reader

# Bytes of one block of the head's rows, and of one chunk of routed experts, in the compute dtype
# (float32: 4 bytes a value). Both bound the peak beside one layer's attention and shared expert.
BLOCK_BYTES = 256 << 20
EXPERT_CHUNK_BYTES = 1 << 30


@dataclass
class StreamedSide:
    name: str  # what computes it, with its version, as runtimes.Runtime.name
    vocab_size: int
    layers: int  # decoder layers (an MTP layer after them is not run, as the runtimes do not)
    embed: Callable[[np.ndarray], np.ndarray]  # ids [batch, tokens] -> hidden [batch, tokens, hidden]
    # (layer index, hidden) -> (its output, the routed experts each token picked [tokens, k], or None)
    layer: Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray | None]]
    logits: Callable[[np.ndarray], np.ndarray]  # last hidden -> logits, through the final norm and head
    reader: Reader


def vocabulary_blocks(head: TensorInfo) -> Iterator[slice]:
    """Row ranges of the head (one per vocabulary block) of about BLOCK_BYTES in float32."""
    rows, width = head.shape[0], max(1, int(np.prod(head.shape[1:])))
    step = max(1, BLOCK_BYTES // (4 * width))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def expert_chunks(experts: Sequence[int], reader: Reader, one: str) -> Iterator[list[int]]:
    """The picked experts in chunks of about EXPERT_CHUNK_BYTES (three float32 matrices the size
    of tensor `one` each)."""
    size = 3 * 4 * int(np.prod(reader.info(one).shape[-2:]))
    step = max(1, EXPERT_CHUNK_BYTES // size)
    for start in range(0, len(experts), step):
        yield list(experts[start:start + step])

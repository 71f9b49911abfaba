"""The pieces of a checkpoint a layer-streamed parity run loads: one decoder layer's tensors,
some rows of a tensor (the probe tokens' embeddings, a block of the vocabulary, the routed
experts the probe tokens select), FP8 weights dequantized as they load.

Everything is read with pread into the process's own memory, never through a mapping: mapped
pages would stay resident (and counted) for as long as the file is open, where a private copy
goes away with the array.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np

from remap.dtypes import DTYPES
from remap.errors import RemapError
from remap.io.checkpoint import Checkpoint
from remap.io.headers import TensorInfo

# Per-expert (hf) and stacked (mlx) routed experts: loaded apart, only those the tokens select.
EXPERT_PARTS = (".mlp.experts.", ".mlp.switch_mlp.")


class Reader:
    """Reads named tensors, or rows of them, of one checkpoint; counts the bytes it read."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.tensors = checkpoint.tensors
        self.bytes_read = 0
        fp8 = any(info.dtype == "F8_E4M3" for info in self.tensors.values())
        self._fp8 = _fp8_scheme(checkpoint.config or {}) if fp8 else None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise RemapError("no such tensor in the checkpoint", file=self.checkpoint.source, tensor=name) from None

    def rows(self, name: str, rows: Sequence[int] | slice) -> np.ndarray:
        """Rows (along axis 0) of a tensor: a list of indices or a slice."""
        info = self.info(name)
        if info.start is None:  # a torch state dict: already in memory
            return np.array(self.checkpoint.read(info)[rows])
        index = range(info.shape[0])[rows] if isinstance(rows, slice) else rows
        row_bytes = info.nbytes // max(info.shape[0], 1)
        out = np.empty((len(index), *info.shape[1:]), DTYPES[info.dtype].numpy)
        flat = memoryview(out.reshape(-1).view(np.uint8))
        with open(info.file, "rb", buffering=0) as f:
            for n, (first, count) in _runs(index):  # consecutive rows read as one span
                self._pread(f, flat[n * row_bytes:(n + count) * row_bytes], info.start + first * row_bytes, info)
        return out

    def whole(self, name: str) -> np.ndarray:
        info = self.info(name)
        self.bytes_read += info.nbytes
        return self.checkpoint.load(info)

    def weight(self, name: str, rows: Sequence[int] | slice | None = None) -> np.ndarray:
        """A tensor as its runtime holds it: an FP8 weight times its scale (remap's dequant_fp8
        op, in bfloat16 as DeepSeek's fp8_cast_bf16 writes it), any other tensor as stored."""
        value = self.whole(name) if rows is None else self.rows(name, rows)
        scale = name[: -len("weight")] + self._fp8.scale if self._fp8 and name.endswith(".weight") else None
        if scale is None or scale not in self.tensors or self.info(name).dtype != "F8_E4M3":
            return value
        from remap.ops.numeric import DequantFP8

        op = DequantFP8(block=self._fp8.block, dtype="BF16")
        if rows is None or self._fp8.block is None:
            return op.apply([value, self.whole(scale)])[0]
        return np.stack([op.apply([w, s])[0] for w, s in zip(value, self.rows(scale, rows))])

    def layer(self, index: int) -> dict[str, np.ndarray]:
        """Every tensor of decoder layer `index` but its routed experts, FP8 scales folded in."""
        prefix = f"model.layers.{index}."
        names = [n for n in self.tensors if n.startswith(prefix) and not any(p in n for p in EXPERT_PARTS)]
        scale = self._fp8.scale if self._fp8 else None
        return {n: self.weight(n) for n in names if not (scale and n.endswith("." + scale) and _scaled(self, n, scale))}

    def _pread(self, f, buffer: memoryview, offset: int, info: TensorInfo) -> None:
        done = 0
        while done < len(buffer):
            n = os.preadv(f.fileno(), [buffer[done:]], offset + done)
            if n == 0:
                raise RemapError("file ended inside the tensor", file=str(info.file), tensor=info.name)
            done += n
        self.bytes_read += len(buffer)


def _scaled(reader: Reader, scale_name: str, scale: str) -> bool:
    """Whether `scale_name` is the scale of an FP8 weight beside it (folded into that weight)."""
    weight = scale_name[: -len(scale)] + "weight"
    return weight in reader.tensors and reader.tensors[weight].dtype == "F8_E4M3"


def expert_rows(experts: Iterable[int]) -> list[int]:
    return sorted({int(e) for e in experts})


def _runs(index: Sequence[int]) -> Iterable[tuple[int, tuple[int, int]]]:
    """(position in the output, (first row, count)) for each run of consecutive rows."""
    start = 0
    while start < len(index):
        end = start + 1
        while end < len(index) and index[end] == index[end - 1] + 1:
            end += 1
        yield start, (index[start], end - start)
        start = end


def _fp8_scheme(config: dict):
    if not config.get("quantization_config"):
        return None
    from remap.layouts.hf_config import read_quantization_config
    from remap.layouts.hf_fp8 import fp8_scheme

    return fp8_scheme(read_quantization_config(config["quantization_config"]))

"""Whole tensors from pieces in several files: a model-parallel checkpoint read as one.

Which piece of which tensor sits where is not io's to know: the caller passes, per whole tensor,
its pieces in order, each with the file that holds it and the dim it was cut along (None for a
whole copy), as the layout that wrote the files says (`Layout.assemble`). The result is a
Checkpoint whose `tensors` are the whole ones; each read puts one tensor together and holds only
it: cut pieces are concatenated along their dim, copies are read and checked equal (a rank that
differs is an error, never silently ignored), and a tensor in one file only (a routed expert) is
that file's span, so it can still move as raw bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from remap.errors import RemapError
from remap.io.checkpoint import Checkpoint
from remap.io.headers import TensorInfo


@dataclass(frozen=True)
class Pieces:
    whole: TensorInfo  # start None: no single span of a file holds it
    parts: tuple[TensorInfo, ...]
    dim: int | None  # None: every part is a whole copy


def assembled(checkpoint: Checkpoint, placements: Mapping[str, Sequence[Any]]) -> Checkpoint:
    """`checkpoint` (files whose names repeat) as whole tensors. `placements`: tensor name -> its
    pieces in order, each with `file` (a key of checkpoint.files) and `dim`."""
    tensors: dict[str, TensorInfo] = {}
    pieces: dict[str, Pieces] = {}
    for name, places in placements.items():
        parts = tuple(checkpoint.files[p.file][name] for p in places)
        dim = places[0].dim
        if len(parts) == 1:
            tensors[name] = parts[0]
            continue
        shape = list(parts[0].shape)
        if dim is not None:
            shape[dim] = sum(p.shape[dim] for p in parts)
        whole = TensorInfo(name, parts[0].dtype, tuple(shape), parts[0].file)
        tensors[name], pieces[name] = whole, Pieces(whole, parts, dim)
    held = {name for files in checkpoint.files.values() for name in files}
    if held != set(tensors):
        raise RemapError(f"{len(held ^ set(tensors))} tensors are not placed", file=str(checkpoint.root),
                         tensor=sorted(held ^ set(tensors))[0], expected="every tensor of every file placed")
    return AssembledCheckpoint(checkpoint, tensors, pieces)


class AssembledCheckpoint(Checkpoint):
    """A Checkpoint whose files hold pieces; `tensors`, `read`, `load` and `read_bytes` give whole
    tensors (a per-file TensorInfo from `files` still reads that piece alone)."""

    def __init__(self, base: Checkpoint, tensors: dict[str, TensorInfo], pieces: dict[str, Pieces]):
        super().__init__(base.source, base.root, base.files, config=base.config, extra_files=base.extra_files,
                         revision=base.revision, ranks=base.ranks)
        self._whole, self._pieces = tensors, pieces

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self._whole

    def read(self, tensor: str | TensorInfo) -> np.ndarray:
        pieces = self._pieces_of(tensor)
        return super().read(tensor) if pieces is None else self._assemble(pieces, super().read)

    def load(self, tensor: str | TensorInfo) -> np.ndarray:
        pieces = self._pieces_of(tensor)
        return super().load(tensor) if pieces is None else self._assemble(pieces, super().load)

    def read_bytes(self, tensor: str | TensorInfo) -> memoryview:
        pieces = self._pieces_of(tensor)
        if pieces is None:
            return super().read_bytes(tensor)
        array = np.ascontiguousarray(self._assemble(pieces, super().read))
        return memoryview(array.reshape(-1).view(np.uint8))

    def _pieces_of(self, tensor: str | TensorInfo) -> Pieces | None:
        info = self._info(tensor)
        pieces = self._pieces.get(info.name)
        return pieces if pieces is not None and info is pieces.whole else None

    def _assemble(self, pieces: Pieces, read: Callable[[TensorInfo], np.ndarray]) -> np.ndarray:
        """One whole tensor, reading its pieces one at a time."""
        if pieces.dim is None:
            first = read(pieces.parts[0])
            for part in pieces.parts[1:]:
                if not _same_bytes(first, read(part)):
                    raise RemapError(f"its copy in {part.file.name} differs from the one in {pieces.parts[0].file.name}",
                                     file=str(self.root), tensor=part.name,
                                     expected="the same bytes in every file (a tensor replicated on every rank)")
            return first
        out, start = None, 0
        for part in pieces.parts:
            array = read(part)
            if out is None:
                out = np.empty(pieces.whole.shape, array.dtype)
            index = (slice(None),) * pieces.dim + (slice(start, start + array.shape[pieces.dim]),)
            out[index] = array
            start += array.shape[pieces.dim]
        return out


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise, so a NaN equals itself and -0.0 differs from 0.0."""
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(
        np.ascontiguousarray(a).reshape(-1).view(np.uint8), np.ascontiguousarray(b).reshape(-1).view(np.uint8))

"""Which tensors go in which output file, and in what order: the shard plan and its index.

Knows names, dtypes and shapes only, never bytes: ShardWriter (writer.py) writes what this plans.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

from remap.errors import RemapError
from remap.io.checkpoint import INDEX_NAME
from remap.dtypes import DTYPES, byte_size

_ALIGNMENT_RANK = {name: rank for rank, name in enumerate(DTYPES)}


# (name, safetensors dtype, shape): what TensorEntry holds, or any tuple of the same
EntryLike = tuple[str, str, tuple[int, ...]]


class TensorEntry(NamedTuple):
    """One tensor a file will hold."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return byte_size(self.dtype, self.shape)


@dataclass(frozen=True)
class ShardPlan:
    """One output file and the tensors it holds. Build these directly for names plan_shards
    does not make (DeepSeek's `model{r}-mp{N}.safetensors`)."""

    file: str
    entries: tuple[TensorEntry, ...]

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries)


SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # huggingface_hub's (decimal, as save_pretrained)


def shard_size(value: int | str) -> int:
    """Bytes, from a number of bytes (int or digits) or a number and a unit: '5GB', '1.5GB', '500mb'."""
    text = str(value).strip()
    unit = text[-2:].upper() if text[-2:].upper() in SIZE_UNITS else ""
    try:
        size = float(text[:len(text) - len(unit)]) * SIZE_UNITS.get(unit, 1)
    except ValueError:
        size = math.nan
    if isinstance(value, bool) or not (math.isfinite(size) and size >= 1):
        raise RemapError(f"bad shard size {value!r}", expected="a positive number of bytes, or of KB, MB, GB or TB: a size like '5GB'")
    return int(size)


def plan_shards(entries: Iterable[EntryLike], max_shard_size: int | str = "5GB") -> list[ShardPlan]:
    """Split tensors into files as transformers' save_pretrained does, with huggingface_hub's own
    splitter: shards filled in the given order; a tensor bigger than `max_shard_size` gets a shard
    of its own, placed before the one being filled. One file is `model.safetensors`, several are
    `model-00001-of-0000N.safetensors`."""
    by_name: dict[str, TensorEntry] = {}
    for entry in map(checked_entry, entries):
        if entry.name in by_name:
            raise RemapError("two output tensors have this name", tensor=entry.name)
        by_name[entry.name] = entry
    from huggingface_hub.serialization import split_state_dict_into_shards_factory  # (only where files are cut: ~10 ms)

    split = split_state_dict_into_shards_factory(
        by_name,
        get_storage_size=lambda entry: entry.nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=shard_size(max_shard_size),
    )
    return [
        ShardPlan(file, tuple(by_name[name] for name in names)) for file, names in split.filename_to_tensors.items()
    ]


def checked_entry(entry: EntryLike) -> TensorEntry:
    """A TensorEntry of (name, dtype, shape), refusing a dtype safetensors lacks or a negative size."""
    name, dtype, shape = entry
    shape = tuple(int(size) for size in shape)
    if dtype not in DTYPES or min(shape, default=0) < 0:
        raise RemapError(
            f"no tensor has dtype {dtype!r} and shape {list(shape)}",
            tensor=name,
            expected="a safetensors dtype (" + ", ".join(DTYPES) + ") and non-negative sizes",
        )
    return TensorEntry(name, dtype, shape)


def file_order(entries: Iterable[TensorEntry]) -> list[TensorEntry]:
    """The order tensors take in a safetensors file: by descending dtype alignment, then name."""
    return sorted(entries, key=lambda entry: (-_ALIGNMENT_RANK[entry.dtype], entry.name))


def write_index(
    directory: str | os.PathLike, shards: Iterable[ShardPlan], metadata: dict[str, object] | None = None
) -> Path:
    """model.safetensors.index.json as transformers writes it (sorted keys, indent 2); extra
    `metadata` (e.g. total_parameters) goes beside total_size."""
    shards = list(shards)
    index = {
        "metadata": {"total_size": sum(shard.nbytes for shard in shards), **(metadata or {})},
        "weight_map": {entry.name: shard.file for shard in shards for entry in shard.entries},
    }
    path = Path(directory) / INDEX_NAME
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path

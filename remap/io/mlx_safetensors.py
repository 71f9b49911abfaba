"""Files as mlx writes them (`mx.save_safetensors`, what mlx_lm.convert saves through), so an mlx
output's checksums match mlx_lm.convert's for the same tensors.

mlx's writer (mlx/io/safetensors.cpp) differs from the safetensors crate's in three ways: the
header is one JSON object with every key sorted (nlohmann's std::map, `__metadata__` among them)
and each entry's fields sorted too (data_offsets, dtype, shape); the header is not padded; and
the tensors' bytes follow the iteration order of the std::unordered_map the Python dict became,
which depends on the standard library mlx was built with. That order is not computed here: mlx
itself is asked, by saving one-byte stand-ins under the same names in the same insertion order.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from remap.errors import RemapError
from remap.io.checkpoint import INDEX_NAME


def data_order(names: Sequence[str]) -> list[str]:
    """The order mx.save_safetensors writes the bytes of tensors inserted in `names` order; `names`
    as given where mlx is not installed (the files then differ from mlx's in order only)."""
    try:
        import mlx.core as mx
    except ImportError:
        return list(names)
    one_byte = mx.zeros((1,), dtype=mx.uint8)
    with tempfile.TemporaryDirectory(prefix="remap-order-") as tmp:
        path = os.path.join(tmp, "order.safetensors")
        mx.save_safetensors(path, {name: one_byte for name in names})
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda name: header[name]["data_offsets"][0])


def header(entries: Iterable, metadata: dict[str, str] | None) -> tuple[bytes, dict[str, tuple[int, int]], int]:
    """(header with its length prefix, each tensor's absolute byte span, file size) for tensors
    whose bytes follow in the given order, as mx.save_safetensors lays them out."""
    spans: dict[str, tuple[int, int]] = {}
    fields: dict[str, object] = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for entry in entries:
        if entry.name in spans or entry.name == "__metadata__":
            raise RemapError("a file cannot hold two tensors of this name", tensor=entry.name)
        spans[entry.name] = (offset, offset + entry.nbytes)
        fields[entry.name] = {"data_offsets": [offset, offset + entry.nbytes], "dtype": entry.dtype,
                              "shape": list(entry.shape)}
        offset += entry.nbytes
    text = json.dumps(fields, separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode("utf-8")
    prefix = len(text).to_bytes(8, "little") + text
    return prefix, {n: (len(prefix) + b, len(prefix) + e) for n, (b, e) in spans.items()}, len(prefix) + offset


def write_index(directory: str | os.PathLike, shards: Iterable, total_parameters: int | None) -> Path:
    """model.safetensors.index.json as mlx_lm's save_model writes it (indent 4, total_size then
    total_parameters, weight_map by name, no newline at the end), even for one file."""
    shards = list(shards)
    metadata: dict[str, int] = {"total_size": sum(shard.nbytes for shard in shards)}
    if total_parameters is not None:
        metadata["total_parameters"] = total_parameters
    weight_map = {entry.name: shard.file for shard in shards for entry in shard.entries}
    index = {"metadata": metadata, "weight_map": {name: weight_map[name] for name in sorted(weight_map)}}
    path = Path(directory) / INDEX_NAME
    path.write_text(json.dumps(index, indent=4), encoding="utf-8")
    return path

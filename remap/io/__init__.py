"""Checkpoint I/O: safetensors headers, opening any checkpoint, the streaming sharded writer.

Knows files and bytes only, never specs or layouts.
"""

from importlib import import_module
from typing import Any

# Where each name lives: imported on first use (PEP 562), so reading a header does not load the
# writer's numpy or the sharder's huggingface_hub.
_HOMES = {
    "Checkpoint": "remap.io.checkpoint",
    "open_checkpoint": "remap.io.checkpoint",
    "DTYPES": "remap.dtypes",
    "DType": "remap.dtypes",
    "safetensors_dtype": "remap.dtypes",
    "TensorInfo": "remap.io.headers",
    "read_header": "remap.io.headers",
    "atomic_output": "remap.io.atomic",
    "sha256_file": "remap.io.hashing",
    "ShardPlan": "remap.io.shards",
    "TensorEntry": "remap.io.shards",
    "plan_shards": "remap.io.shards",
    "write_index": "remap.io.shards",
    "ShardWriter": "remap.io.writer",
    "shard_is_complete": "remap.io.writer",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})

"""Checkpoint I/O: safetensors headers, opening any checkpoint, the streaming sharded writer.

Knows files and bytes only, never specs or layouts.
"""

from remap.io.checkpoint import Checkpoint, open_checkpoint
from remap.dtypes import DTYPES, DType, safetensors_dtype
from remap.io.headers import TensorInfo, read_header
from remap.io.atomic import atomic_output
from remap.io.hashing import sha256_file
from remap.io.shards import ShardPlan, TensorEntry, plan_shards, write_index
from remap.io.writer import ShardWriter, shard_is_complete

__all__ = [
    "DTYPES",
    "Checkpoint",
    "DType",
    "ShardPlan",
    "ShardWriter",
    "TensorEntry",
    "TensorInfo",
    "atomic_output",
    "open_checkpoint",
    "plan_shards",
    "read_header",
    "safetensors_dtype",
    "sha256_file",
    "shard_is_complete",
    "write_index",
]

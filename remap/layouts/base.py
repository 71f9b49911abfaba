"""What a layout is: for a model config, every tensor it expects.

A layout is data about a checkpoint format (hf, mlx, scratch, deepseek): given a normalised
config it names each tensor with its shape and dtype class. Planning, reports, detection and
the layout tests all read this one description.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

# dtype classes a layout may ask for. "float" means any floating dtype a runtime accepts for a
# weight (bf16, f16, f32); the others are exact.
FLOAT = "float"
FP8 = "float8_e4m3fn"
F32 = "float32"
U32 = "uint32"  # MLX packed quantized weights


@dataclass(frozen=True)
class Expected:
    """One tensor a layout expects: its name, shape and dtype class."""

    name: str
    shape: tuple[int, ...]
    dtype: str = FLOAT


class Layout(Protocol):
    name: str
    # Variants of the same layout that differ in tensor names or dtypes (e.g. mlx "kv_b_proj" vs
    # "embed_q"; hf "bf16" vs "fp8"); the first is the default.
    variants: tuple[str, ...]

    def read_config(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """config.json as this layout's reader sees it: defaults filled, keys normalised."""
        ...

    def expected(self, config: Mapping[str, Any], variant: str | None = None) -> dict[str, Expected]:
        """Every tensor this layout holds for `config` (already read_config'ed), by name."""
        ...

"""What a layout is: everything remap knows about one checkpoint format, in one place.

A layout (hf, mlx, scratch, deepseek, or one a user registers with `register_layout`) says, for a
model config, every tensor it expects with shape and dtype class; how its config.json reads and
is written; its variants; how a conversion's outputs are cut into files and tagged (and, for
files that cut tensors into pieces, how the pieces put back together); which
runtime runs it for parity (or why none does); where parity finds its embedding, layers and
head; and what a stage writing it records in its config (quantization). Planning, reports,
detection, execution and parity all ask the layout: nothing outside `remap/layouts/` is keyed by
a layout's name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from remap.errors import RemapError

if TYPE_CHECKING:  # only for annotations: layouts never import the upper floors at load time
    import numpy as np

    from remap.io.checkpoint import Checkpoint
    from remap.io.shards import ShardPlan

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


@dataclass(frozen=True)
class Sections:
    """Where a layout keeps what parity compares: the embedding, decoder layer i (a prefix with
    `{i}`), and the final norm with the output head. Tensor-name prefixes."""

    embedding: tuple[str, ...]
    layer: str
    head: tuple[str, ...]

    def prefixes(self, section: str) -> tuple[str, ...]:
        """The prefixes of "embedding", "layer 3" or "head"."""
        if section in ("embedding", "head"):
            return getattr(self, section)
        match = re.fullmatch(r"layer (\d+)", section)
        if match is None:
            raise RemapError(f"no section {section!r}", expected="embedding, layer N or head")
        return (self.layer.format(i=int(match.group(1))),)


@dataclass(frozen=True)
class Placement:
    """Where one output tensor's bytes go: a file, and for model parallelism its rank's slice."""

    file: str
    dim: int | None = None  # None: the whole tensor
    rank: int = 0
    ranks: int = 1

    def cut(self, array: np.ndarray) -> np.ndarray:
        import numpy as np  # only when writing: detection and planning need no numpy

        return array if self.dim is None else np.split(array, self.ranks, axis=self.dim)[self.rank]


@dataclass(frozen=True)
class FilePlan:
    """A conversion's output files: what each holds, where each tensor goes, and whether an index
    (model.safetensors.index.json) names them."""

    shards: list["ShardPlan"]
    placements: dict[str, list[Placement]]
    index: bool = False
    style: str = "safetensors"  # how each file is laid out (remap/io/writer.py); "mlx": as mlx writes
    parameters: int | None = None  # the index's total_parameters, where the runtime writes one


class Layout:
    """A checkpoint format. Subclass it, fill in `name`, `variants`, `read_config` and `expected`
    (the rest has defaults that fit transformers-style sharded safetensors), then
    `remap.layouts.register_layout(MyLayout())`."""

    name: str = ""
    # Variants of the same layout that differ in tensor names or dtypes (e.g. mlx "kv_b_proj" vs
    # "embed_q"; hf "bf16" vs "fp8"); the first is the default.
    variants: tuple[str, ...] = ("default",)
    # The `format` its runtime writes into safetensors metadata (transformers: pt, mlx-lm: mlx).
    format: str = "pt"
    # Where parity finds the embedding, each layer and the head; None: parity cannot localise.
    sections: Sections | None = None
    # Why no runtime runs this layout for parity, where none does (see `runtime`).
    no_runtime: str = "no runtime is declared for it"
    # The hub's front matter for a model card of a checkpoint in this layout (its library's keys).
    card_metadata: Mapping[str, Any] = {}

    # -- what the layout holds -----------------------------------------------------------------
    def read_config(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """config.json as this layout's reader sees it: defaults filled, keys normalised."""
        raise NotImplementedError

    def expected(self, config: Mapping[str, Any], variant: str | None = None) -> dict[str, Expected]:
        """Every tensor this layout holds for `config` (already read_config'ed), by name."""
        raise NotImplementedError

    def shapes(self, config: Mapping[str, Any], variant: str | None = None) -> dict[str, tuple[int, ...]]:
        """name -> shape of every tensor `expected` holds, in its order: all detection compares.
        Override it where that is much cheaper to build than `expected`."""
        return {name: want.shape for name, want in self.expected(config, variant).items()}

    def count(self, config: Mapping[str, Any], variant: str | None = None) -> int | None:
        """How many tensors `expected` holds, where the layout tells without building them:
        detection skips a variant of another count when it looks for the exact one. None (the
        default): it cannot tell."""
        return None

    # Config keys `infer_config` cannot read off shapes and fills with a default (say so to users).
    assumed: tuple[str, ...] = ()

    def infer_config(self, tensors: Mapping[str, tuple[Sequence[int], str]]) -> dict[str, Any] | None:
        """A raw config read off the tensors' names and shapes, for a checkpoint saved without
        config.json; None where this layout cannot (the default) or the tensors are not its."""
        return None

    def variant(self, variant: str | None) -> str:
        """`variant`, or the default, checked."""
        variant = variant or self.variants[0]
        if variant not in self.variants:
            raise RemapError(f"unknown variant {variant!r}", rule=f"layout {self.name}", expected=", ".join(self.variants))
        return variant

    # -- what a conversion into it writes -------------------------------------------------------
    def write_config(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """The config.json to write, from a translated one: what this layout's reader expects."""
        return dict(raw)

    def record(self, config: dict[str, Any], steps: Sequence[Any]) -> None:
        """What a stage writing this layout records in its config about how it made the tensors
        (e.g. per-module quantization); `steps` are the stage's plan steps. Default: nothing."""

    def keeps_dtype(self, name: str) -> bool:
        """True where `--dtype` must leave a floating tensor as it is (a float32 scale)."""
        return False

    def plan_files(self, outputs: Sequence[Any], max_shard_size: int | str, names: Mapping[str, Any],
                   config: Mapping[str, Any]) -> FilePlan:
        """`files`, for a layout whose file scheme also needs the config.json written beside them
        (mlx: the order of mlx-lm's model parameters). What every command calls."""
        return self.files(outputs, max_shard_size, names)

    def check_files(self, outputs: Sequence[Any], max_shard_size: int | str, names: Mapping[str, Any]) -> None:
        """Raise what `files` would raise for these outputs (a report fails where convert would),
        cutting them only where the cut can refuse. Default: transformers' cut refuses only a bad
        --max-shard-size (a plan's outputs are valid entries, each name once), so nothing is cut
        and its splitter (huggingface_hub's, ~10 ms to import) is not loaded."""
        from remap.io.shards import shard_size

        shard_size(max_shard_size)

    def files(self, outputs: Sequence[Any], max_shard_size: int | str, names: Mapping[str, Any]) -> FilePlan:
        """How outputs (name, shape, dtype) are cut into files. Default: transformers' scheme,
        shards filled in order (model-0000k-of-0000n.safetensors) with an index when several."""
        from remap.io import plan_shards

        shards = plan_shards([(o.name, o.dtype, o.shape) for o in outputs], max_shard_size)
        placements = {e.name: [Placement(s.file)] for s in shards for e in s.entries}
        return FilePlan(shards, placements, index=len(shards) > 1)

    # -- reading its files back -----------------------------------------------------------------
    def assemble(self, files: Mapping[str, Mapping[str, tuple[Sequence[int], str]]]) -> dict[str, list[Placement]] | None:
        """Where each whole tensor's pieces are, for files (file -> tensor -> (shape, dtype)) whose
        names repeat across files: `files` cut backwards, one Placement per piece in rank order.
        None (the default) where these are not files this layout cuts so: each file then holds
        whole tensors, and a name in two files is an error."""
        return None

    def quantization(self, quantize: int | str, group_size: int) -> tuple[str, dict[str, Any], str]:
        """`--quantize` for this target: (the spec of the stage to append, its params, a label
        for the composed spec's name)."""
        raise RemapError(f"--quantize: remap does not quantize the {self.name} layout",
                         expected="a spec whose target layout quantizes (mlx)")

    def usage(self, path: str) -> tuple[str, str] | None:
        """(language, code) that loads a checkpoint of this layout at `path`, for its model card;
        None where no library loads it."""
        return None

    # -- parity ---------------------------------------------------------------------------------
    def runtime(self, checkpoint: "Checkpoint", dtype: str) -> Any:
        """The runtime that runs this layout with `checkpoint` loaded, computing in `dtype`
        (a `remap.parity.runtimes.Runtime`)."""
        raise RemapError(f"no runtime runs the '{self.name}' layout: {self.no_runtime}", file=checkpoint.source)


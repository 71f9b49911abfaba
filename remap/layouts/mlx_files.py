"""The mlx layout's files as mlx_lm.convert writes them, so their sha256 match: tensors in the order
mlx-lm's own model class holds its parameters (`tree_flatten(model.parameters())`, the order it
saves them in), cut into shards as its `make_shards` cuts them, each file laid out by mlx itself
(remap/io/mlx_safetensors.py), and an index beside them even for one file.

The parameter order is read off mlx-lm's model class built for the config, lazily (mlx allocates
nothing until evaluated, so the full DeepSeek-V3 costs no memory); quantized modules are made
quantized as its loader makes them. Without mlx-lm (or for a model it has no class for), the
plan's order is kept: the same tensors, in files that are not byte-identical to mlx_lm's.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any, Mapping, Sequence

from remap.io.mlx_safetensors import data_order
from remap.io.shards import ShardPlan, checked_entry, shard_size
from remap.layouts.base import FilePlan, Placement

# mlx_lm.utils.make_shards counts its limit in binary units (max_file_size_gb << 30).
BINARY_UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def shard_bytes(value: int | str) -> int:
    """--max-shard-size for an mlx target: 5GB is mlx_lm's 5 << 30 bytes; a bare number is bytes."""
    size = shard_size(value)  # checks the text
    text = str(value).strip()
    unit = text[-2:].upper()
    return int(float(text[:-2]) * BINARY_UNITS[unit]) if unit in BINARY_UNITS else size


def plan_files(outputs: Sequence[Any], max_shard_size: int | str, config: Mapping[str, Any]) -> FilePlan:
    entries = [checked_entry((o.name, o.dtype, o.shape)) for o in outputs]
    order, parameters = model_order(config, {e.name for e in entries})
    rank = {name: k for k, name in enumerate(order)}
    entries.sort(key=lambda e: rank.get(e.name, len(rank)))  # stable: names mlx-lm lacks keep the plan's order
    groups = make_shards(entries, shard_bytes(max_shard_size))
    names = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    shards = []
    for file, group in zip(names, groups):
        by_name = {e.name: e for e in group}
        shards.append(ShardPlan(file, tuple(by_name[n] for n in data_order([e.name for e in group]))))
    placements = {e.name: [Placement(s.file)] for s in shards for e in s.entries}
    return FilePlan(shards, placements, index=True, style="mlx", parameters=parameters)


def make_shards(entries: list, limit: int) -> list[list]:
    """mlx_lm.utils.make_shards on sizes: a new shard when the next tensor would pass the limit."""
    shards: list[list] = []
    size = 0
    for entry in entries:
        if not shards or size + entry.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def model_order(config: Mapping[str, Any], names: set[str]) -> tuple[list[str], int | None]:
    """(parameter names in mlx-lm's order, its total_parameters) for the model `config` describes,
    quantized where `names` hold scales; ([], None) where mlx-lm cannot build it."""
    try:
        import mlx.nn as nn
        from mlx.utils import tree_flatten

        plain = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
        module = _model_module(str(plain.get("model_type")))
        model = module.Model(module.ModelArgs.from_dict(plain))
        quantized = {n.removesuffix(".scales") for n in names if n.endswith(".scales")}
        block = config.get("quantization") if isinstance(config.get("quantization"), dict) else {}
        if quantized:
            def predicate(path, layer):
                if path not in quantized or not hasattr(layer, "to_quantized"):
                    return False
                return block.get(path) if isinstance(block.get(path), dict) else True

            nn.quantize(model, group_size=block.get("group_size", 64), bits=block.get("bits", 4),
                        mode=block.get("mode", "affine"), class_predicate=predicate)
        return [k for k, _ in tree_flatten(model.parameters())], _total_parameters(model)
    except Exception:  # no mlx-lm, or a model type or config it does not build: keep the plan's order
        return [], None


# mlx_lm.utils.MODEL_REMAPPING, for the model types remap writes
REMAPPED = {"kimi_k2": "deepseek_v3"}


def _model_module(model_type: str) -> ModuleType:
    """mlx-lm's module for `model_type`, without running mlx_lm/__init__.py where it is not loaded
    yet: that imports transformers, seconds of CPU for every conversion. The model modules need
    only mlx; the stand-in package is taken out of sys.modules again, so a later `import mlx_lm`
    is the real one."""
    name = f"mlx_lm.models.{REMAPPED.get(model_type, model_type)}"
    if "mlx_lm" in sys.modules:
        return importlib.import_module(name)
    found = importlib.util.find_spec("mlx_lm")
    if found is None or not found.submodule_search_locations:
        raise ImportError("mlx_lm")
    before = set(sys.modules)
    package = ModuleType("mlx_lm")
    package.__path__ = list(found.submodule_search_locations)
    sys.modules["mlx_lm"] = package
    try:
        return importlib.import_module(name)
    finally:
        for loaded in set(sys.modules) - before:
            if loaded == "mlx_lm" or loaded.startswith("mlx_lm."):
                del sys.modules[loaded]


def _total_parameters(model) -> int:
    """mlx_lm.utils.get_total_parameters: a quantized module counts its weights unpacked."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    def count(module) -> int:
        if hasattr(module, "bits"):
            return (module.bias.size if hasattr(module, "bias") else 0) + module.weight.size * 32 // module.bits
        return sum(v.size for _, v in tree_flatten(module.parameters()))

    leaves = tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module))
    return sum(count(module) for _, module in leaves)

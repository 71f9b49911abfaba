"""The `deepseek` layout: DeepSeek's own inference code and the files its convert.py writes.

Provenance: github.com/deepseek-ai/DeepSeek-V3 at commit 9b4e9788e4a3a731f7567338ed15d3ec549ce03b
(2025-08-27), inference/model.py, inference/convert.py and inference/configs/*.json.

Names: `embed.weight`; per layer `layers.{i}.attn_norm.weight` and `ffn_norm.weight`; attention
`attn.wq` (without q LoRA) or `attn.wq_a`, `attn.q_norm`, `attn.wq_b`, then `attn.wkv_a`,
`attn.kv_norm`, `attn.wkv_b`, `attn.wo`; a dense layer's `ffn.w1/w2/w3` (gate/down/up); a MoE
layer's router `ffn.gate.weight` (+ `ffn.gate.bias`, V3's e_score_correction_bias),
`ffn.experts.{e}.w1/w2/w3` and `ffn.shared_experts.w1/w2/w3`; then `norm.weight`, `head.weight`.
convert.py drops the MTP layer; model.py has no attention or MLP biases and always its own head.

DeepSeek-V3.2: github.com/deepseek-ai/DeepSeek-V3.2-Exp at commit
3b99a5350d260b7c2a357e82362305509e2d0724 (2025-10-02), inference/model.py and convert.py. Its
MLA holds an `attn.indexer` with `wq_b` and `wk` (fp8 Linears with a `scale` in the fp8 model),
`k_norm` (a LayerNorm: weight and bias) and `weights_proj` (built in the default dtype: never
fp8); convert.py keeps these names and replicates them on every rank (the indexer's `wq_b` is not
sliced, unlike the attention's). Its ModelArgs JSON names the indexer sizes (index_n_heads,
index_head_dim, index_topk), which V3's ModelArgs would refuse: their presence means V3.2.

model.py creates the router bias only when dim == 7168, a shortcut that equals "the model routes
like V3" for every release; this layout keys the bias on V3 routing (topk_method noaux_tc), so a
small V3 carries it as convert.py writes it.

Variants:
  bf16  model.py with dtype "bf16" (also what fp8_cast_bf16.py output converts to).
  fp8   model.py with dtype "fp8": every Linear but `head` (and V3.2's `weights_proj`) in
        float8_e4m3fn with a float32 `{module}.scale` per 128 x 128 block (model.py's
        block_size); convert.py renames the HF weight_scale_inv to it.

Model parallelism: convert.py writes `model{r}-mp{N}.safetensors`, one per rank. `split_of(name)`
says how a tensor spreads: sliced on dim 0 (embed, wq, wq_b, wkv_b, w1, w3, head), on dim 1
(wo, w2), whole on the rank that owns a routed expert (rank r holds experts r*E/N .. (r+1)*E/N - 1,
keeping their global index), or replicated. A scale splits like its weight. `expected` is the
single mp=1 file; `shards(config, mp)` every rank's file. `assemble` reads such files back: the
same cut run on the tensors they put together into (sliced dims times N) must give exactly the
files, and says where each tensor's pieces are (checkpoints read them as whole tensors).

Config: DeepSeek's ModelArgs JSON (inference/configs: dim, n_layers, ...) or an HF config.json
(what convert.py's source carries), both read into the HF key names of remap.layouts.hf.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from remap.errors import RemapError
from remap.layouts.base import F32, FLOAT, Expected, FilePlan, Placement, Sections
from remap.layouts.hf import (
    CollectedLayout,
    ExpectedTensors,
    config_error,
    indexer,
    normalised_config,
    read_transformers_config,
)

BLOCK = (128, 128)  # model.py's block_size
# The HF model types this layout reads a config.json of. Not mistral4: model.py's softmax router
# neither renormalises its top-k nor ranks groups by their top-2 sum, and has no llama-4 scaling.
MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "deepseek_v32")

# inference/model.py ModelArgs: its key -> (HF key, default), for the keys that shape tensors or routing.
_MODEL_ARGS: dict[str, tuple[str, Any]] = {
    "vocab_size": ("vocab_size", 102400),
    "dim": ("hidden_size", 2048),
    "inter_dim": ("intermediate_size", 10944),
    "moe_inter_dim": ("moe_intermediate_size", 1408),
    "n_layers": ("num_hidden_layers", 27),
    "n_dense_layers": ("first_k_dense_replace", 1),
    "n_heads": ("num_attention_heads", 16),
    "n_routed_experts": ("n_routed_experts", 64),
    "n_shared_experts": ("n_shared_experts", 2),
    "n_activated_experts": ("num_experts_per_tok", 6),
    "n_expert_groups": ("n_group", 1),
    "n_limited_groups": ("topk_group", 1),
    "score_func": ("scoring_func", "softmax"),
    "route_scale": ("routed_scaling_factor", 1.0),
    "q_lora_rank": ("q_lora_rank", 0),
    "kv_lora_rank": ("kv_lora_rank", 512),
    "qk_nope_head_dim": ("qk_nope_head_dim", 128),
    "qk_rope_head_dim": ("qk_rope_head_dim", 64),
    "v_head_dim": ("v_head_dim", 128),
}
# DeepSeek-V3.2-Exp's ModelArgs adds the indexer's sizes (its defaults).
_INDEXER_ARGS = {"index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}


def _read_model_args(raw: Mapping[str, Any]) -> dict[str, Any]:
    values = {hf_key: raw.get(key, default) for key, (hf_key, default) in _MODEL_ARGS.items()}
    for key, hf_key in (("n_expert_groups", "n_group"), ("n_routed_experts", "n_routed_experts"),
                        ("n_shared_experts", "n_shared_experts")):  # model.py needs them as numbers
        if isinstance(values[hf_key], bool) or not isinstance(values[hf_key], int):
            raise config_error(f"{key} is {values[hf_key]!r}", key, "an integer >= 0")
    v3 = values["scoring_func"] == "sigmoid"  # sigmoid routing with a bias arrived with V3
    v32 = any(key in raw for key in _INDEXER_ARGS)
    grouped = values["n_group"] > 1
    values.update(
        model_type="deepseek_v32" if v32 else "deepseek_v3" if v3 else "deepseek_v2",
        **{key: raw.get(key, default) if v32 else None for key, default in _INDEXER_ARGS.items()},
        q_lora_rank=values["q_lora_rank"] or None,  # model.py: 0 means no q LoRA
        moe_layer_freq=1,
        topk_method="noaux_tc" if v3 else "group_limited_greedy" if grouped else "greedy",
        norm_topk_prob=v3,  # model.py renormalises the top-k weights only for sigmoid scores
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        num_nextn_predict_layers=0,
        quantization_config=(
            {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK)}
            if raw.get("dtype") == "fp8"
            else None
        ),
    )
    return normalised_config(values)


def read_deepseek_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """DeepSeek's ModelArgs JSON, or an HF config.json, as model.py would build the model."""
    if "model_type" not in raw and "dim" in raw:
        return _read_model_args(raw)
    if raw.get("model_type") not in MODEL_TYPES:
        expected = f"{' or '.join(MODEL_TYPES)}, or DeepSeek's ModelArgs JSON (dim, n_layers, ...)"
        raise config_error(f"model_type is {raw.get('model_type')!r}", "model_type", expected)
    config = read_transformers_config(raw)
    for key in ("attention_bias", "mlp_bias"):
        if config[key]:
            raise config_error(f"{key} is true", key, "false: DeepSeek's model.py has no biases")
    # model.py always holds its own head; convert.py drops the MTP layer.
    return {**config, "tie_word_embeddings": False, "num_nextn_predict_layers": 0}


def _attention(t: ExpectedTensors, p: str, c: Mapping[str, Any]) -> None:
    hidden, heads, rank = c["hidden_size"], c["num_attention_heads"], c["kv_lora_rank"]
    qk_head = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    if c["q_lora_rank"] is None:
        t.linear(f"{p}.wq", heads * qk_head, hidden)
    else:
        t.linear(f"{p}.wq_a", c["q_lora_rank"], hidden)
        t.add(f"{p}.q_norm.weight", (c["q_lora_rank"],))
        t.linear(f"{p}.wq_b", heads * qk_head, c["q_lora_rank"])
    t.linear(f"{p}.wkv_a", rank + c["qk_rope_head_dim"], hidden)
    t.add(f"{p}.kv_norm.weight", (rank,))
    t.linear(f"{p}.wkv_b", heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), rank)
    t.linear(f"{p}.wo", hidden, heads * c["v_head_dim"])
    if c["index_n_heads"] is not None:
        indexer(t, f"{p}.indexer", c)  # model.py's Indexer uses transformers' names


def _mlp(t: ExpectedTensors, p: str, hidden: int, width: int) -> None:
    t.linear(f"{p}.w1", width, hidden)
    t.linear(f"{p}.w2", hidden, width)
    t.linear(f"{p}.w3", width, hidden)


def _block(t: ExpectedTensors, i: int, c: Mapping[str, Any]) -> None:
    p, hidden = f"layers.{i}", c["hidden_size"]
    t.add(f"{p}.attn_norm.weight", (hidden,))
    t.add(f"{p}.ffn_norm.weight", (hidden,))
    _attention(t, f"{p}.attn", c)
    if i < c["first_k_dense_replace"]:
        _mlp(t, f"{p}.ffn", hidden, c["intermediate_size"])
        return
    experts, width = c["n_routed_experts"], c["moe_intermediate_size"]
    t.add(f"{p}.ffn.gate.weight", (experts, hidden))
    if c["topk_method"] == "noaux_tc":
        # convert.py copies the file's dtype: float32 in the FP8 releases, any float (bf16 from a
        # bf16 save_pretrained) otherwise; model.py loads either into its float32 parameter
        t.add(f"{p}.ffn.gate.bias", (experts,), F32 if t.scheme else FLOAT)
    t.experts(f"{p}.ffn.experts", experts, hidden, width, mlp=_mlp)
    _mlp(t, f"{p}.ffn.shared_experts", hidden, width * c["n_shared_experts"])


@dataclass(frozen=True)
class Split:
    """How convert.py spreads one tensor over model-parallel ranks."""

    dim: int | None = None  # sliced into equal parts along this dim
    expert: int | None = None  # a routed expert's tensor: whole, on the rank that owns the expert
    # neither: replicated on every rank


# convert.py's table: module -> the dim its tensors slice along (ColumnParallelLinear and
# ParallelEmbedding split rows, RowParallelLinear columns). Modules not named are replicated.
_SLICED = {"embed": 0, "wq": 0, "wq_b": 0, "wkv_b": 0, "w1": 0, "w3": 0, "head": 0, "wo": 1, "w2": 1}
_ROUTED_EXPERT = re.compile(r"\.ffn\.experts\.(\d+)\.")


def split_of(name: str) -> Split:
    if ".indexer." in name:  # V3.2's convert.py maps every indexer module with dim None
        return Split()
    if match := _ROUTED_EXPERT.search(name):
        return Split(expert=int(match.group(1)))
    return Split(dim=_SLICED.get(name.split(".")[-2]))


def shard_file(rank: int, mp: int) -> str:
    return f"model{rank}-mp{mp}.safetensors"


_SHARD_FILE = re.compile(r"model(\d+)-mp(\d+)\.safetensors")


def _world(files: Sequence[str]) -> int | None:
    """N where `files` are exactly model0-mpN ... model{N-1}-mpN (in any order: sorted as text,
    model10 comes before model2); else None."""
    match = _SHARD_FILE.fullmatch(files[0]) if files else None
    mp = int(match.group(2)) if match else 0
    return mp if mp and sorted(files) == sorted(shard_file(r, mp) for r in range(mp)) else None


def _rank_shape(name: str, shape: tuple[int, ...], dim: int, mp: int) -> tuple[int, ...]:
    if dim >= len(shape) or shape[dim] % mp:
        raise RemapError(f"dim {dim} of {list(shape)} does not split over {mp} ranks", tensor=name,
                         rule="model parallelism", expected=f"a multiple of {mp}")
    return shape[:dim] + (shape[dim] // mp,) + shape[dim + 1 :]


def model_parallel(tensors: Sequence[Any], mp: Any, experts: int) -> tuple[list[list], dict[str, list[Placement]]]:
    """convert.py's cut of the single-rank tensors (each with name, shape) over `mp` ranks: per
    rank, (tensor, its shape on that rank) in order; and each tensor's placements."""
    if isinstance(mp, bool) or not isinstance(mp, int) or mp < 1 or experts % mp:
        raise RemapError(f"--param mp={mp!r} does not divide {experts} routed experts",
                         rule="model parallelism", expected="mp >= 1 dividing n_routed_experts")
    ranks: list[list] = [[] for _ in range(mp)]
    placements: dict[str, list[Placement]] = {}
    for tensor in tensors:
        split = split_of(tensor.name)
        if split.expert is not None:
            owners = [split.expert // (experts // mp)]
        else:
            owners = list(range(mp))
        shape = tuple(tensor.shape) if split.dim is None else _rank_shape(tensor.name, tuple(tensor.shape), split.dim, mp)
        for r in owners:
            ranks[r].append((tensor, shape))
        placements[tensor.name] = [Placement(shard_file(r, mp), split.dim, r, mp) if split.dim is not None
                                   else Placement(shard_file(r, mp)) for r in owners]
    return ranks, placements


def _whole(files: Mapping[str, Mapping[str, tuple[Sequence[int], str]]], mp: int) -> dict[str, Expected]:
    """The single-rank tensors the ranks' files put together into (sliced dims times mp), by
    their first appearance; `_cut_back` checks every other rank agrees."""
    whole: dict[str, Expected] = {}
    for tensors in files.values():
        for name, (shape, dtype) in tensors.items():
            if name not in whole:
                dim, shape = split_of(name).dim, tuple(shape)
                if dim is not None and dim < len(shape):  # (too few dims: model_parallel says so)
                    shape = shape[:dim] + (shape[dim] * mp,) + shape[dim + 1 :]
                whole[name] = Expected(name, shape, dtype)
    return whole


def _cut_back(files: Mapping[str, Mapping[str, tuple[Sequence[int], str]]], mp: int) -> dict[str, list[Placement]]:
    """model_parallel read backwards: the whole tensors, cut again, must give exactly `files`."""
    whole = _whole(files, mp)
    experts = 1 + max((split.expert for split in map(split_of, whole) if split.expert is not None), default=-1)
    if experts % mp:
        raise RemapError(f"{experts} routed experts do not split over {mp} ranks", rule="model parallelism",
                         expected="whole experts, the same number on every rank")
    ranks, placements = model_parallel(list(whole.values()), mp, experts)
    for r, rank in enumerate(ranks):
        file, cut = shard_file(r, mp), {t.name: (shape, t.dtype) for t, shape in rank}
        held = {name: (tuple(shape), dtype) for name, (shape, dtype) in files[file].items()}
        for name in [*cut, *held]:
            if held.get(name) != cut.get(name):
                found = f"holds {held[name][1]} {list(held[name][0])}" if name in held else "does not hold it"
                want = f"{cut[name][1]} {list(cut[name][0])}" if name in cut else "nothing"
                raise RemapError(f"{file} {found}; the ranks' tensors, cut again, put {want} there", tensor=name,
                                 rule="model parallelism", expected="the files convert.py writes, cut as split_of says")
    return placements


class DeepseekLayout(CollectedLayout):
    name = "deepseek"
    variants = ("bf16", "fp8")
    format = "pt"
    sections = Sections(("embed.",), "layers.{i}.", ("norm.", "head."))
    no_runtime = ("DeepSeek's inference/model.py is no installable package and runs only on CUDA with its "
                  "own kernels; check the hf checkpoint it was converted from")

    def usage(self, path: str) -> tuple[str, str]:
        return "bash", ("# in DeepSeek-V3's inference/ directory: N the mp it was written with, the config of its size\n"
                        f"torchrun --nproc-per-node N generate.py --ckpt-path {path} --config configs/config_671B.json --interactive")

    def read_config(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return read_deepseek_config(raw)

    def keeps_dtype(self, name: str) -> bool:
        return name.endswith(".scale")  # the float32 FP8 block scales

    def _collect(self, kind: type[ExpectedTensors], config: Mapping[str, Any], variant: str | None) -> ExpectedTensors:
        """The tensors of the single-rank file, model0-mp1.safetensors, collected by `kind`."""
        c, variant = config, self.variant(variant)
        t = kind(BLOCK if variant == "fp8" else None, scale="scale")
        hidden, vocab = c["hidden_size"], c["vocab_size"]
        t.add("embed.weight", (vocab, hidden))
        for i in range(c["num_hidden_layers"]):
            _block(t, i, c)
        t.add("norm.weight", (hidden,))
        t.linear("head", vocab, hidden, quantized=False)
        return t

    def shards(self, config: Mapping[str, Any], mp: int, variant: str | None = None) -> dict[str, dict[str, Expected]]:
        """Every rank's file for model parallelism `mp`, as convert.py cuts the mp=1 tensors."""
        ranks, _ = model_parallel(list(self.expected(config, variant).values()), mp, config["n_routed_experts"])
        return {shard_file(r, mp): {t.name: Expected(t.name, shape, t.dtype) for t, shape in rank}
                for r, rank in enumerate(ranks)}

    def files(self, outputs: Sequence[Any], max_shard_size: int | str, names: Mapping[str, Any]) -> FilePlan:
        """convert.py's files, model{r}-mp{N}.safetensors, one per rank (`--param mp=N`)."""
        from remap.io import ShardPlan, TensorEntry

        ranks, placements = model_parallel(outputs, names.get("mp", 1), names["n_routed_experts"])
        shards = [ShardPlan(shard_file(r, len(ranks)), tuple(TensorEntry(o.name, o.dtype, shape) for o, shape in rank))
                  for r, rank in enumerate(ranks)]
        return FilePlan(shards, placements)

    def check_files(self, outputs: Sequence[Any], max_shard_size: int | str, names: Mapping[str, Any]) -> None:
        self.files(outputs, max_shard_size, names)  # --param mp must divide the experts and the sliced dims

    def assemble(self, files: Mapping[str, Mapping[str, tuple[Sequence[int], str]]]) -> dict[str, list[Placement]] | None:
        """convert.py's model{r}-mp{N} files (N > 1) read back: each single-rank tensor's pieces,
        as `files` places them; None for other files."""
        mp = _world(list(files))
        return _cut_back(files, mp) if mp is not None and mp > 1 else None


LAYOUT = DeepseekLayout()

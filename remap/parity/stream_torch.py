"""An `hf` checkpoint run one decoder layer at a time by transformers' own modules.

The model class is built on the meta device (no memory). For each step, the module of that step
(the embedding, decoder layer i, the final norm, the head) gets its tensors from the checkpoint
and runs as transformers runs it, then its tensors go back to meta. The decoder layer is called
with what transformers' model `forward` passes it: the causal mask from its own
`create_causal_mask`, the rotary embeddings of its own rotary module, the position ids.

The routed experts are loaded while the layer runs: transformers' router picks them, and the
experts module is handed only the experts it picked (stacked as transformers fuses them when it
loads: `gate_up_proj[e]` = gate_proj then up_proj, `down_proj[e]`), with the picks renumbered
into that smaller stack, so transformers' own expert code computes them in the same order.
"""

from __future__ import annotations

import functools

import numpy as np

from remap.errors import RemapError
from remap.io.checkpoint import Checkpoint
from remap.parity.stream_side import StreamedSide, expert_chunks, vocabulary_blocks
from remap.parity.weights import Reader


def transformers_streamed(checkpoint: Checkpoint, dtype: str) -> StreamedSide:
    import torch
    import transformers

    from remap.parity.runtimes import _causal_lm_class, _directory, _no_progress_bars, _transformers_config

    path = _directory(checkpoint, "transformers")
    with _no_progress_bars():
        config = _transformers_config(path)
        config.quantization_config = None  # FP8 weights are dequantized as they load (Reader.weight)
        model_class = _causal_lm_class(path, config)
        with torch.device("meta"):
            build = getattr(model_class, "from_config", None) or model_class._from_config
            model = build(config, dtype=torch.float32)
    compute = getattr(torch, dtype)
    decoder, reader = model.get_decoder(), Reader(checkpoint)
    rotary = type(decoder.rotary_emb)(config=model.config).to(compute)

    def tensor(array: np.ndarray):
        return torch.from_numpy(np.asarray(array, dtype=np.float32)).to(compute)

    def embed(ids: np.ndarray) -> np.ndarray:
        rows, local = np.unique(ids, return_inverse=True)
        weight = tensor(reader.weight("model.embed_tokens.weight", rows.tolist()))
        with torch.no_grad():  # the lookup nn.Embedding does, on the probe tokens' rows only
            return _numpy(torch.nn.functional.embedding(torch.as_tensor(local.reshape(ids.shape)), weight))

    def layer(index: int, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        block, routing = decoder.layers[index], []
        experts = getattr(block.mlp, "experts", None)
        if experts is not None:
            block.mlp.experts = _selected_experts(experts, reader, f"model.layers.{index}.mlp.experts", tensor, routing)
        state = {name[len(f"model.layers.{index}."):]: tensor(v) for name, v in reader.layer(index).items()}
        try:
            _load(block, state, checkpoint, f"model.layers.{index}.")
            h = tensor(hidden)
            positions = torch.arange(h.shape[1]).unsqueeze(0)
            mask = transformers.masking_utils.create_causal_mask(
                config=model.config, inputs_embeds=h, attention_mask=None, past_key_values=None, position_ids=positions)
            with torch.no_grad():
                out = block(h, attention_mask=mask, position_ids=positions, past_key_values=None, use_cache=False,
                            position_embeddings=rotary(h, positions))
            out = out[0] if isinstance(out, tuple) else out
        finally:
            if experts is not None:
                block.mlp.experts = experts
            block.to_empty(device="meta")
        return _numpy(out), (np.concatenate(routing) if routing else None)

    name = f"transformers {transformers.__version__} {type(model).__name__}"
    logits = functools.partial(_logits, model, reader, checkpoint, tensor)
    return StreamedSide(name, model.config.vocab_size, model.config.num_hidden_layers, embed, layer, logits, reader)


def _logits(model, reader: Reader, checkpoint: Checkpoint, tensor, hidden: np.ndarray) -> np.ndarray:
    """The final norm and the head, read in vocabulary blocks, each module emptied after."""
    import torch

    norm, head = model.get_decoder().norm, model.get_output_embeddings()
    head_name = "lm_head.weight" if "lm_head.weight" in reader else "model.embed_tokens.weight"
    _load(norm, {"weight": tensor(reader.weight("model.norm.weight"))}, checkpoint, "model.norm.")
    try:
        with torch.no_grad():
            h = norm(tensor(hidden))
            parts = []
            for rows in vocabulary_blocks(reader.info(head_name)):
                head.weight = torch.nn.Parameter(tensor(reader.weight(head_name, rows)), requires_grad=False)
                parts.append(_numpy(head(h)))
    finally:
        norm.to_empty(device="meta")
        head.to_empty(device="meta")
    return np.concatenate(parts, axis=-1)


def _selected_experts(module, reader: Reader, prefix: str, tensor, routing: list):
    """Stands in for transformers' experts module inside an MoE layer: called with the router's
    picks, it loads the picked experts and runs the real module on them alone."""
    import torch

    class SelectedExperts(torch.nn.Module):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return _run_selected(module, reader, prefix, tensor, routing, hidden_states, top_k_index, top_k_weights)

    return SelectedExperts()


def _run_selected(module, reader: Reader, prefix: str, tensor, routing: list, hidden_states, top_k_index, top_k_weights):
    """transformers' experts module on the picked experts, a chunk of them at a time. Picks of
    experts outside the chunk are renumbered to index num_experts with weight 0, as transformers'
    expert-parallel dispatch hands a rank the picks of other ranks' experts; the module runs
    marked expert-parallel, so that its grouped_mm and batched_mm paths leave those picks out
    (unmarked, grouped_mm adds their uninitialized rows into the output)."""
    import torch

    picked = top_k_index.cpu().numpy()
    routing.append(picked.reshape(-1, picked.shape[-1]))
    total, parallel, out = module.num_experts, getattr(module, "_is_expert_parallel", False), None
    for chunk in expert_chunks(sorted(set(picked.reshape(-1).tolist())), reader, f"{prefix}.0.gate_proj.weight"):
        renumber = torch.full((total + 1,), len(chunk), dtype=top_k_index.dtype)
        renumber[chunk] = torch.arange(len(chunk), dtype=top_k_index.dtype)
        part = {p: tensor(np.stack([reader.weight(f"{prefix}.{e}.{p}.weight") for e in chunk]))
                for p in ("gate_proj", "up_proj", "down_proj")}
        module.gate_up_proj = torch.nn.Parameter(torch.cat([part.pop("gate_proj"), part.pop("up_proj")], dim=1),
                                                 requires_grad=False)
        module.down_proj = torch.nn.Parameter(part.pop("down_proj"), requires_grad=False)
        module.num_experts, module._is_expert_parallel = len(chunk), True
        local = renumber[top_k_index]
        try:
            y = module(hidden_states, local, top_k_weights.masked_fill(local == len(chunk), 0))
        finally:
            module.num_experts, module._is_expert_parallel = total, parallel
            module.to_empty(device="meta")
        out = y if out is None else out + y
    return out


def _load(module, state: dict, checkpoint: Checkpoint, prefix: str) -> None:
    """Loads `state` into `module` in place of its meta tensors; every parameter must be there."""
    result = module.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.startswith("mlp.experts.")]
    if missing or result.unexpected_keys:
        what = (f"no weight for {prefix}{missing[0]}" if missing
                else f"{prefix}{result.unexpected_keys[0]} is not a parameter of its module")
        raise RemapError(f"transformers cannot run this layer: {what}", file=checkpoint.source,
                         expected="every parameter of its model class, and nothing else")


def _numpy(tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()

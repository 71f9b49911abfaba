"""An `mlx` checkpoint run one decoder layer at a time by mlx-lm's own modules.

`mlx_lm.utils.load_model(dir, lazy=True)` builds the model exactly as a whole-model run does (the
class mlx-lm picks, its sanitize, its quantization, its strict weight check) but reads nothing:
mx.load is lazy. Each decoder layer's tensors are read when that layer runs, and the layer is
dropped afterwards. Three pieces never go through those lazy arrays, since evaluating any part of
one reads all of it: the embedding (only the probe tokens' rows are read), the head (read in
vocabulary blocks) and the stacked routed experts (`switch_mlp`: only the experts mlx-lm's router
picks, a chunk at a time, each pick computed by mlx-lm's own SwitchGLU on its renumbered expert).
"""

from __future__ import annotations

import functools

import numpy as np

from remap.errors import RemapError, flattened
from remap.io.checkpoint import Checkpoint
from remap.parity.stream_side import StreamedSide, expert_chunks, vocabulary_blocks
from remap.parity.weights import Reader


def mlx_streamed(checkpoint: Checkpoint, dtype: str) -> StreamedSide:
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.utils import load_model

    from remap.parity.runtimes import _directory, _mlx_layer_args, _mx_numpy

    path = _directory(checkpoint, "mlx-lm")
    mx.set_cache_limit(0)  # freed layers go back to the system, not to mlx's buffer cache
    try:
        model, config = load_model(path, lazy=True)
    except ValueError as exc:  # mlx-lm loads strictly: a missing or extra weight
        raise RemapError(f"mlx-lm cannot load it: {flattened(exc)}", file=str(path)) from None
    compute, reader = getattr(mx, dtype), Reader(checkpoint)
    model.set_dtype(compute)  # lazy: each layer is cast when it is read

    def array(value: np.ndarray):
        from remap.ops.quant import _to_mlx

        out = _to_mlx(value)
        return out.astype(compute) if mx.issubdtype(out.dtype, mx.floating) else out

    def load_rows(module, prefix: str, rows) -> None:
        """The module's weight (and quantization scales and biases) replaced by rows of them."""
        module.update({k: array(reader.rows(f"{prefix}.{k}", rows)) for k in ("weight", "scales", "biases")
                       if f"{prefix}.{k}" in reader})

    def embed(ids: np.ndarray) -> np.ndarray:
        rows, local = np.unique(ids, return_inverse=True)
        load_rows(model.model.embed_tokens, "model.embed_tokens", rows.tolist())
        return _mx_numpy(model.model.embed_tokens(mx.array(local.reshape(ids.shape))))

    def layer(index: int, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        block, routing = model.model.layers[index], []
        switch = getattr(block.mlp, "switch_mlp", None)
        if switch is not None:
            block.mlp.switch_mlp = _selected_experts(switch, f"model.layers.{index}.mlp.switch_mlp", reader, load_rows, routing)
        h = mx.array(hidden).astype(compute)
        prefix = f"model.layers.{index}."  # read by the lazy arrays as the layer runs
        reader.bytes_read += sum(info.nbytes for name, info in reader.tensors.items()
                                 if name.startswith(prefix) and ".mlp.switch_mlp." not in name)
        try:
            out = block(h, *_mlx_layer_args(model, h), cache=None)
            mx.eval(out)
        except (RuntimeError, ValueError) as exc:
            if dtype == "float32":
                raise
            raise RemapError(f"mlx-lm cannot run this model in {dtype} here: {exc}", expected="--dtype float32") from None
        finally:
            model.model.layers[index] = None  # its tensors go with it
        return _mx_numpy(out), (np.concatenate(routing) if routing else None)

    name = f"mlx-lm {mlx_lm.__version__} {type(model).__module__.rsplit('.', 1)[-1]}.{type(model).__name__}"
    logits = functools.partial(_logits, model, reader, load_rows, compute)
    return StreamedSide(name, config["vocab_size"], len(model.model.layers), embed, layer, logits, reader)


def _logits(model, reader: Reader, load_rows, compute, hidden: np.ndarray) -> np.ndarray:
    """The final norm and the head, read in vocabulary blocks."""
    import mlx.core as mx

    from remap.parity.runtimes import _mx_numpy

    h = model.model.norm(mx.array(hidden).astype(compute))
    head, name = (model.lm_head, "lm_head") if "lm_head.weight" in reader else (None, "model.embed_tokens")
    parts = []
    for rows in vocabulary_blocks(reader.info(f"{name}.weight")):
        if head is None:  # tied: the embedding's rows as the output projection, as mlx-lm does
            load_rows(model.model.embed_tokens, name, rows)
            parts.append(_mx_numpy(model.model.embed_tokens.as_linear(h)))
        else:
            load_rows(head, name, rows)
            parts.append(_mx_numpy(head(h)))
    return np.concatenate(parts, axis=-1)


def _selected_experts(switch, prefix: str, reader: Reader, load_rows, routing: list):
    """Stands in for mlx-lm's SwitchGLU: called with the picks [..., k] of mlx-lm's router, each
    computed by the real SwitchGLU holding only a chunk of the picked experts. A plain partial,
    not a class made per layer: such a class lives in a reference cycle until the collector runs,
    and kept the layer's loaded experts alive with it (~0.45 GB a layer on the 5.7 GB benchmark)."""
    return functools.partial(_run_selected, switch, prefix, reader, load_rows, routing)


def _run_selected(switch, prefix: str, reader: Reader, load_rows, routing: list, x, indices):
    import mlx.core as mx

    picks = np.array(indices)
    flat = picks.reshape(-1, picks.shape[-1])
    routing.append(flat)
    tokens = x.reshape(-1, x.shape[-1])
    out = None
    for chunk in expert_chunks(sorted(set(flat.reshape(-1).tolist())), reader, f"{prefix}.gate_proj.weight"):
        for part in ("gate_proj", "up_proj", "down_proj"):
            load_rows(getattr(switch, part), f"{prefix}.{part}", chunk)
        where = np.isin(flat, chunk)
        token, slot = np.nonzero(where)
        renumbered = np.searchsorted(np.array(chunk), flat[token, slot])
        y = switch(tokens[mx.array(token)], mx.array(renumbered.reshape(-1, 1)))  # [picks, 1, hidden]
        y = np.array(y.astype(mx.float32))[:, 0]
        if out is None:
            out = np.zeros((*flat.shape, y.shape[-1]), np.float32)
        out[token, slot] = y
    return mx.array(out.reshape(*picks.shape, -1)).astype(x.dtype)


"""The runtimes a parity check runs checkpoints in, each its own code; a layout's `runtime`
names the one that runs it (hf: transformers, mlx: mlx-lm, scratch: the reference ScratchModel):

| runtime                | what loads and runs the checkpoint                                        |
|------------------------|---------------------------------------------------------------------------|
| `transformers_runtime` | `AutoModelForCausalLM.from_pretrained` (DeepseekV3ForCausalLM, ...)¹ ²      |
| `scratch_runtime`      | remap's reference `ScratchModel` (remap/parity/scratch_model.py)            |
| `mlx_runtime`          | `mlx_lm.utils.load_model`, the class mlx-lm itself picks                    |

¹ or, for a model AutoModelForCausalLM does not map (transformers 5.23: mistral4), the causal-LM
class config.json's `architectures` names (Mistral4ForCausalLM).
² a model type transformers has no class for whose files are DeepSeek-V3's (kimi_k2) loads into
DeepseekV3ForCausalLM with its config.json read as DeepseekV3Config.

`Runtime.forward(ids)` returns the logits and the hidden states that layer localisation
compares: the embedding output, then the output of every decoder layer, all *before* the final
norm. transformers' own `output_hidden_states` gives its last entry after the final norm, so on
that side the states are taken by forward hooks on the embedding and on every decoder layer.
mlx modules have no hooks, so the MLX side calls mlx-lm's own modules one after another:
`model.model.embed_tokens`, mlx-lm's own causal mask helper, then each `model.model.layers[i]`,
with what the model's own `__call__` passes its layers (`_mlx_layer_args`: mistral4's layers
take the llama-4 query scale first, from mlx-lm's own helper; deepseek_v2's the "causal" mask
name, deepseek_v3's an array).
Logits always come from each model's full forward call.

The heavy imports (torch, transformers, mlx) happen only when a runtime loads.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from remap.errors import RemapError, flattened
from remap.io.checkpoint import Checkpoint

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Forward:
    logits: np.ndarray  # [batch, tokens, vocab], float32
    hidden: list[np.ndarray]  # embedding output, then each decoder layer's output: [batch, tokens, hidden]


@dataclass
class Runtime:
    """A loaded model: what runs it (for the report) and how to run it on token ids."""

    name: str  # e.g. "transformers 5.23.0 DeepseekV3ForCausalLM"
    vocab_size: int
    forward: Callable[[np.ndarray], Forward]


def user_torch_runtime(path: Path, checkpoint: Checkpoint, dtype: str) -> Runtime:
    """SRC in the user's own model code (remap/parity/user_model.py)."""
    from remap.parity.user_model import user_torch_runtime as load_user

    if dtype not in DTYPES:
        raise RemapError(f"unknown compute dtype '{dtype}'", expected=" | ".join(DTYPES))
    return load_user(path, checkpoint, dtype)


def load(layout: str, checkpoint: Checkpoint, dtype: str = "float32") -> Runtime:
    """The runtime of `layout` (the layout declares it) with `checkpoint` loaded, computing in `dtype`."""
    from remap.layouts import get_layout

    if dtype not in DTYPES:
        raise RemapError(f"unknown compute dtype '{dtype}'", expected=" | ".join(DTYPES))
    return get_layout(layout).runtime(checkpoint, dtype)


def _directory(checkpoint: Checkpoint, runtime: str) -> Path:
    """transformers and mlx-lm load a directory with its config.json, not a file."""
    if Path(checkpoint.source).is_file():
        raise RemapError(f"{runtime} loads a directory, not one file", file=checkpoint.source,
                         expected="the checkpoint's directory, with its config.json")
    return checkpoint.root


# -- torch ----------------------------------------------------------------------------------------


def _numpy(tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def transformers_runtime(checkpoint: Checkpoint, dtype: str) -> Runtime:
    """transformers' own class for the checkpoint (AutoModelForCausalLM)."""
    import torch
    import transformers

    path = _directory(checkpoint, "transformers")
    with _no_progress_bars():
        try:
            config = _transformers_config(path)
            model_class = _causal_lm_class(path, config)
            model, info = model_class.from_pretrained(path, config=config, dtype=getattr(torch, dtype),
                                                      output_loading_info=True)
        except ImportError as exc:  # e.g. an FP8 checkpoint: transformers' quantizer needs accelerate
            raise RemapError(f"transformers cannot load it: {exc}", file=str(path)) from None
    # transformers fills what a checkpoint lacks with random values: that is not this checkpoint
    absent = sorted(info["missing_keys"]) + sorted(str(entry[0]) for entry in info["mismatched_keys"])
    if absent:
        raise RemapError(f"transformers finds no weights of the right shape for {len(absent)} parameters, "
                         f"e.g. {absent[0]}", file=str(path), expected="every parameter of its model class")
    # Without a GPU, transformers dequantizes an FP8 checkpoint into bf16 Linears whatever dtype
    # was asked for; computing in `dtype` means casting what it loaded (exact: bf16 widens).
    model.to(getattr(torch, dtype)).eval()
    decoder = model.get_decoder()

    def forward(ids: np.ndarray) -> Forward:
        hidden: list = []

        def keep(module, inputs, output):
            hidden.append(output[0] if isinstance(output, tuple) else output)

        modules = [decoder.embed_tokens, *decoder.layers]
        handles = [m.register_forward_hook(keep) for m in modules]
        try:
            with torch.no_grad():
                logits = model(torch.as_tensor(ids)).logits
        finally:
            for handle in handles:
                handle.remove()
        return Forward(_numpy(logits), [_numpy(h) for h in hidden])

    name = f"transformers {transformers.__version__} {type(model).__name__}"
    return Runtime(name, model.config.vocab_size, forward)


def _transformers_config(path: Path):
    """The checkpoint's config as transformers reads it; a model type transformers has no class
    for whose files are DeepSeek-V3's (Kimi-K2: the hf layout's ARCHITECTURE_OF) as the config of
    that architecture, as transformers' own Kimi-K2.5 reads its kimi_k2 text model."""
    import json

    from transformers import AutoConfig

    from remap.layouts.hf_config import ARCHITECTURE_OF

    raw = json.loads((path / "config.json").read_text())
    architecture = ARCHITECTURE_OF.get(raw.get("model_type"))
    if architecture is None:
        return AutoConfig.from_pretrained(path)
    # auto_map names the remote code of the release, which runs the same architecture
    return AutoConfig.for_model(architecture, **{k: v for k, v in raw.items() if k not in ("model_type", "auto_map")})


def _causal_lm_class(path: Path, config):
    """AutoModelForCausalLM where it maps the checkpoint's config class; transformers 5.23 leaves
    mistral4 out of that mapping (its other auto mappings name Mistral4ForCausalLM), so otherwise
    the causal-LM class config.json's `architectures` names."""
    import transformers
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM

    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:  # the mapping AutoModelForCausalLM goes by
        return AutoModelForCausalLM
    for name in config.architectures or ():
        if name.endswith("ForCausalLM") and isinstance(getattr(transformers, name, None), type):
            return getattr(transformers, name)
    raise RemapError(f"transformers has no causal-LM class for model_type {config.model_type!r}", file=str(path),
                     expected="a model AutoModelForCausalLM maps, or config.json architectures naming its class")


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws a progress bar and prints a load report (the MTP layer it ignores, the
    FP8 weights it dequantizes) per load; a parity report has its own output."""
    from transformers.utils import logging

    was, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if was:
            logging.enable_progress_bar()


def scratch_runtime(checkpoint: Checkpoint, dtype: str) -> Runtime:
    """remap's reference ScratchModel."""
    import torch

    from remap.parity.scratch_model import ScratchModel

    if checkpoint.config is None:  # api.plan reads one off the shapes; a bare open_checkpoint has none
        raise RemapError("the scratch model needs its config (config.json, or planned with a spec)", file=checkpoint.source)
    model = ScratchModel(checkpoint.config)
    state = {name: torch.from_numpy(checkpoint.read(name).astype(np.float32)) for name in checkpoint.tensors}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RemapError(f"not a scratch checkpoint for its config.json: {exc}", file=checkpoint.source) from None
    model.to(getattr(torch, dtype)).eval()

    def forward(ids: np.ndarray) -> Forward:
        with torch.no_grad():
            out = model(torch.as_tensor(ids))
        return Forward(_numpy(out.logits), [_numpy(h) for h in out.hidden_states])

    return Runtime(f"remap ScratchModel (torch {torch.__version__})", model.config["vocab_size"], forward)


# -- mlx ------------------------------------------------------------------------------------------


def mlx_runtime(checkpoint: Checkpoint, dtype: str) -> Runtime:
    """mlx-lm's own class for the checkpoint (mlx_lm.utils.load_model picks it)."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.utils import load_model

    path = _directory(checkpoint, "mlx-lm")
    try:
        model, config = load_model(path)
    except ValueError as exc:  # mlx-lm loads strictly: a missing or extra weight
        raise RemapError(f"mlx-lm cannot load it: {flattened(exc)}", file=str(path)) from None
    model.set_dtype(getattr(mx, dtype))  # quantized weights stay packed; scales and floats follow

    def forward(ids: np.ndarray) -> Forward:
        x = mx.array(ids)
        try:
            logits = model(x)
            # Step by step through mlx-lm's own modules, exactly as its model's __call__ does
            # without a cache: embedding, the layers' arguments, each layer in turn.
            h = model.model.embed_tokens(x)
            args = _mlx_layer_args(model, h)
            hidden = [h]
            for layer in model.model.layers:
                h = layer(h, *args, cache=None)
                hidden.append(h)
            mx.eval(logits, *hidden)
        except (RuntimeError, ValueError) as exc:
            if dtype == "float32":
                raise
            # MLX on CPU runs the MoE expert matmul (GatherMM) in float32 only
            raise RemapError(f"mlx-lm cannot run this model in {dtype} here: {exc}", expected="--dtype float32") from None
        return Forward(_mx_numpy(logits), [_mx_numpy(h) for h in hidden])

    name = f"mlx-lm {mlx_lm.__version__} {type(model).__module__.rsplit('.', 1)[-1]}.{type(model).__name__}"
    return Runtime(name, config["vocab_size"], forward)


def _mlx_layer_args(model, h) -> tuple:
    """What mlx-lm's own model `__call__` passes each decoder layer after the hidden states when
    there is no cache, computed as it computes them."""
    from mlx_lm.models import deepseek_v2, mistral4
    from mlx_lm.models.base import create_attention_mask

    if isinstance(model.model, mistral4.Mistral4Model):  # Mistral4Model.__call__, offset 0
        rope = model.model.args.rope_parameters
        scale = mistral4._get_llama_4_attn_scale(h.shape[1], 0, rope["llama_4_scaling_beta"],
                                                 rope["original_max_position_embeddings"]).astype(h.dtype)
        return scale, create_attention_mask(h, None)
    if isinstance(model.model, deepseek_v2.DeepseekV2Model):  # its __call__ passes the "causal" mask
        return (create_attention_mask(h, None),)
    return (create_attention_mask(h, None, return_array=True),)  # DeepseekV3Model.__call__ (and V3.2's)


def _mx_numpy(array) -> np.ndarray:
    import mlx.core as mx

    return np.array(array.astype(mx.float32))

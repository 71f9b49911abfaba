"""`remap parity SRC --torch-model FILE.py`: SRC runs in the user's own PyTorch model code.

FILE.py defines

    build(config: dict, state_dict: dict[str, torch.Tensor]) -> model
    forward(model, input_ids: torch.LongTensor [batch, tokens]) -> logits [batch, tokens, vocab]
    layers(model) -> sequence of torch modules        (optional: the decoder blocks, in order)

`config` is SRC's config.json (or the one remap read off its shapes, with --set applied),
`state_dict` every tensor of SRC in float32. With `layers`, the hidden state entering the first
block and the output of every block are compared too (forward hooks), so a drift is placed in
its layer; without, only the logits are. The file is the user's: it is run as it is, in this
process, so only for code you trust (as `python FILE.py` would).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from remap.errors import RemapError
from remap.io.checkpoint import Checkpoint
from remap.parity.runtimes import Forward, Runtime, _numpy


def _module(path: Path):
    if not path.is_file() or path.suffix != ".py":
        raise RemapError("no such Python file", file=str(path), expected="--torch-model FILE.py")
    spec = importlib.util.spec_from_file_location(f"remap_user_model_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: any error is theirs to see, in one line
        raise RemapError(f"importing it failed: {type(exc).__name__}: {exc}", file=str(path)) from None
    missing = [name for name in ("build", "forward") if not callable(getattr(module, name, None))]
    if missing:
        raise RemapError(f"defines no {' or '.join(missing)}", file=str(path),
                         expected="build(config, state_dict) and forward(model, input_ids)")
    return module


def user_torch_runtime(path: Path, checkpoint: Checkpoint, dtype: str) -> Runtime:
    import torch

    code = _module(path)
    state = {name: torch.from_numpy(np.array(checkpoint.read(name), dtype=np.float32)) for name in checkpoint.tensors}
    try:
        model = code.build(dict(checkpoint.config or {}), state)
        model.to(getattr(torch, dtype)).eval()
        blocks = list(code.layers(model)) if callable(getattr(code, "layers", None)) else []
    except Exception as exc:
        raise RemapError(f"build(config, state_dict) failed: {type(exc).__name__}: {exc}", file=str(path)) from None

    def forward(ids: np.ndarray) -> Forward:
        hidden: list = []
        handles = []
        if blocks:
            handles.append(blocks[0].register_forward_pre_hook(lambda module, args: hidden.append(args[0])))
            handles += [b.register_forward_hook(lambda m, a, out: hidden.append(out[0] if isinstance(out, tuple) else out))
                        for b in blocks]
        try:
            with torch.no_grad():
                logits = code.forward(model, torch.as_tensor(ids))
        except Exception as exc:
            raise RemapError(f"forward(model, input_ids) failed: {type(exc).__name__}: {exc}", file=str(path)) from None
        finally:
            for handle in handles:
                handle.remove()
        if tuple(logits.shape[:2]) != ids.shape:
            raise RemapError(f"forward returned logits of shape {list(logits.shape)}", file=str(path),
                             expected=f"[{ids.shape[0]}, {ids.shape[1]}, vocab]: every position's logits")
        return Forward(_numpy(logits), [_numpy(h) for h in hidden])

    vocab = int(forward(np.zeros((1, 1), np.int64)).logits.shape[-1])
    return Runtime(f"{path.name} (your model code, torch {torch.__version__})", vocab, forward)

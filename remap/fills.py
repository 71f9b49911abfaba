"""Values a tensor holds by construction, not by training: what a fill rule writes and what a drop's
`equals` claim is checked against.

    zeros, ones        a tensor the source lacks, or padding
    tril               a causal mask: ones on and below the diagonal of the last two axes
    rope_inv_freq      RoPE's inverse frequencies 10000^(-2j/d) for j < d/2 (d = 2 x the length),
                       as the from-scratch model's RotaryEmbedding saves them
    uniform            (a check only) every element equal to the first: a router bias added to
                       every expert alike changes no choice and no softmax of the chosen
"""

from __future__ import annotations

import numpy as np

ROPE_BASE = 10000.0
FILLS = ("zeros", "ones", "tril", "rope_inv_freq")
EQUALS = ("tril", "rope_inv_freq", "uniform")


def fill_values(kind: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if kind == "zeros":
        return np.zeros(shape, dtype)
    if kind == "ones":
        return np.ones(shape, dtype)
    if kind == "tril":
        return np.broadcast_to(np.tril(np.ones(shape[-2:], np.float32)), shape).astype(dtype)
    if kind == "rope_inv_freq":
        dims = 2 * shape[-1]
        exponents = np.arange(0, dims, 2, dtype=np.float32) / np.float32(dims)
        return np.broadcast_to(np.float32(1.0) / np.power(np.float32(ROPE_BASE), exponents), shape).astype(dtype)
    raise ValueError(f"no fill {kind!r}")


def difference(kind: str, data: np.ndarray) -> tuple[float, bool]:
    """(max |data - what `kind` says it holds|, whether that is within float32 rounding)."""
    values = data.astype(np.float32)
    expected = values.reshape(-1)[:1] if kind == "uniform" else fill_values(kind, data.shape, np.float32)
    error = float(np.max(np.abs(values - expected))) if values.size else 0.0
    scale = float(np.max(np.abs(expected))) if values.size else 0.0
    return error, error <= scale * 2.0**-20

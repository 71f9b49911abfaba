"""Ops between one matrix and two low-rank factors of it: `low_rank_fuse` multiplies them out,
`low_rank_split` factors a matrix back by SVD.

A query projection held as two factors with nothing between them (x @ A @ B) is one matrix
(x @ W, W = A @ B), which is how DeepSeek-V3 stores q_proj when q_lora_rank is null. Both ops
compute in float64 and round the result to the inputs' dtype (to bf16 through float32, as
ml_dtypes and torch cast). Fusing loses only that rounding; splitting is exact (to rounding) while
rank(W) <= rank, and `check` measures by how much it is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from remap import dtypes
from remap.errors import RemapError
from remap.ops.base import Finding, Loss, NotInvertible, Op, TensorType, max_abs

if TYPE_CHECKING:  # numpy is imported by the functions that compute on arrays (remap/ops/base.py)
    import numpy as np

_FLOATS = ("BF16", "F16", "F32", "F64")


def _matrix(op: Op, t: TensorType, role: str) -> None:
    if t.dtype not in _FLOATS or len(t.shape) != 2:
        raise RemapError(f"{op.name}: {role} is {t.dtype} {list(t.shape)}", expected=f"a 2-D {' | '.join(_FLOATS)} matrix")


@dataclass(frozen=True)
class LowRankFuse(Op):
    """[left [m, k], right [k, n]] (elements input, input + 1) -> left @ right [m, n].

    The product is taken in float64 and rounded to the inputs' (shared) dtype. `rank`, when
    given, is checked against k and is what makes the fuse invertible (the split must know k).
    """

    name = "low_rank_fuse"
    int_params = ("rank",)
    rank: int | None = None

    def types(self, inputs: list[TensorType]) -> list[TensorType]:
        if not 0 <= self.input < len(inputs) - 1:
            raise RemapError(f"low_rank_fuse: inputs {self.input} and {self.input + 1} out of range for {len(inputs)}",
                             expected="the two factors as consecutive inputs")
        left, right = inputs[self.input], inputs[self.input + 1]
        _matrix(self, left, "left")
        _matrix(self, right, "right")
        if left.dtype != right.dtype or left.shape[1] != right.shape[0]:
            raise RemapError(f"low_rank_fuse: {left.dtype} {list(left.shape)} @ {right.dtype} {list(right.shape)}",
                             expected="[m, k] @ [k, n] of one dtype")
        if self.rank is not None and left.shape[1] != self.rank:
            raise RemapError(f"low_rank_fuse: the factors' inner size is {left.shape[1]}", expected=f"rank {self.rank}")
        fused = TensorType((left.shape[0], right.shape[1]), left.dtype)
        return [*inputs[: self.input], fused, *inputs[self.input + 2 :]]

    def apply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import numpy as np

        left, right = arrays[self.input], arrays[self.input + 1]
        fused = (left.astype(np.float64) @ right.astype(np.float64)).astype(left.dtype)
        return [*arrays[: self.input], fused, *arrays[self.input + 2 :]]

    def loss(self, inputs: list[TensorType]) -> Loss | None:
        left, right = inputs[self.input], inputs[self.input + 1]
        return Loss("rounding", f"inputs {self.input} @ {self.input + 1}: the float64 product "
                    f"[{left.shape[0]}, {right.shape[1]}] rounded to {left.dtype}")

    @classmethod
    def invert(cls, raw: Mapping[str, Any]) -> list[dict]:
        if raw.get("rank") is None:
            raise NotInvertible("low_rank_fuse needs `rank` (the factors' inner size) to be inverted")
        return [{"op": "low_rank_split", "rank": raw["rank"], "input": raw.get("input", 0)}]


@dataclass(frozen=True)
class LowRankSplit(Op):
    """W [m, n] -> [left [m, rank], right [rank, n]] with left @ right = W where rank(W) <= rank.

    W = U S V^T (SVD in float64); left = U_r sqrt(S_r), right = sqrt(S_r) V_r^T: balanced factors,
    neither holding all the scale, each rounded to W's dtype. Past rank(W) > rank the product is
    the best rank-`rank` approximation (Eckart-Young), which the `low_rank` claim says is not needed.
    """

    name = "low_rank_split"
    int_params = ("rank",)
    rank: int | None = None

    def types(self, inputs: list[TensorType]) -> list[TensorType]:
        t = self._pick(inputs)
        _matrix(self, t, "the matrix")
        if self.rank is None or not 1 <= self.rank <= min(t.shape):
            raise RemapError(f"low_rank_split: rank {self.rank} for a {list(t.shape)} matrix",
                             expected=f"an integer in 1..{min(t.shape)}")
        (m, n), r = t.shape, self.rank
        return [*inputs[: self.input], t.with_shape((m, r)), t.with_shape((r, n)), *inputs[self.input + 1 :]]

    def _factors(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(left, right) in W's dtype, and every singular value of W (float64, descending)."""
        import numpy as np

        u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
        root = np.sqrt(s[: self.rank])
        left = (u[:, : self.rank] * root).astype(w.dtype)
        right = (root[:, None] * vt[: self.rank]).astype(w.dtype)
        return left, right, s

    def apply(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        left, right, _ = self._factors(self._pick(arrays))
        return [*arrays[: self.input], left, right, *arrays[self.input + 1 :]]

    def loss(self, inputs: list[TensorType]) -> Loss | None:
        (m, n), dtype = self._pick(inputs).shape, self._pick(inputs).dtype
        return Loss("low_rank", f"input {self.input}: [{m}, {n}] as [{m}, {self.rank}] @ [{self.rank}, {n}] "
                    f"(SVD truncated to rank {self.rank}, factors rounded to {dtype})",
                    f"exact while rank(W) <= {self.rank}: the singular values past it are zero")

    def check(self, arrays: list[np.ndarray]) -> list[Finding]:
        """max |W - left @ right| over the factors as written. The claim holds where W's singular
        values past `rank` are within what rounding explains: W rounded to its dtype moves each by
        at most u * |W|_F (Weyl), u half of eps, so eps * |W|_F leaves room; plus numpy's
        matrix_rank tolerance for the float64 SVD itself. (A product of rank-`rank` factors
        rounded to bf16 is not exactly of rank `rank`; this still says it holds.)"""
        import ml_dtypes
        import numpy as np

        w = self._pick(arrays)
        left, right, s = self._factors(w)
        error = max_abs(w.astype(np.float64) - left.astype(np.float64) @ right.astype(np.float64))
        tail = s[self.rank] if self.rank < len(s) else 0.0
        rounding = ml_dtypes.finfo(w.dtype).eps * np.sqrt(np.sum(s**2))
        svd = s[0] * max(w.shape) * np.finfo(np.float64).eps
        what = self.loss([TensorType(w.shape, dtypes.dtype_name(w.dtype))]).what
        return [Finding("low_rank", what, error, bool(tail <= rounding + svd))]

    @classmethod
    def invert(cls, raw: Mapping[str, Any]) -> list[dict]:
        fuse = {"op": "low_rank_fuse", "rank": raw.get("rank"), "input": raw.get("input", 0)}
        return [{k: v for k, v in fuse.items() if v is not None}]

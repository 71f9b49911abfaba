"""rope_permute, low_rank_fuse and low_rank_split: the two exact rewrites between a half-split-RoPE,
factored-query attention and DeepSeek-V3's (interleaved RoPE, one q_proj).

rope_permute is proved on the attention scores it exists for (q.k under both RoPE conventions,
written out here and checked against transformers' own); fuse and split are checked to float
rounding on matrices of rank <= k, and their `low_rank` claim is measured on data. Shapes, bad
parameters and the op tables' inverses are in tests/test_ops.py; here the inverses also go through
a spec written as YAML and `remap invert`'s document.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from remap.dtypes import dtype_name
from remap.errors import RemapError
from remap.ops import TensorType, build_op, invert_ops
from remap.spec.invert import invert_document
from remap.spec.load import dump_spec, parse_spec

RNG = np.random.default_rng(7)
BASE = 10000.0


def run(raws, arrays, names=None):
    """Apply `raws` in turn, checking the planned shapes and dtypes against the computed ones."""
    planned = [TensorType(a.shape, _dtype_name(a)) for a in arrays]
    for raw in raws:
        op = build_op(raw, names or {})
        planned = op.types(planned)
        arrays = op.apply(arrays)
        assert [TensorType(a.shape, _dtype_name(a)) for a in arrays] == planned, raw
    return arrays


def _dtype_name(array):
    return dtype_name(array.dtype)


# -- RoPE, both conventions, as the runtimes compute it ----------------------------------------


def angles(positions, dim):
    """[positions, dim / 2]: position p turns frequency j by p * BASE^(-2j / dim)."""
    return np.asarray(positions, np.float64)[:, None] * BASE ** (-np.arange(0, dim, 2) / dim)


def rope_half_split(x, positions):
    """x [..., positions, dim]: rotate_half RoPE (dims j and j + dim/2 turn together), as
    transformers' apply_rotary_pos_emb and the usual from-scratch Llama-style code do."""
    a = np.concatenate([angles(positions, x.shape[-1])] * 2, axis=-1)
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(a) + rotated * np.sin(a)


def rope_interleaved(x, positions):
    """x [..., positions, dim]: interleaved RoPE (dims 2j and 2j+1 turn together), as DeepSeek-V3's
    model.py computes it: consecutive pairs viewed as complex numbers, times e^(i angle)."""
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles(positions, x.shape[-1]))
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)


def scores(wq, wk, x, rope, heads, dim):
    """q.k of every head, query position and key position: q = rope(x @ wq^T) per head, k =
    rope(x @ wk^T) shared by the heads (MLA's k_rope). x [positions, hidden]."""
    positions = np.arange(len(x)) * 3 + 5  # not 0: angle 0 would turn nothing
    q = rope((x @ wq.T).reshape(len(x), heads, dim).transpose(1, 0, 2), positions)  # [heads, positions, dim]
    k = rope(x @ wk.T, positions)  # [positions, dim]
    return q @ k.T  # [heads, query, key]


@pytest.mark.parametrize("dim", [2, 8, 64])
def test_rope_permute_turns_half_split_rope_into_interleaved_with_the_same_scores(dim):
    heads, hidden, positions = 3, 16, 7
    wq = RNG.standard_normal((heads * dim, hidden))  # the q projection's rope rows, head after head
    wk = RNG.standard_normal((dim, hidden))  # the k projection's rope rows
    x = RNG.standard_normal((positions, hidden))
    half_split = scores(wq, wk, x, rope_half_split, heads, dim)

    permute = {"op": "rope_permute", "dim": "qk_rope_head_dim", "order": "interleave"}
    [wq2], [wk2] = run([permute], [wq], {"qk_rope_head_dim": dim}), run([permute], [wk], {"qk_rope_head_dim": dim})
    interleaved = scores(wq2, wk2, x, rope_interleaved, heads, dim)
    np.testing.assert_allclose(interleaved, half_split, rtol=1e-12, atol=1e-12 * np.abs(half_split).max())

    if dim > 2:  # the permutation is what makes them agree: interleaved RoPE on the old rows differs
        assert not np.allclose(scores(wq, wk, x, rope_interleaved, heads, dim), half_split, rtol=1e-3)
    # and back: deinterleave gives the original rows, bit for bit
    assert np.array_equal(run(invert_ops([permute]), [wq2], {"qk_rope_head_dim": dim})[0], wq)


def test_the_rope_written_here_is_transformers_own():
    torch = pytest.importorskip("torch")
    deepseek = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    dim, positions = 8, np.arange(6) * 3 + 5
    q, k = RNG.standard_normal((2, 1, 1, 6, dim))  # [batch, heads, positions, dim]
    a = np.concatenate([angles(positions, dim)] * 2, axis=-1)[None]  # transformers' cos / sin: cat(freqs, freqs)
    cos, sin = torch.from_numpy(np.cos(a)), torch.from_numpy(np.sin(a))
    theirs = deepseek.apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k), cos, sin)
    assert [np.allclose(t.numpy(), rope_half_split(x, positions)) for t, x in zip(theirs, (q, k))] == [True, True]
    # rope_interleave=True: the same turns, returned de-interleaved (so q.k, not q itself, agrees)
    theirs = deepseek.apply_rotary_pos_emb_interleave(torch.from_numpy(q), torch.from_numpy(k), cos, sin)
    ours = [rope_interleaved(x, positions) for x in (q, k)]
    np.testing.assert_allclose(theirs[0].numpy() @ theirs[1].numpy().swapaxes(-1, -2),
                               ours[0] @ ours[1].swapaxes(-1, -2), rtol=1e-12)


@pytest.mark.parametrize("order, rows", [("interleave", [0, 4, 1, 5, 2, 6, 3, 7]), ("deinterleave", [0, 2, 4, 6, 1, 3, 5, 7])])
def test_rope_permute_row_order(order, rows):
    x = np.arange(16, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)  # row j holds j
    [out] = run([{"op": "rope_permute", "dim": 8, "order": order}], [x])
    assert out[:, 0].tolist() == rows + [8 + r for r in rows]  # each block of `dim` rows alone
    [per_head] = run([{"op": "rope_permute", "axis": -1, "dim": 8, "order": order}], [x.T.reshape(2, 2, 8)])
    assert per_head[0, 0].tolist() == rows
    assert build_op({"op": "rope_permute", "dim": 8, "order": order}, {}).loss([TensorType((16, 2), "F32")]) is None


# -- low_rank_fuse / low_rank_split ----------------------------------------------------------------


def factors(m, k, n, dtype=np.float32):
    return [RNG.standard_normal((m, k)).astype(dtype), RNG.standard_normal((k, n)).astype(dtype)]


def product(left, right):
    return left.astype(np.float64) @ right.astype(np.float64)


@pytest.mark.parametrize("dtype, tolerance", [(np.float64, 1e-13), (np.float32, 1e-6), (ml_dtypes.bfloat16, 2e-2)],
                         ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("m, k, n", [(12, 4, 9), (5, 5, 8), (6, 3, 3)])
def test_split_then_fuse_restores_a_matrix_of_rank_at_most_k(m, k, n, dtype, tolerance):
    [w] = run([{"op": "low_rank_fuse", "rank": k}], factors(m, k, n, dtype))  # rank <= k by construction
    split = [{"op": "low_rank_split", "rank": "q_lora_rank"}]
    left, right = run(split, [w], {"q_lora_rank": k})
    assert (left.shape, right.shape, left.dtype, right.dtype) == ((m, k), (k, n), w.dtype, w.dtype)
    [back] = run(invert_ops(split), [left, right], {"q_lora_rank": k})
    scale = np.abs(w.astype(np.float64)).max()
    assert np.abs(back.astype(np.float64) - w.astype(np.float64)).max() <= tolerance * scale
    # balanced: in float64, left^T left and right right^T are both diag(S_k)
    if dtype == np.float64:
        s = np.linalg.svd(w, compute_uv=False)[:k]
        np.testing.assert_allclose(left.T @ left, np.diag(s), atol=1e-12 * s[0])
        np.testing.assert_allclose(right @ right.T, np.diag(s), atol=1e-12 * s[0])


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
def test_fuse_then_split_keeps_the_product(dtype):
    """The factors are not unique (A G, G^-1 B for any invertible G), so fuse -> split gives back
    other factors of the same product, and fusing those gives the fused matrix again."""
    pair = factors(10, 4, 7, dtype)
    fuse = [{"op": "low_rank_fuse", "rank": 4}]
    [w] = run(fuse, pair)
    assert np.array_equal(w, product(*pair).astype(dtype))  # the float64 product, rounded
    left, right = run(invert_ops(fuse), [w])
    tolerance = 1e-6 if dtype == np.float32 else 2e-2
    assert np.abs(product(left, right) - product(*pair)).max() <= tolerance * np.abs(product(*pair)).max()


def test_fuse_names_its_rounding_and_split_its_low_rank_claim():
    fuse = build_op({"op": "low_rank_fuse", "input": 1}, {})
    loss = fuse.loss([TensorType((1,), "F32"), TensorType((5, 3), "F32"), TensorType((3, 4), "F32")])
    assert (loss.claim, loss.what) == ("rounding", "inputs 1 @ 2: the float64 product [5, 4] rounded to F32")
    assert fuse.check([np.zeros(1), *factors(5, 3, 4)]) == []  # rounding, like a cast's, is not measured
    loss = build_op({"op": "low_rank_split", "rank": 2}, {}).loss([TensorType((3, 4), "BF16")])
    assert loss.claim == "low_rank" and "[3, 4] as [3, 2] @ [2, 4]" in loss.what and "BF16" in loss.what
    assert "rank(W) <= 2" in loss.reason


@pytest.mark.parametrize(
    "shapes, dtypes_, fragment",
    [
        ([(2, 3), (3, 4)], ["F32", "BF16"], r"low_rank_fuse: F32 \[2, 3\] @ BF16 \[3, 4\] \(expected \[m, k\] @ \[k, n\] of one dtype\)"),
        ([(2, 3), (3, 4)], ["F8_E4M3", "F8_E4M3"], r"low_rank_fuse: left is F8_E4M3 \[2, 3\] \(expected a 2-D BF16 \| F16 \| F32 \| F64"),
    ],
)
def test_fuse_refuses_factors_of_other_dtypes(shapes, dtypes_, fragment):
    with pytest.raises(RemapError, match=fragment):
        build_op({"op": "low_rank_fuse"}, {}).types([TensorType(s, d) for s, d in zip(shapes, dtypes_)])


@pytest.mark.parametrize("dtype", [np.float64, np.float32, ml_dtypes.bfloat16], ids=["f64", "f32", "bf16"])
def test_check_measures_the_truncation(dtype):
    split = build_op({"op": "low_rank_split", "rank": 4}, {})
    [w] = run([{"op": "low_rank_fuse"}], factors(40, 4, 30, dtype))
    [found] = split.check([w])
    left, right = split.apply([w])
    assert found.claim == "low_rank" and found.holds is True  # rank 4 once rounded to its dtype
    assert found.magnitude == pytest.approx(np.abs(w.astype(np.float64) - product(left, right)).max(), rel=1e-6)
    assert found.magnitude <= {np.float64: 1e-12, np.float32: 1e-5}.get(dtype, 0.1) * np.abs(w.astype(np.float64)).max()

    full = RNG.standard_normal((40, 30)).astype(dtype)  # rank 30: truncating to 4 loses most of it
    [found] = split.check([full])
    s = np.linalg.svd(full.astype(np.float64), compute_uv=False)
    assert found.holds is False and found.magnitude >= 0.5 * s[4] / np.sqrt(40 * 30)
    assert split.check([np.zeros((5, 6), dtype)])[0].holds is True


def test_check_tells_a_small_truncation_in_float32():
    """Rank 4 plus a fifth direction 1e-3 of the first: past float32 rounding, so the claim breaks,
    and the magnitude says by how much."""
    u, _ = np.linalg.qr(RNG.standard_normal((20, 5)))
    v, _ = np.linalg.qr(RNG.standard_normal((16, 5)))
    w = ((u * [4.0, 3.0, 2.0, 1.0, 4e-3]) @ v.T).astype(np.float32)
    [found] = build_op({"op": "low_rank_split", "rank": 4}, {}).check([w])
    assert found.holds is False and 1e-4 < found.magnitude < 4e-3
    [found] = build_op({"op": "low_rank_split", "rank": 5}, {}).check([w])
    assert found.holds is True and found.magnitude < 1e-5


# -- the inverses, through a spec written as YAML and `remap invert`'s document ----------------------

SPEC = """remap: 1
name: scratch-q-to-hf
from: scratch
to: hf
rules:
  - name: q_proj = q_up @ q_down, rope rows interleaved
    to: model.layers.{i}.self_attn.q_proj.weight
    from: ["h.{i}.attn.q_up.weight", "h.{i}.attn.q_down.weight"]
    ops:
      - {op: low_rank_fuse, rank: q_lora_rank}
      - {op: split_heads, heads: num_attention_heads}
      - {op: split, axis: 1, sizes: [qk_nope_head_dim, qk_rope_head_dim]}
      - {op: rope_permute, input: 1, axis: 1, dim: qk_rope_head_dim, order: interleave}
      - {op: concat, axis: 1, sizes: [qk_nope_head_dim, qk_rope_head_dim], count: 2}
      - {op: merge_heads, heads: num_attention_heads}
"""
CONFIG = {"num_attention_heads": 3, "qk_nope_head_dim": 5, "qk_rope_head_dim": 4, "q_lora_rank": 6, "i": 0}


def test_the_ops_invert_through_a_yaml_spec_and_back():
    forward = parse_spec(SPEC, "scratch-q-to-hf.yaml")
    inverse = parse_spec(dump_spec(invert_document(forward)), "inverted.yaml")  # what `remap invert -o` writes
    [rule] = inverse.rules
    assert [op["op"] for op in rule.ops] == ["split_heads", "split", "rope_permute", "concat", "merge_heads",
                                            "low_rank_split"]
    assert rule.ops[2] == {"op": "rope_permute", "input": 1, "axis": 1, "dim": "qk_rope_head_dim", "order": "deinterleave"}
    assert rule.ops[-1] == {"op": "low_rank_split", "rank": "q_lora_rank", "input": 0}
    twice = parse_spec(dump_spec(invert_document(inverse)), "twice.yaml")
    assert [build_op(op, CONFIG) for op in twice.rules[0].ops] == [build_op(op, CONFIG) for op in forward.rules[0].ops]

    # hf -> scratch -> hf: a q_proj of rank <= q_lora_rank comes back to float rounding, and the
    # rope rows of each head are back where they were
    rows = CONFIG["num_attention_heads"] * (CONFIG["qk_nope_head_dim"] + CONFIG["qk_rope_head_dim"])
    [q_proj] = run([{"op": "low_rank_fuse"}], factors(rows, CONFIG["q_lora_rank"], 10, np.float32))
    q_up, q_down = run(rule.ops, [q_proj], CONFIG)
    assert (q_up.shape, q_down.shape) == ((rows, 6), (6, 10))
    [back] = run(forward.rules[0].ops, [q_up, q_down], CONFIG)
    assert np.abs(back - q_proj).max() <= 1e-6 * np.abs(q_proj).max()

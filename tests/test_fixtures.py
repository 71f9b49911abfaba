"""The bundled fixtures: reproducible byte for byte, of the layout they claim, loadable by the
real runtimes, and with the properties each exists to show."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from fixtures.generate import FIXTURES, HERE, generate
from remap.io.checkpoint import open_checkpoint
from remap.layouts import detect, get_layout
from remap.layouts.base import F32, FLOAT, FP8

# The dtype a fixture stores for each dtype class of its layout.
FLOAT_DTYPE = {"hf-bf16": "BF16", "hf-fp8-mtp": "BF16", "hf-v32-bf16": "BF16", "mlx": "BF16",
               "scratch-compatible": "F32", "scratch-trained": "F32"}
CLASS_DTYPE = {FP8: "F8_E4M3", F32: "F32"}
PROMPT = "The quick brown fox jumps"


def tensors(name: str) -> dict[str, np.ndarray]:
    with open_checkpoint(HERE / name) as checkpoint:
        return {tensor: np.array(checkpoint.read(tensor)) for tensor in checkpoint.tensors}


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# Fields a runtime stamps into the files it writes: the version of whatever wrote them, not the model.
STAMPS = frozenset({"transformers_version"})


def unstamped(value):
    """A parsed JSON value with every STAMPS key removed, at any depth."""
    if isinstance(value, dict):
        return {k: unstamped(v) for k, v in value.items() if k not in STAMPS}
    if isinstance(value, list):
        return [unstamped(v) for v in value]
    return value


def content(file: str, data: bytes):
    """What a fixture file says, for comparing two generations of it: a safetensors file's tensors
    (name, dtype, shape, bytes) and metadata; a JSON file's keys minus stamps; other files' bytes."""
    if file.endswith(".safetensors"):
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        body = data[8 + size :]
        metadata = header.pop("__metadata__", {})
        return metadata, {name: (t["dtype"], t["shape"], body[slice(*t["data_offsets"])]) for name, t in header.items()}
    if file.endswith(".json"):
        return unstamped(json.loads(data))
    return data


def test_regenerating_gives_the_committed_content(tmp_path):
    """Tensors byte for byte and configs key by key: a new transformers stamping its version into
    config.json is not a change of the fixture."""
    generate(tmp_path)
    for name in FIXTURES:
        committed, fresh = files(HERE / name), files(tmp_path / name)
        assert sorted(fresh) == sorted(committed), name
        differ = [f for f in committed if content(f, committed[f]) != content(f, fresh[f])]
        assert not differ, f"{name}: {differ} differ; regenerate with `python -m fixtures.generate`"


def test_content_ignores_stamps_and_nothing_else():
    config = json.dumps({"hidden_size": 64, "transformers_version": "5.23.0", "sub": {"transformers_version": "1"}})
    restamped = config.replace("5.23.0", "5.24.0")
    assert content("config.json", config.encode()) == content("config.json", restamped.encode())
    assert content("config.json", config.encode()) != content("config.json", config.replace("64", "65").encode())
    weights = (HERE / "hf-bf16" / "model.safetensors").read_bytes()
    flipped = weights[:-1] + bytes([weights[-1] ^ 1])
    assert content("model.safetensors", weights) != content("model.safetensors", flipped)


def test_fixtures_are_small():
    total = sum(p.stat().st_size for name in FIXTURES for p in (HERE / name).rglob("*") if p.is_file())
    assert total < 5_000_000


@pytest.mark.parametrize("name", FIXTURES)
def test_detected_as_its_layout(name):
    fixture = FIXTURES[name]
    with open_checkpoint(HERE / name) as checkpoint:
        found = detect({n: (info.shape, info.dtype) for n, info in checkpoint.tensors.items()}, checkpoint.config)
        assert (found.layout, found.variant) == (fixture.layout, fixture.variant), found.describe()
        # detection reads names and shapes; the dtypes must be the layout's too
        layout = get_layout(fixture.layout)
        expected = layout.expected(layout.read_config(checkpoint.config), fixture.variant)
        for tensor, info in checkpoint.tensors.items():
            want = FLOAT_DTYPE[name] if expected[tensor].dtype == FLOAT else CLASS_DTYPE[expected[tensor].dtype]
            assert info.dtype == want, tensor


@pytest.mark.parametrize("name", FIXTURES)
def test_tokenizer_fits_the_vocabulary(name):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(HERE / name)
    config = json.loads((HERE / name / "config.json").read_text())
    assert len(tokenizer) <= config["vocab_size"]
    ids = tokenizer(PROMPT).input_ids
    assert tokenizer.decode(ids) == PROMPT


@pytest.fixture(scope="module")
def transformers_logits():
    """hf-bf16 in transformers, run in float32: (load info, logits for PROMPT)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(HERE / "hf-bf16", output_loading_info=True)
    ids = AutoTokenizer.from_pretrained(HERE / "hf-bf16")(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model.float()(ids).logits[0].numpy()
    return info, ids[0].numpy(), logits


def test_hf_bf16_loads_in_transformers(transformers_logits):
    info, _, logits = transformers_logits
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert np.isfinite(logits).all()
    assert logits.std() > 0.3  # not degenerate: the next-token distribution has a shape


def test_mlx_loads_and_generates_like_transformers(transformers_logits):
    import mlx.core as mx
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(HERE / "mlx"))
    model.set_dtype(mx.float32)  # MLX on CPU runs the MoE expert matmul (GatherMM) in float32 only
    _, ids, logits = transformers_logits
    mlx_logits = np.array(model(mx.array(ids[None]))[0])
    np.testing.assert_allclose(mlx_logits, logits, atol=1e-4)
    tokens = [response.token for response in stream_generate(model, tokenizer, PROMPT, max_tokens=4)]
    assert len(tokens) == 4


def test_hf_weights_show_what_they_should():
    weights = tensors("hf-bf16")
    norms = [w.astype(np.float32) for n, w in weights.items() if n.endswith("norm.weight")]
    assert all(0.9 < norm.mean() < 1.1 and norm.std() > 0.05 for norm in norms)  # 1 + noise
    biases = [w for n, w in weights.items() if n.endswith("e_score_correction_bias")]
    assert biases and all(np.abs(b.astype(np.float32)).min() > 0 for b in biases)


def test_fp8_is_the_bf16_model_block_quantized():
    fp8, bf16 = tensors("hf-fp8-mtp"), tensors("hf-bf16")
    config = json.loads((HERE / "hf-fp8-mtp" / "config.json").read_text())
    rows, cols = config["quantization_config"]["weight_block_size"]
    quantized = [n for n, w in fp8.items() if w.dtype == ml_dtypes.float8_e4m3fn]
    assert any(max(fp8[n].shape) > 128 and max(fp8[n].shape) % 128 for n in quantized)  # a partial block
    assert any(n.startswith(f"model.layers.{config['num_hidden_layers']}.") for n in quantized)  # MTP too
    for name in quantized:
        weight, scale = fp8[name].astype(np.float32), fp8[name.removesuffix("weight") + "weight_scale_inv"]
        reference = bf16[name].astype(np.float32) if name in bf16 else None  # the MTP layer has none
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                block = np.s_[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols]
                # each block's largest value maps to e4m3's largest, 448: scale = amax / 448
                assert np.abs(weight[block]).max() == 448.0, name
                if reference is not None:
                    amax = np.abs(reference[block]).max()  # bf16-rounded: 2**-8 relative
                    assert abs(scale[i, j] * 448 - amax) <= amax * 2.0**-8, (name, i, j)
                    # e4m3 keeps 3 mantissa bits (1/16 relative), subnormals a step of scale * 2**-9
                    error = np.abs(weight[block] * scale[i, j] - reference[block])
                    assert (error <= np.abs(reference[block]) / 14 + scale[i, j] * 2.0**-9).all(), name


def test_v32_is_the_bf16_model_plus_an_indexer_that_sparsifies_attention():
    """hf-v32-bf16 holds hf-bf16's tensors and an indexer per layer; transformers loads it with
    nothing missing or unexpected. Its logits equal the V3 model's while a prompt is no longer
    than index_topk (every key is kept) and differ after: the indexer's choice matters."""
    import torch
    from transformers import AutoModelForCausalLM

    v32, v3 = tensors("hf-v32-bf16"), tensors("hf-bf16")
    assert {n for n in v32 if n not in v3} == {n for n in v32 if ".self_attn.indexer." in n}
    assert set(v3) < set(v32) and all(np.array_equal(v32[n], v3[n]) for n in v3)
    config = json.loads((HERE / "hf-v32-bf16" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v32" and config["index_topk"] == 4
    model, info = AutoModelForCausalLM.from_pretrained(HERE / "hf-v32-bf16", dtype=torch.float32,
                                                       output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    ids = torch.arange(2, 14)[None]
    with torch.no_grad():
        sparse = model(ids).logits[0].numpy()
        dense = AutoModelForCausalLM.from_pretrained(HERE / "hf-bf16", dtype=torch.float32)(ids).logits[0].numpy()
    topk = config["index_topk"]
    np.testing.assert_allclose(sparse[:topk], dense[:topk], atol=1e-5)
    assert (np.abs(sparse[topk:] - dense[topk:]).max(axis=-1) > 0.1).all()


def _scratch_conditions(weights: dict[str, np.ndarray]) -> dict[str, list[bool]]:
    """Per condition of docs/layouts/scratch.md, whether each tensor it covers satisfies it."""
    config = json.loads((HERE / "scratch-compatible" / "config.json").read_text())
    heads, rope = config["n_head"], config["rope_dim"]
    rope_heads = [w.reshape(heads, rope, -1) for n, w in weights.items() if n.endswith("k_rope_proj.weight")]
    return {
        "wpe is zero": [not weights["wpe.weight"].any()],
        "MLP biases are zero": [not w.any() for n, w in weights.items() if ".mlp." in n and n.endswith(".bias")],
        "every expert's router bias is the same": [bool((w == w[0]).all()) for n, w in weights.items()
                                                   if n.endswith(".expert_bias")],
        "rope heads are identical": [bool((h == h[:1]).all()) for h in rope_heads],
    }


def test_scratch_compatible_meets_every_condition_and_trained_breaks_each():
    compatible, trained = tensors("scratch-compatible"), tensors("scratch-trained")
    for condition, holds in _scratch_conditions(compatible).items():
        assert holds and all(holds), condition
    for condition, holds in _scratch_conditions(trained).items():
        assert holds and not any(holds), condition
    # what any saved state dict holds: the tied head, buffers of the model's own values
    for weights in (compatible, trained):
        assert np.array_equal(weights["lm_head.weight"], weights["wte.weight"])
        assert all(np.array_equal(w, np.tril(np.ones(w.shape[-2:]))[None, None]) for n, w in weights.items()
                   if n.endswith(".causal_mask"))
    # routed experts narrower than the shared one, o_proj's bias non-zero (DeepSeek carries it), an MTP head
    config = json.loads((HERE / "scratch-compatible" / "config.json").read_text())
    assert config["expert_intermediate_size"] < config["shared_expert_intermediate_size"]
    assert compatible["h.0.attn.o_proj.bias"].any()
    assert any(name.startswith("mtp_heads.0.") for name in compatible)


def test_scratch_trained_differs_only_where_the_conditions_look():
    compatible, trained = tensors("scratch-compatible"), tensors("scratch-trained")
    differ = {n for n in compatible if not np.array_equal(compatible[n], trained[n])}
    assert differ == {n for n in compatible if n == "wpe.weight" or n.endswith(("k_rope_proj.weight", ".expert_bias"))
                      or (".mlp." in n and n.endswith(".bias"))}


@pytest.mark.parametrize("name", ["scratch-compatible", "scratch-trained"])
def test_scratch_model_runs_the_scratch_fixtures(name):
    import torch

    from remap.parity.scratch_model import ScratchModel

    config = json.loads((HERE / name / "config.json").read_text())
    model = ScratchModel(config)
    model.load_state_dict({n: torch.from_numpy(w) for n, w in tensors(name).items()}, strict=True)
    with torch.no_grad():
        logits = model(torch.arange(8)[None]).logits
    assert torch.isfinite(logits).all() and logits.std() > 0.3

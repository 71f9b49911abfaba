"""hf -> mlx output files are byte-identical to mlx_lm.convert's for the same settings: every
safetensors file and model.safetensors.index.json, one file or several, float or quantized.

mlx_lm.convert runs in a child process, as its users run it; for several shards its own
make_shards is given a small limit there (it takes whole GiB: an int whose `<< 30` is smaller),
and remap the same limit in bytes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"

MLX_LM_CONVERT = r"""
import sys
import mlx_lm.utils as utils

limit = int(sys.argv[3])
if limit:
    class Limit(int):  # make_shards computes max_file_size_gb << 30
        def __lshift__(self, bits):
            return limit
    original = utils.make_shards
    utils.make_shards = lambda weights, max_file_size_gb=None: original(weights, Limit(0))
from mlx_lm.convert import convert
extra = sys.argv[4:]
convert(sys.argv[1], sys.argv[2], quantize=bool(extra), q_bits=int(extra[0]) if extra else 4,
        q_group_size=int(extra[1]) if extra else 64)
"""


def _digests(path: Path) -> dict[str, str]:
    """sha256 of the files both write: the weights and their index."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())
            if p.suffix == ".safetensors" or p.name == "model.safetensors.index.json"}


def _both(tmp_path: Path, fixture: str | Path, limit: int = 0, quantize: tuple = ()) -> tuple[dict, dict]:
    theirs, ours = tmp_path / "mlx_lm", tmp_path / "remap"
    subprocess.run([sys.executable, "-c", MLX_LM_CONVERT, FIXTURES / fixture, theirs, str(limit), *map(str, quantize)],
                   check=True, capture_output=True)
    flags = ["--max-shard-size", str(limit)] if limit else []
    if quantize:
        flags += ["-q", "--q-bits", str(quantize[0]), "--q-group-size", str(quantize[1])]
    run = subprocess.run([sys.executable, "-m", "remap.cli", "convert", FIXTURES / fixture, ours, "--to", "mlx",
                          "--quiet", *flags], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    return _digests(theirs), _digests(ours)


@pytest.mark.parametrize("fixture", ["hf-bf16", "hf-v32-bf16"])  # mlx_lm.convert refuses hf-fp8-mtp (its MTP layer)
def test_one_file_is_mlx_lm_converts_byte_for_byte(tmp_path, fixture):
    theirs, ours = _both(tmp_path, fixture)
    assert set(theirs) == {"model.safetensors", "model.safetensors.index.json"}
    assert ours == theirs


def test_several_shards_cut_and_laid_out_as_mlx_lm_does(tmp_path):
    theirs, ours = _both(tmp_path, "hf-bf16", limit=100_000)
    assert len([name for name in theirs if name.endswith(".safetensors")]) == 4
    assert ours == theirs


@pytest.mark.parametrize("bits,group", [(4, 64), (8, 32)])
def test_quantized_files_are_mlx_lm_converts_q(tmp_path, bits, group):
    theirs, ours = _both(tmp_path, "hf-bf16", limit=150_000, quantize=(bits, group))
    assert len(theirs) >= 3
    assert ours == theirs


# Not a fixture: more layers and experts, two dense layers, no q LoRA (q_proj, not q_a/q_b), read
# from several files with an index as save_pretrained writes a large model.
SYNTHETIC = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=5,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
    kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
    first_k_dense_replace=2, n_group=2, topk_group=1, max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from fixtures.generate import draw, train_tokenizer

    model = DeepseekV3ForCausalLM(DeepseekV3Config(**SYNTHETIC))
    with torch.no_grad():
        for key, param in model.named_parameters():
            param.copy_(torch.from_numpy(draw("synthetic-multi-shard", key, tuple(param.shape))))
    path = tmp_path_factory.mktemp("synthetic") / "hf"
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="300KB")
    train_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("quantize", [(), (4, 64)], ids=["float", "q4"])
def test_a_multi_shard_synthetic_model_is_mlx_lm_converts_byte_for_byte(tmp_path, synthetic, quantize):
    assert len(list(synthetic.glob("*.safetensors"))) > 1  # read from several files too
    theirs, ours = _both(tmp_path, synthetic, limit=50_000, quantize=quantize)
    assert len([name for name in theirs if name.endswith(".safetensors")]) >= 4
    assert ours == theirs


def test_verify_passes_on_an_mlx_output_and_resume_keeps_its_bytes(tmp_path):
    out = tmp_path / "out"
    run = [sys.executable, "-m", "remap.cli"]
    assert subprocess.run([*run, "convert", FIXTURES / "hf-bf16", out, "--to", "mlx", "--quiet",
                           "--max-shard-size", "100000"], cwd=ROOT).returncode == 0
    verified = subprocess.run([*run, "verify", out], cwd=ROOT, capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_an_mlx_model_quantized_is_mlx_lm_converts_q(tmp_path):
    """`remap convert MLX_MODEL OUT -q`, as `mlx_lm.convert --hf-path MLX_MODEL -q` quantizes an
    mlx-lm model: the route -q picks from mlx (mlx-dequantize, nothing to undo on float weights)."""
    theirs, ours = _both(tmp_path, "mlx", limit=150_000, quantize=(4, 64))
    assert len(theirs) >= 3
    assert ours == theirs

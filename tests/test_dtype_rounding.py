"""`--dtype bf16` rounds float32 as torch does: to nearest, ties to even, overflowing to Inf (with
--allow-nonfinite; without it a value past bf16's range is refused, naming the tensor).

The reference is torch's own float32 -> bfloat16 conversion, not remap's code: a cast that
truncated (kept the top 16 bits) would pass any test comparing remap with itself.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "hf-bf16"
F32_MAX = np.finfo(np.float32).max


def edge_values() -> np.ndarray:
    """float32 values where rounding and truncating differ, or where rounding is easy to get wrong."""
    one = np.float32(1)
    bf16_max = np.uint32(0x7F7F0000).view(np.float32)
    halfway_to_inf = np.uint32(0x7F7F8000).view(np.float32)  # between bf16's max and Inf
    values = [
        one + np.float32(2**-8),      # a tie, even neighbour below: 1.0
        one + np.float32(3 * 2**-8),  # a tie, even neighbour above: 1 + 2**-6
        one + np.float32(2**-8 + 2**-20),  # just past a tie: up
        one + np.float32(2**-8 - 2**-20),  # just short of a tie: down
        bf16_max, halfway_to_inf,     # exact; a tie whose even neighbour is Inf
        np.nextafter(halfway_to_inf, np.float32(0)),  # just below it: bf16's max
        F32_MAX,                      # past bf16's max: Inf
        np.float32(1e-40), np.float32(-1e-45),  # subnormals
        np.float32(-0.0), np.float32(0.0),
    ]
    return np.array(values + [-v for v in values], dtype=np.float32)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[dict, dict]:
    """The fixture in float32 with its embedding replaced by edge values and random bit patterns,
    converted with --dtype bf16: (source tensors, output tensors)."""
    work = tmp_path_factory.mktemp("bf16")
    source = Path(shutil.copytree(FIXTURE, work / "src"))
    tensors = {name: t.float() for name, t in load_file(source / "model.safetensors").items()}
    embed = tensors["model.embed_tokens.weight"]
    bits = np.random.default_rng(0).integers(0, 2**32, size=embed.numel(), dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32).copy()
    values[~np.isfinite(values)] = 1  # NaN payloads are not a rounding question
    edges = edge_values()
    values[: len(edges)] = edges
    tensors["model.embed_tokens.weight"] = torch.from_numpy(values.reshape(embed.shape))
    save_file(tensors, source / "model.safetensors", {"format": "pt"})
    command = [sys.executable, "-m", "remap.cli", "convert", str(source), str(work / "out"), "--spec", "hf-to-mlx",
               "--dtype", "bf16", "--quiet"]
    refused = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and f"{source}: tensor 'model.embed_tokens.weight'" in refused.stderr, refused.stderr
    assert "cast to BF16: finite values out of its range would become Inf or NaN" in refused.stderr
    assert not (work / "out").exists()
    run = subprocess.run([*command, "--allow-nonfinite", "--force"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    return tensors, load_file(work / "out" / "model.safetensors")


def bits16(tensor) -> np.ndarray:
    return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)


def test_bf16_cast_rounds_to_nearest_even_as_torch_does(converted):
    source, output = converted
    carried = [name for name in output if name in source and output[name].shape == source[name].shape]
    assert "model.embed_tokens.weight" in carried and len(carried) > 20
    for name in carried:
        assert output[name].dtype == torch.bfloat16
        expected = bits16(source[name].to(torch.bfloat16))
        np.testing.assert_array_equal(bits16(output[name]), expected, err_msg=name)


def test_the_values_tell_rounding_from_truncating(converted):
    """The check above could not pass a truncating cast: the edge values round differently."""
    source, output = converted
    edges = edge_values()
    got = bits16(output["model.embed_tokens.weight"]).reshape(-1)[: len(edges)]
    truncated = (edges.view(np.uint32) >> 16).astype(np.uint16)
    assert (got != truncated).sum() >= 8
    as_float = output["model.embed_tokens.weight"].reshape(-1)[: len(edges)].float().numpy()
    assert as_float[0] == 1 and as_float[1] == 1 + 2**-6  # ties go to the even neighbour
    assert as_float[4] == np.uint32(0x7F7F0000).view(np.float32) and np.isposinf(as_float[5]) and np.isposinf(as_float[7])
    assert as_float[6] == as_float[4]

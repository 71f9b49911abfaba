"""remap.io against safetensors, torch, huggingface_hub and transformers themselves."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

import remap
from remap.errors import RemapError
from remap.io import (
    ShardWriter,
    atomic_output,
    open_checkpoint,
    plan_shards,
    read_header,
    safetensors_dtype,
    sha256_file,
    shard_is_complete,
    write_index,
)
from remap.io.atomic import refuse_overlap

RNG = np.random.default_rng(0)


def sample_tensors() -> dict[str, np.ndarray]:
    """One of each dtype remap meets, plus the awkward shapes."""
    return {
        "model.layers.0.mlp.gate_proj.weight": RNG.standard_normal((6, 4)).astype(ml_dtypes.bfloat16),
        "model.layers.0.mlp.gate_proj.weight_scale_inv": RNG.random((1, 1), dtype=np.float32),
        "model.layers.0.self_attn.q_proj.weight": RNG.standard_normal((4, 4)).astype(ml_dtypes.float8_e4m3fn),
        "model.layers.0.switch_mlp.weight": RNG.integers(0, 2**32, (3, 2), dtype=np.uint32),
        "model.norm.weight": RNG.standard_normal(4).astype(np.float16),
        "lm_head.bias": RNG.standard_normal(5),
        "step": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 3), np.float32),
        "mask": np.array([True, False, True]),
        "é_unicode": np.arange(3, dtype=np.int8),
    }


def entries_of(tensors: dict[str, np.ndarray]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(name, safetensors_dtype(array.dtype.name), array.shape) for name, array in tensors.items()]


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bytes (NaN-safe, works for bf16/fp8)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def write_file(path: Path, header: bytes | dict, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def u8(shape: list, offsets: list) -> dict:
    return {"dtype": "U8", "shape": shape, "data_offsets": offsets}


# --------------------------------------------------------------------------- headers


def test_read_header_matches_safetensors(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})

    infos, metadata = read_header(path)

    assert metadata == {"format": "pt"}
    assert set(infos) == set(tensors)
    raw = path.read_bytes()
    with safe_open(path, "numpy") as f:
        for name, info in infos.items():
            view = f.get_slice(name)
            assert (info.dtype, list(info.shape)) == (view.get_dtype(), view.get_shape())
            assert info.nbytes == tensors[name].nbytes == info.end - info.start
            assert raw[info.start : info.end] == tensors[name].tobytes()
    assert [i.start for i in infos.values()] == sorted(i.start for i in infos.values())  # file order


def test_read_header_without_metadata(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": np.ones(2, np.float32)}, path)
    assert read_header(path)[1] == {}


BAD_HEADERS = {
    "file shorter than the length field": (b"", None, b"", "too short"),
    "header length past the end": ({"a": u8([1], [0, 1])}, 4096, b"x", "truncated"),
    "absurd header length": (b"{}", 2**62, b"", "at most 100000000"),
    "not UTF-8": (b'{"\xff":1}', None, b"", "not UTF-8"),
    "not JSON": (b'{"a": {', None, b"", "not valid JSON"),
    "not an object": (b"[1, 2]", None, b"", "JSON list"),
    "duplicate tensor name": (
        b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
        None,
        b"xy",
        "'a' twice",
    ),
    "metadata not strings": ({"__metadata__": {"n": 1}}, None, b"", "map of strings"),
    "entry not an object": ({"a": [1]}, None, b"", "JSON list"),
    "unknown dtype": ({"a": {"dtype": "F12", "shape": [1], "data_offsets": [0, 1]}}, None, b"x", "unknown dtype 'F12'"),
    "negative dimension": ({"a": u8([-1], [0, 1])}, None, b"x", "non-negative integers"),
    "fractional dimension": ({"a": u8([1.5], [0, 1])}, None, b"x", "non-negative integers"),
    "boolean dimension": ({"a": u8([True], [0, 1])}, None, b"x", "non-negative integers"),
    "offsets reversed": ({"a": u8([0], [1, 0])}, None, b"x", "[begin, end]"),
    "offsets not a pair": ({"a": u8([1], [0])}, None, b"x", "[begin, end]"),
    "span does not match shape": ({"a": u8([2], [0, 3])}, None, b"xyz", "needs 2"),
    "sub-byte size": ({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}}, None, b"x", "whole bytes"),
    "data past the end": ({"a": u8([4], [0, 4])}, None, b"xy", "truncated"),
    "overlapping tensors": ({"a": u8([2], [0, 2]), "b": u8([2], [1, 3])}, None, b"xyz", "overlaps tensor 'a'"),
    "gap between tensors": ({"a": u8([1], [0, 1]), "b": u8([1], [2, 3])}, None, b"xyz", "gap of 1"),
    "data not covered": ({"a": u8([1], [0, 1])}, None, b"xyz", "belong to no tensor"),
}


@pytest.mark.parametrize("case", BAD_HEADERS, ids=list(BAD_HEADERS))
def test_read_header_rejects(tmp_path, case):
    header, length, data, message = BAD_HEADERS[case]
    path = tmp_path / "bad.safetensors"
    if case == "file shorter than the length field":
        path.write_bytes(b"\x01\x02\x03")
    else:
        write_file(path, header, data, length)

    with pytest.raises(RemapError, match=message) as caught:
        read_header(path)
    assert caught.value.file == str(path)

    # safetensors itself rejects all of these but a duplicate name, where its last entry wins silently
    if case != "duplicate tensor name":
        with pytest.raises(Exception):
            safe_open(path, "numpy")


def test_read_header_names_the_tensor(tmp_path):
    path = write_file(tmp_path / "bad.safetensors", {"ok": u8([1], [0, 1]), "w": u8([3], [1, 3])}, b"xyz")
    with pytest.raises(RemapError) as caught:
        read_header(path)
    assert caught.value.tensor == "w"
    assert str(caught.value).startswith(f"{path}: tensor 'w': ")


def test_read_header_does_not_read_the_data(tmp_path):
    # a 4 GiB tensor in a sparse file: a header read or a mapped view costs nothing; a copy would show
    path = tmp_path / "big.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**30], "data_offsets": [0, 2**32]}}).encode()
    write_file(path, header)
    os.truncate(path, 8 + len(header) + 2**32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    with open_checkpoint(str(path)) as checkpoint:
        array = checkpoint.read("w")
        assert array.shape == (2**30,) and array[12345] == 0 and mapped_by_mmap(array)

    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB
    del array


# --------------------------------------------------------------------------- checkpoints


def mapped_by_mmap(array: np.ndarray) -> bool:
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


def test_read_values_and_dtypes(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "m.safetensors")
    with open_checkpoint(str(tmp_path / "m.safetensors")) as checkpoint:
        for name, expected in tensors.items():
            array = checkpoint.read(name)
            assert same(array, expected), name
            assert bytes(checkpoint.read_bytes(name)) == expected.tobytes()
        bf16 = checkpoint.read("model.layers.0.mlp.gate_proj.weight")
        assert bf16.dtype == ml_dtypes.bfloat16 and mapped_by_mmap(bf16) and not bf16.flags.writeable
        fp8 = checkpoint.read("model.layers.0.self_attn.q_proj.weight")
        assert fp8.dtype == ml_dtypes.float8_e4m3fn
        np.testing.assert_array_equal(
            fp8.astype(np.float32), tensors["model.layers.0.self_attn.q_proj.weight"].astype(np.float32)
        )
    assert array.sum() == expected.sum()  # arrays outlive close()


@pytest.mark.parametrize("libc, preadv", [(True, True), (False, True), (False, False)],
                         ids=["mapped", "no-libc", "no-libc-no-preadv"])
def test_load_is_a_private_writable_copy_and_a_short_file_an_error(tmp_path, monkeypatch, libc, preadv):
    """load() maps the tensor's pages copy-on-write (or, with no POSIX libc to map them, as on
    Windows, reads them into memory of its own, by preadv or, where there is none, a seek and a
    read): the values of every dtype, writable, and a write changes neither the file nor the next
    load. A file cut short since it was opened is a RemapError, not a fault when the missing page
    is touched."""
    if not libc:
        from remap.io import pages

        monkeypatch.setattr(pages, "_libc", lambda: ctypes.CDLL("no-such-libc.so"))
    if not preadv:
        monkeypatch.delattr(os, "preadv")
    tensors = sample_tensors()
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    before = path.read_bytes()
    with open_checkpoint(str(path)) as checkpoint:
        for name, expected in tensors.items():
            assert same(checkpoint.load(name), expected), name
        name = "model.layers.0.mlp.gate_proj.weight"
        loaded = checkpoint.load(name)
        assert loaded.flags.writeable
        loaded[...] = 0
        assert path.read_bytes() == before
        assert same(checkpoint.load(name), tensors[name]) and same(checkpoint.read(name), tensors[name])
        if libc and os.path.exists("/proc/self/maps"):  # the pages are unmapped with the array; no descriptor stays open
            mapped = lambda: open("/proc/self/maps").read().count(str(path))  # noqa: E731
            fds = len(os.listdir("/proc/self/fd"))
            held = [checkpoint.load(name) for _ in range(50)]
            assert mapped() >= 50 and len(os.listdir("/proc/self/fd")) <= fds
            del held, loaded
            assert mapped() <= 1  # (read()'s own mapping of the whole file)
        last = max(checkpoint.tensors.values(), key=lambda info: info.end)
        os.truncate(path, last.end - 1)
        with pytest.raises(RemapError, match="file ended inside the tensor"):
            checkpoint.load(last.name)


def save_sharded(root: Path, shards: dict[str, dict[str, np.ndarray]], index: dict | None = None) -> None:
    root.mkdir(exist_ok=True)
    for file, tensors in shards.items():
        save_file(tensors, root / file)
    if index is not None:
        (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))


TWO_SHARDS = {
    "model-00001-of-00002.safetensors": {"a": np.ones((2, 2), np.float32), "b": np.zeros(3, ml_dtypes.bfloat16)},
    "model-00002-of-00002.safetensors": {"c": np.arange(4, dtype=np.int32)},
}
TWO_SHARDS_INDEX = {name: file for file, tensors in TWO_SHARDS.items() for name in tensors}


def test_directory_with_index(tmp_path):
    save_sharded(tmp_path, TWO_SHARDS, TWO_SHARDS_INDEX)
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v3"}')
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        (tmp_path / extra).write_text("{}")

    with open_checkpoint(str(tmp_path)) as checkpoint:
        assert checkpoint.config == {"model_type": "deepseek_v3"}
        assert set(checkpoint.tensors) == {"a", "b", "c"}
        assert list(checkpoint.files) == list(TWO_SHARDS)
        assert [p.name for p in checkpoint.extra_files] == [
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
        assert checkpoint.revision is None and checkpoint.root == tmp_path
        assert same(checkpoint.read("c"), TWO_SHARDS["model-00002-of-00002.safetensors"]["c"])
        assert checkpoint.tensors["c"].file == tmp_path / "model-00002-of-00002.safetensors"


def test_directory_without_index(tmp_path):
    save_sharded(tmp_path, TWO_SHARDS)
    with open_checkpoint(str(tmp_path)) as checkpoint:
        assert set(checkpoint.tensors) == {"a", "b", "c"}
        assert checkpoint.config is None
        assert same(checkpoint.read("b"), np.zeros(3, ml_dtypes.bfloat16))


def test_directory_without_index_rejects_a_name_in_two_files(tmp_path):
    save_sharded(tmp_path, {"x.safetensors": {"a": np.ones(1)}, "y.safetensors": {"a": np.ones(1)}})
    with pytest.raises(RemapError, match="both x.safetensors and y.safetensors") as caught:
        open_checkpoint(str(tmp_path))
    assert caught.value.tensor == "a"


def test_single_file_reads_config_beside_it(tmp_path):
    save_file({"w": np.ones(2, np.float32)}, tmp_path / "weights.safetensors")
    (tmp_path / "config.json").write_text('{"hidden_size": 2}')
    checkpoint = open_checkpoint(str(tmp_path / "weights.safetensors"))
    assert checkpoint.config == {"hidden_size": 2}
    assert list(checkpoint.files) == ["weights.safetensors"]


@pytest.mark.parametrize(
    "index, message",
    [
        ({**TWO_SHARDS_INDEX, "c": "model-00003-of-00003.safetensors"}, "does not exist"),
        ({**TWO_SHARDS_INDEX, "c": "../model-00002-of-00002.safetensors"}, "outside the checkpoint"),
        ({**TWO_SHARDS_INDEX, "c": "/etc/model.safetensors"}, "outside the checkpoint"),
        ({**TWO_SHARDS_INDEX, "c": "sub/../../x.safetensors"}, "outside the checkpoint"),
        ({**TWO_SHARDS_INDEX, "d": "model-00002-of-00002.safetensors"}, "does not hold it"),
        ({k: v for k, v in TWO_SHARDS_INDEX.items() if k != "b"}, "the index does not list it"),
        ({**TWO_SHARDS_INDEX, "c": "model-00001-of-00002.safetensors"}, "does not hold it"),
    ],
    ids=["missing file", "dotdot", "absolute", "nested dotdot", "tensor not in file", "not in index", "wrong file"],
)
def test_index_errors(tmp_path, index, message):
    save_sharded(tmp_path, TWO_SHARDS, index)
    with pytest.raises(RemapError, match=message) as caught:
        open_checkpoint(str(tmp_path))
    assert caught.value.file == str(tmp_path / "model.safetensors.index.json")
    assert caught.value.tensor is not None


def test_index_rejects_a_tensor_in_two_files(tmp_path):
    shards = {**TWO_SHARDS, "model-00002-of-00002.safetensors": {"a": np.ones((2, 2), np.float32), "c": np.ones(1)}}
    save_sharded(tmp_path, shards, TWO_SHARDS_INDEX)
    with pytest.raises(RemapError, match="the index puts it in model-00001-of-00002.safetensors") as caught:
        open_checkpoint(str(tmp_path))
    assert caught.value.tensor == "a"


@pytest.mark.parametrize("text", ["{not json", "[1]"])
def test_bad_config_json(tmp_path, text):
    save_sharded(tmp_path, TWO_SHARDS)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(RemapError) as caught:
        open_checkpoint(str(tmp_path))
    assert caught.value.file == str(tmp_path / "config.json")


def test_missing_source_and_local_revision(tmp_path):
    with pytest.raises(RemapError, match="no such file"):
        open_checkpoint(str(tmp_path / "nothing"))
    save_sharded(tmp_path, TWO_SHARDS)
    with pytest.raises(RemapError, match="revision"):
        open_checkpoint(str(tmp_path), revision="main")


def test_deepseek_model_parallel_files_stay_per_rank(tmp_path):
    # as DeepSeek's convert.py writes them: shared tensors repeat per rank, experts only on theirs
    ranks = {
        "model0-mp2.safetensors": {"embed.weight": np.zeros((2, 4), np.float32), "ffn.experts.0.w1.weight": np.ones(1)},
        "model1-mp2.safetensors": {"embed.weight": np.ones((2, 4), np.float32), "ffn.experts.1.w1.weight": np.ones(1)},
    }
    save_sharded(tmp_path, ranks)
    with open_checkpoint(str(tmp_path)) as checkpoint:
        assert checkpoint.ranks == 2
        assert list(checkpoint.files) == list(ranks)
        rank1 = checkpoint.files["model1-mp2.safetensors"]["embed.weight"]
        assert same(checkpoint.read(rank1), np.ones((2, 4), np.float32))
        with pytest.raises(RemapError, match="2 ranks"):
            checkpoint.tensors

    (tmp_path / "model1-mp2.safetensors").rename(tmp_path / "model2-mp2.safetensors")
    with pytest.raises(RemapError, match="one complete set"):
        open_checkpoint(str(tmp_path))


def test_assembled_checkpoint_reads_whole_tensors_from_their_pieces(tmp_path):
    """What a layout says of the pieces (file, dim) is all io needs: cut pieces concatenate,
    copies are compared bitwise (NaN equals NaN), a tensor in one file is that file's span."""
    from types import SimpleNamespace as Piece

    from remap.io.assembled import assembled

    w = np.arange(24, dtype=np.float32).reshape(4, 6)
    norm = np.array([1, np.nan, 3], np.float32)
    ranks = {"model0-mp2.safetensors": {"w": w[:, :3].copy(), "norm": norm, "e0": np.full(2, 5, np.int32)},
             "model1-mp2.safetensors": {"w": w[:, 3:].copy(), "norm": norm, "e1": np.zeros(2, ml_dtypes.bfloat16)}}
    save_sharded(tmp_path, ranks)
    placed = {"w": [Piece(file=f, dim=1) for f in ranks], "norm": [Piece(file=f, dim=None) for f in ranks],
              "e0": [Piece(file="model0-mp2.safetensors", dim=None)], "e1": [Piece(file="model1-mp2.safetensors", dim=None)]}
    with open_checkpoint(str(tmp_path)) as base:
        whole = assembled(base, placed)
        assert {n: t.shape for n, t in whole.tensors.items()} == {"w": (4, 6), "norm": (3,), "e0": (2,), "e1": (2,)}
        assert same(whole.read("w"), w) and same(whole.load("w"), w) and bytes(whole.read_bytes("w")) == w.tobytes()
        assert same(whole.load("norm"), norm) and same(whole.read("e1"), np.zeros(2, ml_dtypes.bfloat16))
        assert whole.tensors["e0"] is base.files["model0-mp2.safetensors"]["e0"]  # movable as raw bytes
        assert same(whole.read(whole.files["model1-mp2.safetensors"]["w"]), w[:, 3:])  # one piece, by its info
        with pytest.raises(RemapError, match="1 tensors are not placed"):
            assembled(base, {n: p for n, p in placed.items() if n != "e1"})

    ranks["model1-mp2.safetensors"]["norm"] = np.array([1, np.nan, 4], np.float32)
    save_sharded(tmp_path, ranks)
    with open_checkpoint(str(tmp_path)) as base, pytest.raises(RemapError, match="copy in model1-mp2.safetensors differs"):
        assembled(base, placed).load("norm")


class CustomStateDict(dict):
    """A dict subclass: pickled by reference to this module, so weights_only refuses it."""


def test_torch_state_dict(tmp_path):
    state = {
        "w_bf16": torch.randn(3, 4).to(torch.bfloat16),
        "w_fp8": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "w_f32_transposed": torch.randn(4, 3).t(),
        "p": torch.nn.Parameter(torch.ones(2)),
    }
    torch.save(state, tmp_path / "model.pt")

    with open_checkpoint(str(tmp_path / "model.pt")) as checkpoint:
        infos = checkpoint.tensors
        dtypes = {name: info.dtype for name, info in infos.items()}
        assert dtypes == {"w_bf16": "BF16", "w_fp8": "F8_E4M3", "w_f32_transposed": "F32", "p": "F32"}
        assert infos["w_bf16"].shape == (3, 4) and infos["w_bf16"].start is None
        for name, tensor in state.items():
            array = checkpoint.read(name)
            np.testing.assert_array_equal(array.astype(np.float32), tensor.detach().float().numpy())
            assert bytes(checkpoint.read_bytes(name)) == array.tobytes()
        assert checkpoint.read("w_bf16").dtype == ml_dtypes.bfloat16
        assert checkpoint.read("w_fp8").dtype == ml_dtypes.float8_e4m3fn


def test_torch_pickle_is_refused_unless_allowed(tmp_path):
    path = tmp_path / "custom.pt"
    torch.save(CustomStateDict(w=torch.ones(2)), path)
    with pytest.raises(RemapError, match="pickle code") as caught:
        open_checkpoint(str(path))
    assert caught.value.file == str(path)
    assert same(open_checkpoint(str(path), allow_pickle=True).read("w"), np.ones(2, np.float32))


def test_torch_non_tensor_values_are_refused(tmp_path):
    torch.save({"model": {"w": torch.ones(1)}, "step": 3}, tmp_path / "train.pt")
    with pytest.raises(RemapError, match="holds a dict under the key 'model'"):
        open_checkpoint(str(tmp_path / "train.pt"))


def test_torch_garbage_file(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(RemapError, match="not a torch.save zip"):
        open_checkpoint(str(tmp_path / "junk.bin"))


def make_hub_cache(hub: Path, repo: str, commit: str, files: dict[str, bytes]) -> None:
    """The huggingface_hub cache layout: content-addressed blobs, a snapshot of symlinks, refs."""
    folder = hub / ("models--" + repo.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True)
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    for name, content in files.items():
        blob = hashlib.sha256(content).hexdigest()
        (folder / "blobs" / blob).write_bytes(content)
        (folder / "snapshots" / commit / name).symlink_to(Path("../../blobs") / blob)


HUB_PROBE = """
import json, sys
import remap
from remap.errors import RemapError
from remap.io import open_checkpoint
try:
    c = open_checkpoint(sys.argv[1], revision=sys.argv[2] if len(sys.argv) > 2 else None)
except RemapError as e:
    print(json.dumps({"error": str(e)}))
else:
    print(json.dumps({"revision": c.revision, "tensors": sorted(c.tensors), "config": c.config,
                      "extra": [p.name for p in c.extra_files], "sum": float(c.read("a").sum())}))
"""


def probe_hub(tmp_path: Path, *args: str) -> dict:
    repo_root = str(Path(remap.__file__).parents[1])
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": repo_root}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run(
        [sys.executable, "-c", HUB_PROBE, *args], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(result.stdout)


def test_hub_repo_from_offline_cache(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    shard = tmp_path / "shard.safetensors"
    save_file({"a": np.full(3, 2.0, np.float32)}, shard)
    make_hub_cache(
        tmp_path / "hf" / "hub",
        "org/tiny",
        commit,
        {"model.safetensors": shard.read_bytes(), "config.json": b'{"hidden_size": 3}', "tokenizer.json": b"{}"},
    )

    for revision in ((), ("main",), (commit,)):
        found = probe_hub(tmp_path, "org/tiny", *revision)
        assert found == {
            "revision": commit,
            "tensors": ["a"],
            "config": {"hidden_size": 3},
            "extra": ["tokenizer.json"],
            "sum": 6.0,
        }
    assert "not in the local cache" in probe_hub(tmp_path, "org/absent")["error"]


def test_a_hub_error_of_several_lines_is_said_on_one(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files.\nRequest ID: abc")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(RemapError) as caught:
        open_checkpoint("org/absent")
    assert str(caught.value).startswith("org/absent: no such local path")
    assert "Cannot find the requested files. Request ID: abc (expected" in str(caught.value)


# --------------------------------------------------------------------------- writer


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}])
def test_writer_is_byte_identical_to_safetensors(tmp_path, metadata):
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "reference.safetensors", metadata=metadata)

    with ShardWriter(tmp_path / "ours.safetensors", entries_of(tensors), metadata) as shard:
        for name in reversed(list(tensors)):  # arrival order does not matter
            shard.write(name, tensors[name])

    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_writer_takes_pieces_at_offsets(tmp_path):
    stacked = RNG.standard_normal((4, 3, 5)).astype(ml_dtypes.bfloat16)  # [experts, out, in]
    other = RNG.standard_normal(7).astype(np.float32)
    save_file({"experts": stacked, "other": other}, tmp_path / "reference.safetensors")
    save_file({"other": other}, tmp_path / "source.safetensors")

    with open_checkpoint(str(tmp_path / "source.safetensors")) as source:
        with ShardWriter(tmp_path / "ours.safetensors", entries_of({"experts": stacked, "other": other})) as shard:
            for e in (2, 0, 3, 1):
                shard.write("experts", stacked[e], offset=e * stacked[e].nbytes)
            raw = source.read_bytes("other")  # moved without decoding
            shard.write("other", raw[8:], offset=8)
            shard.write("other", raw[:8])

    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def _pieces_in(order: str) -> tuple[dict, list]:
    """A stacked tensor written expert by expert, and a small one: (tensors, (name, piece, offset) in `order`)."""
    stacked = RNG.standard_normal((16, 64, 33)).astype(np.float32)
    small = RNG.standard_normal(5).astype(ml_dtypes.bfloat16)
    pieces = [("experts", stacked[e], e * stacked[e].nbytes) for e in range(len(stacked))] + [("small", small, 0)]
    pieces = {"in order": pieces, "reversed": pieces[::-1],
              "shuffled": [pieces[i] for i in RNG.permutation(len(pieces))]}[order]
    return {"experts": stacked, "small": small}, pieces


@pytest.mark.parametrize("order", ["in order", "reversed", "shuffled"])
def test_writer_checksum_is_the_files_sha256_whatever_the_order_and_threads(tmp_path, order):
    """Pieces land in any order from several threads; the hash follows the written prefix and
    equals sha256 of the finished file."""
    from concurrent.futures import ThreadPoolExecutor

    tensors, pieces = _pieces_in(order)
    path = tmp_path / "out.safetensors"
    shard = ShardWriter(path, entries_of(tensors), {"format": "pt"}, checksum=True)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda piece: shard.write(*piece[:2], offset=piece[2]), pieces))
    shard.close()
    assert shard.digest == hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_by_hand(data: bytes, chunk: int) -> str:
    """The tree digest as its definition says: sha256 of the chunks' sha256 digests, in order."""
    return hashlib.sha256(b"".join(hashlib.sha256(data[k:k + chunk]).digest()
                                   for k in range(0, len(data), chunk))).hexdigest()


def _written_on_threads(path: Path, order: str, checksum: str) -> ShardWriter:
    """A file written piece by piece in `order` from 4 threads, with `checksum`, and closed."""
    from concurrent.futures import ThreadPoolExecutor

    tensors, pieces = _pieces_in(order)
    shard = ShardWriter(path, entries_of(tensors), {"format": "pt"}, checksum=checksum)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda piece: shard.write(*piece[:2], offset=piece[2]), pieces))
    shard.close()
    return shard


@pytest.mark.parametrize("order", ["in order", "reversed", "shuffled"])
def test_writer_tree_digest_whatever_the_order_and_threads(tmp_path, monkeypatch, order):
    """With the tree hash, chunks are hashed as each fills, in any order, on the shared pool; the
    digest equals the definition's, computed here from the finished file's bytes, and so does
    tree_file's read-back of the finished file. (Chunks of 1000 bytes: many per file, a header
    chunk and a short last one.)"""
    from remap.io import hashing

    monkeypatch.setattr(hashing, "CHUNK", 1000)
    path = tmp_path / "out.safetensors"
    shard = _written_on_threads(path, order, hashing.TREE)
    data = path.read_bytes()
    assert len(data) > 100 * 1000 and len(data) % 1000
    assert shard.digest == _tree_by_hand(data, 1000) == hashing.tree_file(path)
    assert shard.digest != _tree_by_hand(data[:-1] + bytes([data[-1] ^ 1]), 1000)


@pytest.mark.parametrize("order", ["in order", "shuffled"])
def test_writer_blake3_digest_is_the_whole_file_s_whatever_the_order(tmp_path, order):
    """The default digest follows the bytes written from the start, pieces landing in any order:
    it is the blake3 library's digest of the finished file (what b3sum prints), and so is
    file_digest's read-back; the empty file's too."""
    from blake3 import blake3

    from remap.io import hashing

    path = tmp_path / "out.safetensors"
    shard = _written_on_threads(path, order, hashing.BLAKE3)
    data = path.read_bytes()
    assert shard.digest == blake3(data).hexdigest() == hashing.file_digest(path, "blake3")
    assert shard.digest != blake3(data[:-1] + bytes([data[-1] ^ 1])).hexdigest()
    path.write_bytes(b"")
    assert hashing.file_digest(path, "blake3") == blake3(b"").hexdigest()


def test_tree_digest_of_small_and_empty_files(tmp_path):
    """One chunk: sha256 of the file's sha256 (not the plain sha256, which the manifest names
    apart); no bytes: sha256 of nothing."""
    from remap.io import hashing

    path = tmp_path / "blob"
    path.write_bytes(os.urandom(1000))
    plain = hashlib.sha256(path.read_bytes())
    assert hashing.file_digest(path, "sha256-tree-64MiB") == hashlib.sha256(plain.digest()).hexdigest()
    assert hashing.file_digest(path, "sha256") == plain.hexdigest()
    path.write_bytes(b"")
    assert hashing.tree_file(path) == hashlib.sha256(b"").hexdigest()


def test_writer_tree_digest_that_cannot_read_back_fails_the_file(tmp_path, monkeypatch):
    def broken(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "preadv", broken)
    path = tmp_path / "out.safetensors"
    shard = ShardWriter(path, [("a", "F32", (4,))], checksum="sha256-tree-64MiB")
    shard.write("a", np.ones(4, np.float32))
    with pytest.raises(RemapError, match="Input/output error") as caught:
        shard.close()
    assert str(path) in str(caught.value) and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
@pytest.mark.parametrize("order", ["in order", "shuffled"])
@pytest.mark.parametrize("how", ["write", "copy_from", "no mmap"])
def test_writer_hash_while_writing_equals_hashing_the_finished_file(tmp_path, monkeypatch, algorithm, order, how):
    """The following hash reads what was written through mapped windows of the file, told of
    the bytes in steps as they land (write() and copy_from() alike); where the file cannot be
    mapped it reads into a buffer. Windows of two pages and steps of 1000 bytes: pieces span
    steps and windows, and steps end inside pages. Whatever the order, the digest is the
    finished file's."""
    from blake3 import blake3

    from remap.io import hashing, writer

    monkeypatch.setattr(hashing, "_WINDOW", 2 * mmap.ALLOCATIONGRANULARITY)
    monkeypatch.setattr(writer, "_STEP", 1000)
    if how == "no mmap":
        def unmappable(*args, **kwargs):
            raise OSError(19, "No such device")
        monkeypatch.setattr(hashing.mmap, "mmap", unmappable)
    tensors, pieces = _pieces_in(order)
    source = tmp_path / "source.bin"
    source.write_bytes(b"".join(np.ascontiguousarray(piece).tobytes() for _, piece, _ in pieces))
    path = tmp_path / "out.safetensors"
    shard = ShardWriter(path, entries_of(tensors), {"format": "pt"}, checksum=algorithm)
    start = 0
    for name, piece, offset in pieces:
        if how == "copy_from":
            shard.copy_from(name, source, start, piece.nbytes, offset)
        else:
            shard.write(name, piece, offset)
        start += piece.nbytes
    shard.close()
    data = path.read_bytes()
    assert len(data) > 10 * hashing._WINDOW
    read = _tensors_of(path)
    assert read.keys() == tensors.keys() and all(read[n].tobytes() == tensors[n].tobytes() for n in tensors)
    whole = {"blake3": blake3, "sha256": hashlib.sha256}[algorithm]
    assert shard.digest == whole(data).hexdigest() == hashing.file_digest(path, algorithm)


def _tensors_of(path: Path) -> dict:
    with safe_open(path, "np") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_writer_checksum_that_cannot_read_back_fails_the_file(tmp_path, monkeypatch):
    """A hash that could not follow the writing (here: the file cannot be mapped, and the
    read-back into a buffer fails) never yields a digest of part of the file: close() raises,
    naming the file, and leaves nothing under its name."""
    from remap.io import hashing

    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(hashing.mmap, "mmap", broken)
    monkeypatch.setattr(os, "preadv", broken)
    path = tmp_path / "out.safetensors"
    shard = ShardWriter(path, [("a", "F32", (4,))], checksum=True)
    shard.write("a", np.ones(4, np.float32))
    with pytest.raises(RemapError, match="Input/output error") as caught:
        shard.close()
    assert str(path) in str(caught.value) and list(tmp_path.iterdir()) == []


def test_writer_incomplete_leaves_no_file(tmp_path):
    path = tmp_path / "out.safetensors"
    shard = ShardWriter(path, [("a", "F32", (4,)), ("b", "F32", (2,)), ("z", "F32", (0,))])
    shard.write("a", np.ones(2, np.float32))
    with pytest.raises(RemapError, match=r"2 tensors not fully written: 'a' \(8 bytes\), 'b' \(8 bytes\)"):
        shard.close()
    assert list(tmp_path.iterdir()) == []


class _Fallocate:
    """libc with a fallocate that fails with `error`, the rest the real one's."""

    def __init__(self, error: int):
        self.error, self.calls = error, []

    def fallocate(self, fd, mode, offset, length):
        self.calls.append((mode, offset, length))
        ctypes.set_errno(self.error)
        return -1


def test_writer_reserves_the_file_on_disk_before_its_first_byte(tmp_path):
    """The file's blocks are allocated when it is opened, not as pieces land (a full disk fails
    before a 1 TB conversion's first tensor, and a copy writes into allocated blocks)."""
    from remap.io.libc import reserve

    fd = os.open(tmp_path / "probe", os.O_RDWR | os.O_CREAT)
    try:
        if not reserve(fd, 1 << 20):
            pytest.skip("this file system has no fallocate")
    finally:
        os.close(fd)
    tensors = {"big": np.ones(1 << 18, np.float32), "small": np.ones(3, np.float32)}
    with ShardWriter(tmp_path / "m.safetensors", entries_of(tensors)) as shard:
        (incomplete,) = tmp_path.glob("m.safetensors.*")
        assert incomplete.stat().st_blocks * 512 >= incomplete.stat().st_size >= 1 << 20
        for name, array in tensors.items():
            shard.write(name, array)
    save_file(tensors, tmp_path / "reference.safetensors")
    assert (tmp_path / "m.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_writer_on_a_full_disk_fails_at_open_naming_the_file_and_its_size(tmp_path, monkeypatch):
    from remap.io import libc

    fake = _Fallocate(errno.ENOSPC)
    monkeypatch.setattr(libc, "libc", lambda: fake)
    entries = [("a", "F32", (1000,))]
    with pytest.raises(RemapError) as caught:
        ShardWriter(tmp_path / "out.safetensors", entries)
    size = fake.calls[0][2]
    assert fake.calls == [(0, 0, size)] and size > 4000
    assert "No space left on device" in str(caught.value) and f"needs {size:,} bytes" in str(caught.value)
    assert caught.value.file == str(tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, None],
                         ids=["EOPNOTSUPP", "ENOSYS", "EINVAL", "no fallocate"])
def test_writer_where_nothing_can_be_reserved_writes_a_sparse_file(tmp_path, monkeypatch, error):
    """A file system without fallocate (or a platform without the call) is no error: the file
    is written as it would be without."""
    from remap.io import libc

    monkeypatch.setattr(libc, "libc", (lambda: _Fallocate(error)) if error else (lambda: object()))
    tensors = sample_tensors()
    with ShardWriter(tmp_path / "ours.safetensors", entries_of(tensors)) as shard:
        for name, array in tensors.items():
            shard.write(name, array)
    save_file(tensors, tmp_path / "reference.safetensors")
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_writer_exception_leaves_no_file(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(tmp_path / "out.safetensors", [("a", "F32", (1,))]) as shard:
            shard.write("a", np.ones(1, np.float32))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name, piece, offset, message",
    [
        ("a", np.ones(2, np.float32), 4, "overlap"),
        ("a", np.ones(4, np.float32), 4, "does not fit"),
        ("a", np.ones(1, np.float32), -4, "does not fit"),
        ("a", np.ones(1, np.float64), 8, "piece is float64"),
        ("a", np.ones(1, ">f4"), 8, "piece is >f4"),
        ("nope", np.ones(1, np.float32), 0, "not a tensor of this file"),
    ],
)
def test_writer_rejects_bad_pieces(tmp_path, name, piece, offset, message):
    with ShardWriter(tmp_path / "out.safetensors", [("a", "F32", (4,))]) as shard:
        shard.write("a", np.ones(2, np.float32))
        with pytest.raises(RemapError, match=message):
            shard.write(name, piece, offset)
        shard.write("a", np.ones(2, np.float32), offset=8)


def test_shard_is_complete(tmp_path):
    entries = [("a", "F32", (2,))]
    path = tmp_path / "out.safetensors"
    assert not shard_is_complete(path, entries)
    with ShardWriter(path, entries, {"format": "pt"}) as shard:
        shard.write("a", np.ones(2, np.float32))
    assert shard_is_complete(path, entries, {"format": "pt"})
    assert not shard_is_complete(path, entries)
    assert not shard_is_complete(path, [("a", "F32", (3,))], {"format": "pt"})


def test_plan_shards_naming_and_sizes():
    entries = [("a", "F32", (10,)), ("b", "F32", (10,)), ("huge", "F32", (100,)), ("c", "F32", (10,))]
    entries.append(("d", "U8", (1,)))
    shards = plan_shards(entries, max_shard_size=100)  # bytes

    assert [s.file for s in shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [[e.name for e in s.entries] for s in shards] == [["huge"], ["a", "b"], ["c", "d"]]
    assert [e.name for s in shards for e in s.entries if s.nbytes > 100] == ["huge"]
    assert [s.file for s in plan_shards(entries, "1GB")] == ["model.safetensors"]
    with pytest.raises(RemapError, match="two output tensors"):
        plan_shards([("a", "F32", (1,)), ("a", "F32", (1,))])
    for bad in [("a", "F12", (1,)), ("a", "F32", (-1,))]:
        with pytest.raises(RemapError, match="no tensor has dtype"):
            plan_shards([bad])
    with pytest.raises(RemapError, match="bad shard size"):
        plan_shards(entries, "5 parsecs")


def test_sharded_output_matches_transformers_save_pretrained(tmp_path):
    """plan_shards + ShardWriter + write_index reproduce save_pretrained's files byte for byte."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf", max_shard_size="10KB")
    state = {name: t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) for name, t in model.state_dict().items()}

    shards = plan_shards(entries_of(state), max_shard_size="10KB")
    (tmp_path / "ours").mkdir()
    for plan in shards:
        with ShardWriter(tmp_path / "ours" / plan.file, plan.entries, {"format": "pt"}) as shard:
            for entry in plan.entries:
                shard.write(entry.name, state[entry.name])
    write_index(tmp_path / "ours", shards, {"total_parameters": model.num_parameters()})

    theirs = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors*"))
    assert len(shards) > 2 and theirs == sorted(p.name for p in (tmp_path / "ours").iterdir())
    for name in theirs:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name
    assert open_checkpoint(str(tmp_path / "ours")).tensors.keys() == state.keys()


def test_sha256_file(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(1000))
    assert sha256_file(path, chunk_size=64) == hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- atomic output


def test_atomic_output_appears_only_on_success(tmp_path):
    dst = tmp_path / "out"
    with atomic_output(dst) as work:
        assert work == tmp_path / "out.partial"
        (work / "config.json").write_text("{}")
        assert not dst.exists()
    assert (dst / "config.json").exists() and not work.exists()


@pytest.mark.parametrize("failure", [ValueError, KeyboardInterrupt])
def test_atomic_output_failure_keeps_partial_for_resume(tmp_path, failure):
    dst = tmp_path / "out"
    with pytest.raises(failure):
        with atomic_output(dst) as work:
            with ShardWriter(work / "model-00001-of-00002.safetensors", [("a", "F32", (1,))]) as shard:
                shard.write("a", np.ones(1, np.float32))
            with ShardWriter(work / "model-00002-of-00002.safetensors", [("b", "F32", (2,))]) as shard:
                shard.write("b", np.ones(1, np.float32))
                raise failure
    assert not dst.exists()

    with pytest.raises(RemapError, match="--resume"):
        with atomic_output(dst):
            pass
    with pytest.raises(RemapError, match="continues only its own"):  # nothing says it is the caller's
        with atomic_output(dst, resume=True):
            pass
    with atomic_output(dst, resume=True, ours=lambda path: True) as work:  # convert knows by its resume record
        assert shard_is_complete(work / "model-00001-of-00002.safetensors", [("a", "F32", (1,))])
        assert [p.name for p in work.iterdir()] == ["model-00001-of-00002.safetensors"]  # the interrupted one is gone
    assert (dst / "model-00001-of-00002.safetensors").exists()


def test_atomic_output_existing_destination(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old").write_text("old")
    with pytest.raises(RemapError, match="already exists"):
        with atomic_output(dst):
            pass

    with pytest.raises(RemapError, match="not one remap wrote"):  # force replaces only its own
        with atomic_output(dst, force=True):
            pass
    ours = lambda path: True  # noqa: E731 (the caller's test for its own output: here, everything)
    with pytest.raises(RuntimeError):
        with atomic_output(dst, force=True, ours=ours) as work:
            (work / "new").write_text("new")
            raise RuntimeError
    assert [p.name for p in dst.iterdir()] == ["old"]  # replaced only on success

    with atomic_output(dst, force=True, ours=ours) as work:  # force also discards the failed run's partial
        assert list(work.iterdir()) == []
        (work / "new").write_text("new")
        assert (dst / "old").exists()
    assert [p.name for p in dst.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_never_touches_a_users_replaced_or_partial_lookalikes(tmp_path):
    """The names remap moves things aside under are its own (made fresh), never DST.replaced: a
    user's folder of that name survives; a DST.partial that is a symlink is refused even with
    --resume, and its target is left alone."""
    dst = tmp_path / "out"
    keep = tmp_path / "out.replaced"
    keep.mkdir()
    (keep / "mine.txt").write_text("mine")
    with atomic_output(dst) as work:
        (work / "a").write_text("a")
    with atomic_output(dst, force=True, ours=lambda path: True) as work:
        (work / "b").write_text("b")
    assert (keep / "mine.txt").read_text() == "mine" and [p.name for p in dst.iterdir()] == ["b"]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("x")
    other = tmp_path / "other"
    (tmp_path / "other.partial").symlink_to(elsewhere, target_is_directory=True)
    for options in ({"resume": True}, {"force": True}, {}):
        with pytest.raises(RemapError, match="not a directory remap made"):
            with atomic_output(other, **options):
                pass
    assert not other.exists() and [p.name for p in elsewhere.iterdir()] == ["precious"]


def test_an_output_may_not_overlap_its_source(tmp_path):
    source = tmp_path / "ckpt"
    source.mkdir()
    (source / "model.safetensors").write_bytes(b"x")
    for dst in (source, source / "mlx", tmp_path):
        with pytest.raises(RemapError, match="the output"):
            refuse_overlap(dst, [source, source / "model.safetensors"])
    (tmp_path / "link").symlink_to(source, target_is_directory=True)
    with pytest.raises(RemapError, match="is the source"):
        refuse_overlap(tmp_path / "link", [source])
    refuse_overlap(tmp_path / "mlx", [source, source / "model.safetensors"])  # beside it: fine
    refuse_overlap(tmp_path / "out", [tmp_path / "model.pt"])  # beside a one-file source: fine


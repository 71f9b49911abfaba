"""`remap convert` end to end: outputs load in the real runtimes, round trips are byte-exact,
model-parallel files reassemble, and a failed or interrupted run never leaves a DST."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from blake3 import blake3

from remap import api
from remap.errors import RemapError
from remap.destination import MANIFEST
from remap.io.checkpoint import open_checkpoint
from remap.io.hashing import sha256_file
from remap.layouts import deepseek

REMAP = [sys.executable, "-m", "remap.cli"]


def remap(*args, check=True):
    env = {**os.environ, "COLUMNS": "250"}  # wide enough that rich does not fold tensor names
    run = subprocess.run([*REMAP, *map(str, args)], capture_output=True, text=True, env=env)
    if check and run.returncode:
        raise AssertionError(f"remap {' '.join(map(str, args))} -> {run.returncode}\n{run.stdout}\n{run.stderr}")
    return run


def _convert(src, dst, spec, **options):
    plan, ckpt = api.plan(src, spec, **{k: v for k, v in options.items() if k in ("variant", "inverse", "params", "dtype")})
    report = api.report(plan, ckpt)
    assert report.ok, report.problems
    return api.convert(plan, ckpt, dst, report=report.to_dict(),
                       **{k: v for k, v in options.items() if k in ("force", "resume", "max_shard_size", "workers")})


def _logits_torch(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _logits_mlx(path, ids):
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    model.set_dtype(mx.float32)  # MLX on CPU runs the MoE gather-matmul in float32 only
    return np.array(model(mx.array(ids)))


@pytest.mark.parametrize("variant", ["embed_q", "kv_b_proj"])
def test_hf_to_mlx_loads_in_mlx_lm_and_computes_what_transformers_does(tiny_hf, tmp_path, variant):
    _convert(tiny_hf, tmp_path / "mlx", "hf-to-mlx", variant=variant)
    ids = np.random.default_rng(0).integers(0, 128, (2, 9))
    reference, converted = _logits_torch(tiny_hf, ids), _logits_mlx(tmp_path / "mlx", ids)
    assert np.abs(reference - converted).max() < 1e-4 * np.abs(reference).max()


def test_mlx_back_to_hf_reproduces_the_transformers_file_byte_for_byte(tiny_hf, tmp_path):
    _convert(tiny_hf, tmp_path / "mlx", "hf-to-mlx")
    _convert(tmp_path / "mlx", tmp_path / "back", "hf-to-mlx", inverse=True)
    assert sha256_file(tmp_path / "back/model.safetensors") == sha256_file(tiny_hf / "model.safetensors")


def test_model_parallel_files_reassemble_into_the_single_rank_file(tiny_hf, tmp_path):
    _convert(tiny_hf, tmp_path / "mp1", "hf-to-deepseek")
    _convert(tiny_hf, tmp_path / "mp2", "hf-to-deepseek", params={"mp": 2})
    whole = open_checkpoint(tmp_path / "mp1/model0-mp1.safetensors")
    ranks = [open_checkpoint(tmp_path / f"mp2/model{r}-mp2.safetensors") for r in range(2)]
    for name in whole.tensors:
        split = deepseek.split_of(name)
        parts = [r.read(name) for r in ranks if name in r.tensors]
        if split.expert is not None:
            assert len(parts) == 1
            rebuilt = parts[0]
        elif split.dim is not None:
            rebuilt = np.concatenate(parts, axis=split.dim)
        else:
            assert all(np.array_equal(p, parts[0]) for p in parts)
            rebuilt = parts[0]
        assert np.array_equal(rebuilt, whole.read(name)), name


def test_manifest_lists_every_file_with_its_checksum(tiny_hf, tmp_path):
    _convert(tiny_hf, tmp_path / "mlx", "hf-to-mlx")
    manifest = json.loads((tmp_path / "mlx" / MANIFEST).read_text())
    files = {p.name for p in (tmp_path / "mlx").iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == files
    # the default digest: BLAKE3 of each whole file, as the blake3 library (and b3sum) computes it
    assert manifest["digest"] == "blake3"
    assert all(manifest["files"][f] == blake3((tmp_path / "mlx" / f).read_bytes()).hexdigest() for f in files)
    assert manifest["spec"] == "hf-to-mlx" and manifest["source"] == str(tiny_hf)


def test_a_failure_mid_run_leaves_no_dst_and_resume_finishes_it(tiny_hf, tmp_path, monkeypatch):
    from remap.io.writer import ShardWriter

    clean = _convert(tiny_hf, tmp_path / "clean", "hf-to-mlx", max_shard_size="100KB")
    real, calls = ShardWriter.copy_from, []

    def failing(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 30:  # well into the run: some shards are finished, others are not
            raise RuntimeError("disk went away")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, "copy_from", failing)
    with pytest.raises(RuntimeError):
        _convert(tiny_hf, tmp_path / "out", "hf-to-mlx", max_shard_size="100KB")
    assert not (tmp_path / "out").exists() and (tmp_path / "out.partial").is_dir()
    monkeypatch.setattr(ShardWriter, "copy_from", real)
    with pytest.raises(RemapError, match="partial output"):
        _convert(tiny_hf, tmp_path / "out", "hf-to-mlx", max_shard_size="100KB")
    resumed = _convert(tiny_hf, tmp_path / "out", "hf-to-mlx", max_shard_size="100KB", resume=True)
    weights = {f: h for f, h in clean.files.items() if f.endswith(".safetensors") or f.endswith(".json") and "remap" not in f}
    assert {f: resumed.files[f] for f in weights} == weights
    assert not (tmp_path / "out.partial").exists()


def test_byte_moves_run_on_one_thread_in_file_order(tiny_hf, tmp_path, monkeypatch):
    """With workers, steps that only move bytes still run one after another, on one thread, in
    the order of their bytes in each file (the file's hash follows its written prefix: two copies
    taking turns would grow it at half speed); computed steps run beside them, and the files
    are the same as from one worker."""
    import threading

    from remap.io.writer import ShardWriter

    real, calls = ShardWriter.copy_from, []

    def recorded(self, name, source, start, nbytes, offset=0):
        calls.append((threading.current_thread().name, self.path.name, self._spans[name][0] + offset))
        return real(self, name, source, start, nbytes, offset)

    monkeypatch.setattr(ShardWriter, "copy_from", recorded)
    threaded = _convert(tiny_hf, tmp_path / "two", "hf-to-mlx", workers=2, max_shard_size="100KB")
    assert len(calls) > 10 and len({thread for thread, _, _ in calls}) == 1
    assert calls[0][0] != threading.current_thread().name
    for file in {file for _, file, _ in calls}:
        offsets = [offset for _, f, offset in calls if f == file]
        assert offsets == sorted(offsets)
    one = _convert(tiny_hf, tmp_path / "one", "hf-to-mlx", workers=1, max_shard_size="100KB")
    assert {f: d for f, d in threaded.files.items() if f.endswith(".safetensors")} == \
        {f: d for f, d in one.files.items() if f.endswith(".safetensors")}


def test_existing_dst_needs_force(tiny_hf, tmp_path):
    (tmp_path / "out").mkdir()
    run = remap("convert", tiny_hf, tmp_path / "out", "--spec", "hf-to-mlx", check=False)
    assert run.returncode == 2 and "already exists" in run.stderr and "Traceback" not in run.stderr
    remap("convert", tiny_hf, tmp_path / "out", "--spec", "hf-to-mlx", "--force")
    assert (tmp_path / "out/model.safetensors").exists()


def test_dry_run_writes_nothing_and_prints_the_report(tiny_hf, tmp_path):
    run = remap("convert", tiny_hf, tmp_path / "out", "--spec", "hf-to-mlx", "--dry-run")
    assert "OK" in run.stdout and "switch_mlp" in run.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_unmatched_source_tensor_refuses_to_convert(tiny_hf, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    src.mkdir()
    tensors = load_file(tiny_hf / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text((tiny_hf / "config.json").read_text())
    run = remap("convert", src, tmp_path / "out", "--spec", "hf-to-mlx", check=False)
    assert run.returncode == 1 and "rotary_emb.inv_freq" in run.stdout + run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--spec", "no-such-spec"], "no spec file 'no-such-spec'"),
    (["--spec", "hf-to-mlx", "--variant", "int3"], "no variant 'int3'"),
    (["--spec", "hf-to-mlx", "--param", "mp=2"], "unknown parameter 'mp'"),
    (["--spec", "scratch-to-mlx"], "is hf (bf16), not scratch as scratch-to-mlx reads"),
])
def test_bad_input_is_one_line_exit_2(tiny_hf, tmp_path, args, message):
    run = remap("convert", tiny_hf, tmp_path / "out", *args, check=False)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) <= 3  # one message (rich may wrap it)
    assert not (tmp_path / "out").exists()


def test_dtype_option_and_torch_state_dict_source(tiny_hf, tmp_path):
    from safetensors.torch import load_file

    torch.save(load_file(tiny_hf / "model.safetensors"), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text((tiny_hf / "config.json").read_text())
    _convert(tmp_path / "model.pt", tmp_path / "out", "hf-to-mlx", dtype="float32")
    out = open_checkpoint(tmp_path / "out")
    assert {t.dtype for t in out.tensors.values()} == {"F32"}


def test_verify_catches_a_changed_byte_and_a_missing_file(tiny_hf, tmp_path):
    _convert(tiny_hf, tmp_path / "mlx", "hf-to-mlx")
    assert remap("verify", tmp_path / "mlx").returncode == 0
    with open(tmp_path / "mlx/model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    run = remap("verify", tmp_path / "mlx", check=False)
    assert run.returncode == 1 and "model.safetensors: blake3 differs" in run.stdout
    (tmp_path / "mlx/config.json").unlink()
    assert "config.json: missing" in remap("verify", tmp_path / "mlx", check=False).stdout
    assert remap("verify", tmp_path, check=False).returncode == 2


def _flip_last_byte(path):
    with open(path, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))


def test_verify_says_what_it_checked(tiny_hf, tmp_path):
    """Without checksums a flipped data byte cannot be seen: verify says so instead of a bare OK.
    A digest missing from a checksummed manifest, and a folder planted in DST, fail."""
    remap("convert", tiny_hf, tmp_path / "plain", "--spec", "hf-to-mlx", "--no-checksums", "--quiet")
    _flip_last_byte(tmp_path / "plain/model.safetensors")
    run = remap("verify", tmp_path / "plain", check=False)
    assert run.returncode == 0 and "OK, headers only" in run.stdout and "no file's bytes" in run.stdout
    assert api.verify(tmp_path / "plain").hashed is False

    _convert(tiny_hf, tmp_path / "mlx", "hf-to-mlx")
    assert "every file's blake3" in remap("verify", tmp_path / "mlx").stdout
    manifest_path = tmp_path / "mlx/remap-manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["config.json"] = None
    manifest_path.write_text(json.dumps(manifest))
    run = remap("verify", tmp_path / "mlx", check=False)
    assert run.returncode == 1 and "config.json: the manifest records no blake3" in run.stdout
    manifest["files"]["config.json"] = blake3((tmp_path / "mlx/config.json").read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    (tmp_path / "mlx/extra").mkdir()
    run = remap("verify", tmp_path / "mlx", check=False)
    assert run.returncode == 1 and "extra/: not in the manifest" in run.stdout


def test_verify_reads_manifests_of_the_sha256_tree_hash(tiny_hf, tmp_path):
    """remap 0.1's default before BLAKE3: the sha256 of the 64 MiB chunks' sha256 digests (one
    chunk each here), named `sha256-tree-64MiB`; such a manifest still verifies and catches a flip."""
    _convert(tiny_hf, tmp_path / "mlx", "hf-to-mlx")
    manifest_path = tmp_path / "mlx/remap-manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["digest"] = "sha256-tree-64MiB"
    manifest["files"] = {f: hashlib.sha256(bytes.fromhex(sha256_file(tmp_path / "mlx" / f))).hexdigest()
                         for f in manifest["files"]}
    manifest_path.write_text(json.dumps(manifest))
    assert "every file's sha256-tree-64MiB" in remap("verify", tmp_path / "mlx").stdout
    _flip_last_byte(tmp_path / "mlx/model.safetensors")
    run = remap("verify", tmp_path / "mlx", check=False)
    assert run.returncode == 1 and "model.safetensors: sha256-tree-64MiB differs" in run.stdout


def test_verify_reads_old_plain_sha256_manifests_and_sha256_flag(tiny_hf, tmp_path):
    """A manifest from before the tree hash (no `digest`, plain sha256 values) still verifies, and
    still catches a flipped byte; `--sha256` writes such digests (the hub's LFS ids) on purpose."""
    _convert(tiny_hf, tmp_path / "mlx", "hf-to-mlx")
    manifest_path = tmp_path / "mlx/remap-manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["digest"]
    manifest["files"] = {f: hashlib.sha256((tmp_path / "mlx" / f).read_bytes()).hexdigest() for f in manifest["files"]}
    manifest_path.write_text(json.dumps(manifest))
    assert "every file's sha256" in remap("verify", tmp_path / "mlx").stdout
    _flip_last_byte(tmp_path / "mlx/model.safetensors")
    run = remap("verify", tmp_path / "mlx", check=False)
    assert run.returncode == 1 and "model.safetensors: sha256 differs" in run.stdout

    remap("convert", tiny_hf, tmp_path / "lfs", "--spec", "hf-to-mlx", "--sha256", "--quiet")
    manifest = json.loads((tmp_path / "lfs/remap-manifest.json").read_text())
    assert manifest["digest"] == "sha256"
    assert manifest["files"]["model.safetensors"] == hashlib.sha256((tmp_path / "lfs/model.safetensors").read_bytes()).hexdigest()
    manifest["digest"] = "md5"
    (tmp_path / "lfs/remap-manifest.json").write_text(json.dumps(manifest))
    run = remap("verify", tmp_path / "lfs", check=False)
    assert run.returncode == 2 and "unknown digest 'md5'" in run.stderr and "Traceback" not in run.stderr


def test_more_shards_than_open_files_allowed(tiny_hf, tmp_path):
    """Shards open at their first piece and close after their last, so a conversion into more
    files than the process may hold open still works."""
    import resource

    def few_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))

    run = subprocess.run([*REMAP, "convert", str(tiny_hf), str(tmp_path / "out"), "--spec", "hf-to-mlx",
                          "--max-shard-size", "2KB", "--quiet"], capture_output=True, text=True, preexec_fn=few_files)
    assert run.returncode == 0, run.stderr
    shards = list((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 32
    assert remap("verify", tmp_path / "out").returncode == 0


def test_staged_reader_is_safe_for_the_executors_threads():
    """Threads reading a later stage's inputs share the cache of an earlier stage's split outputs;
    with a thread switch after nearly every bytecode, an unguarded cache lost entries (KeyError)."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    from remap.compute import StagedReader

    fixture = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf-bf16")
    plan, ckpt = api.plan(fixture, "hf-to-mlx", quantize=4)
    read = StagedReader(plan.stages, ckpt.load, cache_steps=1)
    split = [name for name, step in read.producers.items() if len(step.outputs) > 1]
    assert split  # kv_b_proj -> embed_q, unembed_out
    names = random.Random(0).choices(split, k=12000)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(8) as pool:
            arrays = list(pool.map(read, names))
    finally:
        sys.setswitchinterval(interval)
    shapes = {o.name: o.shape for o in plan.stages[-2].outputs}
    assert all(a.shape == shapes[n] for a, n in zip(arrays, names))

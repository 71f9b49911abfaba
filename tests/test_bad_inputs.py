"""Bad input, run through the real CLI as a user meets it.

Every case breaks one thing about an otherwise good conversion (the bundled `hf-bf16` fixture
to MLX) and runs `python -m remap.cli convert SRC DST --spec ...`. Each must end the same way:
exit code 2, one line on stderr that names the file / tensor / rule and says what was expected,
no traceback, and no DST (a DST that existed before is left as it was). A run that fails while
writing keeps `DST.partial` for `--resume`; every other case leaves no `.partial` behind.

The table is CASES: (what is broken, how the input is made, fragments the error line must hold).
docs/reliability.md lists the same cases with the message each gets.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "hf-bf16"
WEIGHTS = "model.safetensors"
LAST = "model.norm.weight"  # the fixture's last tensor in file order: BF16 [64], 128 bytes
MEMORY_LIMIT = 4 << 30  # address space per run: a corrupt size must be refused, not allocated


@dataclass
class Run:
    """One `remap convert` invocation. `prelude` is Python run in the CLI process before the CLI
    itself (used to simulate a full disk where no small filesystem can be mounted)."""

    src: Path
    dst: Path
    spec: str | Path = "hf-to-mlx"
    options: list[str] = field(default_factory=list)
    prelude: str = ""
    keeps_partial: bool = False  # failed while writing: DST.partial stays for --resume


class Workdir:
    """The case's temporary directory, and small filesystems mounted in it (unmounted after)."""

    def __init__(self, path: Path):
        self.path = path
        self.mounts: list[Path] = []

    def source(self) -> Path:
        """A private copy of the fixture to break."""
        return Path(shutil.copytree(FIXTURE, self.path / "src"))

    def tmpfs(self, name: str, options: str) -> Path:
        point = self.path / name
        point.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                                               capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root); the simulated case covers it")
        self.mounts.append(point)
        return point


# -- making broken inputs --------------------------------------------------------------------------

def split_header(raw: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join_header(header: dict | bytes, data: bytes) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def weights(transform: Callable[[bytes], bytes]) -> Callable[[Workdir], Run]:
    """The fixture with model.safetensors replaced by transform(its bytes)."""
    def build(w: Workdir) -> Run:
        src = w.source()
        (src / WEIGHTS).write_bytes(transform((src / WEIGHTS).read_bytes()))
        return Run(src, w.path / "out")
    return build


def header_text(transform: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """Edit the JSON header as bytes; the length field follows."""
    def apply(raw: bytes) -> bytes:
        length = int.from_bytes(raw[:8], "little")
        return join_header(transform(raw[8 : 8 + length]), raw[8 + length :])
    return apply


def entry(name: str, **fields: Callable) -> Callable[[bytes], bytes]:
    """Change fields of one header entry: entry(LAST, shape=lambda s: [65])."""
    def apply(raw: bytes) -> bytes:
        header, data = split_header(raw)
        for key, change in fields.items():
            header[name][key] = change(header[name][key])
        return join_header(header, data)
    return apply


def duplicate_entry(raw: bytes) -> bytes:
    header, data = split_header(raw)
    text = json.dumps(header)
    return join_header(f'{text[:-1]}, "{LAST}": {json.dumps(header[LAST])}}}'.encode(), data)


def sharded(index: Callable[[dict, list[str], list[str]], str | dict], move: str | None = None) -> Callable[[Workdir], Run]:
    """The fixture split into two shard files with an index written by index(weight_map, first,
    second) (a dict is dumped as JSON, text is written as is). `move` also stores that tensor
    of the first shard in the second."""
    def build(w: Workdir) -> Run:
        src = w.source()
        header, data = split_header((src / WEIGHTS).read_bytes())
        header.pop("__metadata__")
        names = sorted(header, key=lambda n: header[n]["data_offsets"])
        first, second = names[: len(names) // 2], names[len(names) // 2 :]
        files = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second + [move] * bool(move)}
        for file, members in files.items():
            out, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
            for name in members:
                begin, end = header[name]["data_offsets"]
                out[name] = {**header[name], "data_offsets": [offset, offset + end - begin]}
                chunks.append(data[begin:end])
                offset += end - begin
            (src / file).write_bytes(join_header(out, b"".join(chunks)))
        (src / WEIGHTS).unlink()
        weight_map = {name: file for file, members in files.items() for name in members if name != move or file.startswith("model-00001")}
        text = index(weight_map, first, second)
        (src / "model.safetensors.index.json").write_text(text if isinstance(text, str) else json.dumps(text))
        return Run(src, w.path / "out")
    return build


def weight_map(change: Callable[[dict, list[str], list[str]], None]) -> Callable[[dict, list, list], dict]:
    def index(wmap: dict, first: list[str], second: list[str]) -> dict:
        change(wmap, first, second)
        return {"metadata": {}, "weight_map": wmap}
    return index


DELETE = object()


def config(text: str | None = None, fixture: Path = FIXTURE, spec: str = "hf-to-mlx", **changes) -> Callable[[Workdir], Run]:
    """The fixture with config.json changed (key=DELETE removes it), replaced by `text`, or
    removed (text="")."""
    def build(w: Workdir) -> Run:
        src = Path(shutil.copytree(fixture, w.path / "src"))
        values = json.loads((src / "config.json").read_text())
        for key, value in changes.items():
            if value is DELETE:
                values.pop(key)
            else:
                values[key] = value
        if text == "":
            (src / "config.json").unlink()
        else:
            (src / "config.json").write_text(json.dumps(values) if text is None else text)
        return Run(src, w.path / "out", spec)
    return build


SPEC_HEAD = "remap: 1\nname: broken\nfrom: hf\nto: mlx\nrules:\n"


def spec(rules: str) -> Callable[[Workdir], Run]:
    """A spec file whose rules are `rules` (YAML), run on the untouched fixture."""
    def build(w: Workdir) -> Run:
        path = w.path / "broken.yaml"
        path.write_text(SPEC_HEAD + rules)
        return Run(FIXTURE, w.path / "out", path)
    return build


def options(*args: str, spec: str = "hf-to-mlx") -> Callable[[Workdir], Run]:
    return lambda w: Run(FIXTURE, w.path / "out", spec, list(args))


def source(make: Callable[[Path], Path]) -> Callable[[Workdir], Run]:
    """A source made by make(directory) -> the path to pass as SRC."""
    return lambda w: Run(make(w.path), w.path / "out")


def existing_dst(w: Workdir) -> Run:
    (w.path / "out").mkdir()
    (w.path / "out" / "mine.txt").write_text("a user's file")
    return Run(FIXTURE, w.path / "out")


def leftover_partial(w: Workdir) -> Run:
    (w.path / "out.partial").mkdir()
    return Run(FIXTURE, w.path / "out")


def dst_under_a_file(w: Workdir) -> Run:
    (w.path / "file").write_text("")
    return Run(FIXTURE, w.path / "file" / "out")


def read_only_dst(w: Workdir) -> Run:
    if os.geteuid() == 0:  # root writes through permissions: a read-only filesystem stops it
        return Run(FIXTURE, w.tmpfs("ro", "ro,size=1m") / "out")
    (w.path / "ro").mkdir(mode=0o555)
    return Run(FIXTURE, w.path / "ro" / "out")


def full_disk(w: Workdir) -> Run:
    """A 256 KiB filesystem; the output needs about 400 KiB."""
    return Run(FIXTURE, w.tmpfs("small", "size=256k") / "out", keeps_partial=True)


# os.pwrite and os.copy_file_range (every byte remap writes goes through one of them) fail with
# ENOSPC once 100 kB are written: a full disk wherever a tmpfs cannot be mounted.
DISK_FULL_AT_100KB = """
import errno, os
room = [100_000]
def limited(call, size):
    def write(*args):
        if size(args) > room[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        room[0] -= size(args)
        return call(*args)
    return write
os.pwrite = limited(os.pwrite, lambda args: memoryview(args[1]).nbytes)
os.copy_file_range = limited(os.copy_file_range, lambda args: args[2])
"""


def simulated_full_disk(w: Workdir) -> Run:
    return Run(FIXTURE, w.path / "out", prelude=DISK_FULL_AT_100KB, keeps_partial=True)


def pickled_object(directory: Path) -> Path:
    import torch

    torch.save({"model.norm.weight": torch.ones(4), "step": {"optimizer": object}}, directory / "model.pt")
    shutil.copy(FIXTURE / "config.json", directory / "config.json")
    return directory / "model.pt"


def other_format(directory: Path) -> Path:
    (directory / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    return directory / "model.gguf"


def plus(value: int) -> Callable[[list], list]:
    return lambda offsets: [offsets[0] + value, offsets[1] + value]


# -- the table -------------------------------------------------------------------------------------

INDEX = "model.safetensors.index.json"
SHARD_1, SHARD_2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
FIRST = "lm_head.weight"  # the first tensor of the first shard

CASES = [
    # safetensors files
    ("file shorter than the length field", weights(lambda raw: raw[:5]),
     [WEIGHTS, "file is 5 bytes, too short"]),
    ("truncated file", weights(lambda raw: raw[:-100]),
     [WEIGHTS, f"tensor '{LAST}'", "truncated file?", "data_offsets within [0, 379148]"]),
    ("header length beyond the file", weights(lambda raw: len(raw).to_bytes(8, "little") + raw[8:]),
     [WEIGHTS, "truncated download?", "a header that fits in the file"]),
    ("header length absurdly large", weights(lambda raw: (2**62).to_bytes(8, "little") + raw[8:]),
     [WEIGHTS, "header length field says 4611686018427387904 bytes", "at most 100000000 bytes"]),
    ("header not JSON", weights(header_text(lambda text: text[:-20])),
     [WEIGHTS, "header is not valid JSON", "a JSON object of tensor entries"]),
    ("header not UTF-8", weights(header_text(lambda text: text.replace(b"norm", b"n\xffrm", 1))),
     [WEIGHTS, "header is not UTF-8", "a JSON object of tensor entries"]),
    ("overlapping offsets", weights(entry(LAST, data_offsets=plus(-2))),
     [WEIGHTS, f"tensor '{LAST}'", "overlaps tensor 'model.layers.2.self_attn.q_b_proj.weight'", "without gaps or overlaps"]),
    ("offsets past the data", weights(entry(LAST, data_offsets=plus(10**12))),
     [WEIGHTS, f"tensor '{LAST}'", "data ends at byte 1000000379248", "data_offsets within [0, 379248]"]),
    ("unknown dtype", weights(entry(LAST, dtype=lambda _: "F12")),
     [WEIGHTS, f"tensor '{LAST}'", "unknown dtype 'F12'", "one of BOOL"]),
    ("shape x dtype is not the byte span", weights(entry(LAST, shape=lambda _: [65])),
     [WEIGHTS, f"tensor '{LAST}'", "span 128 bytes but shape [65] of BF16 needs 130", "130 bytes"]),
    ("shape not integers", weights(entry(LAST, shape=lambda _: [64.0])),
     [WEIGHTS, f"tensor '{LAST}'", "not a list of non-negative integers"]),
    ("duplicate tensor name", weights(duplicate_entry),
     [WEIGHTS, f"header names '{LAST}' twice", "unique names"]),
    # the index
    ("index names a missing file", sharded(weight_map(lambda m, first, _: m.update({FIRST: "model-00009-of-00002.safetensors"}))),
     [INDEX, f"tensor '{FIRST}'", "model-00009-of-00002.safetensors, which does not exist", "every file the index names"]),
    ("index path with ..", sharded(weight_map(lambda m, first, _: m.update({FIRST: f"../src/{SHARD_1}"}))),
     [INDEX, f"tensor '{FIRST}'", "points outside the checkpoint directory", "relative to the checkpoint directory"]),
    ("index absolute path", sharded(weight_map(lambda m, first, _: m.update({FIRST: f"/etc/{SHARD_1}"}))),
     [INDEX, f"tensor '{FIRST}'", f"'/etc/{SHARD_1}' points outside the checkpoint directory"]),
    ("tensor stored in two files", sharded(weight_map(lambda m, first, _: None), move=FIRST),
     [INDEX, f"tensor '{FIRST}'", f"stored in {SHARD_2} but the index puts it in {SHARD_1}", "each tensor in one file"]),
    ("tensor listed twice in the index", sharded(lambda m, first, _: json.dumps({"weight_map": m})[:-2] + f', "{FIRST}": "{SHARD_2}"}}}}'),
     [INDEX, f"names '{FIRST}' twice", "each key once"]),
    ("index puts a tensor in the wrong file", sharded(weight_map(lambda m, first, _: m.update({FIRST: SHARD_2}))),
     [INDEX, f"tensor '{FIRST}'", f"the index puts it in {SHARD_2}, which does not hold it", "in the file the index names"]),
    ("index without weight_map", sharded(lambda m, first, _: {"metadata": {}}),
     [INDEX, "weight_map is missing", '"weight_map": {']),
    ("index not JSON", sharded(lambda m, first, _: "{"),
     [INDEX, "not valid JSON", "a JSON object"]),
    # config.json
    ("no config.json", config(""),
     ["src/config.json", "no config.json beside the weights", "the model's config.json"]),
    ("config.json not JSON", config("{'hidden_size': 64}"),
     ["src/config.json", "not valid JSON", "a JSON object"]),
    ("config.json a list", config("[]"),
     ["src/config.json", "is a JSON list", "a JSON object"]),
    ("config missing model_type", config(model_type=DELETE),
     ["config.json model_type", "model_type is None", "deepseek_v3"]),
    ("config sizes that cannot make the model", config(fixture=ROOT / "fixtures/scratch-compatible", spec="scratch-to-mlx",
                                                        n_head=5),
     ["config.json n_head", "n_embd 64 is not a multiple of n_head 5", "n_head dividing n_embd"]),
    ("config size of the wrong type", config(hidden_size="64"),
     ["config.json hidden_size", "hidden_size is '64'", "an integer >= 0"]),
    ("config count of the wrong type", config(n_routed_experts=None),
     ["config.json n_routed_experts", "n_routed_experts is None", "an integer >= 0"]),
    ("config quantization_config not an object", config(quantization_config="fp8"),
     ["config.json quantization_config", "quantization_config is 'fp8'", '"weight_block_size": [rows, cols]']),
    ("config quantization remap does not describe", config(quantization_config={"quant_method": "awq", "bits": 4}),
     ["config.json quantization_config quant_method", "quant_method is 'awq'", "fp8 or compressed-tensors"]),
    ("config absurd layer count (no huge allocation)", config(num_hidden_layers=10**12),
     ["config.json num_hidden_layers", "beyond any model", "layers x experts <= 4194304"]),
    ("model_type the spec does not cover", config(model_type="llama"),
     ["config.json model_type", "model_type is 'llama'", "deepseek_v3 or deepseek_v2"]),
    # the spec
    ("spec file missing", options(spec="no-such-spec"),
     ["no spec file 'no-such-spec'", "a path or a bundled spec"]),
    ("spec not YAML", spec("  - {to: model.norm.weight, from: [model.norm.weight\n"),
     ["broken.yaml:7", "invalid YAML", "plain YAML"]),
    ("spec unknown op", spec("  - {to: model.norm.weight, from: model.norm.weight, ops: [{op: frobnicate}]}\n"),
     ["broken.yaml:6", "rules/0/ops/0/op: 'frobnicate' is not one of", "schemas/spec.schema.json"]),
    ("spec unknown key", spec("  - {to: model.norm.weight, from: model.norm.weight, frm: x}\n"),
     ["broken.yaml:6", "'frm' was unexpected", "schemas/spec.schema.json"]),
    ("spec bad pattern", spec("  - {to: model.norm.weight, from: 'model.layers.{i.weight'}\n"),
     ["broken.yaml:6", "rules/0/from: 'model.layers.{i.weight' does not match", "schemas/spec.schema.json"]),
    ("spec division by zero", spec("  - {to: model.norm.weight, from: model.norm.weight, when: 'hidden_size // 0 > 1'}\n"),
     ["broken.yaml:6", "rule 'rules[0] model.norm.weight'", "division by zero in 'hidden_size // 0 > 1'", "a non-zero divisor"]),
    ("spec unknown name", spec("  - {to: model.norm.weight, from: model.norm.weight, when: 'num_layerz > 1'}\n"),
     ["broken.yaml:6", "rule 'rules[0] model.norm.weight'", "unknown name 'num_layerz'", "a config key"]),
    ("spec shape mismatch at plan time", spec(
        "  - to: ['a.{i}', 'b.{i}']\n    from: model.layers.{i}.self_attn.kv_b_proj.weight\n"
        "    ops: [{op: split, axis: 0, sizes: [64, 65]}]\n"),
     ["broken.yaml:6", "rule 'rules[0] a.{i} b.{i}'", "sizes [64, 65] do not cover axis 0 of shape [128, 32]",
      "positive sizes summing to 128"]),
    ("spec two rules write one output", spec("  - {to: model.norm.weight, from: model.norm.weight}\n"
                                             "  - {to: model.norm.weight, from: lm_head.weight}\n"),
     ["broken.yaml:7", "rule 'rules[1] model.norm.weight'", "written by two rules", "each output tensor written by one rule"]),
    ("spec source matched by two rules", spec("  - {to: model.norm.weight, from: model.norm.weight}\n"
                                              "  - {to: norm.copy, from: model.norm.weight}\n"),
     ["broken.yaml:7", "rule 'rules[1] norm.copy'", "tensor 'model.norm.weight'", "matched by two rules", "each source tensor used once"]),
    ("spec stacks an incomplete set", spec("  - to: 'x.{i}.{p}'\n    from: 'model.layers.{i}.mlp.experts.{e}.{p:up_proj}.weight'\n"
                                           "    stack: e\n    when: e != 2\n"),
     ["broken.yaml:6", "cannot stack {e}: index 2 is missing", "e = 0..3 all present"]),
    # options and sources
    ("bad --max-shard-size", options("--max-shard-size", "12XB"), ["--max-shard-size '12XB'", "a size like '5GB'"]),
    ("--param without a value", options("--param", "mp"), ["--param 'mp'", "KEY=VALUE"]),
    ("unknown --variant", options("--variant", "int3"), ["layout 'mlx' has no variant 'int3'", "embed_q"]),
    ("--quantize neither bits nor a recipe", options("--quantize", "mixed_5_6"),
     ["--quantize 'mixed_5_6'", "bits 1, 2, 3, 4, 5, 6 or 8, or a mixed recipe: mixed_2_6, mixed_3_4, mixed_3_6 or mixed_4_6"]),
    ("--quantize bits mlx has not", options("--quantize", "7"), ["--quantize '7'", "bits 1, 2, 3, 4, 5, 6 or 8"]),
    ("--param that does not divide", options("--param", "mp=3", spec="hf-to-deepseek"),
     ["--param mp=3 does not divide 4 routed experts", "mp >= 1 dividing n_routed_experts"]),
    ("source does not exist", source(lambda d: d / "nowhere"), ["nowhere: no such file or directory", "a local path or a hub repo id"]),
    ("source of another format", source(other_format), ["model.gguf: unsupported file type", "a directory, .safetensors"]),
    ("pickle that is not a state dict", source(pickled_object),
     ["model.pt: holds Python objects besides tensors", "--allow-pickle only for a file you trust"]),
    # the destination
    ("DST exists", existing_dst, ["out: output already exists", "--force to replace it"]),
    ("DST.partial left by an earlier run", leftover_partial, ["out.partial: a previous run left partial output", "--resume"]),
    ("DST under a file", dst_under_a_file, ["file/out.partial: Not a directory", "a writable destination"]),
    ("DST not writable", read_only_dst, ["ro/out.partial", "a writable destination"]),
    ("disk full during write (tmpfs)", full_disk,
     ["small/out.partial/model.safetensors", "No space left on device", "finished files stay in DST.partial for --resume"]),
    ("disk full during write (simulated)", simulated_full_disk,
     ["out.partial/model.safetensors", "No space left on device", "finished files stay in DST.partial for --resume"]),
]


def convert(run: Run, *extra: str) -> subprocess.CompletedProcess:
    entry_point = ["-c", run.prelude + "\nfrom remap.cli import run\nrun()"] if run.prelude else ["-m", "remap.cli"]
    args = [*extra, "convert", run.src, run.dst, "--spec", run.spec, *run.options]
    return subprocess.run(
        [sys.executable, *entry_point, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "COLUMNS": "250"},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT)),
    )


def listing(path: Path) -> list[str] | None:
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else None


@pytest.fixture
def workdir(tmp_path):
    w = Workdir(tmp_path)
    yield w
    for point in w.mounts:
        subprocess.run(["umount", str(point)], check=True)


@pytest.mark.parametrize("build, fragments", [pytest.param(b, f, id=name) for name, b, f in CASES])
def test_bad_input_is_one_line_exit_2_and_no_dst(workdir, build, fragments):
    run = build(workdir)
    partial = run.dst.with_name(run.dst.name + ".partial")
    before = listing(run.dst), listing(partial)

    result = convert(run)

    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "(expected " in lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    assert listing(run.dst) == before[0]  # none made, an existing one untouched
    if run.keeps_partial:
        assert "remap-resume.json" in listing(partial)
    else:
        assert listing(partial) == before[1]


def test_debug_shows_the_traceback(workdir):
    result = convert(weights(lambda raw: raw[:-100])(workdir), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr and "RemapError" in result.stderr


def test_disk_full_then_resume_after_freeing_space(workdir):
    """The case above, continued: with room again, --resume finishes, equal to a clean run."""
    shards = ["--max-shard-size", "40KB"]  # some files finish before the disk fills
    run = full_disk(workdir)
    run.options = shards
    assert convert(run).returncode == 2
    finished = [name for name in listing(run.dst.with_name("out.partial")) if name.endswith(".safetensors")]
    assert finished
    subprocess.run(["mount", "-o", "remount,size=4m", str(run.dst.parent)], check=True)
    resumed = convert(Run(run.src, run.dst, options=[*shards, "--resume"]))
    assert resumed.returncode == 0, resumed.stderr
    clean = convert(Run(run.src, workdir.path / "clean", options=shards))
    assert clean.returncode == 0, clean.stderr
    manifests = [json.loads((d / "remap-manifest.json").read_text())["files"] for d in (run.dst, workdir.path / "clean")]
    assert manifests[0] == manifests[1]

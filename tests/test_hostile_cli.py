"""Every CLI command against generated hostile inputs (issue 16's classes), as a user would run it.

Each example copies fixtures/hf-bf16 (and a finished conversion of it) into a fresh folder, makes
one thing hostile -- an output that overlaps its source, a FIFO or a /dev/zero link where a file
should be, integers of thousands of digits or JSON nested 100k deep, control characters in names
and paths, a missing or unwritable output, NaN/Inf weights, a bad flag -- and runs `remap` in a
subprocess with a timeout. Whatever the command, it must: exit 0, 1 or 2; on exit 2 print exactly
one line to stderr; print no traceback and no raw control character; finish within the timeout
(a FIFO must not block it); and change nothing in the folder but the outputs it was asked to write.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import remap
from remap.cli import app

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "hf-bf16"
SPEC = Path(remap.__file__).parent / "mappings" / "hf-to-mlx.yaml"
FORGED = "\nerror: forged\x1b[2K[red]"  # a second line, a terminal escape, rich markup
TIMEOUT = 60  # seconds per command; a blocked read would never end
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
ENV.pop("FORCE_COLOR", None)


@dataclass
class Case:
    args: list
    writes: list = field(default_factory=list)  # the outputs asked for: only these may change
    exits: tuple = (0, 1, 2)


CARD_WRITES = ["done/README.md", "done/remap-manifest.json"]  # parity records its result in DST's model card


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """src (the fixture), spec.yaml (a bundled spec as a user's file), done (src converted)."""
    base = tmp_path_factory.mktemp("hostile")
    shutil.copytree(FIXTURE, base / "src")
    shutil.copy(SPEC, base / "spec.yaml")
    run = subprocess.run([sys.executable, "-m", "remap.cli", "convert", "src", "done", "--spec", "hf-to-mlx", "--quiet"],
                         cwd=base, capture_output=True, text=True, env=ENV)
    assert run.returncode == 0, run.stderr
    return base


def snapshot(root: Path, skip: list[Path]) -> dict[str, tuple]:
    """Every entry under root (links not followed, FIFOs never opened): its kind, mode, and bytes
    or link target; entries at or under a path in `skip` left out."""
    skip = [os.path.abspath(p) for p in skip]
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if any(path == s or path.startswith(s + os.sep) for s in skip):
                continue
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                content = (hashlib.sha256(Path(path).read_bytes()).hexdigest(), info.st_mtime_ns)
            elif stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            else:
                content = None
            seen[path] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), content)
    return seen


# -- hostile things --------------------------------------------------------------------------------


def huge(draw) -> str:
    return "9" * draw(st.integers(4301, 40_000))  # past int()'s 4300-digit limit


def deep(draw) -> str:
    depth = draw(st.integers(1_000, 150_000))
    return "[" * depth + "]" * depth


def special(draw, path: Path) -> None:
    """Put something that is not a regular file (or an empty one) where `path` should be."""
    if path.exists() or path.is_symlink():
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    kind = draw(st.sampled_from(["fifo", "folder", "/dev/zero", "/dev/null", "dangling", "empty"]))
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "dangling":
        path.symlink_to(path.parent / "nowhere")
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.symlink_to(kind)


def edit_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header text with `edit`, the data section unchanged."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = edit(raw[8 : 8 + length].decode()).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + length :])


def write_index(src: Path, value: str) -> None:
    """An index of model.safetensors with `value` as its total_size (a number) or as one more entry (deep)."""
    raw = (src / "model.safetensors").read_bytes()
    names = [n for n in json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")]) if n != "__metadata__"]
    entries = ", ".join(f'"{n}": "model.safetensors"' for n in names)
    total, extra = (value, "") if value[0] == "9" else ("0", f', "extra.weight": {value}')
    (src / "model.safetensors.index.json").write_text(
        f'{{"metadata": {{"total_size": {total}}}, "weight_map": {{{entries}{extra}}}}}')


def source_command(draw, src: str = "src") -> Case:
    """A command that reads the source checkpoint."""
    return draw(st.sampled_from([
        Case(["inspect", src]), Case(["report", src, "--spec", "hf-to-mlx"]),
        Case(["report", src, "--to", "mlx", "--check-data"]),
        Case(["convert", src, "out", "--spec", "hf-to-mlx", "--quiet"], ["out", "out.partial"]),
        Case(["parity", src, "missing"])]))


def spec_command(draw, spec: str = "spec.yaml") -> Case:
    return draw(st.sampled_from([Case(["report", "src", "--spec", spec]), Case(["invert", spec]),
                                 Case(["invert", spec, "-o", "inverse.yaml"], ["inverse.yaml"]),
                                 Case(["convert", "src", "out", "--spec", spec, "--quiet"], ["out", "out.partial"])]))


def output_command(draw, path: str) -> Case:
    """A command that writes a file (--json, --markdown, --junit, -o) to `path`."""
    return draw(st.sampled_from([
        Case(["report", "src", "--spec", "hf-to-mlx", "--json", path]), Case(["report", "src", "--spec", "hf-to-mlx", "--markdown", path]),
        Case(["inspect", "src", "--json", path]), Case(["invert", "hf-to-mlx", "-o", path]), Case(["verify", "done", "--json", path]),
        Case(["parity", "src", "done", "--junit", path, "--tokens", "1", "--batch", "1"], list(CARD_WRITES))]))


# -- the classes of issue 16 -----------------------------------------------------------------------


def overlap(work: Path, draw) -> Case:
    """convert with DST the source, inside it, holding it, or any of these through a symlink."""
    (work / "srclink").symlink_to(work / "src", target_is_directory=True)
    src, dst = draw(st.sampled_from([
        ("src", "src"), ("src", "src/mlx"), ("src", "src/a/b"), ("src", "src/../src"), ("src", "link"),
        ("src", "link/inside"), ("src", "dangling"), ("src/model.safetensors", "src"), ("src", "."), ("src", ""),
        ("srclink", "src/out"), ("src", "srclink"), ("srclink", "srclink/x"), ("src/model.safetensors", "srclink")]))
    if dst.startswith("link"):
        (work / "link").symlink_to(work / "src", target_is_directory=True)
    if dst == "dangling":
        (work / "dangling").symlink_to(work / "src" / "new")
    flags = draw(st.lists(st.sampled_from(["--force", "--resume", "--dry-run"]), unique=True, max_size=2))
    target = draw(st.sampled_from([["--spec", "hf-to-mlx"], ["--to", "mlx"], ["--spec", "spec.yaml"], ["--spec", "hf-to-hf-fp8"]]))
    return Case(["convert", src, dst, *target, *flags, "--quiet"], exits=(2,))


def output_is_input(work: Path, draw) -> Case:
    """An output file (--json, --markdown, -o) that is a file the command reads, or a link to one."""
    (work / "single").mkdir()  # a one-file checkpoint, apart: spec.yaml is then beside no weights
    shutil.copy(work / "src" / "model.safetensors", work / "single" / "lone.safetensors")
    (work / "speclink").symlink_to(work / "spec.yaml")
    (work / "cfglink").symlink_to(work / "src" / "config.json")
    return draw(st.sampled_from([
        Case(["report", "src", "--spec", "hf-to-mlx", "--json", "src/config.json"], exits=(2,)),
        Case(["report", "src", "--spec", "hf-to-mlx", "--markdown", "src/tokenizer.json"], exits=(2,)),
        Case(["report", "src", "--spec", "hf-to-mlx", "--json", "cfglink"], exits=(2,)),
        Case(["report", "src", "--spec", "spec.yaml", "--json", "spec.yaml"], exits=(2,)),
        Case(["report", "src", "--spec", "spec.yaml", "--markdown", "speclink"], exits=(2,)),
        Case(["report", "single/lone.safetensors", "--spec", "hf-to-mlx", "--json", "single/lone.safetensors"], exits=(2,)),
        Case(["inspect", "src", "--json", "src/model.safetensors"], exits=(2,)),
        Case(["inspect", "single/lone.safetensors", "--json", "single/lone.safetensors"], exits=(2,)),
        Case(["invert", "spec.yaml", "-o", "spec.yaml"], exits=(2,)), Case(["invert", "spec.yaml", "-o", "speclink"], exits=(2,)),
        Case(["invert", "hf-to-mlx", "-o", "src/config.json"], exits=(2,)),
        Case(["verify", "done", "--json", "done/remap-manifest.json"], exits=(2,)),
        Case(["parity", "src", "done", "--json", "src/config.json"], exits=(2,))]))


def special_input(work: Path, draw) -> Case:
    """A FIFO, folder, /dev/zero link, ... where a file the command reads should be."""
    where = draw(st.sampled_from(["config.json", "model.safetensors", "tokenizer.json", "model.safetensors.index.json",
                                  "spec.yaml", "done/remap-manifest.json", "done/model.safetensors", "done/remap-report.json"]))
    if where == "spec.yaml":
        special(draw, work / where)
        return spec_command(draw)
    if where.startswith("done/"):
        special(draw, work / where)
        return draw(st.sampled_from([Case(["verify", "done"]), Case(["parity", "src", "done", "--tokens", "1", "--batch", "1"], list(CARD_WRITES)),
                                     Case(["convert", "src", "done", "--spec", "hf-to-mlx", "--force", "--quiet"], ["done", "done.partial"])]))
    special(draw, work / "src" / where)
    return source_command(draw)


def special_output(work: Path, draw) -> Case:
    """An output file that is a FIFO nobody reads, a folder, a link to /dev/null or to a new file."""
    kind = draw(st.sampled_from(["fifo", "folder", "devnull", "dangling"]))
    path = work / "result"
    writes = []
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "devnull":
        path.symlink_to("/dev/null")
    else:
        path.symlink_to(work / "new.json")
        writes = ["result", "new.json"]
    case = output_command(draw, "result")
    case.writes += writes
    return case


def huge_or_deep(work: Path, draw) -> Case:
    """An integer of thousands of digits or JSON / YAML nested deeper than any real file."""
    where = draw(st.sampled_from(["config", "header", "index", "manifest", "report", "spec"]))
    value = draw(st.sampled_from([huge, deep]))(draw)
    src = work / "src"
    if where == "config":
        text = (src / "config.json").read_text()
        (src / "config.json").write_text(text.replace('"hidden_size": 64', f'"hidden_size": {value}'))
    elif where == "header":
        shape = f'"shape":[{value}]' if value[0] == "9" else f'"shape":[64],"x":{value}'
        edit_header(src / "model.safetensors", lambda t: t.replace('"shape":[64]', shape, 1))
    elif where == "index":
        write_index(src, value)
    elif where in ("manifest", "report"):
        path = work / "done" / f"remap-{where}.json"
        path.write_text(path.read_text().replace("{", f'{{"x": {value}, ', 1))
        return draw(st.sampled_from([Case(["verify", "done"]), Case(["convert", "src", "done", "--spec", "hf-to-mlx", "--force", "--quiet"], ["done", "done.partial"])]))
    else:
        spec = work / "spec.yaml"
        spec.write_text(f"remap: 1\nname: x\nfrom: hf\nto: mlx\nrules: {value}\n" if value[0] == "[" else
                        "remap: 1\nname: x\nfrom: hf\nto: mlx\nrules:\n"
                        f"  - {{to: model.norm.weight, from: model.norm.weight, ops: [{{op: slice, axis: 0, start: {value}}}]}}\n")
        return spec_command(draw)
    return source_command(draw)


def control_chars(work: Path, draw) -> Case:
    """Control characters, a forged `error:` line and rich markup in a tensor name, a config value or a path."""
    noise = draw(st.text(st.sampled_from("\r\t\x1b\x07\x7f\x85\u2028\u202e[]"), max_size=4))
    evil = "x" + noise + FORGED
    where = draw(st.sampled_from(["tensor", "config", "src", "dst", "json", "spec", "done"]))
    if where == "tensor":
        edit_header(work / "src" / "model.safetensors", lambda t: t.replace('"model.norm.weight"', json.dumps("model.norm.weight" + evil), 1))
    elif where == "config":
        text = (work / "src" / "config.json").read_text()
        (work / "src" / "config.json").write_text(text.replace('"deepseek_v3"', json.dumps("deepseek_v3" + evil), 1))
    elif where == "src":
        (work / "src").rename(work / ("s" + evil))
        return source_command(draw, "s" + evil)
    elif where == "dst":
        return Case(["convert", "src", "o" + evil, "--spec", "hf-to-mlx"], ["o" + evil, "o" + evil + ".partial"])
    elif where == "json":
        case = output_command(draw, "r" + evil)
        case.writes.append("r" + evil)
        return case
    elif where == "spec":
        (work / "spec.yaml").rename(work / ("spec" + evil))
        return spec_command(draw, "spec" + evil)
    else:
        (work / "done").rename(work / ("done" + evil))
        return Case(["verify", "done" + evil, *draw(st.sampled_from([[], ["--json", "-"]]))])
    return source_command(draw)


def bad_destination(work: Path, draw) -> Case:
    """convert (or an output file) into a missing folder, under a file, a name too long, onto a file or someone's folder."""
    (work / "afile").write_text("a user's file")
    (work / "theirs").mkdir()
    (work / "theirs" / "notes.txt").write_text("notes")
    (work / "empty").mkdir()
    if draw(st.booleans()):
        dst, writes = draw(st.sampled_from([("nope/deeper/out", ["nope"]), ("afile/out", []), ("x" * 300, []), ("afile", []),
                                            ("theirs", []), ("empty", ["empty", "empty.partial"]),
                                            ("done/nested", [])]))  # inside an earlier output: refused
        flags = draw(st.lists(st.sampled_from(["--force", "--resume", "--dry-run"]), unique=True, max_size=2))
        return Case(["convert", "src", dst, "--spec", "hf-to-mlx", "--quiet", *flags], writes)
    path = draw(st.sampled_from(["nope/r.json", "afile/r.json", "x" * 300, "afile", "theirs", "/proc/remap-r.json", "/dev/null"]))
    case = output_command(draw, path)
    case.writes += ["afile"] if path == "afile" else []  # a file of the user's they named: theirs to overwrite
    return case


def nonfinite(work: Path, draw) -> Case:
    """NaN or Inf in a weight that is quantized, requantized to FP8 or checked."""
    path = work / "src" / "model.safetensors"
    raw = bytearray(path.read_bytes())
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    quantized = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.experts.2.up_proj.weight",
                 "model.layers.2.self_attn.o_proj.weight", "model.layers.1.mlp.shared_experts.gate_proj.weight"]
    name = draw(st.sampled_from([*quantized, "model.layers.2.self_attn.q_b_proj.weight"]))  # the last: 48 wide, not quantized
    start, end = header[name]["data_offsets"]
    bits = draw(st.sampled_from([0x7FC0, 0x7F80, 0xFF80]))  # bf16 NaN, Inf, -Inf
    for k in draw(st.lists(st.integers(0, (end - start) // 2 - 1), min_size=1, max_size=5)):
        raw[8 + length + start + 2 * k : 8 + length + start + 2 * k + 2] = bits.to_bytes(2, "little")
    path.write_bytes(bytes(raw))
    allow = draw(st.lists(st.just("--allow-nonfinite"), max_size=1))
    lossy = ["hf-to-mlx", "-q"], ["hf-to-mlx", "--quantize", "8"], ["hf-to-hf-fp8"]
    spec = draw(st.sampled_from([*lossy, ["hf-to-mlx"], ["hf-to-mlx", "--dtype", "f16"]]))
    command = draw(st.sampled_from(["convert", "report"]))
    case = Case([command, "src", *(["out"] if command == "convert" else []), "--spec", *spec, *allow, "--check-data"], ["out", "out.partial"])
    if spec in lossy and not allow and name in quantized:  # refused, not spread silently
        case.exits = (1, 2)
    return case


def bad_flags(work: Path, draw) -> Case:
    """Any command with any of its options given a hostile value, an unknown option, or missing arguments."""
    command = typer.main.get_command(app)
    name = draw(st.sampled_from(sorted(command.commands) + [None]))
    if name is None:
        return Case(draw(st.sampled_from([[], ["--bogus"], ["bogus"], ["--version"], ["--help"]])))
    positional = {"inspect": ["src"], "report": ["src"], "convert": ["src", "out"], "invert": ["hf-to-mlx"],
                  "verify": ["done"], "parity": ["src", "missing"], "specs": []}[name]
    options = [p for p in command.commands[name].params if p.opts[0].startswith("-") and p.name != "help"]
    value = st.one_of(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
                      st.sampled_from(["-1", "0", "nan", "inf", "1e999", "-", "--", "", "9" * 5000, "5GB", "mp=0", "x=", "a/../b"]))
    writes = ["out", "out.partial"]
    args = positional[: draw(st.integers(0, len(positional)))] if draw(st.integers(0, 4)) == 0 else list(positional)
    for option in draw(st.lists(st.sampled_from(options), min_size=1, max_size=3)):
        args.append(draw(st.sampled_from(option.opts + option.secondary_opts)))
        if not option.is_flag:
            args.append(draw(value))
            writes.append(args[-1])  # --json VALUE and the like: an output the user named
    if draw(st.integers(0, 5)) == 0:
        args.append(draw(st.sampled_from(["--bogus", "extra", "-"])))
    return Case([name, *args], [w for w in writes if w not in ("", ".", "..", "-")])


# Each class every run (hypothesis would draw some far more often than others), the data-loss
# class most: (class, examples). REMAP_HOSTILE_SCALE=N draws N times as many, for a longer hunt.
SCALE = int(os.environ.get("REMAP_HOSTILE_SCALE", "1"))
CLASSES = [(kind, n * SCALE) for kind, n in [(overlap, 9), (output_is_input, 4), (special_input, 6), (special_output, 3),
           (huge_or_deep, 5), (control_chars, 5), (bad_destination, 5), (nonfinite, 4), (bad_flags, 7)]]


def check(case: Case, run: subprocess.CompletedProcess) -> None:
    said = run.stdout + run.stderr
    assert run.returncode in case.exits, (run.returncode, run.stderr[-2000:])
    if run.returncode == 2:
        assert run.stderr.count("\n") == 1 and run.stderr.endswith("\n") and "\r" not in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in said, run.stderr[-2000:]
    assert "\x1b" not in said and not any(line.startswith("error: forged") for line in said.splitlines()), said[-2000:]


@pytest.mark.parametrize("kind, examples", CLASSES, ids=[kind.__name__ for kind, _ in CLASSES])
def test_every_command_survives_hostile_inputs(base, kind, examples):
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def hostile(data):
        work = Path(tempfile.mkdtemp(dir=base))
        try:
            shutil.copytree(base / "src", work / "src", symlinks=True)
            shutil.copytree(base / "done", work / "done")
            shutil.copy(base / "spec.yaml", work / "spec.yaml")
            case = kind(work, data.draw)
            note(f"remap {' '.join(map(repr, case.args))}")
            skip = [work / p for p in case.writes]
            before = snapshot(work, skip)
            run = subprocess.run([sys.executable, "-m", "remap.cli", *map(str, case.args)], cwd=work, env=ENV,
                                 timeout=TIMEOUT, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 errors="backslashreplace")
            check(case, run)
            assert snapshot(work, skip) == before, "a file outside the outputs changed"
        finally:
            shutil.rmtree(work, ignore_errors=True)

    hostile()


@pytest.mark.parametrize("args", [["inspect", "src"], ["report", "src", "--spec", "hf-to-mlx"]], ids=lambda args: args[0])
def test_a_hash_sign_in_a_name_is_text_not_a_number_slot(tmp_path, args):
    """Collapsed listings write a name's numbers as `#` while grouping: a `#` of a name's own
    (`model.layers.#.w`, beside `model.layers.0.w`) once took the place of a number and crashed
    inspect and report with a traceback. It is listed as it is, as a tensor no rule matches."""
    shutil.copytree(FIXTURE, tmp_path / "src")
    edit_header(tmp_path / "src" / "model.safetensors",
                lambda t: t.replace('"model.layers.0.input_layernorm.weight"', '"model.layers.#.input_layernorm.weight"', 1))
    run = subprocess.run([sys.executable, "-m", "remap.cli", *args], cwd=tmp_path, env=ENV, timeout=TIMEOUT,
                         capture_output=True, text=True)
    check(Case(args), run)
    assert "model.layers.#.input_layernorm.weight" in run.stdout + run.stderr

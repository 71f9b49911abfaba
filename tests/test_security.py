"""Files from the internet never run code and never write outside DST.

- torch files load with weights_only=True; a pickle that runs code is refused unless the user
  passes --allow-pickle (inspect, report, convert);
- spec YAML is loaded safely: no tags, no Python objects;
- the package has no eval / exec / unsafe deserialisation outside the one checked place;
- output file names come from remap's own schemes, never from tensor names, spec text or
  parameters; `remap verify` does not follow a manifest outside its directory.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import remap
from remap import api
from remap.io.hashing import file_digest
from remap.io.headers import read_header

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "hf-bf16"
PACKAGE = Path(remap.__file__).parent


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "remap.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "COLUMNS": "250"})


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


# -- pickle ---------------------------------------------------------------------------------------

class CreatesAFile:
    """Unpickling this calls open(path, "w"): code run by merely loading the file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def hostile_pt(tmp_path) -> tuple[Path, Path]:
    import torch

    marker = tmp_path / "code-ran"
    torch.save({"model.norm.weight": torch.ones(64), "payload": CreatesAFile(marker)}, tmp_path / "model.pt")
    shutil.copy(FIXTURE / "config.json", tmp_path)
    return tmp_path / "model.pt", marker


@pytest.mark.parametrize("command", [["inspect"], ["report", "--spec", "hf-to-mlx"], ["convert", "DST", "--spec", "hf-to-mlx"]])
def test_pickle_runs_no_code_unless_allowed(hostile_pt, tmp_path, command):
    path, marker = hostile_pt
    args = [str(tmp_path / "out") if a == "DST" else a for a in command]
    refused = cli(args[0], path, *args[1:])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "holds Python objects besides tensors" in refused.stderr and "--allow-pickle" in refused.stderr
    assert not marker.exists()
    # The control: the flag reaches the loader, and this file really does run code when allowed.
    allowed = cli(args[0], path, *args[1:], "--allow-pickle")
    assert marker.exists()
    assert allowed.returncode == 2 and "holds a TextIOWrapper under the key 'payload'" in allowed.stderr
    assert not (tmp_path / "out").exists()


# -- YAML -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("tag", ["!!python/object/apply:io.open", "!!python/object/new:io.open", "!!python/name:io.open"])
def test_spec_yaml_constructs_no_python_objects(tmp_path, tag):
    marker = tmp_path / "code-ran"
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"remap: 1\nname: x\nfrom: hf\nto: mlx\nrules:\n  - {tag} ['{marker}', 'w']\n")
    run = cli("convert", FIXTURE, tmp_path / "out", "--spec", spec)
    assert run.returncode == 2 and "could not determine a constructor" in run.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


# -- no code from data in the package -------------------------------------------------------------

FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "breakpoint"}
FORBIDDEN_METHODS = {("pickle", "load"), ("pickle", "loads"), ("marshal", "load"), ("marshal", "loads"),
                     ("yaml", "unsafe_load"), ("yaml", "full_load"), ("yaml", "load_all"), ("shelve", "open"),
                     ("dill", "load"), ("dill", "loads")}


def unsafe_calls(path: Path) -> list[str]:
    """Calls that can run code from data, except the two checked ones: yaml.load with remap's
    SafeLoader (spec/yaml_lines.py) and torch.load with weights_only (io/checkpoint.py)."""
    found = []
    relative = path.relative_to(PACKAGE).as_posix()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func, where = node.func, f"{relative}:{node.lineno}"
        keywords = {k.arg: k.value for k in node.keywords}
        if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
            found.append(f"{where} {func.id}()")
        if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)):
            continue
        call = (func.value.id, func.attr)
        if call in FORBIDDEN_METHODS:
            found.append(f"{where} {'.'.join(call)}()")
        elif call == ("yaml", "load") and not (relative == "spec/yaml_lines.py" and ast.unparse(keywords.get("Loader", node)) == "_Loader"):
            found.append(f"{where} yaml.load() without remap's safe loader")
        elif call == ("torch", "load") and not (relative == "io/checkpoint.py" and ast.unparse(keywords.get("weights_only", node)) == "not allow_pickle"):
            found.append(f"{where} torch.load() without weights_only=not allow_pickle")
        elif call == ("np", "load") and "allow_pickle" in keywords:
            found.append(f"{where} np.load(allow_pickle=...)")
    return found


def test_no_eval_exec_or_unsafe_loading_in_the_package():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    assert [call for path in files for call in unsafe_calls(path)] == []
    from remap.spec.yaml_lines import _Loader

    assert issubclass(_Loader, yaml.SafeLoader)


def test_the_scan_finds_what_it_forbids(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    (tmp_path / "bad.py").write_text("import pickle, yaml, torch\neval(x)\npickle.loads(b)\nyaml.load(t)\n"
                                     "torch.load(p, weights_only=False)\nmodel.eval()\n")
    assert [c.split(" ", 1)[1] for c in unsafe_calls(tmp_path / "bad.py")] == [
        "eval()", "pickle.loads()", "yaml.load() without remap's safe loader", "torch.load() without weights_only=not allow_pickle"]


# -- file names -----------------------------------------------------------------------------------

def test_tensor_names_never_become_file_names(tmp_path):
    """Output tensors named like the files remap writes (and like paths, as far as a pattern
    allows) are written into the safetensors header, and only remap's own files appear."""
    names = ["..", "...", "config.json", "model.safetensors.index.json", "remap-manifest.json", "-rf", ".hidden"]
    rules = "".join(f"  - {{to: '{n}', from: 'model.layers.{k}.input_layernorm.weight'}}\n" for k, n in enumerate(names[:3]))
    rules += "".join(f"  - {{to: '{n}', from: 'model.layers.{k}.post_attention_layernorm.weight'}}\n" for k, n in enumerate(names[3:6]))
    rules += f"  - {{to: '{names[6]}', from: model.norm.weight}}\n"  # the rest is left unmatched
    spec = tmp_path / "spec.yaml"
    spec.write_text("remap: 1\nname: names\nfrom: hf\nto: mlx\nrules:\n" + rules)
    plan, checkpoint = api.plan(FIXTURE, spec)
    before = tree(tmp_path)

    api.convert(plan, checkpoint, tmp_path / "out")

    expected = {"model.safetensors", "model.safetensors.index.json", "config.json", "remap-manifest.json",
                "tokenizer.json", "tokenizer_config.json", "README.md"}
    assert set(os.listdir(tmp_path / "out")) == expected
    assert tree(tmp_path) - before == {"out"} | {f"out/{name}" for name in expected}
    assert set(read_header(tmp_path / "out/model.safetensors")[0]) == set(names)


@pytest.mark.parametrize("args, message", [
    (["--spec", "SPEC"], "does not match"),  # a `to:` pattern with a path in it
    (["--spec", "hf-to-deepseek", "--param", "mp=../../escape"], "--param mp='../../escape' does not divide"),
])
def test_paths_in_spec_names_or_parameters_are_refused(tmp_path, args, message):
    work = tmp_path / "work"
    work.mkdir()
    spec = tmp_path / "spec.yaml"
    spec.write_text("remap: 1\nname: x\nfrom: hf\nto: mlx\nrules:\n  - {to: '../../escape.weight', from: model.norm.weight}\n")
    before = tree(tmp_path)
    run = cli("convert", FIXTURE, work / "out", *[str(spec) if a == "SPEC" else a for a in args])
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
    assert tree(tmp_path) == before


def test_verify_refuses_manifest_entries_outside_dst(tmp_path, monkeypatch):
    assert cli("convert", FIXTURE, tmp_path / "out", "--spec", "hf-to-mlx").returncode == 0
    outside = tmp_path / "secret"
    outside.write_text("not remap's")
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    manifest_path = tmp_path / "out/remap-manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"].update({"../secret": digest, str(outside): digest})  # the hashes even match
    manifest_path.write_text(json.dumps(manifest))

    run = cli("verify", tmp_path / "out")
    assert run.returncode == 1
    assert "../secret: not a plain file name" in run.stdout and f"{outside}: not a plain file name" in run.stdout

    import remap.verify

    hashed = []
    monkeypatch.setattr(remap.verify, "file_digest", lambda path, algorithm: hashed.append(Path(path).resolve()) or "")
    api.verify(tmp_path / "out")
    assert hashed and all(path.parent == (tmp_path / "out").resolve() for path in hashed)


# -- never write into, replace or delete what remap did not make ---------------------------------


def digests(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("where", ["the source itself", "inside the source", "a symlink to the source",
                                   "the folder holding a one-file source"])
def test_an_output_overlapping_its_source_is_refused_and_the_source_untouched(tmp_path, where):
    source = tmp_path / "src"
    shutil.copytree(FIXTURE, source)
    src, dst = {
        "the source itself": (source, source),
        "inside the source": (source, source / "mlx"),
        "a symlink to the source": (source, tmp_path / "link"),
        "the folder holding a one-file source": (source / "model.safetensors", source),
    }[where]
    if where == "a symlink to the source":
        dst.symlink_to(source, target_is_directory=True)
    before = digests(source)
    run = cli("convert", src, dst, "--spec", "hf-to-mlx", "--force", "--quiet")
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "the output" in run.stderr, run.stderr
    assert digests(source) == before and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["src"] + (["link"] if where == "a symlink to the source" else []))


def test_force_replaces_only_what_remap_wrote(tmp_path):
    mine = tmp_path / "out"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    run = cli("convert", FIXTURE, mine, "--spec", "hf-to-mlx", "--force", "--quiet")
    assert run.returncode == 2 and "not one remap wrote" in run.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (mine / "notes.txt").unlink()
    assert cli("convert", FIXTURE, mine, "--spec", "hf-to-mlx", "--force", "--quiet").returncode == 0  # empty: fine
    assert cli("convert", FIXTURE, mine, "--spec", "hf-to-mlx", "--force", "--quiet").returncode == 0  # its own: fine


def test_an_output_inside_another_remap_output_is_refused_and_that_one_still_verifies(tmp_path):
    first = tmp_path / "first"
    assert cli("convert", FIXTURE, first, "--spec", "hf-to-mlx", "--quiet").returncode == 0
    (tmp_path / "link").symlink_to(first, target_is_directory=True)
    for inner in (first / "inner", first / "a" / "b", tmp_path / "link" / "inner"):
        run = cli("convert", FIXTURE, inner, "--spec", "hf-to-mlx", "--quiet")
        assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
        assert f"the output is inside {first.resolve()}, an output remap wrote" in run.stderr
    assert cli("verify", first).returncode == 0


# -- no read can block or grow without bound; no parse can overflow into a traceback -------------


def _src_with(tmp_path: Path, name: str, make) -> Path:
    source = tmp_path / "src"
    shutil.copytree(FIXTURE, source)
    target = source / name
    target.unlink()
    make(target)
    return source


@pytest.mark.parametrize("name, make, says", [
    ("config.json", os.mkfifo, "not a regular file"),
    ("model.safetensors", os.mkfifo, "not a regular file"),
    ("config.json", lambda p: p.symlink_to("/dev/zero"), "not a regular file"),
    ("config.json", lambda p: p.mkdir(), "not a regular file"),
    ("config.json", lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "nested deeper than any real file"),
    ("config.json", lambda p: p.write_text('{"hidden_size": ' + "9" * 5000 + "}"), "not valid JSON"),
    ("config.json", lambda p: p.write_text('{"model_type": "deepseek_v3", "rope_theta": NaN}'), "NaN is not a number"),
])
def test_hostile_files_beside_the_weights_are_one_line_errors(tmp_path, name, make, says):
    source = _src_with(tmp_path, name, make)
    for command in (["inspect", source], ["report", source, "--spec", "hf-to-mlx"]):
        run = subprocess.run([sys.executable, "-m", "remap.cli", *map(str, command)], capture_output=True, text=True,
                             cwd=ROOT, timeout=60)  # a FIFO opened for reading would block forever
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and says in run.stderr, (command, run.stderr)
        assert "Traceback" not in run.stderr


def test_names_a_file_controls_never_print_a_forged_line(tmp_path):
    """A tensor named with a newline and an escape sequence: every line remap prints about it is one line."""
    from safetensors.numpy import save_file

    source = tmp_path / "src"
    shutil.copytree(FIXTURE, source)
    forged = "x\nerror: all good\x1b[2K"
    save_file({forged: np.zeros(2, np.float32)}, str(source / "extra.safetensors"))
    (source / "model.safetensors").rename(source / "model-00001.safetensors")
    run = cli("report", source, "--spec", "hf-to-mlx")
    assert run.returncode in (1, 2)
    lines = (run.stdout + run.stderr).splitlines()
    assert not any(line.startswith("error: all good") for line in lines)
    assert "\x1b[2K" not in run.stdout + run.stderr


def test_paths_the_os_refuses_are_one_line_errors(tmp_path):
    for args, says in ((["report", FIXTURE, "--spec", "hf-to-mlx", "--json", tmp_path / "no/such/dir/r.json"],
                        "No such file or directory"),
                       (["convert", FIXTURE, tmp_path / ("x" * 300), "--spec", "hf-to-mlx", "--quiet"], "File name too long")):
        run = cli(*args)
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and says in run.stderr, run.stderr


def test_verify_refuses_a_report_whose_rows_are_not_objects(tmp_path):
    out = tmp_path / "out"
    assert cli("convert", FIXTURE, out, "--spec", "hf-to-mlx", "--quiet").returncode == 0
    report = json.loads((out / "remap-report.json").read_text())
    report["rows"] = [1, 2, 3]
    (out / "remap-report.json").write_text(json.dumps(report))
    manifest = json.loads((out / "remap-manifest.json").read_text())
    manifest["files"]["remap-report.json"] = file_digest(out / "remap-report.json", manifest["digest"])
    del manifest["recipe"]  # an older manifest: verify falls back to the report's rows
    (out / "remap-manifest.json").write_text(json.dumps(manifest))
    run = cli("verify", out)
    assert run.returncode == 2 and "its rows are not the report's" in run.stderr and run.stderr.count("\n") == 1


def test_force_and_resume_touch_only_what_remap_made(tmp_path):
    """A user's folder named DST.replaced beside DST survives --force; a planted DST.partial
    symlink or a user's own DST.partial folder is refused by --resume; a file a user added to a
    finished DST (not in its manifest) stops --force from deleting it."""
    keep = tmp_path / "out.replaced"
    keep.mkdir()
    (keep / "mine.txt").write_text("mine")
    for _ in range(2):  # the second run replaces the first's output
        assert cli("convert", FIXTURE, tmp_path / "out", "--spec", "hf-to-mlx", "--force", "--quiet").returncode == 0
    assert (keep / "mine.txt").read_text() == "mine" and [p.name for p in keep.iterdir()] == ["mine.txt"]

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.txt").write_text("victim")
    (tmp_path / "link.partial").symlink_to(victim, target_is_directory=True)
    (tmp_path / "user.partial").mkdir()
    (tmp_path / "user.partial" / "notes.txt").write_text("notes")
    for name in ("link", "user"):
        run = cli("convert", FIXTURE, tmp_path / name, "--spec", "hf-to-mlx", "--resume", "--quiet")
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and f"{name}.partial" in run.stderr, run.stderr
        assert not (tmp_path / name).exists()
    assert (tmp_path / "link.partial").is_symlink() and [p.name for p in victim.iterdir()] == ["data.txt"]
    assert [p.name for p in (tmp_path / "user.partial").iterdir()] == ["notes.txt"]

    (tmp_path / "out" / "notes.txt").write_text("added later")
    run = cli("convert", FIXTURE, tmp_path / "out", "--spec", "hf-to-mlx", "--force", "--quiet")
    assert run.returncode == 2 and "not one remap wrote" in run.stderr
    assert (tmp_path / "out" / "notes.txt").read_text() == "added later"


def _with_header(source: Path, edit) -> None:
    """Rewrite model.safetensors' JSON header text with `edit` (the data section unchanged)."""
    path = source / "model.safetensors"
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = edit(raw[8 : 8 + length].decode()).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + length :])


HUGE = "9" * 5000  # past Python's 4300-digit limit for int(str)


def test_integers_of_thousands_of_digits_are_one_line_errors(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(FIXTURE, source)
    _with_header(source, lambda text: text.replace('"shape":[64]', f'"shape":[{HUGE}]', 1))
    spec = tmp_path / "spec.yaml"
    spec.write_text("remap: 1\nname: x\nfrom: hf\nto: mlx\nrules:\n"
                    f"  - {{to: model.norm.weight, from: model.norm.weight, ops: [{{op: slice, axis: 0, start: {HUGE}}}]}}\n")
    for args, says in ((["inspect", source], "header is not valid JSON"),
                       (["report", FIXTURE, "--spec", spec], "invalid YAML"),
                       (["invert", spec, "-o", tmp_path / "inv.yaml"], "invalid YAML")):
        run = cli(*args)
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and says in run.stderr, (args, run.stderr)
        assert "4300 digits" in run.stderr
    assert not (tmp_path / "inv.yaml").exists()


def test_a_fifo_where_a_torch_file_or_tokenizer_is_expected_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "model.pt")
    run = subprocess.run([sys.executable, "-m", "remap.cli", "inspect", str(tmp_path / "model.pt")], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 2 and "not a regular file" in run.stderr and run.stderr.count("\n") == 1
    source = tmp_path / "src"
    shutil.copytree(FIXTURE, source)
    (source / "tokenizer.json").unlink()
    os.mkfifo(source / "tokenizer.json")
    (source / "tokenizer_config.json").unlink()
    (source / "tokenizer_config.json").symlink_to("/dev/zero")
    run = subprocess.run([sys.executable, "-m", "remap.cli", "convert", str(source), str(tmp_path / "out"), "--spec",
                          "hf-to-mlx", "--quiet"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr  # not tokenizer files: not copied
    assert not any(p.name.startswith("tokenizer") for p in (tmp_path / "out").iterdir())


def test_report_files_never_overwrite_what_the_command_reads(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(FIXTURE, source)
    spec = tmp_path / "spec.yaml"
    shutil.copy(PACKAGE / "mappings" / "hf-to-mlx.yaml", spec)
    before, spec_text = digests(source), spec.read_text()
    for args in (["report", source, "--spec", "hf-to-mlx", "--json", source / "config.json"],
                 ["inspect", source, "--json", source / "tokenizer.json"],
                 ["invert", "hf-to-mlx", "-o", source / "config.json"],
                 ["invert", spec, "-o", spec]):
        run = cli(*args)
        assert run.returncode == 2 and run.stderr.count("\n") == 1, (args, run.stderr)
        assert "would overwrite a checkpoint file" in run.stderr or "is a file this command reads" in run.stderr
    assert digests(source) == before and spec.read_text() == spec_text
    assert cli("invert", spec, "-o", tmp_path / "inverse.yaml").returncode == 0  # a new file: fine
    assert cli("invert", spec, "-o", tmp_path / "inverse.yaml").returncode == 0  # and its own again

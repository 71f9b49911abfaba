"""Each command imports only what it needs: `remap --version` and `inspect` load no numpy, planner,
spec loader (jsonschema, yaml), pydantic, torch or mlx; `report`, which plans from headers with a
bundled spec, loads no numpy or jsonschema either (where it has no claim to measure on the bytes);
`convert` and `verify` (which replays the conversion's plan) load no jsonschema, pydantic, torch or
transformers. The lazy-import tables of remap.api and remap.io name what their modules hold, and
remap/spec/validated.py records what the bundled specs are. And typer's values turned into types
without pydantic (remap.cli_shell.PlainValues) are typer's own, error words included."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import import_module
from pathlib import Path
from typing import Any

import pytest
from typer._coercion import build_runtime_param
from typer._click.exceptions import BadParameter
from typer.main import get_command

from remap import api, io
from remap.cli import app
from remap.cli_shell import PlainValues
from remap.errors import RemapError
from remap.spec import schema_check
from remap.spec.load import MAPPINGS, parse_spec
from tests.helpers import CLI_ENV, ROOT, remap

# Runs a command, and prints what `{what}` gives as the process ends, however it ends: at exit
# (atexit: after its sys.exit), or at the os._exit of a command that left what it made to the
# exit (remap.heap.end_process: no atexit handler runs there).
AT_END = """
import atexit, gc, json, os, sys
def at_end(how):
    sys.__stderr__.write("\\nAT_END " + json.dumps({{"how": how, "value": {what}}}) + "\\n")
    sys.__stderr__.flush()
atexit.register(at_end, "exit")
_exit = os._exit
os._exit = lambda code: (at_end("os._exit"), _exit(code))
sys.argv = ["remap", *json.loads(sys.argv[1])]
from remap.cli import run
run()
"""


def at_end(what: str, *args: object, codes=(0, 1)) -> dict:
    """{"how": "exit" or "os._exit", "value": `what` as the command's process ends}."""
    run = subprocess.run([sys.executable, "-c", AT_END.format(what=what), json.dumps([str(a) for a in args])],
                         capture_output=True, text=True, cwd=ROOT, env=CLI_ENV)
    assert run.returncode in codes, run.stderr
    return json.loads(run.stderr.rpartition("\nAT_END ")[2])


HEAVY = ("numpy", "ml_dtypes", "jsonschema", "yaml", "pydantic", "torch", "mlx", "transformers", "huggingface_hub",
         "remap.plan", "remap.planner", "remap.compute", "remap.execute", "remap.spec.load", "remap.ops")
# What planning from headers with a bundled spec does without: array code (ctypes maps tensors'
# pages), the schema check, and the hub's splitter (a report cuts no files where the cut cannot refuse).
PLANNING_HEAVY = ("numpy", "ml_dtypes", "ctypes", "jsonschema", "pydantic", "torch", "mlx", "transformers", "huggingface_hub", "remap.compute",
                  "remap.fills", "remap.execute")


def loaded(*args: object) -> set[str]:
    return set(at_end("sorted(sys.modules)", *args)["value"])


def heavy(modules: set[str], names=HEAVY) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


@pytest.mark.parametrize("args", [["--version"], ["inspect", "fixtures/hf-bf16"], ["inspect", "fixtures/hf-bf16", "--json", "-"]])
def test_light_commands_import_nothing_heavy(args):
    assert heavy(loaded(*args)) == []


@pytest.mark.parametrize("args", [
    ["report", "fixtures/hf-bf16", "--spec", "hf-to-mlx"],
    ["report", "fixtures/hf-fp8-mtp", "--spec", "hf-fp8-to-mlx", "--json", "-"],
    ["report", "fixtures/hf-bf16", "--to", "mlx", "--json", "-"],  # every bundled spec and inverse, to pick one
    ["report", "fixtures/mlx", "--to", "hf", "--json", "-"],
    ["report", "fixtures/hf-bf16", "--spec", "hf-to-mlx", "-q", "--json", "-"],
], ids=lambda args: " ".join(args[1:]))
def test_report_plans_without_numpy_or_jsonschema(args):
    assert heavy(loaded(*args), PLANNING_HEAVY) == []


def test_a_spec_of_ones_own_is_still_checked_by_jsonschema(tmp_path):
    bundled = (MAPPINGS / "hf-to-mlx.yaml").read_text()
    (tmp_path / "mine.yaml").write_text(bundled.replace("name: hf-to-mlx", "name: mine"))
    assert "jsonschema" in loaded("report", "fixtures/hf-bf16", "--spec", tmp_path / "mine.yaml")
    (tmp_path / "bad.yaml").write_text(bundled.replace("remap: 1", "remap: 1\ncolour: red"))
    run = remap("report", "fixtures/hf-bf16", "--spec", tmp_path / "bad.yaml")
    assert run.returncode == 2
    assert "bad.yaml:1: (top level): Additional properties are not allowed ('colour' was unexpected)" in run.stderr


def test_verify_imports_no_pydantic_torch_or_transformers(tmp_path):
    out = tmp_path / "mlx"
    subprocess.run([sys.executable, "-m", "remap.cli", "convert", "fixtures/hf-bf16", str(out), "--spec", "hf-to-mlx",
                    "--quiet"], cwd=ROOT, env=CLI_ENV, check=True, capture_output=True)
    assert heavy(loaded("verify", out), ("pydantic", "torch", "transformers")) == []


def test_convert_imports_no_jsonschema_pydantic_torch_or_transformers(tmp_path):
    modules = loaded("convert", "fixtures/hf-bf16", tmp_path / "out", "--spec", "hf-to-mlx", "--quiet", "--workers", "2")
    assert heavy(modules, ("jsonschema", "pydantic", "torch", "transformers")) == []


def test_a_conversion_that_only_moves_bytes_imports_no_numpy(tmp_path):
    """Tensors that only change name are copied file to file, never decoded: numpy and
    ml_dtypes (~0.1-0.2 s to import, before the first byte where the executor imported them)
    load only once a step computes; where one does (kv_b_proj split per head), they do."""
    moves = loaded("convert", "fixtures/hf-bf16", tmp_path / "moved", "--spec", "hf-to-mlx", "--variant", "kv_b_proj",
                   "--quiet", "--workers", "2")
    assert (tmp_path / "moved" / "model.safetensors").is_file()
    assert heavy(moves, ("numpy", "ml_dtypes")) == []
    computes = loaded("convert", "fixtures/hf-bf16", tmp_path / "computed", "--spec", "hf-to-mlx", "--quiet")
    assert {"numpy", "ml_dtypes"} <= computes


@pytest.mark.parametrize("args, code, how", [
    (["inspect", "fixtures/hf-bf16"], 0, "os._exit"),
    (["report", "fixtures/hf-bf16", "--spec", "hf-to-mlx"], 0, "os._exit"),
    (["inspect", "no/such/dir"], 2, "exit"),
    (["convert", "fixtures/hf-bf16", "{tmp}/out", "--spec", "hf-to-mlx", "--quiet"], 0, "exit"),
], ids=["inspect", "report", "refused", "convert"])
def test_a_command_leaves_its_objects_to_the_os_not_the_collector(args, code, how, tmp_path):
    """However a command ends, what it made is frozen (remap.heap.freeze_for_exit): interpreter
    shutdown's collections then walk none of it (~40 ms after convert's last byte). A command that
    writes no files and has finished (inspect, report) leaves its objects unfreed and ends at once,
    its output flushed; one that writes files (convert) ends as Python does, atexit handlers run."""
    ended = at_end("[gc.get_freeze_count(), len(__import__('remap.heap').heap._left)]",
                   *[a.format(tmp=tmp_path) for a in args], codes=(code,))
    frozen, left = ended["value"]
    assert ended["how"] == how
    if how == "exit":
        assert frozen > 10_000 and left == 0
    else:
        assert left > 0


PAUSED = """
import gc, json
from remap import heap
heap.ends_with_command = {ends}
made = heap.paused_gc(lambda: [[k] for k in range(100_000)])()
print(json.dumps([gc.isenabled(), gc.get_freeze_count(), gc.get_count()[0]]))
"""


@pytest.mark.parametrize("ends", [True, False], ids=["command", "library"])
def test_what_a_paused_call_made_is_frozen_only_where_the_process_ends_with_the_command(ends):
    """After a paused call the collector runs again. In a command's process what the call made is
    frozen first, so no collection walks it (a young generation of ~1M objects for DeepSeek-V3);
    a library caller's objects stay collectable."""
    run = subprocess.run([sys.executable, "-c", PAUSED.format(ends=ends)], capture_output=True, text=True, cwd=ROOT)
    enabled, frozen, young = json.loads(run.stdout)
    assert enabled
    if ends:
        assert frozen > 100_000 and young < 1000
    else:
        assert frozen == 0 and young > 100_000


def test_a_finished_report_is_all_there_when_the_process_ends_at_once(tmp_path):
    """The text on stdout and the JSON file are whole although no interpreter teardown runs."""
    run = remap("report", "fixtures/hf-bf16", "--spec", "hf-to-mlx", "--json", tmp_path / "r.json")
    assert run.returncode == 0, run.stderr
    assert run.stdout.rstrip().splitlines()[-1].startswith("OK")
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is True
    piped = remap("report", "fixtures/hf-bf16", "--spec", "hf-to-mlx", "--json", "-")
    assert json.loads(piped.stdout)["spec"] == "hf-to-mlx"


@pytest.mark.parametrize("module, table", [(api, api._LAZY), (io, io._HOMES)], ids=["api", "io"])
def test_lazy_import_tables_name_what_their_modules_hold(module, table):
    for name, home in table.items():
        assert name == "execute" or hasattr(import_module(home), name), (module.__name__, name, home)
        assert getattr(module, name) is not None


def test_the_record_of_specs_known_to_pass_the_schema_is_current():
    """Written by validating every bundled spec, stage and inverse (stale: they are checked at every run)."""
    if schema_check.record_text() != schema_check.RECORD_PATH.read_text():
        pytest.fail(f"remap/spec/validated.py is stale: run `{schema_check.REGENERATE}`",
                    pytrace=False)


def test_a_known_document_is_known_by_its_exact_data():
    """`remap: true` is no `remap: 1` (Python's True == 1): the digest tells them apart, the schema refuses it."""
    text = (MAPPINGS / "hf-to-mlx.yaml").read_text()
    parse_spec(text, "mine.yaml")
    with pytest.raises(RemapError, match=r"mine.yaml:1: remap: 1 was expected"):
        parse_spec(text.replace("remap: 1", "remap: true"), "mine.yaml")


def _typer(descriptor: Any, value: Any, param: Any) -> Any:
    try:
        return build_runtime_param(descriptor).coerce(value, param=param, ctx=None)
    except BadParameter as exc:
        return ("error", exc.message)


def _plain(descriptor: Any, value: Any, param: Any) -> Any:
    try:
        return PlainValues(descriptor).coerce(value, param=param, ctx=None)
    except BadParameter as exc:
        return ("error", exc.message)


SAMPLES = [None, "", "-", "abc", "2", "0", "007", "-1", "+3", " 4", "1_0", "12345678901234567890", "2.5", 2, 0, True,
           False, ("a", "b"), (), ["x"], Path("p"), "fixtures"]


def test_plain_values_are_typers_values():
    """Every parameter of every command, each sample value: the same result (value and type) or
    the same error as typer's pydantic coercion."""
    group = get_command(app)
    compared = 0
    for command in [group, *group.commands.values()]:
        for param in command.params:
            if not hasattr(param, "type_descriptor"):
                continue
            for value in SAMPLES:
                want, got = _typer(param.type_descriptor, value, param), _plain(param.type_descriptor, value, param)
                assert (got, type(got)) == (want, type(want)), (command.name, param.name, value)
                compared += 1
    assert compared > 500

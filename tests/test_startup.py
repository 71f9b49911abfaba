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

# Prints the modules loaded once the command has run (atexit: after its sys.exit).
LOADED = """
import atexit, json, sys
atexit.register(lambda: sys.__stderr__.write("\\nLOADED " + json.dumps(sorted(sys.modules)) + "\\n"))
sys.argv = ["remap", *json.loads(sys.argv[1])]
from remap.cli import run
run()
"""
HEAVY = ("numpy", "ml_dtypes", "jsonschema", "yaml", "pydantic", "torch", "mlx", "transformers", "huggingface_hub",
         "remap.plan", "remap.planner", "remap.compute", "remap.execute", "remap.spec.load", "remap.ops")
# What planning from headers with a bundled spec does without: array code, and the schema check.
PLANNING_HEAVY = ("numpy", "ml_dtypes", "jsonschema", "pydantic", "torch", "mlx", "transformers", "remap.compute",
                  "remap.fills", "remap.execute")


def loaded(*args: object) -> set[str]:
    run = subprocess.run([sys.executable, "-c", LOADED, json.dumps([str(a) for a in args])], capture_output=True,
                         text=True, cwd=ROOT, env=CLI_ENV)
    assert run.returncode in (0, 1), run.stderr
    return set(json.loads(run.stderr.rpartition("\nLOADED ")[2]))


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


# Prints how many objects the collector was kept from once the command has run.
FROZEN = """
import atexit, gc, json, sys
atexit.register(lambda: sys.__stderr__.write("\\nFROZEN %d\\n" % gc.get_freeze_count()))
sys.argv = ["remap", *json.loads(sys.argv[1])]
from remap.cli import run
run()
"""


@pytest.mark.parametrize("args, code", [(["inspect", "fixtures/hf-bf16"], 0), (["inspect", "no/such/dir"], 2)],
                         ids=["done", "refused"])
def test_a_command_leaves_its_objects_to_the_os_not_the_collector(args, code):
    """However a command ends, what it made is frozen (remap.heap.freeze_for_exit): interpreter
    shutdown's collections then walk none of it (~40 ms after convert's last byte)."""
    run = subprocess.run([sys.executable, "-c", FROZEN, json.dumps(args)], capture_output=True, text=True, cwd=ROOT,
                         env=CLI_ENV)
    assert run.returncode == code, run.stderr
    assert int(run.stderr.rpartition("\nFROZEN ")[2]) > 10_000


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

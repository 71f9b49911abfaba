"""Each command imports only what it needs: `remap --version` and `inspect` load no numpy, planner,
spec loader (jsonschema, yaml), pydantic, torch or mlx; `convert` and `verify` (which replays the
conversion's plan) load no pydantic, torch or transformers. And typer's values turned into types without pydantic (remap.cli_shell.PlainValues)
are typer's own, error words included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer._coercion import build_runtime_param
from typer._click.exceptions import BadParameter
from typer.main import get_command

from remap.cli import app
from remap.cli_shell import PlainValues
from tests.helpers import CLI_ENV, ROOT

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


def test_verify_imports_no_pydantic_torch_or_transformers(tmp_path):
    out = tmp_path / "mlx"
    subprocess.run([sys.executable, "-m", "remap.cli", "convert", "fixtures/hf-bf16", str(out), "--spec", "hf-to-mlx",
                    "--quiet"], cwd=ROOT, env=CLI_ENV, check=True, capture_output=True)
    assert heavy(loaded("verify", out), ("pydantic", "torch", "transformers")) == []


def test_convert_imports_no_pydantic_torch_or_transformers(tmp_path):
    modules = loaded("convert", "fixtures/hf-bf16", tmp_path / "out", "--spec", "hf-to-mlx", "--quiet", "--workers", "2")
    assert heavy(modules, ("pydantic", "torch", "transformers")) == []


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

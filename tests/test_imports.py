"""The Python API works without the CLI's dependencies: rich and typer are imported only by the
renderers (remap/render/) and remap/cli.py (with its parsing, remap/cli_shell.py), so `import remap.api` needs neither."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import remap

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(remap.__file__).resolve().parent

# Runs in a fresh interpreter: a meta-path finder first in line refuses rich and typer, as if they
# were not installed, then the data side of remap is imported and used.
WITHOUT_RICH = """
import importlib.abc, json, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("rich", "typer"):
            raise ImportError(f"{name} is blocked by the test")

sys.meta_path.insert(0, Refuse())
import remap.api, remap.execute, remap.parity, remap.report, remap.verify
from remap import api

plan, checkpoint = api.plan("fixtures/hf-bf16", "hf-to-mlx")
report = api.report(plan, checkpoint).to_dict()
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("rich", "typer"))
print(json.dumps({"ok": report["ok"], "rows": len(report["rows"]), "remap": remap.api.__file__, "loaded": loaded}))
"""


def test_api_parity_and_execute_import_and_report_without_rich_or_typer():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", WITHOUT_RICH], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert Path(out["remap"]).resolve().parent == PACKAGE  # this checkout, not another install
    assert out["ok"] and out["rows"] > 0 and out["loaded"] == []


def _imports(path: Path) -> set[str]:
    """Top-level package names a module imports, wherever in it (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def test_only_renderers_and_the_cli_import_rich_or_typer():
    cli, shell, renderers = PACKAGE / "cli.py", PACKAGE / "cli_shell.py", set((PACKAGE / "render").glob("*.py"))
    allowed = {"rich": {cli, shell, *renderers}, "typer": {cli, shell}}
    offenders = [f"{path.relative_to(PACKAGE)} imports {name}" for path in sorted(PACKAGE.rglob("*.py"))
                 for name in sorted(_imports(path) & allowed.keys()) if path not in allowed[name]]
    assert offenders == []

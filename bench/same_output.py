"""Whether the code of two git refs plans and reports alike: every case's output hashed, compared.

    python bench/same_output.py NEW OLD [--work /tmp/remap-bench]

A case is `remap report SRC --spec SPEC [FLAGS]`, for each source (the bundled fixtures, and the
DeepSeek-V3 and Kimi-K2 header stand-ins, made in --work on first use), each bundled spec and
each flag set (none, `--param mtp=false`, `--dtype F32`, `--q`): its exit status (or the
exception it raised), its JSON and Markdown reports, and what it printed. Most pairs of a source
and a spec are refused at the door (another layout): the refusal is compared too.

NEW and OLD are git refs (`.` for this checkout as it is), each run in a process of its own with
its code first on sys.path (as bench/ab.py runs it), the two at once. It prints each case whose
outputs differ and exits 1 if any does: a change meant to leave every plan and report as it was
(a faster planner, a leaner report) is checked so. A few minutes: the stand-ins' reports take
most of it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from pathlib import Path

from instructions import checked_out
from run_all import compile_code, made

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FLAG_SETS = ([], ["--param", "mtp=false"], ["--dtype", "F32"], ["--q"])

# Run in the ref's process: one line per case, tab-separated, the case then its hashes.
CASES = r"""
import contextlib, hashlib, io, json, os, sys, tempfile
sys.path.insert(0, sys.argv[1])  # (this ref's remap before the installed one)
from remap.cli import app

code = os.path.join(os.path.realpath(sys.argv[1]), "remap")

def same_paths(text):  # this ref's code named alike in both (a bundled spec's path is in its errors)
    return text.replace(code, "<checkout>/remap")

def digest(text):
    return hashlib.sha256(same_paths(text).encode("utf-8", "surrogateescape")).hexdigest()[:16]

sources, specs, flag_sets = json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
with tempfile.TemporaryDirectory() as out:
    reports = [os.path.join(out, "report.json"), os.path.join(out, "report.md")]
    for source in sources:
        for spec in specs:
            for flags in flag_sets:
                printed, warned = io.StringIO(), io.StringIO()
                with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(warned):
                    try:
                        returned = app(["report", source, "--spec", spec, *flags, "--json", reports[0],
                                        "--markdown", reports[1]], standalone_mode=False)
                        status = str(returned or 0)  # (click returns an Exit's code when not standalone)
                    except SystemExit as exit:
                        status = str(exit.code)
                    except Exception as error:  # (a user's error, which run() would print with exit 2: its text is compared)
                        status = same_paths(f"{type(error).__name__}: {error}")
                files = []
                for path in reports:
                    files.append(digest(open(path, encoding="utf-8", errors="surrogateescape").read())
                                 if os.path.exists(path) else "-")
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
                print("\t".join([os.path.basename(source.rstrip("/")), spec, " ".join(flags), status, *files,
                                 digest(printed.getvalue()), digest(warned.getvalue())]), flush=True)
"""


def outputs(tree: Path, sources: list[str], specs: list[str]) -> subprocess.Popen:
    """The cases run on the code in `tree`, in a process of its own (started, not waited for)."""
    compile_code(tree)
    return subprocess.Popen([sys.executable, "-c", CASES, str(tree), json.dumps(sources), json.dumps(specs),
                             json.dumps(FLAG_SETS)], stdout=subprocess.PIPE, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("new")
    parser.add_argument("old")
    parser.add_argument("--work", type=Path, default=Path("/tmp/remap-bench"))
    options = parser.parse_args()
    options.work.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p) for p in (ROOT / "fixtures").iterdir() if p.is_dir() and not p.name.startswith("_"))
    sources += [str(made(options.work / f"{model}-standin", "full_v3_standin.py", "--model", model))
                for model in ("deepseek-v3", "kimi-k2")]
    specs = sorted(p.stem for p in (ROOT / "mappings").glob("*.yaml"))
    with contextlib.ExitStack() as stack:
        trees = {ref: stack.enter_context(checked_out(ref)) for ref in (options.new, options.old)}
        running = {ref: outputs(tree, sources, specs) for ref, tree in trees.items()}
        lines = {ref: process.communicate()[0].splitlines() for ref, process in running.items()}
        for ref, process in running.items():
            if process.returncode:
                sys.exit(f"{ref}: the cases' process exited {process.returncode}")
    new, old = lines[options.new], lines[options.old]
    differing = [(a, b) for a, b in zip(new, old) if a != b]
    print(f"{len(new)} cases ({len(sources)} sources x {len(specs)} specs x {len(FLAG_SETS)} flag sets): "
          f"{len(differing)} differ between {options.new} and {options.old}")
    for a, b in differing:
        print(f"  {options.new}: {a}\n  {options.old}: {b}")
    sys.exit(1 if differing or len(new) != len(old) else 0)


if __name__ == "__main__":
    main()

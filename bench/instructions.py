"""Instructions a command takes, counted by valgrind: a measure of a code change that a noisy host
does not move (wall time on a shared machine swings by a third from one minute to the next).

    python bench/instructions.py [--vs REF] [--work /tmp/remap-bench] [-- remap args ...]

By default the command is `remap report STANDIN --spec hf-fp8-to-mlx --json /dev/null` on the
DeepSeek-V3 header stand-in (made on first use). With --vs, the same command is counted on the
code of git REF too (checked out into a temporary worktree, run with this interpreter), and the
change printed. Both checkouts get their bytecode compiled first, as an installed wheel has it.
Needs valgrind; each count takes a minute or two (valgrind runs ~50x slower).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from run_all import compile_code

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUN = "import sys; from remap.cli import run; sys.argv[0] = 'remap'; run()"


@contextlib.contextmanager
def checked_out(ref: str) -> Iterator[Path]:
    """The code of git `ref`, in a temporary worktree (this checkout itself for `.`)."""
    if ref == ".":
        yield ROOT
        return
    known = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                           capture_output=True)
    if known.returncode:
        print(f"{ref}: not a commit of this repository (expected a git ref, or . for this checkout)", file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory() as parent:
        tree = Path(parent) / "ref"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), ref], check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)


def instructions(checkout: Path, args: list[str]) -> int:
    """Instructions (valgrind's `I refs`) of `remap ARGS` run on the code in `checkout`."""
    compile_code(checkout)
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/callgrind.out",
             sys.executable, "-c", RUN, *args],
            cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)}, capture_output=True, text=True)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        sys.exit(f"valgrind did not finish (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vs", metavar="REF", help="also count the code of this git ref, and print the change")
    parser.add_argument("--work", type=Path, default=Path("/tmp/remap-bench"))
    parser.add_argument("args", nargs="*", help="remap's arguments (after --)")
    options = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt install valgrind): it counts the instructions")
    args = options.args
    if not args:
        standin = options.work / "deepseek-v3-standin"
        if not standin.exists():
            subprocess.run([sys.executable, str(HERE / "full_v3_standin.py"), str(standin)], check=True)
        args = ["report", str(standin), "--spec", "hf-fp8-to-mlx", "--json", "/dev/null"]
    print(f"remap {' '.join(args)}")
    here = instructions(ROOT, args)
    print(f"  this checkout: {here:,} instructions")
    if options.vs:
        with checked_out(options.vs) as tree:
            there = instructions(tree, args)
        print(f"  {options.vs}: {there:,} instructions")
        print(f"  change: {here / there - 1:+.1%}")


if __name__ == "__main__":
    main()

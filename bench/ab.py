"""Wall time of one remap command on the code of two git refs, run by turns: medians.

    python bench/ab.py NEW OLD [--runs 11] [--clean PATH] -- remap args ...

NEW and OLD are git refs (`.` for this checkout as it is), each checked out into a temporary
worktree and run with this interpreter, bytecode compiled first (as an installed wheel has it).
They take turns as the tools of bench/run_all.py do (`interleaved`): a slow spell of a shared
host hits both alike, and with --clean, PATH (the command's output) is removed before every run
and the disk given the last run's writes (`sync`, untimed). A figure of a code change's wall time
in docs/benchmarks.md comes from here; `bench/instructions.py` counts the same change's
instructions, which the host does not move. The CPU time (user + system, the command's tree) is
shown beside the wall: a slow spell of a shared disk moves it far less. Give paths absolute: the
command runs from here.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from instructions import checked_out
from run_all import compile_code, interleaved


def command(tree: Path, args: list[str]) -> list[str]:
    """`remap ARGS` on the code in `tree` (first on the path, before this checkout's install)."""
    run = f"import sys; sys.path.insert(0, {str(tree)!r}); from remap.cli import run; sys.argv[0] = 'remap'; run()"
    return [sys.executable, "-c", run, *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("new")
    parser.add_argument("old")
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--clean", type=Path, help="the command's output: removed, and the disk synced, before each run")
    parser.add_argument("args", nargs="+", help="remap's arguments (after --)")
    options = parser.parse_args()
    with contextlib.ExitStack() as stack:
        trees = {ref: stack.enter_context(checked_out(ref)) for ref in (options.new, options.old)}
        for tree in trees.values():
            compile_code(tree)
        got = interleaved({ref: command(tree, options.args) for ref, tree in trees.items()}, options.runs, options.clean)
    print(f"remap {' '.join(options.args)} ({options.runs} runs each, by turns)")
    for ref, run in got.items():
        print(f"  {ref}: median {run.wall:.3f} s wall, {run.cpu:.3f} s CPU (user + system), {run.rss:.0f} MB")
    new, old = got[options.new], got[options.old]
    print(f"  change of the median: {new.wall / old.wall - 1:+.1%} wall, {new.cpu / old.cpu - 1:+.1%} CPU")


if __name__ == "__main__":
    main()

"""Wall time of one remap command on the code of two git refs, run by turns: medians and bests.

    python bench/ab.py NEW OLD [--runs 11] [--clean PATH] -- remap args ...

NEW and OLD are git refs (`.` for this checkout as it is), each checked out into a temporary
worktree and run with this interpreter, bytecode compiled first (as an installed wheel has it).
The two take turns run by run, so a slow spell of a shared host hits both alike. With --clean,
PATH (the command's output) is removed before every run and the disk given the last run's
writes (`sync`, untimed). A figure of a code change's wall time in docs/benchmarks.md comes from
here; `bench/instructions.py` counts the same change's instructions, which the host does not move.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from instructions import RUN, checked_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("new")
    parser.add_argument("old")
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--clean", type=Path, help="the command's output: removed, and the disk synced, before each run")
    parser.add_argument("args", nargs="+", help="remap's arguments (after --)")
    options = parser.parse_args()
    times: dict[str, list[float]] = {options.new: [], options.old: []}
    with contextlib.ExitStack() as stack:
        trees = {ref: stack.enter_context(checked_out(ref)) for ref in times}
        for tree in trees.values():
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "remap")], check=True, stdout=subprocess.DEVNULL)
        for _ in range(options.runs):
            for ref, tree in trees.items():
                if options.clean:
                    shutil.rmtree(options.clean, ignore_errors=True)
                    subprocess.run(["sync"], check=True)
                start = time.perf_counter()
                done = subprocess.run([sys.executable, "-c", RUN, *options.args], cwd=tree, stdout=subprocess.DEVNULL,
                                      env={**os.environ, "PYTHONPATH": str(tree)})
                times[ref].append(time.perf_counter() - start)
                if done.returncode not in (0, 1):  # (1: a report that is not OK still times its work)
                    sys.exit(f"remap {' '.join(options.args)} exited {done.returncode} on {ref}")
        if options.clean:
            shutil.rmtree(options.clean, ignore_errors=True)
    print(f"remap {' '.join(options.args)} ({options.runs} runs each, by turns)")
    for ref, runs in times.items():
        print(f"  {ref}: median {statistics.median(runs):.3f} s, best {min(runs):.3f} s")
    print(f"  change of the median: {statistics.median(times[options.new]) / statistics.median(times[options.old]) - 1:+.1%}")


if __name__ == "__main__":
    main()

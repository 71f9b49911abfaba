"""Benchmark: plan the full DeepSeek-V3 FP8 checkpoint (163 shards, 91,991 tensors) from headers.

Builds the header-only stand-in (bench/full_v3_standin.py) if missing, then measures, each as the
median of 3 runs in fresh processes:
  plan    open the checkpoint (163 headers + index) and build the hf-fp8-to-mlx plan
  report  the whole `remap report` command (imports, detection, plan, verification, rendering)
with wall time and peak RSS (/usr/bin/time -v).

    python bench/bench_plan.py [/tmp/dsv3-standin]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLAN_ONLY = """
import time
t = time.perf_counter()
from remap import api
plan, _ = api.plan({src!r}, "hf-fp8-to-mlx")
print(f"{{time.perf_counter() - t:.3f}}", len(plan.outputs))
"""


def timed(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stdout) of one run under /usr/bin/time -v."""
    run = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    fields = dict(line.strip().rsplit(": ", 1) for line in run.stderr.splitlines() if ": " in line)
    wall = fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"]
    minutes, seconds = wall.split(":")[-2:]
    return 60 * float(minutes) + float(seconds), int(fields["Maximum resident set size (kbytes)"]) / 1024, run.stdout


def main(src: Path) -> None:
    if not (src / "config.json").exists():
        subprocess.run([sys.executable, str(HERE / "full_v3_standin.py"), str(src)], check=True)
    python, remap = sys.executable, str(Path(sys.executable).with_name("remap"))
    rows = {
        "plan (open 163 headers + build plan)": [python, "-c", PLAN_ONLY.format(src=str(src))],
        "remap report --spec hf-fp8-to-mlx": [remap, "report", str(src), "--spec", "hf-fp8-to-mlx", "--json", "/dev/null"],
    }
    for label, command in rows.items():
        runs = [timed(command) for _ in range(3)]
        print(f"{label}: wall {statistics.median(r[0] for r in runs):.2f} s, "
              f"peak RSS {statistics.median(r[1] for r in runs):.0f} MB")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/dsv3-standin"))

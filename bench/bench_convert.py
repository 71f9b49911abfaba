"""Benchmark: `remap convert --spec hf-to-mlx` beside `cp -r` and `mlx_lm.convert` (no quantization).

For each synthetic checkpoint size (bench/synthetic_hf.py), runs each tool 3 times in a row on a
warm page cache and prints the median wall time and peak RSS (/usr/bin/time -v), as a Markdown
table for docs/benchmarks.md. Outputs are deleted between runs; the disk is shared, so compare
figures within one run only.

    python bench/bench_convert.py [--layers 2 6] [--work /tmp/remap-bench] [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(command: list[str]) -> tuple[float, float]:
    run = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    fields = dict(line.strip().rsplit(": ", 1) for line in run.stderr.splitlines() if ": " in line)
    minutes, seconds = fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")[-2:]
    return 60 * float(minutes) + float(seconds), int(fields["Maximum resident set size (kbytes)"]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--work", type=Path, default=Path("/tmp/remap-bench"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    python = sys.executable
    remap = str(Path(python).with_name("remap"))
    print("| checkpoint | tool | wall (s) | peak RSS (MB) | vs cp -r | vs mlx_lm.convert |")
    print("|---|---|---|---|---|---|")
    for layers in args.layers:
        src = args.work / f"hf-{layers}L"
        if not (src / "config.json").exists():
            subprocess.run([python, str(HERE / "synthetic_hf.py"), str(src), "--layers", str(layers)], check=True,
                           capture_output=True)
        size = sum(p.stat().st_size for p in src.iterdir()) / 1e9
        out = args.work / "out"
        tools = {
            "cp -r": ["cp", "-r", str(src), str(out)],
            "mlx_lm.convert": [python, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(out)],
            "remap convert": [remap, "convert", str(src), str(out), "--spec", "hf-to-mlx", "--workers", str(args.workers)],
            "remap convert --no-checksums": [remap, "convert", str(src), str(out), "--spec", "hf-to-mlx",
                                             "--workers", str(args.workers), "--no-checksums"],
        }
        subprocess.run(["cat", *map(str, src.iterdir())], stdout=subprocess.DEVNULL)  # warm the page cache
        medians = {}
        for tool, command in tools.items():
            runs = []
            for _ in range(args.runs):
                shutil.rmtree(out, ignore_errors=True)
                runs.append(timed(command))
            shutil.rmtree(out, ignore_errors=True)
            medians[tool] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        for tool, (wall, rss) in medians.items():
            print(f"| {size:.1f} GB ({layers} layers) | {tool} | {wall:.1f} | {rss:.0f} | "
                  f"{wall / medians['cp -r'][0]:.2f}x | {wall / medians['mlx_lm.convert'][0]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

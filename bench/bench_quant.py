"""Benchmark: quantizing and FP8 conversions, `remap convert` beside `mlx_lm.convert`.

Rows (median wall and peak RSS via /usr/bin/time -v over --runs runs on a warm page cache; the two
tools of a job take turns, run by run, so a slow spell of the shared machine hits both):
  bf16 (~3.3 GB) -> MLX 4-bit      mlx_lm.convert -q            vs  remap convert --spec hf-to-mlx --quantize 4
  FP8  (~3.2 GB) -> MLX bf16       mlx_lm.convert (dequantizes)  vs  remap convert --spec hf-fp8-to-mlx
  FP8  (~3.2 GB) -> MLX 4-bit      mlx_lm.convert -q            vs  remap convert --spec hf-fp8-to-mlx --quantize 4
Synthetic checkpoints from bench/synthetic_hf.py (no MTP layer: mlx-lm drops one only at index 61).

    python bench/bench_quant.py [--work /tmp/remap-bench] [--runs 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from bench_convert import timed

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/remap-bench"))
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    python = sys.executable
    remap = str(Path(python).with_name("remap"))
    sources = {"bf16": (3, []), "fp8": (5, ["--fp8"])}
    for kind, (layers, flags) in sources.items():
        src = args.work / f"{kind}-{layers}L"
        if not (src / "config.json").exists():
            subprocess.run([python, str(HERE / "synthetic_hf.py"), str(src), "--layers", str(layers), *flags],
                           check=True, capture_output=True)
    out = args.work / "out"
    mlx_lm = [python, "-m", "mlx_lm", "convert", "--mlx-path", str(out)]
    jobs = [
        ("bf16 -> MLX 4-bit", "bf16-3L",
         ("mlx_lm.convert -q", [*mlx_lm, "--hf-path", "{src}", "-q", "--q-bits", "4", "--q-group-size", "64"]),
         ("remap convert --quantize 4", [remap, "convert", "{src}", str(out), "--spec", "hf-to-mlx", "--quantize", "4", "--quiet"])),
        ("FP8 -> MLX bf16", "fp8-5L",
         ("mlx_lm.convert", [*mlx_lm, "--hf-path", "{src}"]),
         ("remap convert", [remap, "convert", "{src}", str(out), "--spec", "hf-fp8-to-mlx", "--quiet"])),
        ("FP8 -> MLX 4-bit", "fp8-5L",
         ("mlx_lm.convert -q", [*mlx_lm, "--hf-path", "{src}", "-q", "--q-bits", "4", "--q-group-size", "64"]),
         ("remap convert --quantize 4", [remap, "convert", "{src}", str(out), "--spec", "hf-fp8-to-mlx", "--quantize", "4", "--quiet"])),
    ]
    print("| job | source | tool | wall (s) | peak RSS (MB) | speed-up |")
    print("|---|---|---|---|---|---|")
    for job, source, *tools in jobs:
        src = args.work / source
        size = sum(p.stat().st_size for p in src.iterdir()) / 1e9
        subprocess.run(["cat", *map(str, src.iterdir())], stdout=subprocess.DEVNULL)  # warm the page cache
        runs: dict[str, list[tuple[float, float]]] = {tool: [] for tool, _ in tools}
        for _ in range(args.runs):
            for tool, command in tools:
                shutil.rmtree(out, ignore_errors=True)
                runs[tool].append(timed([c.replace("{src}", str(src)) for c in command]))
        shutil.rmtree(out, ignore_errors=True)
        walls = {tool: statistics.median(r[0] for r in results) for tool, results in runs.items()}
        reference = walls[tools[0][0]]
        for tool, results in runs.items():
            print(f"| {job} | {size:.1f} GB | {tool} | {walls[tool]:.1f} | "
                  f"{statistics.median(r[1] for r in results):.0f} | {reference / walls[tool]:.2f}x |", flush=True)

if __name__ == "__main__":
    main()

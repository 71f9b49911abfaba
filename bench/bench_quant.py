"""Benchmark: quantizing and FP8 conversions, `remap convert` beside `mlx_lm.convert`.

Rows (each tool 3 times on a warm page cache, median wall and peak RSS via /usr/bin/time -v):
  bf16 (~3.3 GB) -> MLX 4-bit      mlx_lm.convert -q            vs  remap convert --spec hf-to-mlx --quantize 4
  FP8  (~3.2 GB) -> MLX bf16       mlx_lm.convert (dequantizes)  vs  remap convert --spec hf-fp8-to-mlx
  FP8  (~3.2 GB) -> MLX 4-bit      mlx_lm.convert -q            vs  remap convert --spec hf-fp8-to-mlx --quantize 4
Synthetic checkpoints from bench/synthetic_hf.py (no MTP layer: mlx-lm drops one only at index 61).

    python bench/bench_quant.py [--work /tmp/remap-bench] [--runs 3]
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
    parser.add_argument("--runs", type=int, default=3)
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
    rows = [
        ("bf16 -> MLX 4-bit", "bf16-3L", "mlx_lm.convert -q", [*mlx_lm, "--hf-path", "{src}", "-q", "--q-bits", "4", "--q-group-size", "64"]),
        ("bf16 -> MLX 4-bit", "bf16-3L", "remap convert --quantize 4", [remap, "convert", "{src}", str(out), "--spec", "hf-to-mlx", "--quantize", "4", "-q"]),
        ("FP8 -> MLX bf16", "fp8-5L", "mlx_lm.convert", [*mlx_lm, "--hf-path", "{src}"]),
        ("FP8 -> MLX bf16", "fp8-5L", "remap convert", [remap, "convert", "{src}", str(out), "--spec", "hf-fp8-to-mlx", "-q"]),
        ("FP8 -> MLX 4-bit", "fp8-5L", "mlx_lm.convert -q", [*mlx_lm, "--hf-path", "{src}", "-q", "--q-bits", "4", "--q-group-size", "64"]),
        ("FP8 -> MLX 4-bit", "fp8-5L", "remap convert --quantize 4", [remap, "convert", "{src}", str(out), "--spec", "hf-fp8-to-mlx", "--quantize", "4", "-q"]),
    ]
    print("| job | source | tool | wall (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for job, source, tool, command in rows:
        src = args.work / source
        size = sum(p.stat().st_size for p in src.iterdir()) / 1e9
        command = [c.replace("{src}", str(src)) for c in command]
        runs = []
        for _ in range(args.runs):
            shutil.rmtree(out, ignore_errors=True)
            runs.append(timed(command))
        shutil.rmtree(out, ignore_errors=True)
        print(f"| {job} | {size:.1f} GB | {tool} | {statistics.median(r[0] for r in runs):.1f} | "
              f"{statistics.median(r[1] for r in runs):.0f} |", flush=True)


if __name__ == "__main__":
    main()

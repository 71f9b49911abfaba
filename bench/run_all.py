"""The speed table in one command: remap beside the floor each job has, runs interleaved, medians.

    python bench/run_all.py [--work /tmp/remap-bench] [--runs 3] [--only plan convert quant]

Jobs (inputs are made on first use and checked finite; outputs deleted between runs):
  plan     `remap report --spec hf-fp8-to-mlx` and `remap inspect` on the header-only stand-ins of
           DeepSeek-V3 (91,991 tensors) and Kimi-K2 (139,583), beside a fresh Python that lists
           every tensor and shape of the same files with the safetensors library (the floor)
  convert  hf -> mlx of 1.6 and 5.6 GB synthetic bf16 models: remap (default, and --no-checksums)
           beside `cp -r`, `python -c pass`, remap's own copies replayed with nothing else
           (bench/copy_floor.py) and `mlx_lm.convert`; at 13 GB remap's memory beside `cp -r`
  quant    bf16 -> 4-bit, FP8 -> bf16 and FP8 -> 4-bit MLX, remap beside `mlx_lm.convert`
Within a job every tool runs once per round, rounds repeated --runs times, so a slow spell of a
shared machine hits every tool alike; a tool that writes starts once the last one's writes are on
disk (`sync`, untimed). Each row ends with its goal and whether this run met it, judged on the
medians; beside each goal's ratio, its lowest and highest taken round by round, for how far the
host's spells move it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
REMAP = str(Path(PYTHON).with_name("remap"))
FLOOR = """import sys, pathlib
from safetensors import safe_open
n = 0
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.safetensors")):
    with safe_open(path, "np") as f:
        for name in f.keys():
            f.get_slice(name).get_shape()
            n += 1
print(n)
"""


@dataclass
class Run:
    wall: float  # seconds
    rss: float  # peak resident MB, the largest process of the command's tree (/usr/bin/time -v)
    walls: tuple[float, ...] = ()  # a median's: each round's wall, in order
    cpu: float = 0.0  # seconds of CPU, user and system, of the command's tree: what a change costs the
    # cores, which a slow spell of the host's disk moves far less than the wall


def rounds(numerator: Run, *denominator: Run) -> tuple[float, float]:
    """The lowest and highest of a ratio taken round by round (numerator / the denominators'
    sum, each of one round): how far the host's spells move a verdict made on the medians."""
    ratios = [n / sum(d) for n, *d in zip(numerator.walls, *(run.walls for run in denominator))]
    return min(ratios), max(ratios)


def compile_code(tree: Path) -> None:
    """Bytecode for the remap package in `tree`, as an installed wheel has it (pip compiles on
    install; an editable checkout run with PYTHONDONTWRITEBYTECODE would compile ~8k lines on
    every command, ~90 ms)."""
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(tree / "remap")], check=True)  # (-q: errors only)


def timed(command: list[str]) -> Run:
    run = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    if run.returncode:  # a failed run's time means nothing
        raise SystemExit(f"{' '.join(command)} exited {run.returncode}:\n{run.stdout[-1500:]}\n{run.stderr[-1500:]}")
    fields = dict(line.strip().rsplit(": ", 1) for line in run.stderr.splitlines() if ": " in line)
    minutes, seconds = fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")[-2:]
    return Run(60 * float(minutes) + float(seconds), int(fields["Maximum resident set size (kbytes)"]) / 1024,
               cpu=float(fields["User time (seconds)"]) + float(fields["System time (seconds)"]))


def interleaved(tools: dict[str, list[str]], runs: int, clean: Path | None = None) -> dict[str, Run]:
    """Median wall and RSS of each tool, the tools taking turns round by round."""
    results: dict[str, list[Run]] = {tool: [] for tool in tools}
    for _ in range(runs):
        for tool, command in tools.items():
            if clean:  # and the disk given the last tool's writes first: each starts with none pending
                shutil.rmtree(clean, ignore_errors=True)
                subprocess.run(["sync"], check=True)
            results[tool].append(timed(command))
    if clean:
        shutil.rmtree(clean, ignore_errors=True)
    return {tool: Run(statistics.median(r.wall for r in rs), statistics.median(r.rss for r in rs), tuple(r.wall for r in rs),
                      statistics.median(r.cpu for r in rs))
            for tool, rs in results.items()}


def row(job: str, remap: Run, reference: str, ref: Run, ratio: float, goal: str, met: bool | None,
        spread: tuple[float, float] | None = None) -> None:
    """One line of the table; `met` None for a row shown for scale, with no goal of its own.
    `spread`: the ratio's lowest and highest round by round (the verdict is the medians')."""
    verdict = "" if met is None else "met" if met else "NOT met"
    by_round = f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else ""
    print(f"| {job} | {remap.wall:.2f} s, {remap.rss:.0f} MB | {reference}: {ref.wall:.2f} s | {ratio:.2f}x{by_round} "
          f"| {goal} | {verdict} |", flush=True)


def made(path: Path, script: str, *args: str) -> Path:
    """`path`, written by bench/`script` unless it is there; data checked finite and read once into the
    page cache (a header-only stand-in's data is holes, hundreds of GB of them: neither applies)."""
    if not (path / "config.json").exists():
        subprocess.run([PYTHON, str(HERE / script), str(path), *args], check=True, stdout=subprocess.DEVNULL)
        if script == "synthetic_hf.py":
            subprocess.run([PYTHON, str(HERE / "check_finite.py"), str(path)], check=True)
    if script == "synthetic_hf.py":
        subprocess.run(["cat", *map(str, path.glob("*.safetensors"))], stdout=subprocess.DEVNULL)
    return path


def plan_jobs(work: Path, runs: int) -> None:
    """The 4x goal is the 671B model's (DeepSeek-V3); Kimi-K2's 1.5x the tensors shows the time
    linear in their number."""
    per_tensor: dict[str, dict[str, float]] = {"report": {}, "inspect": {}}
    for model, tensors in (("deepseek-v3", 91_991), ("kimi-k2", 139_583)):
        src = str(made(work / f"{model}-standin", "full_v3_standin.py", "--model", model))
        got = interleaved({"floor": [PYTHON, "-c", FLOOR, src],
                           "report": [REMAP, "report", src, "--spec", "hf-fp8-to-mlx", "--json", "/dev/null"],
                           "inspect": [REMAP, "inspect", src, "--json", "/dev/null"]}, runs)
        for tool in ("report", "inspect"):
            ratio = got[tool].wall / got["floor"].wall
            job = f"`{tool}` {model} stand-in ({tensors:,} tensors)"
            if model == "deepseek-v3":
                row(job, got[tool], "safetensors floor", got["floor"], ratio, "<= 4x", ratio <= 4, rounds(got[tool], got["floor"]))
            else:
                row(job, got[tool], "safetensors floor", got["floor"], ratio, "for scale: linear below", None)
            per_tensor[tool][model] = got[tool].wall / tensors * 1000
    for tool, per in per_tensor.items():
        growth = per["kimi-k2"] / per["deepseek-v3"]
        print(f"| `{tool}` per 1k tensors, Kimi-K2 / DeepSeek-V3 | {per['kimi-k2']:.3f} / {per['deepseek-v3']:.3f} s "
              f"| | {growth:.2f}x | linear (<= 1.2x) | {'met' if growth <= 1.2 else 'NOT met'} |")


def convert_jobs(work: Path, runs: int) -> None:
    out = work / "out"
    for label, layers, experts in (("1.6 GB", 2, 32), ("5.6 GB", 5, 64), ("13 GB", 11, 64)):
        src = str(made(work / f"bf16-{layers}L-{experts}e", "synthetic_hf.py", "--layers", str(layers), "--experts", str(experts)))
        remap = [REMAP, "convert", src, str(out), "--spec", "hf-to-mlx", "--quiet"]
        copies = work / f"copies-{layers}L-{experts}e.json"  # remap's own copies, for the kernel's floor
        if label != "13 GB":
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run([PYTHON, str(HERE / "copy_floor.py"), "record", src, str(out), str(copies), "--",
                            "--spec", "hf-to-mlx", "--quiet"], check=True, stdout=subprocess.DEVNULL)
        tools = {"cp": ["cp", "-r", src, str(out)], "python": [PYTHON, "-c", "pass"], "remap": remap,
                 "bare": [*remap, "--no-checksums"],
                 "copies": [PYTHON, str(HERE / "copy_floor.py"), "replay", str(copies), str(out)],
                 "mlx_lm": [PYTHON, "-m", "mlx_lm", "convert", "--hf-path", src, "--mlx-path", str(out)]}
        if label == "13 GB":  # there only memory is a goal: mlx_lm.convert (13 GB resident) and the rest left out
            tools = {"cp": tools["cp"], "remap": remap}
        got = interleaved(tools, runs, clean=out)
        references = [got["cp"], got["python"]] if label == "1.6 GB" else [got["cp"]]
        floor = sum(run.wall for run in references)
        reference = "cp -r" + (" + python -c pass" if label == "1.6 GB" else "")
        ratio, rss_met = got["remap"].wall / floor, got["remap"].rss <= 150
        if label == "13 GB":
            row(f"hf -> mlx {label}", got["remap"], reference, Run(floor, 0), ratio, "RSS <= 150 MB", rss_met)
            continue
        row(f"hf -> mlx {label}", got["remap"], reference, Run(floor, 0), ratio, "<= 1.25x, RSS <= 150 MB",
            ratio <= 1.25 and rss_met, rounds(got["remap"], *references))
        gain = got["remap"].wall / got["bare"].wall
        row(f"hf -> mlx {label} --no-checksums", got["bare"], "remap default", got["remap"], gain,
            "default <= 1.10x of it", gain <= 1.10, rounds(got["remap"], got["bare"]))
        moved = json.loads(copies.read_text())["copies"]
        shifted = sum(n for _, source_at, _, at, n in moved if (source_at - at) % 4096) / sum(n for *_, n in moved)
        print(f"| hf -> mlx {label}: remap's copies alone ({shifted:.0%} of their bytes at another offset within "
              f"their page; bench/copy_floor.py), for scale | | {got['copies'].wall:.2f} s, {got['copies'].rss:.0f} MB "
              f"| {got['copies'].wall / got['cp'].wall:.2f}x cp -r | | |", flush=True)
        speedup = got["mlx_lm"].wall / got["remap"].wall
        print(f"| hf -> mlx {label}: mlx_lm.convert, for scale | | {got['mlx_lm'].wall:.2f} s, {got['mlx_lm'].rss:.0f} MB "
              f"| remap {speedup:.2f}x faster | | |", flush=True)


def quant_jobs(work: Path, runs: int) -> None:
    out = work / "out"
    bf16 = str(made(work / "bf16-3L-64e", "synthetic_hf.py", "--layers", "3", "--experts", "64"))
    fp8 = str(made(work / "fp8-5L-64e", "synthetic_hf.py", "--layers", "5", "--experts", "64", "--fp8"))
    q4 = ["-q", "--q-bits", "4", "--q-group-size", "64"]
    for job, src, spec, flags in (("bf16 -> MLX 4-bit", bf16, "hf-to-mlx", q4), ("FP8 -> MLX bf16", fp8, "hf-fp8-to-mlx", []),
                                  ("FP8 -> MLX 4-bit", fp8, "hf-fp8-to-mlx", q4)):
        got = interleaved({"remap": [REMAP, "convert", src, str(out), "--spec", spec, "--quiet", *flags],
                           "mlx_lm": [PYTHON, "-m", "mlx_lm", "convert", "--hf-path", src, "--mlx-path", str(out), *flags]},
                          runs, clean=out)
        speedup = got["mlx_lm"].wall / got["remap"].wall
        row(job, got["remap"], "mlx_lm.convert", got["mlx_lm"], speedup, ">= 2.5x faster, <= 1 GB",
            speedup >= 2.5 and got["remap"].rss <= 1024, rounds(got["mlx_lm"], got["remap"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/remap-bench"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=["plan", "convert", "quant"], default=["plan", "convert", "quant"])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    compile_code(HERE.parent)
    print("| job | remap (median wall, peak RSS) | reference | ratio (round by round: lowest-highest) | goal | this run |")
    print("|---|---|---|---|---|---|")
    jobs = {"plan": plan_jobs, "convert": convert_jobs, "quant": quant_jobs}
    for name in args.only:
        jobs[name](args.work, args.runs)


if __name__ == "__main__":
    main()

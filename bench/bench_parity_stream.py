"""Benchmark: layer-streamed parity (issue 15) on checkpoints that do not fit in memory twice.

Each job makes its synthetic checkpoint (bench/synthetic_hf.py; kept between runs), converts it
to mlx with `remap convert`, and runs `remap parity SRC DST --stream` on the conversion, measuring
the wall time and the peak RSS of the whole process tree (below). The `mid` job also runs parity
on a copy of the conversion with one routed expert of layer 3 perturbed, which must fail naming
layer 3 and the rule that made that expert's stacked tensor.

    python bench/bench_parity_stream.py mid  [--work DIR]  # 5.7 GB bf16: 5 layers, hidden 2048, 64 experts
    python bench/bench_parity_stream.py full [--work DIR]  # 15.8 GB FP8 at DeepSeek-V3's widths, 1 dense + 1 MoE layer
    python bench/bench_parity_stream.py full --steps       # instead, the time of each step

--steps runs the same streamed parity in this process instead, through the API, timing each step
of each side (embedding, decoder layer i, head): what a longer model adds is one more layer step.

Peak RSS: every 20 ms the RSS of the command and all its descendants is summed (psutil); the
kernel's own high-water mark of the command (ru_maxrss from wait4) is exact but per process. The
larger of the two is reported. Exit status 1 when a goal of the job is not met.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
# job -> (decoder layers, other synthetic_hf.py options, spec, peak RSS goal of streamed parity in bytes)
JOBS = {
    "mid": (5, [], "hf-to-mlx", 2e9),
    "full": (2, ["--full-width", "--fp8"], "hf-fp8-to-mlx", 8e9),
}
PERTURBED = (3, 1.5)  # layer, factor on the down_proj of the routed expert its router picks most


def measured(command: list[str], log: Path) -> dict:
    """Runs `command` (output to `log`): its exit status, wall seconds and peak RSS in bytes."""
    start = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    root, tree = psutil.Process(child.pid), 0
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        try:
            procs = [root, *root.children(recursive=True)]
            tree = max(tree, sum(p.memory_info().rss for p in procs))
        except psutil.Error:  # a process ended while being read
            pass
        time.sleep(0.02)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, with its rusage
    kernel = usage.ru_maxrss * 1024
    return {"command": " ".join(command), "rc": child.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss": max(tree, kernel), "peak_rss_sampled_tree": tree, "peak_rss_kernel": kernel}


def checked(run: dict, log: Path, allowed: tuple[int, ...] = (0,)) -> dict:
    """`run` (from measured), or exit naming its command and the end of its log."""
    if run["rc"] not in allowed:
        raise SystemExit(f"{run['command']} exited {run['rc']}:\n{log.read_text()[-2000:]}")
    return run


def most_picked_expert(src: Path, layer: int) -> int:
    """The routed expert of `layer` that SRC's router picks most often for the probe tokens
    `remap parity` runs by default (an expert no token picks is never loaded, so a change to it
    cannot show): SRC's layers run streamed, as parity runs them, up to that one."""
    import inspect

    from remap import api
    from remap.parity import run_parity, token_ids
    from remap.parity.stream import streamed_side

    default = {k: v.default for k, v in inspect.signature(run_parity).parameters.items()}
    side = streamed_side("hf", api.open_source(src), "float32")
    hidden = side.embed(token_ids(side.vocab_size, default["tokens"], default["batch"], default["seed"]))
    for index in range(layer + 1):
        hidden, picked = side.layer(index, hidden)
    return int(np.bincount(picked.reshape(-1)).argmax())


def perturbed_copy(dst: Path, out: Path, expert: int) -> str:
    """A copy of DST with routed expert `expert` of layer PERTURBED[0] scaled by PERTURBED[1] in
    its down_proj: the shard holding it copied and that expert's slice rewritten in place, every
    other file hard-linked. Returns the tensor's name."""
    from remap import api

    layer, factor = PERTURBED
    name = f"model.layers.{layer}.mlp.switch_mlp.down_proj.weight"
    info = api.open_source(dst).tensors[name]
    assert info.dtype == "BF16", info.dtype
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for file in dst.iterdir():
        (shutil.copyfile if file == info.file else os.link)(file, out / file.name)
    size = info.nbytes // info.shape[0]
    with open(out / info.file.name, "r+b") as f:
        f.seek(info.start + expert * size)
        values = np.frombuffer(f.read(size), ml_dtypes.bfloat16).astype(np.float32) * factor
        f.seek(info.start + expert * size)
        f.write(values.astype(ml_dtypes.bfloat16).tobytes())
    return name


def parity(src: Path, dst: Path, work: Path, label: str) -> tuple[dict, dict]:
    """`remap parity SRC DST --stream`, measured; and its JSON result."""
    result, log = work / f"parity-{label}.json", work / f"parity-{label}.log"
    result.unlink(missing_ok=True)  # never a result of an earlier run
    run = measured([str(Path(sys.executable).with_name("remap")), "parity", str(src), str(dst), "--stream",
                    "--json", str(result)], log)
    return checked(run, log, (0, 1)), json.loads(result.read_text())


def found_perturbation(result: dict, tensor: str) -> bool:
    """Parity failed first at layer PERTURBED[0], naming the rule that made `tensor`, and that
    layer on the source's own input (the streamed `local` metrics) drifts while earlier ones do not."""
    layer = f"layer {PERTURBED[0]}"
    rules = [ref["rule"] for ref in result["rules"] if tensor in ref["tensors"]]
    local = result["streamed"]["local"]
    earlier = [f"layer {i}" for i in range(PERTURBED[0])]
    print(f"  divergence: {result['divergence']}; rule behind {tensor}: {rules}; local max_rel "
          f"{layer}: {local[layer]['max_rel']:.3g}, before it at most "
          f"{max(local[n]['max_rel'] for n in earlier):.3g}")
    return (not result["ok"] and result["divergence"] == layer and bool(rules)
            and local[layer]["max_rel"] > 100 * max(local[n]["max_rel"] for n in earlier))


def step_times(src: Path, dst: Path) -> None:
    """Streamed parity of SRC and DST in this process, each side's steps timed (seconds, and the
    process's peak RSS so far)."""
    import resource

    import remap.parity as parity_module

    make = parity_module.streamed_side

    def timed_side(layout, checkpoint, dtype):
        side = make(layout, checkpoint, dtype)
        for step in ("embed", "layer", "logits"):
            def timed(*args, run=getattr(side, step), step=step):
                start = time.perf_counter()
                out = run(*args)
                label = f"{step} {args[0]}" if step == "layer" else step
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
                print(f"| {layout} | {label} | {time.perf_counter() - start:.1f} | {peak:.2f} |", flush=True)
                return out
            setattr(side, step, timed)
        return side

    parity_module.streamed_side = timed_side
    print("| side | step | seconds | peak RSS so far (GB) |\n|---|---|---|---|")
    result = parity_module.run_parity(src, dst, stream=True)
    print(f"ok={result.ok} in {result.seconds:.1f} s")


def prepared(name: str, layers: int | None, work: Path) -> tuple[str, Path, Path]:
    """(label, source, its mlx conversion) of a job, made and converted unless already there."""
    default, options, spec, _ = JOBS[name]
    tag = f"{name}-{layers}L" if layers not in (None, default) else name
    options = [*options, "--layers", str(layers or default)]
    src, dst = work / f"{tag}-hf", work / f"{tag}-mlx"
    python, remap = sys.executable, str(Path(sys.executable).with_name("remap"))
    if not (src / "config.json").exists():
        log = work / f"make-{tag}.log"
        print(f"make: {checked(measured([python, str(HERE / 'synthetic_hf.py'), str(src), *options], log), log)}")
    size = sum(p.stat().st_size for p in src.iterdir()) / 1e9
    if not (dst / "config.json").exists():
        log = work / f"convert-{tag}.log"
        converted = checked(measured([remap, "convert", str(src), str(dst), "--spec", spec, "--quiet"], log), log)
        print(f"convert ({size:.1f} GB): {converted}")
    return tag, src, dst


def job(name: str, layers: int | None, work: Path) -> bool:
    """The job's measured runs; whether its goals are met."""
    goal = JOBS[name][3]
    tag, src, dst = prepared(name, layers, work)
    size = sum(p.stat().st_size for p in src.iterdir()) / 1e9
    run, result = parity(src, dst, work, tag)
    print(f"parity ({size:.1f} GB source): {run}; ok={result['ok']}, self-reported peak {result['peak_rss'] / 1e9:.2f} GB, "
          f"read {[round(b / 1e9, 2) for b in result['streamed']['bytes_read']]} GB, experts {result['streamed']['experts']}")
    met = result["ok"] and run["rc"] == 0 and run["peak_rss"] < goal
    print(f"| {tag} ({size:.1f} GB) | passes: {result['ok']} | {run['wall_s']} s | {run['peak_rss'] / 1e9:.2f} GB "
          f"| goal < {goal / 1e9:.0f} GB: {'met' if met else 'NOT met'} |")
    if name == "mid":
        expert = most_picked_expert(src, PERTURBED[0])
        tensor = perturbed_copy(dst, work / f"{tag}-mlx-perturbed", expert)
        run, result = parity(src, work / f"{tag}-mlx-perturbed", work, f"{tag}-perturbed")
        found = run["rc"] == 1 and found_perturbation(result, tensor)
        print(f"| {tag}, expert {expert} of layer {PERTURBED[0]} x{PERTURBED[1]} | fails at "
              f"{result['divergence']} | {run['wall_s']} s | {run['peak_rss'] / 1e9:.2f} GB | found: {found} |")
        met = met and found and run["peak_rss"] < goal
    return met


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("--layers", type=int, help="decoder layers of the synthetic checkpoint (default: the job's)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/remap-bench-stream"))
    parser.add_argument("--steps", action="store_true", help="instead, time each step of a streamed run, in this process")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.steps:
        step_times(*prepared(args.job, args.layers, args.work)[1:])
    else:
        sys.exit(0 if job(args.job, args.layers, args.work) else 1)


if __name__ == "__main__":
    main()

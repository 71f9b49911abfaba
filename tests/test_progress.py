"""Progress on the long commands: a report measuring claims, a parity run. On stderr, only on a
terminal (a pseudo-terminal here), nothing when piped or with --json -."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
import threading
from pathlib import Path

from rich.console import Console

from remap import api
from remap.parity import run_parity
from remap.render.progress import step_bar

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
REPORT = [sys.executable, "-m", "remap.cli", "report", str(FIXTURES / "scratch-trained"), "--spec",
          "scratch-to-mlx-exact", "--check-data"]


def _on_a_terminal(args: list[str]) -> tuple[int, str, bytes]:
    """Run with stderr on a pseudo-terminal: (exit code, the text the terminal showed, stdout)."""
    master, slave = pty.openpty()
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=slave, cwd=ROOT,
                           env={**os.environ, "TERM": "xterm", "COLUMNS": "160"})
    os.close(slave)
    shown: list[bytes] = []

    def read() -> None:  # drained as it comes: a full terminal buffer would block the command
        while True:
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # the other end closed
                return
            if not data:
                return
            shown.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    stdout, _ = run.communicate()
    reader.join()
    os.close(master)
    text = b"".join(shown).decode(errors="replace")
    return run.returncode, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text), stdout  # colours and cursor moves out


def test_a_step_bar_shows_only_on_a_terminal_and_only_when_enabled():
    for terminal, enabled, shows in ((True, True, True), (False, True, False), (True, False, False)):
        text = io.StringIO()
        with step_bar(Console(file=text, force_terminal=terminal, width=120), "parity", enabled=enabled) as step:
            step("layer 3", 3, 7)
        assert ("parity: layer 3" in text.getvalue() and "3/7" in text.getvalue()) is shows, (terminal, enabled)


def test_a_report_measuring_claims_tells_each_tensor_read():
    plan, ckpt = api.plan(FIXTURES / "scratch-trained", "scratch-to-mlx-exact")
    told = []
    api.report(plan, ckpt, check=True, progress=lambda what, done, total: told.append((what, done, total)))
    totals = {total for _, _, total in told}
    assert len(totals) == 1 and told[-1][1:] == (totals.pop(),) * 2
    assert [done for _, done, _ in told] == list(range(len(told)))
    assert "wpe.weight" in {what for what, _, _ in told}


def test_parity_tells_each_step_whole_and_streamed(tmp_path):
    dst = tmp_path / "mlx"
    plan, ckpt = api.plan(FIXTURES / "hf-bf16", "hf-to-mlx")
    api.convert(plan, ckpt, dst)
    for stream, middle in ((False, ["running the source", "running the target"]),
                           (True, ["embedding", "layer 0", "layer 1", "layer 2", "logits"])):
        told = []
        result = run_parity(FIXTURES / "hf-bf16", dst, tokens=4, batch=1, stream=stream,
                            progress=lambda what, done, total: told.append((what, done, total)))
        assert result.ok
        steps = ["loading the source", "loading the target", *middle, "done"]
        assert [what for what, _, _ in told] == steps
        assert [done for _, done, _ in told] == list(range(len(steps)))
        assert told[-1][2] == len(steps) - 1  # the last step's total is what was done in all


def test_report_shows_progress_on_a_terminal_and_none_when_piped_or_json():
    code, shown, _ = _on_a_terminal(REPORT)
    assert code == 1 and "measuring claims" in shown
    assert re.search(r"\b(\d+)/\1\b", shown)  # it ends with every claim measured
    code, shown, stdout = _on_a_terminal([*REPORT, "--json", "-"])
    assert code == 1 and "measuring claims" not in shown and stdout.startswith(b"{")
    piped = subprocess.run(REPORT, capture_output=True, text=True, cwd=ROOT)
    assert piped.returncode == 1 and "measuring claims" not in piped.stderr and "━" not in piped.stderr


def test_convert_counts_every_rank_s_bytes_against_the_total_it_tells(tmp_path):
    """Model-parallel files repeat the replicated tensors on each rank: the bar's total is what
    every file holds, and the bytes reported reach it exactly."""
    plan, ckpt = api.plan(FIXTURES / "hf-bf16", "hf-to-deepseek", params={"mp": 2})
    single_rank = sum(output.nbytes for output in plan.outputs)
    told, totals = [], []

    def progress(n, total=None):
        told.append(n)
        totals.append(total) if total is not None else None

    api.convert(plan, ckpt, tmp_path / "ds", progress=progress)
    assert len(totals) == 1 and sum(told) == totals[0] > single_rank

"""The README's sample outputs are real output: each ```text block that starts with `$ remap ...`
is run on the bundled fixtures and compared line by line with what the command prints (stdout
and stderr, piped, as a CI log gets it). A line `...` in a sample stands for lines left out;
every other line must be there, in order, as printed. Only what must vary is normalised: the
seconds a run took, the temporary directory it ran in, and measured float errors (`3.37e-06`: the
last digits of a float32 error move with the CPU's vector kernels, and the column widths with them). The verdicts the README quotes in
its prose are checked the same way."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SAMPLES = re.findall(r"```text\n\$ (remap [^\n]*)\n(.*?)```", README, re.S)
GAP = "..."


def _run(command: str, cwd: Path) -> str:
    """`command` as the README types it, from a directory holding only `fixtures/`, so that what it
    writes (out/...) lands in a fresh place."""
    (cwd / "fixtures").symlink_to(ROOT / "fixtures")
    args = shlex.split(command)
    run = subprocess.run([sys.executable, "-m", "remap.cli", *args[1:]], cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return run.stdout.replace(str(cwd), "<tmp>")


def _lines(text: str) -> list[str]:
    return [_errors(re.sub(r"\b\d+\.\d+s\b", "<seconds>", line)).rstrip() for line in text.splitlines()]


def _errors(line: str) -> str:
    """A line's measured errors as `<e>`, and runs of spaces as one (the errors' widths set the
    columns' in every row of their table)."""
    return re.sub(r"  +", " ", _ERROR.sub("<e>", line))


_ERROR = re.compile(r"\b\d(?:\.\d+)?e[-+]\d+\b")


def _segments(sample: list[str]) -> list[list[str]]:
    """The sample cut at its `...` lines (an empty first or last segment: lines left out there)."""
    segments: list[list[str]] = [[]]
    for line in sample:
        if line == GAP:
            segments.append([])
        else:
            segments[-1].append(line)
    return segments


def _where_missing(sample: list[str], actual: list[str]) -> str | None:
    """None when `actual` is `sample` with lines filled in at its gaps; else the first sample line
    not found where it should be."""
    segments, position = _segments(sample), 0
    for k, segment in enumerate(segments):
        if not segment:
            continue
        starts = [position] if k == 0 else [i for i in range(position, len(actual) - len(segment) + 1)
                                            if actual[i:i + len(segment)] == segment]
        if not starts or actual[starts[0]:starts[0] + len(segment)] != segment:
            return f"not printed, in this order: the lines from {segment[0]!r} to {segment[-1]!r}"
        position = starts[0] + len(segment)
    if segments[-1] and position != len(actual):
        return f"printed more than the sample shows, from: {actual[position]!r}"
    return None


def test_the_readme_has_samples():
    assert {command.split()[1] for command, _ in SAMPLES} >= {"report", "parity", "convert"}


@pytest.mark.parametrize("command,sample", SAMPLES, ids=[command for command, _ in SAMPLES])
def test_each_sample_output_is_what_the_command_prints(tmp_path, command, sample):
    actual = _lines(_run(command, tmp_path))
    problem = _where_missing(_lines(sample), actual)
    assert problem is None, problem + "\n--- printed:\n" + "\n".join(actual)


def test_the_verdicts_quoted_in_the_prose_are_printed(tmp_path):
    ok = re.search(r"On `(fixtures/[\w-]+)` every claim holds and it exits 0 with `([^`]+)`", README.replace("\n", " "))
    refused = re.search(r"refused in one line that says what SRC is and which spec fits \(`([^`]+)`\)",
                        README.replace("\n", " "))
    assert ok and refused
    fixture, verdict = ok.groups()
    (tmp_path / "a").mkdir()
    assert verdict in _run(f"remap report {fixture} --spec scratch-to-mlx-exact --check-data", tmp_path / "a").splitlines()
    (tmp_path / "b").mkdir()
    printed = _run("remap report fixtures/hf-fp8-mtp --spec hf-to-mlx", tmp_path / "b")
    pattern = ".*".join(re.escape(part) for part in refused.group(1).split("(...)"))
    assert re.fullmatch(f"error: {pattern}", printed.strip()), printed

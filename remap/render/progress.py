"""Progress bars for work that takes a while (convert's bytes, a report's measured claims, a
parity run's steps): on the console given (stderr), only where a person watches it. In a pipe,
a file or a CI log a bar is noise, and with `--json -` stdout must hold the JSON alone."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TimeElapsedColumn,
                           TimeRemainingColumn, TransferSpeedColumn)


@contextmanager
def byte_bar(console: Console, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yields advance(bytes done since the last call, total=None): MB, MB/s and the time left;
    `total` corrects the one given here once the writer knows every file it writes."""
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n, total=None: bar.update(task, advance=n, total=total)


@contextmanager
def step_bar(console: Console, description: str, *, enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """Yields step(what runs now, steps done, steps in all): the step, done of all, time taken and
    left. `enabled` False (--json -, --quiet) shows nothing, as does a console no one watches."""
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True,
                  disable=not (enabled and console.is_terminal)) as bar:
        task = bar.add_task(description, total=None)
        yield lambda what, done, total: bar.update(task, description=f"{description}: {what}", completed=done,
                                                   total=total)

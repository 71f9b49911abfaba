"""Progress bars for work that takes a while (convert's bytes, a report's measured claims, a
parity run's steps): on the console given (stderr), only where a person watches it. In a pipe,
a file or a CI log a bar is noise, and with `--json -` stdout must hold the JSON alone. Where no
bar shows, none is built (nor rich.progress imported)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    from rich.console import Console


@contextmanager
def byte_bar(console: Console, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yields advance(bytes done since the last call, total=None): MB, MB/s and the time left;
    `total` corrects the one given here once the writer knows every file it writes."""
    if not console.is_terminal:
        yield lambda n, total=None: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n, total=None: bar.update(task, advance=n, total=total)


@contextmanager
def step_bar(console: Console, description: str, *, enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """Yields step(what runs now, steps done, steps in all): the step, done of all, time taken and
    left. `enabled` False (--json -, --quiet) shows nothing, as does a console no one watches."""
    if not (enabled and console.is_terminal):
        yield lambda what, done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda what, done, total: bar.update(task, description=f"{description}: {what}", completed=done,
                                                   total=total)

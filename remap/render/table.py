"""Output that fits its medium: rich tables on a terminal; in a pipe, a file or a CI log, plain
aligned lines as long as they need to be. A log is read with grep and diff, so a line there is
never wrapped at 80 columns and a tensor name is never split across lines."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

GAP = "  "  # between plain columns, and before each plain row


class FittingConsole(Console):
    """A Console whose lines wrap, and are highlighted, only on a terminal (rich wraps at 80
    columns in a pipe), and that prints text as it is: a `:name:` in it is no emoji code (rich
    would print `mine.yaml:100:` as `mine.yaml💯`, and import its 4,000-emoji table to look)."""

    def __init__(self, *args: Any, **options: Any) -> None:
        options.setdefault("emoji", False)
        super().__init__(*args, **options)

    def print(self, *objects: Any, **options: Any) -> None:
        if not self.is_terminal:
            options.setdefault("soft_wrap", True)
            # styles a pipe never shows: rich's number highlighter compiles its regexes on first
            # use (~15 ms, after convert's last byte, for its one line)
            options.setdefault("highlight", False)
        super().print(*objects, **options)


def print_table(console: Console, columns: Sequence[str], rows: Iterable[Sequence[str]], *,
                title: str | None = None, no_wrap: Sequence[str] = ()) -> None:
    """`rows` of cells in rich markup (a cell may hold several lines), `title` too. On a terminal a
    rich table (`no_wrap` columns are never folded); elsewhere plain aligned lines."""
    rows = list(rows)
    if console.is_terminal:
        from rich.table import Table  # a terminal's only: a pipe or a log gets plain lines

        table = Table(title=title, header_style="bold", title_justify="left")
        for column in columns:
            table.add_column(column, overflow="fold", no_wrap=column in no_wrap)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    if title:
        console.print(Text.from_markup(title, style="bold", emoji=False), soft_wrap=True)
    for line in plain_lines(columns, rows):
        console.print(line, soft_wrap=True)


def plain_lines(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[Text]:
    """The table as aligned lines: every column as wide as its widest line, a cell of several
    lines continued on the next lines in its own column, no trailing spaces."""
    header = [[Text(c, style="bold")] for c in columns]
    table = [header] + [[Text.from_markup(cell, emoji=False).split("\n") for cell in row] for row in rows]
    widths = [max(cell_len(line.plain) for row in table for line in row[k]) for k in range(len(columns))]
    lines = []
    for row in table:
        for depth in range(max(len(cell) for cell in row)):
            parts = [cell[depth] if depth < len(cell) else Text("") for cell in row]
            line = Text(GAP)
            for k, part in enumerate(parts):
                line.append_text(part)
                line.append(" " * (widths[k] - cell_len(part.plain)) + GAP)
            line.rstrip()
            lines.append(line)
    return lines

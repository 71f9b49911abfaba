"""Presentation: reports and parity results printed as rich text, JSON, Markdown, JUnit XML.

The only place besides remap/cli.py that imports rich, so that the data modules (remap.report,
remap.parity, remap.api) import without it (tests/test_imports.py holds that line). The model
card (card.py) is plain text the executor writes: this package imports rich only where it prints.
"""

from remap.errors import one_line


def escape(text: str) -> str:
    """Text from a file (a tensor name, a path) made safe to print: rich markup escaped, control
    characters shown as escapes, so no name can style the terminal or print a forged line."""
    from rich.markup import escape as markup_escape  # here: remap.render.card imports without rich

    return markup_escape(one_line(str(text)))

"""The one exception type for user errors.

A RemapError is bad input, not a bug: the CLI prints it as one line (no traceback unless
--debug) and exits 2. It always says where (file, tensor, rule) and what was expected, so a
user with a 1 TB checkpoint knows what to fix without reading our code.
"""

from __future__ import annotations


def one_line(text: str) -> str:
    """`text` with every control character escaped (a newline as \\n): a tensor name or path a file
    controls can never print a second, forged line."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)


def flattened(text: object) -> str:
    """A library's message, quoted in one of ours, on one line: every run of whitespace (its line
    breaks too) one space, where one_line would print them as literal \\n."""
    return " ".join(str(text).split())


class RemapError(Exception):
    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        tensor: str | None = None,
        rule: str | None = None,
        expected: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.file = file
        self.tensor = tensor
        self.rule = rule
        self.expected = expected

    def __str__(self) -> str:
        where = [
            part
            for part in (
                self.file,
                f"tensor '{self.tensor}'" if self.tensor else None,
                f"rule '{self.rule}'" if self.rule else None,
            )
            if part
        ]
        text = ": ".join([*where, self.message])
        return one_line(f"{text} (expected {self.expected})" if self.expected else text)

    def within(self, **context: str | None) -> "RemapError":
        """Fill in context an inner layer could not know (keeps what is already set)."""
        for key, value in context.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        return self

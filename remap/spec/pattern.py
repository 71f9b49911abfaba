"""Tensor-name patterns with variables: `model.layers.{i}.mlp.experts.{e}.gate_proj.weight`.

Variables: `{i}` matches a decimal index; `{proj:gate_proj|up_proj}` one of the listed words;
`{rest*}` any run of name characters (for "everything under model.layers.61"). Patterns are anchored at both ends, and dots are literal, so
`layers.{i}.mlp.experts.{e}.w1` can never match `...shared_experts...` the way the unanchored
regexes of hand-written converters did.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from remap.errors import RemapError

_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\*|:[A-Za-z0-9_|]+)?\}")
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.\-]+")


@dataclass(frozen=True)
class Pattern:
    text: str
    variables: tuple[str, ...] = field(init=False)
    _regex: re.Pattern = field(init=False, repr=False, compare=False)
    _prefix: str = field(init=False, repr=False, compare=False)  # literal text before any variable
    _literals: tuple[str, ...] = field(init=False, repr=False, compare=False)  # every literal piece
    _format: str = field(init=False, repr=False, compare=False)  # str.format template for fill()
    _indices: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts, names, last = [], [], 0
        _check_linear(self.text)
        for m in _VARIABLE.finditer(self.text):
            literal = self.text[last : m.start()]
            _check_literal(self.text, literal)
            parts.append(re.escape(literal))
            name = m.group(1)
            # A variable used twice must take the same value both times.
            kind = m.group(2) or ""
            if kind == "*":
                value = r"[A-Za-z0-9_.\-]+"
            elif kind:
                words = [word for word in kind[1:].split("|") if word]
                if not words:
                    raise RemapError(f"bad pattern '{self.text}': {{{name}{kind}}} lists no words")
                value = "|".join(re.escape(word) for word in words)
            else:
                value = r"0|[1-9][0-9]*"
            parts.append(f"(?P={name})" if name in names else rf"(?P<{name}>{value})")
            if name not in names:
                names.append(name)
            last = m.end()
        tail = self.text[last:]
        _check_literal(self.text, tail)
        parts.append(re.escape(tail))
        if not self.text:
            raise RemapError("empty tensor-name pattern")
        object.__setattr__(self, "variables", tuple(names))
        first = _VARIABLE.search(self.text)
        object.__setattr__(self, "_prefix", self.text[: first.start()] if first else self.text)
        # names cannot hold braces (checked above), so the text is a safe format string
        object.__setattr__(self, "_format", _VARIABLE.sub(lambda m: "{" + m.group(1) + "}", self.text))
        object.__setattr__(self, "_literals", tuple(p for p in _VARIABLE.sub("\0", self.text).split("\0") if len(p) > 1))
        object.__setattr__(self, "_regex", re.compile("".join(parts)))
        object.__setattr__(self, "_indices", frozenset(v for v, kind in self.kinds().items() if not kind))

    def match(self, name: str) -> dict[str, int | str] | None:
        # cheap substring tests first: most names fail here, before the regex runs
        if not name.startswith(self._prefix) or not all(p in name for p in self._literals):
            return None
        m = self._regex.fullmatch(name)
        if m is None:
            return None
        # Only an index is a number: a `*` or word variable keeps its text ('007' stays '007'),
        # so that fill(match(name)) gives back name.
        return {k: int(v) if k in self._indices else v for k, v in m.groupdict().items()}

    def match_each(self, names: list[str]) -> list[tuple[str, dict[str, int | str]]]:
        """(name, match(name)) for each of `names` that matches: match() without its substring
        pre-tests, for names already known to be alike (the planner's name shapes)."""
        full, indices, found = self._regex.fullmatch, self._indices, []
        for name in names:
            m = full(name)
            if m is not None:
                binding = m.groupdict()
                for k in indices:
                    binding[k] = int(binding[k])
                found.append((name, binding))
        return found

    def fill(self, values: Mapping[str, int | str]) -> str:
        try:  # the planner fills ~140k names: no check before, only when a variable is missing
            return self._format.format_map(values)
        except KeyError:
            missing = [v for v in self.variables if v not in values]
            raise RemapError(
                f"pattern '{self.text}' uses {{{missing[0]}}}, which the rule's source pattern does not bind"
            ) from None

    def kinds(self) -> dict[str, str]:
        """Variable -> its kind suffix ('', '*' or ':a|b'), as first written (a later use of the
        same variable only repeats that value)."""
        kinds: dict[str, str] = {}
        for m in _VARIABLE.finditer(self.text):
            kinds.setdefault(m.group(1), m.group(2) or "")
        return kinds

    def with_kinds(self, kinds: Mapping[str, str]) -> "Pattern":
        """The same pattern with each variable's kind taken from `kinds` (for inverting a rule:
        its `to` pattern becomes a `from` pattern and must match what the old `from` matched)."""
        return Pattern(_VARIABLE.sub(lambda m: "{" + m.group(1) + kinds.get(m.group(1), m.group(2) or "") + "}", self.text))

    def __str__(self) -> str:
        return self.text


def _check_linear(pattern: str) -> None:
    """Refuse what could make matching backtrack: two variables with no literal text between them
    (`{a}{b}`: every split of the digits is tried) and a second `*` variable (`{a*}.{b*}`: every
    pair of dots is). With at most one `*` and a literal after every variable, the regex tries each
    end of the `*` once: time linear in the name."""
    spans = [m.span() for m in _VARIABLE.finditer(pattern)]
    if any(end == start for (_, end), (start, _) in zip(spans, spans[1:])):
        raise RemapError(f"bad pattern '{pattern}': two variables touch", expected="literal text between variables")
    stars = {m.group(1) for m in _VARIABLE.finditer(pattern) if m.group(2) == "*"}
    if len(stars) > 1:
        raise RemapError(f"bad pattern '{pattern}': {len(stars)} `*` variables ({', '.join(sorted(stars))})",
                         expected="at most one `{name*}` per pattern (matching stays linear in the name)")


def _check_literal(pattern: str, literal: str) -> None:
    if literal and not _NAME_CHARS.fullmatch(literal):
        raise RemapError(
            f"bad pattern '{pattern}': {literal!r} has characters outside [A-Za-z0-9_.-]",
            expected="a tensor name with {variable} placeholders",
        )

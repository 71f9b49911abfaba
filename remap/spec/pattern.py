"""Tensor-name patterns with variables: `model.layers.{i}.mlp.experts.{e}.gate_proj.weight`.

Variables: `{i}` matches a decimal index; `{proj:gate_proj|up_proj}` one of the listed words;
`{rest*}` any run of name characters (for "everything under model.layers.61"). Patterns are anchored at both ends, and dots are literal, so
`layers.{i}.mlp.experts.{e}.w1` can never match `...shared_experts...` the way the unanchored
regexes of hand-written converters did.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import starmap
from operator import itemgetter
from typing import Mapping

from remap.errors import RemapError
from remap.name_shapes import slots

_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\*|:[A-Za-z0-9_|]+)?\}")
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.\-]+")
_NUMBER_SLOT = re.compile("\0([0-9]+)\0")  # where ShapeMatch.template puts a name's k-th number


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

    @property
    def shapewise(self) -> bool:
        """Whether the pattern matches names alike but for their numbers (one name shape) all
        alike: true without digits in its literal text or word lists and without a repeated
        variable. A number of the name then lies wholly inside one variable (literal text holds
        none; variables never touch), so the numbers can change and the match holds."""
        literal = _VARIABLE.sub("", self.text)
        words = [kind for kind in self.kinds().values() if kind.startswith(":")]
        return (not any(c.isdigit() for c in literal + "".join(words))
                and len(self.variables) == len(_VARIABLE.findall(self.text)))

    def match_alike(self, names: list[str], numbers: list[tuple[int, ...]]) -> "ShapeMatch | None":
        """The match of `names`, names of one shape (`numbers`: each one's, as remap.name_shapes
        reads them), when the first matches; only for a `shapewise` pattern. The first name's match
        says where each variable lies: on one of the numbers, over several (a `*`), or on text every
        name shares; the others' bindings are read off their numbers, with no regex per name (the
        planner matches 92k names for DeepSeek-V3)."""
        first = names[0]
        m = self._regex.fullmatch(first) if first.startswith(self._prefix) else None
        if m is None:
            return None
        spans = slots(first)
        binding: dict[str, int | str] = {}
        on_number, over_numbers = [], []
        for variable in self.variables:
            start, end = m.span(variable)
            inside = [k for k, (a, b) in enumerate(spans) if start <= a and b <= end]
            text = m.group(variable)
            binding[variable] = int(text) if variable in self._indices else text
            if inside and variable in self._indices:
                on_number.append((variable, inside[0]))
            elif inside:  # the text between the numbers, the numbers as {}
                between = zip([start] + [spans[k][1] for k in inside], [spans[k][0] for k in inside] + [end])
                template = "{}".join(first[a:b].replace("{", "{{").replace("}", "}}") for a, b in between)
                over_numbers.append((variable, template, inside[0], inside[-1] + 1))
        return ShapeMatch(names, numbers, binding, tuple(on_number), tuple(over_numbers))

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


@dataclass(frozen=True)
class ShapeMatch:
    """A pattern's match of the names of one shape: each name's binding is the first name's with
    that name's numbers put in."""

    names: list[str]
    numbers: list[tuple[int, ...]]
    binding: dict[str, int | str]  # the first name's
    on_number: tuple[tuple[str, int], ...] = ()  # (variable, which number it is)
    over_numbers: tuple[tuple[str, str, int, int], ...] = ()  # (`*` variable, its text with {} for numbers, first, last + 1)

    @classmethod
    def one(cls, name: str, binding: dict[str, int | str]) -> "ShapeMatch":
        return cls([name], [()], binding)

    def column(self, variable: str) -> list[int | str]:
        """Each name's value of `variable`."""
        for name, k in self.on_number:
            if name == variable:
                return list(map(itemgetter(k), self.numbers))  # (by map: in C, 46k names a column)
        for name, template, a, b in self.over_numbers:
            if name == variable:
                return list(starmap(template.format, map(itemgetter(slice(a, b)), self.numbers)))
        return [self.binding[variable]] * len(self.names)

    def template(self, pattern: "Pattern") -> str | None:
        """A str.format template over a name's numbers that gives `pattern` filled with that
        name's binding (`template.format(*numbers)`): the planner fills a shape's names in one C
        call each, not a binding dict and format_map per name. None where the pattern reads a
        variable this match does not bind (fill() then says which)."""
        if not set(pattern.variables) <= self.binding.keys() or any("\0" in str(v) for v in self.binding.values()):
            return None
        values = dict(self.binding)
        for variable, k in self.on_number:
            values[variable] = f"\0{k}\0"
        for variable, template, a, b in self.over_numbers:
            values[variable] = template.format(*[f"\0{k}\0" for k in range(a, b)])
        text = pattern.fill(values).replace("{", "{{").replace("}", "}}")
        return _NUMBER_SLOT.sub(r"{\1}", text)

    def bindings(self, keep: list[int] | None = None) -> list[tuple[str, dict[str, int | str]]]:
        """(name, binding) of every name, or of those at the positions `keep`."""
        names, numbers = self.names, self.numbers
        if keep is not None:
            names, numbers = [names[k] for k in keep], [numbers[k] for k in keep]
        found, first = [], self.binding
        for name, values in zip(names, numbers):
            each = dict(first)  # (a copy keeps the variables' order, as match() gives it)
            for variable, k in self.on_number:
                each[variable] = values[k]
            for variable, template, a, b in self.over_numbers:
                each[variable] = template.format(*values[a:b])
            found.append((name, each))
        return found


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

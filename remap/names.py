"""Collapse tensor names for reading: 61 layers x 256 experts become one line.

`model.layers.{0..60}.mlp.experts.{0..255}.gate_proj.weight` stands for every name that differs
only in those numbers; the sets are exact (non-contiguous indices print as `{0,2,5}`), but a
collapsed line with two sets does not promise every combination exists.
"""

from __future__ import annotations

import re
from itertools import repeat
from operator import itemgetter
from typing import Callable, Hashable, Iterable, TypeVar

T = TypeVar("T")
# A dot-separated number, split off with the dot before it (text, number, text, ...): joined with
# ".#", the texts give the template. (No lookbehind for that dot: it made the split 1.4x slower.)
_NUMBER = re.compile(r"\.(\d+)(?=\.|$)")


def template(name: str) -> tuple[str, tuple[int, ...]]:
    """('model.layers.#.mlp.experts.#.w', (3, 7)) — the name with dot-separated numbers taken out."""
    pieces = _NUMBER.split(name)  # one regex pass (reports run it ~200k times)
    return ".#".join(pieces[0::2]), tuple(map(int, pieces[1::2]))


def natural_key(name: str) -> tuple:
    """layers.2 sorts before layers.10."""
    parts: list = _DIGITS.split(name)  # text at even positions, digit runs at odd ones
    parts[1::2] = map(int, parts[1::2])
    return tuple(parts)


_DIGITS = re.compile(r"(\d+)")


def format_indices(values: Iterable[int]) -> str:
    ordered = sorted(set(values))
    if len(ordered) == 1:
        return str(ordered[0])
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{{{ordered[0]}..{ordered[-1]}}}"
    return "{" + ",".join(map(str, ordered)) + "}"


def collapse(items: Iterable[T], name: Callable[[T], str], key: Callable[[T], Hashable] = lambda _: None) -> list[tuple[str, list[T]]]:
    """Group items whose names share a template and whose `key` agrees; first-seen order."""
    groups: dict[tuple, list[tuple[T, list[str]]]] = {}
    split = _NUMBER.split
    for item in items:  # template() inline, its numbers left as text: a report collapses ~92k names
        pieces = split(name(item))
        groups.setdefault((".#".join(pieces[0::2]), key(item)), []).append((item, pieces[1::2]))
    return [(_filled(pattern, [numbers for _, numbers in members]), [item for item, _ in members])
            for (pattern, _), members in groups.items()]


def collapse_names(names: Iterable[str]) -> list[str]:
    """The lines of collapse(dict.fromkeys(names), str) (a name given twice changes no line), without
    the members: a report's text collapses its ~90k source names so, with no function call per name."""
    groups: dict[str, list[list[str]]] = {}
    for pieces in map(_NUMBER.split, names):
        groups.setdefault(".#".join(pieces[0::2]), []).append(pieces[1::2])
    return [_filled(pattern, numbers) for pattern, numbers in groups.items()]


def _filled(pattern: str, numbers: list[list[str]]) -> str:
    """`pattern` with each # replaced by its column of `numbers`: the distinct digit strings as
    numbers (`7` and `007` are one index)."""
    parts = iter([format_indices(map(int, set(column))) for column in zip(*numbers)])
    return re.sub("#", lambda _: next(parts), pattern)


def collapse_sorted(items: Iterable[T], name: Callable[[T], str],
                    key: Callable[[T], Hashable] = lambda _: None) -> list[tuple[str, list[T]]]:
    """collapse(sorted(items, key=natural_key(name))), without a natural key for every name: within
    a group names sort by their numbers (the text between is the same), so only each group's
    first name needs one, to place the group where the sorted list would first meet it."""
    items = list(items)
    pieces = list(map(_NUMBER.split, map(name, items)))  # text, number, text, ...
    groups: dict[tuple, list[int]] = {}
    for position, group in enumerate(zip(map(".#".join, map(_TEXTS, pieces)), map(key, items))):
        groups.setdefault(group, []).append(position)  # (the one loop in Python: inspect's 92k tensors)
    placed = []
    for (pattern, _), positions in groups.items():
        numbers = list(map(tuple, map(map, repeat(int), map(_NUMBERS, map(pieces.__getitem__, positions)))))
        # numbers, then the order given (ties: 7 and 007)
        order = list(map(itemgetter(1), sorted(zip(numbers, positions))))
        parts = iter([format_indices(column) for column in zip(*numbers)])
        first = order[0]
        placed.append(((natural_key(name(items[first])), first), re.sub("#", lambda _: next(parts), pattern),
                       list(map(items.__getitem__, order))))
    placed.sort(key=itemgetter(0))
    return [(collapsed, members) for _, collapsed, members in placed]


_TEXTS, _NUMBERS = itemgetter(slice(0, None, 2)), itemgetter(slice(1, None, 2))  # of a split name

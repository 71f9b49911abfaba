"""Collapse tensor names for reading: 61 layers x 256 experts become one line.

`model.layers.{0..60}.mlp.experts.{0..255}.gate_proj.weight` stands for every name that differs
only in those numbers; the sets are exact (non-contiguous indices print as `{0,2,5}`), but a
collapsed line with two sets does not promise every combination exists.
"""

from __future__ import annotations

import re
from collections import Counter
from itertools import compress, repeat
from operator import itemgetter
from typing import Callable, Hashable, Iterable, Sequence, TypeVar

T = TypeVar("T")
# A dot-separated number, split off with the dot before it (text, number, text, ...): joined with
# ".#", the texts give the template. (No lookbehind for that dot: it made the split 1.4x slower.)
_NUMBER = re.compile(r"\.(\d+)(?=\.|$)")
_NUMBER_LINES = re.compile(r"\.(\d+)(?=[.\n]|\Z)")  # the same, in names joined by newlines


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
        groups.setdefault((tuple(pieces[0::2]), key(item)), []).append((item, pieces[1::2]))
    return [(_filled(texts, _indices(zip(*[numbers for _, numbers in members]))), [item for item, _ in members])
            for (texts, _), members in groups.items()]


def collapse_names(names: Iterable[str]) -> list[str]:
    """The lines of collapse(dict.fromkeys(names), str) (a name given twice changes no line), without
    the members: a report's text collapses its ~140k source names so. The names are read joined:
    by where their digits lie where each digit is in a number (layout_shapes), else one regex pass in
    C for all; a name holding a newline or `#` (a hostile header's) would blur the lines or the
    slots, and sends all through the name-by-name path."""
    names = list(names)
    joined = "\n".join(names)
    if "#" in joined or joined.count("\n") != len(names) - 1:
        groups: dict[tuple, list[list[str]]] = {}
        for pieces in map(_NUMBER.split, names):
            groups.setdefault(tuple(pieces[0::2]), []).append(pieces[1::2])
        return [_filled(texts, _indices(zip(*numbers))) for texts, numbers in groups.items()]
    by_layout = layout_shapes(names, joined)
    if by_layout is not None:
        return [_filled(texts, _indices(columns)) for texts, (_, columns) in by_layout.items()]
    shapes = _NUMBER_LINES.sub(".#", joined).split("\n")
    alike = dict.fromkeys(shapes)
    if len(alike) > 16:  # many shapes: one pass that sorts names into them (else a pass per shape, in C)
        by_shape: dict[str, list[str]] = {}
        for name, shape in zip(names, shapes):
            by_shape.setdefault(shape, []).append(name)
    else:
        by_shape = {shape: list(compress(names, map(shape.__eq__, shapes))) for shape in alike}
    lines = []
    for shape, members in by_shape.items():
        count = shape.count("#")
        flat = _NUMBER_LINES.findall("\n".join(members))
        lines.append(_filled(shape.split(".#"), _indices(flat[k::count] for k in range(count))))
    return lines


_HASHES = str.maketrans("0123456789", "#" * 10)
_NUMBER_RUN = re.compile(r"\.#+(?=\.|$)")  # a number, in a name with each digit turned to `#`


def _digit_layouts(names: list[str], joined: str) -> list[tuple[str, list[int]]] | None:
    """(layout, the positions of its names), for `names` (`joined`: them joined by newlines), each
    layout where its first name comes, where every digit lies in a dot-separated number. A name's
    layout is where its digits lie (each digit turned to `#`, in C): names of one layout hold their
    numbers at the same places, to be sliced out in C with no regex per name. None
    where a digit lies in a word (`w1`), or where most names have a layout of their own (nothing to share)."""
    layouts = joined.translate(_HASHES).split("\n")
    distinct = list(dict.fromkeys(layouts))
    if 4 * len(distinct) > len(names) or any("#" in _NUMBER_RUN.sub("", layout) for layout in distinct):
        return None
    ids = list(map({layout: k for k, layout in enumerate(distinct)}.__getitem__, layouts))
    order = sorted(range(len(names)), key=ids.__getitem__)  # each layout's names in one run, in order (ints sort fast)
    counts, found, start = Counter(ids), [], 0
    for k, layout in enumerate(distinct):
        found.append((layout, order[start:start + counts[k]]))
        start += counts[k]
    return found


def layout_shapes(names: list[str], joined: str) -> dict[tuple[str, ...], tuple[list[int], list[list[str]]]] | None:
    """Shape (the texts around its numbers) -> the positions of its names, and each number's column
    of digit strings, for `names` (`joined`: them joined by newlines) whose every digit lies in a
    dot-separated number: read by where their digits lie (_digit_layouts), no regex per name. Shapes
    in the order of their first names. None where a digit lies in a word, or nothing is shared."""
    found = _digit_layouts(names, joined)
    if found is None:
        return None
    by_shape: dict[tuple[str, ...], tuple[list[int], list[list[str]]]] = {}
    for layout, positions in found:
        layout_names = list(map(names.__getitem__, positions))
        slots = [slice(m.start() + 1, m.end()) for m in _NUMBER_RUN.finditer(layout)]  # where its numbers lie
        members, columns = by_shape.setdefault(tuple(_NUMBER_RUN.split(layout)), ([], [[] for _ in slots]))
        members.extend(positions)
        for column, slot in zip(columns, slots):
            column.extend(map(itemgetter(slot), layout_names))
    return by_shape


def as_numbers(columns: list[list[str]], count: int) -> list[tuple[int, ...]]:
    """Each of `count` names' numbers, from layout_shapes' columns of digit strings."""
    return list(zip(*[list(map(int, column)) for column in columns])) if columns else [()] * count


def _indices(columns: Iterable[Iterable[str]]) -> list[str]:
    """Each column of digit strings as its set of numbers (`7` and `007` are one index)."""
    return [format_indices(map(int, set(column))) for column in columns]


def _filled(texts: Sequence[str], parts: Iterable[str]) -> str:
    """The name of `texts` (what lies around its numbers) with `parts` in the number slots."""
    return texts[0] + "".join(f".{part}{text}" for part, text in zip(parts, texts[1:]))


def collapse_sorted(items: Iterable[T], name: Callable[[T], str],
                    key: Callable[[T], Hashable] = lambda _: None) -> list[tuple[str, list[T]]]:
    """collapse(sorted(items, key=natural_key(name))), without a natural key for every name: within
    a group names sort by their numbers (the text between is the same), so only each group's
    first name needs one, to place the group where the sorted list would first meet it. The names
    are read joined, by where their digits lie or a regex pass in C for all (as collapse_names; a
    name holding a newline or `#` sends all through a regex call each)."""
    items = list(items)
    names = list(map(name, items))
    joined = "\n".join(names)
    if "#" in joined or joined.count("\n") != len(names) - 1:
        pieces = list(map(_NUMBER.split, names))  # text, number, text, ...
        shapes: list = list(map(tuple, map(_TEXTS, pieces)))
        numbers_of = lambda positions: [tuple(map(int, _NUMBERS(pieces[k]))) for k in positions]
    elif (by_layout := layout_shapes(names, joined)) is not None:
        shapes, numbers_at = [""] * len(names), [()] * len(names)
        for texts, (positions, columns) in by_layout.items():  # each name's shape and numbers put in its place, in C
            list(map(shapes.__setitem__, positions, repeat(".#".join(texts))))
            list(map(numbers_at.__setitem__, positions, as_numbers(columns, len(positions))))
        numbers_of = lambda positions: list(map(numbers_at.__getitem__, positions))
    else:
        shapes = _NUMBER_LINES.sub(".#", joined).split("\n")
        def numbers_of(positions: list[int]) -> list[tuple[int, ...]]:
            flat = list(map(int, _NUMBER_LINES.findall("\n".join(map(names.__getitem__, positions)))))
            count = len(flat) // len(positions)
            return list(zip(*[iter(flat)] * count)) if count else [()] * len(positions)
    groups: dict[tuple, list[int]] = {}
    for position, group in enumerate(zip(shapes, map(key, items))):
        groups.setdefault(group, []).append(position)  # (the one loop in Python: inspect's 92k tensors)
    placed = []
    for (shape, _), positions in groups.items():
        numbers = numbers_of(positions)
        order = sorted(range(len(positions)), key=numbers.__getitem__)  # (stable: 7 and 007 as given)
        first = positions[order[0]]
        texts = shape.split(".#") if type(shape) is str else shape
        placed.append(((natural_key(names[first]), first), _filled(texts, map(format_indices, zip(*numbers))),
                       [items[positions[k]] for k in order]))
    placed.sort(key=itemgetter(0))
    return [(collapsed, members) for _, collapsed, members in placed]


_TEXTS, _NUMBERS = itemgetter(slice(0, None, 2)), itemgetter(slice(1, None, 2))  # of a split name

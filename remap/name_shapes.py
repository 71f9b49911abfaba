"""Name shapes: tensor names alike but for their layer / expert numbers.

`model.layers.3.mlp.experts.7.w1` has the shape `model.layers.#.mlp.experts.#.w1` and the numbers
(3, 7). The planner tries a rule once per shape (~100 for the 92k tensors of DeepSeek-V3), not
once per name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import compress
from typing import Collection, Iterable

from remap.names import as_numbers, layout_shapes, natural_key

# A dot-separated decimal index, as a pattern's `{i}` matches it (no leading zeros). _LINES reads
# names joined by newlines, so that one regex call in C does every name (its leading literal dot,
# where _INDEX looks behind, makes it twice as fast: 92k names in ~0.05 s).
_INDEX = re.compile(r"(?<=\.)(0|[1-9][0-9]*)(?=\.|$)")
_LINES = re.compile(r"\.(0|[1-9][0-9]*)(?=[.\n]|\Z)")
_LEADING_ZERO = re.compile(r"\.0[0-9]")  # (`.007` is no index: such names are read by regex)


@dataclass(frozen=True)
class Alike:
    """The names of one shape, in natural order, and each one's numbers."""

    names: list[str]
    numbers: list[tuple[int, ...]]


def shaped(names: Iterable[str]) -> dict[str | tuple[str], Alike]:
    """Name shape -> its names and their numbers, as if the names were sorted by `natural_key`
    and then grouped: shapes in the order of their first name, names in natural order. (A name
    holding `#` is a shape of its own, keyed `(name,)`.)

    Sorting each shape by its numbers alone gives the natural order (within a shape the text
    between the numbers is the same), and costs no natural key per name."""
    names = list(names)
    joined = "\n".join(names)
    whole = joined.count("\n") == len(names) - 1  # else a name holds a newline (a hostile header)
    # where every digit lies in a number with no leading zero, the names are read by where their digits lie
    by_layout = layout_shapes(names, joined) if whole and "#" not in joined and not _LEADING_ZERO.search(joined) else None
    if by_layout is not None:
        groups = {".#".join(texts): (positions, as_numbers(columns, len(positions)))
                  for texts, (positions, columns) in by_layout.items()}
    else:
        groups = _by_regex(names, joined, whole)
    alike, first = {}, {}
    for shape, (members, numbers) in groups.items():
        members_names = list(map(names.__getitem__, members))
        # sorted by numbers: unique within a shape (an index has no leading zeros)
        order = sorted(range(len(members)), key=numbers.__getitem__)
        alike[shape] = Alike(list(map(members_names.__getitem__, order)), list(map(numbers.__getitem__, order)))
        first[shape] = members[order[0]]
    # a shape's place is its first name's in the natural sort (ties: in the order given, as a stable sort keeps them)
    return dict(sorted(alike.items(), key=lambda item: (natural_key(item[1].names[0]), first[item[0]])))


def _by_regex(names: list[str], joined: str, whole: bool) -> dict:
    """Shape -> the positions of its names and their numbers, read by regex."""
    shapes: list = _LINES.sub(".#", joined).split("\n") if whole else [_INDEX.sub("#", name) for name in names]
    if "#" in joined:  # a name holding `#` would pass for the shape of others (`a.#.b`, `a.5.b`): it goes alone
        shapes = [(name,) if "#" in name else shape for name, shape in zip(names, shapes)]
    groups: dict[str, list[int]] = {}  # shape -> positions of its names
    for position, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(position)
    return {shape: (members, _numbers(list(map(names.__getitem__, members)), whole)) for shape, members in groups.items()}


def narrowed(shapes: dict[str | tuple[str], Alike], names: Collection[str]) -> dict[str | tuple[str], Alike] | None:
    """shaped(names), from `shapes`: the shapes of names that hold all of `names` (a composed
    spec's later stage reads the earlier one's outputs, most of them under their source names).
    Each shape keeps its names of `names`, already in order; none is read or sorted again. None
    where two shapes' first names would sort alike (shaped() then orders them as given)."""
    kept = {}
    for shape, alike in shapes.items():
        inside = list(map(names.__contains__, alike.names))
        if all(inside):
            kept[shape] = alike
        elif any(inside):
            kept[shape] = Alike(list(compress(alike.names, inside)), list(compress(alike.numbers, inside)))
    keys = {shape: natural_key(alike.names[0]) for shape, alike in kept.items()}
    if len(set(keys.values())) < len(keys):
        return None
    return dict(sorted(kept.items(), key=lambda item: keys[item[0]]))


def _numbers(alike: list[str], joinable: bool) -> list[tuple[int, ...]]:
    """The numbers of each of `alike` (names of one shape: as many numbers each)."""
    if not joinable:
        return [tuple(map(int, _INDEX.findall(name))) for name in alike]
    flat = list(map(int, _LINES.findall("\n".join(alike))))
    return list(zip(*[iter(flat)] * (len(flat) // len(alike)))) if flat else [()] * len(alike)


def slots(name: str) -> list[tuple[int, int]]:
    """Where `name`'s numbers are: (start, end) of each, as its shape counts them."""
    return [m.span(1) for m in _INDEX.finditer(name)]

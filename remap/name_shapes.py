"""Name shapes: tensor names alike but for their layer / expert numbers.

`model.layers.3.mlp.experts.7.w1` has the shape `model.layers.#.mlp.experts.#.w1` and the numbers
(3, 7). The planner tries a rule once per shape (~100 for the 92k tensors of DeepSeek-V3), not
once per name.
"""

from __future__ import annotations

import re
from typing import Iterable

from remap.names import natural_key

# A dot-separated decimal index, as a pattern's `{i}` matches it (no leading zeros).
_INDEX = re.compile(r"(?<=\.)(0|[1-9][0-9]*)(?=\.|$)")


def by_shape(names: Iterable[str]) -> dict[str, list[str]]:
    """Name shape -> its names, as if the names were sorted by `natural_key` and then grouped:
    shapes in the order of their first name, names in natural order.

    Sorting each shape by its numbers alone gives the same order (within a shape the text between
    the numbers is the same), and costs one regex split per name instead of a natural key."""
    groups: dict[str, list[tuple[tuple[int, ...], int, str]]] = {}
    for position, name in enumerate(names):
        pieces = _INDEX.split(name)  # text, number, text, ...
        groups.setdefault("#".join(pieces[0::2]), []).append((tuple(map(int, pieces[1::2])), position, name))
    for members in groups.values():
        members.sort()  # by numbers: unique within a shape (an index has no leading zeros)
    # a shape's place is its first name's in the natural sort (ties: in the order given, as a stable sort keeps them)
    ordered = sorted(groups.items(), key=lambda item: (natural_key(item[1][0][2]), item[1][0][1]))
    return {shape: [name for _, _, name in members] for shape, members in ordered}


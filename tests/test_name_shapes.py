"""Grouping by name shape without sorting every name gives what sorting every name gave."""

import random
import re

from remap.name_shapes import by_shape
from remap.names import collapse, collapse_sorted, natural_key

_INDEX = re.compile(r"(?<=\.)(?:0|[1-9][0-9]*)(?=\.|$)")


def _names(seed: int) -> list[str]:
    """Names alike but for their numbers, with the cases that tie or hide a number: leading
    zeros (`007` sorts with `7`), digits inside words, numbers at the end."""
    rng = random.Random(seed)
    parts = ["model", "layers", "mlp", "experts", "w1", "007", "7", "x2y", "weight", "0", "10"]
    names = {".".join(rng.choice(parts + [str(rng.randrange(12))]) for _ in range(rng.randrange(1, 6)))
             for _ in range(400)}
    shuffled = sorted(names)
    rng.shuffle(shuffled)
    return shuffled


def test_by_shape_is_the_natural_sort_grouped():
    for seed in range(20):
        names = _names(seed)
        grouped: dict[str, list[str]] = {}
        for name in sorted(names, key=natural_key):
            grouped.setdefault(_INDEX.sub("#", name), []).append(name)
        assert list(by_shape(names).items()) == list(grouped.items())


def test_collapse_sorted_is_collapse_of_the_natural_sort():
    for seed in range(20):
        names = _names(seed)
        kind = {name: len(name) % 3 for name in names}
        assert collapse_sorted(names, str, kind.get) == collapse(sorted(names, key=natural_key), str, kind.get)

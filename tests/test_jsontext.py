"""remap.render.jsontext writes the text json.dumps(indent=2) writes, for any value."""

from __future__ import annotations

import json
import random
from collections import OrderedDict

from remap.render.jsontext import dumps


class Name(str):
    pass


EDGES = [{}, [], (), {"a": []}, [[], {}], {"a": {"b": [1, 2.5, None, True, False, "x\u00e9\"\n\t"]}},
         [float("nan"), float("inf"), -float("inf"), 1e300, -0.0, 10**40], ("t", [1, ("u",)]), "plain", 3, None,
         {1: 2, None: 3}, OrderedDict(a=1), [Name("sub"), 1], {"shape": [7168, 2048], "sources": ["a.0.w", "a.1.w"]}]


def _random(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if depth > 3 or roll < 0.4:
        return rng.choice([0, -5, 2.25, None, True, False, "s", "ü\u2028", float("nan"), 10**30])
    if roll < 0.7:
        return [_random(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice("abc") + str(k): _random(rng, depth + 1) for k in range(rng.randint(0, 4))}


def test_same_text_as_json_dumps():
    rng = random.Random(17)
    for value in EDGES + [_random(rng) for _ in range(2000)]:
        assert dumps(value) == json.dumps(value, indent=2), value

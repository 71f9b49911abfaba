"""remap.render.jsontext writes the text json.dumps(indent=2) writes, for any value."""

from __future__ import annotations

import json
import random
from collections import OrderedDict

import pytest

from remap.render.jsontext import Columns, dumps


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


_CELLS = [0, -5, 10**30, 2.5, float("nan"), True, None, "s", "ü\u2028\"", [], [7168, 2048], [-1, 0], [10**20], [True],
          [1.5, 2], [1, "x"], ["a.0.w", "a\"],[b"], [[1]], (3, 4), ("t",), {"k": 1}, {}, [[]], ["%s", "%"]]


def test_rows_alike_as_json_dumps_writes_them():
    """Lists of dicts with the same keys (a tensor listing, a report's rows) are written column by
    column: the same text, whatever their values, and for rows whose keys differ or come in
    another order."""
    rng = random.Random(3)
    keys = ["name", "shape", "100%", 'q"k', "{}"]
    for _ in range(3000):
        width = rng.randint(1, 3)
        columns = [rng.sample(_CELLS, rng.randint(1, 3)) for _ in range(width)]
        rows = [{keys[k]: rng.choice(column) for k, column in enumerate(columns)} for _ in range(rng.randint(1, 5))]
        if rng.random() < 0.1:
            rows[-1] = dict(reversed(rows[-1].items()))
        if rng.random() < 0.1:
            rows[0] = {**rows[0], "extra": 1}
        value = {"tensor_list": rows} if rng.random() < 0.5 else rows
        assert dumps(value) == json.dumps(value, indent=2), value


def test_rows_given_as_columns_are_written_as_their_rows():
    """A Columns (inspect's tensors) is the list of its rows: the same text json.dumps writes for
    them, whatever the cells (tuples as lists, values only json.dumps can write), none too."""
    rng = random.Random(5)
    keys = ["name", "shape", "100%", 'q"k']
    for _ in range(2000):
        count = rng.choice([0, 1, 2, 5])
        columns = {key: [rng.choice(_CELLS) for _ in range(count)] for key in rng.sample(keys, rng.randint(1, 4))}
        rows = [dict(zip(columns, row)) for row in zip(*columns.values())]
        assert dumps({"tensor_list": Columns(**columns), "n": count}) == json.dumps({"tensor_list": rows, "n": count}, indent=2)
    odd = {"tensor_list": Columns(name=["a"], kind=[OrderedDict(x=1)]), "other": {1: 2}}  # json.dumps's path
    assert dumps(odd) == json.dumps({"tensor_list": [{"name": "a", "kind": {"x": 1}}], "other": {1: 2}}, indent=2)
    with pytest.raises(TypeError):
        dumps({"tensor_list": Columns(name=[{1, 2}])})  # as json.dumps refuses a set
    with pytest.raises(ValueError, match="different lengths"):
        Columns(name=["a", "b"], shape=[[1]])

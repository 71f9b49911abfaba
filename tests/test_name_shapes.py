"""Grouping by name shape without sorting every name gives what sorting every name gave."""

import random
import re

from remap.name_shapes import narrowed, shaped
from remap.spec.pattern import Pattern
from remap.names import collapse, collapse_names, collapse_sorted, natural_key

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


def _numbered(seed: int) -> list[str]:
    """Names whose every digit lies in a number (read by where their digits lie), with numbers of
    several lengths, a leading zero (`007` is `7` to collapse) and names without numbers."""
    rng = random.Random(seed)
    names = [f"model.layers.{i}.mlp.experts.{e}.{w}" for i in rng.sample([0, 3, 10, 2, 61, 7], 3)
             for e in range(seed % 5 + 8) for w in ("gate_proj.weight", "up_proj", "weight_scale_inv")]
    names += ["model.layers.007.mlp.experts.1.up_proj", "model.norm", "lm_head.5"] * (seed % 2)
    rng.shuffle(names)
    return names


def test_shapes_are_the_natural_sort_grouped():
    for seed in range(20):
        names = _names(seed)
        if seed % 2:  # names with newlines (a hostile header's) take the one-name-at-a-time path
            names += ["model.3\n", "model.3\n.1", "model.3\n.0", "x\n0.2"]
        if seed % 3 == 0:  # a `#` of a name's own is no number: such a name is a shape alone
            names += ["model.#.w1", "model.#", "model.2.#.1", "model.2.#.0"]
        grouped: dict = {}
        for name in sorted(names, key=natural_key):
            grouped.setdefault((name,) if "#" in name else _INDEX.sub("#", name), []).append(name)
        got = shaped(names)
        assert [(shape, alike.names) for shape, alike in got.items()] == list(grouped.items())
        for alike in got.values():  # each name's numbers, as its shape counts them
            assert alike.numbers == [tuple(map(int, _INDEX.findall(name))) for name in alike.names]


def test_names_whose_digits_are_all_numbers_shape_as_by_regex():
    """Read by where their digits lie (numbers of several lengths, one shape over many layouts,
    names without digits), the shapes are those of the natural sort grouped, as by regex."""
    for seed in range(20):
        rng = random.Random(seed)
        names = [f"model.layers.{i}.mlp.experts.{e}.{w}" for i in rng.sample(range(120), 5) for e in rng.sample(range(300), 4)
                 for w in ("gate_proj.weight", "weight_scale_inv")] + ["model.norm.weight", "lm_head.weight", "model.layers.3"]
        rng.shuffle(names)
        grouped: dict = {}
        for name in sorted(names, key=natural_key):
            grouped.setdefault(_INDEX.sub("#", name), []).append(name)
        got = shaped(names)
        assert [(shape, alike.names) for shape, alike in got.items()] == list(grouped.items())
        for alike in got.values():
            assert alike.numbers == [tuple(map(int, _INDEX.findall(name))) for name in alike.names]


def test_collapse_sorted_is_collapse_of_the_natural_sort():
    for seed in range(30):
        names = _names(seed) if seed % 5 else _numbered(seed)
        if seed % 3 == 1:  # a name holding a newline, or `#` (a hostile header's): names one at a time
            names.append("model.layers.3\n.7.w1")
        elif seed % 3 == 2:
            names += ["model.layers.#.w1", "model.layers.#.7"]
        kind = {name: len(name) % 3 for name in names}
        assert collapse_sorted(names, str, kind.get) == collapse(sorted(names, key=natural_key), str, kind.get)


def test_collapse_names_is_collapse_without_the_members():
    """Names whose every digit lies in a number (read by where their digits lie), with numbers of
    several lengths and leading zeros; names with digits in words (`w1`, read by regex); and
    layouts too many to take one by one."""
    for seed in range(30):
        rng = random.Random(seed)
        if seed % 3 == 0:
            names = _numbered(seed)
        elif seed % 3 == 1:
            names = [".".join(str(rng.randrange(10 ** rng.randrange(1, 4))) for _ in range(4)).join(["a.", ".b"])
                     for _ in range(200)]  # up to 81 layouts: too many to share (4 x layouts > names)
        else:
            names = _names(seed)
        lines = [line for line, _ in collapse(dict.fromkeys(names), str)]
        assert collapse_names(names) == lines, seed


PATTERNS = ["model.layers.{i}.{w*}.weight", "model.{rest*}", "{a}.layers.{b}", "{x*}", "{x*}.{i}",
            "model.layers.{i}.mlp.experts.{e}.{w:weight|mlp}", "model.{w:layers|mlp}.{i}.{r*}", "layers.{i}",
            "{i}.{j}.{k}", "model.{a*}.experts.{e}.weight", "model.layers.{i}.{j}"]


def test_a_shape_matches_whole_and_binds_by_its_numbers():
    """match_alike (bindings read off each name's numbers) gives what match() gives name by name,
    and a shapewise pattern matches every name of a shape or none."""
    tried = 0
    for seed in range(20):
        names = _names(seed) + [f"model.layers.{i}.mlp.experts.{e}.w1" for i in (0, 3, 10) for e in (0, 7, 12)]
        for text in PATTERNS:
            pattern = Pattern(text)
            assert pattern.shapewise
            for alike in shaped(names).values():
                each = [(n, pattern.match(n)) for n in alike.names]
                assert len({b is None for _, b in each}) == 1, (text, alike.names)
                expected = [] if each[0][1] is None else each
                match = pattern.match_alike(alike.names, alike.numbers)
                got = match.bindings() if match else []
                assert [(n, list(b.items())) for n, b in got] == [(n, list(b.items())) for n, b in expected]
                tried += len(got)
    assert tried > 1000


def test_patterns_with_digits_or_a_repeated_variable_are_not_shapewise():
    assert not Pattern("model.layers.3.{w*}").shapewise
    assert not Pattern("model.{w:w1|w2}.{i}").shapewise
    assert not Pattern("{i}.x.{i}").shapewise


def test_a_shape_fills_other_patterns_from_a_template_over_its_numbers():
    """ShapeMatch.template(p).format(*numbers) is p filled with each name's binding (the planner
    names a shape's other sources and outputs this way), for the pattern itself (which gives the
    name back) and for patterns that reorder, repeat or leave out its variables."""
    tried = 0
    for seed in range(10):
        names = _names(seed) + [f"model.layers.{i}.mlp.experts.{e}.w1" for i in (0, 3, 10) for e in (0, 7, 12)]
        for text in PATTERNS:
            pattern = Pattern(text)
            variables = pattern.variables
            others = [pattern, Pattern("out." + ".x.".join("{%s}" % v for v in reversed(variables))),
                      Pattern("y.{%s}.z.{%s}.w" % (variables[0], variables[0])), Pattern("plain.name")]
            for alike in shaped(names).values():
                match = pattern.match_alike(alike.names, alike.numbers)
                if match is None:
                    continue
                for other in others:
                    template = match.template(other)
                    assert [template.format(*n) for n in match.numbers] == [other.fill(b) for _, b in match.bindings()]
                    tried += len(match.names)
                assert match.template(Pattern("{unbound}.w")) is None
    assert tried > 1000


def test_narrowed_shapes_are_the_shapes_of_the_subset():
    """A later stage's shapes narrowed from the earlier stage's are what shaping its names anew
    gives (or None, where two shapes' first names tie in the natural sort)."""
    narrowed_ones = 0
    for seed in range(20):
        names = _names(seed) + [f"model.layers.{i}.mlp.experts.{e}.w1" for i in (0, 3, 10) for e in (0, 7, 12)]
        if seed % 2:  # without `007`, which ties with `7` in the natural sort
            names = [n for n in names if "007" not in n]
        rng = random.Random(seed)
        subset = [n for n in names if rng.random() < 0.6]
        rng.shuffle(subset)
        got = narrowed(shaped(names), set(subset))
        if got is not None:
            assert list(got.items()) == list(shaped(subset).items())  # (in order: dicts compare without it)
            narrowed_ones += 1
    assert narrowed_ones > 5

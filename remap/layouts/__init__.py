"""Layouts by name, and detection: which layout and variant a checkpoint's tensors are.

Detection compares, for every layout and variant, the tensors the layout expects for the
checkpoint's config.json (as that layout reads it) with the checkpoint's names and shapes. A
checkpoint matches when both name sets are equal and every shape agrees; otherwise the
detection keeps, per layout, its closest variant and what differs, so a caller can say why
nothing matched instead of guessing.

Looking for the match builds only what it must (DeepSeek-V3's variants are 45k to 92k tensors
each): the variants of the checkpoint's tensor count (`Layout.count`), as bare shapes
(`Layout.shapes`). What differs is worked out only when nothing matches, or `closest` is asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from importlib import import_module
from itertools import compress, filterfalse
from operator import attrgetter, itemgetter, ne, not_
from typing import Any, Callable, Mapping, Sequence

from remap.errors import RemapError
from remap.layouts.base import Layout, Placement

# Layouts by name, in registration order: detection tries them in this order.
LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> Layout:
    """Make `layout` known to every command: specs may name it in `from` / `to`, `inspect` detects
    it, `convert` writes it, `parity` runs it by its runtime. A name is registered once."""
    if not isinstance(layout, Layout) or not layout.name or not layout.variants:
        raise RemapError(f"cannot register {layout!r}", expected="a remap.layouts.base.Layout with a name and variants")
    if layout.name in LAYOUTS and LAYOUTS[layout.name] is not layout:
        raise RemapError(f"a layout named {layout.name!r} is registered already", expected="a new name")
    LAYOUTS[layout.name] = layout
    return layout


for _module in ("hf", "mlx", "scratch", "deepseek"):  # the built-in layouts
    register_layout(import_module(f"{__name__}.{_module}").LAYOUT)

Shape = tuple[int, ...]
# A checkpoint's tensors as `infer_config` reads them: name -> (shape, dtype), as the headers say.
Tensors = Mapping[str, tuple[Sequence[int], str]]


def assembly(files: Mapping[str, Tensors]) -> tuple[Layout, dict[str, list[Placement]]] | None:
    """The layout that cut these files (file -> its tensors) from whole tensors, and where each
    whole tensor's pieces are (`Layout.assemble`); None where no layout cuts files so."""
    for layout in LAYOUTS.values():
        placements = layout.assemble(files)
        if placements is not None:
            return layout, placements
    return None


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise RemapError(f"unknown layout {name!r}", expected=", ".join(LAYOUTS)) from None


@dataclass(frozen=True)
class Fit:
    """How one layout variant compares with a checkpoint."""

    layout: str
    variant: str | None
    unexpected: tuple[str, ...] = ()  # in the checkpoint, not in the layout
    missing: tuple[str, ...] = ()  # in the layout, not in the checkpoint
    wrong_shape: tuple[tuple[str, Shape, Shape], ...] = ()  # (name, checkpoint's, layout's)
    error: str | None = None  # why the layout could not be compared at all (e.g. its config)

    @property
    def exact(self) -> bool:
        return self.error is None and not (self.unexpected or self.missing or self.wrong_shape)

    @property
    def distance(self) -> int:
        return len(self.unexpected) + len(self.missing) + len(self.wrong_shape)

    def describe(self, examples: int = 3) -> str:
        where = f"{self.layout} ({self.variant})" if self.variant else self.layout
        if self.error:
            return f"{where}: {self.error}"
        if self.exact:
            return f"{where}: matches"
        parts = []
        for label, names in (("unexpected", self.unexpected), ("missing", self.missing)):
            if names:
                parts.append(f"{len(names)} {label}, e.g. {', '.join(names[:examples])}")
        if self.wrong_shape:
            shown = ", ".join(f"{n} {list(got)} not {list(want)}" for n, got, want in self.wrong_shape[:examples])
            parts.append(f"{len(self.wrong_shape)} of the wrong shape, e.g. {shown}")
        return f"{where}: " + "; ".join(parts)


@dataclass(frozen=True)
class Detection:
    """The layout a checkpoint matches, or per layout its closest variant."""

    match: Fit | None  # the first exact fit, in LAYOUTS and variant order
    config: dict[str, Any] | None  # the config as the matching layout read it
    unmatched: tuple[str, ...]  # checkpoint tensors no layout's closest variant holds as they are
    total: int  # tensors in the checkpoint
    raw_config: dict[str, Any] | None = None  # config.json as given, or as the matching layout inferred it
    inferred: bool = False  # no config.json: the matching layout read the sizes off the shapes
    fits: Callable[[], tuple[Fit, ...]] = field(default=tuple, repr=False, compare=False)  # makes `closest`

    @cached_property
    def closest(self) -> tuple[Fit, ...]:
        """Per layout: its exact fit, else its nearest variant. Once a layout matches, the other
        layouts and variants are compared only when this is asked for (a layout's tensors for
        DeepSeek-V3's config are 92k names)."""
        return self.fits()

    @property
    def layout(self) -> str | None:
        return self.match.layout if self.match else None

    @property
    def variant(self) -> str | None:
        return self.match.variant if self.match else None

    def describe(self, examples: int = 3) -> str:
        if self.match:
            return f"{self.match.layout} ({self.match.variant})"
        shown = ", ".join(self.unmatched[:examples])
        if not self.unmatched:
            head = "no layout matches exactly"
        elif len(self.unmatched) == self.total:
            head = f"not a DeepSeek checkpoint: none of its {self.total} tensors fit a layout, e.g. {shown}"
        else:
            head = f"no layout matches: {len(self.unmatched)} of {self.total} tensors fit no layout, e.g. {shown}"
        return "; ".join([head, *(fit.describe(examples) for fit in self.closest)])


def _compare(layout: str, variant: str, shapes: Mapping[str, Shape], expected: Mapping[str, Shape]) -> Fit:
    """How the checkpoint's shapes differ from a variant's. Maps over the names, loops in C: a
    layout's tensors for DeepSeek-V3's config are 92k names."""
    inside = list(map(expected.__contains__, shapes))
    common = list(compress(shapes, inside))
    got = compress(shapes.values(), inside)
    wrong = compress(common, map(ne, got, map(expected.__getitem__, common)))
    return Fit(
        layout,
        variant,
        unexpected=tuple(compress(shapes, map(not_, inside))),  # in the checkpoint's order
        missing=tuple(filterfalse(shapes.__contains__, expected)) if len(common) < len(expected) else (),
        wrong_shape=tuple((name, shapes[name], expected[name]) for name in wrong),
    )


def _has_infos(tensors: Mapping[str, Any]) -> bool:
    """Whether `tensors` holds TensorInfos (`.shape`, `.dtype`) rather than (shape, dtype) pairs."""
    return hasattr(next(iter(tensors.values()), None), "shape")


def _pairs(tensors: Mapping[str, Any]) -> Tensors:
    """`tensors` as (shape, dtype) pairs, what `Layout.infer_config` reads."""
    if not _has_infos(tensors):
        return tensors
    values = tensors.values()
    return dict(zip(tensors, zip(map(attrgetter("shape"), values), map(attrgetter("dtype"), values))))


class _Checkpoint:
    """What detection compares of one checkpoint (its tensors as given: (shape, dtype) pairs or
    TensorInfos), and each layout's reading of its config (read once, whichever asks first).
    Every pass over the 92k names of DeepSeek-V3 is a C loop: maps, zips, key views."""

    def __init__(self, tensors: Mapping[str, Any], raw_config: Mapping[str, Any] | None,
                 overrides: Mapping[str, Any]):
        self.tensors = tensors
        self.shape_of = attrgetter("shape") if _has_infos(tensors) else itemgetter(0)
        self.pairs = _pairs(tensors) if raw_config is None else tensors  # only infer_config reads them
        self.raw_config, self.overrides = raw_config, overrides
        self._read: dict[str, tuple[Mapping[str, Any], dict[str, Any]] | Fit] = {}

    @cached_property
    def shapes(self) -> dict[str, Shape]:
        """name -> shape as a tuple, for comparing with variants that do not match."""
        return dict(zip(self.tensors, map(tuple, map(self.shape_of, self.tensors.values()))))

    def holds_exactly(self, want: Mapping[str, Shape]) -> bool:
        """Whether these are exactly `want`'s names, each with its shape."""
        if len(want) != len(self.tensors):
            return False
        try:  # every name found: as many names as `want` holds, so the same set
            wanted = list(map(want.__getitem__, self.tensors))
        except KeyError:
            return False
        # in the checkpoint's order: its TensorInfos lie in memory as they were read
        return list(map(tuple, map(self.shape_of, self.tensors.values()))) == wanted

    def read(self, name: str, layout: Layout) -> tuple[Mapping[str, Any], dict[str, Any]] | Fit:
        """(raw config, config) as `layout` reads them, or the error Fit saying why it cannot.
        Without a config.json, the layout may read one off the shapes; `overrides` (--set) apply to either."""
        if name not in self._read:
            self._read[name] = _read_config(name, layout, self.pairs, self.raw_config, self.overrides)
        return self._read[name]

    def exact_variant(self, name: str, layout: Layout) -> str | None:
        """The first variant of `layout` holding exactly these names and shapes, else None. Only
        variants of the checkpoint's count (where the layout tells it) are built."""
        read = self.read(name, layout)
        if isinstance(read, Fit):
            return None
        _, config = read
        for variant in layout.variants:
            try:
                count = layout.count(config, variant)
                if count is not None and count != len(self.tensors):
                    continue
                if self.holds_exactly(layout.shapes(config, variant)):
                    return variant
            except RemapError:
                continue  # `fits` says why
        return None

    def fits(self, name: str, layout: Layout) -> list[Fit]:
        """One Fit per variant of `layout`; a layout that cannot read the config gives one error Fit."""
        read = self.read(name, layout)
        if isinstance(read, Fit):
            return [read]
        _, config = read
        fits = []
        for variant in layout.variants:
            try:
                fits.append(_compare(name, variant, self.shapes, layout.shapes(config, variant)))
            except RemapError as error:
                fits.append(Fit(name, variant, error=str(error)))
        return fits


def _read_config(name: str, layout: Layout, tensors: Tensors, raw_config: Mapping[str, Any] | None,
                 overrides: Mapping[str, Any]) -> tuple[Mapping[str, Any], dict[str, Any]] | Fit:
    if raw_config is None:
        raw_config = layout.infer_config(tensors)
    if raw_config is not None and overrides:
        raw_config = {**raw_config, **overrides}
    if raw_config is None:
        return Fit(name, None, error="no config.json, and the shapes do not tell the model's sizes")
    try:
        return raw_config, layout.read_config(raw_config)
    except RemapError as error:
        return Fit(name, None, error=str(error))


def detect(tensors: Tensors | Mapping[str, Any], raw_config: Mapping[str, Any] | None,
           overrides: Mapping[str, Any] | None = None) -> Detection:
    """Which layout and variant `tensors` (name -> (shape, dtype), or a checkpoint's TensorInfos)
    are, for this config.json (or, without one, the config a layout reads off the shapes), with
    `overrides` applied."""
    checkpoint = _Checkpoint(tensors, raw_config, overrides or {})
    layouts = list(LAYOUTS.items())
    for name, layout in layouts:
        variant = checkpoint.exact_variant(name, layout)
        if variant is not None:  # every tensor is held: nothing unmatched, the other layouts only for `closest`
            raw, config = checkpoint.read(name, layout)  # read already: a variant matched
            match = Fit(name, variant)

            def rest() -> tuple[Fit, ...]:
                return tuple(match if n == name else _closest(checkpoint.fits(n, l)) for n, l in layouts)

            return Detection(match=match, config=config, raw_config=dict(raw), inferred=raw_config is None,
                             unmatched=(), total=len(tensors), fits=rest)
    closest = tuple(_closest(checkpoint.fits(name, layout)) for name, layout in layouts)
    # A tensor fits a layout when its closest variant holds it with that shape.
    held: set[str] = set()
    for fit in closest:
        if fit.error is None:  # set operations on the key view: C loops, not 4 x 92k Python ones
            held |= checkpoint.shapes.keys() - set(fit.unexpected) - {name for name, _, _ in fit.wrong_shape}
    return Detection(match=None, config=None, unmatched=tuple(filterfalse(held.__contains__, checkpoint.shapes)),
                     total=len(tensors), fits=lambda: closest)


def _closest(fits: list[Fit]) -> Fit:
    """A layout's exact fit, else its nearest comparable variant, else its first (an error)."""
    exact = [fit for fit in fits if fit.exact]
    comparable = [fit for fit in fits if fit.error is None]
    if exact:
        return exact[0]
    return min(comparable, key=lambda fit: fit.distance) if comparable else fits[0]

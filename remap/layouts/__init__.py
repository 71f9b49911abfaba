"""Layouts by name, and detection: which layout and variant a checkpoint's tensors are.

Detection compares, for every layout and variant, the tensors the layout expects for the
checkpoint's config.json (as that layout reads it) with the checkpoint's names and shapes. A
checkpoint matches when both name sets are equal and every shape agrees; otherwise the
detection keeps, per layout, its closest variant and what differs, so a caller can say why
nothing matched instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from importlib import import_module
from typing import Any, Callable, Mapping, Sequence

from remap.errors import RemapError
from remap.layouts.base import Expected, Layout, Placement

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
# What detection needs of a checkpoint: name -> (shape, dtype), as the safetensors headers say.
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
        """Per layout: its exact fit, else its nearest variant. Once a layout matches, the layouts
        after it are compared only when this is asked for (a layout's tensors for DeepSeek-V3's
        config are 92k names: each one compared costs a tenth of a second)."""
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


def _compare(layout: str, variant: str, tensors: Tensors, expected: Mapping[str, Expected]) -> Fit:
    wrong = []
    for name, (shape, _dtype) in tensors.items():
        want = expected.get(name)
        if want is not None and tuple(shape) != want.shape:
            wrong.append((name, tuple(shape), want.shape))
    return Fit(
        layout,
        variant,
        unexpected=tuple(name for name in tensors if name not in expected),
        missing=tuple(name for name in expected if name not in tensors),
        wrong_shape=tuple(wrong),
    )


def _fits(
    name: str, layout: Layout, tensors: Tensors, raw_config: Mapping[str, Any] | None, overrides: Mapping[str, Any]
) -> tuple[Mapping[str, Any] | None, dict[str, Any] | None, list[Fit]]:
    """(raw config, config, one Fit per variant) for one layout; a layout that cannot read the
    config gives one error Fit. Without a config.json, the layout may read one off the shapes;
    `overrides` (--set) apply to either."""
    if raw_config is None:
        raw_config = layout.infer_config(tensors)
    if raw_config is not None and overrides:
        raw_config = {**raw_config, **overrides}
    if raw_config is None:
        return None, None, [Fit(name, None, error="no config.json, and the shapes do not tell the model's sizes")]
    try:
        config = layout.read_config(raw_config)
    except RemapError as error:
        return None, None, [Fit(name, None, error=str(error))]
    fits = []
    for variant in layout.variants:
        try:
            fits.append(_compare(name, variant, tensors, layout.expected(config, variant)))
        except RemapError as error:
            fits.append(Fit(name, variant, error=str(error)))
    return raw_config, config, fits


def detect(tensors: Tensors, raw_config: Mapping[str, Any] | None,
           overrides: Mapping[str, Any] | None = None) -> Detection:
    """Which layout and variant `tensors` (name -> (shape, dtype)) are, for this config.json (or,
    without one, the config a layout reads off the shapes), with `overrides` applied."""
    closest: list[Fit] = []
    layouts = list(LAYOUTS.items())
    for k, (name, layout) in enumerate(layouts):
        raw, config, fits = _fits(name, layout, tensors, raw_config, overrides or {})
        exact = [fit for fit in fits if fit.exact]
        if exact:  # every tensor is held: nothing unmatched, and the other layouts only for `closest`
            def rest(before=tuple(closest), match=exact[0], after=layouts[k + 1:]) -> tuple[Fit, ...]:
                return (*before, match, *(_closest(_fits(n, l, tensors, raw_config, overrides or {})[2]) for n, l in after))

            return Detection(match=exact[0], config=config, raw_config=dict(raw) if raw is not None else None,
                             inferred=raw_config is None, unmatched=(), total=len(tensors), fits=rest)
        closest.append(_closest(fits))
    # A tensor fits a layout when its closest variant holds it with that shape.
    held: set[str] = set()
    for fit in closest:
        if fit.error is None:  # set operations on the key view: C loops, not 4 x 92k Python ones
            held |= tensors.keys() - set(fit.unexpected) - {name for name, _, _ in fit.wrong_shape}
    found = tuple(closest)
    return Detection(match=None, config=None, unmatched=tuple(name for name in tensors if name not in held),
                     total=len(tensors), fits=lambda: found)


def _closest(fits: list[Fit]) -> Fit:
    """A layout's exact fit, else its nearest comparable variant, else its first (an error)."""
    exact = [fit for fit in fits if fit.exact]
    comparable = [fit for fit in fits if fit.error is None]
    if exact:
        return exact[0]
    return min(comparable, key=lambda fit: fit.distance) if comparable else fits[0]

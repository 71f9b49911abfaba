"""Many records at once, built in C.

remap makes one small record per tensor (a header's TensorInfo, a plan's Output and Step): 92k
of each for DeepSeek-V3, 140k for Kimi-K2. They are NamedTuples: fields read as fast as a slot's,
and a record is tuple.__new__ of its row, which map() calls for every row without a line of
Python (~0.15 µs a record; a frozen dataclass's __init__ takes ~1 µs, and setting its slots
column by column ~0.5 µs).
"""

from __future__ import annotations

from itertools import islice, repeat
from typing import Any, Iterable, Sequence, TypeVar

T = TypeVar("T")


def built(cls: type[T], count: int, **columns: Iterable[Any]) -> list[T]:
    """`count` instances of `cls` (a NamedTuple), each from its row of the columns (one iterable
    per field, of at least `count` values). Every field must be given: defaults are not applied."""
    fields = cls._fields  # type: ignore[attr-defined]
    if set(fields) != columns.keys():
        raise TypeError(f"{cls.__name__}: columns {sorted(columns)} for fields {list(fields)}")
    return list(map(tuple.__new__, repeat(cls), islice(zip(*map(columns.__getitem__, fields)), count)))


def one_value(column: Sequence[Any]) -> bool:
    """Whether every value of `column` equals its first (compared in C: 46k a column). True if empty."""
    return not column or column.count(column[0]) == len(column)

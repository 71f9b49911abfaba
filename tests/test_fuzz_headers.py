"""read_header on hostile bytes: arbitrary files, mutations of a valid file, and well-formed JSON
with hostile values. Each either gives tensors that are really there or raises RemapError (the
error the CLI prints as one line); no other exception, no huge allocation. Where it accepts a
header, the safetensors library itself accepts it too and reads the same tensors.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

from remap.errors import RemapError
from remap.io.headers import DTYPES, read_header

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_DIRECTORY = tempfile.TemporaryDirectory(prefix="remap-fuzz-")
PATH = Path(_DIRECTORY.name) / "fuzz.safetensors"


def _valid_file() -> bytes:
    path = Path(_DIRECTORY.name) / "valid.safetensors"
    save_file({"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.zeros((0, 2), np.int64),
               "c.bias": np.ones(5, np.float16), "mask": np.array([True, False])}, path, metadata={"format": "pt"})
    return path.read_bytes()


VALID = _valid_file()


def read(data: bytes):
    """read_header of `data` as a file: its tensors, or None after a RemapError."""
    PATH.write_bytes(data)
    try:
        tensors, metadata = read_header(PATH)
    except RemapError as error:
        assert error.file == str(PATH)
        return None
    _check(tensors, metadata, len(data))
    return tensors


def _check(tensors, metadata, size: int) -> None:
    """What an accepted header promises: every tensor a byte span of the file, of its shape's
    size, the spans tiling the data section to the end; the same as safetensors reads."""
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    position = size - sum(t.nbytes for t in tensors.values())
    for info in sorted(tensors.values(), key=lambda t: t.start):
        assert info.dtype in DTYPES and all(isinstance(d, int) and d >= 0 for d in info.shape)
        assert info.start == position and info.end - info.start == info.nbytes
        position = info.end
    assert position == size
    with safe_open(PATH, "numpy") as f:
        assert set(f.keys()) == set(tensors)
        for name, info in tensors.items():
            view = f.get_slice(name)
            assert (view.get_dtype(), tuple(view.get_shape())) == (info.dtype, info.shape)


def with_header(header: bytes, data: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header + data


@FUZZ
@given(st.one_of(st.binary(max_size=64), st.binary(min_size=8, max_size=300).map(lambda b: b"\x40" + b"\x00" * 7 + b[8:])))
def test_arbitrary_bytes(data):
    read(data)


_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(VALID) - 1), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, len(VALID) - 1), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(VALID)), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, len(VALID) - 1), st.integers(1, 16)),
    st.tuples(st.just("length"), st.just(0), st.integers(0, 2**64 - 1)),
)


def mutate(data: bytes, mutation) -> bytes:
    kind, at, value = mutation
    at = at % (len(data) + 1)  # an earlier mutation may have made the file shorter
    if kind == "flip" and at < len(data):
        return data[:at] + bytes([data[at] ^ value]) + data[at + 1 :]
    if kind == "truncate":
        return data[:at]
    if kind == "insert":
        return data[:at] + bytes([value]) + data[at:]
    if kind == "delete":
        return data[:at] + data[at + value :]
    if kind == "length":
        return value.to_bytes(8, "little") + data[8:]
    return data


@FUZZ
@given(st.lists(_MUTATION, min_size=1, max_size=4))
def test_mutations_of_a_valid_file(mutations):
    data = VALID
    for mutation in mutations:
        data = mutate(data, mutation)
    read(data)


_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8)),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)),
    max_leaves=10,
)
_HOSTILE = st.one_of(st.integers(-3, 2**66), st.sampled_from(["F12", "bf16", "", [], [-1], [1.5], [True], [0, 2**64]]), _JSON)
_TENSORS = st.lists(
    st.tuples(st.text(alphabet="ab._é", min_size=1, max_size=4), st.sampled_from(list(DTYPES)),
              st.lists(st.integers(0, 3), max_size=3)),
    max_size=4, unique_by=lambda t: t[0],
)


@st.composite
def headers(draw) -> tuple[dict, int]:
    """A header whose entries tile the data section, then (half the time) one thing broken: a
    field of an entry, the data section's size, or the metadata."""
    header, offset = {}, 0
    for name, dtype, shape in draw(_TENSORS):
        size = -(-math.prod(shape) * DTYPES[dtype].bits // 8)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.one_of(st.text(max_size=4), _JSON), max_size=2))
    broken = draw(st.sampled_from(["nothing", "entry", "size", "extra"]))
    if broken == "entry" and header:
        name = draw(st.sampled_from(sorted(header)))
        if isinstance(header[name], dict) and name != "__metadata__":
            header[name][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(_HOSTILE)
        else:
            header[name] = draw(_JSON)
    elif broken == "size":
        offset = max(0, offset + draw(st.integers(-3, 3)))
    elif broken == "extra":
        header[draw(st.text(max_size=4))] = draw(_JSON)
    return header, offset


@FUZZ
@given(headers(), st.integers(0, 7))
def test_json_headers_with_hostile_values(header_and_size, padding):
    """Well-formed JSON, so what is fuzzed is the entries: dtypes, shapes, offsets, sizes. What
    remap refuses, safetensors refuses too (it may not be more lenient with hostile files)."""
    header, data_size = header_and_size
    data = with_header(json.dumps(header).encode() + b" " * padding, bytes(data_size))
    if read(data) is None:
        with pytest.raises(Exception):
            safe_open(PATH, "numpy")

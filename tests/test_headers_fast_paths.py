"""read_header's fast paths give what the careful ones give.

Duplicate keys are refused by counting ':' after a plain parse (loads_unique) instead of a hook
on every object; a header as the crate writes it is checked list by list (_as_written) instead
of entry by entry. Each falls back to the careful path for anything else, so hostile spellings
(escaped keys, ':' and quotes inside names, objects nested deeper, a duplicate before a syntax
error) must still be refused with the same message, and what is accepted must be the same.
"""

from __future__ import annotations

import json
import math
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from remap.errors import RemapError
from remap.io.headers import (DTYPES, DuplicateKey, _as_written, _check_tiling, _spans, loads_unique, read_header,
                               unique_keys)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
U8 = '{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]}'

DUPLICATES = {
    "name twice": ('{"a":%s,"a":%s}' % (U8 % (0, 1), U8 % (1, 2)), "a"),
    "name escaped the second time": ('{"a":%s,"\\u0061":%s}' % (U8 % (0, 1), U8 % (1, 2)), "a"),
    "field escaped": ('{"a":{"dtype":"U8","\\u0064type":"U8","shape":[1],"data_offsets":[0,1]}}', "dtype"),
    "name with a quote": ('{"a\\"":%s,"a\\"":%s}' % (U8 % (0, 1), U8 % (1, 2)), 'a"'),
    "name with a colon beside another twice": ('{"a:b":%s,"c":%s,"c":%s}' % (U8 % (0, 1), U8 % (1, 2), U8 % (2, 3)), "c"),
    "metadata key": ('{"__metadata__":{"k":"1","k":"2"},"a":%s}' % (U8 % (0, 1)), "k"),
    "metadata twice": ('{"__metadata__":{},"__metadata__":{},"a":%s}' % (U8 % (0, 1)), "__metadata__"),
    "nested deeper": ('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":{"y":1,"y":2}}}', "y"),
    "in a list": ('{"a":{"dtype":"U8","shape":[{"y":1,"y":2}],"data_offsets":[0,1]}}', "y"),
    "before a syntax error": ('{"a":{"k":1,"k":2},"b": ', "k"),
}


def write(path, header: str, data_len: int):
    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_len))
    return path


@pytest.mark.parametrize("case", DUPLICATES, ids=list(DUPLICATES))
def test_a_key_given_twice_is_refused_however_spelled(tmp_path, case):
    header, key = DUPLICATES[case]
    with pytest.raises(RemapError) as caught:
        read_header(write(tmp_path / "dup.safetensors", header, 3))
    assert str(caught.value) == f"{tmp_path / 'dup.safetensors'}: header names '{key}' twice (expected unique names)"


def test_names_with_colons_and_quotes_are_read(tmp_path):
    names = ['a:b', 'c"d', "e\\u0066", "model.layers.0:x"]
    header = "{" + ",".join(f"{json.dumps(n)}:{U8 % (i, i + 1)}" for i, n in enumerate(names)) + "}"
    tensors, _ = read_header(write(tmp_path / "names.safetensors", header, len(names)))
    assert list(tensors) == [json.loads(json.dumps(n)) for n in names]
    assert [t.start for t in tensors.values()] == [8 + len(header) + i for i in range(len(names))]


class Pairs(tuple):
    """A JSON object as its (key, value) pairs, so that a key may come twice."""


_KEY = st.sampled_from(["a", "b", "dtype", "\u00e9", "a:b", 'q"', "__metadata__"])
_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(alphabet='ab:"\\{}', max_size=3)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.lists(st.tuples(_KEY, children), max_size=4).map(Pairs)),
    max_leaves=12,
)


def _text(value, escape) -> str:
    """JSON text of `value`, its keys written plainly or \\u-escaped as escape() says."""
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{_key(k, escape())}:{_text(v, escape)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_text(v, escape) for v in value) + "]"
    return json.dumps(value)


def _key(key: str, escaped: bool) -> str:
    return '"' + "".join(f"\\u{ord(c):04x}" for c in key) + '"' if escaped else json.dumps(key)


@FUZZ
@given(_JSON, st.randoms(use_true_random=False), st.sampled_from(["", " ", "]", ":"]))
def test_loads_unique_is_the_hook_parse(value, random, tail):
    """The same value, or the same error, as json.loads with object_pairs_hook=unique_keys."""
    text = _text(value, lambda: random.random() < 0.3) + tail
    try:
        expected = json.loads(text, object_pairs_hook=unique_keys)
    except (DuplicateKey, ValueError) as error:
        with pytest.raises(type(error)) as caught:
            loads_unique(text)
        assert str(caught.value) == str(error)
    else:
        assert loads_unique(text) == expected


_ENTRIES = st.lists(
    st.tuples(st.text(alphabet='ab.:,{}"\\\né', min_size=1, max_size=4), st.sampled_from(list(DTYPES)),
              st.lists(st.integers(0, 3), max_size=3)),
    max_size=5, unique_by=lambda t: t[0],
)
_SPELLING = st.sampled_from([("dtype", "shape", "data_offsets"), ("data_offsets", "dtype", "shape"),
                             ("shape", "dtype", "data_offsets")])
_METADATA = st.one_of(st.none(), st.dictionaries(st.text(alphabet='ab"\\', max_size=2), st.text(alphabet='ab:,"', max_size=2), max_size=2))


def _careful(text: str, data_len: int):
    """What read_header's careful path finds in `text`: (columns, metadata), or None where it refuses."""
    try:
        header = loads_unique(text)
        metadata = header.pop("__metadata__", None) if isinstance(header, dict) else None
        if not isinstance(header, dict) or not (metadata is None or _metadata_ok(metadata)):
            return None
        spans = _spans(header, None)
        _check_tiling(spans, data_len, None)
    except (RemapError, DuplicateKey, ValueError):
        return None
    begins, ends, _, names, dtypes, shapes = (list(c) for c in zip(*spans)) if spans else [[]] * 6
    return (names, dtypes, shapes, begins, ends), metadata or {}


def _metadata_ok(metadata) -> bool:
    return isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())


@FUZZ
@given(_ENTRIES, _SPELLING, _METADATA, st.permutations(range(5)), st.integers(-1, 1), st.booleans(),
       st.tuples(st.integers(0, 10**6), st.sampled_from(["", " ", ",", "0", "{", "}", '"', "\\", ",0", "00"])))
@example([("a", "U8", [1]), ("b", "U8", [1]), ("c", "U8", [1]), ("d", "U8", [1])], ("dtype", "shape", "data_offsets"),
         None, [0, 2, 1, 3, 4], 0, False, (0, ""))  # first and last in place
@example([("a", "U8", [1]), ("b", "U8", [10])], ("dtype", "shape", "data_offsets"), {"k": "v"}, [0, 1, 2, 3, 4], 0, True,
         (10**6, ""))  # as the crate writes it: read fast
def test_the_header_as_written_reads_as_the_careful_path(entries, spelling, metadata, order, misfit, padded, edit):
    """Where _as_written reads a header's text (any of three field orders, shuffled or in file
    order, the data section the right size or not, with a character put in anywhere), it finds
    what json and _spans and _check_tiling find, and what they refuse it refuses. It reads every
    header spelled as the crate or mlx spell one: compact, in file order, no empty tensor, no name
    that needs an escape."""
    header, offset = {}, 0
    for name, dtype, shape in entries:
        size = -(-math.prod(shape) * DTYPES[dtype].bits // 8)
        fields = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        header[name] = {field: fields[field] for field in spelling}
        offset += size
    in_file_order = list(header)
    header = {name: header[name] for _, name in sorted(zip(order, in_file_order))}
    if metadata is not None:
        header = {"__metadata__": metadata, **header}
    written = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
    written += " " * (-len(written) % 8 if padded else 0)
    at, put = edit
    text = written[:at] + put + written[at:]
    data_len = max(0, offset + misfit)
    fast = _as_written(text, data_len)
    careful = _careful(text, data_len)
    assert fast in (None, careful)
    assert fast is None or len(set(map(id, fast[0][1]))) == len(set(fast[0][1]))  # one str object per dtype
    if careful is None:
        return
    # what writers write: compact, in file order, the crate's or mlx's field order, nothing escaped
    (names, dtypes, shapes, begins, ends), found = careful
    spelled = set()
    for fields in (("dtype", "shape", "data_offsets"), ("data_offsets", "dtype", "shape")):
        entries = {n: {"dtype": d, "shape": list(s), "data_offsets": [b, e]} for n, d, s, b, e in zip(*careful[0])}
        entries = {n: {f: entry[f] for f in fields} for n, entry in entries.items()}
        for head in ({"__metadata__": found}, {}) if found == {} else ({"__metadata__": found},):
            spelled.add(json.dumps({**head, **entries}, separators=(",", ":"), ensure_ascii=False))
    whole = names and all(DTYPES[d].bits % 8 == 0 and all(s) for d, s in zip(dtypes, shapes))
    assert (fast is not None) == bool(text.rstrip(" ") in spelled and "\\" not in text and whole)

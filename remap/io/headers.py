"""Reading safetensors headers.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the data
section. Planning needs only the header, so reading one never touches the data; opening the
163 shards of a full DeepSeek-V3 costs 163 small reads.

The checks follow the format as the safetensors crate enforces it (safetensors/src/tensor.rs,
`read_metadata` and `Metadata::validate`): header at most 100 MB; tensors sorted by offsets
tile the data section exactly (no gap, no overlap, nothing left over); each byte span equals
shape x dtype size. We add what serde lets through silently: duplicate names (the last one
would win) and non-integer shapes. Every failure is a RemapError naming the file and tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from itertools import accumulate, chain, compress, repeat
from operator import add, mul
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from remap.dtypes import DTYPES, byte_size
from remap.errors import RemapError
from remap.heap import paused_gc
from remap.records import built

# The same cap the safetensors crate applies; checked before the header is read, so a corrupt
# length field cannot make us allocate gigabytes.
MAX_HEADER_BYTES = 100_000_000


class TensorInfo(NamedTuple):  # 92k of them for DeepSeek-V3, built in C (remap.records)
    """Where one tensor lives. `start`/`end` are absolute byte offsets in `file`
    (8 + header length + data_offsets); None for a tensor that is not a byte span of a
    safetensors file (one from a torch state dict)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int | None = None
    end: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        per_element = _BYTES.get(self.dtype)  # byte_size() for the sub-byte dtypes only: inspect asks 92k times
        return math.prod(self.shape) * per_element if per_element else byte_size(self.dtype, self.shape)


@paused_gc  # 92k small objects for DeepSeek-V3's headers, no cycles: a collection would walk them for nothing
def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors of a safetensors file (in file order) and its `__metadata__` ({} if none).

    Reads only the header. RemapError if the file is not a well-formed safetensors file.
    """
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open forever
            raise RemapError("is not a regular file (a directory, FIFO or device)", file=str(path),
                             expected="a safetensors file")
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            header_len = _header_length(f.read(8), file_size, path)
            raw = f.read(header_len)
    except OSError as e:
        raise RemapError(f"cannot read: {e.strerror}", file=str(path)) from e

    data_start = 8 + header_len
    text = _text(raw, path)
    written = _as_written(text, file_size - data_start)
    if written:
        columns, metadata = written
    else:  # anything else is parsed, and checked entry by entry, each failure worded
        header = _parse_json(text, path)
        metadata = header.pop("__metadata__", None)
        metadata = {} if metadata is None else _metadata(metadata, path)  # null is none, as for the crate
        spans = _spans(header, path)
        _check_tiling(spans, file_size - data_start, path)
        begins, ends, _, names, dtypes, shapes = zip(*spans) if spans else ((),) * 6
        columns = names, dtypes, shapes, begins, ends
    return _tensor_infos(*columns, path, data_start), metadata


def _tensor_infos(names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[tuple[int, ...]],
                  begins: Sequence[int], ends: Sequence[int], file: Path, data_start: int) -> dict[str, TensorInfo]:
    """name -> TensorInfo, built column by column in C (remap.records)."""
    infos = built(TensorInfo, len(names), name=names, dtype=dtypes, shape=shapes, file=repeat(file),
                  start=map(add, begins, repeat(data_start)), end=map(add, ends, repeat(data_start)))
    return dict(zip(names, infos))


def _header_length(prefix: bytes, file_size: int, path: Path) -> int:
    if len(prefix) < 8:
        raise RemapError(
            f"file is {file_size} bytes, too short for a safetensors header",
            file=str(path),
            expected="an 8-byte little-endian header length, then the JSON header",
        )
    header_len = int.from_bytes(prefix, "little")
    if header_len > MAX_HEADER_BYTES:
        raise RemapError(
            f"header length field says {header_len} bytes; not a safetensors file, or corrupt",
            file=str(path),
            expected=f"at most {MAX_HEADER_BYTES} bytes",
        )
    if 8 + header_len > file_size:
        raise RemapError(
            f"header length field says {header_len} bytes but the file has only {file_size - 8} after it "
            "(truncated download?)",
            file=str(path),
            expected="a header that fits in the file",
        )
    return header_len


class DuplicateKey(Exception):
    pass


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook that refuses a key given twice: which one counts would depend on the
    parser (Python's keeps the last, others the first)."""
    result = dict(pairs)  # in C; only a short dict means a key came twice
    if len(result) != len(pairs):
        seen: set[str] = set()
        raise DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return result


def loads_unique(text: str, **options: Any) -> Any:
    """json.loads(text, **options), raising DuplicateKey for a key given twice in any object.

    object_pairs_hook=unique_keys would call Python for every object (92k in DeepSeek-V3's
    headers, a third of the parse). Instead the plain parse is trusted when it counts: each key
    in the text is followed by one ':', so when the text has no more ':' than the objects parsed
    hold keys, none came twice. Otherwise (a ':' inside a name, objects nested deeper, JSON that
    fails) it is parsed again with the hook, which meets the duplicate or the error as ever.
    """
    try:
        value = json.loads(text, **options)
    except (ValueError, RecursionError):
        pass
    else:
        if _keys_held(value) == text.count(":"):
            return value
    return json.loads(text, object_pairs_hook=unique_keys, **options)


def _keys_held(value: Any) -> int:
    """The keys of `value` if an object, with those of the objects among its values (never more
    than the text of `value` holds: deeper objects are not counted)."""
    if type(value) is not dict:
        return 0
    inner = compress(value.values(), map(isinstance, value.values(), repeat(dict)))
    return len(value) + sum(map(len, inner))


_EXPECTED = "a JSON object of tensor entries"


def _text(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RemapError(f"header is not UTF-8 text (byte {e.start})", file=str(path), expected=_EXPECTED) from e


def _parse_json(text: str, path: Path) -> dict[str, Any]:
    expected = _EXPECTED
    try:
        header = loads_unique(text)
    except DuplicateKey as e:
        raise RemapError(f"header names '{e}' twice", file=str(path), expected="unique names") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError, and integers of thousands of digits
        raise RemapError(f"header is not valid JSON: {e}", file=str(path), expected=expected) from None
    if not isinstance(header, dict):
        raise RemapError(f"header is a JSON {type(header).__name__}", file=str(path), expected=expected)
    return header


def _metadata(value: Any, path: Path) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise RemapError("__metadata__ is not a map of strings", file=str(path), expected='{"key": "text", ...}')
    return value


# The crate reads sizes and offsets as usize: what does not fit 64 bits is no size.
_USIZE = 2**64
# bits (bytes) per element of the dtypes whose elements are whole bytes (the fast paths')
_BITS = {name: d.bits for name, d in DTYPES.items() if d.bits % 8 == 0}
_BYTES = {name: bits // 8 for name, bits in _BITS.items()}
_NAMES = {name: name for name in _BYTES}


def _is_count(value: Any) -> bool:
    # bool is an int in Python, but `true` is no size
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _USIZE


def _overflows(shape: tuple[int, ...], bits: int) -> bool:
    """Whether the element count, multiplied dimension by dimension in order, or its bit count
    leaves usize (the crate's checked_mul refuses such a tensor even if a later dimension is 0)."""
    count = 1
    for size in (*shape, bits):
        count *= size
        if count >= _USIZE:
            return True
    return False


def _entry(name: str, entry: Any, path: Path) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, its fields checked."""

    def bad(message: str, expected: str) -> RemapError:
        return RemapError(message, file=str(path), tensor=name, expected=expected)

    if not isinstance(entry, dict):
        raise bad(f"entry is a JSON {type(entry).__name__}", '{"dtype": ..., "shape": [...], "data_offsets": [b, e]}')
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:  # (a JSON list is not even hashable)
        raise bad(f"unknown dtype {dtype!r}", "one of " + ", ".join(DTYPES))
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers", "e.g. [4096, 7168]")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise bad(f"data_offsets {offsets!r} is not a [begin, end] byte range", "two integers, 0 <= begin <= end")
    shape = tuple(shape)
    if _overflows(shape, DTYPES[dtype].bits):
        raise bad(f"shape {list(shape)} of {dtype} has more than 2**64 bits", "a tensor that fits in memory")
    try:
        size = byte_size(dtype, shape)
    except RemapError as e:
        raise e.within(file=str(path), tensor=name)
    begin, end = offsets
    if end - begin != size:
        raise bad(
            f"data_offsets span {end - begin} bytes but shape {list(shape)} of {dtype} needs {size}",
            f"{size} bytes",
        )
    return dtype, shape, begin, end


Span = tuple[int, int, int, str, str, tuple[int, ...]]  # begin, end, position in the header, name, dtype, shape


# The spellings writers give a header's entries: the safetensors crate's (and remap's own) fields
# dtype, shape, data_offsets, and mlx's, sorted; both compact (the crate pads the header with
# spaces). Each entry is read after a comma: the header's opening brace is read as one.
_NAME = r'"([^"\\\x00-\x1f]*)"'  # a JSON string without escapes or control characters is its own text
_ENTRY_FIELDS = {"dtype": r'"dtype":"([A-Z0-9_]+)"', "shape": r'"shape":\[([0-9,]*)\]',
                 "data_offsets": r'"data_offsets":\[([0-9]+),([0-9]+)\]'}


def _spelling(fields: tuple[str, ...]) -> tuple[re.Pattern, list[int]]:
    """The regex of entries whose fields come in this order, and where split() puts the name,
    dtype, shape, begin and end of each entry (after the text before it)."""
    regex = re.compile(",{}:\\{{{}\\}}".format(_NAME, ",".join(map(_ENTRY_FIELDS.__getitem__, fields))))
    groups = ["name", *chain.from_iterable(("begin", "end") if f == "data_offsets" else (f,) for f in fields)]
    return regex, [groups.index(g) + 1 for g in ("name", "dtype", "shape", "begin", "end")]


_SPELLINGS = (_spelling(("dtype", "shape", "data_offsets")), _spelling(("data_offsets", "dtype", "shape")))
_GROUPS = 6  # what split() gives per entry: the text before it, then name, and its fields in spelled order
_METADATA = re.compile(r'\{"__metadata__":(\{(?:"[^"\\\x00-\x1f]*":"[^"\\\x00-\x1f]*"'
                       r'(?:,"[^"\\\x00-\x1f]*":"[^"\\\x00-\x1f]*")*)?\})')


def _as_written(text: str, data_len: int) -> tuple[tuple[list, ...], dict[str, str]] | None:
    """((names, dtypes, shapes, begins, ends), metadata) of a header spelled as writers spell one
    (_SPELLINGS), its tensors in file order, of whole-byte dtypes, none empty: read with one regex
    pass in C, and checked column by column as _entry and _check_tiling would find them. None for
    any other header, which json and they decide.

    Why not json.loads: it builds a dict and two lists per tensor (92k for DeepSeek-V3), most of
    reading the headers, only to be taken apart into these columns. Split on its entries, the
    text must leave nothing between them, so no text goes unread."""
    end = len(text.rstrip(" ")) - 1  # the closing brace
    head = _METADATA.match(text) if text.startswith('{"__metadata__":') else None
    if head:
        body = text[head.end():end]
    elif text.startswith("{"):
        body = "," + text[1:end]
    else:
        return None
    if end < 1 or text[end] != "}":
        return None
    for spelling, positions in _SPELLINGS:
        pieces = spelling.split(body)
        if len(pieces) > 1 and not any(pieces[0::_GROUPS]):
            break
    else:
        return None
    names, dtypes, shapes, begins, ends = (pieces[k::_GROUPS] for k in positions)
    if len(set(names)) < len(names) or "__metadata__" in names:
        return None  # (json's path words the error)
    element_bytes = list(map(_BYTES.get, dtypes))
    if None in element_bytes:
        return None
    dtypes = list(map(_NAMES.__getitem__, dtypes))  # one str object per dtype, not one per tensor
    # A number after a comma starts with 0 only as 0 (an empty tensor, or its offset, for the
    # careful path) or written with a leading zero (no JSON); the first begin must be 0.
    if begins[0] != "0" or ",0" in ",".join(("", *begins[1:], *ends, *set(shapes))):
        return None
    try:
        dims = {shape: tuple(map(int, shape.split(","))) if shape else () for shape in set(shapes)}
        begins, ends = list(map(int, begins)), list(map(int, ends))
    except ValueError:  # a dimension left out (`[1,,2]`), or thousands of digits
        return None
    # In order each tensor starts where the one before ends, and ends where its size says: they
    # tile [0, data_len], each of its shape's size (dimensions >= 1: every size is at most
    # data_len, below 2**64 bits, as _overflows requires).
    if begins[0] != 0 or begins[1:] != ends[:-1] or ends[-1] != data_len or data_len >= _USIZE // 8:
        return None
    shapes = list(map(dims.__getitem__, shapes))
    if list(accumulate(map(mul, map(math.prod, shapes), element_bytes))) != ends:
        return None
    metadata = json.loads(head.group(1)) if head else {}
    if head and len(metadata) != head.group(1).count('":"'):
        return None  # a metadata key given twice
    return (names, dtypes, shapes, begins, ends), metadata


def _spans(header: dict[str, Any], path: Path) -> list[Span]:
    """Every entry's fields, checked, sorted into file order (ties, empty tensors at one offset,
    in header order)."""
    spans = []
    for k, (name, entry) in enumerate(header.items()):
        fields = _fast_entry(entry) or _entry(name, entry, path)
        spans.append((fields[2], fields[3], k, name, fields[0], fields[1]))
    spans.sort()
    return spans


def _fast_entry(entry: Any) -> tuple[str, tuple[int, ...], int, int] | None:
    """_entry's result for a plainly well-formed entry (whole-byte dtype, positive sizes, span of
    the right length), checked with as few steps as that takes; None sends it to _entry, which
    decides and words the error."""
    try:
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        bits = _BITS[dtype]
    except (TypeError, KeyError):
        return None
    if type(shape) is not list or type(offsets) is not list or len(offsets) != 2:
        return None
    count = 1
    for size in shape:
        if type(size) is not int or size < 1:  # (a bool is no int here; 0 takes the careful path)
            return None
        count *= size
    begin, end = offsets
    if type(begin) is not int or type(end) is not int or not 0 <= begin <= end < _USIZE or count * bits >= _USIZE:
        return None
    if end - begin != count * bits // 8:
        return None
    return dtype, tuple(shape), begin, end


def _check_tiling(spans: list[Span], data_len: int, path: Path) -> None:
    """Sorted by offsets, the tensors must cover the data section exactly, as safetensors requires."""
    position, previous = 0, None
    for begin, end, _, name, _, _ in spans:
        if end > data_len:
            raise RemapError(
                f"data ends at byte {end} of the data section, which has only {data_len} bytes (truncated file?)",
                file=str(path),
                tensor=name,
                expected=f"data_offsets within [0, {data_len}]",
            )
        if begin != position:
            what = f"overlaps tensor '{previous}'" if begin < position else f"leaves a gap of {begin - position} bytes"
            raise RemapError(
                f"data_offsets [{begin}, {end}] {what}",
                file=str(path),
                tensor=name,
                expected=f"to start at byte {position}: tensors tile the data section without gaps or overlaps",
            )
        position, previous = end, name
    if position != data_len:
        raise RemapError(
            f"the last {data_len - position} bytes of the data section belong to no tensor",
            file=str(path),
            expected=f"a data section of {position} bytes",
        )

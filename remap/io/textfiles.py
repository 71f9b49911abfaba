"""Reading the small files beside the weights (config.json, the index, remap's manifest and report,
a spec) so that no file can hang a read or grow it without bound.

Each is checked to be a regular file before it is opened (a FIFO would block the open forever; a
link to /dev/zero would never end) and read with a cap suited to its kind; JSON whose nesting or
integers are beyond any real file's is a one-line error, not a traceback.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Callable

from remap.errors import RemapError

MiB = 1 << 20
# Caps well past the largest real file of each kind: Kimi-K2's index (139,583 tensors) is ~12 MB, a
# report of the full DeepSeek-V3 ~60 MB.
LIMITS = {"config": 16 * MiB, "index": 256 * MiB, "manifest": 256 * MiB, "report": 1024 * MiB, "spec": 4 * MiB,
          "card": 4 * MiB}


def read_bounded(path: str | os.PathLike, kind: str) -> bytes:
    """The bytes of a regular file of `kind` (a key of LIMITS), refused when it is anything else
    or larger than the cap."""
    path, limit = Path(path), LIMITS[kind]
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise RemapError("is not a regular file (a directory, FIFO or device)", file=str(path),
                             expected=f"the {kind} file")
        if info.st_size > limit:
            raise RemapError(f"is {info.st_size} bytes, more than any {kind} file", file=str(path),
                             expected=f"at most {limit} bytes")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise RemapError(f"cannot read: {exc.strerror}", file=str(path)) from exc
    if len(data) > limit:  # grew while being read
        raise RemapError(f"is more than {limit} bytes", file=str(path), expected=f"the {kind} file")
    return data


def read_json(path: str | os.PathLike, kind: str, *, loads: Callable[..., Any] = json.loads) -> Any:
    """A JSON file of `kind`, parsed by `loads` (json.loads, or one that refuses duplicate keys)."""
    data = read_bounded(path, kind)
    # NaN / Infinity are Python's extension, not JSON: a config holding one would build a model
    # that computes NaN, and be copied on into the output's config.json. remap's own files (a
    # report may measure a NaN) keep them.
    constant = _not_a_number if kind in ("config", "index") else None
    try:
        return loads(data.decode("utf-8"), parse_constant=constant)
    except UnicodeDecodeError as exc:
        raise RemapError(f"not UTF-8 text: {exc.reason}", file=str(path), expected="a JSON object") from None
    except RecursionError:
        raise RemapError("nested deeper than any real file", file=str(path), expected="a JSON object") from None
    except ValueError as exc:  # JSONDecodeError, and integers of thousands of digits
        raise RemapError(f"not valid JSON: {exc}", file=str(path), expected="a JSON object") from None


def _not_a_number(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON has")

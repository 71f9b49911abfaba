"""Check that a benchmark input holds only finite values (NaN or Inf would make a conversion's
speed meaningless and a quantizer refuse it): every floating tensor of every safetensors file in
a directory, read through a memory map in 64 MB pieces.

    python bench/check_finite.py DIR    # exit 1 naming the first non-finite tensor
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from remap.io.headers import read_header

# dtype -> (unsigned view, mask, value under it that means NaN or Inf): an all-ones exponent in
# bf16 / f16 / e5m2; e4m3fn has no Inf and one NaN code per sign, S.1111.111
BITS = {"BF16": (np.uint16, 0x7F80, 0x7F80), "F16": (np.uint16, 0x7C00, 0x7C00),
        "F8_E5M2": (np.uint8, 0x7C, 0x7C), "F8_E4M3": (np.uint8, 0x7F, 0x7F),
        "F32": (np.uint32, 0x7F800000, 0x7F800000), "F64": (np.uint64, 0x7FF0000000000000, 0x7FF0000000000000)}
PIECE = 64 << 20


def nonfinite(directory: Path) -> str | None:
    """The first tensor ('file: name') holding NaN or Inf, or None."""
    for path in sorted(directory.glob("*.safetensors")):
        tensors, _ = read_header(path)
        data = np.memmap(path, np.uint8, "r")
        for info in tensors.values():
            if info.dtype not in BITS:  # integers and packed codes: always finite
                continue
            view, mask, bad = BITS[info.dtype]
            for lo in range(info.start, info.end, PIECE):
                piece = np.asarray(data[lo:min(lo + PIECE, info.end)]).view(view)
                if ((piece & view(mask)) == view(bad)).any():
                    return f"{path.name}: {info.name}"
    return None


def main(directories: list[str]) -> None:
    for directory in directories:
        bad = nonfinite(Path(directory))
        if bad:
            raise SystemExit(f"{directory}: non-finite values in {bad}")
        print(f"{directory}: every value finite")


if __name__ == "__main__":
    main(sys.argv[1:])

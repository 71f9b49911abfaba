"""The kernel's floor for a conversion that only moves bytes: the same copies, nothing else.

    python bench/copy_floor.py record SRC OUT RECORD -- [remap convert options]
    python bench/copy_floor.py replay RECORD OUT [--aligned]

`record` runs `remap convert SRC OUT` once, in this process, and writes to RECORD (JSON) every
copy_file_range it made (source file, offsets, length) and each output file's size; it prints
when remap's modules were imported, its first copy began, its last ended and the command
returned. `replay` makes those files again with the same calls in the same order, each file sized and reserved
first as remap's writer does: the bytes land where remap puts them, with no planning, hashing or
Python between the copies. Timed beside `cp -r`, it says what the output's byte layout costs the
kernel: a safetensors file puts each tensor after its header and neighbours, so a tensor seldom
lies at the same offset within its page in the source and in the output, and the kernel then
copies it page by page across two pages of the output. `--aligned` copies the same pieces to the
offsets they have in the source instead (each output file as long as its pieces reach): the same
bytes by the same calls, each page onto one page, for what that layout costs.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path


def record(src: str, out: str, path: str, options: list[str]) -> None:
    copies: list[list] = []
    real = os.copy_file_range
    start, starts, last_end, lock = time.perf_counter(), [], 0.0, threading.Lock()  # (workers copy in threads)

    def recorded(src_fd, dst_fd, count, offset_src=None, offset_dst=None):
        nonlocal last_end
        copies.append([os.readlink(f"/proc/self/fd/{src_fd}"), offset_src, os.readlink(f"/proc/self/fd/{dst_fd}"), offset_dst, count])
        starts.append(time.perf_counter() - start)
        done = real(src_fd, dst_fd, count, offset_src, offset_dst)
        with lock:
            last_end = max(last_end, time.perf_counter() - start)
        return done

    os.copy_file_range = recorded
    from remap.cli import app

    imported = time.perf_counter() - start
    try:
        app(["convert", src, out, *options], standalone_mode=False)
    except SystemExit as exit:  # (0: done)
        if exit.code:
            raise
    returned = time.perf_counter() - start
    began = min(starts, default=float("nan"))
    finals = {}
    for copy in copies:  # written as NAME.incomplete in DST.partial, renamed when done
        final = Path(copy[2].removesuffix(".incomplete").replace(".partial/", "/", 1))
        copy[2] = str(final.relative_to(Path(out).resolve()))
        finals[copy[2]] = (final).stat().st_size
    Path(path).write_text(json.dumps({"sizes": finals, "copies": copies}))
    moved = sum(c[4] for c in copies)
    print(f"{len(copies)} copies, {moved / 2**20:.0f} MiB, of files of {sum(finals.values()) / 2**20:.0f} MiB; "
          f"{sum(c[4] for c in copies if (c[1] - c[3]) % 4096) / 2**20:.0f} MiB at another offset within their page")
    print(f"from this script's start: remap imported at {imported:.3f} s, its first copy began at {began:.3f} s and its "
          f"last ended at {last_end:.3f} s, the command returned at {returned:.3f} s")


def replay(path: str, out: str, aligned: bool = False) -> None:
    recorded = json.loads(Path(path).read_text())
    if aligned:
        recorded["copies"] = [[source, at, name, at, count] for source, at, name, _, count in recorded["copies"]]
        recorded["sizes"] = {name: max(at + count for _, at, file, _, count in recorded["copies"] if file == name)
                             for name in recorded["sizes"]}
    root = Path(out)
    root.mkdir(parents=True)
    outputs = {}
    for name, size in recorded["sizes"].items():
        fd = outputs[name] = os.open(root / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)  # (ext4 has fallocate: no emulation here)
    sources: dict[str, int] = {}
    for source, source_offset, name, offset, count in recorded["copies"]:
        fd = sources.get(source) or sources.setdefault(source, os.open(source, os.O_RDONLY))
        while count:
            done = os.copy_file_range(fd, outputs[name], count, source_offset, offset)
            source_offset, offset, count = source_offset + done, offset + done, count - done


if __name__ == "__main__":
    if sys.argv[1] == "record":
        record(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[6:] if sys.argv[5:6] == ["--"] else [])
    else:
        replay(sys.argv[2], sys.argv[3], aligned="--aligned" in sys.argv[4:])

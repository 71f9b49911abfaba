"""A converted checkpoint's model card, the files behind it: SRC's own card, whose metadata the
new card carries; and `remap parity SRC DST`, which writes its result into DST's README.md (the
section remap/render/card.py marks for it) and the card's new digest into the manifest, so
`remap verify DST` still passes. A card someone edited since remap wrote it, or a directory remap
did not write, is left alone, saying why.
"""

from __future__ import annotations

import json
from pathlib import Path

from remap.errors import RemapError
from remap.destination import CARD, MANIFEST
from remap.io.atomic import replace_text
from remap.io.hashing import SHA256, file_digest
from remap.io.textfiles import read_bounded, read_json
from remap.render.card import read_front_matter, with_parity


def source_card(root: Path) -> tuple[dict, str | None]:
    """The front matter of SRC's card (README.md beside its weights): (metadata, None), or ({}, why
    it is not carried). A card that cannot be read never stops a conversion: it is metadata."""
    path = root / CARD
    if not path.exists():
        return {}, None
    try:
        return read_front_matter(read_bounded(path, "card").decode("utf-8")), None
    except (RemapError, UnicodeDecodeError, ValueError) as exc:
        return {}, f"{path}: {exc}"


def record_parity(dst: str | Path, section: str) -> str | None:
    """Put `section` (the parity result as Markdown) into DST's model card; says what it did, or
    why it did not (None for a directory remap did not write: it has no card of remap's)."""
    dst = Path(dst)
    if not (dst / MANIFEST).is_file():
        return None
    try:
        manifest = read_json(dst / MANIFEST, "manifest")
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or CARD not in files:
            return f"{dst / CARD}: not updated: the manifest names no model card (an older remap wrote {dst})"
        algorithm = manifest.get("digest", SHA256) if manifest.get("checksums", True) is not False else None
        path = dst / CARD
        if algorithm and file_digest(path, algorithm) != files[CARD]:
            return f"{path}: not updated: it changed since remap wrote it (the manifest's digest differs)"
        card = with_parity(path.read_text(encoding="utf-8"), section)
        if card is None:
            return f"{path}: not updated: it has no parity section"
        replace_text(path, card)
        # a kill between these two replaces leaves a card `remap verify` reports as changed, never a silent one
        files[CARD] = file_digest(path, algorithm) if algorithm else None
        replace_text(dst / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    except (OSError, UnicodeDecodeError, RemapError) as exc:
        return f"{dst / CARD}: not updated: {exc}"
    return f"{dst / CARD}: the parity result is recorded in its model card"

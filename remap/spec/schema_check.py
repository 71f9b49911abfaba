"""A spec document checked against schemas/spec.schema.json, unless it is one known to pass.

jsonschema costs ~60 ms to import and a few ms per spec, on every command that reads a spec, while
the bundled specs, the stages they compose and their inverses are the same documents every run.
remap/spec/validated.py records their digests, each written only once it has passed here
(`python -m remap.spec.schema_check --write`; tests/test_startup.py fails while the record is not
what that writes). A document whose digest is recorded, under the schema digest recorded with it,
skips jsonschema. Any other (a user's spec, a bundled one edited since, every one once the schema
changes) is checked as before, with the same errors.

A digest is sha256 of repr(document): the reprs of plain data (dicts in their order, lists, str,
int, float, bool, None, YAML's dates) are equal only for equal data of equal types ('1', 1, 1.0 and
True all differ), so a document skips the check only where it is exactly one that passed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from remap.errors import RemapError
from remap.spec import yaml_lines

# The repository's schemas/, reached through the package's symlink (as remap.spec.load does).
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "spec.schema.json"
RECORD_PATH = Path(__file__).with_name("validated.py")
REGENERATE = "python -m remap.spec.schema_check --write"


@functools.cache
def _schema() -> tuple[str, dict]:
    """(sha256 of the schema file, the schema)."""
    text = SCHEMA_PATH.read_bytes()
    return hashlib.sha256(text).hexdigest(), json.loads(text)


def spec_schema() -> dict:
    return _schema()[1]


def digest(document: Any) -> str:
    return hashlib.sha256(repr(document).encode()).hexdigest()


@functools.cache
def _recorded() -> frozenset[str]:
    """The recorded digests, where they were recorded under this schema (else none)."""
    from remap.spec import validated

    return validated.DOCUMENTS if validated.SCHEMA == _schema()[0] else frozenset()


_passed: set[str] = set()  # digests of the documents that passed in this process
_trust_record = True


def check_document(document: Any, path: str) -> None:
    """A RemapError naming the file:line and what the schema expects, where `document` breaks it."""
    key = digest(document)
    if key in _passed or (_trust_record and key in _recorded()):
        return
    import jsonschema

    validator = jsonschema.Draft202012Validator(spec_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is not None:
        line = yaml_lines.line_of(document, list(error.absolute_path))
        at = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise RemapError(f"{at}: {error.message}", file=f"{path}:{line}", expected="a spec matching schemas/spec.schema.json")
    _passed.add(key)


@contextlib.contextmanager
def _checking_all() -> Iterator[set[str]]:
    """Within: every document is checked (none taken as known); yields the digests of those that pass."""
    global _passed, _trust_record
    saved = _passed, _trust_record
    _passed, _trust_record = set(), False
    try:
        yield _passed
    finally:
        _passed, _trust_record = saved


def bundled_digests() -> list[str]:
    """The digests of every document that loading each bundled spec, forwards and inverted, checks
    (all checked here: a spec breaking the schema raises instead of being recorded)."""
    from remap.spec.invert import invert_spec
    from remap.spec.load import bundled_specs, parse_spec

    with _checking_all() as passed:
        for path in bundled_specs():
            spec = parse_spec(path.read_text(), str(path))  # not load_spec: its cache skips the check
            try:
                invert_spec(spec)
            except RemapError:
                pass  # a lossy drop or a quantizer: no inverse to record
        return sorted(passed)


def record_text() -> str:
    """remap/spec/validated.py as `--write` writes it."""
    lines = "".join(f'    "{key}",\n' for key in bundled_digests())
    return (f'"""Digests of the spec documents known to pass schemas/spec.schema.json (remap/spec/schema_check.py):\n'
            f'the bundled specs, their stages and their inverses. Written by `{REGENERATE}`."""\n\n'
            f'SCHEMA = "{_schema()[0]}"\n'
            f"DOCUMENTS = frozenset({{\n{lines}}})\n")


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        text = record_text()
        changed = not RECORD_PATH.is_file() or RECORD_PATH.read_text() != text
        if changed:
            RECORD_PATH.write_text(text)
        print(f"{RECORD_PATH}: {'updated' if changed else 'already up to date'}")
        return 0
    if argv:
        print("usage: python -m remap.spec.schema_check [--write]", file=sys.stderr)
        return 2
    print(record_text(), end="")
    return 0


if __name__ == "__main__":  # through the imported module: its state is the one spec loading reads
    from remap.spec import schema_check

    sys.exit(schema_check.main(sys.argv[1:]))

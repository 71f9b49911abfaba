"""Presentation: reports and parity results printed as rich text, JSON, Markdown, JUnit XML.

The only place besides remap/cli.py that imports rich, so that the data modules (remap.report,
remap.parity, remap.api) import without it (tests/test_imports.py holds that line).
"""

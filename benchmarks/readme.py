"""Writing a generated table into the README between two marker lines."""

from __future__ import annotations

from pathlib import Path


def replace_between(path: Path, begin: str, end: str, text: str) -> None:
  """Replaces what lies between the marker lines ``begin`` and ``end`` of ``path`` with
  ``text``; the markers must be there (so that a typo cannot append a stray table)."""
  path = Path(path)
  doc = path.read_text()
  start, stop = doc.find(begin), doc.find(end)
  if start < 0 or stop < start:
    raise ValueError(f"{path} lacks the marker lines {begin} ... {end}")
  path.write_text(doc[:start + len(begin)] + "\n" + text.rstrip("\n") + "\n" + doc[stop:])

"""Reading the Makefile in tests: a target's recipe and a variable's value, as text."""

from pathlib import Path

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"


def _lines() -> list[str]:
  return MAKEFILE.read_text().replace("\\\n", " ").splitlines()   # continuations joined


def recipe(target: str) -> list[str]:
  """The recipe lines of ``target``, spaces collapsed."""
  lines = _lines()
  start = next(i for i, l in enumerate(lines) if l.startswith(f"{target}:"))
  out = []
  for line in lines[start + 1:]:
    if not line.startswith("\t"):
      break
    out.append(" ".join(line.split()))
  return out


def prerequisites(target: str) -> list[str]:
  """What ``target`` depends on."""
  line = next(l for l in _lines() if l.startswith(f"{target}:"))
  return line.split(":", 1)[1].split()


def variable(name: str) -> str:
  """The value of ``name`` (``NAME ?= value`` or ``NAME := value``), spaces collapsed."""
  for line in _lines():
    for op in ("?=", ":=", "="):
      head, sep, value = line.partition(op)
      if sep and head.strip() == name:
        return " ".join(value.split())
  raise KeyError(name)

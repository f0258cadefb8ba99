"""The project explains itself: its docs and docstrings cite only files inside the repository,
and every step of docs/method.md that they cite exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"


def _project_texts():
  """README, docs and every Python source outside tests and virtual environments."""
  yield ROOT / "README.md"
  yield from sorted((ROOT / "docs").glob("*.md"))
  for folder in ("gaze_jax", "configs", "pallas_kernels", "benchmarks"):
    yield from sorted((ROOT / folder).rglob("*.py"))
  yield from sorted(ROOT.glob("*.py"))


def test_no_reference_outside_the_repository():
  offenders = []
  for path in _project_texts():
    for n, line in enumerate(path.read_text().splitlines(), 1):
      if "../shared" in line or "METHOD.md" in line:
        offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
  assert not offenders, "\n".join(offenders)


def test_cited_method_steps_exist():
  steps = {int(m) for m in re.findall(r"^(\d+)\. \*\*", METHOD.read_text(), re.M)}
  assert steps == set(range(1, 13))
  cited = set()
  for path in _project_texts():
    for ref in re.findall(r"docs/method\.md,? steps? ([\d\- ,to]+)", path.read_text()):
      cited |= {int(n) for n in re.findall(r"\d+", ref)}
  assert cited and cited <= steps, sorted(cited - steps)

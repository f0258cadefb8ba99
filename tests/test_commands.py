"""The README's commands: `make test-quick` runs the method's and the model's unit tests (files
that exist, no slow ones) and the README says how long it and `make test` take."""

import re
from pathlib import Path

from tests import makefile

ROOT = Path(__file__).resolve().parents[1]


def _commands_section() -> str:
  readme = (ROOT / "README.md").read_text()
  return readme.split("## Commands", 1)[1].split("\n## ", 1)[0]


def test_test_quick_runs_unit_tests_of_the_method_and_model():
  assert makefile.recipe("test-quick") == [
      '$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) $(QUICK_TESTS)']
  assert "install" in makefile.prerequisites("test-quick")
  quick = makefile.variable("QUICK_TESTS").split()
  assert quick and all((ROOT / p).is_file() for p in quick), quick
  assert {Path(p).parts[1] for p in quick} == {"gaze", "model"}


def test_the_readme_gives_the_test_times_with_date_and_machine():
  text = " ".join(_commands_section().split())
  assert "make test-quick" in text and "17 to 36 min" in text
  # The quick subset's minutes, with the day and the machine they were measured on.
  assert re.search(r"`make test-quick` runs .*: [\d.]+ minutes on \d{4}-\d\d-\d\d on a "
                   r"2-core x86_64 CPU machine", text)

"""The notebooks run top to bottom: each is executed with nbclient, as a user would run it, and
fails the test on any cell error. The executed copies are kept under out/notebooks/ (CI
artifacts); the committed notebooks carry no outputs."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the [notebooks] extra is not installed")
nbclient = pytest.importorskip("nbclient", reason="the [notebooks] extra is not installed")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXECUTED = ROOT / "out" / "notebooks"


def test_notebooks_are_committed_without_outputs():
  assert NOTEBOOKS, "no notebooks under notebooks/"
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), path.name
    first = nb.cells[0].source
    assert "colab-badge.svg" in first and f"notebooks/{path.name}" in first, path.name
    assert "google.colab" in code[0].source, f"{path.name}: the first code cell installs"


# 03 reads the real SmolLM2 weights (2 minutes): `make test-all` runs it; the fast run keeps
# those weights' own tests (tests/convert/test_gguf_smollm2.py).
@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow)
                                  if p.stem == "03_real_weights" else p for p in NOTEBOOKS],
                         ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
  # The kernel inherits the environment: GAZE_JAX_CI asks the notebooks for their tiny
  # settings (a short training run instead of the full demo).
  monkeypatch.setenv("GAZE_JAX_CI", "1")
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  try:
    client.execute()                 # raises CellExecutionError on the first failing cell
  finally:
    EXECUTED.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, EXECUTED / path.name)
  assert any(o.get("output_type") == "display_data" or o.get("output_type") == "stream"
             for c in nb.cells if c.cell_type == "code" for o in c.outputs)

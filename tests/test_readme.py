"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert len(blocks) >= 4
  ns = {}
  for block in blocks:
    exec(compile(block, str(README), "exec"), ns)
  assert ns["regions"].shape == (2, 1024, 8, 4)
  assert ns["step"].shape == (2, 1, 8, 64)            # the decode example
  assert (ns["b"].gaze_entries, ns["b"].dense_entries) == (752, 4608)
  # Real SmolLM2 weights, greedy: the README's claimed continuation.
  assert ns["tok"].decode(ns["out"].tokens[0].tolist()).startswith(" Paris.")

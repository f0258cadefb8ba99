"""``benchmarks/attention.py --readme``: the table lands between the README markers, and only
there."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
  spec = importlib.util.spec_from_file_location("bench_attention",
                                                ROOT / "benchmarks" / "attention.py")
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod                      # its dataclasses look themselves up there
  spec.loader.exec_module(mod)
  return mod


def test_readme_table_is_replaced_between_the_markers(tmp_path):
  bench = _bench()
  report = json.loads((ROOT / "benchmarks/results/attention_cpu_small.json").read_text())
  table = bench.markdown(report)
  readme = tmp_path / "README.md"
  readme.write_text(f"# T\n\nbefore\n{bench.README_BEGIN}\nold table\n{bench.README_END}\nafter\n")
  bench.main(["--table", str(ROOT / "benchmarks/results/attention_cpu_small.json"),
              "--readme", str(readme)])
  text = readme.read_text()
  assert text == (f"# T\n\nbefore\n{bench.README_BEGIN}\n{table.rstrip()}\n{bench.README_END}"
                  "\nafter\n")
  bench.update_readme(readme, table)                 # idempotent
  assert readme.read_text() == text
  # The decode rows carry the report's numbers.
  dec = report["results"][0]
  assert f"| {dec['batch']} | {dec['visual_tokens']} |" in text
  readme.write_text("no markers\n")
  with pytest.raises(ValueError, match="marker"):
    bench.update_readme(readme, table)

"""``benchmarks/generate.py``: a run's ``--offload`` rows go to their own README table, so that an
offload run rewrites only that table (and the gaze / dense table never lists them)."""

import numpy as np

from benchmarks import generate
from gaze_jax.model.config import DecoderConfig

TINY = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                     num_heads=4, num_kv_heads=2, head_dim=8)


def test_offload_rows_get_their_own_readme_table(tmp_path):
  case = generate.decode_case(TINY, 1, 1, [0.5], "xla", 2, 1, np.random.default_rng(0),
                              bounds=False, offload=True)
  assert sorted(case["rows"]) == ["K=50%", "K=50% offloaded", "dense", "no images"]
  off = case["rows"]["K=50% offloaded"]
  assert off["offload_of"] == "K=50%" and 0 <= off["hit_rate"] < 1
  assert off["host_bytes_per_token"] > 0
  result = {"date": "d", "backend": "cpu", "device": "x", "implementation": "xla",
            "decode": {"tiny": [case]}, "ttft": {}}
  decode = generate.readme_table(result)
  table = generate.offload_table(result)
  assert "offloaded" not in decode
  assert [line.split(" | ")[4] for line in decode.splitlines() if line.startswith("| tiny")] \
      == ["K=50%"]
  rows = [line for line in table.splitlines() if line.startswith("| tiny")]
  assert len(rows) == 1 and rows[0].startswith("| tiny | 576 | 1 | K=50% |")
  assert f"{off['hit_rate']:.1%}" in rows[0]

  readme = tmp_path / "README.md"
  blocks = [generate.README_BEGIN, "old decode", generate.README_END,
            generate.OFFLOAD_MARKERS[0], "old offload", generate.OFFLOAD_MARKERS[1]]
  readme.write_text("\n".join(blocks) + "\n")
  generate.write_readme(readme, result, ["offload"])
  text = readme.read_text()
  assert "old decode" in text and "old offload" not in text and table in text
  generate.write_readme(readme, result, ["decode", "offload"])
  assert "old decode" not in readme.read_text() and decode in readme.read_text()
  no_offload = {**result, "decode": {"tiny": [{**case, "rows": {
      k: r for k, r in case["rows"].items() if "offload_of" not in r}}]}}
  assert generate.offload_table(no_offload) is None

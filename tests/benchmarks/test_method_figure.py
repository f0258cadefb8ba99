"""docs/method.md's picture is drawn from the code: the example's routing, checked here by
hand against its own scores and layout, and the PNG is written."""

import numpy as np
import pytest

from benchmarks import method_figure
from gaze_jax.gaze import CTX, PATCH, TEXT


def test_the_pictured_routing_is_the_codes():
  ex = method_figure.routed_example()
  lay = ex["layout"]
  kind, region = np.asarray(lay.kind[0]), np.asarray(lay.region[0])
  position = np.asarray(lay.position[0])
  q = ex["query"]
  assert kind[q] == TEXT and q == np.flatnonzero(kind == TEXT)[-1]
  # Region-major storage: each region's patch slots are contiguous.
  for r in range(lay.max_regions):
    slots = np.flatnonzero(region == r)
    assert slots.size and np.all(np.diff(slots) == 1), r
  # The top-K of the query's scores over its candidates (every region lies before it).
  assert ex["candidates"].all()
  assert ex["selected"] == sorted(np.argsort(-ex["scores"])[:method_figure.TOP_K].tolist())
  # It reads the earlier text, every context token and the patches of its regions, no more.
  want = (((kind == TEXT) & (position <= position[q])) | (kind == CTX)
          | ((kind == PATCH) & np.isin(region, ex["selected"])))
  np.testing.assert_array_equal(ex["reads"], want)


def test_the_picture_is_written(tmp_path):
  pytest.importorskip("matplotlib")
  out = tmp_path / "method_layout.png"
  assert method_figure.main([f"--out={out}"]) == 0
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

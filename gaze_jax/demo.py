"""Runnable tour of the core: ``python -m gaze_jax.demo`` (what ``make demo`` runs until the
training demo lands).

Builds a batch with an image and a short video, runs gaze attention with both implementations,
checks that they agree, and prints the KV budget.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from gaze_jax.gaze import (Image, LayoutSpec, Text, Video, build_layout, gaze_attention,
                           selected_union_size, visual_kv_budget)


def main():
  spec = LayoutSpec(seq_len=1024, max_regions=48, max_images=4, region_shape=(6, 6), num_ctx=4)
  examples = [
      [Text(12), Image(24, 24), Text(20), Text(8, generated=True)],        # one 24x24 image
      [Text(5), Video(3, 12, 12), Text(30), Text(8, generated=True)],      # three 12x12 frames
  ]
  layout = build_layout(examples, spec)
  B, S, Hq, Hkv, D = 2, spec.seq_len, 8, 2, 64
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (B, S, Hq, D))
  k = jax.random.normal(keys[1], (B, S, Hkv, D))
  v = jax.random.normal(keys[2], (B, S, Hkv, D))
  print(f"layout: B={B} S={S} regions/example={np.asarray(layout.region_valid).sum(1).tolist()} "
        f"region_size={spec.region_size} ctx/frame={spec.num_ctx}")
  outs = {}
  for impl in ("reference", "xla"):
    f = jax.jit(lambda q, k, v, lay, impl=impl: gaze_attention(
        q, k, v, q, k, lay, top_k=4, implementation=impl, return_selected=True))
    jax.block_until_ready(f(q, k, v, layout))
    t0 = time.perf_counter()
    outs[impl] = jax.block_until_ready(f(q, k, v, layout))
    print(f"{impl:>9}: out {tuple(outs[impl][0].shape)} in {1e3 * (time.perf_counter() - t0):.1f} ms")
  err = float(jnp.abs(outs["xla"][0] - outs["reference"][0]).max())
  print(f"max |xla - reference| = {err:.2e}")
  ids = outs["xla"][1]
  last = int(np.flatnonzero(np.asarray(layout.generated[0]))[-1])
  print(f"example 0, last answer token (slot {last}): head 0 selected regions "
        f"{np.asarray(ids[0, last, 0]).tolist()}, union per KV head "
        f"{np.asarray(selected_union_size(ids, Hkv)[0, last]).tolist()}")
  b = visual_kv_budget(top_k=4, region_size=36, num_ctx=4, n_frames=1, tokens_per_frame=576)
  print(f"KV budget, one 24x24 image, K=4: {b.gaze_entries} of {b.dense_entries} visual entries "
        f"({100 * b.fraction:.1f}%)")
  if err > 1e-4:
    raise SystemExit("xla and reference disagree")


if __name__ == "__main__":
  main()

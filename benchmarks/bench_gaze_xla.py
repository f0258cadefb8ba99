"""Benchmark: gaze attention (xla gather path) against the dense-mask reference and plain dense
attention, in the decode form (a few new text tokens against a long video cache) and in prefill.

Writes JSON (default ``benchmarks/results/gaze_xla_<backend>.json``). Times are medians of
``--repeats`` runs after a warm-up; report the ratios, which are measured in the same run.

  python benchmarks/bench_gaze_xla.py --frames 32 --top-k 16
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script from anywhere

from benchmarks.timing import median_seconds  # noqa: E402
from gaze_jax.gaze import (LayoutSpec, Text, Video, build_layout, gaze_attention,  # noqa: E402
                           num_regions, region_descriptors, slots_needed, visual_kv_budget)


def _dense_decode(q, k, v, pos_q, pos_k, valid_k):
  """Plain dense causal attention for the new rows (what a dense model pays)."""
  G = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
  logits = jnp.einsum("bthd,bshd->bths", q, k) / np.sqrt(q.shape[-1])
  mask = (pos_k[:, None, None, :] <= pos_q[:, :, None, None]) & valid_k[:, None, None, :]
  logits = jnp.where(mask, logits, -1e30)
  return jnp.einsum("bths,bshd->bthd", jax.nn.softmax(logits, axis=-1), v)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--frames", type=int, default=32)
  ap.add_argument("--grid", type=int, default=12, help="frame grid is grid x grid")
  ap.add_argument("--region", type=int, default=3, help="regions are region x region")
  ap.add_argument("--top-k", type=int, default=16)
  ap.add_argument("--num-ctx", type=int, default=4)
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--kv-heads", type=int, default=4)
  ap.add_argument("--head-dim", type=int, default=64)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--new-tokens", type=int, default=1)
  ap.add_argument("--prefill", action="store_true", help="also time full-sequence prefill")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default=None)
  a = ap.parse_args()

  segs = [Text(32), Video(a.frames, a.grid, a.grid), Text(64), Text(16, generated=True)]
  probe = LayoutSpec(seq_len=1, max_regions=1, max_images=1, region_shape=(a.region, a.region),
                     num_ctx=a.num_ctx)
  S = slots_needed(segs, probe)
  NR = a.frames * num_regions(a.grid, a.grid, (a.region, a.region))
  spec = LayoutSpec(seq_len=S, max_regions=NR, max_images=a.frames,
                    region_shape=(a.region, a.region), num_ctx=a.num_ctx,
                    max_nonvisual=32 + 64 + 16 + a.frames * a.num_ctx)
  layout = build_layout([segs] * a.batch, spec)
  B, Hq, Hkv, D, T = a.batch, a.heads, a.kv_heads, a.head_dim, a.new_tokens
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  k = jax.random.normal(keys[0], (B, S, Hkv, D))
  v = jax.random.normal(keys[1], (B, S, Hkv, D))
  q_new = jax.random.normal(keys[2], (B, T, Hq, D))
  gen = np.flatnonzero(np.asarray(layout.generated[0]))
  q_index = jnp.asarray(np.tile(gen[:T], (B, 1)), jnp.int32)
  desc = region_descriptors(k, layout)
  print(f"S={S} regions={NR} K={a.top_k} frames={a.frames} B={B} Hq={Hq} Hkv={Hkv} D={D} "
        f"backend={jax.default_backend()}", flush=True)

  results = {}
  for impl in ("reference", "xla"):
    f = jax.jit(lambda q, k, v, d, i, impl=impl: gaze_attention(
        q, k, v, q, None, layout, top_k=a.top_k, descriptors=d, q_index=i, implementation=impl))
    results[f"decode_{impl}_s"] = median_seconds(f, q_new, k, v, desc, q_index, repeats=a.repeats)
  pos_q = jnp.take_along_axis(jnp.asarray(layout.position), q_index, axis=1)
  dense = jax.jit(_dense_decode)
  results["decode_dense_s"] = median_seconds(dense, q_new, k, v, pos_q, jnp.asarray(layout.position),
                                    jnp.asarray(layout.kind) != 3, repeats=a.repeats)
  results["decode_xla_vs_reference"] = results["decode_reference_s"] / results["decode_xla_s"]
  results["decode_xla_vs_dense"] = results["decode_dense_s"] / results["decode_xla_s"]

  if a.prefill:
    q = jax.random.normal(keys[3], (B, S, Hq, D))
    for impl in ("reference", "xla"):
      f = jax.jit(lambda q, k, v, impl=impl: gaze_attention(
          q, k, v, q, k, layout, top_k=a.top_k, implementation=impl, query_chunk=512))
      results[f"prefill_{impl}_s"] = median_seconds(f, q, k, v, repeats=max(1, a.repeats // 2))

  budget = visual_kv_budget(top_k=a.top_k, region_size=a.region ** 2, num_ctx=a.num_ctx,
                            n_frames=a.frames, tokens_per_frame=a.grid * a.grid)
  report = {
      "benchmark": "gaze_xla", "backend": jax.default_backend(),
      "device": str(jax.devices()[0]), "jax": jax.__version__, "python": platform.python_version(),
      "config": vars(a) | {"seq_len": S, "max_regions": NR},
      "visual_kv_entries": {"gaze": budget.gaze_entries, "dense": budget.dense_entries,
                            "fraction": round(budget.fraction, 4)},
      "results": {k_: round(v_, 6) for k_, v_ in results.items()},
  }
  out = Path(a.out or f"benchmarks/results/gaze_xla_{jax.default_backend()}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2) + "\n")
  print(json.dumps(report["results"], indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()

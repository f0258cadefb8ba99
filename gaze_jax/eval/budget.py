"""Configured visual KV budget and decode FLOPs of a model on a batch layout.

Built on ``gaze_jax.gaze.accounting`` (docs/method.md step 12): a gaze query reads
``K * region_size + N * n_frames`` visual entries (K resolved as the model resolves it: against
``layout.max_regions``, or with ``top_k_per_example`` per example, ``ceil(ratio * the example's
regions)``; ``region_size`` counts padding slots, so this is an upper bound where regions are
padded). A dense query reads every patch token, plus the ``N * n_frames`` context
tokens when the model keeps them in the sequence (our dense baselines share the gaze model's
weights and sequence, context tokens included).

FLOPs are those of one decode query over all layers and query heads (a multiply-add counts 2):
attention over the visual entries (selected regions + context tokens), plus for gaze the routing
scores of the example's regions. Text keys are left out: every variant reads the same ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gaze_jax.gaze.accounting import (attention_flops, decode_flops, routing_flops,
                                      visual_kv_budget)


def frame_stats(layout) -> dict[str, np.ndarray]:
  """Per example: ``frames`` (valid images/frames), ``patches`` (visual tokens, sum of
  ``gh * gw``) and ``regions`` (valid regions), int ``[B]`` each."""
  valid = np.asarray(layout.frame_valid).astype(bool)
  grid = np.asarray(layout.frame_grid)
  return {"frames": valid.sum(1),
          "patches": (grid[..., 0] * grid[..., 1] * valid).sum(1),
          "regions": np.asarray(layout.region_valid).astype(bool).sum(1)}


def example_top_k(cfg, layout) -> np.ndarray:
  """int ``[B]``: the K each example's routed rows use, as the model resolves it: the count
  ``resolve_top_k(top_k, max_regions)``, or with ``top_k_per_example`` ``ceil(ratio * the
  example's regions)`` (``GazeConfig.resolve_k``)."""
  return cfg.gaze.resolve_k(layout.max_regions).per_example(layout.region_valid)


def model_dims(cfg) -> dict[str, int]:
  """``num_heads``, ``head_dim``, ``num_layers`` of an MLLMConfig's decoder."""
  d = cfg.decoder
  return {"num_heads": d.num_heads, "head_dim": d.head_dim, "num_layers": d.num_layers}


def configured_budget(cfg, layout) -> dict[str, Any]:
  """The configured per-query budget of ``cfg`` (an MLLMConfig) on ``layout``, averaged over the
  examples that hold at least one image/frame.

  Returns a dict with ``examples`` (how many were averaged), ``visual_kv`` (entries per query),
  ``dense_visual_kv`` (the dense model on the same sequence, context tokens included),
  ``patches``, ``frames``, ``top_k`` (None for dense; the ratio when K is per example) and
  ``flops`` (a dict: ``regions``, ``context``, ``routing``, ``total`` per decode query, as
  floats).
  """
  st = frame_stats(layout)
  has = st["frames"] > 0
  N = layout.spec.num_ctx
  dims = model_dims(cfg)
  out = {"examples": int(has.sum()), "top_k": None, "region_size": layout.spec.region_size,
         "num_ctx": N}
  if not has.any():
    return out | {"visual_kv": float("nan"), "dense_visual_kv": float("nan"),
                  "patches": float("nan"), "frames": float("nan"), "flops": {}}
  frames, patches, regions = (st[k][has] for k in ("frames", "patches", "regions"))
  dense = patches + N * frames
  out.update(patches=float(patches.mean()), frames=float(frames.mean()),
             dense_visual_kv=float(dense.mean()))
  if cfg.gaze.attention == "dense":
    flops = np.array([attention_flops(int(e), **dims) for e in dense], np.float64)
    return out | {"visual_kv": float(dense.mean()),
                  "flops": {"regions": float(flops.mean()), "context": 0.0, "routing": 0.0,
                            "total": float(flops.mean())}}
  ks = example_top_k(cfg, layout)[has]
  K = cfg.gaze.top_k if cfg.gaze.top_k_per_example else int(ks[0])
  R = layout.spec.region_size
  entries, parts = [], []
  for k, f, p, r in zip(ks, frames, patches, regions):
    entries.append(visual_kv_budget(top_k=int(k), region_size=R, num_ctx=N, n_frames=int(f),
                                    tokens_per_frame=max(1, int(p) // int(f))).gaze_entries)
    parts.append(decode_flops(top_k=int(k), region_size=R, num_ctx=N, n_frames=int(f),
                              n_regions=int(r), **dims))
  flops = {k: float(np.mean([p[k] for p in parts])) for k in ("regions", "context", "routing")}
  flops["total"] = sum(flops.values())
  return out | {"top_k": K, "visual_kv": float(np.mean(entries)), "flops": flops}


def measured_flops(cfg, mean_entries: float, mean_candidates: float) -> dict[str, float]:
  """Decode FLOPs per query from measured means: attention over ``mean_entries`` visual
  entries (per head and layer) plus routing over ``mean_candidates`` regions."""
  dims = model_dims(cfg)
  att = float(attention_flops(float(mean_entries), **dims))
  rout = float(routing_flops(float(mean_candidates), **dims))
  return {"attention": att, "routing": rout, "total": att + rout}

"""Budget accounting (docs/method.md step 12, and the FLOP figures of the paper).

"Visual KV entries per query" = ``K * region_size + N * n_frames``; dense = all visual tokens.
FLOPs count a multiply-add as 2: one query head reading one key costs ``2 * D`` for ``q . k``
and ``2 * D`` for ``p * v``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class KVBudget:
  """Visual KV entries read by one routed query (per head and layer)."""
  gaze_entries: int     # K * region_size + num_ctx * n_frames
  dense_entries: int    # n_frames * tokens_per_frame

  @property
  def fraction(self) -> float:
    """Gaze entries as a fraction of dense (0.163 for the paper's video example)."""
    return self.gaze_entries / self.dense_entries


def visual_kv_budget(*, top_k: int, region_size: int, num_ctx: int, n_frames: int,
                     tokens_per_frame: int) -> KVBudget:
  """KV budget of one query: e.g. 8 frames of 576 tokens, 36-token regions, K=20, N=4 gives
  752 gaze entries against 4608 dense (16.3%)."""
  for name, x in (("top_k", top_k), ("region_size", region_size), ("num_ctx", num_ctx),
                  ("n_frames", n_frames), ("tokens_per_frame", tokens_per_frame)):
    if x < 0:
      raise ValueError(f"{name} must be >= 0, got {x}")
  if n_frames * tokens_per_frame == 0:
    raise ValueError("n_frames * tokens_per_frame must be > 0")
  return KVBudget(gaze_entries=top_k * region_size + num_ctx * n_frames,
                  dense_entries=n_frames * tokens_per_frame)


def attention_flops(entries: int, *, num_heads: int, head_dim: int, num_layers: int) -> int:
  """FLOPs of attention for one decode query over ``entries`` keys, all heads and layers:
  ``4 * entries * Hq * D * L``."""
  return 4 * entries * num_heads * head_dim * num_layers


def routing_flops(n_regions: int, *, num_heads: int, head_dim: int, num_layers: int) -> int:
  """FLOPs of scoring ``n_regions`` descriptors for one query: ``2 * NR * Hq * D * L``
  (the top-K itself is a comparison, not counted)."""
  return 2 * n_regions * num_heads * head_dim * num_layers


def decode_flops(*, top_k: int, region_size: int, num_ctx: int, n_frames: int, n_regions: int,
                 num_heads: int, head_dim: int, num_layers: int) -> dict[str, int]:
  """Per decode query, split as the paper reports it: selected regions, context tokens, routing."""
  dims = dict(num_heads=num_heads, head_dim=head_dim, num_layers=num_layers)
  return {"regions": attention_flops(top_k * region_size, **dims),
          "context": attention_flops(num_ctx * n_frames, **dims),
          "routing": routing_flops(n_regions, **dims)}


def selected_union_size(ids: jax.Array, num_kv_heads: int) -> jax.Array:
  """Distinct regions that the query heads of each GQA group selected: the blocks one KV head
  must read for that query (docs/method.md, Efficiency).

  Args:
    ids: int32 ``[B, T, Hq, K]`` selected ids, -1 = none.
    num_kv_heads: Hkv.
  Returns:
    int32 ``[B, T, Hkv]``.
  """
  B, T, Hq, K = ids.shape
  g = ids.reshape(B, T, num_kv_heads, -1)                             # [B, T, Hkv, G*K]
  s = jnp.sort(g, axis=-1)
  first = jnp.concatenate([jnp.ones_like(s[..., :1], bool), s[..., 1:] != s[..., :-1]], -1)
  return jnp.sum(first & (s >= 0), axis=-1).astype(jnp.int32)

"""Routing: region scores, the causal candidate mask and the static top-K (METHOD.md 4, 5).

Selection is hard and non-differentiable: only integer region ids leave this module, so no
gradient flows through routing (METHOD.md step 5).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

SCORES = ("dot", "cosine")
ROUTINGS = ("head", "group")


def resolve_top_k(top_k, n_regions: int) -> int:
  """K as a count (int) or a ratio of the regions (float in (0, 1]: ``ceil(ratio * n)``).

  Raises ValueError when K is not in ``[1, n_regions]``.
  """
  if isinstance(top_k, bool):
    raise ValueError(f"top_k must be an int count or a float ratio, got {top_k!r}")
  if isinstance(top_k, float):
    if not 0.0 < top_k <= 1.0:
      raise ValueError(f"top_k as a ratio must be in (0, 1], got {top_k}")
    return max(1, math.ceil(top_k * n_regions - 1e-9))
  try:
    k = int(top_k)
  except TypeError:
    raise ValueError(f"top_k must be an int count or a float ratio, got {top_k!r}") from None
  if k != top_k:
    raise ValueError(f"top_k must be an int count or a float ratio, got {top_k!r}")
  if not 1 <= k <= n_regions:
    raise ValueError(f"top_k={k} must be in [1, max_regions={n_regions}] "
                     "(K larger than the number of regions)")
  return k


def unique_ids(ids: jax.Array) -> jax.Array:
  """Region ids ``[..., K]`` (-1 none) with every repeat within a row after its first
  occurrence set to -1, in place: a region is a set member, so a path that gathers or counts
  selections must see it once. A stable sort per row (cheap even at K = all regions); top-K
  output never repeats and needs no call."""
  ids = ids.astype(jnp.int32)
  if ids.shape[-1] < 2:
    return ids
  order = jnp.argsort(ids, axis=-1, stable=True)      # equal ids keep their index order
  srt = jnp.take_along_axis(ids, order, axis=-1)
  repeat = jnp.concatenate([jnp.zeros_like(srt[..., :1], bool),
                            srt[..., 1:] == srt[..., :-1]], axis=-1)
  back = jnp.argsort(order, axis=-1)
  return jnp.where(jnp.take_along_axis(repeat, back, axis=-1), -1, ids)


@dataclasses.dataclass(frozen=True)
class Selection:
  """Selected regions per (query, head).

  ids: int32 ``[B, T, Hq, K]`` region ids, -1 where nothing was selected (fewer candidates than
    K, rank >= active K, or a row that is not routed).
  """
  ids: Any

  @property
  def valid(self) -> jax.Array:
    return self.ids >= 0


jax.tree_util.register_dataclass(Selection, data_fields=["ids"], meta_fields=[])


def region_scores(q_route: jax.Array, descriptors: jax.Array, *, score: str = "dot") -> jax.Array:
  """Routing score of every (query, head, region).

  Args:
    q_route: ``[B, T, Hq, Dr]`` queries before RoPE.
    descriptors: ``[B, NR, Hkv, Dr]`` region descriptors; query head h uses KV head
      ``h // (Hq // Hkv)``.
    score: "dot" (``q . d / sqrt(Dr)``, default) or "cosine".
  Returns:
    float32 ``[B, T, Hq, NR]``.
  """
  if score not in SCORES:
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")
  B, T, Hq, Dr = q_route.shape
  Hkv = descriptors.shape[2]
  q = q_route.astype(jnp.float32).reshape(B, T, Hkv, Hq // Hkv, Dr)
  d = descriptors.astype(jnp.float32)
  if score == "cosine":
    q = q * jax.lax.rsqrt(jnp.sum(q * q, -1, keepdims=True) + 1e-12)
    d = d * jax.lax.rsqrt(jnp.sum(d * d, -1, keepdims=True) + 1e-12)
  else:
    q = q / math.sqrt(Dr)
  s = jnp.einsum("btkgd,brkd->btkgr", q, d, precision=jax.lax.Precision.HIGHEST)
  return s.reshape(B, T, Hq, -1)


def candidate_regions(region_valid: jax.Array, region_last_pos: jax.Array,
                      q_pos: jax.Array) -> jax.Array:
  """Regions whose tokens all lie before the query: bool ``[B, T, NR]``.

  Args:
    region_valid, region_last_pos: ``[B, NR]`` from the TokenLayout.
    q_pos: int32 ``[B, T]`` query positions.
  """
  return region_valid[:, None, :] & (region_last_pos[:, None, :] < q_pos[:, :, None])


def select_top_k(scores: jax.Array, candidates: jax.Array, *, top_k: int, active_k=None,
                 routing: str = "head", num_kv_heads: int) -> Selection:
  """Static top-K over candidate regions.

  Args:
    scores: float32 ``[B, T, Hq, NR]``.
    candidates: bool ``[B, T, NR]`` (or ``[B, T, Hq, NR]``).
    top_k: static K_max.
    active_k: optional traced int (<= K_max); ranks ``>= active_k`` are dropped, so a
      progressive schedule lowers K without recompiling.
    routing: "head" (each query head picks its own) or "group" (the heads of a GQA group pick
      one set together, scored by the sum of their scores).
    num_kv_heads: Hkv.
  Returns:
    Selection with ids ``[B, T, Hq, K]``.
  """
  if routing not in ROUTINGS:
    raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
  B, T, Hq, NR = scores.shape
  G = Hq // num_kv_heads
  if candidates.ndim == 3:
    candidates = candidates[:, :, None, :]
  candidates = jnp.broadcast_to(candidates, scores.shape)
  if routing == "group":
    scores = scores.reshape(B, T, num_kv_heads, G, NR).sum(axis=3)
    candidates = candidates.reshape(B, T, num_kv_heads, G, NR)[:, :, :, 0]
  masked = jnp.where(candidates, scores, -jnp.inf)
  _, ids = jax.lax.top_k(masked, top_k)                              # [B, T, H', K]
  ok = jnp.take_along_axis(candidates, ids, axis=-1)
  if active_k is not None:
    ok &= jnp.arange(top_k) < jnp.asarray(active_k, jnp.int32)
  ids = jnp.where(ok, ids, -1).astype(jnp.int32)
  if routing == "group":
    ids = jnp.repeat(ids, G, axis=2)
  return Selection(ids=ids)


def random_selection(key: jax.Array, region_valid: jax.Array, region_last_pos: jax.Array,
                     q_pos: jax.Array, routed_rows: jax.Array, *, num_heads: int,
                     num_kv_heads: int, top_k: int, active_k=None,
                     routing: str = "head") -> Selection:
  """Random routing (the random-routing baseline): for every routed row and query head (or
  GQA group with ``routing="group"``), ``top_k`` distinct regions drawn uniformly from the
  row's causal candidates. It is the top-K of i.i.d. uniform scores through the same candidate
  rule and ``select_top_k`` as ``route``, so only the scores differ from the model's routing.

  Args:
    key: a PRNG key; region_valid, region_last_pos: ``[B, NR]``; q_pos: int32 ``[B, T]``;
    routed_rows: bool ``[B, T]``; num_heads, num_kv_heads: Hq, Hkv; top_k, active_k, routing
      as in ``select_top_k``.
  Returns:
    Selection with ids ``[B, T, Hq, K]`` (-1 where fewer candidates than K, or not routed).
  """
  B, T = q_pos.shape
  scores = jax.random.uniform(key, (B, T, num_heads, region_valid.shape[1]))
  cand = candidate_regions(region_valid, region_last_pos, q_pos) & routed_rows[:, :, None]
  return select_top_k(scores, cand, top_k=top_k, active_k=active_k, routing=routing,
                      num_kv_heads=num_kv_heads)


def route(q_route: jax.Array, descriptors: jax.Array, region_valid: jax.Array,
          region_last_pos: jax.Array, q_pos: jax.Array, routed_rows: jax.Array, *, top_k: int,
          active_k=None, score: str = "dot", routing: str = "head") -> Selection:
  """Scores, causal candidates and top-K in one call; rows where ``routed_rows`` (bool
  ``[B, T]``) is False select nothing. Shapes as in ``region_scores`` / ``select_top_k``."""
  scores = region_scores(q_route, descriptors, score=score)
  cand = candidate_regions(region_valid, region_last_pos, q_pos) & routed_rows[:, :, None]
  return select_top_k(scores, cand, top_k=top_k, active_k=active_k, routing=routing,
                      num_kv_heads=descriptors.shape[2])

"""Routing: region scores, the causal candidate mask and the static top-K (docs/method.md 4-5).

Selection is hard and non-differentiable: only integer region ids leave this module, so no
gradient flows through routing (docs/method.md step 5).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

SCORES = ("dot", "cosine")
ROUTINGS = ("head", "group")


class TopKError(ValueError):
  """A bad K setting: ``field`` (``top_k`` or ``top_k_per_example``) and what is wrong with it
  (``says``), so that a config can name the field where it holds it."""

  def __init__(self, field: str, says: str):
    self.field, self.says = field, says
    super().__init__(f"{field}{says}")


def check_top_k(top_k, per_example: bool = False) -> None:
  """The rule of a K setting, before any layout: an int count >= 1 or a float ratio in
  (0, 1]; ``per_example`` (each example applies the ratio to its own regions) needs a ratio.
  Raises TopKError."""
  if isinstance(top_k, bool) or not isinstance(top_k, (int, float, np.integer)):
    raise TopKError("top_k", f" must be an int count or a float ratio, got {top_k!r}")
  if isinstance(top_k, float):
    if not 0.0 < top_k <= 1.0:
      raise TopKError("top_k", f"={top_k} as a ratio must be in (0, 1]")
  elif top_k < 1:
    raise TopKError("top_k", f"={top_k} must be at least 1 (a count of regions; 0 selects "
                    "nothing), or a float ratio in (0, 1]")
  if per_example and not isinstance(top_k, float):
    raise TopKError("top_k_per_example", " needs top_k as a ratio (a float in (0, 1]), got "
                    f"top_k={top_k!r}")


def resolve_top_k(top_k, n_regions: int) -> int:
  """K as a count (int) or a ratio of the regions (float in (0, 1]: ``ceil(ratio * n)``).

  Raises ValueError when K is not in ``[1, n_regions]``.
  """
  check_top_k(top_k)
  if isinstance(top_k, float):
    return max(1, math.ceil(top_k * n_regions - 1e-9))
  if top_k > n_regions:
    raise TopKError("top_k", f"={int(top_k)} must be in [1, max_regions={n_regions}] "
                    "(K larger than the number of regions)")
  return int(top_k)


@dataclasses.dataclass(frozen=True)
class ResolvedK:
  """K of gaze attention over a layout's regions, resolved once (``resolve_k``) and taken by
  every user of the rule (attention, kernels, baselines, budgets, memory plans, schedules).

  k_max: the static K of the compiled program (the width of the selected ids);
  ratio: with ``top_k_per_example``, the ratio each example applies to its own valid regions
    (``per_example_k``; then ``k_max`` is all regions), else None (every example keeps
    ``k_max``)."""
  k_max: int
  ratio: Optional[float] = None

  @property
  def count(self) -> int:
    """K of an example whose regions are all valid: ``k_max``, or ``ceil(ratio * k_max)``."""
    if self.ratio is None:
      return self.k_max
    return max(1, math.ceil(self.ratio * self.k_max - 1e-9))

  @property
  def schedule_target(self) -> int:
    """The count a progressive top-K schedule ends at: ``k_max``; with a ratio the floor
    ``floor(ratio * k_max)``, below which every example keeps ``ceil(ratio * its regions)``
    (``per_example_k``)."""
    if self.ratio is None:
      return self.k_max
    return max(1, int(math.floor(self.ratio * self.k_max + 1e-9)))

  def per_example(self, region_valid) -> np.ndarray:
    """int ``[B]``: the K each example keeps at the target (host arrays)."""
    region_valid = np.asarray(region_valid)
    if self.ratio is None:
      return np.full(region_valid.shape[0], self.k_max, np.int64)
    return np.asarray(per_example_k(self.ratio, region_valid))


def resolve_k(top_k, n_regions: int, *, per_example: bool = False) -> ResolvedK:
  """``top_k`` (a count or a ratio) over ``n_regions`` regions (``layout.max_regions``):
  ``ResolvedK(resolve_top_k(top_k, n))``, or with ``per_example`` ``ResolvedK(n, top_k)``.
  Raises TopKError naming the setting."""
  check_top_k(top_k, per_example)
  if per_example:
    return ResolvedK(int(n_regions), float(top_k))
  return ResolvedK(resolve_top_k(top_k, n_regions))


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
    active_k: optional traced int (<= K_max), or int ``[B]`` per example; ranks
      ``>= active_k`` are dropped, so a progressive schedule lowers K without recompiling.
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
    ak = jnp.asarray(active_k, jnp.int32)
    ok &= jnp.arange(top_k) < (ak if ak.ndim == 0 else ak.reshape(B, 1, 1, 1))
  ids = jnp.where(ok, ids, -1).astype(jnp.int32)
  if routing == "group":
    ids = jnp.repeat(ids, G, axis=2)
  return Selection(ids=ids)


def per_example_k(ratio: float, region_valid: jax.Array, active_k=None) -> jax.Array:
  """K of each example for a per-example ratio (the paper's semantics): int32 ``[B]``,
  ``ceil(r * n_b)`` with ``n_b`` the example's valid regions and ``r = max(ratio, active_k /
  NR)`` (NR = ``region_valid.shape[1]``, the batch's static max), at least 1. A progressive
  schedule's count ``active_k`` thus lowers the ratio from all regions towards ``ratio``, and
  once ``active_k <= ratio * NR`` every example keeps exactly ``ceil(ratio * n_b)``."""
  if not 0.0 < float(ratio) <= 1.0:
    raise ValueError(f"a per-example K needs a ratio in (0, 1], got {ratio!r}")
  n = jnp.sum(region_valid, axis=-1).astype(jnp.float32)                    # [B]
  r = jnp.float32(ratio)
  if active_k is not None:
    r = jnp.maximum(r, jnp.asarray(active_k, jnp.float32) / region_valid.shape[1])
  return jnp.maximum(1, jnp.ceil(r * n - 1e-6)).astype(jnp.int32)


def _active(k_ratio, region_valid, active_k):
  """``active_k`` for ``select_top_k``: the per-example K (``[B]``) when ``k_ratio`` is set."""
  return active_k if k_ratio is None else per_example_k(k_ratio, region_valid, active_k)


def random_selection(key: jax.Array, region_valid: jax.Array, region_last_pos: jax.Array,
                     q_pos: jax.Array, routed_rows: jax.Array, *, num_heads: int,
                     num_kv_heads: int, top_k: int, active_k=None,
                     routing: str = "head", k_ratio=None) -> Selection:
  """Random routing (the random-routing baseline): for every routed row and query head (or
  GQA group with ``routing="group"``), ``top_k`` distinct regions drawn uniformly from the
  row's causal candidates. It is the top-K of i.i.d. uniform scores through the same candidate
  rule and ``select_top_k`` as ``route``, so only the scores differ from the model's routing.

  Args:
    key: a PRNG key; region_valid, region_last_pos: ``[B, NR]``; q_pos: int32 ``[B, T]``;
    routed_rows: bool ``[B, T]``; num_heads, num_kv_heads: Hq, Hkv; top_k, active_k, routing
      as in ``select_top_k``; k_ratio as in ``route``.
  Returns:
    Selection with ids ``[B, T, Hq, K]`` (-1 where fewer candidates than K, or not routed).
  """
  B, T = q_pos.shape
  scores = jax.random.uniform(key, (B, T, num_heads, region_valid.shape[1]))
  cand = candidate_regions(region_valid, region_last_pos, q_pos) & routed_rows[:, :, None]
  return select_top_k(scores, cand, top_k=top_k, active_k=_active(k_ratio, region_valid,
                                                                  active_k),
                      routing=routing, num_kv_heads=num_kv_heads)


def route(q_route: jax.Array, descriptors: jax.Array, region_valid: jax.Array,
          region_last_pos: jax.Array, q_pos: jax.Array, routed_rows: jax.Array, *, top_k: int,
          active_k=None, score: str = "dot", routing: str = "head",
          k_ratio=None) -> Selection:
  """Scores, causal candidates and top-K in one call; rows where ``routed_rows`` (bool
  ``[B, T]``) is False select nothing. Shapes as in ``region_scores`` / ``select_top_k``.
  ``k_ratio``: a per-example K, ``per_example_k(k_ratio, region_valid, active_k)`` (static
  ``top_k`` must hold it: all regions)."""
  scores = region_scores(q_route, descriptors, score=score)
  cand = candidate_regions(region_valid, region_last_pos, q_pos) & routed_rows[:, :, None]
  return select_top_k(scores, cand, top_k=top_k, active_k=_active(k_ratio, region_valid,
                                                                  active_k),
                      routing=routing, num_kv_heads=descriptors.shape[2])

"""The visual KV in host memory while decoding (``GazeConfig.offload``).

A decode query reads only its top-K regions, so the patch K/V need not sit in device memory.
At prefill each layer's K/V go to host memory (``jax.memory.Space.Host``: pinned host memory
on a GPU or TPU, the same RAM on CPU); the device keeps the text and context K/V (where the
decode steps write their tokens), the region descriptors, and a **region cache**: per example
and KV head, ``C`` region blocks ``[R, D]``. Each decode step routes on the device, looks up the
union of the regions its query heads selected (over the GQA group of each KV head), copies the
missing ones from host memory into the least recently used entries, and attends over the text
and context keys plus the cached blocks, with the same masks and softmax as the in-device
path (``gaze_jax.gaze.xla``): the tokens and logits are those of in-device decoding.

Consecutive tokens mostly select the same regions, so most reads hit the cache: ``fetched``
and ``needed`` count the blocks copied and read per example (``generate`` returns their sums
over the layers: ``GenerateOutput.hit_rate``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.compute_on import compute_on

from gaze_jax.gaze.layout import TokenLayout
from gaze_jax.gaze.masks import base_mask
from gaze_jax.gaze.plan import AttentionPlan
from gaze_jax.gaze.routing import resolve_k, route
from gaze_jax.gaze.xla import attend, region_block_mask


@dataclasses.dataclass(frozen=True)
class OffloadedCache:
  """One layer's decode cache with the visual K/V in host memory.

  k_host, v_host: ``[B * Hkv * NR, R * D']`` the prefill's region blocks in host memory, one
    row per (example, KV head, region) (row ``(b * Hkv + h) * NR + r``), the block laid flat:
    a block is one slice of whole rows, which is what a TPU copies from host memory, and the
    row's minor extent (``R * D'``) spans whole 128-lane tiles, so the compiler keeps the
    natural layout. Values under 32 bits are packed into uint32 (``D' = D * itemsize / 4``;
    ``host_rows``, ``_pack``): a TPU slices host memory by whole 32-bit sublanes.
  k_nv, v_nv: ``[B, N, Hkv, D]`` the text and context slots (``layout.nonvisual_index``) on the
    device; decode steps write their tokens' K/V here.
  descriptors: ``[B, NR, Hkv, Dr]`` the region descriptors.
  buf_k, buf_v: ``[B * Hkv * C, R * D']`` the region cache on the device: C region blocks per
    example and KV head (row ``(b * Hkv + h) * C + c``), as the host rows hold them, so a copy
    is one row and the blocks are unpacked once they are gathered (any other form made XLA:TPU
    keep relaid-out copies of the whole cache around the copy loop).
  buf_ids: int32 ``[B, Hkv, C]`` the region each entry holds (-1: none).
  buf_used: int32 ``[B, Hkv, C]`` the step that last read each entry (least recently used goes).
  step: int32 scalar, decode steps so far.
  fetched, needed: int32 ``[B]`` region blocks copied from host memory / read, so far.
  """
  k_host: Any
  v_host: Any
  k_nv: Any
  v_nv: Any
  descriptors: Any
  buf_k: Any
  buf_v: Any
  buf_ids: Any
  buf_used: Any
  step: Any
  fetched: Any
  needed: Any


jax.tree_util.register_dataclass(
    OffloadedCache, data_fields=[f.name for f in dataclasses.fields(OffloadedCache)],
    meta_fields=[])


def is_offloaded(caches) -> bool:
  """Whether ``caches`` (one per layer, or None) are ``OffloadedCache``s."""
  return bool(caches) and isinstance(caches[0], OffloadedCache)


def union_size(max_regions: int, heads_per_kv: int, k_max: int, routing: str,
               rows: int = 1) -> int:
  """The most regions one KV head's group can select in a step: ``rows`` query rows times K,
  times its ``heads_per_kv`` query heads when each head routes (``routing="head"``; a group
  that routes together selects K), at most the layout's ``max_regions``."""
  heads = 1 if routing == "group" else heads_per_kv
  return min(max_regions, rows * heads * k_max)


def offload_capacity(cfg, max_regions: int) -> int:
  """The region cache's entries per example and KV head for a model config (``MLLMConfig``)
  over a layout of ``max_regions``: ``cfg.gaze.offload_cache``, at least the most one decode
  step can select."""
  dec, gz = cfg.decoder, cfg.gaze
  k_max = resolve_k(gz.top_k, max_regions, per_example=gz.top_k_per_example).k_max
  return max(gz.offload_cache,
             union_size(max_regions, dec.num_heads // dec.num_kv_heads, k_max, gz.routing))


def host_rows(rows: int, R: int, D: int, dtype) -> jax.ShapeDtypeStruct:
  """The shape and dtype of ``rows`` host rows, each one block ``[R, D]`` of ``dtype`` laid
  flat (see ``OffloadedCache``): values under 32 bits packed into uint32."""
  size = jnp.dtype(dtype).itemsize
  if size >= 4:
    return jax.ShapeDtypeStruct((rows, R * D), jnp.dtype(dtype))
  return jax.ShapeDtypeStruct((rows, R * D * size // 4), jnp.dtype(jnp.uint32))


def _pack(x: jax.Array) -> jax.Array:
  """Blocks ``[..., R, D]`` -> host rows ``[..., R * D']``. Values of a 16- or 8-bit dtype are
  packed into uint32, ``n = 4 / itemsize`` per word: word ``j`` holds ``x[..., j + i * D']`` in
  its bits ``i * 32 / n`` up (``D' = D / n``), so unpacking is shifts and one concatenation
  along D, never a new minor axis of n (which a TPU would pad to 128 lanes)."""
  n = 4 // x.dtype.itemsize
  if n > 1:
    bits = 32 // n
    parts = jnp.split(jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")), n, axis=-1)
    x = functools.reduce(jnp.bitwise_or, [p.astype(jnp.uint32) << (i * bits)
                                          for i, p in enumerate(parts)])
  return x.reshape(*x.shape[:-2], -1)


def _unpack(x: jax.Array, dtype, R: int) -> jax.Array:
  """The inverse of ``_pack``: host rows ``[..., R * D']`` -> blocks ``[..., R, D]`` of
  ``dtype``."""
  x = x.reshape(*x.shape[:-1], R, -1)
  dtype = jnp.dtype(dtype)
  n = 4 // dtype.itemsize
  if n == 1:
    return x
  bits = 32 // n
  word = jnp.dtype(f"uint{bits}")
  return jax.lax.bitcast_convert_type(
      jnp.concatenate([(x >> (i * bits)).astype(word) for i in range(n)], axis=-1), dtype)


def _region_rows(x: jax.Array, layout: TokenLayout) -> jax.Array:
  """k or v ``[B, S, Hkv, D]`` -> the region blocks as host rows ``[B * Hkv * NR, R * D']`` (see
  ``OffloadedCache``; an invalid region's row holds clipped slots, never read)."""
  B, S, Hkv, D = x.shape
  NR, R = layout.max_regions, layout.region_size
  slots = jnp.clip(layout.region_first[:, :, None] + jnp.arange(R), 0, S - 1)   # [B, NR, R]
  g = jnp.take_along_axis(x, slots.reshape(B, NR * R)[:, :, None, None], axis=1)
  return _pack(g.reshape(B, NR, R, Hkv, D).transpose(0, 3, 1, 2, 4).reshape(B * Hkv * NR, R, D))


def offload(k: jax.Array, v: jax.Array, descriptors: jax.Array, layout: TokenLayout,
            capacity: int) -> OffloadedCache:
  """A prefill's cache of one layer (k, v ``[B, S, Hkv, D]``): its region blocks moved to host
  memory, its text and context K/V kept on the device, and an empty region cache of
  ``capacity`` blocks per example and KV head. ``layout`` should be ``layout.for_decoding()``
  (its nonvisual index)."""
  B, S, Hkv, D = k.shape
  R = layout.region_size
  nv = jnp.clip(layout.nonvisual_index, 0)[:, :, None, None]
  host = jax.memory.Space.Host
  packed = host_rows(B * Hkv * capacity, R, D, k.dtype)
  zeros = jnp.zeros(packed.shape, packed.dtype)
  return OffloadedCache(
      k_host=jax.device_put(_region_rows(k, layout), host),
      v_host=jax.device_put(_region_rows(v, layout), host),
      k_nv=jnp.take_along_axis(k, nv, axis=1), v_nv=jnp.take_along_axis(v, nv, axis=1),
      descriptors=descriptors, buf_k=zeros, buf_v=zeros,
      buf_ids=jnp.full((B, Hkv, capacity), -1, jnp.int32),
      buf_used=jnp.full((B, Hkv, capacity), -1, jnp.int32), step=jnp.int32(0),
      fetched=jnp.zeros((B,), jnp.int32), needed=jnp.zeros((B,), jnp.int32))


def _write_nonvisual(cache: OffloadedCache, k, v, layout: TokenLayout, q_index):
  """The new tokens' k, v ``[B, T, Hkv, D]`` written at their slots ``q_index`` (consecutive
  text slots, so consecutive entries of the nonvisual index)."""
  at = jnp.argmax(layout.nonvisual_index == q_index[:, :1], axis=1)        # [B]

  def one(buf, new, s):
    return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), s, axis=0)
  return jax.vmap(one)(cache.k_nv, k, at), jax.vmap(one)(cache.v_nv, v, at)


def _plan_fetches(ids: jax.Array, buf_ids: jax.Array, buf_used: jax.Array, step, size: int):
  """Where each needed region goes in one KV head's region cache.

  ids: int32 ``[n]`` the regions its query heads selected (-1: none); buf_ids / buf_used
  ``[C]``; size: U, at most the distinct regions of ``ids``. Returns ``(slot [n], need [U],
  miss [U], slot_u [U], buf_ids, buf_used)``: the entry holding each id after this step's
  copies; the distinct regions (-1 padded), whether each must be copied and its entry; the
  updated bookkeeping. The missing regions go to the least recently used entries that no
  selected region holds."""
  # The distinct regions first, "none" after them (so that none takes a region's place).
  none = jnp.iinfo(jnp.int32).max
  need = jnp.unique(jnp.where(ids >= 0, ids, none), size=size, fill_value=none)
  need = jnp.where(need == none, -1, need)                                  # [U]
  match = (need[:, None] == buf_ids[None, :]) & (need[:, None] >= 0)        # [U, C]
  hit = match.any(1)
  keep = match.any(0)                                                       # [C] in use now
  miss = (need >= 0) & ~hit
  # Entries by eviction order: those not in use now, least recently used first (ties: the
  # lowest region id; empty entries first of all).
  order = jnp.lexsort((buf_ids, jnp.where(keep, jnp.iinfo(jnp.int32).max, buf_used)))
  rank = jnp.cumsum(miss) - 1
  new_slot = order[jnp.clip(rank, 0)]
  slot_u = jnp.where(hit, jnp.argmax(match, axis=1), new_slot)              # [U]
  C = buf_ids.shape[0]
  target = jnp.where(miss, slot_u, C)                                       # C: dropped
  buf_ids = buf_ids.at[target].set(need, mode="drop")
  used = jnp.where(need >= 0, slot_u, C)
  buf_used = buf_used.at[used].set(step, mode="drop")
  # Each selected id's entry.
  slot = jnp.argmax((ids[:, None] == buf_ids[None, :]), axis=1)
  return slot, need, miss, slot_u, buf_ids, buf_used


# The row counts one copy from host memory takes: a loop of copies of each size in turn, while
# the misses left fill it, so a step copies no row twice and issues few copies (on a GPU each
# loop turn waits for the host). Loops one after another, not a switch in one loop: a switch's
# branches copy the whole region cache on each turn (measured on CPU: 10x slower).
COPY_SIZES = (256, 32, 4, 1)


def _gather_rows(host: jax.Array, rows: jax.Array) -> jax.Array:
  """Rows ``rows`` (int32 ``[n]``, in bounds) of ``host`` ``[N, W]`` -> ``[n, W]`` on the
  device: gathered where they lie (on the host for host memory: XLA's host compute,
  ``compute_on("device_host")``), then moved in one copy."""
  space = jax.typeof(host).memory_space
  dims = jax.lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,),
                                        start_index_map=(0,))
  # PROMISE_IN_BOUNDS: a clamping gather would bring device-side constants into host code.
  gather = lambda r: jax.lax.gather(host, r[:, None], dims, (1, host.shape[1]),
                                    mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)
  if space != jax.memory.Space.Host:
    return gather(rows)
  with compute_on("device_host"):
    got = gather(jax.device_put(rows, space))
  return jax.device_put(got, jax.memory.Space.Device)


def _copy_misses(cache: OffloadedCache, need, miss, slot_u, layout: TokenLayout):
  """Copies the missing region blocks (host rows) from host memory into their region cache
  entries: a loop of copies of ``COPY_SIZES`` rows (a gather on the host, one transfer, a
  scatter into the cache) over the missing blocks only."""
  B, Hkv, U = need.shape
  NR = layout.max_regions
  flat_miss = miss.reshape(-1)
  order = jnp.argsort(~flat_miss)                          # the misses first
  count = flat_miss.sum().astype(jnp.int32)
  C = cache.buf_k.shape[0] // (B * Hkv)
  head = order // U                                        # b * Hkv + h
  row = (head * NR + jnp.clip(need, 0).reshape(-1)[order]).astype(jnp.int32)
  entry = (head * C + slot_u.reshape(-1)[order]).astype(jnp.int32)
  carry = (jnp.int32(0), cache.buf_k, cache.buf_v)
  for n in (n for n in COPY_SIZES if n <= flat_miss.shape[0]):

    def copy(carry, n=n):
      i, bk, bv = carry
      r = jax.lax.dynamic_slice_in_dim(row, i, n)
      e = jax.lax.dynamic_slice_in_dim(entry, i, n)
      put = lambda host, buf: buf.at[e].set(_gather_rows(host, r), unique_indices=True,
                                            mode="promise_in_bounds")
      return i + n, put(cache.k_host, bk), put(cache.v_host, bv)

    carry = jax.lax.while_loop(lambda c, n=n: count - c[0] >= n, copy, carry)
  _, bk, bv = carry
  return bk, bv


def offloaded_attention(q, k, v, q_route, cache: OffloadedCache, layout: TokenLayout, gaze, *,
                        q_index, plan: AttentionPlan, active_k=None):
  """One decode step of one layer against an offloaded cache (xla path).

  q ``[B, T, Hq, D]`` after RoPE, k/v ``[B, T, Hkv, D]`` the new tokens', q_route ``[B, T, Hq,
  Dr]`` before RoPE; ``plan`` the decode plan (``attention_plan``, "xla"). Returns ``(out [B, T,
  Hq, D], selected ids [B, T, Hq, K], the updated cache)``."""
  B, T, Hq, D = q.shape
  Hkv = k.shape[2]
  G = Hq // Hkv
  k_nv, v_nv = _write_nonvisual(cache, k, v, layout, q_index)
  rk = resolve_k(gaze.top_k, layout.max_regions, per_example=gaze.top_k_per_example)
  sel = route(q_route, cache.descriptors, layout.region_valid, layout.region_last_pos,
              plan.query.position, plan.routed, top_k=rk.k_max, active_k=active_k,
              score=gaze.score, routing=gaze.routing, k_ratio=rk.ratio)
  ids = sel.ids                                                             # [B, T, Hq, K]
  K = ids.shape[-1]
  # The heads that read their own blocks: each query head, or one per GQA group when the group
  # routes together (its heads select the same regions, as the in-device xla path gathers).
  grouped = gaze.routing == "group"
  Hs = 1 if grouped else G
  ids_s = ids.reshape(B, T, Hkv, G, K)[:, :, :, :Hs]                        # [B, T, Hkv, Hs, K]
  per_kv = ids_s.transpose(0, 2, 1, 3, 4).reshape(B, Hkv, T * Hs * K)
  U = union_size(layout.max_regions, G, K, gaze.routing, T)
  plan_one = lambda i, bi, bu: _plan_fetches(i, bi, bu, cache.step, U)
  slot, need, miss, slot_u, buf_ids, buf_used = jax.vmap(jax.vmap(plan_one))(
      per_kv, cache.buf_ids, cache.buf_used)
  buf_k, buf_v = _copy_misses(cache, need, miss, slot_u, layout)
  # The blocks of the selected regions, from the KV head's cache entries.
  slot = slot.reshape(B, Hkv, T, Hs, K).transpose(0, 2, 1, 3, 4)            # [B, T, Hkv, Hs, K]
  C = buf_ids.shape[-1]
  entry = (jnp.arange(B)[:, None, None, None, None] * Hkv
           + jnp.arange(Hkv)[:, None, None]) * C + slot
  dtype = cache.k_nv.dtype

  def blocks(buf):                       # rows [B*Hkv*C, R*D'] -> [B, T, Hkv, Hs, K*R, D]
    return _unpack(buf[entry], dtype, layout.region_size).reshape(B, T, Hkv, Hs, -1, D)

  kb, vb = blocks(buf_k), blocks(buf_v)
  mask_b = region_block_mask(layout, ids_s.reshape(B, T, Hkv * Hs, K), plan.query,
                             plan.routed).reshape(B, T, Hkv, Hs, -1)
  if grouped:                            # attend's per-KV-head form: kb, vb [B, T, Hkv, N, D]
    kb, vb = kb[:, :, :, 0], vb[:, :, :, 0]
  base = base_mask(plan.query, plan.key, plan.routed)                       # [B, T, N]
  out = attend(q.reshape(B, T, Hkv, G, D), k_nv, v_nv, base[:, :, None, None, :], kb, vb,
               mask_b, scale=1.0 / math.sqrt(D), grouped=grouped)
  new = dataclasses.replace(
      cache, k_nv=k_nv, v_nv=v_nv, buf_k=buf_k, buf_v=buf_v, buf_ids=buf_ids,
      buf_used=buf_used, step=cache.step + 1,
      fetched=cache.fetched + miss.reshape(B, -1).sum(1).astype(jnp.int32),
      needed=cache.needed + (need >= 0).reshape(B, -1).sum(1).astype(jnp.int32))
  return out.reshape(B, T, Hq, D).astype(q.dtype), ids, new

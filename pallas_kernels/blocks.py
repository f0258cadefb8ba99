"""Block lists for the gaze kernels, built once outside the kernels with plain jnp.

KV blocks. The S slots of a layout are cut into blocks of at most ``BK >= R`` slots (a power
of two for the Triton kernels, a multiple of 8 for Mosaic):
  * region blocks ``0 .. NR-1``: block r is region r, the ``R`` contiguous slots
    ``[region_first[r], region_first[r] + R)`` of the region-major storage (PAD slots of a
    non-divisible grid included, and masked);
  * chunk blocks: the text and context slots, as maximal runs of such slots cut into pieces of
    at most ``BK``; or, with ``group_context`` (the GPU kernels), runs of text slots only,
    followed by context groups: the context slots of consecutive frames gathered BK at a time
    (4 context tokens per frame would otherwise make one 4-row list entry per frame).
Trailing PAD slots belong to no block (they are never visible). A contiguous block is read as
one window of ``BK`` rows starting at ``window = min(start, S - BK)`` (never out of bounds, so
the same index math runs on the GPU, under ``interpret=True`` and under
``pltpu.InterpretParams``); its keys are the window rows ``[offset, offset + length)``.
``row_slot`` gives, for every block row, the slot it reads (-1 for none): the GPU kernels load
rows by it (a masked gather: PAD slots and rows outside the block move no bytes), the TPU
kernels DMA the window.

Per-key metadata (kind, position, frame of each block row; PAD where the row is not a key) is
stored block-major, ``[B, NB, BK]``, so that a kernel loads one row of it per block.

Block lists. For a tiling of the query rows into tiles of ``BQ`` tokens, ``tile_lists`` gives,
per (example, KV head, tile), the ids of the blocks the tile must read, packed at the front, and
their count (``lists[..., 0]`` is the count, ``lists[..., 1:]`` the ids). A block is listed when
some row of the tile may see one of its keys:
  * mode "base": keys visible without routing: dense rows (patch rows, unrouted text) see every
    earlier real key, context rows their own frame, routed text rows causal text and context;
  * mode "routed": the regions that some routed text row of the tile selected with some query
    head of the KV head's group (the union of the group's selections);
  * mode "full": both.
The lists are a superset test on per-tile summaries (largest positions, frame ranges); the
kernels apply the exact per-(row, head, key) mask of ``gaze_jax.gaze.reference`` on top.
Everything here is traced data: K, the active K and the selections are values, never shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from gaze_jax.gaze.layout import CTX, PAD, PATCH, TEXT, TokenLayout

BIG = 2 ** 30          # "no position": larger than any real position
MODES = ("base", "routed", "full")


def next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class KVBlocks:
  """The KV block partition of a batch (see the module docstring).

  table: int32 ``[B, NB, 4]``: (window start, offset in the window, length, region id or -1).
    A gathered context group has window 0, offset 0 and its number of slots as length.
  row_slot: int32 ``[B, NB, BK]``: the slot each block row reads (-1: none). For a window it
    is ``window + row`` inside the block; for a context group, the group's slots in order.
  key_kind, key_pos, key_frame: int32 ``[B, NB, BK]`` per block row (PAD / BIG / -1 where
    the row is not a key of the block, PAD slots of a non-divisible grid included).
  min_pos, max_pos: int32 ``[B, NB]`` smallest / largest position of a real key (BIG / -1
    when the block is empty).
  frame_lo, frame_hi: int32 ``[B, NB]`` frame range of its patch / context keys (BIG, -1 when
    it has none).
  Static: block_size BK, num_regions NR, kv_len (rows of the K/V arrays the windows index).
  """
  table: Any
  row_slot: Any
  key_kind: Any
  key_pos: Any
  key_frame: Any
  min_pos: Any
  max_pos: Any
  frame_lo: Any
  frame_hi: Any
  block_size: int
  num_regions: int
  kv_len: int

  @property
  def num_blocks(self) -> int:
    return self.table.shape[1]


jax.tree_util.register_dataclass(
    KVBlocks,
    data_fields=["table", "row_slot", "key_kind", "key_pos", "key_frame", "min_pos", "max_pos",
                 "frame_lo", "frame_hi"],
    meta_fields=["block_size", "num_regions", "kv_len"])


def num_chunk_blocks(layout: TokenLayout, block_size: int) -> int:
  """Static bound on the chunk blocks: runs of text/context slots are separated by frames (at
  most ``max_images + 1`` runs), each cut into ``ceil(len / BK)`` pieces."""
  return layout.spec.max_nonvisual // block_size + layout.spec.max_images + 2


def num_context_groups(layout: TokenLayout, block_size: int) -> int:
  """Static number of gathered context groups: ``ceil(max_images * num_ctx / BK)``."""
  return -(-layout.spec.max_images * layout.spec.num_ctx // block_size)


def _runs(selected, slot, BK, n):
  """Maximal runs of ``selected`` slots, cut every BK slots from each run's start: per piece
  (start, length), ``[B, n]`` each (zero for unused pieces)."""
  prev = jnp.pad(selected[:, :-1], ((0, 0), (1, 0)))
  run_start = jax.lax.cummax(jnp.where(selected & ~prev, slot, -1), axis=1)
  head = selected & ((slot - run_start) % BK == 0)
  cid = jnp.where(selected, jnp.cumsum(head, axis=1) - 1, n)            # n: dropped bucket
  seg_min = jax.vmap(lambda c: jax.ops.segment_min(slot, c, num_segments=n + 1))(cid)
  seg_len = jax.vmap(lambda c: jax.ops.segment_sum(jnp.ones_like(slot), c,
                                                   num_segments=n + 1))(cid)
  length = seg_len[:, :n].astype(jnp.int32)
  return jnp.where(length > 0, seg_min[:, :n], 0), length


def build_kv_blocks(layout: TokenLayout, block_size: int, *,
                    group_context: bool = False) -> KVBlocks:
  """KV blocks of ``layout`` for blocks of ``block_size`` rows.

  Args:
    layout: TokenLayout ``[B, S]``.
    block_size: BK ``>= region_size`` (a power of two for the Triton kernels).
    group_context: gather the context slots of consecutive frames into groups of BK rows
      (kernels that read rows by ``row_slot``, the GPU ones): one list entry per BK context
      slots instead of one per frame. Otherwise (the TPU kernels, which read contiguous
      windows) each frame's context slots are a chunk of their own.
  Returns:
    KVBlocks with ``NB = NR + num_chunk_blocks (+ num_context_groups)`` blocks and
    ``kv_len = max(S, BK)`` (the caller pads K/V to ``kv_len`` rows when ``S < BK``).
  """
  BK = int(block_size)
  R, NR, S = layout.region_size, layout.max_regions, layout.seq_len
  if BK < R:
    raise ValueError(f"block_size={BK} must be >= region_size={R}")
  B = layout.kind.shape[0]
  kv_len = max(S, BK)
  NC = num_chunk_blocks(layout, BK)
  kind = jnp.asarray(layout.kind)
  slot = jnp.arange(S, dtype=jnp.int32)
  row = jnp.arange(BK, dtype=jnp.int32)

  chunked = (kind == TEXT) if group_context else ((kind == TEXT) | (kind == CTX))
  c_start, c_len = _runs(chunked, slot, BK, NC)
  r_start = jnp.asarray(layout.region_first, jnp.int32)
  r_len = jnp.where(jnp.asarray(layout.region_valid), R, 0).astype(jnp.int32)
  start = jnp.concatenate([r_start, c_start], axis=1)                  # [B, NR + NC]
  length = jnp.concatenate([r_len, c_len], axis=1)
  window = jnp.maximum(jnp.minimum(start, kv_len - BK), 0)
  offset = start - window
  inside = (row >= offset[:, :, None]) & (row < (offset + length)[:, :, None])
  row_slot = jnp.where(inside, window[:, :, None] + row, -1)           # [B, NR + NC, BK]
  if group_context:
    NG = num_context_groups(layout, BK)
    is_ctx = kind == CTX
    ordinal = jnp.cumsum(is_ctx, axis=1, dtype=jnp.int32) - 1
    dest = jnp.where(is_ctx, ordinal, NG * BK)                         # NG * BK: dropped
    bi = jnp.arange(B)[:, None]
    g_slot = jnp.full((B, NG * BK + 1), -1, jnp.int32).at[bi, dest].set(
        jnp.broadcast_to(slot, (B, S)))[:, :NG * BK].reshape(B, NG, BK)
    g_len = jnp.sum(g_slot >= 0, axis=-1, dtype=jnp.int32)
    zeros = jnp.zeros((B, NG), jnp.int32)
    row_slot = jnp.concatenate([row_slot, g_slot], axis=1)
    window = jnp.concatenate([window, zeros], axis=1)
    offset = jnp.concatenate([offset, zeros], axis=1)
    length = jnp.concatenate([length, g_len], axis=1)
  NB = row_slot.shape[1]
  rid = jnp.concatenate([jnp.broadcast_to(jnp.arange(NR, dtype=jnp.int32), (B, NR)),
                         jnp.full((B, NB - NR), -1, jnp.int32)], axis=1)
  table = jnp.stack([window, offset, length, rid], axis=-1).astype(jnp.int32)

  flat = jnp.clip(row_slot, 0, S - 1).reshape(B, -1)
  take = lambda a: jnp.take_along_axis(jnp.asarray(a), flat, axis=1).reshape(row_slot.shape)
  key_kind = jnp.where(row_slot >= 0, take(layout.kind), PAD).astype(jnp.int32)
  real = key_kind != PAD
  row_slot = jnp.where(real, row_slot, -1).astype(jnp.int32)
  key_pos = jnp.where(real, take(layout.position), BIG).astype(jnp.int32)
  key_frame = jnp.where(real, take(layout.frame), -1).astype(jnp.int32)
  has_frame = real & (key_frame >= 0)
  return KVBlocks(
      table=table, row_slot=row_slot, key_kind=key_kind, key_pos=key_pos, key_frame=key_frame,
      min_pos=jnp.min(key_pos, axis=-1),
      max_pos=jnp.max(jnp.where(real, key_pos, -1), axis=-1),
      frame_lo=jnp.min(jnp.where(has_frame, key_frame, BIG), axis=-1),
      frame_hi=jnp.max(jnp.where(has_frame, key_frame, -1), axis=-1),
      block_size=BK, num_regions=NR, kv_len=kv_len)


@dataclasses.dataclass(frozen=True)
class RowInfo:
  """Per query row, ``[B, Tp]`` int32 each: kind (PAD for padding rows and rows left to another
  kernel), position, frame, routed (1 for a routed text row)."""
  kind: Any
  pos: Any
  frame: Any
  routed: Any


jax.tree_util.register_dataclass(RowInfo, data_fields=["kind", "pos", "frame", "routed"],
                                 meta_fields=[])


def _compact(vis: jax.Array, max_len: int, full: jax.Array | None = None) -> jax.Array:
  """bool ``[..., N]`` -> int32 ``[..., 1 + max_len]``: count, then the True indices in
  increasing order (zero padded), each written as ``-(index + 1)`` where ``full`` is True.
  Uses a cumsum scatter (no sort)."""
  *lead, N = vis.shape
  count = jnp.sum(vis, axis=-1, dtype=jnp.int32)
  dest = jnp.where(vis, jnp.cumsum(vis, axis=-1, dtype=jnp.int32), max_len + 1)
  flat_dest = dest.reshape(-1, N)
  rows = jnp.arange(flat_dest.shape[0])[:, None]
  ids = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), vis.shape)
  if full is not None:
    ids = jnp.where(full, -ids - 1, ids)
  out = jnp.zeros((flat_dest.shape[0], max_len + 2), jnp.int32)
  out = out.at[rows, flat_dest].set(ids.reshape(-1, N), mode="drop")[:, :max_len + 1]
  out = out.at[:, 0].set(count.reshape(-1))
  return out.reshape(*lead, max_len + 1)


def decode_entry(e):
  """A list entry -> (id, full): ``e >= 0`` is a partial block, ``-(id + 1)`` a full one."""
  full = e < 0
  return jnp.where(full, -e - 1, e), full


def visibility(blocks: KVBlocks, rows: RowInfo, ids: jax.Array | None, *, tile: int,
               num_kv_heads: int, mode: str) -> tuple[jax.Array, jax.Array]:
  """Which blocks each tile may need, and which of those are "full".

  A listed block is full when every real row of the tile sees every real key of the block
  (the kernels then skip the per-element mask: a row mask and a key mask suffice), e.g. a
  text chunk wholly before a tile of routed text rows, an earlier region for a tile of patch
  rows, or a region that every (row, head) of a routed tile selected (group routing in decode).

  Args:
    rows: RowInfo ``[B, Tp]`` with ``Tp`` a multiple of ``tile``.
    ids: int32 ``[B, Tp, Hq, K]`` selected regions (-1 none, no repeats within a (row, head)),
      needed unless mode is "base".
  Returns:
    bool ``(vis, full)``, each ``[B, Hl, NT, N]`` (module docstring); ``Hl = 1`` in "base"
    mode (no dependence on the KV head), else Hkv; ``N = NR`` in "routed" mode (regions only:
    their block ids are the region ids), else NB.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  B, Tp = rows.kind.shape
  if Tp % tile:
    raise ValueError(f"query rows Tp={Tp} must be a multiple of the tile {tile}")
  NT, NR, NB = Tp // tile, blocks.num_regions, blocks.num_blocks
  Hkv = num_kv_heads
  split = lambda a: a.reshape(B, NT, tile)
  kind, pos, frame, routed = (split(x) for x in (rows.kind, rows.pos, rows.frame, rows.routed))
  routed_row = (kind == TEXT) & (routed > 0)
  real_row = kind != PAD
  tmax = lambda sel, x: jnp.max(jnp.where(sel, x, -1), axis=-1)[:, :, None]     # [B, NT, 1]
  min_row_pos = jnp.min(jnp.where(real_row, pos, BIG), axis=-1)[:, :, None]
  is_region = (jnp.arange(NB) < NR)[None, None, :]
  min_pos = blocks.min_pos[:, None, :]                                  # [B, 1, NB]
  before = blocks.max_pos[:, None, :] <= min_row_pos                    # every key causal
  has_routed = jnp.any(routed_row, axis=-1)[:, :, None]
  vis = jnp.zeros((B, 1, NT, NB), bool)
  full = jnp.zeros((B, 1, NT, NB), bool)
  if mode in ("base", "full"):
    dense_row = (kind == PATCH) | ((kind == TEXT) & (routed == 0))
    ctx_row = kind == CTX
    dmax, rmax, cmax = tmax(dense_row, pos), tmax(routed_row, pos), tmax(ctx_row, pos)
    cf_lo = jnp.min(jnp.where(ctx_row, frame, BIG), axis=-1)[:, :, None]
    cf_hi = tmax(ctx_row, frame)
    overlap = ((blocks.frame_lo[:, None, :] <= cf_hi) & (cf_lo <= blocks.frame_hi[:, None, :]))
    base = ((dmax >= min_pos)                                     # dense rows: causal
            | (~is_region & (rmax >= min_pos))                    # routed rows: text / ctx keys
            | (overlap & (is_region | (cmax >= min_pos))))        # context rows: own frame
    base &= min_pos < BIG                                         # empty blocks never
    has_ctx = jnp.any(ctx_row, axis=-1)[:, :, None]
    # Dense and routed rows wholly after the block see all of it (routed rows: no patches).
    base_full = base & before & ~has_ctx & (~has_routed | ~is_region)
    vis |= base[:, None]
    full |= base_full[:, None]
  if mode in ("routed", "full"):
    if ids is None:
      raise ValueError(f"mode={mode!r} needs the selected region ids")
    Hq, K = ids.shape[2], ids.shape[3]
    G = Hq // Hkv
    ok = (ids >= 0) & (ids < NR) & routed_row.reshape(B, Tp)[:, :, None, None]
    sid = jnp.where(ok, ids, NR).reshape(B, NT, tile, Hkv, G, K)
    sid = jnp.moveaxis(sid, 3, 1).reshape(B, Hkv, NT, tile * G * K)
    bi = jnp.arange(B)[:, None, None, None]
    hi = jnp.arange(Hkv)[None, :, None, None]
    ti = jnp.arange(NT)[None, None, :, None]
    hits = jnp.zeros((B, Hkv, NT, NR + 1), jnp.int32).at[bi, hi, ti, sid].add(1)[..., :NR]
    sel = hits > 0
    # Full: every real row is routed and each of its G heads picked the region.
    all_routed = jnp.sum(routed_row, axis=-1) == jnp.sum(real_row, axis=-1)       # [B, NT]
    need = (jnp.sum(routed_row, axis=-1) * G)[:, None, :, None]
    sel_full = (sel & (hits == need) & all_routed[:, None, :, None]
                & before[:, :, :NR][:, None])
    if mode == "routed":
      return sel, sel_full
    pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, NB - NR)))
    vis = vis | pad(sel)
    # A region is full in "full" mode when its routed part is full (the base part then adds
    # nothing to it) or when the tile has no routed row and its base part is full.
    full = (full & ~pad(sel)) | pad(sel_full)
  return vis, full


def list_length(blocks: KVBlocks, *, mode: str, rows_per_tile: int, top_k: int) -> int:
  """Static bound on a tile's list length: in "routed" mode at most ``min(NR, rows * K)``
  regions (``rows`` = tokens x query heads of the group); otherwise NB (dense rows may need
  every block)."""
  if mode == "routed":
    return max(1, min(blocks.num_regions, rows_per_tile * top_k))
  return blocks.num_blocks


def tile_lists(blocks: KVBlocks, rows: RowInfo, ids: jax.Array | None, *, tile: int,
               num_kv_heads: int, mode: str, max_len: int | None = None,
               union_heads: bool = False) -> jax.Array:
  """Block lists: int32 ``[B, Hl, NT, 1 + L]``: the count, then the listed block ids in
  increasing order, full blocks written ``-(id + 1)`` (``decode_entry``); ``Hl`` as in
  ``visibility``, or 1 with ``union_heads`` (a block is listed when any KV head needs it, and
  full when it is full for every KV head: the TPU kernels, whose programs hold all KV heads).

  ``max_len`` (static L) defaults to the number of candidate blocks; a smaller bound must hold
  for every tile (see ``list_length``)."""
  vis, full = visibility(blocks, rows, ids, tile=tile, num_kv_heads=num_kv_heads, mode=mode)
  if union_heads and vis.shape[1] > 1:
    vis, full = jnp.any(vis, axis=1, keepdims=True), jnp.all(full, axis=1, keepdims=True)
  L = vis.shape[-1] if max_len is None else int(max_len)
  return _compact(vis, L, full)


def transpose_lists(lists: jax.Array, num_blocks: int) -> jax.Array:
  """Per block, the tiles that list it: int32 ``[B, Hl, num_blocks, 1 + NT]`` (count, tile
  ids, ``-(tile + 1)`` where the block is full for that tile) for the first ``num_blocks``
  blocks.

  Args:
    lists: ``[B, Hl, NT, 1 + L]`` from ``tile_lists``.
  """
  B, Hl, NT, L1 = lists.shape
  count = lists[..., :1]
  ids, full = decode_entry(lists[..., 1:])
  ids = jnp.where(jnp.arange(L1 - 1) < count, ids, num_blocks)
  bi = jnp.arange(B)[:, None, None, None]
  hi = jnp.arange(Hl)[None, :, None, None]
  ti = jnp.arange(NT)[None, None, :, None]
  # 1 = listed, 2 = listed and full.
  mark = jnp.zeros((B, Hl, NT, num_blocks + 1), jnp.int32).at[bi, hi, ti, ids].set(
      1 + full.astype(jnp.int32))[..., :num_blocks]
  mark = jnp.swapaxes(mark, 2, 3)
  return _compact(mark > 0, NT, mark == 2)


def bytes_read(lists: jax.Array, blocks: KVBlocks, *, head_dim: int, itemsize: int,
               num_kv_heads: int) -> jax.Array:
  """K and V bytes one pass reads (per example): the listed blocks' lengths (masked window rows
  are not read) times ``2 * head_dim * itemsize``, summed over KV heads and tiles (lists shared
  by the KV heads, ``Hl = 1``, count once per KV head)."""
  count = lists[..., 0]
  L = lists.shape[-1] - 1
  ids = decode_entry(lists[..., 1:])[0]
  length = blocks.table[..., 2]                                      # [B, NB]
  B = length.shape[0]
  ln = jnp.take_along_axis(length, ids.reshape(B, -1), axis=1).reshape(ids.shape)
  ln = jnp.where(jnp.arange(L) < count[..., None], ln, 0)
  per_head = num_kv_heads // lists.shape[1]
  return jnp.sum(ln, axis=(1, 2, 3)).astype(jnp.float32) * 2 * head_dim * itemsize * per_head


def union_fraction(lists: jax.Array, blocks: KVBlocks) -> jax.Array:
  """Regions listed per (example, KV head, tile) over the valid regions: float ``[B, Hkv, NT]``
  (the fraction ``u`` of the visual KV a decode step reads)."""
  NR = blocks.num_regions
  L = lists.shape[-1] - 1
  listed = (decode_entry(lists[..., 1:])[0] < NR) & (jnp.arange(L) < lists[..., :1])
  n_valid = jnp.sum(blocks.table[:, :NR, 2] > 0, axis=1)[:, None, None]
  return jnp.sum(listed, axis=-1) / jnp.maximum(n_valid, 1)


def row_info(layout: TokenLayout, q_index: jax.Array, routed: jax.Array,
             keep: jax.Array | None = None) -> RowInfo:
  """RowInfo of the query slots ``q_index`` (int32 ``[B, T]``, -1 = padding row); rows where
  ``keep`` is False read as PAD (they are computed elsewhere)."""
  ok = q_index >= 0
  idx = jnp.clip(q_index, 0, layout.seq_len - 1)
  take = lambda a: jnp.take_along_axis(jnp.asarray(a), idx, axis=1)
  if keep is not None:
    ok &= keep
  kind = jnp.where(ok, take(layout.kind), PAD)
  return RowInfo(kind=kind.astype(jnp.int32), pos=take(layout.position).astype(jnp.int32),
                 frame=jnp.where(ok, take(layout.frame), -1).astype(jnp.int32),
                 routed=(ok & routed).astype(jnp.int32))


def pad_rows(rows: RowInfo, total: int) -> RowInfo:
  """Appends PAD rows up to ``total`` rows."""
  T = rows.kind.shape[1]
  if total == T:
    return rows
  pad = lambda a, v: jnp.pad(a, ((0, 0), (0, total - T)), constant_values=v)
  return RowInfo(kind=pad(rows.kind, PAD), pos=pad(rows.pos, 0), frame=pad(rows.frame, -1),
                 routed=pad(rows.routed, 0))


def ceil_to(n: int, m: int) -> int:
  return -(-int(n) // int(m)) * int(m)


__all__ = ["BIG", "MODES", "KVBlocks", "RowInfo", "build_kv_blocks", "bytes_read", "ceil_to",
           "decode_entry",
           "list_length", "next_pow2", "num_chunk_blocks", "num_context_groups", "pad_rows", "row_info",
           "tile_lists", "transpose_lists", "union_fraction", "visibility"]

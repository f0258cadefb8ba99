"""Block tables and block lists against independent numpy constructions and the reference mask."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaze_jax.gaze import (CTX, PAD, TEXT, Image, LayoutSpec, Selection, Text, Video,
                           build_layout, gaze_mask, routed_rows, token_info)
from pallas_kernels import blocks as blk
from tests.gaze.random_cases import random_case
from tests.kernels.helpers import run


def _np_blocks(layout, BK):
  """Per example, the set of (start, length, region) blocks, built by walking the slots."""
  kind = np.asarray(layout.kind)
  out = []
  for b in range(kind.shape[0]):
    s = set()
    for r in np.flatnonzero(np.asarray(layout.region_valid[b])):
      s.add((int(layout.region_first[b, r]), layout.region_size, int(r)))
    start, n, prev = None, 0, False
    for i, kd in enumerate(kind[b]):
      nv = kd in (TEXT, CTX)
      if nv and (not prev or n == BK):
        if start is not None:
          s.add((start, n, -1))
        start, n = i, 0
      if nv:
        n += 1
      elif prev:
        s.add((start, n, -1))
        start = None
      prev = nv
    if start is not None:
      s.add((start, n, -1))
    out.append(s)
  return out


@functools.partial(jax.jit, static_argnums=(1, 2))
def _build(lay, BK, group_context=False):
  return blk.build_kv_blocks(lay, BK, group_context=group_context)


@functools.partial(jax.jit, static_argnames=("tile", "num_kv_heads", "mode"))
def _lists(blocks, rows, ids, *, tile, num_kv_heads, mode):
  return blk.tile_lists(blocks, rows, ids, tile=tile, num_kv_heads=num_kv_heads, mode=mode)


@functools.partial(jax.jit, static_argnums=2)
def _masks(lay, ids, route_prompt):
  B, S = lay.kind.shape
  query = token_info(lay, jnp.broadcast_to(jnp.arange(S), (B, S)))
  routed = routed_rows(query, route_prompt)
  full = gaze_mask(lay, query, routed, Selection(ids))
  base = gaze_mask(lay, query, routed, Selection(jnp.full_like(ids, -1)))
  return full, base, routed


def _table(blocks):
  t = np.asarray(blocks.table)
  return t[..., 0], t[..., 1], t[..., 2], t[..., 3]


@pytest.mark.parametrize("seed", range(5))
def test_kv_blocks_partition_the_real_slots(seed):
  # Seed 4: images with newline rows (text slots stored after the regions).
  case = random_case(seed, force_video=seed % 2 == 1, newline_rows=seed == 4)
  lay = case.layout
  R = lay.region_size
  for BK in (blk.next_pow2(max(R, 2)), 2 * blk.next_pow2(max(R, 2)), blk.ceil_to(R, 8)):
    blocks = _build(lay, BK)
    ws, off, ln, rid = _table(blocks)
    want = _np_blocks(lay, BK)
    S = lay.seq_len
    for b in range(lay.kind.shape[0]):
      got = {(int(w + o), int(n), int(r)) for w, o, n, r in zip(ws[b], off[b], ln[b], rid[b])
             if n > 0}
      assert got == want[b]
    # Windows stay inside the (padded) K/V rows and hold the block.
    assert (ws >= 0).all() and (ws + BK <= max(S, BK)).all()
    assert (off >= 0).all() and (off + ln <= BK).all()
    # Key fields: the layout's fields on the block's rows, PAD elsewhere.
    kk, kp = np.asarray(blocks.key_kind), np.asarray(blocks.key_pos)
    kind, pos = np.asarray(lay.kind), np.asarray(lay.position)
    for b in range(kind.shape[0]):
      for j in range(blocks.num_blocks):
        rows = np.arange(BK)
        inside = (rows >= off[b, j]) & (rows < off[b, j] + ln[b, j])
        slots = np.clip(ws[b, j] + rows, 0, S - 1)
        np.testing.assert_array_equal(kk[b, j], np.where(inside, kind[b, slots], PAD))
        real = kk[b, j] != PAD
        np.testing.assert_array_equal(kp[b, j][real], pos[b, slots][real])


@pytest.mark.parametrize("seed", range(4))
def test_row_slots_hold_every_real_slot_once_and_context_groups_gather_frames(seed):
  """With ``group_context`` (the GPU kernels) every real slot is read by exactly one block row
  (``row_slot``), text runs and regions stay contiguous windows, and the context slots of
  consecutive frames fill groups of BK rows in slot order; key fields follow the slots."""
  case = random_case(seed, force_video=True)
  lay = case.layout
  R, NR = lay.region_size, lay.max_regions
  kind, pos, frame = (np.asarray(a) for a in (lay.kind, lay.position, lay.frame))
  for BK in (blk.next_pow2(max(R, 4)), 2 * blk.next_pow2(max(R, 4))):
    blocks = _build(lay, BK, True)
    rs = np.asarray(blocks.row_slot)
    kk, kp, kf = (np.asarray(a) for a in (blocks.key_kind, blocks.key_pos, blocks.key_frame))
    NG = blk.num_context_groups(lay, BK)
    assert blocks.num_blocks == NR + blk.num_chunk_blocks(lay, BK) + NG
    for b in range(kind.shape[0]):
      used = rs[b][rs[b] >= 0]
      np.testing.assert_array_equal(np.sort(used), np.flatnonzero(kind[b] != PAD))
      real = rs[b] >= 0
      np.testing.assert_array_equal(kk[b][real], kind[b][rs[b][real]])
      np.testing.assert_array_equal(kp[b][real], pos[b][rs[b][real]])
      np.testing.assert_array_equal(kf[b][real], frame[b][rs[b][real]])
      assert (kk[b][~real] == PAD).all()
      first_group = blocks.num_blocks - NG
      groups, others = rs[b, first_group:], rs[b, :first_group]
      ctx = np.flatnonzero(kind[b] == CTX)
      np.testing.assert_array_equal(groups[groups >= 0], ctx)            # slot order, packed
      assert (kind[b][others[others >= 0]] != CTX).all()                 # no context elsewhere
      for j in range(NR + blk.num_chunk_blocks(lay, BK)):                # contiguous windows
        r = rs[b, j][rs[b, j] >= 0]
        if len(r) and j >= NR:
          np.testing.assert_array_equal(r, np.arange(r[0], r[0] + len(r)))


def test_block_size_smaller_than_a_region_is_rejected():
  spec = LayoutSpec(seq_len=40, max_regions=4, max_images=1, region_shape=(3, 3), num_ctx=1)
  lay = build_layout([[Text(2), Image(6, 6), Text(1)]], spec)
  with pytest.raises(ValueError, match="block_size=8 must be >= region_size=9"):
    blk.build_kv_blocks(lay, 8)


def test_compact_packs_true_indices_at_the_front():
  rng = np.random.default_rng(0)
  vis = rng.random((3, 2, 17)) < 0.3
  out = np.asarray(blk._compact(jnp.asarray(vis), 17))
  for idx in np.ndindex(vis.shape[:-1]):
    ids = np.flatnonzero(vis[idx])
    assert out[idx][0] == len(ids)
    np.testing.assert_array_equal(out[idx][1:1 + len(ids)], ids)


def _needed(lay, ids, route_prompt, BK, tile, Hkv, which, group_context=False):
  """bool [B, Hkv, NT, NB] from the reference mask: blocks with a visible key per tile."""
  B, S = lay.kind.shape
  full, base, routed = _masks(lay, ids, route_prompt)                        # [B, T, Hq, S]
  full, base = np.asarray(full), np.asarray(base)
  mask = {"full": full, "base": base, "routed": full & ~base}[which]
  blocks = _build(lay, BK, group_context)
  row_slot = np.asarray(blocks.row_slot)
  T, Hq = mask.shape[1], mask.shape[2]
  NT = -(-T // tile)
  G = Hq // Hkv
  kind = np.asarray(lay.kind)
  real_row = np.pad(kind != PAD, ((0, 0), (0, NT * tile - T))).reshape(B, NT, tile)
  need = np.zeros((B, Hkv, NT, blocks.num_blocks), bool)
  whole = np.zeros_like(need)      # every real row (all heads) sees every real key
  for b in range(B):
    for j in range(blocks.num_blocks):
      sl = row_slot[b, j][row_slot[b, j] >= 0]                            # the block's keys
      if not len(sl):
        continue
      m = mask[b][:, :, sl]                                               # [T, Hq, keys]
      m = np.pad(m, ((0, NT * tile - T), (0, 0), (0, 0))).reshape(NT, tile, Hkv, G, -1)
      need[b, :, :, j] = m.any(axis=(1, 3, 4)).T
      seen = m.all(axis=(3, 4)) | ~real_row[b][:, :, None]                # [NT, tile, Hkv]
      whole[b, :, :, j] = (seen.all(axis=1) & real_row[b].any(axis=1)[:, None]).T
  return need, whole & need, blocks, routed


def _listed(lists, NB, full=False):
  """bool [B, Hl, NT, NB]: listed blocks (with ``full``: listed as full, entry -(id + 1))."""
  lists = np.asarray(lists)
  out = np.zeros(lists.shape[:3] + (NB,), bool)
  for idx in np.ndindex(lists.shape[:3]):
    e = lists[idx][1:1 + lists[idx][0]]
    ids = np.where(e < 0, -e - 1, e)
    out[idx][ids[e < 0] if full else ids] = True
  return out


@pytest.mark.parametrize("seed", range(5))
def test_tile_lists_cover_every_visible_key_and_routed_lists_are_exact(seed):
  group_context = seed % 2 == 1
  # Seed 4: images with newline rows.
  case = random_case(10 + seed, group=[1, 2, 4, 8, 2][seed],
                     routing=["head", "group"][seed % 2], force_video=group_context,
                     newline_rows=seed == 4)
  lay = case.layout
  _, ids, _ = run(case, grads=False)
  Hkv = case.k.shape[2]
  BK = blk.next_pow2(max(16, lay.region_size))
  B, S = lay.kind.shape
  n_full = 0
  for which, tile in (("base", 8), ("routed", 1), ("full", 4)):
    need, whole, blocks, routed = _needed(lay, ids, case.route_prompt, BK, tile, Hkv, which,
                                          group_context)
    NT = need.shape[2]
    rows = blk.pad_rows(blk.row_info(lay, jnp.broadcast_to(jnp.arange(S), (B, S)), routed),
                        NT * tile)
    ids_t = jnp.pad(ids, ((0, 0), (0, NT * tile - S), (0, 0), (0, 0)), constant_values=-1)
    lists = _lists(blocks, rows, ids_t, tile=tile, num_kv_heads=Hkv, mode=which)
    listed = _listed(lists, blocks.num_blocks)
    assert (listed | ~need).all(), f"{which}: a needed block is missing"
    assert need.any()
    # A block flagged full is seen whole by every real row and head of the tile.
    full = _listed(lists, blocks.num_blocks, full=True)
    assert (whole | ~full).all(), f"{which}: a block is flagged full but is not"
    n_full += full.sum()
    if which == "routed":
      # Exactly the union of the selections of the tile's routed rows and the group's heads.
      np.testing.assert_array_equal(listed, need)
  assert n_full > 0


def test_decode_list_is_the_group_union_plus_visible_text_and_context_chunks():
  case = random_case(21, group=4, routing="head")
  lay = case.layout
  slots = np.stack([np.flatnonzero(np.asarray(lay.kind[b]) == TEXT)[-1:] for b in range(2)])
  _, ids, _ = run(case, grads=False)
  ids = np.take_along_axis(np.asarray(ids), slots[:, :, None, None], axis=1)   # [B, 1, Hq, K]
  qi = jnp.asarray(slots, jnp.int32)
  routed = routed_rows(token_info(lay, qi), True)
  blocks = _build(lay, 16)
  rows = blk.row_info(lay, qi, routed)
  lists = _lists(blocks, rows, jnp.asarray(ids), tile=1, num_kv_heads=2, mode="full")
  listed = _listed(lists, blocks.num_blocks)
  full = _listed(lists, blocks.num_blocks, full=True)
  NR = lay.max_regions
  pos = np.asarray(lay.position)
  for b in range(2):
    for h in range(2):
      union = set(ids[b, 0, 4 * h:4 * h + 4].ravel().tolist()) - {-1}
      assert set(np.flatnonzero(listed[b, h, 0, :NR]).tolist()) == union
      # Full: the regions all 4 heads of the group picked.
      common = set.intersection(*(set(ids[b, 0, g].tolist()) for g in range(4 * h, 4 * h + 4)))
      assert set(np.flatnonzero(full[b, h, 0, :NR]).tolist()) == common - {-1}
      # Chunk blocks: those holding a text / context key at or before the query position.
      ws, off, ln, _ = _table(blocks)
      want = set()
      for j in range(NR, blocks.num_blocks):
        if ln[b, j] and pos[b, ws[b, j] + off[b, j]] <= pos[b, slots[b, 0]]:
          want.add(j)
      assert set(np.flatnonzero(listed[b, h, 0, NR:]).tolist()) == {j - NR for j in want}


def test_transposed_lists_invert_the_tile_lists():
  rng = np.random.default_rng(3)
  vis = rng.random((2, 3, 5, 11)) < 0.4
  full = vis & (rng.random(vis.shape) < 0.5)
  lists = blk._compact(jnp.asarray(vis), 11, jnp.asarray(full))
  t = np.asarray(blk.transpose_lists(lists, 11))
  np.testing.assert_array_equal(_listed(t, 5), np.swapaxes(vis, 2, 3))
  np.testing.assert_array_equal(_listed(t, 5, full=True), np.swapaxes(full, 2, 3))


def test_union_fraction_and_bytes_read_count_listed_regions():
  spec = LayoutSpec(seq_len=64, max_regions=8, max_images=2, region_shape=(2, 2), num_ctx=1,
                    max_nonvisual=16)
  lay = build_layout([[Text(3), Video(2, 4, 4), Text(4)]], spec)
  blocks = blk.build_kv_blocks(lay, 4)
  NR = 8
  # One tile listing regions {1, 5, 6} and the first chunk block.
  lists = jnp.asarray([[[[4, 1, 5, 6, NR] + [0] * (blocks.num_blocks - 4)]]], jnp.int32)
  np.testing.assert_allclose(blk.union_fraction(lists, blocks), [[[3 / 8]]])
  chunk_len = int(blocks.table[0, NR, 2])
  assert chunk_len == 3                                        # the 3 leading text tokens
  got = float(blk.bytes_read(lists, blocks, head_dim=8, itemsize=2, num_kv_heads=3)[0])
  assert got == (3 * 4 + chunk_len) * 2 * 8 * 2 * 3      # lists shared by the 3 KV heads


def test_selection_bitmasks_and_id_compare_agree_with_membership():
  from pallas_kernels.common import hit_from_bits, hit_from_ids, selection_bits
  rng = np.random.default_rng(4)
  NR, M, K = 70, 6, 9                                      # 3 words, bits 31 and 63 included
  ids = np.stack([rng.choice(NR, K, replace=False) for _ in range(M)]).astype(np.int32)
  ids[0, :2] = (31, 63)
  ids[1, 3:] = -1
  bits = selection_bits(jnp.asarray(ids), NR)
  assert bits.shape == (M, 3)
  by_bits = hit_from_bits(lambda w: bits[:, w])
  by_ids = hit_from_ids(jnp.asarray(ids))
  for r in range(NR):
    want = (ids == r).any(axis=1)[:, None]
    np.testing.assert_array_equal(by_bits(jnp.int32(r)), want)
    np.testing.assert_array_equal(by_ids(jnp.int32(r)), want)

"""Block-sparse gaze attention kernels in generic Pallas (lower through Triton on the GPU; run on
CPU with ``interpret=True``).

Packed operands (built by ``pallas_kernels.ops``):
  q: ``[B, Hkv, Tp*Gp, D]``: the query heads of a GQA group sit together in the rows, row
    ``t * Gp + g`` is token t, head g of the group (Gp = the group size rounded up to a power of
    two; the extra rows are PAD). A tile is ``M`` consecutive rows (``M / Gp`` tokens).
  rows: four int32 ``[B, Tp*Gp]`` arrays (kind, position, frame, routed) per packed row.
  sel: int32 ``[B, Hkv, Tp*Gp, W]`` selection bitmasks per packed row (``W = ceil(NR / 32)``;
    bit ``r % 32`` of word ``r // 32`` set when the row's head selected region r): the hit test
    of a block is one column load, whatever K is.
  k, v: ``[B, S, Hkv, D]`` in the layout's slot order (region-major visual KV).
  blocks: ``pallas_kernels.blocks.KVBlocks`` built with ``group_context=True``: per block,
    the slot of each of its BK rows (``row_slot``) and the rows' key fields.
  lists: int32 ``[B, Hl, NT, 1 + L]`` per tile: count, then block ids (Hl = 1 when the lists do
    not depend on the KV head, as in "base" mode); ``-(id + 1)`` marks a full block, for which
    the mask is a row mask x key mask (``lax.cond`` skips the per-element rules).

Kernels:
  ``forward``: grid ``(B, Hkv, NT, splits)``. Program (b, h, i, s) holds the tile's q rows
    ``[M, D]`` and walks its share ``[s*c, min((s+1)*c, count))`` of the tile's list,
    ``c = ceil(count / splits)`` (flash-decoding split-K when ``splits > 1``; the count is data,
    so the share is computed in the kernel). Per listed block it gathers the block's BK rows
    of K and V by ``row_slot`` with a masked load: only the block's real keys move (a 36-token
    region in a 64-row block reads 36 rows; PAD slots of a non-divisible grid and context
    groups' empty rows read nothing and are zero in the products), loads the key fields,
    applies the exact gaze mask and updates an online softmax. It writes a normalised output
    and the log-sum-exp per split; a decode tile writes only its real rows.
  ``backward_dq``: grid ``(B, Hkv, NT)``, the same walk, accumulating dq.
  ``backward_dkv``: grid ``(B, Hkv, NB)``: program (b, h, j) holds block j's K/V rows and walks
    the tiles that list block j (the transposed lists) in pieces of 16 rows, accumulating dk
    and dv over the group's heads; it scatters only the block's own rows (every slot belongs
    to one block), so programs never race.
Cost of the non-power-of-two regions: a region of R slots occupies a block of BK = next_pow2(R)
rows (64 for R = 36). The masked load reads only R rows from memory, but the tile matmuls run
over all BK rows: R / BK of the MMA work is useful (56% for 36 / 64), which matters in the
compute-bound prefill and not in the memory-bound decode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from gaze_jax.gaze.layout import PAD
from pallas_kernels.blocks import decode_entry
from pallas_kernels.common import NEG, dot_nn, dot_nt, dot_tn, hit_from_bits, row_masker


def _compiler_params(num_warps, num_stages):
  # Always Triton params: without them jax >= 0.10 may lower pallas_call through Mosaic GPU.
  return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def precision(dtype, interpret) -> object:
  """Matmul precision of the kernels. bf16 / f16: native tensor-core products (None). float32:
  TF32x3 when compiled (three TF32 tensor-core products, ~float32 accuracy; plain float32
  ``Precision.HIGHEST`` lowers to scalar FMAs and spills), ``HIGHEST`` in interpret mode (the
  CPU has no TF32 algorithm)."""
  if jnp.dtype(dtype) != jnp.float32:
    return None
  if interpret:
    return jax.lax.Precision.HIGHEST
  return jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def _rows_of(slot_ref, kkind_ref, blk, D, S):
  """Block ``blk``'s row gather: the indices ``([BK, 1] slots, [1, D] columns)`` it reads and
  the ``[BK, D]`` mask of real keys (rows outside the block and PAD slots move no bytes).
  Masked rows point one past the last slot: never dereferenced on the GPU, and dropped (not
  written twice to one slot) by interpret mode's scatter."""
  real = kkind_ref[blk, :] != PAD
  rows = jnp.where(real, slot_ref[blk, :], S)[:, None]
  cols = jax.lax.broadcasted_iota(jnp.int32, (1, D), 1)
  return (rows, cols), jnp.broadcast_to(real[:, None], (real.shape[0], D))


def _load_block(tab_ref, slot_ref, kkind_ref, kpos_ref, kframe_ref, k_ref, v_ref, blk):
  """Block ``blk``: K/V rows ``[BK, D]`` gathered by ``row_slot`` (zero where not a key), its
  key fields ``[BK]``, the row gather (for a store) and mask, and the region id."""
  S, D = k_ref.shape
  idx, m2 = _rows_of(slot_ref, kkind_ref, blk, D, S)
  k = plt.load(k_ref.at[idx], mask=m2, other=0.0)
  v = plt.load(v_ref.at[idx], mask=m2, other=0.0)
  keys = (kkind_ref[blk, :], kpos_ref[blk, :], kframe_ref[blk, :])
  return k, v, keys, idx, m2, tab_ref[blk, 3]


def _fwd_kernel(lists_ref, tab_ref, slot_ref, kkind_ref, kpos_ref, kframe_ref, rkind_ref,
                rpos_ref, rframe_ref, rrouted_ref, sel_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                *, mode, scale, splits, prec):
  count = lists_ref[0]
  per = (count + splits - 1) // splits
  lo = pl.program_id(3) * per
  hi = jnp.minimum(lo + per, count)
  q = q_ref[...]
  M, D = q.shape
  mask = row_masker(mode, rkind_ref[...], rpos_ref[...], rframe_ref[...], rrouted_ref[...],
                    hit_from_bits(lambda w: sel_ref[:, w]))

  def body(j, carry):
    m, l, acc = carry
    blk, full = decode_entry(lists_ref[1 + j])
    k, v, keys, _, _, rid = _load_block(tab_ref, slot_ref, kkind_ref, kpos_ref, kframe_ref,
                                        k_ref, v_ref, blk)
    vis = mask(*keys, rid, full)
    s = dot_nt(q, k, prec) * scale
    m_new = jnp.maximum(m, jnp.max(jnp.where(vis, s, NEG), axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(vis, jnp.exp(s - m_new[:, None]), 0.0)
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot_nn(p.astype(v.dtype), v, prec)
    return m_new, l, acc

  init = (jnp.full((M,), NEG, jnp.float32), jnp.zeros((M,), jnp.float32),
          jnp.zeros((M, D), jnp.float32))
  m, l, acc = jax.lax.fori_loop(lo, hi, body, init)
  seen = l > 0
  o_ref[...] = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None],
                         0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NEG)


def _common_specs(NB, BK, lists_heads, L1, M, W, D, S):
  """BlockSpecs of the operands shared by the forward and dq kernels (grid (b, h, i, ...))."""
  lh = (lambda h: h) if lists_heads > 1 else (lambda h: 0)
  return [
      pl.BlockSpec((None, None, None, L1), lambda b, h, i, *_: (b, lh(h), i, 0)),
      pl.BlockSpec((None, NB, 4), lambda b, h, i, *_: (b, 0, 0)),
      pl.BlockSpec((None, NB, BK), lambda b, h, i, *_: (b, 0, 0)),
      pl.BlockSpec((None, NB, BK), lambda b, h, i, *_: (b, 0, 0)),
      pl.BlockSpec((None, NB, BK), lambda b, h, i, *_: (b, 0, 0)),
      pl.BlockSpec((None, NB, BK), lambda b, h, i, *_: (b, 0, 0)),
      pl.BlockSpec((None, M), lambda b, h, i, *_: (b, i)),
      pl.BlockSpec((None, M), lambda b, h, i, *_: (b, i)),
      pl.BlockSpec((None, M), lambda b, h, i, *_: (b, i)),
      pl.BlockSpec((None, M), lambda b, h, i, *_: (b, i)),
      pl.BlockSpec((None, None, M, W), lambda b, h, i, *_: (b, h, i, 0)),
      pl.BlockSpec((None, None, M, D), lambda b, h, i, *_: (b, h, i, 0)),
      pl.BlockSpec((None, S, None, D), lambda b, h, i, *_: (b, 0, h, 0)),
      pl.BlockSpec((None, S, None, D), lambda b, h, i, *_: (b, 0, h, 0)),
  ]


@functools.partial(jax.jit, static_argnames=("mode", "tile_rows", "splits", "scale",
                                             "interpret", "num_warps", "num_stages", "out_rows"))
def forward(q, k, v, rows, sel, blocks, lists, *, mode, tile_rows, splits, scale,
            interpret=False, num_warps=None, num_stages=None, out_rows=None):
  """One pass of block-sparse attention.

  Args: packed operands (module docstring); ``rows`` a RowInfo of ``[B, Tp*Gp]`` arrays.
    ``out_rows``: write only the first rows (default all ``Tp*Gp``): a decode tile pads its
    real rows up to the 16 that ``tl.dot`` needs, and only the real ones go to memory.
  Returns:
    o float32 ``[B, Hkv, splits, out_rows, D]`` (normalised per split) and lse float32
    ``[B, Hkv, splits, out_rows]`` (NEG where a split saw no key).
  """
  B, Hkv, TG, D = q.shape
  R = TG if out_rows is None else int(out_rows)
  M = tile_rows
  NT = TG // M
  S = k.shape[1]
  NB, BK = blocks.num_blocks, blocks.block_size
  W = sel.shape[-1]
  L1 = lists.shape[-1]
  kernel = functools.partial(_fwd_kernel, mode=mode, scale=scale, splits=splits,
                             prec=precision(q.dtype, interpret))
  in_specs = _common_specs(NB, BK, lists.shape[1], L1, M, W, D, S)
  # Blocks past R rows are masked by Pallas (no memory traffic for them).
  out_shape = (jax.ShapeDtypeStruct((B, Hkv, splits, R, D), jnp.float32),
               jax.ShapeDtypeStruct((B, Hkv, splits, R), jnp.float32))
  out_specs = (pl.BlockSpec((None, None, None, M, D), lambda b, h, i, s: (b, h, s, i, 0)),
               pl.BlockSpec((None, None, None, M), lambda b, h, i, s: (b, h, s, i)))
  return pl.pallas_call(
      kernel, grid=(B, Hkv, NT, splits), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=interpret,
      compiler_params=_compiler_params(num_warps, num_stages),
      name=f"gaze_fwd_{mode}",
  )(lists, blocks.table, blocks.row_slot, blocks.key_kind, blocks.key_pos,
    blocks.key_frame, rows.kind, rows.pos, rows.frame, rows.routed, sel, q, k, v)


def _dq_kernel(lists_ref, tab_ref, slot_ref, kkind_ref, kpos_ref, kframe_ref, rkind_ref,
               rpos_ref, rframe_ref, rrouted_ref, sel_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, mode, scale, prec):
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  mask = row_masker(mode, rkind_ref[...], rpos_ref[...], rframe_ref[...], rrouted_ref[...],
                    hit_from_bits(lambda w: sel_ref[:, w]))

  def body(j, dq):
    blk, full = decode_entry(lists_ref[1 + j])
    k, v, keys, _, _, rid = _load_block(tab_ref, slot_ref, kkind_ref, kpos_ref, kframe_ref,
                                        k_ref, v_ref, blk)
    vis = mask(*keys, rid, full)
    s = dot_nt(q, k, prec) * scale
    p = jnp.where(vis, jnp.exp(s - lse[:, None]), 0.0)
    dp = dot_nt(do, v, prec)
    ds = p * (dp - delta[:, None])
    return dq + dot_nn(ds.astype(k.dtype), k, prec)

  dq = jax.lax.fori_loop(0, lists_ref[0], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


@functools.partial(jax.jit, static_argnames=("mode", "tile_rows", "scale", "interpret",
                                             "num_warps", "num_stages"))
def backward_dq(q, k, v, rows, sel, blocks, lists, do, lse, delta, *, mode, tile_rows, scale,
                interpret=False, num_warps=None, num_stages=None):
  """dq of one pass: float32 ``[B, Hkv, Tp*Gp, D]``. ``do`` is packed like q; lse and delta
  (``sum(o * do, -1)``) are float32 ``[B, Hkv, Tp*Gp]`` of the whole attention (all passes)."""
  B, Hkv, TG, D = q.shape
  M = tile_rows
  NT = TG // M
  S = k.shape[1]
  NB, BK = blocks.num_blocks, blocks.block_size
  in_specs = _common_specs(NB, BK, lists.shape[1], lists.shape[-1], M, sel.shape[-1], D, S)
  in_specs += [pl.BlockSpec((None, None, M, D), lambda b, h, i: (b, h, i, 0)),
               pl.BlockSpec((None, None, M), lambda b, h, i: (b, h, i)),
               pl.BlockSpec((None, None, M), lambda b, h, i: (b, h, i))]
  kernel = functools.partial(_dq_kernel, mode=mode, scale=scale,
                             prec=precision(q.dtype, interpret))
  return pl.pallas_call(
      kernel, grid=(B, Hkv, NT), in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, M, D), lambda b, h, i: (b, h, i, 0)),
      out_shape=jax.ShapeDtypeStruct((B, Hkv, TG, D), jnp.float32), interpret=interpret,
      compiler_params=_compiler_params(num_warps, num_stages),
      name=f"gaze_bwd_dq_{mode}",
  )(lists, blocks.table, blocks.row_slot, blocks.key_kind, blocks.key_pos,
    blocks.key_frame, rows.kind, rows.pos, rows.frame, rows.routed, sel, q, k, v, do, lse, delta)


def _dkv_kernel(tlists_ref, tab_ref, slot_ref, kkind_ref, kpos_ref, kframe_ref, rkind_ref,
                rpos_ref, rframe_ref, rrouted_ref, sel_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, dk0_ref, dv0_ref, dk_ref, dv_ref, *, mode, scale, tile_rows,
                sub_rows, prec):
  del dk0_ref, dv0_ref  # aliased to dk_ref, dv_ref: the zeros of the rows no block stores
  blk = pl.program_id(2)
  k, v, keys, _, _, rid = _load_block(tab_ref, slot_ref, kkind_ref, kpos_ref, kframe_ref,
                                      k_ref, v_ref, blk)
  # A listed tile of M rows is walked in pieces of ``sub_rows``: the [rows, BK] logits, mask
  # and gradients then stay small enough to keep dk and dv in registers (no spills).
  parts = tile_rows // sub_rows

  def body(j, carry):
    dk, dv = carry
    # lax.div / lax.rem: j >= 0, and jnp's floor-division wrapper does not lower to Triton.
    entry, part = (j, 0) if parts == 1 else (jax.lax.div(j, parts), jax.lax.rem(j, parts))
    tile, full = decode_entry(tlists_ref[1 + entry])
    rs = pl.ds(tile * tile_rows + part * sub_rows, sub_rows)
    q = q_ref[rs, :]
    do = do_ref[rs, :]
    vis = row_masker(mode, rkind_ref[rs], rpos_ref[rs], rframe_ref[rs], rrouted_ref[rs],
                     hit_from_bits(lambda w: sel_ref[rs, w]))(*keys, rid, full)
    s = dot_nt(q, k, prec) * scale
    p = jnp.where(vis, jnp.exp(s - lse_ref[rs][:, None]), 0.0)
    dp = dot_nt(do, v, prec)
    ds = p * (dp - delta_ref[rs][:, None])
    dv = dv + dot_tn(p.astype(do.dtype), do, prec)
    dk = dk + dot_tn(ds.astype(q.dtype), q, prec)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, tlists_ref[0] * parts, body, (zeros, zeros))
  # Scatter to the block's own slots (every slot is in one block, so programs never race);
  # the row gather is rebuilt here rather than kept live through the loop.
  S, D = k_ref.shape
  idx, m2 = _rows_of(slot_ref, kkind_ref, blk, D, S)
  plt.store(dk_ref.at[idx], (dk * scale).astype(dk_ref.dtype), mask=m2)
  plt.store(dv_ref.at[idx], dv.astype(dv_ref.dtype), mask=m2)


@functools.partial(jax.jit, static_argnames=("mode", "tile_rows", "scale", "interpret",
                                             "num_warps", "num_stages", "sub_rows"))
def backward_dkv(q, k, v, rows, sel, blocks, tlists, do, lse, delta, *, mode, tile_rows, scale,
                 interpret=False, num_warps=None, num_stages=None, sub_rows=16):
  """dk, dv of one pass: float32 ``[B, S, Hkv, D]``. ``tlists`` ``[B, Hl, n, 1 + NT]`` are the
  transposed lists of the first n blocks (``blocks.transpose_lists``); the grid runs over those
  n blocks. The outputs alias zero-filled inputs, so rows in no program's block stay zero."""
  B, Hkv, TG, D = q.shape
  S = k.shape[1]
  NB, BK = blocks.num_blocks, blocks.block_size
  W = sel.shape[-1]
  lh = (lambda h: h) if tlists.shape[1] > 1 else (lambda h: 0)
  whole = lambda *shape: pl.BlockSpec((None,) + shape,
                                      lambda b, h, j: (b,) + (0,) * len(shape))
  per_head = lambda *shape: pl.BlockSpec((None, None) + shape,
                                         lambda b, h, j: (b, h) + (0,) * len(shape))
  in_specs = [
      pl.BlockSpec((None, None, None, tlists.shape[-1]), lambda b, h, j: (b, lh(h), j, 0)),
      whole(NB, 4), whole(NB, BK), whole(NB, BK), whole(NB, BK), whole(NB, BK),
      whole(TG), whole(TG), whole(TG), whole(TG),
      per_head(TG, W), per_head(TG, D),
      pl.BlockSpec((None, S, None, D), lambda b, h, j: (b, 0, h, 0)),
      pl.BlockSpec((None, S, None, D), lambda b, h, j: (b, 0, h, 0)),
      per_head(TG, D), per_head(TG), per_head(TG),
  ]
  kv_spec = pl.BlockSpec((None, S, None, D), lambda b, h, j: (b, 0, h, 0))
  in_specs += [kv_spec, kv_spec]
  kernel = functools.partial(_dkv_kernel, mode=mode, scale=scale, tile_rows=tile_rows,
                             sub_rows=min(tile_rows, sub_rows), prec=precision(q.dtype, interpret))
  zeros = jnp.zeros(k.shape, jnp.float32)
  n_in = len(in_specs)
  return pl.pallas_call(
      kernel, grid=(B, Hkv, tlists.shape[2]), in_specs=in_specs, out_specs=(kv_spec, kv_spec),
      out_shape=(jax.ShapeDtypeStruct(k.shape, jnp.float32),
                 jax.ShapeDtypeStruct(v.shape, jnp.float32)),
      input_output_aliases={n_in - 2: 0, n_in - 1: 1},
      interpret=interpret, compiler_params=_compiler_params(num_warps, num_stages),
      name=f"gaze_bwd_dkv_{mode}",
  )(tlists, blocks.table, blocks.row_slot, blocks.key_kind, blocks.key_pos,
    blocks.key_frame, rows.kind, rows.pos, rows.frame, rows.routed, sel, q, k, v, do, lse, delta, zeros, zeros)

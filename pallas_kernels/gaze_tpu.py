"""Block-sparse gaze attention forward (prefill and decode) for TPU: Mosaic, with the block lists
carried by ``pltpu.PrefetchScalarGridSpec``.

Same packed operands as ``gaze_gpu`` (see its docstring), except that the selection is the
rows' ids ``[B, Hkv, Tp*Gp, Kp]`` (-1 padded) rather than bitmasks (a dynamic lane index into a
bitmask is not a Mosaic-friendly load). Grid ``(B, Hkv, NT, L)``: the last
axis walks the tile's list; the scalar-prefetched lists and window table feed the index maps,
so the pipeline DMAs exactly the listed blocks' K/V windows (``pl.Element`` row offsets, so a
36-slot region starts anywhere). Steps past the tile's count map to its last listed block (the
pipeline skips a DMA whose block index does not change) and do no compute (``pl.when``). The
online-softmax state lives in VMEM scratch; the last step writes the output and log-sum-exp.

There is no split-K here: a TPU core walks the list sequentially anyway and megacore splits the
parallel (example, KV head, tile) axes. The window of a block is BK = ``ceil(R / 8) * 8`` rows
(40 for R = 36) and is read whole (10% more bytes than the region itself).

Backward: not implemented for TPU. ``pallas_kernels.ops`` wraps this forward in a
``custom_vjp`` whose gradient is the xla gather path's (``gaze_jax.gaze.xla``), so training
on TPU runs this kernel forward and the xla path backward.

Tested on CPU with ``interpret=pltpu.InterpretParams()`` (and ``interpret=True``); on a real
TPU, the 1-D row-field blocks and the per-tile list length (SMEM holds the whole prefetched
list array) are the first things to revisit for long prefills.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.blocks import decode_entry
from pallas_kernels.common import NEG, dot_nn, dot_nt, dot_precision, hit_from_ids, row_masker


def _fwd_kernel(lists_ref, tab_ref, kkind_ref, kpos_ref, kframe_ref, rkind_ref, rpos_ref,
                rframe_ref, rrouted_ref, ids_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, mode, scale, block_k, per_head_lists):
  b, h, i, j = (pl.program_id(a) for a in range(4))
  hl = h if per_head_lists else 0
  count = lists_ref[b, hl, i, 0]

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(j < count)
  def _step():
    # The "full" flag only lets the GPU kernels skip mask work; here the rules always run (no
    # lax.cond on vector masks in Mosaic).
    blk = decode_entry(lists_ref[b, hl, i, 1 + j])[0]
    off, ln, rid = tab_ref[b, blk, 1], tab_ref[b, blk, 2], tab_ref[b, blk, 3]
    r = jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
    inb = (r >= off) & (r < off + ln)                                  # [BK, 1]
    q = q_ref[...]
    k = k_ref[...]
    # Rows of the window outside the block may hold anything (other blocks, unwritten cache).
    v = jnp.where(inb, v_ref[...], 0).astype(v_ref.dtype)
    prec = dot_precision(q.dtype)
    mask = row_masker(mode, rkind_ref[...], rpos_ref[...], rframe_ref[...], rrouted_ref[...],
                      hit_from_ids(ids_ref[...]))                              # rows [M, 1]
    vis = mask(kkind_ref[...], kpos_ref[...], kframe_ref[...], rid)
    s = dot_nt(q, k, prec) * scale
    m = m_sc[...]
    m_new = jnp.maximum(m, jnp.max(jnp.where(vis, s, NEG), axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
    l_sc[...] = l_sc[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
    acc_sc[...] = acc_sc[...] * alpha + dot_nn(p.astype(v.dtype), v, prec)
    m_sc[...] = m_new

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_sc[...]
    seen = l > 0
    safe = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen, acc_sc[...] / safe, 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(safe), NEG)


@functools.partial(jax.jit, static_argnames=("mode", "tile_rows", "scale", "interpret"))
def forward(q, k, v, rows, ids, blocks, lists, *, mode, tile_rows, scale, interpret=False):
  """One pass of block-sparse attention (``gaze_gpu.forward`` without splits).

  Mosaic block rules (last two block dims divisible by (8, 128) or whole; element-indexed
  blocks only when every dim is): K/V are viewed as ``[B*S, Hkv*D]`` (a free reshape, no copy)
  and blocked ``(Element(BK), Element(D))`` at ``(b*S + window, h*D)``, so D should be a
  multiple of 128 on a real TPU; row fields are ``[B, Tp*Gp, 1]`` and key fields
  ``[B, NB, 1, BK]`` (free reshapes).

  Returns:
    o float32 ``[B, Hkv, Tp*Gp, D]`` (normalised) and lse float32 ``[B, Hkv, Tp*Gp]``.
  """
  B, Hkv, TG, D = q.shape
  S = k.shape[1]
  M = tile_rows
  NT = TG // M
  NB, BK = blocks.num_blocks, blocks.block_size
  Kp = ids.shape[-1]
  L = lists.shape[-1] - 1
  per_head = lists.shape[1] > 1

  def block_of(b, h, i, j, lists_ref):
    hl = h if per_head else 0
    count = lists_ref[b, hl, i, 0]
    jj = jnp.minimum(j, jnp.maximum(count - 1, 0))
    return decode_entry(lists_ref[b, hl, i, 1 + jj])[0]

  def kv_map(b, h, i, j, lists_ref, tab_ref):   # element offsets into [B*S, Hkv*D]
    return (b * S + tab_ref[b, block_of(b, h, i, j, lists_ref), 0], h * D)

  def key_map(b, h, i, j, lists_ref, tab_ref):
    return (b, block_of(b, h, i, j, lists_ref), 0, 0)

  row_spec = pl.BlockSpec((None, M, 1), lambda b, h, i, j, *_: (b, i, 0))
  key_spec = pl.BlockSpec((None, None, 1, BK), key_map)
  kv_spec = pl.BlockSpec((pl.Element(BK), pl.Element(D)), kv_map)
  in_specs = [key_spec, key_spec, key_spec, row_spec, row_spec, row_spec, row_spec,
              pl.BlockSpec((None, None, M, Kp), lambda b, h, i, j, *_: (b, h, i, 0)),
              pl.BlockSpec((None, None, M, D), lambda b, h, i, j, *_: (b, h, i, 0)),
              kv_spec, kv_spec]
  out_specs = (pl.BlockSpec((None, None, M, D), lambda b, h, i, j, *_: (b, h, i, 0)),
               pl.BlockSpec((None, None, M, 1), lambda b, h, i, j, *_: (b, h, i, 0)))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(B, Hkv, NT, L), in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((M, 1), jnp.float32), pltpu.VMEM((M, 1), jnp.float32),
                      pltpu.VMEM((M, D), jnp.float32)])
  kernel = functools.partial(_fwd_kernel, mode=mode, scale=scale, block_k=BK,
                             per_head_lists=per_head)
  key = lambda a: a.reshape(B, NB, 1, BK)
  col = lambda a: a.reshape(B, TG, 1)
  o, lse = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=(jax.ShapeDtypeStruct((B, Hkv, TG, D), jnp.float32),
                 jax.ShapeDtypeStruct((B, Hkv, TG, 1), jnp.float32)),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret, name=f"gaze_tpu_fwd_{mode}",
  )(lists, blocks.table, key(blocks.key_kind), key(blocks.key_pos), key(blocks.key_frame),
    col(rows.kind), col(rows.pos), col(rows.frame), col(rows.routed), ids, q,
    k.reshape(B * S, Hkv * D), v.reshape(B * S, Hkv * D))
  return o, lse[..., 0]

"""Block-sparse gaze attention for TPU (Mosaic): forward (prefill, training and decode) and the
backward kernels dq and dk/dv, with the block lists carried by ``pltpu.PrefetchScalarGridSpec``.

Why one program holds every KV head. A TPU array's last two dimensions are tiled (8 x 128 for
32-bit values), and Mosaic must prove that a block window starts on a tile boundary. The
model's K/V ``[B, S, Hkv, D]`` tile over (Hkv, D), so the slot axis is untiled: viewed as
``[B*S, Hkv, D]`` (a free reshape: only leading dimensions merge), a window of BK slots at
*any* row is a legal block, ``(Element(BK), Element(Hkv), Element(D))``. A window of one head
only would need the slot axis among the tiled ones (a relayout copy of the whole cache, and
tile-aligned starts). So a program reads the window of all KV heads at once, and its list is
the union of the blocks that any KV head's rows need; each head applies its own exact mask.

Why a call covers a chunk. Scalar-prefetched arrays live in SMEM (1 MiB on v5e / v5p, shared
with Mosaic's own scalars), and a training step's lists outgrow it (a 4,096-token example has
256 base tiles x ~120 blocks). Each kernel therefore runs as a loop of calls, each over a
chunk of ``nb`` examples x ``nt`` tiles (or blocks) whose lists and block table fit in
``SMEM_WORDS``; the calls write their part of outputs aliased in place (the chunk's origin is
one more scalar-prefetched operand). Small problems take one call.

Packed operands (built by ``pallas_kernels.ops``; as in ``gaze_gpu``):
  q, do: ``[B, Hkv, Tp*Gp, D]``; row ``t * Gp + g`` is token t, head g of the KV head's group.
  k, v: ``[B, S, Hkv, D]`` in the layout's slot order.
  rows: RowInfo of ``[B, Tp*Gp]`` int32 arrays (kind, position, frame, routed) per packed row.
  ids: int32 ``[B, Hkv, Tp*Gp, Kp]`` selected regions per packed row (-1 none).
  blocks: ``pallas_kernels.blocks.KVBlocks``; lists ``[B, 1, NT, 1 + L]`` (union over heads).

Kernels (grid of one call, and what one program walks):
  ``forward``: ``(nb, nt, L)``: tile i's list, one K/V window per step; online softmax in VMEM
    scratch per head; the last step writes o ``[Hkv, M, D]`` and the log-sum-exp.
  ``backward_dq``: ``(nb, nt, L)``: the same walk, accumulating dq.
  ``backward_dkv``: ``(nb, nj, NT)``: block j's window and the tiles that list it (transposed
    lists), accumulating dk and dv, computed transposed (keys as rows, ``[BK, M]``) so that
    every matmul is a plain NN or NT product. Outputs are block-major ``[B, n, Hkv, BK, D]``
    (each program owns its block, so there is no overlap of windows to resolve in the kernel)
    and ``scatter_block_rows`` returns them to the slots.
Steps past a list's count map to its last entry (the pipeline skips a DMA whose block index
does not change) and do no compute (``pl.when``).

Rows of a window that are not keys of the block (neighbouring blocks, PAD slots of a
non-divisible grid, an unwritten cache) may hold anything, NaN included: K and V are zeroed
there before any product, and their logits are masked.

Layout rules kept by construction: K/V blocks are Element windows on the untiled slot axis,
in bounds (``window = min(start, S - BK)``); every other block's last two dimensions are whole
array dimensions or multiples of 8 (M is a multiple of 8). Kernel code avoids ``//`` and
``jnp.sign`` on integers, whose Mosaic lowering asks the device for its generation (and so
fails when compiling without one).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gaze_jax.gaze.layout import PAD
from pallas_kernels.blocks import decode_entry
from pallas_kernels.common import NEG, combine, dot_nn, dot_nt, hit_from_ids, mask_parts

# int32 words of scalar-prefetched lists and block table per call (512 KiB of the 1 MiB SMEM).
SMEM_WORDS = 128 * 1024


def _precision(dtype):
  # float32 inputs: full-precision products (6-pass bf16 on the MXU); bf16: native.
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


class _Flat:
  """A scalar-prefetched int32 array passed flat. SMEM pads the last dimension of a 2-D (or
  larger) array to 128 words, so a ``[B, NB, 4]`` block table would take 32x its size;
  indexing keeps the nd form."""

  def __init__(self, ref, shape):
    self.ref, self.shape = ref, tuple(shape)

  def __getitem__(self, idx):
    flat = 0
    for i, n in zip(idx, self.shape):
      flat = flat * n + i
    return self.ref[flat]


def _entry(lists, b, i, j):
  """Block id of entry ``j`` of tile ``i``'s list, clamped to the last real entry."""
  count = lists[b, 0, i, 0]
  jj = jnp.minimum(j, jnp.maximum(count - 1, 0))
  return decode_entry(lists[b, 0, i, 1 + jj])[0]


def _tile_of(tlists, b, j, t):
  """Tile id of entry ``t`` of block ``j``'s transposed list (clamped to the last one)."""
  count = tlists[b, 0, j, 0]
  tt = jnp.minimum(t, jnp.maximum(count - 1, 0))
  return decode_entry(tlists[b, 0, j, 1 + tt])[0]


def _hit_cols(ids_t, rid):
  """``hit_from_ids`` for transposed ids ``[Kp, M]``: bool ``[1, M]``."""
  return jnp.max(jnp.where(ids_t == rid, 1, 0), axis=0, keepdims=True) > 0


def _clean(x, real):
  """Zeroes the window rows that are not keys of the block (they may hold NaN)."""
  return jnp.where(real, x, jnp.zeros_like(x))


# ---------------------------------------------------------------- chunked calls


@functools.lru_cache(maxsize=None)
def _chunking(n_outer: int, n_inner: int, words_inner: int, words_outer: int):
  """(nb, nt): one call covers nb outer items (examples) x nt inner items (tiles or blocks), so
  that its lists (``words_inner`` per inner item) and block table (``words_outer`` per
  example) fit in ``SMEM_WORDS``."""
  per_outer = n_inner * words_inner + words_outer
  if per_outer <= SMEM_WORDS:
    return max(1, min(n_outer, SMEM_WORDS // per_outer)), n_inner
  return 1, max(1, min(n_inner, (SMEM_WORDS - words_outer) // words_inner))


def _run(kernel, specs, *, lists, table, operands, outs, steps, scratch, name, interpret):
  """The kernel over every (example, tile or block), one ``pallas_call`` per chunk.

  Args:
    kernel: ``kernel(lists_ref, tab_ref, origin_ref, *operand_refs, *aliased_out_refs,
      *out_refs, *scratch, shapes=...)``; program ids are local to the chunk.
    specs: ``specs(shapes) -> (in_specs, out_specs)`` for the operands and outputs; index maps
      take ``(b, i, j, lists_ref, tab_ref, origin_ref)``.
    lists: int32 ``[B, 1, N, W]`` (N tiles or blocks); table: the block table ``[B, NB, 4]``.
    outs: the outputs' initial values (zeros), aliased: every chunk writes its own blocks.
    steps: the last grid axis (list entries or tiles).
  Each chunk covers ``nb x nt`` items (``_chunking``); the last chunk of an axis is shifted
  back to end at the edge (it recomputes a few items, with the same values).
  """
  B, _, N, W = lists.shape
  NB = table.shape[1]
  nb, nt = _chunking(B, N, W, NB * 4)
  n_in = 3 + len(operands)

  def call(lst, tab, origin, outs):
    shapes = (lst.shape, tab.shape)
    in_specs, out_specs = specs(shapes)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3, grid=(nb, nt, steps),
        in_specs=in_specs + [pl.BlockSpec(memory_space=pl.ANY)] * len(outs),
        out_specs=out_specs, scratch_shapes=scratch)
    return pl.pallas_call(
        functools.partial(kernel, shapes=shapes), grid_spec=grid_spec,
        out_shape=tuple(jax.ShapeDtypeStruct(o.shape, o.dtype) for o in outs),
        input_output_aliases={n_in + k: k for k in range(len(outs))},
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name=name,
    )(lst.reshape(-1), tab.reshape(-1), origin, *operands, *outs)

  cb, cn = -(-B // nb), -(-N // nt)
  if cb * cn == 1:
    return call(lists, table, jnp.zeros((2,), jnp.int32), tuple(outs))

  def body(c, outs):
    b0 = jnp.minimum((c // cn) * nb, B - nb)
    i0 = jnp.minimum((c % cn) * nt, N - nt)
    lst = jax.lax.dynamic_slice(lists, (b0, 0, i0, 0), (nb, 1, nt, W))
    tab = jax.lax.dynamic_slice(table, (b0, 0, 0), (nb, NB, 4))
    return call(lst, tab, jnp.stack([b0, i0]).astype(jnp.int32), outs)

  return jax.lax.fori_loop(0, cb * cn, body, tuple(outs))


# ---------------------------------------------------------------- specs shared by the kernels


def _row_major_specs(S, Hkv, D, M, BK, Kp, shapes):
  """In-specs of the forward and dq kernels, grid ``(b, i, j)`` of a chunk: key fields (row
  form ``[1, BK]`` and column form ``[BK, 1]``), row fields ``[M, 1]``, ids ``[Hkv, M, Kp]``,
  q ``[Hkv, M, D]`` and the K/V windows ``[BK, Hkv, D]``; and the block spec of per-head row
  outputs (``heads``)."""
  def block(b, i, j, lists_ref, tab_ref, origin_ref):
    return _entry(_Flat(lists_ref, shapes[0]), b, i, j)

  def key_map(b, i, j, lists_ref, tab_ref, origin_ref):
    return (origin_ref[0] + b, block(b, i, j, lists_ref, tab_ref, origin_ref), 0, 0)

  def kv_map(b, i, j, lists_ref, tab_ref, origin_ref):
    start = _Flat(tab_ref, shapes[1])[b, block(b, i, j, lists_ref, tab_ref, origin_ref), 0]
    return ((origin_ref[0] + b) * S + start, 0, 0)

  def row_map(b, i, j, lists_ref, tab_ref, origin_ref):
    return (origin_ref[0] + b, origin_ref[1] + i, 0)

  def heads_map(b, i, j, lists_ref, tab_ref, origin_ref):
    return (origin_ref[0] + b, 0, origin_ref[1] + i, 0)

  key_row = pl.BlockSpec((None, None, 1, BK), key_map)
  key_col = pl.BlockSpec((None, None, BK, 1), key_map)
  row = pl.BlockSpec((None, M, 1), row_map)
  heads = lambda n: pl.BlockSpec((None, Hkv, M, n), heads_map)
  kv = pl.BlockSpec((pl.Element(BK), pl.Element(Hkv), pl.Element(D)), kv_map)
  return [key_row, key_row, key_row, key_col, row, row, row, row, heads(Kp), heads(D), kv,
          kv], heads


def _row_major_args(blocks, rows, ids, q, k, v):
  B, NB, BK = blocks.key_kind.shape
  S, Hkv, D = k.shape[1:]
  TG = rows.kind.shape[1]
  key_row = lambda a: a.reshape(B, NB, 1, BK)
  col = lambda a: a.reshape(B, TG, 1)
  return (key_row(blocks.key_kind), key_row(blocks.key_pos), key_row(blocks.key_frame),
          blocks.key_kind.reshape(B, NB, BK, 1), col(rows.kind), col(rows.pos),
          col(rows.frame), col(rows.routed), ids, q, k.reshape(B * S, Hkv, D),
          v.reshape(B * S, Hkv, D))


def _row_major_step(mode, tab, lists, kkind_ref, kpos_ref, kframe_ref, kreal_ref, rkind_ref,
                    rpos_ref, rframe_ref, rrouted_ref, b, i, j):
  """Mask parts ``[M, BK]`` of the current (tile, block) pair, the block's region id and the
  column ``[BK, 1]`` of its real keys."""
  rid = tab[b, _entry(lists, b, i, j), 3]
  base, cand = mask_parts(mode, rkind_ref[...], rpos_ref[...], rframe_ref[...],
                          rrouted_ref[...], kkind_ref[...], kpos_ref[...], kframe_ref[...], rid)
  return base, cand, rid, kreal_ref[...] != PAD


def _head_logits(h, q_ref, k_ref, v_ref, ids_ref, base, cand, rid, real, scale):
  """KV head h of a (tile, block) step: its cleaned V window ``[BK, D]``, visibility and
  scaled logits ``[M, BK]``, and the matmul precision."""
  q = q_ref[h]
  k = _clean(k_ref[:, h, :], real)
  vis = combine(base, cand, None if cand is None else hit_from_ids(ids_ref[h])(rid))
  prec = _precision(q.dtype)
  return _clean(v_ref[:, h, :], real), vis, dot_nt(q, k, prec) * scale, prec


# ---------------------------------------------------------------- forward


def _fwd_kernel(lists_ref, tab_ref, origin_ref, kkind_ref, kpos_ref, kframe_ref, kreal_ref,
                rkind_ref, rpos_ref, rframe_ref, rrouted_ref, ids_ref, q_ref, k_ref, v_ref,
                o_in, lse_in, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, mode, scale, num_heads,
                shapes):
  del origin_ref, o_in, lse_in                 # used by the index maps / aliased outputs
  lists, tab = _Flat(lists_ref, shapes[0]), _Flat(tab_ref, shapes[1])
  b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(j < lists[b, 0, i, 0])
  def _step():
    base, cand, rid, real = _row_major_step(mode, tab, lists, kkind_ref, kpos_ref, kframe_ref,
                                            kreal_ref, rkind_ref, rpos_ref, rframe_ref,
                                            rrouted_ref, b, i, j)
    for h in range(num_heads):
      v, vis, s, prec = _head_logits(h, q_ref, k_ref, v_ref, ids_ref, base, cand, rid, real,
                                     scale)
      m = m_sc[h]
      m_new = jnp.maximum(m, jnp.max(jnp.where(vis, s, NEG), axis=1, keepdims=True))
      alpha = jnp.exp(m - m_new)
      p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
      l_sc[h] = l_sc[h] * alpha + jnp.sum(p, axis=1, keepdims=True)
      acc_sc[h] = acc_sc[h] * alpha + dot_nn(p.astype(v.dtype), v, prec)
      m_sc[h] = m_new

  @pl.when(j == pl.num_programs(2) - 1)
  def _finish():
    l = l_sc[...]
    seen = l > 0
    safe = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen, acc_sc[...] / safe, 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(safe), NEG)


@functools.partial(jax.jit, static_argnames=("mode", "tile_rows", "scale", "interpret"))
def forward(q, k, v, rows, ids, blocks, lists, *, mode, tile_rows, scale, interpret=False):
  """One pass of block-sparse attention.

  Args: packed operands (module docstring); ``lists`` int32 ``[B, 1, NT, 1 + L]``.
  Returns:
    o float32 ``[B, Hkv, Tp*Gp, D]`` (normalised) and lse float32 ``[B, Hkv, Tp*Gp]`` (NEG
    for rows that see nothing).
  """
  B, Hkv, TG, D = q.shape
  S = k.shape[1]
  M = tile_rows
  BK, Kp = blocks.block_size, ids.shape[-1]

  def specs(shapes):
    ins, heads = _row_major_specs(S, Hkv, D, M, BK, Kp, shapes)
    return ins, (heads(D), heads(1))

  kernel = functools.partial(_fwd_kernel, mode=mode, scale=scale, num_heads=Hkv)
  o, lse = _run(kernel, specs, lists=lists, table=blocks.table,
                operands=_row_major_args(blocks, rows, ids, q, k, v),
                outs=(jnp.zeros((B, Hkv, TG, D), jnp.float32),
                      jnp.zeros((B, Hkv, TG, 1), jnp.float32)),
                steps=lists.shape[-1] - 1,
                scratch=[pltpu.VMEM((Hkv, M, 1), jnp.float32),
                         pltpu.VMEM((Hkv, M, 1), jnp.float32),
                         pltpu.VMEM((Hkv, M, D), jnp.float32)],
                name=f"gaze_tpu_fwd_{mode}", interpret=interpret)
  return o, lse[..., 0]


# ---------------------------------------------------------------- backward: dq


def _dq_kernel(lists_ref, tab_ref, origin_ref, kkind_ref, kpos_ref, kframe_ref, kreal_ref,
               rkind_ref, rpos_ref, rframe_ref, rrouted_ref, ids_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_in, dq_ref, dq_sc, *, mode, scale, num_heads, shapes):
  del origin_ref, dq_in
  lists, tab = _Flat(lists_ref, shapes[0]), _Flat(tab_ref, shapes[1])
  b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(j < lists[b, 0, i, 0])
  def _step():
    base, cand, rid, real = _row_major_step(mode, tab, lists, kkind_ref, kpos_ref, kframe_ref,
                                            kreal_ref, rkind_ref, rpos_ref, rframe_ref,
                                            rrouted_ref, b, i, j)
    for h in range(num_heads):
      v, vis, s, prec = _head_logits(h, q_ref, k_ref, v_ref, ids_ref, base, cand, rid, real,
                                     scale)
      p = jnp.where(vis, jnp.exp(s - lse_ref[h]), 0.0)
      dp = dot_nt(do_ref[h], v, prec)
      ds = p * (dp - delta_ref[h])
      k = _clean(k_ref[:, h, :], real)
      dq_sc[h] = dq_sc[h] + dot_nn(ds.astype(k.dtype), k, prec)

  @pl.when(j == pl.num_programs(2) - 1)
  def _finish():
    dq_ref[...] = dq_sc[...] * scale


@functools.partial(jax.jit, static_argnames=("mode", "tile_rows", "scale", "interpret"))
def backward_dq(q, k, v, rows, ids, blocks, lists, do, lse, delta, *, mode, tile_rows, scale,
                interpret=False):
  """dq of one pass: float32 ``[B, Hkv, Tp*Gp, D]``. ``do`` is packed like q; lse and delta
  (``sum(o * do, -1)``) are float32 ``[B, Hkv, Tp*Gp]`` of the whole attention (all passes)."""
  B, Hkv, TG, D = q.shape
  S = k.shape[1]
  M = tile_rows
  BK, Kp = blocks.block_size, ids.shape[-1]

  def specs(shapes):
    ins, heads = _row_major_specs(S, Hkv, D, M, BK, Kp, shapes)
    return ins + [heads(D), heads(1), heads(1)], (heads(D),)

  kernel = functools.partial(_dq_kernel, mode=mode, scale=scale, num_heads=Hkv)
  (dq,) = _run(kernel, specs, lists=lists, table=blocks.table,
               operands=_row_major_args(blocks, rows, ids, q, k, v)
               + (do, lse[..., None], delta[..., None]),
               outs=(jnp.zeros((B, Hkv, TG, D), jnp.float32),), steps=lists.shape[-1] - 1,
               scratch=[pltpu.VMEM((Hkv, M, D), jnp.float32)],
               name=f"gaze_tpu_bwd_dq_{mode}", interpret=interpret)
  return dq


# ---------------------------------------------------------------- backward: dk, dv


def _dkv_kernel(tlists_ref, tab_ref, origin_ref, kkind_ref, kpos_ref, kframe_ref, rkind_ref,
                rpos_ref, rframe_ref, rrouted_ref, ids_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, dk_in, dv_in, dk_ref, dv_ref, dk_sc, dv_sc, *, mode, scale,
                num_heads, shapes):
  del dk_in, dv_in
  tlists, tab = _Flat(tlists_ref, shapes[0]), _Flat(tab_ref, shapes[1])
  b, j, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)

  @pl.when(t == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(t < tlists[b, 0, j, 0])
  def _step():
    rid = tab[b, origin_ref[1] + j, 3]
    kkind = kkind_ref[...]                                       # [BK, 1]
    real = kkind != PAD
    # Transposed: keys are the rows [BK, 1], query rows the columns [1, M].
    base, cand = mask_parts(mode, rkind_ref[...], rpos_ref[...], rframe_ref[...],
                            rrouted_ref[...], kkind, kpos_ref[...], kframe_ref[...], rid)
    for h in range(num_heads):
      q = q_ref[h]                                               # [M, D]
      do = do_ref[h]
      k = _clean(k_ref[:, h, :], real)                           # [BK, D]
      v = _clean(v_ref[:, h, :], real)
      vis = combine(base, cand, None if cand is None else _hit_cols(ids_ref[h], rid))
      prec = _precision(q.dtype)
      s = dot_nt(k, q, prec) * scale                             # [BK, M]
      p = jnp.where(vis, jnp.exp(s - lse_ref[h]), 0.0)           # lse row [1, M]
      dp = dot_nt(v, do, prec)
      ds = p * (dp - delta_ref[h])
      dv_sc[h] = dv_sc[h] + dot_nn(p.astype(do.dtype), do, prec)
      dk_sc[h] = dk_sc[h] + dot_nn(ds.astype(q.dtype), q, prec)

  @pl.when(t == pl.num_programs(2) - 1)
  def _finish():
    dk_ref[...] = dk_sc[...] * scale
    dv_ref[...] = dv_sc[...]


@functools.partial(jax.jit, static_argnames=("mode", "tile_rows", "scale", "interpret"))
def backward_dkv(q, k, v, rows, ids, blocks, tlists, do, lse, delta, *, mode, tile_rows, scale,
                 interpret=False):
  """dk, dv of one pass, block-major: float32 ``[B, n, Hkv, BK, D]`` each for the first n blocks
  (``tlists`` ``[B, 1, n, 1 + NT]`` from ``blocks.transpose_lists``); ``scatter_block_rows``
  puts them back into slot order."""
  B, Hkv, TG, D = q.shape
  S = k.shape[1]
  M = tile_rows
  NT = TG // M
  n = tlists.shape[2]
  BK, Kp = blocks.block_size, ids.shape[-1]

  def specs(shapes):
    tile = lambda tl_ref, b, j, t: _tile_of(_Flat(tl_ref, shapes[0]), b, j, t)

    def key_map(b, j, t, tl_ref, tab_ref, origin_ref):
      return (origin_ref[0] + b, origin_ref[1] + j, 0, 0)

    def tile_map(b, j, t, tl_ref, tab_ref, origin_ref):
      return (origin_ref[0] + b, tile(tl_ref, b, j, t), 0, 0)

    def heads_map(b, j, t, tl_ref, tab_ref, origin_ref):
      return (origin_ref[0] + b, 0, tile(tl_ref, b, j, t), 0, 0)

    def kv_map(b, j, t, tl_ref, tab_ref, origin_ref):
      start = _Flat(tab_ref, shapes[1])[b, origin_ref[1] + j, 0]
      return ((origin_ref[0] + b) * S + start, 0, 0)

    def out_map(b, j, t, tl_ref, tab_ref, origin_ref):
      return (origin_ref[0] + b, origin_ref[1] + j, 0, 0, 0)

    key_col = pl.BlockSpec((None, None, BK, 1), key_map)
    row = pl.BlockSpec((None, None, 1, M), tile_map)                     # [1, M]
    heads = lambda *blk: pl.BlockSpec((None, Hkv, None) + blk, heads_map)
    kv = pl.BlockSpec((pl.Element(BK), pl.Element(Hkv), pl.Element(D)), kv_map)
    out = pl.BlockSpec((None, None, Hkv, BK, D), out_map)
    return ([key_col, key_col, key_col, row, row, row, row, heads(Kp, M), heads(M, D), kv, kv,
             heads(M, D), heads(1, M), heads(1, M)], (out, out))

  key_col_arr = lambda a: a[:, :n].reshape(B, n, BK, 1)
  row_arr = lambda a: a.reshape(B, NT, 1, M)
  tiles = lambda a: a.reshape(B, Hkv, NT, M, a.shape[-1])                 # [.., NT, M, x]
  per_row = lambda a: a.reshape(B, Hkv, NT, 1, M)
  ids_t = jnp.swapaxes(tiles(ids), 3, 4)                                  # [B, Hkv, NT, Kp, M]
  operands = (key_col_arr(blocks.key_kind), key_col_arr(blocks.key_pos),
              key_col_arr(blocks.key_frame), row_arr(rows.kind), row_arr(rows.pos),
              row_arr(rows.frame), row_arr(rows.routed), ids_t, tiles(q),
              k.reshape(B * S, Hkv, D), v.reshape(B * S, Hkv, D), tiles(do), per_row(lse),
              per_row(delta))
  zeros = jnp.zeros((B, n, Hkv, BK, D), jnp.float32)
  kernel = functools.partial(_dkv_kernel, mode=mode, scale=scale, num_heads=Hkv)
  return _run(kernel, specs, lists=tlists, table=blocks.table, operands=operands,
              outs=(zeros, zeros), steps=NT,
              scratch=[pltpu.VMEM((Hkv, BK, D), jnp.float32),
                       pltpu.VMEM((Hkv, BK, D), jnp.float32)],
              name=f"gaze_tpu_bwd_dkv_{mode}", interpret=interpret)


def scatter_block_rows(per_block, blocks, num_slots: int):
  """Block-major rows (a tuple of ``[B, n, Hkv, BK, D]`` arrays, the first n blocks) -> slot
  order ``[B, num_slots, Hkv, D]`` by the blocks' ``row_slot``: every real slot is a row of
  exactly one block; slots held by none of the n blocks (and PAD slots) are zero."""
  B, n, Hkv, BK, D = per_block[0].shape
  rs = blocks.row_slot[:, :n]
  slot = jnp.where(rs >= 0, rs, num_slots)                  # num_slots: a dropped trash row
  bi = jnp.arange(B)[:, None, None]
  return tuple(
      jnp.zeros((B, num_slots + 1, Hkv, D), a.dtype).at[bi, slot].set(
          jnp.swapaxes(a, 2, 3))[:, :num_slots] for a in per_block)

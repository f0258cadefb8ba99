"""The kernels' plan: the layout-derived part of a call (``build_plan``, once per forward pass
for all layers) and the per-layer packing of queries and selections (``prepare``).

Tiling and passes (``KernelConfig``):
  * decode form (``T <= decode_rows`` query tokens): one tile holding all T tokens x the
    group's heads, one "full" pass, split-K over ``splits`` programs per KV head whose partial
    results are merged by log-sum-exp. Its list is the union of the group's selected regions
    plus the visible text/context chunks, so it reads nothing else.
  * prefill / training: a "base" pass (text/context keys, dense rows, context rows) with tiles
    of ``base_rows`` rows and a "routed" pass (the selected regions) with small tiles of
    ``routed_rows`` rows, so the union of selections per tile stays small; the two disjoint
    key sets are merged by log-sum-exp. ``passes="full"`` uses one pass.
  * ``dense_rows`` ("cudnn", "xla" or "splash", T == S only): the dense rows (patch rows,
    unrouted text) go to ``jax.nn.dot_product_attention`` or to splash attention
    (``pallas_kernels.splash``) over the first ``dense_len`` positions; the kernels
    then run only the context and routed text rows.
The plan holds the KV block table, the packed row fields, the lists of the passes that do not
depend on the selections (the base pass) with their transposes, and the static dense length;
``prepare`` adds the per-layer selections and their lists.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gaze_jax.gaze.layout import PAD, PATCH, TEXT, TokenLayout
from gaze_jax.gaze.routing import unique_ids
from pallas_kernels import blocks as blk
from pallas_kernels.common import selection_bits
from pallas_kernels.config import (KernelConfig, default_block_k, default_splits,
                                   resolve_kernel, resolved)
from pallas_kernels.core import Pass, Static


# ---------------------------------------------------------------- packing


def pack_q(x, Tp, Gp, Dp, Hkv):
  """``[B, T, Hq, D]`` -> ``[B, Hkv, Tp*Gp, Dp]`` (rows t-major, the group's heads together)."""
  B, T, Hq, D = x.shape
  G = Hq // Hkv
  x = x.reshape(B, T, Hkv, G, D)
  x = jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, Gp - G), (0, Dp - D)))
  return jnp.swapaxes(x, 1, 2).reshape(B, Hkv, Tp * Gp, Dp)


def unpack_q(x, T, G, D):
  B, Hkv, TG, Dp = x.shape
  Gp = blk.next_pow2(G)
  x = x.reshape(B, Hkv, TG // Gp, Gp, Dp)[:, :, :T, :G, :D]
  return jnp.swapaxes(x, 1, 2).reshape(B, T, Hkv * G, D)


def _pack_rows(rows: blk.RowInfo, G: int, Gp: int) -> blk.RowInfo:
  """Token rows ``[B, Tp]`` -> packed rows ``[B, Tp*Gp]`` (the padded heads are PAD)."""
  head_ok = jnp.arange(Gp) < G

  def rep(a, fill):
    a = jnp.where(head_ok, a[:, :, None], fill)
    return a.reshape(a.shape[0], -1)

  return blk.RowInfo(kind=rep(rows.kind, PAD), pos=rep(rows.pos, 0), frame=rep(rows.frame, -1),
                     routed=rep(rows.routed, 0))


def _pack_sel(x, Tp, Gp, width, Hkv, fill):
  """Per-(token, head) rows ``[B, T, Hq, n]`` -> ``[B, Hkv, Tp*Gp, width]`` (like ``_pack_q``)."""
  B, T, Hq, n = x.shape
  G = Hq // Hkv
  x = x.reshape(B, T, Hkv, G, n)
  x = jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, Gp - G), (0, width - n)),
              constant_values=fill)
  return jnp.swapaxes(x, 1, 2).reshape(B, Hkv, Tp * Gp, width)


def static_dense_len(layout: TokenLayout, routed, dense_len: Optional[int]) -> int:
  """``dense_len`` if given; else, when the layout and routed rows are concrete (a layout built
  on the host and closed over), one past the last dense row's position; else S. Rounded up to
  a multiple of 128 for the dense kernel."""
  S = layout.seq_len
  if dense_len is not None:
    return min(S, blk.ceil_to(max(1, int(dense_len)), 128))
  try:
    kind = np.asarray(layout.kind)
    pos = np.asarray(layout.position)
    routed = np.asarray(routed)
  except jax.errors.TracerArrayConversionError:
    return S
  dense = (kind == PATCH) | ((kind == TEXT) & ~routed)
  n = int(pos[dense].max()) + 1 if dense.any() else 1
  return min(S, blk.ceil_to(n, 128))


def build_blocks(layout: TokenLayout, config: Optional[KernelConfig] = None) -> blk.KVBlocks:
  """The KV block table of ``layout`` for ``config``'s kernels (part of the plan)."""
  cfg = config or KernelConfig()
  kernel, _ = resolve_kernel(cfg)
  return blk.build_kv_blocks(layout, cfg.block_k or default_block_k(layout.region_size, kernel),
                             group_context=kernel == "gpu")


@dataclasses.dataclass(frozen=True)
class Tiling:
  """The static part of a plan. passes: ``(mode, tokens per tile)`` per pass; T, G: query
  tokens and heads per KV head it was built for; Tp, Gp, Dp: their padded sizes;
  dense_len: static bound of the dense rows (None: no dense-rows split)."""
  kernel: str
  interpret: Any
  config: KernelConfig
  passes: tuple
  decode: bool
  T: int
  G: int
  Tp: int
  Gp: int
  Dp: int
  dense_len: Optional[int]


@dataclasses.dataclass(frozen=True)
class KernelPlan:
  """The kernels' layout-derived inputs (``build_plan``); every array is ``[B, ...]``.

  rows: packed RowInfo ``[B, Tp*Gp]`` (rows left to the dense kernel read as PAD);
  token_rows: RowInfo ``[B, Tp]`` (one row per token, for the block lists);
  blocks: the KV block table; lists / tlists: per pass, the block lists ``[B, 1, NT, 1+L]``
  and their transposes when they do not depend on the selections (the base pass), else None;
  dense_row: bool ``[B, T]`` rows for the dense kernel (None without the split).
  """
  rows: blk.RowInfo
  token_rows: blk.RowInfo
  blocks: blk.KVBlocks
  lists: tuple
  tlists: tuple
  dense_row: Any
  tiling: Tiling


jax.tree_util.register_dataclass(
    KernelPlan, data_fields=["rows", "token_rows", "blocks", "lists", "tlists", "dense_row"],
    meta_fields=["tiling"])


def build_plan(layout: TokenLayout, q_index: Optional[jax.Array], routed: jax.Array, *,
               heads: tuple, dtype, config: Optional[KernelConfig] = None,
               blocks: Optional[blk.KVBlocks] = None) -> KernelPlan:
  """The plan of query rows ``q_index`` (int32 ``[B, T]``; None: T == S) of ``layout``.

  routed: bool ``[B, T]`` routed rows; heads: ``(Hq, Hkv, D)``; dtype: of q/k/v (launch
  defaults); blocks: a block table already built for this layout and config.
  """
  cfg = config or KernelConfig()
  kernel, interpret = resolve_kernel(cfg)
  Hq, Hkv, D = heads
  G = Hq // Hkv
  B, S = layout.kind.shape
  full_sequence = q_index is None
  qi = (jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)) if full_sequence
        else jnp.asarray(q_index, jnp.int32))
  T = qi.shape[1]
  routed = jnp.asarray(routed, bool)
  if blocks is None:
    blocks = build_blocks(layout, cfg)
  cfg = resolved(cfg, dtype, kernel, blocks.block_size, D)
  Gp = blk.next_pow2(G)
  # Triton needs power-of-two tiles and tl.dot needs >= 16 along every dimension.
  Dp = max(16, blk.next_pow2(D)) if kernel == "gpu" else D
  dense_row = keep = dense_len = None
  if cfg.dense_rows is not None and full_sequence:
    all_rows = blk.row_info(layout, qi, routed)
    dense_row = (all_rows.kind == PATCH) | ((all_rows.kind == TEXT) & (all_rows.routed == 0))
    keep = ~dense_row
    dense_len = static_dense_len(layout, routed, cfg.dense_len)
  decode = T <= cfg.decode_rows
  if decode:
    tok = blk.next_pow2(max(T, -(-cfg.min_rows // Gp)))
    passes = (("full", tok),)
    Tp = tok
  else:
    # Several tiles: at least tl.dot's 16 rows (min_rows) on a GPU, and a multiple of the 8
    # sublanes of a Mosaic block on a TPU.
    floor = max(cfg.min_rows, 8) if kernel == "tpu" else cfg.min_rows
    tb = max(1, max(cfg.base_rows, floor) // Gp)
    tr = max(1, max(cfg.routed_rows, floor) // Gp)
    passes = ((("full", tb),) if cfg.passes == "full" else (("base", tb), ("routed", tr)))
    Tp = blk.ceil_to(T, max(t for _, t in passes))
  token_rows = blk.pad_rows(blk.row_info(layout, qi, routed, keep), Tp)
  lists, tlists = [], []
  for mode, tok in passes:
    if mode != "base":           # depends on the selections: built per layer by ``prepare``
      lists.append(None)
      tlists.append(None)
      continue
    lst = blk.tile_lists(blocks, token_rows, None, tile=tok, num_kv_heads=Hkv, mode=mode,
                         max_len=blk.list_length(blocks, mode=mode, rows_per_tile=tok, top_k=1))
    lists.append(lst)
    tlists.append(blk.transpose_lists(lst, blocks.num_blocks))
  tiling = Tiling(kernel=kernel, interpret=interpret, config=cfg, passes=passes, decode=decode,
                  T=T, G=G, Tp=Tp, Gp=Gp, Dp=Dp, dense_len=dense_len)
  return KernelPlan(rows=_pack_rows(token_rows, G, Gp), token_rows=token_rows, blocks=blocks,
                    lists=tuple(lists), tlists=tuple(tlists), dense_row=dense_row,
                    tiling=tiling)


@dataclasses.dataclass(frozen=True)
class Prepared:
  """Everything the kernels take, packed (``prepare``); ``forward()`` runs the kernels only."""
  static: Static
  q: Any
  k: Any
  v: Any
  aux: Any
  shape: tuple          # (T, G, D) of the unpacked queries

  def forward(self):
    """Kernels only: packed output ``[B, Hkv, Tp*Gp, Dp]`` and its log-sum-exp."""
    from pallas_kernels.core import forward_passes
    return forward_passes(self.static, self.q, self.k, self.v, self.aux)


def prepare(q, k, v, ids, plan: KernelPlan, *, scale=None, unique: bool = False) -> Prepared:
  """The per-layer part: packed q / k / v, the selections and the lists that depend on them.

  q ``[B, T, Hq, D]``, k/v ``[B, S, Hkv, D]``, ids int32 ``[B, T, Hq, K]`` (-1 none; repeats
  dropped unless ``unique``), plan: ``build_plan`` for these rows.
  """
  t = plan.tiling
  B, T, Hq, D = q.shape
  S, Hkv = k.shape[1], k.shape[2]
  G = Hq // Hkv
  if (T, G) != (t.T, t.G):
    raise ValueError(f"the kernel plan was built for T={t.T} query rows and {t.G} query heads "
                     f"per KV head, the call has T={T} and {G}")
  ids = jnp.asarray(ids, jnp.int32)
  if not unique:
    ids = unique_ids(ids)
  if scale is None:
    scale = 1.0 / math.sqrt(D)
  blocks, Tp, Gp, Dp = plan.blocks, t.Tp, t.Gp, t.Dp
  K = ids.shape[-1]
  ids_t = jnp.pad(ids, ((0, 0), (0, Tp - T), (0, 0), (0, 0)), constant_values=-1)
  union = t.kernel == "tpu"   # a TPU program holds every KV head: one list for all of them
  lists = list(plan.lists)
  for i, (mode, tok) in enumerate(t.passes):
    if lists[i] is None:
      L = blk.list_length(blocks, mode=mode, rows_per_tile=tok * (Hq if union else G), top_k=K)
      lists[i] = blk.tile_lists(blocks, plan.token_rows, ids_t, tile=tok, num_kv_heads=Hkv,
                                mode=mode, max_len=L, union_heads=union)
  splits = 1
  if t.decode and t.kernel == "gpu":   # the local batch: under shard_map, a shard's examples
    splits = t.config.splits or default_splits(B, Hkv, jnp.dtype(q.dtype).itemsize)
  passes = tuple(Pass(mode, tok * Gp, splits) for mode, tok in t.passes)
  cfg = t.config
  st = Static(passes=passes, scale=float(scale), kernel=t.kernel, interpret=t.interpret,
              # One decode tile pads T * Gp real rows up to tl.dot's 16: write only the real
              # ones (a block reaching past the array's end is masked from its start).
              out_rows=T * Gp if len(passes) == 1 and Tp * Gp == passes[0].tile_rows
              else Tp * Gp,
              num_warps=cfg.num_warps, num_stages=cfg.num_stages,
              bwd_num_warps=cfg.bwd_num_warps, bwd_num_stages=cfg.bwd_num_stages)
  if t.kernel == "gpu":   # selection bitmasks: an O(M) hit test per block, whatever K is
    bits = selection_bits(ids_t, blocks.num_regions)
    sel = _pack_sel(bits, Tp, Gp, bits.shape[-1], Hkv, 0)
  else:                   # the ids (compared per block in the TPU kernel)
    sel = _pack_sel(ids_t, Tp, Gp, blk.next_pow2(K), Hkv, -1)

  def pad_kv(x):  # only for tiny caches (S < BK) or odd head sizes: never copy a real cache
    if blocks.kv_len == S and Dp == D:
      return x
    return jnp.pad(x, ((0, 0), (0, blocks.kv_len - S), (0, 0), (0, Dp - D)))

  aux = (plan.rows, sel, blocks, tuple(lists), plan.tlists)
  return Prepared(static=st, q=pack_q(q, Tp, Gp, Dp, Hkv), k=pad_kv(k), v=pad_kv(v), aux=aux,
                  shape=(T, G, D))


def read_stats(prep: Prepared, *, itemsize: int) -> dict:
  """What the kernels of ``prep`` read: ``bytes_read`` float32 ``[B]`` (K and V bytes of the
  listed blocks over all passes, KV heads and tiles; masked window rows excluded) and
  ``union_fraction`` float32 ``[B, Hkv]`` (regions listed per KV head over the valid regions,
  the largest over the tiles of the pass that holds the routed regions)."""
  _, _, blocks, lists, _ = prep.aux
  D = prep.shape[2]
  Hkv = prep.k.shape[2]
  return {
      "bytes_read": sum(blk.bytes_read(lst, blocks, head_dim=D, itemsize=itemsize,
                                       num_kv_heads=Hkv) for lst in lists),
      "union_fraction": jnp.max(blk.union_fraction(lists[-1], blocks), axis=-1),
  }

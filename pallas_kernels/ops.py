"""The one public entry to the gaze kernels: routing, block lists, kernel choice, ``custom_vjp``.

``gaze_attention`` has the contract of ``gaze_jax.gaze.gaze_attention`` (which calls it for
``implementation="pallas"``); ``attention`` takes the selection ids directly.

How a call runs:
  1. Routing (plain jnp, as in the xla path): ids ``[B, T, Hq, K]``, -1 = none; a traced
     ``active_k`` only masks ranks, so the progressive K schedule never recompiles.
  2. ``build_blocks``: the KV block table of the layout (regions and text/context chunks).
     It depends on the layout only: pass ``blocks=`` to build it once for all layers of a
     step; otherwise each call builds it.
  3. Tiling and passes (``KernelConfig``):
     * decode form (``T <= decode_rows`` query tokens): one tile holding all T tokens x the
       group's heads, one "full" pass, split-K over ``splits`` programs per KV head whose
       partial results are merged by log-sum-exp. Its list is the union of the group's
       selected regions plus the visible text/context chunks, so it reads nothing else.
     * prefill / training: a "base" pass (text/context keys, dense rows, context rows) with
       tiles of ``base_rows`` rows and a "routed" pass (the selected regions) with small tiles
       of ``routed_rows`` rows, so the union of selections per tile stays small; the two
       disjoint key sets are merged by log-sum-exp. ``passes="full"`` uses one pass.
     * ``dense_rows="cudnn"`` (or "xla"), T == S only: the dense rows (patch rows, unrouted
       text) go to ``jax.nn.dot_product_attention`` with a causal mask over the sequence sorted
       by position (the region-major storage is permuted back to raster order), over the first
       ``dense_len`` positions; the kernels then run only the context and routed text rows.
  4. Block lists per (example, KV head, tile) and the selections packed per kernel row (bitmasks
     for the GPU kernels, ids for the TPU kernels, whose programs hold every KV head and so
     take one list per tile: the union over the KV heads).
  5. Kernels: "gpu" = ``gaze_gpu`` (generic Pallas, Triton on the GPU, ``interpret=True`` on
     CPU); "tpu" = ``gaze_tpu`` (Mosaic; ``pltpu.InterpretParams()`` on CPU).
  Gradients: ``custom_vjp`` with the FlashAttention-2 backward (``backward_dq`` per tile,
  ``backward_dkv`` per KV block on the transposed lists), using the merged lse, for both
  kernel families.
  Under a device mesh, ``gaze_attention`` runs all of this in ``jax.shard_map``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gaze_jax.gaze.layout import PAD, PATCH, TEXT, TokenLayout
from gaze_jax.gaze.masks import routed_rows, token_info
from gaze_jax.gaze.regions import region_descriptors
from gaze_jax.gaze.routing import Selection, resolve_top_k, route
from pallas_kernels import blocks as blk
from pallas_kernels import gaze_gpu
from pallas_kernels.common import NEG, selection_bits

KERNELS = ("auto", "gpu", "tpu")
DENSE_ROWS = (None, "cudnn", "xla")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static kernel choices (hashable; every field is a compile-time constant).

  kernel: "auto" (TPU kernels on a TPU, else the generic GPU kernels), "gpu" or "tpu".
  interpret: None (True on CPU), a bool, or ``pltpu.InterpretParams()`` for the TPU kernel.
  block_k: KV window rows BK (default: the next power of two >= max(16, region size) for
    Triton; a multiple of 8 >= region size for Mosaic).
  base_rows, routed_rows: rows (tokens x group heads, powers of two) of a tile in the base and
    routed passes (base_rows default: ``launch_defaults``).
  passes: "split" (base + routed passes) or "full" (one pass with the whole mask).
  decode_rows: up to this many query tokens use the decode form.
  splits: split-K programs per (example, KV head) in the decode form; None fills one wave
    of the GPU (``default_splits``).
  min_rows: smallest tile (Triton's ``tl.dot`` needs 16 rows; TPU tiles are at least 8).
  dense_rows: None, "cudnn" or "xla" (see the module docstring).
  dense_len: static bound (positions) on the dense rows; default: found from the layout when it
    is concrete (built on the host and closed over), else the whole sequence. Rounded up to a
    multiple of 128 for the dense kernel.
  num_warps, num_stages: Triton launch parameters of the forward kernels; bwd_num_warps,
    bwd_num_stages of the backward kernels. None: ``launch_defaults`` for the input dtype,
    the choices with which ``make aot`` compiles every bf16 kernel without register spills.
  batch_axes, head_axis: under a device mesh, the mesh axes that split the examples and the
    heads (``gaze_attention`` runs in ``shard_map``); axes the mesh lacks are ignored.
  """
  kernel: str = "auto"
  interpret: Any = None
  block_k: Optional[int] = None
  base_rows: Optional[int] = None
  routed_rows: int = 16
  passes: str = "split"
  decode_rows: int = 16
  splits: Optional[int] = None
  min_rows: int = 16
  dense_rows: Optional[str] = None
  dense_len: Optional[int] = None
  num_warps: Optional[int] = None
  num_stages: Optional[int] = None
  bwd_num_warps: Optional[int] = None
  bwd_num_stages: Optional[int] = None
  batch_axes: tuple = ("data", "fsdp")
  head_axis: Optional[str] = "tensor"

  def __post_init__(self):
    object.__setattr__(self, "batch_axes", tuple(self.batch_axes))
    if self.kernel not in KERNELS:
      raise ValueError(f"KernelConfig.kernel must be one of {KERNELS}, got {self.kernel!r}")
    if self.passes not in ("split", "full"):
      raise ValueError(f"KernelConfig.passes must be 'split' or 'full', got {self.passes!r}")
    if self.dense_rows not in DENSE_ROWS:
      raise ValueError(f"KernelConfig.dense_rows must be one of {DENSE_ROWS}, "
                       f"got {self.dense_rows!r}")
    for name in ("base_rows", "routed_rows", "min_rows"):
      n = getattr(self, name)
      if n is not None and (n < 1 or n != blk.next_pow2(n)):
        raise ValueError(f"KernelConfig.{name} must be a power of two, got {n}")
    if (self.splits is not None and self.splits < 1) or self.decode_rows < 1:
      raise ValueError("KernelConfig.splits and decode_rows must be >= 1")


def launch_defaults(dtype, kernel: str, block_k: int = 64, head_dim: int = 128) -> dict:
  """Tile and launch choices that ``KernelConfig`` leaves as None, by input dtype and the size
  of a K/V block.

  GPU (ptxas for an H100, ``make aot``): 16-bit inputs take 64-row base tiles, 4 warps and 2
  pipeline stages forward (3 stages spill the routed forward); the backward kernels take 8
  warps once a block holds ``BK x D >= 4096`` elements (dk/dv keep two such float32
  accumulators: 4 warps spill at 64 x 128), 4 below. float32 runs TF32x3 products: 32-row
  base tiles (64 rows exceed the 227 KB of shared memory) and 8 warps, which still spill a few
  hundred bytes in the backward kernels: bf16 is the GPU training dtype.
  TPU: 64-row base tiles (the launch fields are unused).
  """
  wide = jnp.dtype(dtype).itemsize >= 4
  if kernel == "gpu":
    big = block_k * head_dim >= 4096
    return dict(base_rows=32 if wide else 64, num_warps=8 if wide else 4, num_stages=2,
                bwd_num_warps=8 if (big or wide) else 4, bwd_num_stages=2)
  return dict(base_rows=64, num_warps=None, num_stages=None, bwd_num_warps=None,
              bwd_num_stages=None)


def _resolved(cfg: KernelConfig, dtype, kernel: str, block_k: int,
              head_dim: int) -> KernelConfig:
  """``cfg`` with its None launch fields set from ``launch_defaults``."""
  fill = {k: v for k, v in launch_defaults(dtype, kernel, block_k, head_dim).items()
          if getattr(cfg, k) is None}
  return dataclasses.replace(cfg, **fill) if fill else cfg


@dataclasses.dataclass(frozen=True)
class _Pass:
  mode: str          # "base" | "routed" | "full"
  tile_rows: int     # M: packed rows per tile
  splits: int


@dataclasses.dataclass(frozen=True)
class _Static:
  passes: tuple
  scale: float
  kernel: str
  interpret: Any
  out_rows: int      # packed rows the forward kernel writes (decode: only the real T * Gp)
  num_warps: Optional[int]
  num_stages: Optional[int]
  bwd_num_warps: Optional[int]
  bwd_num_stages: Optional[int]


def resolve_kernel(config: KernelConfig) -> tuple[str, Any]:
  """(kernel family, interpret flag) for the current backend."""
  backend = jax.default_backend()
  kernel = config.kernel
  if kernel == "auto":
    kernel = "tpu" if backend == "tpu" else "gpu"
  interpret = config.interpret
  if interpret is None:
    interpret = backend == "cpu" or (kernel == "tpu" and backend != "tpu")
    if interpret and kernel == "tpu":
      from jax.experimental.pallas import tpu as pltpu
      interpret = pltpu.InterpretParams()
  return kernel, interpret


# Programs of the decode kernel (``gaze_fwd_full`` at the default launch parameters) that fit
# on one SM at once, by input itemsize: 65,536 registers / (registers per thread x threads).
# `make aot` compiles the kernel for an H100, reads its registers and shared memory (ptxas,
# the launch) and fails if these are not the compiled kernel's occupancy.
DECODE_PROGRAMS_PER_SM = {2: 3, 4: 1}


def default_splits(batch: int, kv_heads: int, itemsize: int = 2,
                   num_sms: Optional[int] = None) -> int:
  """Split-K for the decode form: as many splits per (example, KV head) as fill one wave of
  ``DECODE_PROGRAMS_PER_SM`` programs on every SM (132 on an H100), between 1 and 32 (a
  second, partial wave would cost as much as the first)."""
  if num_sms is None:
    num_sms = getattr(jax.devices()[0], "core_count", None) or 132
  per_sm = DECODE_PROGRAMS_PER_SM.get(int(itemsize), 1)
  return int(max(1, min(32, per_sm * num_sms // (batch * kv_heads))))


def default_block_k(region_size: int, kernel: str) -> int:
  if kernel == "tpu":
    return blk.ceil_to(max(region_size, 8), 8)
  return blk.next_pow2(max(16, region_size))


# ---------------------------------------------------------------- packing


def _pack_q(x, Tp, Gp, Dp, Hkv):
  """``[B, T, Hq, D]`` -> ``[B, Hkv, Tp*Gp, Dp]`` (rows t-major, the group's heads together)."""
  B, T, Hq, D = x.shape
  G = Hq // Hkv
  x = x.reshape(B, T, Hkv, G, D)
  x = jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, Gp - G), (0, Dp - D)))
  return jnp.swapaxes(x, 1, 2).reshape(B, Hkv, Tp * Gp, Dp)


def _unpack_q(x, T, G, D):
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


def _drop_repeats(ids):
  """Sorted ids with repeats within a (row, head) set to -1 (the kernels only test membership;
  the list builder counts selections per region, so a repeat must not count twice)."""
  if ids.shape[-1] < 2:
    return ids
  srt = jnp.sort(ids, axis=-1)
  repeat = jnp.concatenate([jnp.zeros_like(srt[..., :1], bool),
                            srt[..., 1:] == srt[..., :-1]], axis=-1)
  return jnp.where(repeat, -1, srt)


def _merge(o, lse, axis):
  """Log-sum-exp merge of partial results along ``axis`` (o has one more trailing dim)."""
  m = jnp.max(lse, axis=axis, keepdims=True)
  w = jnp.exp(lse - m)
  l = jnp.sum(w, axis=axis)
  o = jnp.sum(w[..., None] * o, axis=axis) / l[..., None]
  return o, jnp.squeeze(m, axis) + jnp.log(l)


# ---------------------------------------------------------------- the differentiable core


def _forward_passes(st: _Static, q, k, v, aux):
  rows, sel, blocks, lists = aux
  os, lses = [], []
  for p, lst in zip(st.passes, lists):
    if st.kernel == "tpu":
      o, lse = gaze_tpu().forward(q, k, v, rows, sel, blocks, lst, mode=p.mode,
                                  tile_rows=p.tile_rows, scale=st.scale,
                                  interpret=st.interpret)
    else:
      o, lse = gaze_gpu.forward(q, k, v, rows, sel, blocks, lst, mode=p.mode,
                                tile_rows=p.tile_rows, splits=p.splits, scale=st.scale,
                                interpret=st.interpret, num_warps=st.num_warps,
                                num_stages=st.num_stages, out_rows=st.out_rows)
      if p.splits > 1:
        o, lse = _merge(o, lse, axis=2)
      else:
        o, lse = o[:, :, 0], lse[:, :, 0]
      pad = q.shape[2] - st.out_rows    # rows that were not written: zero output, NEG lse
      if pad:
        o = jnp.pad(o, ((0, 0), (0, 0), (0, pad), (0, 0)))
        lse = jnp.pad(lse, ((0, 0), (0, 0), (0, pad)), constant_values=NEG)
    os.append(o)
    lses.append(lse)
  if len(os) == 1:
    return os[0], lses[0]
  return _merge(jnp.stack(os, 2), jnp.stack(lses, 2), axis=2)


def gaze_tpu():
  """The Mosaic kernels' module (imported on first use: it imports the Pallas TPU dialect)."""
  from pallas_kernels import gaze_tpu as mod
  return mod


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(st: _Static, q, k, v, aux):
  o, _ = _forward_passes(st, q, k, v, aux)
  return o.astype(q.dtype)


def _core_fwd(st, q, k, v, aux):
  o, lse = _forward_passes(st, q, k, v, aux)
  o = o.astype(q.dtype)
  return o, (q, k, v, aux, o, lse)


def _core_bwd(st, res, do):
  q, k, v, aux, o, lse = res
  rows, sel, blocks, lists = aux
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  do = do.astype(q.dtype)
  dq = jnp.zeros(q.shape, jnp.float32)
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for p, lst in zip(st.passes, lists):
    n = blocks.num_regions if p.mode == "routed" else blocks.num_blocks
    tl = blk.transpose_lists(lst, n)
    if st.kernel == "tpu":
      kw = dict(mode=p.mode, tile_rows=p.tile_rows, scale=st.scale, interpret=st.interpret)
      mod = gaze_tpu()
      dq += mod.backward_dq(q, k, v, rows, sel, blocks, lst, do, lse, delta, **kw)
      dk_p, dv_p = mod.scatter_block_rows(
          mod.backward_dkv(q, k, v, rows, sel, blocks, tl, do, lse, delta, **kw), blocks,
          k.shape[1])
      dk += dk_p
      dv += dv_p
      continue
    kw = dict(mode=p.mode, tile_rows=p.tile_rows, scale=st.scale, interpret=st.interpret,
              num_warps=st.bwd_num_warps, num_stages=st.bwd_num_stages)
    dq += gaze_gpu.backward_dq(q, k, v, rows, sel, blocks, lst, do, lse, delta, **kw)
    dk_p, dv_p = gaze_gpu.backward_dkv(q, k, v, rows, sel, blocks, tl, do, lse, delta, **kw)
    dk += dk_p
    dv += dv_p
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_core.defvjp(_core_fwd, _core_bwd)


# ---------------------------------------------------------------- dense rows


def _dense_rows(q, k, v, layout: TokenLayout, *, scale, implementation, dense_len):
  """Dense causal attention of every row, computed on the sequence sorted by position with
  ``jax.nn.dot_product_attention``; valid for the rows at positions ``< dense_len``."""
  B, S = layout.kind.shape
  kind = jnp.asarray(layout.kind)
  key = jnp.where(kind != PAD, jnp.asarray(layout.position), S + jnp.arange(S))
  perm = jnp.argsort(key, axis=1)[:, :dense_len]                      # sorted slot order
  take = lambda x: jnp.take_along_axis(x, perm[:, :, None, None], axis=1)
  out = jax.nn.dot_product_attention(take(q), take(k), take(v), is_causal=True, scale=scale,
                                     implementation=implementation)
  full = jnp.zeros(q.shape, out.dtype)
  return full.at[jnp.arange(B)[:, None], perm].set(out)


def _static_dense_len(layout: TokenLayout, routed, dense_len: Optional[int]) -> int:
  """``dense_len`` if given; else, when the layout and routed rows are concrete (a layout built
  on the host and closed over), one past the last dense row's position; else S."""
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


# ---------------------------------------------------------------- entry points


def build_blocks(layout: TokenLayout, config: Optional[KernelConfig] = None) -> blk.KVBlocks:
  """The KV block table of ``layout`` for ``config``'s kernels. It depends on the layout only:
  build it once per layout (per decode step for all layers, once for a prefill) and pass it to
  ``attention(blocks=...)``; otherwise every call builds it."""
  cfg = config or KernelConfig()
  kernel, _ = resolve_kernel(cfg)
  return blk.build_kv_blocks(layout, cfg.block_k or default_block_k(layout.region_size, kernel),
                             group_context=kernel == "gpu")


@dataclasses.dataclass(frozen=True)
class Prepared:
  """Everything the kernels take, packed (``prepare``); ``forward()`` runs the kernels only."""
  static: _Static
  q: Any
  k: Any
  v: Any
  aux: Any
  shape: tuple          # (T, G, D) of the unpacked queries

  def forward(self):
    """Kernels only: packed output ``[B, Hkv, Tp*Gp, Dp]`` and its log-sum-exp."""
    return _forward_passes(self.static, self.q, self.k, self.v, self.aux)


def prepare(q, k, v, layout: TokenLayout, ids, *, routed, q_index=None, scale=None,
            config: Optional[KernelConfig] = None, unique_ids: bool = False,
            blocks: Optional[blk.KVBlocks] = None, keep=None) -> Prepared:
  """Routing-independent planning of ``attention``: tiles and passes, block lists, packing.
  Arguments as in ``attention``; ``keep`` (bool ``[B, T]``) limits the kernels to those rows.
  ``q_index`` must be given (``attention`` fills it for the T == S form)."""
  cfg = config or KernelConfig()
  kernel, interpret = resolve_kernel(cfg)
  ids = jnp.asarray(ids, jnp.int32)
  if not unique_ids:
    ids = _drop_repeats(ids)
  B, T, Hq, D = q.shape
  S, Hkv = k.shape[1], k.shape[2]
  G = Hq // Hkv
  if scale is None:
    scale = 1.0 / math.sqrt(D)
  rows = blk.row_info(layout, q_index, jnp.asarray(routed, bool), keep)
  if blocks is None:
    blocks = build_blocks(layout, cfg)
  cfg = _resolved(cfg, q.dtype, kernel, blocks.block_size, D)
  Gp = blk.next_pow2(G)
  # Triton needs power-of-two tiles and tl.dot needs >= 16 along every dimension.
  Dp = max(16, blk.next_pow2(D)) if kernel == "gpu" else D
  K = ids.shape[-1]
  Kp = blk.next_pow2(K)
  if T <= cfg.decode_rows:
    tok = blk.next_pow2(max(T, -(-cfg.min_rows // Gp)))
    splits = ((cfg.splits or default_splits(B, Hkv, jnp.dtype(q.dtype).itemsize))
              if kernel == "gpu" else 1)
    plan = [(_Pass("full", tok * Gp, splits), tok)]
    Tp = tok
  else:
    # Several tiles: at least tl.dot's 16 rows (min_rows) on a GPU, and a multiple of the 8
    # sublanes of a Mosaic block on a TPU.
    floor = max(cfg.min_rows, 8) if kernel == "tpu" else cfg.min_rows
    tb = max(1, max(cfg.base_rows, floor) // Gp)
    tr = max(1, max(cfg.routed_rows, floor) // Gp)
    if cfg.passes == "full":
      plan = [(_Pass("full", tb * Gp, 1), tb)]
    else:
      plan = [(_Pass("base", tb * Gp, 1), tb), (_Pass("routed", tr * Gp, 1), tr)]
    Tp = blk.ceil_to(T, max(t for _, t in plan))
  rows_t = blk.pad_rows(rows, Tp)
  ids_t = jnp.pad(ids, ((0, 0), (0, Tp - T), (0, 0), (0, 0)), constant_values=-1)
  lists = []
  union = kernel == "tpu"   # a TPU program holds every KV head: one list for all of them
  for p, tok in plan:
    L = blk.list_length(blocks, mode=p.mode, rows_per_tile=tok * (Hq if union else G),
                        top_k=K)
    lists.append(blk.tile_lists(blocks, rows_t, ids_t, tile=tok, num_kv_heads=Hkv, mode=p.mode,
                                max_len=L, union_heads=union))
  def pad_kv(x):  # only for tiny caches (S < BK) or odd head sizes: never copy a real cache
    if blocks.kv_len == S and Dp == D:
      return x
    return jnp.pad(x, ((0, 0), (0, blocks.kv_len - S), (0, 0), (0, Dp - D)))
  st = _Static(passes=tuple(p for p, _ in plan), scale=float(scale), kernel=kernel,
               interpret=interpret,
               # One decode tile pads T * Gp real rows up to tl.dot's 16: write only the real
               # ones (a block reaching past the array's end is masked from its start).
               out_rows=T * Gp if len(plan) == 1 and Tp * Gp == plan[0][0].tile_rows
               else Tp * Gp,
               num_warps=cfg.num_warps, num_stages=cfg.num_stages,
               bwd_num_warps=cfg.bwd_num_warps, bwd_num_stages=cfg.bwd_num_stages)
  if kernel == "gpu":   # selection bitmasks: an O(M) hit test per block, whatever K is
    bits = selection_bits(ids_t, layout.max_regions)
    sel = _pack_sel(bits, Tp, Gp, bits.shape[-1], Hkv, 0)
  else:                 # the ids (compared per block in the TPU kernel)
    sel = _pack_sel(ids_t, Tp, Gp, Kp, Hkv, -1)
  aux = (_pack_rows(rows_t, G, Gp), sel, blocks, tuple(lists))
  return Prepared(static=st, q=_pack_q(q, Tp, Gp, Dp, Hkv), k=pad_kv(k), v=pad_kv(v), aux=aux,
                  shape=(T, G, D))


def read_stats(prep: Prepared, *, itemsize: int) -> dict:
  """What the kernels of ``prep`` read: ``bytes_read`` float32 ``[B]`` (K and V bytes of the
  listed blocks over all passes, KV heads and tiles; masked window rows excluded) and
  ``union_fraction`` float32 ``[B, Hkv]`` (regions listed per KV head over the valid regions,
  the largest over the tiles of the pass that holds the routed regions)."""
  _, _, blocks, lists = prep.aux
  D = prep.shape[2]
  Hkv = prep.k.shape[2]
  return {
      "bytes_read": sum(blk.bytes_read(lst, blocks, head_dim=D, itemsize=itemsize,
                                       num_kv_heads=Hkv) for lst in lists),
      "union_fraction": jnp.max(blk.union_fraction(lists[-1], blocks), axis=-1),
  }


def attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: TokenLayout, ids: jax.Array, *,
              routed: jax.Array, q_index: Optional[jax.Array] = None,
              scale: Optional[float] = None, config: Optional[KernelConfig] = None,
              unique_ids: bool = False, blocks: Optional[blk.KVBlocks] = None,
              return_stats: bool = False):
  """Gaze attention from selected region ids, with the Pallas kernels.

  Args:
    q: ``[B, T, Hq, D]``; k, v: ``[B, S, Hkv, D]``; layout: TokenLayout ``[B, S]``.
    ids: int32 ``[B, T, Hq, K]`` selected regions (-1 none); rows that do not route ignore them.
    routed: bool ``[B, T]`` routed rows (``gaze_jax.gaze.routed_rows``).
    q_index: int32 ``[B, T]`` slots of the query rows (decode form); None means T == S.
    scale: logit scale, default ``1 / sqrt(D)``.
    config: KernelConfig.
    unique_ids: the caller guarantees that no id repeats within a (row, head) (top-K output);
      otherwise repeats are dropped first (a sort).
    blocks: the layout's KV block table (``build_blocks``), to build it once for many calls.
    return_stats: also return ``read_stats`` (bytes read, union fraction).
  Returns:
    ``[B, T, Hq, D]`` in q's dtype (and the stats dict with ``return_stats``).
  """
  cfg = config or KernelConfig()
  B, T = q.shape[:2]
  S = k.shape[1]
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  slots = q_index is None
  if slots:
    q_index = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  routed = jnp.asarray(routed, bool)
  dense_impl = cfg.dense_rows if slots else None
  keep = None
  if dense_impl is not None:
    all_rows = blk.row_info(layout, q_index, routed)
    dense_row = (all_rows.kind == PATCH) | ((all_rows.kind == TEXT) & (all_rows.routed == 0))
    keep = ~dense_row
  ids = jnp.asarray(ids, jnp.int32)
  if not unique_ids:
    ids = _drop_repeats(ids)
  prep = prepare(q, k, v, layout, ids, routed=routed, q_index=q_index, scale=scale, config=cfg,
                 unique_ids=True, blocks=blocks, keep=keep)
  T_, G, D = prep.shape
  o_p = _core(prep.static, prep.q, prep.k, prep.v, prep.aux)
  out = _unpack_q(o_p, T_, G, D)
  if dense_impl is not None:
    dl = _static_dense_len(layout, routed, cfg.dense_len)
    dense_out = _dense_rows(q, k, v, layout, scale=scale, implementation=dense_impl,
                            dense_len=dl)
    out = jnp.where(dense_row[:, :, None, None], dense_out.astype(out.dtype), out)
  if not return_stats:
    return out
  return out, read_stats(prep, itemsize=jnp.dtype(k.dtype).itemsize)


def select(q_route, k_route, layout: TokenLayout, q_index, routed, *, top_k: int,
           active_k=None, score="dot", routing="head", descriptors=None,
           query_chunk: Optional[int] = None) -> jax.Array:
  """Routing only (plain jnp): selected ids int32 ``[B, T, Hq, K]``, -1 for unrouted rows.
  ``query_chunk`` scores that many rows at a time (bounds the ``[rows, Hq, NR]`` scores)."""
  if descriptors is None:
    descriptors = region_descriptors(k_route, layout)
  pos = jnp.take_along_axis(jnp.asarray(layout.position), jnp.clip(q_index, 0), axis=1)

  def one(qr, p, r):
    return route(qr, descriptors, layout.region_valid, layout.region_last_pos, p, r,
                 top_k=top_k, active_k=active_k, score=score, routing=routing).ids

  B, T = routed.shape
  if query_chunk is None or query_chunk >= T:
    return one(q_route, pos, routed)
  c = int(query_chunk)
  n = -(-T // c)
  padT = n * c - T
  split = lambda x: jnp.moveaxis(
      jnp.pad(x, [(0, 0), (0, padT)] + [(0, 0)] * (x.ndim - 2)).reshape(B, n, c, *x.shape[2:]),
      1, 0)
  ids = jax.lax.map(lambda a: one(*a), (split(q_route), split(pos), split(routed)))
  return jnp.moveaxis(ids, 0, 1).reshape(B, n * c, *ids.shape[3:])[:, :T]


def gaze_attention(q, k, v, q_route, k_route, layout: TokenLayout, *, top_k, active_k=None,
                   score: str = "dot", routing: str = "head", route_prompt: bool = True,
                   q_index=None, descriptors=None, selection=None, scale=None,
                   query_chunk=None, return_selected: bool = False,
                   config: Optional[KernelConfig] = None):
  """``gaze_jax.gaze.gaze_attention`` with the Pallas kernels (same arguments and returns;
  inputs are assumed checked by the caller). ``config`` picks tiles and kernels.

  Under a device mesh (``jax.set_mesh``) the whole call runs in ``jax.shard_map``: XLA cannot
  partition a Pallas kernel (Mosaic refuses; Triton calls would be gathered), and the work is
  independent per example and per KV head. Examples are split over the mesh axes of
  ``config.batch_axes`` and heads over ``config.head_axis``, where they divide the sizes."""
  cfg = config or KernelConfig()
  K = resolve_top_k(top_k, layout.max_regions)
  if selection is not None and isinstance(selection, Selection):
    selection = selection.ids

  def local(q, k, v, q_route, k_route, layout, q_index, descriptors, selection, active_k):
    B, T = q.shape[:2]
    S = k.shape[1]
    qi = q_index if q_index is not None else jnp.broadcast_to(
        jnp.arange(S, dtype=jnp.int32), (B, S))
    routed = routed_rows(token_info(layout, qi), route_prompt)
    if selection is not None:
      ids = jnp.where(routed[:, :, None, None], jnp.asarray(selection), -1).astype(jnp.int32)
    else:
      ids = select(q_route, k_route, layout, qi, routed, top_k=K, active_k=active_k,
                   score=score, routing=routing, descriptors=descriptors,
                   query_chunk=query_chunk)
    out = attention(q, k, v, layout, ids, routed=routed, q_index=q_index, scale=scale,
                    config=cfg, unique_ids=selection is None)
    return out, ids

  args = (q, k, v, q_route, k_route, layout, q_index, descriptors, selection, active_k)
  specs = _mesh_specs(cfg, q, k, args)
  if specs is None:
    out, ids = local(*args)
  else:
    in_specs, out_specs = specs
    present = [a is not None for a in args]
    given = tuple(a for a in args if a is not None)

    def body(*xs):
      it = iter(xs)
      return local(*(next(it) if p else None for p in present))

    out, ids = jax.shard_map(body, in_specs=tuple(sp for sp, p in zip(in_specs, present) if p),
                             out_specs=out_specs, check_vma=False)(*given)
  return (out, ids) if return_selected else out


def _mesh_specs(cfg: KernelConfig, q, k, args):
  """shard_map in/out specs for ``gaze_attention``'s arguments under the context mesh, or None
  when there is no mesh of more than one device (or nothing divides)."""
  from jax.sharding import PartitionSpec as P
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  sizes = dict(mesh.shape)
  B, Hq, Hkv = q.shape[0], q.shape[2], k.shape[2]
  batch, n = [], 1
  for a in cfg.batch_axes:
    if a in sizes and B % (n * sizes[a]) == 0:
      batch.append(a)
      n *= sizes[a]
  head = cfg.head_axis if (cfg.head_axis in sizes and Hkv % sizes[cfg.head_axis] == 0
                           and Hq % sizes[cfg.head_axis] == 0) else None
  bat = tuple(batch) or None
  if bat is None and head is None:
    return None
  per_head = P(bat, None, head, None)           # [B, T or S or NR, heads, D or K]
  layout = args[5]
  # q, k, v, q_route, k_route, layout, q_index, descriptors, selection, active_k
  in_specs = (per_head, per_head, per_head, per_head, per_head,
              jax.tree.map(lambda _: P(bat), layout), P(bat), per_head, per_head, P())
  return in_specs, (per_head, per_head)

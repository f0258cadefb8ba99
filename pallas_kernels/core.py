"""The differentiable core of the gaze kernels: the forward passes, merged by log-sum-exp, under
a ``custom_vjp`` with the FlashAttention-2 backward (``backward_dq`` per tile, ``backward_dkv``
per KV block on the transposed lists), for both kernel families.

Inputs are packed (``plan.prepare``): q ``[B, Hkv, Tp*Gp, Dp]``, k/v ``[B, S', Hkv, Dp]``, and
``aux = (rows, sel, blocks, lists, tlists)``: packed row fields, the selections (bitmasks on the
GPU, ids on the TPU), the KV block table, and per pass its block lists and (when the plan holds
them) their transposes for the dk/dv kernels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from pallas_kernels import blocks as blk
from pallas_kernels import gaze_gpu
from pallas_kernels.common import NEG


@dataclasses.dataclass(frozen=True)
class Pass:
  mode: str          # "base" | "routed" | "full"
  tile_rows: int     # M: packed rows per tile
  splits: int


@dataclasses.dataclass(frozen=True)
class Static:
  passes: tuple
  scale: float
  kernel: str
  interpret: Any
  out_rows: int      # packed rows the forward kernel writes (decode: only the real T * Gp)
  num_warps: Optional[int]
  num_stages: Optional[int]
  bwd_num_warps: Optional[int]
  bwd_num_stages: Optional[int]



def merge(o, lse, axis):
  """Log-sum-exp merge of partial results along ``axis`` (o has one more trailing dim)."""
  m = jnp.max(lse, axis=axis, keepdims=True)
  w = jnp.exp(lse - m)
  l = jnp.sum(w, axis=axis)
  o = jnp.sum(w[..., None] * o, axis=axis) / l[..., None]
  return o, jnp.squeeze(m, axis) + jnp.log(l)


# ---------------------------------------------------------------- the differentiable core


def forward_passes(st: Static, q, k, v, aux):
  rows, sel, blocks, lists, _ = aux
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
        o, lse = merge(o, lse, axis=2)
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
  return merge(jnp.stack(os, 2), jnp.stack(lses, 2), axis=2)


def gaze_tpu():
  """The Mosaic kernels' module (imported on first use: it imports the Pallas TPU dialect)."""
  from pallas_kernels import gaze_tpu as mod
  return mod


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def core(st: Static, q, k, v, aux):
  o, _ = forward_passes(st, q, k, v, aux)
  return o.astype(q.dtype)


def core_fwd(st, q, k, v, aux):
  o, lse = forward_passes(st, q, k, v, aux)
  o = o.astype(q.dtype)
  return o, (q, k, v, aux, o, lse)


def core_bwd(st, res, do):
  q, k, v, aux, o, lse = res
  rows, sel, blocks, lists, tlists = aux
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  do = do.astype(q.dtype)
  dq = jnp.zeros(q.shape, jnp.float32)
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for p, lst, tl in zip(st.passes, lists, tlists):
    if tl is None:
      tl = blk.transpose_lists(lst, blocks.num_regions if p.mode == "routed"
                               else blocks.num_blocks)
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


core.defvjp(core_fwd, core_bwd)

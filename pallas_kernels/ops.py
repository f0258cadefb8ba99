"""The public entry to the gaze kernels: ``gaze_attention`` (routing, then ``attention``) and
``attention`` (from selected region ids), under a device mesh in ``jax.shard_map``.

How a call runs:
  1. Routing (plain jnp, as in the xla path): ids ``[B, T, Hq, K]``, -1 = none; a traced
     ``active_k`` only masks ranks, so the progressive K schedule never recompiles.
  2. The plan (``pallas_kernels.plan``): what depends on the layout only, the KV block table,
     the packed rows, the base pass's lists, built once per forward pass and shared by the
     layers (``gaze_jax.gaze.build_plan``); ``prepare`` adds the selections of this layer.
  3. Kernels: "gpu" = ``gaze_gpu`` (generic Pallas, Triton on the GPU, ``interpret=True`` on
     CPU); "tpu" = ``gaze_tpu`` (Mosaic; ``pltpu.InterpretParams()`` on CPU), under the
     ``custom_vjp`` of ``pallas_kernels.core``.
  4. ``KernelConfig.dense_rows``: the dense rows go to ``jax.nn.dot_product_attention``
     (XLA or cuDNN) or to splash attention on a TPU (``pallas_kernels.splash``).
``pallas_kernels.reference`` is the same contract in plain jnp, for tests.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

from gaze_jax.gaze.chunks import map_query_chunks
from gaze_jax.gaze.dense import causal_attention
from gaze_jax.gaze.layout import PAD, TokenLayout
from gaze_jax.gaze.plan import AttentionPlan
from gaze_jax.gaze.plan import build_plan as gaze_build_plan
from gaze_jax.gaze.regions import region_descriptors
from gaze_jax.gaze.routing import Selection, resolve_k, route
from pallas_kernels import plan as kplan
from pallas_kernels import splash
from pallas_kernels.config import (DECODE_PROGRAMS_PER_SM, DENSE_ROWS, KERNELS,  # noqa: F401
                                   KernelConfig, default_block_k, default_splits,
                                   launch_defaults, mesh_axes, resolve_kernel)
from pallas_kernels.core import core
from pallas_kernels.plan import Prepared, build_blocks, prepare, read_stats  # noqa: F401


def attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: TokenLayout, ids: jax.Array, *,
              plan: kplan.KernelPlan, scale: Optional[float] = None, unique_ids: bool = False,
              return_stats: bool = False):
  """Gaze attention from selected region ids, with the Pallas kernels.

  Args:
    q: ``[B, T, Hq, D]``; k, v: ``[B, S, Hkv, D]``; layout: TokenLayout ``[B, S]``.
    ids: int32 ``[B, T, Hq, K]`` selected regions (-1 none); rows that do not route ignore them.
    plan: the kernels' plan of these rows and their routed rows (``plan.build_plan``, with the
      ``KernelConfig``), built once for many calls (the layers of a forward pass).
    scale: logit scale, default ``1 / sqrt(D)``.
    unique_ids: the caller guarantees that no id repeats within a (row, head) (top-K output);
      otherwise repeats are dropped first (a sort).
    return_stats: also return ``read_stats`` (bytes read, union fraction).
  Returns:
    ``[B, T, Hq, D]`` in q's dtype (and the stats dict with ``return_stats``).
  """
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  prep = prepare(q, k, v, ids, plan, scale=scale, unique=unique_ids)
  out = kplan.unpack_q(core(prep.static, prep.q, prep.k, prep.v, prep.aux), *prep.shape)
  if plan.dense_row is not None:
    impl, fused = splash.dense_rows(plan.tiling.config)
    dense_out = causal_attention(q, k, v, None, layout.position, layout.kind != PAD,
                                 scale=scale, implementation=impl,
                                 length=plan.tiling.dense_len, kernel=fused)
    out = jnp.where(plan.dense_row[:, :, None, None], dense_out.astype(out.dtype), out)
  if not return_stats:
    return out
  return out, read_stats(prep, itemsize=jnp.dtype(k.dtype).itemsize)


def select(q_route, k_route, layout: TokenLayout, q_index, routed, *, top_k: int,
           active_k=None, score="dot", routing="head", descriptors=None,
           query_chunk: Optional[int] = None, position=None, k_ratio=None) -> jax.Array:
  """Routing only (plain jnp): selected ids int32 ``[B, T, Hq, K]``, -1 for unrouted rows.
  ``query_chunk`` scores that many rows at a time (bounds the ``[rows, Hq, NR]`` scores);
  ``position`` (int32 ``[B, T]``, the rows' positions) saves the lookup from ``q_index``;
  ``k_ratio``: a per-example K (``routing.route``)."""
  if descriptors is None:
    descriptors = region_descriptors(k_route, layout)
  if position is None:
    position = jnp.take_along_axis(jnp.asarray(layout.position), jnp.clip(q_index, 0), axis=1)

  def one(qr, p, r):
    return route(qr, descriptors, layout.region_valid, layout.region_last_pos, p, r,
                 top_k=top_k, active_k=active_k, score=score, routing=routing,
                 k_ratio=k_ratio).ids

  if query_chunk is None or query_chunk >= routed.shape[1]:
    return one(q_route, position, routed)
  return map_query_chunks(one, int(query_chunk), q_route, position, routed)


def build_plan(layout: TokenLayout, q_index=None, *, route_prompt: bool = True,
               decode: Optional[bool] = None, heads: tuple, dtype,
               config: Optional[KernelConfig] = None,
               reuse: Optional[AttentionPlan] = None) -> AttentionPlan:
  """The ``AttentionPlan`` of the kernels: ``gaze_jax.gaze.build_plan``'s rows with the
  kernels' part (``pallas_kernels.plan.build_plan``: the KV block table, the packed rows, the
  base pass's lists). ``heads = (Hq, Hkv, D)`` and ``dtype`` size the tiles; ``reuse``: the
  plan of an earlier decode step, whose KV block table is taken as it is."""
  plan = gaze_build_plan(layout, q_index, route_prompt=route_prompt, implementation="pallas",
                         decode=decode, reuse=reuse)
  kernel = kplan.build_plan(layout, None if plan.full_sequence else plan.q_index, plan.routed,
                            heads=heads, dtype=dtype, config=config,
                            blocks=None if reuse is None else reuse.kernel.blocks)
  return dataclasses.replace(plan, kernel=kernel)


def gaze_attention(q, k, v, q_route, k_route, layout: TokenLayout, *, top_k, active_k=None,
                   score: str = "dot", routing: str = "head", route_prompt: bool = True,
                   q_index=None, descriptors=None, selection=None, scale=None,
                   query_chunk=None, return_selected: bool = False,
                   config: Optional[KernelConfig] = None,
                   plan: Optional[AttentionPlan] = None, top_k_per_example: bool = False):
  """``gaze_jax.gaze.gaze_attention`` with the Pallas kernels (same arguments and returns;
  inputs are assumed checked by the caller). ``config`` picks tiles and kernels; ``plan`` is
  the layout's ``AttentionPlan`` of the kernels (``build_plan``; None builds it here, the
  entry point); with ``top_k_per_example`` each example's K (``routing.resolve_k``) is
  computed on its shard.

  Under a device mesh (``jax.set_mesh``) the whole call runs in ``jax.shard_map``: XLA cannot
  partition a Pallas kernel (Mosaic refuses; Triton calls would be gathered), and the work is
  independent per example and per KV head. Examples are split over the mesh axes of
  ``config.batch_axes`` and heads over ``config.head_axis``, where they divide the sizes."""
  cfg = config or KernelConfig()
  rk = resolve_k(top_k, layout.max_regions, per_example=top_k_per_example)
  if selection is not None and isinstance(selection, Selection):
    selection = selection.ids

  B, T, Hq, D = q.shape
  if plan is None:
    plan = build_plan(layout, q_index, route_prompt=route_prompt, heads=(Hq, k.shape[2], D),
                      dtype=q.dtype, config=cfg)
  if plan.kernel is None:
    raise ValueError("the plan has no kernel part: build it with pallas_kernels.ops.build_plan")

  def local(q, k, v, q_route, k_route, layout, plan, descriptors, selection, active_k):
    routed = plan.routed
    if selection is not None:
      ids = jnp.where(routed[:, :, None, None], jnp.asarray(selection), -1).astype(jnp.int32)
    else:
      ids = select(q_route, k_route, layout, plan.q_index, routed, top_k=rk.k_max,
                   active_k=active_k, score=score, routing=routing, descriptors=descriptors,
                   query_chunk=query_chunk, position=plan.query.position, k_ratio=rk.ratio)
    out = attention(q, k, v, layout, ids, plan=plan.kernel, scale=scale,
                    unique_ids=selection is None)
    return out, ids

  args = (q, k, v, q_route, k_route, layout, plan, descriptors, selection, active_k)
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
  """shard_map in/out specs for ``gaze_attention``'s arguments (``mesh_axes``), or None."""
  from jax.sharding import PartitionSpec as P
  axes = mesh_axes(cfg, q.shape[0], q.shape[2], k.shape[2])
  if axes is None:
    return None
  bat, head = axes
  per_head = P(bat, None, head, None)           # [B, T or S or NR, heads, D or K]
  per_example = lambda tree: jax.tree.map(lambda _: P(bat), tree)
  # q, k, v, q_route, k_route, layout, plan, descriptors, selection, active_k
  in_specs = (per_head, per_head, per_head, per_head, per_head, per_example(args[5]),
              per_example(args[6]), per_head, per_head, P())
  return in_specs, (per_head, per_head)

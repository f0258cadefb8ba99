"""``gaze_attention``: the public entry point of the method in plain jnp ("xla" and "reference"),
with input checks. The Pallas kernels have their own entry with the same arguments
(``pallas_kernels.ops.gaze_attention``), and the model's attention chooses between them
(``gaze_jax.model.attention``): this package never imports the kernels."""

from __future__ import annotations

import math
from typing import Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from gaze_jax.gaze.chunks import map_query_chunks
from gaze_jax.gaze.dense import causal_attention
from gaze_jax.gaze.layout import PAD, TokenLayout
from gaze_jax.gaze.masks import base_mask, routed_rows, token_info
from gaze_jax.gaze.plan import AttentionPlan, build_plan
from gaze_jax.gaze.reference import reference_attention
from gaze_jax.gaze.regions import region_descriptors
from gaze_jax.gaze.routing import ROUTINGS, SCORES, Selection, resolve_k, route, unique_ids
from gaze_jax.gaze.xla import xla_attention

# The implementations of this entry point ("pallas": ``pallas_kernels.ops.gaze_attention``).
JNP_IMPLEMENTATIONS = ("reference", "xla")


def _check_inputs(q, k, v, q_route, k_route, layout, q_index, descriptors, selection):
  """Raises ValueError naming the argument whose type, rank or shape is wrong (chex asserts
  with our message appended; ValueError, not chex's AssertionError, as for every bad input)."""
  if not isinstance(layout, TokenLayout):
    raise ValueError(f"layout must be a TokenLayout, got {type(layout).__name__}")
  err = dict(exception_type=ValueError)
  chex.assert_rank(q, 4, custom_message="q must be [B, T, Hq, D]", **err)
  B, T, Hq, D = q.shape
  chex.assert_shape(k, (B, None, None, D), custom_message=f"k must be [B={B}, S, Hkv, D={D}]",
                    **err)
  chex.assert_equal_shape([k, v], custom_message="k and v must both be [B, S, Hkv, D]", **err)
  S, Hkv = k.shape[1], k.shape[2]
  chex.assert_is_divisible(Hq, Hkv, custom_message=f"query heads Hq={Hq} must be a multiple of "
                           f"KV heads Hkv={Hkv}", **err)
  chex.assert_shape(layout.kind, (B, S), custom_message=f"layout must be [B, S] = {(B, S)} "
                    "like k", **err)
  if q_index is None:
    chex.assert_axis_dimension(q, 1, S, custom_message=f"q has T={T} rows but the cache has "
                               f"S={S} slots: pass q_index (the slots of the queries) for the "
                               "decode form", **err)
  else:
    chex.assert_shape(q_index, (B, T), custom_message=f"q_index must be [B, T] = {(B, T)}",
                      **err)
  if selection is None:
    chex.assert_shape(q_route, (B, T, Hq, None), custom_message=f"q_route must be [B={B}, "
                      f"T={T}, Hq={Hq}, Dr]", **err)
    Dr = q_route.shape[3]
    if descriptors is None:
      chex.assert_shape(k_route, (B, S, Hkv, Dr), custom_message=f"k_route (or descriptors) "
                        f"must be [B={B}, S={S}, Hkv={Hkv}, Dr={Dr}]", **err)
    else:
      chex.assert_shape(descriptors, (B, layout.max_regions, Hkv, Dr), custom_message=
                        f"descriptors must be [B={B}, NR={layout.max_regions}, Hkv={Hkv}, "
                        f"Dr={Dr}]", **err)
  else:
    ids = selection.ids if isinstance(selection, Selection) else selection
    chex.assert_shape(ids, (B, T, Hq, None), custom_message=f"selection ids must be [B={B}, "
                      f"T={T}, Hq={Hq}, K]", **err)


def gaze_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_route: Optional[jax.Array],
                   k_route: Optional[jax.Array], layout: TokenLayout, *, top_k,
                   active_k=None, score: str = "dot", routing: str = "head",
                   route_prompt: bool = True, q_index: Optional[jax.Array] = None,
                   descriptors: Optional[jax.Array] = None, selection=None,
                   decode: Optional[bool] = None, scale: Optional[float] = None,
                   query_chunk: Optional[int] = None, implementation: str = "xla",
                   plan: Optional[AttentionPlan] = None, top_k_per_example: bool = False,
                   causal_kernel=None, return_selected: bool = False):
  """Gaze attention (docs/method.md): each text query attends to causal text, all earlier context
  tokens and the patches of its top-K regions; patch rows are dense causal and context rows see
  their own frame.

  Args:
    q: ``[B, T, Hq, D]`` queries after RoPE.
    k, v: ``[B, S, Hkv, D]`` keys (after RoPE) and values of all S slots of the layout (the KV
      cache in the decode form). Query head h reads KV head ``h // (Hq // Hkv)``.
    q_route: ``[B, T, Hq, Dr]`` queries before RoPE, for the routing score.
    k_route: ``[B, S, Hkv, Dr]`` keys before RoPE; may be None when ``descriptors`` is given.
    layout: TokenLayout of the S slots.
    top_k: static K_max: an int count or a float ratio of ``layout.max_regions``.
    active_k: optional traced int <= K_max (progressive schedule, no recompilation).
    score: "dot" (default) or "cosine".
    routing: "head" (each query head routes, default) or "group" (a GQA group routes together
      on the sum of its heads' scores).
    route_prompt: False routes only generated text (``Text(generated=True)``); prompt text is
      then dense causal.
    q_index: int32 ``[B, T]`` slots of the query rows. None means T == S, row t is slot t
      (training / prefill). Given, it is the decode form.
    descriptors: ``[B, NR, Hkv, Dr]`` from ``region_descriptors``; cache them at prefill so that
      decode steps do not recompute them.
    selection: optional precomputed Selection (or int32 ids ``[B, T, Hq, K']``, -1 = none) used
      instead of routing, e.g. regions fixed once from the question.
    decode: the xla path reads only text/context slots plus selected regions (exact when every
      query is a routed text token). Default: ``q_index is not None``.
    scale: logit scale, default ``1 / sqrt(D)``.
    query_chunk: process this many query rows at a time (bounds memory of scores and gathers).
    implementation: "xla" (gather, default) or "reference" (dense masked); the Pallas
      kernels: ``pallas_kernels.ops.gaze_attention`` (same arguments).
    plan: the layout's ``AttentionPlan`` (``build_plan``) for these rows and options: build it
      once per forward pass and pass it to every layer; None builds it here.
    top_k_per_example: ``top_k`` is a ratio applied per example, the paper's semantics: example
      b keeps ``ceil(top_k * its valid regions)`` (``routing.per_example_k``, with
      ``active_k`` a count of the batch's ``max_regions`` that lowers it from all regions)
      under the static K_max = all regions.
    causal_kernel: "xla", full-sequence form: a fused index-causal kernel for the patch rows
      (``dense.causal_attention``'s ``kernel``, e.g. splash attention on a TPU); None:
      ``jax.nn.dot_product_attention``.
    return_selected: also return the selected region ids.
  Returns:
    ``out [B, T, Hq, D]`` in q's dtype, and with ``return_selected`` also int32 ids
    ``[B, T, Hq, K]`` (-1 = none; rows that do not route select nothing).
  """
  if implementation == "pallas":
    raise ValueError("gaze_jax.gaze.gaze_attention runs the method in jnp; the Pallas kernels "
                     "take the same arguments in pallas_kernels.ops.gaze_attention (the model "
                     "chooses by GazeConfig.implementation)")
  if implementation not in JNP_IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {JNP_IMPLEMENTATIONS}, got "
                     f"{implementation!r}")
  if score not in SCORES:
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")
  if routing not in ROUTINGS:
    raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
  _check_inputs(q, k, v, q_route, k_route, layout, q_index, descriptors, selection)
  rk = resolve_k(top_k, layout.max_regions, per_example=top_k_per_example)
  K, k_ratio = rk.k_max, rk.ratio
  if isinstance(active_k, (int, np.integer)):  # a traced active_k is clipped by the ranks
    if not 0 <= int(active_k) <= K:
      raise ValueError(f"active_k={int(active_k)} must be in [0, top_k={K}]")
  B, T, Hq, D = q.shape
  if decode is None:
    decode = q_index is not None
  if plan is None:
    plan = build_plan(layout, q_index, route_prompt=route_prompt, implementation=implementation,
                      decode=decode)
  plan.check(rows=(B, T), implementation=implementation, route_prompt=route_prompt,
             decode=decode)
  if scale is None:
    scale = 1.0 / math.sqrt(D)
  if selection is not None:
    sel_ids = selection.ids if isinstance(selection, Selection) else jnp.asarray(selection)
  else:
    sel_ids = None
    if descriptors is None:
      descriptors = region_descriptors(k_route, layout)

  def rows(q_blk, query, routed, qr_blk, ids_blk):
    if ids_blk is None:
      sel = route(qr_blk, descriptors, layout.region_valid, layout.region_last_pos,
                  query.position, routed, top_k=K, active_k=active_k, score=score,
                  routing=routing, k_ratio=k_ratio)
    else:
      sel = Selection(ids=unique_ids(jnp.where(routed[:, :, None, None], ids_blk, -1)))
    if implementation == "reference":
      out = reference_attention(q_blk, k, v, layout, query, routed, sel, scale=scale)
    else:
      base = base_mask(query, plan.key, routed)     # per layer: cheaper than holding it
      out = xla_attention(q_blk, k, v, layout, query, routed, base, sel, scale=scale,
                          decode=decode, group_routing=routing == "group" and ids_blk is None)
    return out, sel.ids

  row_plan = (plan.query, plan.routed)
  route_in = (q_route, None) if sel_ids is None else (None, sel_ids)
  split = (implementation == "xla" and q_index is None
           and layout.spec.max_nonvisual < layout.seq_len)
  if split:
    # The full-sequence form's rows are mostly patch rows, plain dense causal attention: the
    # dense kernel gives those, and gaze attention runs for the text and context rows only
    # (the layout bounds them: spec.max_nonvisual, e.g. TokenLayout.for_decoding).
    nv = layout.nonvisual_index                                            # [B, N], -1 pad
    take = lambda x: None if x is None else jnp.take_along_axis(
        x, jnp.clip(nv, 0).reshape(nv.shape + (1,) * (x.ndim - 2)), axis=1)
    query = token_info(layout, nv)
    row_plan = (query, routed_rows(query, route_prompt))
    q_rows, route_in = take(q), tuple(take(x) for x in route_in)
  else:
    q_rows = q
  if query_chunk is None or query_chunk >= q_rows.shape[1]:
    out, ids = rows(q_rows, *row_plan, *route_in)
  else:
    out, ids = map_query_chunks(rows, int(query_chunk), q_rows, *row_plan, *route_in)
  if split:
    dense = causal_attention(q, k, v, None, layout.position, layout.kind != PAD, scale=scale,
                             kernel=causal_kernel)
    b = jnp.arange(B)[:, None]
    slot = jnp.where(nv >= 0, nv, T)                    # padding rows land out of range
    out = dense.at[b, slot].set(out, mode="drop")
    ids = jnp.full((B, T) + ids.shape[2:], -1, ids.dtype).at[b, slot].set(ids, mode="drop")
  return (out, ids) if return_selected else out

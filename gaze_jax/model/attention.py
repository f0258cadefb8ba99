"""Decoder self-attention: dense or gaze, for full sequences, prefill and decode.

The pre-RoPE q and k (after the Qwen3 q/k norm) are the routing inputs of gaze attention
(docs/method.md steps 3-4). The KV cache is a fixed-size ``[B, S, Hkv, D]`` buffer per layer,
written with ``dynamic_update_slice``; gaze region descriptors are computed at prefill and kept
in the cache, never recomputed while decoding.

This module is the one place that picks how attention runs (as MaxText's
``AttentionOp.apply_attention``): ``attention_plan`` and ``apply_gaze_attention`` send gaze
attention to the method in jnp (``gaze_jax.gaze``: "xla", "reference") or to the Pallas kernels
(``pallas_kernels.ops``: "pallas"), and ``dense_attention`` sends dense rows to XLA, cuDNN or
splash attention (``pallas_kernels.splash.dense_rows``). The method never imports the kernels;
the kernels build on the method.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from gaze_jax.gaze import PAD, TokenLayout, causal_attention, gaze_attention, region_descriptors
from gaze_jax.gaze.plan import AttentionPlan, build_plan
from pallas_kernels import ops as pallas_ops
from pallas_kernels import splash
from gaze_jax.model.config import DecoderConfig, GazeConfig
from gaze_jax.model.layers import RMSNorm, dense, rope
from gaze_jax.model.offload import OffloadedCache, offloaded_attention
from gaze_jax.model.partitioning import constrain


@dataclasses.dataclass(frozen=True)
class LayerCache:
  """One layer's KV cache: k, v ``[B, S, Hkv, D]`` (k after RoPE); descriptors
  ``[B, NR, Hkv, D]`` (gaze only, else None)."""
  k: Any
  v: Any
  descriptors: Any = None


jax.tree_util.register_dataclass(LayerCache, data_fields=["k", "v", "descriptors"],
                                 meta_fields=[])


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                    k_pos: jax.Array, k_valid: jax.Array, kernel_config=None) -> jax.Array:
  """Plain causal attention by position (the dense baseline), by ``causal_attention``.

  q ``[B, T, Hq, D]``, k/v ``[B, S, Hkv, D]``, q_pos ``[B, T]``, k_pos / k_valid ``[B, S]``
  -> ``[B, T, Hq, D]``. T == S is the full-sequence form: the queries are the S slots, so
  ``q_pos`` must equal ``k_pos``; T < S is the decode form (any ``q_pos``).
  ``kernel_config`` (``GazeConfig.kernel``): its ``dense_rows`` picks the implementation
  (None: cuDNN on a CUDA GPU, splash on a TPU, else XLA: ``splash.dense_rows``).
  """
  # The full form runs the fused kernel causally on the position-sorted sequence, no mask.
  full = q.shape[1] == k.shape[1]
  impl, fused = splash.dense_rows(kernel_config)
  return causal_attention(q, k, v, None if full else q_pos, k_pos, k_valid,
                          implementation=impl, kernel=fused)


def attention_plan(cfg: DecoderConfig, gaze: GazeConfig, layout: TokenLayout,
                   q_index: Optional[jax.Array] = None, dtype=jnp.float32, reuse=None,
                   offloaded: bool = False):
  """The gaze ``AttentionPlan`` that every layer of one forward pass shares (None for dense
  attention). q_index: int32 ``[B, T]`` slots of the query rows (None: T == S); reuse: the
  plan of an earlier decode step, whose layout-only parts are taken as they are; offloaded: a
  decode step against ``OffloadedCache``s, which attends as the xla path does."""
  if gaze.attention != "gaze":
    return None
  if gaze.implementation == "pallas" and not offloaded:
    return pallas_ops.build_plan(layout, q_index, route_prompt=gaze.route_prompt,
                                 heads=(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim),
                                 dtype=dtype, config=gaze.kernel, reuse=reuse)
  return build_plan(layout, q_index, route_prompt=gaze.route_prompt,
                    implementation="xla" if offloaded else gaze.implementation, reuse=reuse)


def apply_gaze_attention(q, k, v, q_route, layout: TokenLayout, gaze: GazeConfig, *,
                         q_index=None, descriptors=None, active_k=None, selection=None,
                         plan: AttentionPlan):
  """Gaze attention of one layer by ``gaze.implementation``: the Pallas kernels
  (``pallas_kernels.ops.gaze_attention`` with ``gaze.kernel``) or the method in jnp
  (``gaze_jax.gaze.gaze_attention``, its full-sequence patch rows through the backend's fused
  dense kernel). ``plan``: ``attention_plan`` of these rows. Returns ``(out, selected ids)``."""
  kw = dict(top_k=gaze.top_k, top_k_per_example=gaze.top_k_per_example, active_k=active_k,
            score=gaze.score, routing=gaze.routing, route_prompt=gaze.route_prompt,
            q_index=q_index, descriptors=descriptors, selection=selection,
            query_chunk=gaze.query_chunk, plan=plan, return_selected=True)
  if gaze.implementation == "pallas":
    return pallas_ops.gaze_attention(q, k, v, q_route, None, layout, **kw, config=gaze.kernel)
  return gaze_attention(q, k, v, q_route, None, layout, **kw,
                        implementation=gaze.implementation,
                        causal_kernel=splash.dense_rows(None)[1])


def rope_positions(cfg: DecoderConfig, layout: TokenLayout,
                   q_index: Optional[jax.Array] = None) -> jax.Array:
  """The positions RoPE rotates the rows by: ``layout.position`` ``[B, T]``, or with M-RoPE
  (``cfg.mrope_section``) the triples ``layout.rope_position`` ``[B, T, 3]``; the rows are the
  slots ``q_index`` (int32 ``[B, T]``, decode) or all S slots (None). Raises ValueError for an
  M-RoPE decoder given a layout without triples (built without ``LayoutSpec.mrope``)."""
  if cfg.mrope_section is None:
    pos = layout.position
  else:
    pos = layout.rope_position
    if pos is None:
      raise ValueError("an M-RoPE decoder (DecoderConfig.mrope_section) needs the layout's "
                       "position triples: build it with LayoutSpec(mrope=True) "
                       "(model.layout_spec does)")
  if q_index is None:
    return pos
  index = q_index if pos.ndim == 2 else q_index[..., None]
  return jnp.take_along_axis(pos, index, axis=1)


def write_cache(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  """Writes ``new [B, T, ...]`` into ``buf [B, S, ...]`` at per-example slot ``start [B]``."""
  def one(b, n, s):
    return jax.lax.dynamic_update_slice_in_dim(b, n.astype(b.dtype), s, axis=0)
  return jax.vmap(one)(buf, new, start)


class Attention(nnx.Module):
  """GQA self-attention with RoPE, optional qkv bias (Qwen2) and q/k norm (Qwen3)."""

  def __init__(self, cfg: DecoderConfig, gaze: GazeConfig, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    self.cfg, self.gaze = cfg, gaze
    E, H, Hkv, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = dense(E, H * D, ("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
    self.k_proj = dense(E, Hkv * D, ("embed", "kv_heads"), use_bias=cfg.qkv_bias, **kw)
    self.v_proj = dense(E, Hkv * D, ("embed", "kv_heads"), use_bias=cfg.qkv_bias, **kw)
    self.o_proj = dense(H * D, E, ("heads", "embed"), use_bias=False, **kw)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(D, cfg.rms_norm_eps, name="head_dim", param_dtype=param_dtype)
      self.k_norm = RMSNorm(D, cfg.rms_norm_eps, name="head_dim", param_dtype=param_dtype)

  def __call__(self, x: jax.Array, layout: TokenLayout, *, cache: Optional[LayerCache] = None,
               q_index: Optional[jax.Array] = None, active_k=None, want_cache: bool = False,
               return_selected: bool = False, selection: Optional[jax.Array] = None,
               plan: Optional[AttentionPlan] = None):
    """Self-attention.

    Args:
      x: ``[B, T, E]``; T == S (full sequence / prefill) unless ``q_index`` is given.
      layout: TokenLayout of the S slots.
      cache: the layer's cache, for decoding: the new tokens' k/v are written at ``q_index``
        (consecutive slots per example) and attention reads the whole cache.
      q_index: int32 ``[B, T]`` slots of the new tokens (decode form).
      active_k: traced K for the progressive schedule (gaze only).
      want_cache: return a LayerCache of this pass (prefill).
      return_selected: return the selected region ids ``[B, T, Hq, K]`` (gaze only).
      selection: region ids ``[B, T, Hq, K']`` (-1 = none) used instead of routing (gaze only),
        e.g. regions fixed once from the question (the KV-eviction baseline).
      plan: the gaze ``AttentionPlan`` of these rows (``attention_plan``), shared by the layers
        of a forward pass; None builds it here (the model's entry to attention).
    Returns:
      ``(y [B, T, E], cache or None, selected ids or None)``.
    """
    cfg, gz = self.cfg, self.gaze
    B, T, _ = x.shape
    H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = self.q_proj(x).reshape(B, T, H, D)
    k = self.k_proj(x).reshape(B, T, Hkv, D)
    v = self.v_proj(x).reshape(B, T, Hkv, D)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    # Causality is by the 1-D positions; RoPE rotates by them, or by the M-RoPE triples.
    positions = layout.position if q_index is None else jnp.take_along_axis(
        layout.position, q_index, axis=1)
    rotary = rope_positions(cfg, layout, q_index)
    q_pre, k_pre = q, k
    q = rope(q, rotary, cfg.rope_theta, cfg.rope_scaling, cfg.mrope_section,
             cfg.mrope_interleaved)
    k = rope(k, rotary, cfg.rope_theta, cfg.rope_scaling, cfg.mrope_section,
             cfg.mrope_interleaved)
    q, k, v = constrain(q, "q"), constrain(k, "kv"), constrain(v, "kv")

    if isinstance(cache, OffloadedCache):
      if q_index is None or selection is not None or gz.attention != "gaze":
        raise ValueError("an offloaded cache is read by gaze decode steps that route (q_index, "
                         "no fixed selection)")
      out, selected, new_cache = offloaded_attention(q, k, v, q_pre, cache, layout, gz,
                                                     q_index=q_index, plan=plan,
                                                     active_k=active_k)
      y = self.o_proj(constrain(out, "q").reshape(B, T, H * D))
      return y, new_cache, (selected if return_selected else None)
    descriptors = None
    if cache is not None:
      if q_index is None:
        raise ValueError("decoding with a cache needs q_index")
      k_all = write_cache(cache.k, k, q_index[:, 0])
      v_all = write_cache(cache.v, v, q_index[:, 0])
      descriptors = cache.descriptors
      if gz.attention == "gaze" and descriptors is None:
        raise ValueError("gaze decoding needs the region descriptors cached at prefill")
    else:
      k_all, v_all = k, v
    if gz.attention == "gaze" and descriptors is None:
      descriptors = region_descriptors(k_pre, layout)

    selected = None
    if gz.attention == "dense":
      out = dense_attention(q, k_all, v_all, positions, layout.position, layout.kind != PAD,
                            kernel_config=gz.kernel)
    else:
      if plan is None:
        plan = attention_plan(cfg, gz, layout, q_index, dtype=q.dtype)
      out, selected = apply_gaze_attention(q, k_all, v_all, q_pre, layout, gz, q_index=q_index,
                                           descriptors=descriptors, active_k=active_k,
                                           selection=selection, plan=plan)
    y = self.o_proj(constrain(out, "q").reshape(B, T, H * D))
    new_cache = None
    if want_cache or cache is not None:
      new_cache = LayerCache(k=k_all, v=v_all, descriptors=descriptors)
    return y, new_cache, (selected if return_selected else None)

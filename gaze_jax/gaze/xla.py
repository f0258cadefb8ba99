"""Gather-based gaze attention in plain XLA.

Each routed row attends to two key sets under one softmax:
  A. keys addressed by slot: in the decode form only the text and context slots
     (``layout.nonvisual_index``, ``N_nv`` of them), otherwise all S slots (patch and context
     rows need them: they are dense);
  B. the patches of its selected regions, gathered as ``K`` contiguous blocks of ``R`` slots
     from ``layout.region_first``.
So a decode query reads ``N_nv + K * R`` keys per head and never forms a ``[T, S]`` mask over
the visual part. With ``routing="group"`` the blocks are gathered once per KV head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gaze_jax.gaze.layout import TokenLayout
from gaze_jax.gaze.masks import TokenInfo, masked_softmax, region_rule
from gaze_jax.gaze.routing import Selection

_HI = jax.lax.Precision.HIGHEST


def _slot_keys(k, v, layout: TokenLayout, decode: bool):
  """Key set A: k, v ``[B, Na, Hkv, D]`` (the plan holds their fields and the base mask)."""
  if not decode:
    return k, v
  index = jnp.clip(layout.nonvisual_index, 0)[:, :, None, None]      # [B, N_nv, 1, 1]
  return jnp.take_along_axis(k, index, axis=1), jnp.take_along_axis(v, index, axis=1)


def region_block_mask(layout: TokenLayout, ids: jax.Array, query: TokenInfo,
                      routed: jax.Array, slot=None) -> jax.Array:
  """Which keys of the selected regions' blocks a row may read: bool ``[B, T, Hs, K * R]`` for
  region ids ``[B, T, Hs, K]`` (-1: none), by ``masks.region_rule`` (causal by position, the
  region's frame seen by context rows). ``slot``: the blocks' slots when already made
  (``_block_slots``)."""
  B, T, Hs, K = ids.shape
  slot = (_block_slots(layout, ids) if slot is None else slot).reshape(B, -1)
  kind = jnp.take_along_axis(layout.kind, slot, axis=1).reshape(B, T, Hs, -1)
  pos = jnp.take_along_axis(layout.position, slot, axis=1).reshape(B, T, Hs, -1)
  chosen = jnp.repeat(ids >= 0, layout.region_size, axis=-1)
  q4 = lambda a: a[:, :, None, None]
  return chosen & region_rule(q4(query.kind), q4(query.position), q4(routed), kind, pos)


def _block_slots(layout: TokenLayout, ids: jax.Array) -> jax.Array:
  """The slots of the selected regions' blocks: int ``[B, T, Hs, K * R]`` for ids
  ``[B, T, Hs, K]`` (each region's R patches are contiguous from ``layout.region_first``)."""
  B, T, Hs, K = ids.shape
  R = layout.region_size
  first = jnp.take_along_axis(layout.region_first, jnp.clip(ids, 0).reshape(B, -1), axis=1)
  slot = first.reshape(B, T, Hs, K, 1) + jnp.arange(R)                # [B, T, Hs, K, R]
  return jnp.clip(slot, 0, layout.seq_len - 1).reshape(B, T, Hs, K * R)


def _region_blocks(k, v, layout: TokenLayout, ids: jax.Array, query: TokenInfo,
                   routed: jax.Array, heads_per_gather: int):
  """Key set B: the selected regions' K/V blocks.

  Args:
    ids: int32 ``[B, T, Hs, K]`` region ids (-1: none) for Hs gathered heads.
    heads_per_gather: query heads per KV head among the Hs heads (1 when Hs == Hkv).
  Returns:
    k, v ``[B, T, Hs, K * R, D]`` and a bool mask ``[B, T, Hs, K * R]``.
  """
  Hs = ids.shape[2]
  slot = _block_slots(layout, ids)
  kv_head = jnp.arange(Hs) // heads_per_gather

  def gather(x):  # x [B, S, Hkv, D] -> [B, T, Hs, K * R, D]
    return jax.vmap(lambda xb, sb: xb[sb, kv_head[None, :, None]])(x, slot)

  return gather(k), gather(v), region_block_mask(layout, ids, query, routed, slot)


def attend(qg: jax.Array, ka: jax.Array, va: jax.Array, mask_a: jax.Array, kb: jax.Array,
           vb: jax.Array, mask_b: jax.Array, *, scale: float, grouped: bool) -> jax.Array:
  """One softmax over the two key sets of a gaze row.

  qg ``[B, T, Hkv, G, D]``; set A: ka, va ``[B, Na, Hkv, D]`` with mask_a broadcastable to
  ``[B, T, Hkv, G, Na]``; set B: the region blocks, per KV head (``grouped``: kb, vb
  ``[B, T, Hkv, N, D]``, mask_b ``[B, T, Hkv, 1, N]``) or per query head (kb, vb ``[B, T, Hkv,
  G, N, D]``, mask_b ``[B, T, Hkv, G, N]``). Returns float32 ``[B, T, Hkv, G, D]``."""
  f32 = jnp.float32
  logits_a = jnp.einsum("btkgd,bskd->btkgs", qg, ka, precision=_HI, preferred_element_type=f32)
  blocks = "btknd" if grouped else "btkgnd"
  logits_b = jnp.einsum(f"btkgd,{blocks}->btkgn", qg, kb, precision=_HI,
                        preferred_element_type=f32)
  n_a = logits_a.shape[-1]
  mask = jnp.concatenate([jnp.broadcast_to(mask_a, logits_a.shape),
                          jnp.broadcast_to(mask_b, logits_b.shape)], axis=-1)
  p = masked_softmax(jnp.concatenate([logits_a, logits_b], axis=-1) * scale, mask)
  p_a, p_b = p[..., :n_a], p[..., n_a:]
  out = jnp.einsum("btkgs,bskd->btkgd", p_a, va.astype(f32), precision=_HI)
  return out + jnp.einsum(f"btkgn,{blocks}->btkgd", p_b, vb.astype(f32), precision=_HI)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: TokenLayout,
                  query: TokenInfo, routed: jax.Array, base: jax.Array, selection: Selection, *,
                  scale: float, decode: bool, group_routing: bool) -> jax.Array:
  """Gaze attention by gathering. q ``[B, T, Hq, D]``, k/v ``[B, S, Hkv, D]`` -> ``[B, T, Hq, D]``.

  ``query`` and ``routed`` are the rows' part of the attention plan (``gaze_jax.gaze.plan``),
  ``base`` (bool ``[B, T, Na]``) their base mask over key set A (the plan's keys).

  ``decode=True`` reads only text/context slots besides the selected regions; it is exact when
  every query row is a routed text row (or padding), as generated tokens are.
  ``group_routing=True`` requires ``selection`` to be shared by the heads of each GQA group.
  """
  B, T, Hq, D = q.shape
  Hkv = k.shape[2]
  G = Hq // Hkv
  qg = q.reshape(B, T, Hkv, G, D)
  ka, va = _slot_keys(k, v, layout, decode)
  mask_a = base[:, :, None, None, :]                                  # [B, T, 1, 1, Na]
  if group_routing:
    ids = selection.ids.reshape(B, T, Hkv, G, -1)[:, :, :, 0]          # [B, T, Hkv, K]
    kb, vb, mask_b = _region_blocks(k, v, layout, ids, query, routed, 1)
    mask_b = mask_b[:, :, :, None, :]
  else:
    kb, vb, mask_b = _region_blocks(k, v, layout, selection.ids, query, routed, G)
    kb = kb.reshape(B, T, Hkv, G, *kb.shape[3:])
    vb = vb.reshape(B, T, Hkv, G, *vb.shape[3:])
    mask_b = mask_b.reshape(B, T, Hkv, G, -1)
  out = attend(qg, ka, va, mask_a, kb, vb, mask_b, scale=scale, grouped=group_routing)
  return out.reshape(B, T, Hq, D).astype(q.dtype)

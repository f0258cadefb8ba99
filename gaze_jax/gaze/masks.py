"""Which keys each query row may see (docs/method.md steps 6 to 8), apart from the routed regions.

Rows by kind of query token:
  * PATCH rows: plain dense causal attention, as in the dense model.
  * CTX rows: the patches of their own image/frame, plus the context tokens of that frame up to
    and including themselves.
  * TEXT rows that are routed: causal text keys and all earlier context tokens here; the
    selected regions' patches are added by the caller (``selected`` below, or a gather).
  * TEXT rows that are not routed (prompt rows with ``route_prompt=False``): dense causal.
  * PAD rows: nothing (their output is zero).
All causality is by RoPE position; PAD keys are never visible.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from gaze_jax.gaze.layout import CTX, PAD, PATCH, TEXT, TokenLayout


@dataclasses.dataclass(frozen=True)
class TokenInfo:
  """Per-token fields of some slots, ``[B, N]`` each; slots ``< 0`` read as PAD."""
  kind: Any
  position: Any
  frame: Any
  region: Any
  generated: Any


jax.tree_util.register_dataclass(
    TokenInfo, data_fields=["kind", "position", "frame", "region", "generated"], meta_fields=[])


def token_info(layout: TokenLayout, index: jax.Array) -> TokenInfo:
  """Fields of the slots ``index`` (int32 ``[B, N]``; -1 = padding query/key)."""
  ok = index >= 0
  idx = jnp.clip(index, 0, layout.seq_len - 1)
  take = lambda a: jnp.take_along_axis(a, idx, axis=1)
  return TokenInfo(
      kind=jnp.where(ok, take(layout.kind), PAD),
      position=take(layout.position),
      frame=jnp.where(ok, take(layout.frame), -1),
      region=jnp.where(ok, take(layout.region), -1),
      generated=ok & take(layout.generated),
  )


def routed_rows(query: TokenInfo, route_prompt: bool) -> jax.Array:
  """Rows that route (docs/method.md step 8): text rows, or only generated text rows when
  ``route_prompt`` is False; not the newline rows of an image (text slots with a frame id,
  ``Image(newline_rows=True)``), which attend densely as its patch rows do. bool ``[B, T]``."""
  routed = (query.kind == TEXT) & (query.frame < 0)
  if not route_prompt:
    routed &= query.generated
  return routed


def base_rule(qkind, qpos, qframe, qrouted, kkind, kpos, kframe):
  """The visibility rules without the routed regions, elementwise (the one definition that the
  xla, reference and kernel paths all use).

  Every argument is an int (or bool, for ``qrouted``) array; they broadcast, so query fields
  ``[..., T, 1]`` with key fields ``[..., 1, N]`` give ``[..., T, N]`` (and the kernels' row
  ``[M, 1]`` x key ``[1, BK]`` tiles, or the transposed ``[BK, 1]`` x ``[1, M]``). ``qrouted``
  marks routed rows (``routed_rows``). PAD rows and PAD keys are never visible.
  """
  causal = kpos <= qpos
  routed = (qkind == TEXT) & (qrouted != 0)
  dense = (qkind == PATCH) | ((qkind == TEXT) & (qrouted == 0))
  k_ctx = kkind == CTX
  return ((dense & causal & (kkind != PAD))
          | ((qkind == CTX) & (kframe == qframe) & ((kkind == PATCH) | (k_ctx & causal)))
          | (routed & causal & ((kkind == TEXT) | k_ctx)))


def region_rule(qkind, qpos, qrouted, kkind, kpos):
  """Elementwise: the key is a patch that the row sees if it selected the key's region (a
  routed text row and a causal patch key; broadcasting as in ``base_rule``)."""
  return (qkind == TEXT) & (qrouted != 0) & (kkind == PATCH) & (kpos <= qpos)


def base_mask(query: TokenInfo, key: TokenInfo, routed: jax.Array) -> jax.Array:
  """Visibility of ``key`` slots for ``query`` rows, without the routed regions.

  Args:
    query: ``[B, T]`` fields of the query rows.
    key: ``[B, N]`` fields of the key slots.
    routed: bool ``[B, T]`` from ``routed_rows``.
  Returns:
    bool ``[B, T, N]``. For routed rows it holds text and context keys only.
  """
  qk = lambda a: a[:, :, None]
  kk = lambda a: a[:, None, :]
  return base_rule(qk(query.kind), qk(query.position), qk(query.frame), qk(routed),
                   kk(key.kind), kk(key.position), kk(key.frame))


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the last axis restricted to ``mask``; a row with no visible key gets all
  zeros (so its output and gradients are zero, never NaN)."""
  logits = jnp.where(mask, logits.astype(jnp.float32), -1e30)
  p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)) * mask
  denom = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(denom > 0, denom, 1.0)

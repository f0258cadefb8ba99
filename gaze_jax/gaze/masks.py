"""Which keys each query row may see (METHOD.md steps 6 to 8), apart from the routed regions.

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
  """Rows that route (METHOD.md step 8): text rows, or only generated text rows when
  ``route_prompt`` is False. bool ``[B, T]``."""
  routed = query.kind == TEXT
  if not route_prompt:
    routed &= query.generated
  return routed


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
  causal = kk(key.position) <= qk(query.position)
  k_text, k_patch, k_ctx = (kk(key.kind) == c for c in (TEXT, PATCH, CTX))
  k_real = kk(key.kind) != PAD
  same_frame = kk(key.frame) == qk(query.frame)

  dense_row = causal & k_real
  ctx_row = same_frame & (k_patch | (k_ctx & causal))
  routed_text_row = causal & (k_text | k_ctx)
  text_row = jnp.where(qk(routed), routed_text_row, dense_row)

  q_kind = qk(query.kind)
  return jnp.where(q_kind == PATCH, dense_row,
                   jnp.where(q_kind == CTX, ctx_row,
                             jnp.where(q_kind == TEXT, text_row, False)))


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the last axis restricted to ``mask``; a row with no visible key gets all
  zeros (so its output and gradients are zero, never NaN)."""
  logits = jnp.where(mask, logits.astype(jnp.float32), -1e30)
  p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)) * mask
  denom = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(denom > 0, denom, 1.0)

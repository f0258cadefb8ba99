"""The kernels' contract in plain jnp (as jax's Pallas ops keep a reference next to each
kernel): ``attention_reference`` takes what ``ops.attention`` takes and returns what it should,
by dense attention under the full gaze mask. For tests; it materialises ``[B, T, Hq, S]``."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from gaze_jax.gaze.layout import TokenLayout
from gaze_jax.gaze.masks import token_info
from gaze_jax.gaze.reference import reference_attention
from gaze_jax.gaze.routing import Selection, unique_ids


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, layout: TokenLayout,
                        ids: jax.Array, *, routed: jax.Array,
                        q_index: Optional[jax.Array] = None,
                        scale: Optional[float] = None) -> jax.Array:
  """``ops.attention`` in plain jnp: q ``[B, T, Hq, D]``, k/v ``[B, S, Hkv, D]``, ids int32
  ``[B, T, Hq, K]`` (-1 none; repeats count once), routed bool ``[B, T]``, q_index int32
  ``[B, T]`` (None: T == S) -> ``[B, T, Hq, D]``."""
  B, S = layout.kind.shape
  if q_index is None:
    q_index = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  routed = jnp.asarray(routed, bool)
  sel = Selection(ids=unique_ids(jnp.where(routed[:, :, None, None], ids, -1)))
  return reference_attention(q, k, v, layout, token_info(layout, q_index), routed, sel,
                             scale=scale)

"""Reference gaze attention: dense attention under the full gaze mask.

Written to read like docs/method.md steps 5 to 8, not to be fast: it materialises the whole
``[B, T, Hq, S]`` mask. Every faster implementation is tested against it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gaze_jax.gaze.layout import TokenLayout
from gaze_jax.gaze.masks import TokenInfo, base_mask, masked_softmax, region_rule, token_info
from gaze_jax.gaze.routing import Selection

_HI = jax.lax.Precision.HIGHEST


def gaze_mask(layout: TokenLayout, query: TokenInfo, routed: jax.Array,
              selection: Selection) -> jax.Array:
  """Full gaze mask: bool ``[B, T, Hq, S]`` (query row, head, key slot).

  Step 6: a routed text row sees causal text, earlier context tokens and the patches of its
  selected regions. Step 7: patch rows dense causal, context rows their own frame.
  """
  B, S = layout.kind.shape
  NR = layout.max_regions
  key = token_info(layout, jnp.broadcast_to(jnp.arange(S), (B, S)))
  visible = base_mask(query, key, routed)[:, :, None, :]             # [B, T, 1, S]
  # Regions selected by each (row, head): bool[B, T, Hq, NR].
  chosen = jnp.any(selection.ids[..., None] == jnp.arange(NR), axis=-2)
  # A key is selected when it is a patch of a selected region.
  key_region = jnp.broadcast_to(jnp.clip(key.region, 0)[:, None, None, :],
                                chosen.shape[:3] + (S,))
  key_chosen = jnp.take_along_axis(chosen, key_region, axis=-1)
  candidate = region_rule(query.kind[:, :, None], query.position[:, :, None],
                          routed[:, :, None], key.kind[:, None, :], key.position[:, None, :])
  return visible | (key_chosen & candidate[:, :, None, :])


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: TokenLayout,
                        query: TokenInfo, routed: jax.Array, selection: Selection, *,
                        scale: float) -> jax.Array:
  """Dense masked attention. q ``[B, T, Hq, D]``, k/v ``[B, S, Hkv, D]`` -> ``[B, T, Hq, D]``."""
  G = q.shape[2] // k.shape[2]
  k = jnp.repeat(k, G, axis=2)
  v = jnp.repeat(v, G, axis=2)
  logits = jnp.einsum("bthd,bshd->bths", q, k, precision=_HI,
                      preferred_element_type=jnp.float32) * scale
  p = masked_softmax(logits, gaze_mask(layout, query, routed, selection))
  out = jnp.einsum("bths,bshd->bthd", p, v.astype(jnp.float32), precision=_HI)
  return out.astype(q.dtype)

"""Gaze regions: descriptor pooling (docs/method.md step 3).

A region's descriptor is the mean of its pre-RoPE keys over its valid (PATCH) tokens, per KV
head. Padding slots of a non-divisible grid are left out of the mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gaze_jax.gaze.layout import PATCH, TokenLayout


def region_descriptors(k_route: jax.Array, layout: TokenLayout) -> jax.Array:
  """Mean pre-RoPE key of every region.

  Args:
    k_route: ``[B, S, Hkv, Dr]`` keys before RoPE (after the key norm, if the model has one).
    layout: the batch's TokenLayout.
  Returns:
    float32 ``[B, NR, Hkv, Dr]``; zero for invalid (padding) regions. Compute it once per image
    (at prefill) and pass it to ``gaze_attention(descriptors=...)`` when decoding.
  """
  NR = layout.max_regions
  is_patch = layout.kind == PATCH                                    # bool[B, S]
  # Non-patch slots go to an extra bucket NR that is dropped afterwards.
  seg = jnp.where(is_patch, layout.region, NR)                       # int32[B, S]
  k32 = k_route.astype(jnp.float32) * is_patch[:, :, None, None]

  def per_example(kb, sb):
    return jax.ops.segment_sum(kb, sb, num_segments=NR + 1)[:NR]     # [NR, Hkv, Dr]

  sums = jax.vmap(per_example)(k32, seg)
  counts = jax.vmap(lambda sb: jnp.bincount(sb, length=NR + 1)[:NR])(seg)  # [B, NR]
  return sums / jnp.maximum(counts, 1)[:, :, None, None].astype(jnp.float32)

"""Progressive top-K schedules (docs/method.md step 10).

Training starts dense (K = all regions) and lowers K to the target over a warm-up. The value is
a traced int32, fed to ``gaze_attention(active_k=...)`` with a static ``top_k`` equal to the
starting K, so lowering K never recompiles.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

SHAPES = ("linear", "cosine", "step")


def progressive_top_k(step, *, start: int, target: int, warmup_steps: int,
                      shape: str = "linear", num_stages: int = 4):
  """K at ``step``: ``start`` at step 0, ``target`` from ``warmup_steps`` on, never below it.

  Args:
    step: int or traced int scalar.
    start: K at step 0, usually all regions (``layout.max_regions``).
    target: final K (``1 <= target <= start``).
    warmup_steps: steps to go from ``start`` to ``target``; 0 means ``target`` from step 0.
    shape: "linear" (default), "cosine" (slow start, slow end) or "step" (K drops in
      ``num_stages`` equal steps, at multiples of ``warmup_steps / num_stages``).
  Returns:
    int32 scalar array.
  """
  if shape not in SHAPES:
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
  if not 1 <= target <= start:
    raise ValueError(f"need 1 <= target <= start, got target={target}, start={start}")
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
  if num_stages < 1:
    raise ValueError(f"num_stages must be >= 1, got {num_stages}")
  if warmup_steps == 0:
    return jnp.asarray(target, jnp.int32)
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)
  if shape == "cosine":
    frac = 0.5 * (1.0 - jnp.cos(math.pi * frac))
  elif shape == "step":
    frac = jnp.floor(frac * num_stages) / num_stages
  k = start - (start - target) * frac
  # Round up so that K reaches the target only at the end of the warm-up.
  return jnp.clip(jnp.ceil(k - 1e-4), target, start).astype(jnp.int32)

"""Small building blocks with logical axis names on every parameter.

Axis names (mapped to mesh axes by the rules in the training config): ``vocab``, ``embed``
(model width), ``mlp`` (FFN width), ``heads`` / ``kv_heads`` (fused head x head_dim projections),
``head_dim``, ``norm``, ``vision_embed``, ``vision_mlp``, ``patch``, ``pos``. Parameters are
created unsharded (``eager_sharding=False``); training shards them through ``jax.jit``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Names = Sequence[Optional[str]]


def concrete(x) -> Optional[np.ndarray]:
  """x as numpy when it is not traced (so host-side checks can run), else None."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def named(init, names: Names):
  """An initializer whose parameter carries logical axis names."""
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def dense(in_features: int, out_features: int, names: tuple[str, str], *, use_bias: bool,
          rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32) -> nnx.Linear:
  """``nnx.Linear`` with named kernel ``[in, out]`` and bias ``[out]``."""
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs,
                    kernel_init=named(nnx.initializers.lecun_normal(), names),
                    bias_init=named(nnx.initializers.zeros_init(), names[1:]))


def layer_norm(features: int, eps: float, name: str, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32) -> nnx.LayerNorm:
  return nnx.LayerNorm(features, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                       scale_init=named(nnx.initializers.ones_init(), (name,)),
                       bias_init=named(nnx.initializers.zeros_init(), (name,)))


class RMSNorm(nnx.Module):
  """``x / rms(x) * scale`` over the last axis, computed in float32 (as Llama / Qwen do)."""

  def __init__(self, features: int, eps: float, *, name: str = "norm", param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((features,), param_dtype), out_sharding=(name,),
                           eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y.astype(x.dtype) * self.scale[...].astype(x.dtype))


def rope_frequencies(head_dim: int, theta: float, scaling=None) -> jax.Array:
  """RoPE inverse frequencies, float32 ``[head_dim / 2]``: ``theta ** (-2i / D)``, rescaled
  by a ``RopeScaling`` (Llama 3.1: long wavelengths divided by ``factor``, a smooth blend
  between the two wavelength bounds, short ones kept) when given."""
  D = head_dim
  inv_freq = 1.0 / (theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
  if scaling is None:
    return inv_freq
  s = scaling
  old_len = s.original_max_position_embeddings
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > old_len / s.low_freq_factor, inv_freq / s.factor, inv_freq)
  smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  blended = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= old_len / s.high_freq_factor) & (wavelen <= old_len / s.low_freq_factor)
  return jnp.where(medium, blended, scaled)


def mrope_components(half: int, section: Sequence[int], interleaved: bool) -> np.ndarray:
  """Which component of an M-RoPE position triple (0 time, 1 height, 2 width) rotates each of
  the ``half = head_dim / 2`` frequencies: int ``[half]``.

  Contiguous (Qwen2-VL / Qwen2.5-VL ``recomposition_frequencies``): the first ``section[0]``
  frequencies take time, the next ``section[1]`` height, the last ``section[2]`` width.
  Interleaved (Qwen3-VL ``apply_interleaved_mrope``): frequency ``d`` takes height when
  ``d % 3 == 1`` and ``d < 3 * section[1]``, width when ``d % 3 == 2`` and
  ``d < 3 * section[2]``, time otherwise.
  """
  d = np.arange(half)
  if not interleaved:
    return np.searchsorted(np.cumsum(section), d, side="right").clip(0, 2).astype(np.int32)
  comp = np.zeros(half, np.int32)
  for c in (1, 2):
    comp[(d % 3 == c) & (d < 3 * section[c])] = c
  return comp


def rope(x: jax.Array, positions: jax.Array, theta: float, scaling=None,
         mrope_section: Optional[Sequence[int]] = None, mrope_interleaved: bool = False
         ) -> jax.Array:
  """Rotary embedding, halves layout (Hugging Face ``rotate_half``), plain or M-RoPE.

  x: ``[B, T, H, D]``; scaling: None or a ``RopeScaling``; positions:
    - int ``[B, T]``: one position per token (plain RoPE; under M-RoPE the same as equal
      triples);
    - int ``[B, T, 3]``: (time, height, width) triples (M-RoPE, ``TokenLayout.rope_position``);
      frequency ``d`` is rotated by component ``mrope_components(...)[d]``, which needs
      ``mrope_section``.
  """
  D = x.shape[-1]
  inv_freq = rope_frequencies(D, theta, scaling)                              # [D/2]
  pos = positions.astype(jnp.float32)
  if pos.ndim == 3:
    if mrope_section is None:
      raise ValueError("position triples [B, T, 3] need mrope_section (M-RoPE)")
    comp = mrope_components(D // 2, mrope_section, mrope_interleaved)
    pos = jnp.take(pos, jnp.asarray(comp), axis=-1)                            # [B, T, D/2]
  else:
    pos = pos[..., None]
  ang = pos * inv_freq                                                        # [B, T, D/2]
  cos = jnp.cos(ang)[:, :, None, :]
  sin = jnp.sin(ang)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)

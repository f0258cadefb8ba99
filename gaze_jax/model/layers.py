"""Small building blocks with logical axis names on every parameter.

Axis names (mapped to mesh axes by the rules in the training config): ``vocab``, ``embed``
(model width), ``mlp`` (FFN width), ``heads`` / ``kv_heads`` (fused head x head_dim projections),
``head_dim``, ``norm``, ``vision_embed``, ``vision_mlp``, ``patch``, ``pos``. Parameters are
created unsharded (``eager_sharding=False``); training shards them through ``jax.jit``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Names = Sequence[Optional[str]]


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


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, halves layout (Hugging Face ``rotate_half``).

  x: ``[B, T, H, D]``; positions: int ``[B, T]``.
  """
  D = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))    # [D/2]
  ang = positions.astype(jnp.float32)[..., None] * inv_freq                   # [B, T, D/2]
  cos = jnp.cos(ang)[:, :, None, :]
  sin = jnp.sin(ang)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)

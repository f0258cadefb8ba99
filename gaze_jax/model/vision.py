"""SigLIP-style vision tower (no CLS token), the LLaVA ``mlp2x_gelu`` projector and the
Idefics3 / SmolVLM ``pixel_shuffle`` projector."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gaze_jax.model.config import VisionConfig
from gaze_jax.model.layers import dense, layer_norm, named
from gaze_jax.model.resample import bicubic_matrix


class VisionBlock(nnx.Module):
  """Pre-LN transformer block: bidirectional MHA, then a GELU (tanh) MLP."""

  def __init__(self, cfg: VisionConfig, *, rngs, dtype=None, param_dtype=jnp.float32):
    E, F = cfg.hidden_size, cfg.intermediate_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.num_heads = cfg.num_heads
    self.norm1 = layer_norm(E, cfg.layer_norm_eps, "vision_embed", **kw)
    self.q_proj = dense(E, E, ("vision_embed", "vision_heads"), use_bias=True, **kw)
    self.k_proj = dense(E, E, ("vision_embed", "vision_heads"), use_bias=True, **kw)
    self.v_proj = dense(E, E, ("vision_embed", "vision_heads"), use_bias=True, **kw)
    self.o_proj = dense(E, E, ("vision_heads", "vision_embed"), use_bias=True, **kw)
    self.norm2 = layer_norm(E, cfg.layer_norm_eps, "vision_embed", **kw)
    self.fc1 = dense(E, F, ("vision_embed", "vision_mlp"), use_bias=True, **kw)
    self.fc2 = dense(F, E, ("vision_mlp", "vision_embed"), use_bias=True, **kw)

  def __call__(self, x):
    N, P, E = x.shape
    H = self.num_heads
    h = self.norm1(x)
    split = lambda t: t.reshape(N, P, H, E // H)
    a = jax.nn.dot_product_attention(split(self.q_proj(h)), split(self.k_proj(h)),
                                     split(self.v_proj(h)))
    x = x + self.o_proj(a.reshape(N, P, E))
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=True))


def resize_pos_embed(pos: jax.Array, grid: int, new_grid: tuple[int, int]) -> jax.Array:
  """Learned positions ``[grid * grid, E]`` -> ``[gh * gw, E]`` as transformers' SigLIP
  ``interpolate_pos_encoding=True`` resizes them (PyTorch bicubic, ``bicubic_matrix``)."""
  gh, gw = new_grid
  E = pos.shape[-1]
  rows, cols = bicubic_matrix(grid, gh), bicubic_matrix(grid, gw)
  out = jnp.einsum("hi,ije,wj->hwe", rows, pos.reshape(grid, grid, E).astype(jnp.float32),
                   cols, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(gh * gw, E).astype(pos.dtype)


def bucket_position_ids(grid: int, gh: int, gw: int) -> np.ndarray:
  """int32 ``[gh * gw]``: the entry of a ``grid x grid`` position table that Idefics3 / SmolVLM
  give each patch of a ``gh x gw`` grid (raster order).

  Row ``i`` sits at the fractional coordinate ``i / gh``; its position row is the bucket of
  that coordinate among the boundaries ``k / grid``, ``floor(i * grid / gh)`` (columns
  likewise). We compute it exactly. transformers computes it in float32 and, where a coordinate
  falls exactly on a boundary, its rounding may give the bucket below, depending on the device
  (on CPU torch at the native size of grids 19, 25, 29, ..., not of the released checkpoints'
  26, 27 and 32, where both are raster order).
  """
  rows = np.arange(gh) * grid // gh
  cols = np.arange(gw) * grid // gw
  return (rows[:, None] * grid + cols[None, :]).reshape(-1).astype(np.int32)


class VisionTower(nnx.Module):
  """Images ``[N, H, W, C]`` -> patch features ``[N, (H/p) * (W/p), E]`` in raster order.

  The native size and any size that the patch size divides are accepted; at a size other than
  ``cfg.image_size`` the learned position embeddings are resized as transformers' SiglipVision
  does with ``interpolate_pos_encoding=True`` (``resize_pos_embed``: PyTorch's bicubic), or, with
  ``cfg.pos_resize="buckets"``, looked up as Idefics3 / SmolVLM do (``bucket_position_ids``,
  at every size).
  """

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    self.cfg = cfg
    E, p = cfg.hidden_size, cfg.patch_size
    self.patch_embed = nnx.Conv(cfg.num_channels, E, kernel_size=(p, p), strides=(p, p),
                                padding="VALID", dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                kernel_init=named(nnx.initializers.lecun_normal(),
                                                  (None, None, None, "vision_embed")),
                                bias_init=named(nnx.initializers.zeros_init(), ("vision_embed",)))
    # std 1/sqrt(E) as big_vision's SigLIP: with 0.02 the position signal starts ~30x below
    # the patch features, and a model trained from scratch is slow to learn where things are.
    self.pos_embed = nnx.Param(
        nnx.initializers.normal(E ** -0.5)(rngs.params(), (cfg.grid * cfg.grid, E), param_dtype),
        out_sharding=("pos", "vision_embed"), eager_sharding=False)
    n_blocks = cfg.num_blocks
    if not 0 <= n_blocks <= cfg.num_layers:
      raise ValueError(f"feature_layer={cfg.feature_layer} is outside [-{cfg.num_layers + 1}, "
                       f"{cfg.num_layers}]")
    # Blocks after the feature layer would never be used: they are not built.
    self.blocks = nnx.List([VisionBlock(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                            for _ in range(n_blocks)])
    if cfg.post_layernorm:
      self.post_norm = layer_norm(E, cfg.layer_norm_eps, "vision_embed", rngs=rngs, dtype=dtype,
                                  param_dtype=param_dtype)

  def check_images(self, images) -> None:
    """Raises ValueError for a rank, channel count or size the tower cannot take."""
    cfg = self.cfg
    chex.assert_rank(images, 4, custom_message="images must be [N, H, W, C]",
                     exception_type=ValueError)
    _, H, W, C = images.shape
    if C != cfg.num_channels:
      raise ValueError(f"images have {C} channels, the vision tower takes {cfg.num_channels} "
                       "(images are [N, H, W, C], channels last)")
    native = (H, W) == (cfg.image_size, cfg.image_size)
    if (H % cfg.patch_size or W % cfg.patch_size) and not native:
      # At its native size a checkpoint may not be divisible (LLaVA-OneVision: 384 px, patch
      # 14); the VALID patch convolution then drops the remainder, as the original does.
      raise ValueError(f"image size {H}x{W} is not divisible by the patch size {cfg.patch_size}"
                       f" (nor the native {cfg.image_size}x{cfg.image_size})")

  def __call__(self, images: jax.Array) -> jax.Array:
    self.check_images(images)
    cfg = self.cfg
    x = self.patch_embed(images)                                   # [N, gh, gw, E]
    N, gh, gw, E = x.shape
    pos = self.pos_embed[...]
    if cfg.pos_resize == "buckets":
      pos = pos[bucket_position_ids(cfg.grid, gh, gw)]
    elif (gh, gw) != (cfg.grid, cfg.grid):
      pos = resize_pos_embed(pos, cfg.grid, (gh, gw))
    x = x.reshape(N, gh * gw, E) + pos.reshape(1, gh * gw, E).astype(x.dtype)
    for block in self.blocks:
      x = block(x)
    if cfg.post_layernorm:
      x = self.post_norm(x)
    return x


class Projector(nnx.Module):
  """LLaVA ``mlp2x_gelu``: ``linear_2(gelu(linear_1(x)))`` (exact GELU), token by token:
  a patch grid ``[N, gh, gw, Ev]`` -> visual tokens ``[N, gh, gw, E]``."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.linear_1 = dense(in_features, out_features, ("vision_embed", "mlp"), **kw)
    self.linear_2 = dense(out_features, out_features, ("mlp", "embed"), **kw)

  def __call__(self, x):
    return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))


def pixel_shuffle(x: jax.Array, scale: int) -> jax.Array:
  """``[N, gh, gw, E]`` -> ``[N, gh / s, gw / s, s * s * E]``: token ``(I, J)`` concatenates the
  patches ``(I * s + r, J * s + c)`` in the order ``r``, then ``c``, then the feature (the
  feature order of Idefics3's ``pixel_shuffle``, whose projection weights we load)."""
  N, gh, gw, E = x.shape
  if gh % scale or gw % scale:
    raise ValueError(f"a {gh}x{gw} patch grid is not divisible by the pixel-shuffle scale factor "
                     f"{scale}: give images whose size is a multiple of patch_size x {scale}")
  x = x.reshape(N, gh // scale, scale, gw // scale, scale, E)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(N, gh // scale, gw // scale, scale * scale * E)


class PixelShuffleProjector(nnx.Module):
  """Idefics3 / SmolVLM connector: ``pixel_shuffle`` by ``scale``, then a bias-free linear
  layer: a patch grid ``[N, gh, gw, Ev]`` -> visual tokens ``[N, gh / s, gw / s, E]``."""

  def __init__(self, in_features: int, out_features: int, scale: int, *, rngs: nnx.Rngs,
               dtype=None, param_dtype=jnp.float32):
    self.scale = scale
    self.proj = dense(scale * scale * in_features, out_features, ("vision_embed", "embed"),
                      use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x):
    return self.proj(pixel_shuffle(x, self.scale))

"""Qwen2.5-VL and Qwen3-VL vision towers (transformers' ``Qwen2_5_VisionTransformerPretrainedModel``
and ``Qwen3VLVisionModel``), with their shared pieces defined once.

Input, as the Qwen image / video processors give it: ``pixel_values`` float ``[N, C*T*P*P]``, one
row per patch of ``T`` frames (``temporal_patch_size``) x ``P x P`` pixels, and ``grid_thw``, a
static tuple of ``(t, h, w)`` patch counts per image or video. Within each frame the processor
lays the patches out *merge-block major*: the ``m x m`` patches (``spatial_merge_size``) that the
merger fuses into one token are consecutive, blocks in raster order (``merge_block_coords``).
Attention stays within one temporal patch of one image (transformers' ``cu_seqlens``), and within
one window at Qwen2.5-VL's windowed blocks: these segments are static, built from ``grid_thw``,
and packed into a padded ``[segments, longest]`` batch (``Segments``), so a windowed block costs
``O(N * window)``, not ``O(N^2)``.

Qwen2.5-VL: bias-free patch embedding, 2-D rotary, RMSNorm blocks with a gated SiLU MLP, window
attention (windows of ``window_size`` pixels, tokens reordered window by window) except full
attention at ``fullatt_block_indexes``, the RMSNorm 2x2 merger.
Qwen3-VL: patch embedding with bias, learned positions bilinearly resampled to each grid plus 2-D
rotary, LayerNorm blocks with a GELU (tanh) MLP, full attention everywhere, the LayerNorm 2x2
merger, and DeepStack: the features after each block of ``deepstack_visual_indexes`` through
their own (post-shuffle LayerNorm) mergers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gaze_jax.model.layers import RMSNorm, dense, layer_norm
from gaze_jax.model.resample import bilinear_matrix

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
# transformers' ACT2FN names -> functions (``gelu`` is the exact erf form).
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}
# Both families hard-code eps 1e-6 for every norm of the tower.
NORM_EPS = 1e-6

Grid = tuple[tuple[int, int, int], ...]


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
  """One Qwen vision tower; field names follow transformers' vision configs (``depth``,
  ``num_heads``, ...). ``window_size`` (pixels) and ``fullatt_block_indexes`` are Qwen2.5-VL's;
  ``num_position_embeddings`` and ``deepstack_visual_indexes`` Qwen3-VL's."""
  family: str
  depth: int
  hidden_size: int
  intermediate_size: int
  num_heads: int
  out_hidden_size: int
  patch_size: int
  hidden_act: str
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  in_channels: int = 3
  rope_theta: float = 10000.0
  window_size: int = 0
  fullatt_block_indexes: tuple[int, ...] = ()
  num_position_embeddings: int = 0
  deepstack_visual_indexes: tuple[int, ...] = ()

  def __post_init__(self):
    for name in ("fullatt_block_indexes", "deepstack_visual_indexes"):
      object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))
    if self.family not in FAMILIES:
      raise ValueError(f"QwenVisionConfig.family={self.family!r} is not one of {FAMILIES}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"QwenVisionConfig.hidden_act={self.hidden_act!r} is not one of "
                       f"{sorted(ACTIVATIONS)}")
    if self.hidden_size % self.num_heads or self.head_dim % 4:
      # The 2-D rotary splits each head in (h, w) halves, each rotated in pairs.
      raise ValueError(f"QwenVisionConfig: hidden_size={self.hidden_size} / num_heads="
                       f"{self.num_heads} must give a head_dim divisible by 4")
    for name in ("fullatt_block_indexes", "deepstack_visual_indexes"):
      bad = [i for i in getattr(self, name) if not 0 <= i < self.depth]
      if bad:
        raise ValueError(f"QwenVisionConfig.{name} has {bad} outside [0, depth={self.depth})")
    if self.family == "qwen2_5_vl":
      unit = self.patch_size * self.spatial_merge_size
      if self.window_size < unit or self.window_size % unit:
        raise ValueError(f"QwenVisionConfig.window_size={self.window_size} must be a positive "
                         f"multiple of patch_size * spatial_merge_size = {unit}")
      if self.deepstack_visual_indexes or self.num_position_embeddings:
        raise ValueError("QwenVisionConfig: Qwen2.5-VL has no DeepStack nor learned positions")
    else:
      side = int(round(self.num_position_embeddings ** 0.5))
      if side < 1 or side * side != self.num_position_embeddings:
        raise ValueError(f"QwenVisionConfig.num_position_embeddings="
                         f"{self.num_position_embeddings} must be a positive square")
      if self.fullatt_block_indexes or self.window_size:
        raise ValueError("QwenVisionConfig: Qwen3-VL has no window attention")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one row of ``pixel_values``: ``C * T * P * P``."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def merge_unit(self) -> int:
    """Patches fused into one output token: ``m * m``."""
    return self.spatial_merge_size ** 2

  @property
  def window_tokens(self) -> int:
    """Qwen2.5-VL: a window's side in merged tokens (``window_size / m / P``)."""
    return self.window_size // self.spatial_merge_size // self.patch_size

  @property
  def pos_side(self) -> int:
    """Qwen3-VL: the side of the square learned position table."""
    return int(round(self.num_position_embeddings ** 0.5))


# Presets: the ``vision_config`` of the released checkpoints (config.json on the Hub).
QWEN2_5_VL_3B_VISION = QwenVisionConfig(
    family="qwen2_5_vl", depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
    out_hidden_size=2048, patch_size=14, hidden_act="silu", window_size=112,
    fullatt_block_indexes=(7, 15, 23, 31))
QWEN2_5_VL_7B_VISION = dataclasses.replace(QWEN2_5_VL_3B_VISION, out_hidden_size=3584)
QWEN3_VL_4B_VISION = QwenVisionConfig(
    family="qwen3_vl", depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
    out_hidden_size=2560, patch_size=16, hidden_act="gelu_pytorch_tanh",
    num_position_embeddings=2304, deepstack_visual_indexes=(5, 11, 17))
QWEN3_VL_8B_VISION = QwenVisionConfig(
    family="qwen3_vl", depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
    out_hidden_size=4096, patch_size=16, hidden_act="gelu_pytorch_tanh",
    num_position_embeddings=2304, deepstack_visual_indexes=(8, 16, 24))
PRESETS = {"qwen2_5_vl_3b": QWEN2_5_VL_3B_VISION, "qwen2_5_vl_7b": QWEN2_5_VL_7B_VISION,
           "qwen3_vl_4b": QWEN3_VL_4B_VISION, "qwen3_vl_8b": QWEN3_VL_8B_VISION}


# ------------------------------------------------------------------ static layout (numpy)

def as_grid(grid_thw) -> Grid:
  """``grid_thw`` (a sequence of ``(t, h, w)``, or a concrete ``[n, 3]`` array) as a hashable
  tuple of Python int triples."""
  grid = tuple(tuple(int(n) for n in g) for g in np.asarray(grid_thw).reshape(-1, 3))
  if not grid or any(n < 1 for g in grid for n in g):
    raise ValueError(f"grid_thw={grid_thw!r} must hold one or more (t, h, w) of positive ints")
  return grid


def merge_block_coords(grid: Grid, merge: int) -> np.ndarray:
  """int ``[N, 2]``: the (row, col) patch coordinate of each row of ``pixel_values``.

  Within a frame the patches come merge-block major, ``(h/m, w/m, m, m)`` (the processor's
  order, transformers' ``get_vision_position_ids``); frames repeat the same coordinates."""
  out = []
  for t, h, w in grid:
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = lambda a: a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3)
    rc = np.stack([block(r).reshape(-1), block(c).reshape(-1)], axis=-1)
    out.append(np.tile(rc, (t, 1)))
  return np.concatenate(out).astype(np.int32)


def frame_segments(grid: Grid, unit: int) -> np.ndarray:
  """int ``[N / unit]``: one id per (image, temporal patch), for each merged token. Attention
  never crosses frames, not even at the full-attention layers (transformers' ``cu_seqlens``
  has one segment per temporal patch)."""
  ids, base = [], 0
  for t, h, w in grid:
    ids.append(base + np.repeat(np.arange(t), h * w // unit))
    base += t
  return np.concatenate(ids).astype(np.int32)


def window_index(grid: Grid, merge: int, window: int) -> tuple[np.ndarray, np.ndarray]:
  """Qwen2.5-VL's window reordering (transformers' ``get_vision_window_index``).

  Merged tokens are grouped in windows of ``window x window`` tokens (the last ones of a row or
  column cut short), frame by frame; the windows are taken in raster order and, within one, the
  tokens too. Returns ``(order, segments)``: int ``[N / m^2]`` -- the merged token each position
  of the reordered sequence takes, and that position's window id (unique over the images)."""
  orders, segs, base, wid = [], [], 0, 0
  for t, h, w in grid:
    H, W = h // merge, w // merge
    nh, nw = -(-H // window), -(-W // window)
    tt, r, c = (a.reshape(-1) for a in np.meshgrid(np.arange(t), np.arange(H), np.arange(W),
                                                   indexing="ij"))
    win = (tt * nh + r // window) * nw + c // window
    order = np.lexsort((c, r, win))         # by window, then row, then column
    orders.append(base + order)
    segs.append(wid + win[order])
    base += t * H * W
    wid += t * nh * nw
  return np.concatenate(orders).astype(np.int32), np.concatenate(segs).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Segments:
  """Attention segments (contiguous runs of tokens) packed into a padded batch, so that each
  segment attends only to itself at a cost of ``S * L^2`` rather than ``N^2``.

  gather: int ``[S, L]`` -- the token in each slot (padding slots repeat the segment's last
  token); valid: bool ``[S, L]`` -- the slots that hold a token of the segment; slot: int
  ``[N]`` -- each token's flat slot ``s * L + j``, to read the results back in token order."""
  gather: np.ndarray
  valid: np.ndarray
  slot: np.ndarray


def contiguous_segments(ids: np.ndarray) -> Segments:
  """``Segments`` of token segment ids ``[N]`` whose segments are contiguous runs."""
  starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
  if len(starts) != len(np.unique(ids)):
    raise AssertionError("attention segments must be contiguous runs of tokens")
  lengths = np.diff(np.r_[starts, len(ids)])
  j = np.arange(lengths.max())
  seg = np.repeat(np.arange(len(starts)), lengths)
  return Segments(gather=(starts[:, None] + np.minimum(j, lengths[:, None] - 1)).astype(np.int32),
                  valid=j < lengths[:, None],
                  slot=(seg * len(j) + np.arange(len(ids)) - starts[seg]).astype(np.int32))


@dataclasses.dataclass(frozen=True)
class TowerLayout:
  """Everything the tower derives from ``grid_thw`` (numpy, built once per grid set).

  coords: int ``[N, 2]`` patch (row, col) in the order the blocks see the tokens;
  order: Qwen2.5-VL's window order of merged tokens ``[N / m^2]`` (None for Qwen3-VL);
  full / window: the attention segments, one per frame / per window (window None for
  Qwen3-VL). In the order the blocks see, both are contiguous runs of tokens."""
  coords: np.ndarray
  order: Optional[np.ndarray]
  full: Segments
  window: Optional[Segments]


@functools.lru_cache(maxsize=32)
def tower_layout(cfg: QwenVisionConfig, grid: Grid) -> TowerLayout:
  m, u = cfg.spatial_merge_size, cfg.merge_unit
  bad = [g for g in grid if g[1] % m or g[2] % m]
  if bad:
    raise ValueError(f"grid_thw {bad}: h and w must be multiples of spatial_merge_size={m}")
  coords = merge_block_coords(grid, m)
  frames = frame_segments(grid, u)
  tokens = lambda merged_ids: contiguous_segments(np.repeat(merged_ids, u))
  if cfg.family == "qwen3_vl":
    return TowerLayout(coords, None, tokens(frames), None)
  order, windows = window_index(grid, m, cfg.window_tokens)
  coords = coords.reshape(-1, u, 2)[order].reshape(-1, 2)
  return TowerLayout(coords, order, tokens(frames[order]), tokens(windows))


# ------------------------------------------------------------------ shared modules

def rotary_cos_sin(coords: np.ndarray, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """The 2-D rotary of both families: float32 ``cos, sin`` ``[N, head_dim / 2]``.

  The first half of the angles is ``row * inv_freq``, the second ``col * inv_freq``, with
  ``inv_freq = theta ** (-2i / (head_dim / 2))`` (``head_dim / 4`` frequencies); they rotate
  the head in the ``rotate_half`` layout (``apply_rotary``)."""
  half = head_dim // 2
  inv_freq = 1.0 / (theta ** (np.arange(0, half, 2, dtype=np.float32) / half))
  ang = (coords.astype(np.float32)[:, :, None] * inv_freq).reshape(len(coords), half)
  ang = jnp.asarray(ang, jnp.float32)
  return jnp.cos(ang), jnp.sin(ang)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """``x`` ``[N, H, D]`` rotated by angles ``[N, D / 2]`` (halves layout), in float32."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  c, s = cos[:, None, :], sin[:, None, :]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


class PatchEmbed(nnx.Module):
  """transformers' Conv3d with stride = kernel = ``(T, P, P)`` applied to pre-cut patches, i.e. a
  linear map ``[N, C*T*P*P] -> [N, E]``. The kernel is kept as ``[C, T, P, P, E]`` (the conv
  weight with its output axis moved last) so that the checkpoint loads by a transpose."""

  def __init__(self, cfg: QwenVisionConfig, *, use_bias: bool, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    shape = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size,
             cfg.hidden_size)
    init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2, 3), out_axis=4)
    self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype),
                            out_sharding=("patch", None, None, None, "vision_embed"),
                            eager_sharding=False)
    self.bias = (nnx.Param(jnp.zeros((cfg.hidden_size,), param_dtype),
                           out_sharding=("vision_embed",), eager_sharding=False)
                 if use_bias else None)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel[...]
    dtype = self.dtype or x.dtype
    y = x.astype(dtype) @ k.reshape(-1, k.shape[-1]).astype(dtype)
    return y if self.bias is None else y + self.bias[...].astype(dtype)


class VisionAttention(nnx.Module):
  """Bidirectional MHA with the fused ``qkv`` projection (features laid out ``[3, H, D]``) and
  the 2-D rotary on q and k, within each of the static ``Segments`` (frames or windows)."""

  def __init__(self, cfg: QwenVisionConfig, *, rngs, dtype=None, param_dtype=jnp.float32):
    E = cfg.hidden_size
    kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.num_heads = cfg.num_heads
    self.qkv = dense(E, 3 * E, ("vision_embed", "vision_heads"), **kw)
    self.proj = dense(E, E, ("vision_heads", "vision_embed"), **kw)

  def __call__(self, x, cos, sin, segments: Segments):
    N, E = x.shape
    H = self.num_heads
    qkv = self.qkv(x).reshape(N, 3, H, E // H)
    q, k = apply_rotary(qkv[:, 0], cos, sin), apply_rotary(qkv[:, 1], cos, sin)
    g = segments.gather                                              # [S, L]
    a = jax.nn.dot_product_attention(q[g], k[g], qkv[:, 2][g],
                                     mask=segments.valid[:, None, None, :])   # [S, L, H, D]
    return self.proj(a.reshape(-1, E)[segments.slot])


class GatedMLP(nnx.Module):
  """Qwen2.5-VL: ``down(act(gate(x)) * up(x))``, all with biases."""

  def __init__(self, cfg: QwenVisionConfig, *, rngs, dtype=None, param_dtype=jnp.float32):
    E, F = cfg.hidden_size, cfg.intermediate_size
    kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.act = ACTIVATIONS[cfg.hidden_act]
    self.gate_proj = dense(E, F, ("vision_embed", "vision_mlp"), **kw)
    self.up_proj = dense(E, F, ("vision_embed", "vision_mlp"), **kw)
    self.down_proj = dense(F, E, ("vision_mlp", "vision_embed"), **kw)

  def __call__(self, x):
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MLP(nnx.Module):
  """Qwen3-VL: ``linear_fc2(act(linear_fc1(x)))``."""

  def __init__(self, cfg: QwenVisionConfig, *, rngs, dtype=None, param_dtype=jnp.float32):
    E, F = cfg.hidden_size, cfg.intermediate_size
    kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.act = ACTIVATIONS[cfg.hidden_act]
    self.linear_fc1 = dense(E, F, ("vision_embed", "vision_mlp"), **kw)
    self.linear_fc2 = dense(F, E, ("vision_mlp", "vision_embed"), **kw)

  def __call__(self, x):
    return self.linear_fc2(self.act(self.linear_fc1(x)))


def _norm(cfg: QwenVisionConfig, features: int, *, rngs, dtype=None, param_dtype=jnp.float32):
  """The family's norm: RMSNorm (Qwen2.5-VL) or LayerNorm (Qwen3-VL), eps 1e-6."""
  if cfg.family == "qwen2_5_vl":
    return RMSNorm(features, NORM_EPS, name="vision_embed", param_dtype=param_dtype)
  return layer_norm(features, NORM_EPS, "vision_embed", rngs=rngs, dtype=dtype,
                    param_dtype=param_dtype)


class QwenVisionBlock(nnx.Module):
  """Pre-norm block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

  def __init__(self, cfg: QwenVisionConfig, *, rngs, dtype=None, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = _norm(cfg, cfg.hidden_size, **kw)
    self.norm2 = _norm(cfg, cfg.hidden_size, **kw)
    self.attn = VisionAttention(cfg, **kw)
    self.mlp = GatedMLP(cfg, **kw) if cfg.family == "qwen2_5_vl" else MLP(cfg, **kw)

  def __call__(self, x, cos, sin, segments: Segments):
    x = x + self.attn(self.norm1(x), cos, sin, segments)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """The ``m x m`` merger: ``[N, E] -> [N / m^2, out_hidden]``; each run of ``m^2`` consecutive
  tokens (one merge block) is concatenated, then ``fc2(gelu(fc1(.)))`` (exact GELU).

  The norm comes before the concatenation over ``E`` features, or after it over ``m^2 E`` with
  ``postshuffle`` (Qwen3-VL's DeepStack mergers)."""

  def __init__(self, cfg: QwenVisionConfig, *, postshuffle: bool = False, rngs, dtype=None,
               param_dtype=jnp.float32):
    E, M = cfg.hidden_size, cfg.hidden_size * cfg.merge_unit
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.postshuffle = postshuffle
    self.norm = _norm(cfg, M if postshuffle else E, **kw)
    self.fc1 = dense(M, M, ("vision_mlp", "vision_mlp"), use_bias=True, **kw)
    self.fc2 = dense(M, cfg.out_hidden_size, ("vision_mlp", "embed"), use_bias=True, **kw)

  def __call__(self, x):
    if self.postshuffle:
      x = self.norm(x.reshape(-1, self.fc1.in_features))
    else:
      x = self.norm(x).reshape(-1, self.fc1.in_features)
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class QwenVisionTower(nnx.Module):
  """``tower(pixel_values, grid_thw)``: ``[N, C*T*P*P]`` patches -> merged features
  ``[N / m^2, out_hidden_size]`` in the processor's token order; Qwen3-VL returns
  ``(features, deepstack)`` with ``deepstack`` a list of ``[N / m^2, out_hidden_size]``, one per
  ``deepstack_visual_indexes``.

  ``grid_thw`` is static (Python ints): the attention segments, rotary angles, window order and
  position resampling are built on the host, once per grid set (one compile each)."""

  def __init__(self, cfg: QwenVisionConfig, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32, remat: bool = False):
    self.cfg = cfg
    # Recompute each block in the backward pass (``jax.checkpoint``): a block keeps only its
    # input, as the decoder's remat does.
    self.remat = remat
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    qwen3 = cfg.family == "qwen3_vl"
    self.patch_embed = PatchEmbed(cfg, use_bias=qwen3, **kw)
    if qwen3:
      self.pos_embed = nnx.Param(
          nnx.initializers.normal(0.02)(rngs.params(), (cfg.num_position_embeddings,
                                                        cfg.hidden_size), param_dtype),
          out_sharding=("pos", "vision_embed"), eager_sharding=False)
    self.blocks = nnx.List([QwenVisionBlock(cfg, **kw) for _ in range(cfg.depth)])
    self.merger = PatchMerger(cfg, **kw)
    self.deepstack_mergers = nnx.List([PatchMerger(cfg, postshuffle=True, **kw)
                                       for _ in cfg.deepstack_visual_indexes])

  def position_embeddings(self, grid: Grid, coords: np.ndarray) -> jax.Array:
    """Qwen3-VL: the learned ``side x side`` table bilinearly resampled (align_corners=True) to
    each image's ``h x w`` grid, read at ``coords`` and repeated over its frames: ``[N, E]``."""
    side = self.cfg.pos_side
    table = self.pos_embed[...].astype(jnp.float32).reshape(side, side, -1)
    out, start = [], 0
    for t, h, w in grid:
      # transformers' fast_pos_embed_interpolate: align_corners=True.
      rows, cols = (bilinear_matrix(side, n, align_corners=True) for n in (h, w))
      grid_pos = jnp.einsum("hi,ije,wj->hwe", rows, table, cols,
                            precision=jax.lax.Precision.HIGHEST).reshape(h * w, -1)
      c = coords[start:start + h * w]          # one frame's coordinates; frames repeat them
      out.append(jnp.tile(grid_pos[c[:, 0] * w + c[:, 1]], (t, 1)))
      start += t * h * w
    return jnp.concatenate(out)

  def __call__(self, pixel_values: jax.Array, grid_thw):
    cfg = self.cfg
    grid = as_grid(grid_thw)
    n = sum(t * h * w for t, h, w in grid)
    if pixel_values.shape != (n, cfg.patch_dim):
      raise ValueError(f"pixel_values is {tuple(pixel_values.shape)}, grid_thw={grid} needs "
                       f"({n}, {cfg.patch_dim}) (C * temporal_patch_size * patch_size^2)")
    lay = tower_layout(cfg, grid)
    u = cfg.merge_unit
    x = self.patch_embed(pixel_values)                              # [N, E]
    if cfg.family == "qwen3_vl":
      x = x + self.position_embeddings(grid, lay.coords).astype(x.dtype)
    else:
      # Window order: each window's tokens become contiguous (merge blocks stay whole).
      x = x.reshape(n // u, u, -1)[lay.order].reshape(n, -1)
    cos, sin = rotary_cos_sin(lay.coords, cfg.head_dim, cfg.rope_theta)
    deepstack = []
    for i, block in enumerate(self.blocks):
      windowed = cfg.family == "qwen2_5_vl" and i not in cfg.fullatt_block_indexes
      segs = lay.window if windowed else lay.full
      run = (lambda x, b=block, segs=segs: b(x, cos, sin, segs))
      x = jax.checkpoint(run)(x) if self.remat else run(x)
      if i in cfg.deepstack_visual_indexes:
        deepstack.append(self.deepstack_mergers[cfg.deepstack_visual_indexes.index(i)](x))
    out = self.merger(x)                                            # [N / u, out_hidden]
    if cfg.family == "qwen2_5_vl":
      return out[np.argsort(lay.order)]                            # back to processor order
    return out, deepstack

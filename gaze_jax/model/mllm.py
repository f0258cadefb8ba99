"""The multimodal LLM: vision tower -> projector -> patch embeddings stored region-major,
context tokens after every image/frame, decoder with gaze (or dense) attention."""

from __future__ import annotations

from typing import Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gaze_jax.gaze import CTX, PATCH, TEXT, LayoutSpec, TokenLayout, build_layout
from gaze_jax.model.config import MLLMConfig
from gaze_jax.model.decoder import Decoder
from gaze_jax.model.layers import concrete
from gaze_jax.model.vision import (PixelShuffleProjector, Projector, VisionTower,
                                   bilinear_matrix)


def pack_images(images: Sequence[Sequence[np.ndarray]], layout: TokenLayout) -> np.ndarray:
  """Stacks each example's images (``[H, W, C]``) and videos (``[T, H, W, C]``) into the
  ``[B, F, H, W, C]`` array the model takes, checking the count against the layout.

  Raises ValueError when an example's image/frame count differs from its placeholders.
  """
  B, F = np.asarray(layout.frame_valid).shape
  if len(images) != B:
    raise ValueError(f"got images for {len(images)} examples, the layout has {B}")
  frames_per_example = []
  for b, items in enumerate(images):
    frames = []
    for i, im in enumerate(items):
      im = np.asarray(im)
      if im.ndim == 3:
        frames.append(im)
      elif im.ndim == 4:
        frames.extend(im)
      else:
        raise ValueError(f"example {b}, image {i}: expected [H, W, C] or [T, H, W, C], "
                         f"got shape {im.shape}")
    # One frame per image / video frame, one per tile of a tiled image (Image.tiles).
    tiles = np.asarray(layout.frame_tiles[b])
    want = int(np.where(np.asarray(layout.frame_valid[b]), np.maximum(tiles[:, 0] * tiles[:, 1],
                                                                      1), 0).sum())
    if len(frames) != want:
      raise ValueError(f"example {b} has {len(frames)} images/frames but its description has "
                       f"{want} image/frame placeholders (tiles included)")
    frames_per_example.append(frames)
  shapes = {f.shape for fr in frames_per_example for f in fr}
  if len(shapes) > 1:
    raise ValueError(f"all images/frames of a batch must share one size, got {sorted(shapes)}")
  if not shapes:
    return None
  (shape,) = shapes
  out = np.zeros((B, F) + shape, np.float32)
  for b, fr in enumerate(frames_per_example):
    if fr:
      out[b, :len(fr)] = np.stack(fr)
  return out


def patch_sources(layout: TokenLayout, token_grid: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """The frame and the token of that frame's features that each PATCH slot reads: int32
  ``(frame, index)``, ``[B, S]`` each (clipped to 0 at other slots).

  A plain frame reads its own grid (``index = patch_index``, over the full or the pooled
  grid). A frame cut from tiles (``Image.tiles``: ``frame_tiles = (th, tw)``) reads a
  ``gh x gw`` grid centred in the ``th x tw`` tiles of ``token_grid`` tokens each, stitched row
  by row (LLaVA's anyres grid with its padding rows or columns cut off, ``unpad_image``): patch
  ``(i, j)`` is token ``(i + (th * Gh - gh) / 2, j + (tw * Gw - gw) / 2)`` of the stitched
  grid, i.e. token ``(r mod Gh, c mod Gw)`` of tile frame ``f + (r // Gh) * tw + c // Gw``.
  """
  Gh, Gw = token_grid
  f = jnp.clip(layout.frame, 0)
  i = jnp.clip(layout.patch_index, 0)
  take = lambda a: jnp.take_along_axis(a, f[..., None], axis=1)          # [B, S, 2]
  gh, gw = (jnp.maximum(x, 1) for x in jnp.moveaxis(take(layout.frame_grid), -1, 0))
  th, tw = jnp.moveaxis(take(layout.frame_tiles), -1, 0)
  r = i // gw + (th * Gh - gh) // 2
  c = i % gw + (tw * Gw - gw) // 2
  tiled = th > 0
  return (jnp.where(tiled, f + (r // Gh) * tw + c // Gw, f),
          jnp.where(tiled, (r % Gh) * Gw + c % Gw, i))


class MLLM(nnx.Module):
  """Multimodal LLM. ``cfg.vision=None`` gives a text-only LM with the same interface."""

  def __init__(self, cfg: MLLMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=pdt)
    E = cfg.decoder.hidden_size
    self.decoder = Decoder(cfg.decoder, cfg.gaze, **kw)
    if cfg.vision is not None:
      self.vision = VisionTower(cfg.vision, **kw)
      if cfg.projector == "pixel_shuffle":
        self.projector = PixelShuffleProjector(cfg.vision.hidden_size, E, cfg.scale_factor, **kw)
      else:
        self.projector = Projector(cfg.vision.hidden_size, E, **kw)
    if cfg.newline_token_ids:
      # LLaVA-NeXT / OneVision's image_newline, initialised as transformers does.
      self.image_newline = nnx.Param(
          nnx.initializers.normal(E ** -0.5)(rngs.params(), (E,), pdt),
          out_sharding=("embed",), eager_sharding=False)
    if cfg.gaze.num_ctx:
      self.ctx_embed = nnx.Param(
          nnx.initializers.normal(0.02)(rngs.params(), (cfg.gaze.num_ctx, E), pdt),
          out_sharding=(None, "embed"), eager_sharding=False)

  # -------------------------------------------------------------- layouts

  def layout_spec(self, seq_len: int, max_regions: int = 1, max_images: int = 1,
                  max_nonvisual: Optional[int] = None) -> LayoutSpec:
    """A LayoutSpec with this model's region shape and context-token count (and the M-RoPE
    position triples when the decoder uses M-RoPE)."""
    return LayoutSpec(seq_len=seq_len, max_regions=max_regions, max_images=max_images,
                      region_shape=self.cfg.gaze.region_shape, num_ctx=self.cfg.gaze.num_ctx,
                      max_nonvisual=max_nonvisual,
                      mrope=self.cfg.decoder.mrope_section is not None)

  def build_layout(self, examples, seq_len: int, max_regions: int = 1,
                   max_images: int = 1) -> TokenLayout:
    return build_layout(examples, self.layout_spec(seq_len, max_regions, max_images))

  def _check_layout(self, layout: TokenLayout):
    spec, gz = layout.spec, self.cfg.gaze
    if spec.num_ctx != gz.num_ctx:
      raise ValueError(f"layout has num_ctx={spec.num_ctx} context tokens per frame, the model "
                       f"{gz.num_ctx}; build it with model.layout_spec(...)")
    if gz.attention == "gaze" and spec.region_shape != tuple(gz.region_shape):
      raise ValueError(f"layout region_shape {spec.region_shape} differs from the model's "
                       f"{tuple(gz.region_shape)}")
    if self.cfg.decoder.mrope_section is not None and layout.rope_position is None:
      raise ValueError("the decoder uses M-RoPE (mrope_section) but the layout has no position "
                       "triples; build it with model.layout_spec(...) (LayoutSpec.mrope=True)")

  # -------------------------------------------------------------- embeddings

  @staticmethod
  def _check_tokens(tokens, shape: tuple, message: str):
    """Integer ids of ``shape`` (None: any size on that axis), else a ValueError naming them."""
    chex.assert_shape(tokens, shape, custom_message=message, exception_type=ValueError)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")

  def _check_images(self, images, layout: TokenLayout):
    vcfg = self.cfg.vision
    if vcfg is None:
      raise ValueError("this model has no vision tower, but images were given")
    B, F = layout.batch_size, layout.spec.max_images
    chex.assert_shape(images, (B, F, None, None, None), custom_message=f"images must be [B={B}, "
                      f"F={F}, H, W, C]: the layout's batch size and max_images (use pack_images "
                      "to build it)", exception_type=ValueError)
    H, W = images.shape[2:4]
    self.vision.check_images(images[0])
    grid, valid = concrete(layout.frame_grid), concrete(layout.frame_valid)
    media = concrete(layout.frame_media)
    if grid is None or valid is None or media is None:
      return
    tiles = concrete(layout.frame_tiles)
    p, pool = self.cfg.token_pixels, vcfg.video_pool
    full = (H // p, W // p)
    pooled = vcfg.pooled_grid(*full)
    for b, f in zip(*np.nonzero(valid)):
      g = tuple(int(x) for x in grid[b, f])
      if tiles is not None and tiles[b, f, 0]:
        self._check_tiled(g, tuple(int(x) for x in tiles[b, f]), full, f"example {b}, frame {f}")
        continue
      # A frame alone in its media is an image (a one-frame video has the same layout): it
      # takes the full grid; only the frames of a video may be pooled.
      video = int((valid[b] & (media[b] == media[b, f])).sum()) > 1
      if g == full or (video and g == pooled):
        continue
      size = f"{g[0] * p}x{g[1] * p} px"
      if video:
        size += f" (or {g[0] * p * pool}x{g[1] * p * pool} px, pooled {pool}x{pool})"
      raise ValueError(f"example {b}, frame {f}: images of {H}x{W} px give a {full[0]}x{full[1]} "
                       f"patch grid, but the layout's {'video frame' if video else 'image'} "
                       f"placeholder is {g[0]}x{g[1]}: wrong image size, give it {size}"
                       + ("" if video else f"; the {pool}x{pool}-pooled grid is only for the "
                          "frames of a Video with several frames"))

  @staticmethod
  def _check_tiled(grid: tuple, tiles: tuple, full: tuple, where: str):
    """A grid cut from tiles (``patch_sources``) must be a centred window of the stitched
    tiles with whole rows or whole columns (unpadding crops one side only)."""
    stitched = (tiles[0] * full[0], tiles[1] * full[1])
    ok = all(g <= s and (s - g) % 2 == 0 for g, s in zip(grid, stitched))
    if ok and (grid[0] == stitched[0] or grid[1] == stitched[1]):
      return
    raise ValueError(f"{where}: a {grid[0]}x{grid[1]} grid cannot be cut from {tiles[0]}x"
                     f"{tiles[1]} tiles of {full[0]}x{full[1]} tokens ({stitched[0]}x"
                     f"{stitched[1]} stitched): it must keep every row or every column and "
                     "crop the other side evenly (a grid smaller on both sides would be "
                     "LLaVA's anyres_max downsampling, which is not supported)")

  def image_features(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[B, F, H, W, C]`` -> projected features ``[B, F, P, E]`` (raster order over the
    ``H / token_pixels x W / token_pixels`` token grid) and their ``video_pool``-pooled version
    ``[B, F, P', E]`` for video frames (``VisionConfig.pooled_grid``)."""
    vcfg = self.cfg.vision
    B, F, H, W, C = images.shape
    patches = self.vision(images.reshape(B * F, H, W, C))                    # [BF, gh*gw, Ev]
    vh, vw = H // vcfg.patch_size, W // vcfg.patch_size
    feats = self.projector(patches.reshape(B * F, vh, vw, -1))               # [BF, gh, gw, E]
    _, gh, gw, E = feats.shape
    pool = vcfg.video_pool
    ph, pw = vcfg.pooled_grid(gh, gw)
    if vcfg.video_pool_mode == "bilinear":
      pooled = jnp.einsum("ph,nhwe,qw->npqe", bilinear_matrix(gh, ph), feats.astype(jnp.float32),
                          bilinear_matrix(gw, pw), precision=jax.lax.Precision.HIGHEST)
      pooled = pooled.astype(feats.dtype)
    else:
      grid = feats[:, :ph * pool, :pw * pool]
      pooled = grid.reshape(B * F, ph, pool, pw, pool, E).mean(axis=(2, 4))
    return feats.reshape(B, F, gh * gw, E), pooled.reshape(B, F, ph * pw, E)

  def embed(self, tokens: jax.Array, layout: TokenLayout,
            images: Optional[jax.Array] = None) -> jax.Array:
    """Input embeddings ``[B, S, E]``: text ids at TEXT slots, patch features at PATCH slots
    (region-major, gathered by ``layout.frame`` / ``layout.patch_index``, or from the tiles of a
    tiled image: ``patch_sources``), learned context tokens at CTX slots, and the learned
    ``image_newline`` at TEXT slots that hold one of ``cfg.newline_token_ids``."""
    self._check_layout(layout)
    kind = layout.kind
    B, S = kind.shape
    self._check_tokens(tokens, (B, S), f"tokens must be [B, S] = {(B, S)}, the layout's batch "
                       "size and seq_len")
    x = self.decoder.embed_tokens(tokens, valid=kind == TEXT)
    host_kind = concrete(kind)
    if images is not None:
      if host_kind is not None and not (host_kind == PATCH).any():
        raise ValueError("images were given but the layout has no image/frame placeholders "
                         "(they would be dropped); pass images=None for a text-only layout")
      self._check_images(images, layout)
      feats, pooled = self.image_features(images.astype(x.dtype))
      B = x.shape[0]
      b = jnp.arange(B)[:, None]
      f = jnp.clip(layout.frame, 0)
      i = jnp.clip(layout.patch_index, 0)
      tp = self.cfg.token_pixels
      full_gh = images.shape[2] // tp
      src_f, src_i = patch_sources(layout, (full_gh, images.shape[3] // tp))
      patch = feats[b, src_f, src_i]
      if pooled.shape[2]:         # images smaller than the video pool have no pooled grid
        frame_of = lambda a: jnp.take_along_axis(a, f, axis=1)
        is_pooled = ((frame_of(layout.frame_grid[..., 0]) != full_gh)
                     & (frame_of(layout.frame_tiles[..., 0]) == 0))
        patch = jnp.where(is_pooled[..., None],
                          pooled[b, f, jnp.minimum(i, pooled.shape[2] - 1)], patch)
      x = jnp.where((kind == PATCH)[..., None], patch.astype(x.dtype), x)
    elif host_kind is not None and (host_kind == PATCH).any():
      raise ValueError("the layout has image/frame placeholders but no images were given")
    if self.cfg.newline_token_ids:
      newline = (kind == TEXT) & jnp.isin(tokens, jnp.asarray(self.cfg.newline_token_ids))
      x = jnp.where(newline[..., None], self.image_newline[...].astype(x.dtype), x)
    if self.cfg.gaze.num_ctx:
      ctx = self.ctx_embed[...][jnp.clip(layout.patch_index, 0, self.cfg.gaze.num_ctx - 1)]
      x = jnp.where((kind == CTX)[..., None], ctx.astype(x.dtype), x)
    return x

  # -------------------------------------------------------------- forward passes

  def __call__(self, tokens: jax.Array, layout: TokenLayout, images: Optional[jax.Array] = None,
               *, active_k=None, return_selected: bool = False, selections=None):
    """Full-sequence forward (training). tokens int ``[B, S]`` (ignored at non-TEXT slots),
    images ``[B, F, H, W, C]`` or None. Returns float32 logits ``[B, S, V]``, and with
    ``return_selected`` a list per layer of region ids ``[B, S, Hq, K]`` (None when dense).
    ``selections`` (a list per layer of ids ``[B, S, Hq, K']``, -1 = none) replaces routing."""
    x = self.embed(tokens, layout, images)
    logits, _, selected = self.decoder(x, layout, active_k=active_k,
                                       return_selected=return_selected, selections=selections)
    return (logits, selected) if return_selected else logits

  def prefill(self, tokens, layout, images=None, *, active_k=None, logits_index=None):
    """Full forward that also returns the KV cache (with gaze descriptors) of every layer.
    ``logits_index`` (int32 ``[B, T']``): the logits of these slots only (``[B, T', V]``; the
    LM head over every slot of a long prompt costs as much as a layer), else of all slots."""
    x = self.embed(tokens, layout, images)
    logits, caches, _ = self.decoder(x, layout, active_k=active_k, want_cache=True,
                                     logits_index=logits_index)
    return logits, caches

  def decode_plan(self, layout: TokenLayout, q_index: jax.Array):
    """The layout-only part of the decode steps' attention plan (the text and context keys'
    fields, the kernels' KV block table), built once for a decode loop and passed to every
    ``decode`` (``plan_base``); None for dense attention. q_index: int32 ``[B, T]`` the slots
    of any one step's tokens."""
    from gaze_jax.model.attention import attention_plan

    return attention_plan(self.cfg.decoder, self.cfg.gaze, layout, q_index,
                          jnp.dtype(self.cfg.dtype))

  def decode(self, tokens: jax.Array, q_index: jax.Array, layout: TokenLayout, caches, *,
             active_k=None, return_selected: bool = False, selections=None, plan_base=None):
    """New text tokens ``[B, T]`` at consecutive cache slots ``q_index [B, T]``.
    Returns ``(logits [B, T, V], caches)`` (plus selected ids with ``return_selected``);
    ``selections`` (per layer, ``[B, T, Hq, K']``) replaces routing; ``plan_base``
    (``decode_plan``) spares each step the attention plan's layout-only work. The layout
    should be ``layout.for_decoding()``: a decode step reads its ``nonvisual_index`` keys."""
    B = layout.batch_size
    self._check_tokens(tokens, (B, None), f"tokens must be [B, T] with B = {B}, the layout's "
                       "batch size")
    chex.assert_shape(q_index, tokens.shape, custom_message="q_index must be [B, T] like tokens",
                      exception_type=ValueError)
    x = self.decoder.embed_tokens(tokens)
    logits, caches, selected = self.decoder(x, layout, cache=caches, q_index=q_index,
                                            active_k=active_k, return_selected=return_selected,
                                            selections=selections, plan_base=plan_base)
    return (logits, caches, selected) if return_selected else (logits, caches)

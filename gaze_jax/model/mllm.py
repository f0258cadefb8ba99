"""The multimodal LLM: vision tower -> projector -> patch embeddings stored region-major,
context tokens after every image/frame, decoder with gaze (or dense) attention.

Qwen2.5-VL / Qwen3-VL (``MLLMConfig.qwen_vision``): the model takes ``QwenPatches`` where other
models take images, and ``qwen_features`` places the tower's merged features at the layout's
PATCH slots (the design is in its docstring)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gaze_jax.gaze import CTX, PATCH, TEXT, LayoutSpec, TokenLayout, build_layout
from gaze_jax.model.attention import attention_plan
from gaze_jax.model.config import MLLMConfig
from gaze_jax.model.decoder import Decoder
from gaze_jax.model.layers import concrete
from gaze_jax.model.qwen_vision import QwenVisionTower
from gaze_jax.model.resample import bilinear_matrix
from gaze_jax.model.vision import PixelShuffleProjector, Projector, VisionTower


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


Grids = tuple[tuple[tuple[int, int, int], ...], ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QwenPatches:
  """The visual input of a Qwen2.5-VL / Qwen3-VL model (``MLLMConfig.qwen_vision``), where other
  models take images ``[B, F, H, W, C]``; a pytree, so it passes through ``jax.jit``. The model
  also takes the data side's ``PatchPixels`` (``ModelInputs.images``) or a dict with
  ``patches`` and ``patch_grids``, without static grids.

  patches: float ``[B, P, C*T*Ps*Ps]``, each example's patch rows (transformers'
    ``pixel_values`` rows of its visual segments, in sequence order), zero padded;
  patch_grids: int32 ``[B, F', 3]``, per visual segment its grid ``(t, h, w)`` in patches,
    (0, 0, 0) padded (``gaze_jax.data.features``' ``patch_grids``);
  grids: static (jit metadata, not traced): per example the tuple of its segments' grids, or
    None. The tower needs static grids: ``MLLM.qwen_features`` takes them from here, else from
    ``patch_grids`` when it is concrete (an eager call), else from ``MLLMConfig.qwen_grids``.
  ``QwenPatches.of(patches, patch_grids)`` fills ``grids`` from host arrays."""
  patches: Any
  patch_grids: Any
  grids: Optional[Grids] = dataclasses.field(default=None, metadata=dict(static=True))

  @staticmethod
  def grids_of(patch_grids) -> Grids:
    """Host ``patch_grids [B, F', 3]`` -> per example the tuple of its non-zero grids."""
    g = np.asarray(patch_grids).reshape(np.shape(patch_grids)[0], -1, 3)
    return tuple(tuple(tuple(int(x) for x in row) for row in ex if row.any()) for ex in g)

  @classmethod
  def for_model(cls, patches, patch_grids, fixed_grids, host_grids=None) -> "QwenPatches":
    """A batch's patch rows for a model whose ``MLLMConfig.qwen_grids`` is ``fixed_grids``:
    with fixed grids no static grids here (they serve a traced ``patch_grids``: one compile),
    else the static grids read from the host's ``patch_grids`` (``host_grids``, default
    ``patch_grids`` itself; one compile per distinct set)."""
    if fixed_grids:
      return cls(patches, patch_grids)
    return cls(patches, patch_grids,
               cls.grids_of(patch_grids if host_grids is None else host_grids))

  @classmethod
  def of(cls, patches, patch_grids) -> "QwenPatches":
    """From host arrays, with the static ``grids`` read from ``patch_grids`` (one compile per
    distinct set of grids)."""
    return cls(patches, patch_grids, cls.grids_of(patch_grids))


def qwen_frame_offsets(grids: Grids, merge_unit: int, max_frames: int) -> np.ndarray:
  """int32 ``[B, F]``: where each layout frame's merged features start in the tower's output
  over ``grids`` (examples in turn, segments in order, a segment's ``t`` temporal groups as
  ``t`` consecutive frames of ``h * w / merge_unit`` tokens each); 0 past the last frame."""
  out = np.zeros((len(grids), max_frames), np.int32)
  off = 0
  for b, ex in enumerate(grids):
    f = 0
    for t, h, w in ex:
      for _ in range(t):
        if f < max_frames:
          out[b, f] = off
        f += 1
        off += h * w // merge_unit
  return out


class MLLM(nnx.Module):
  """Multimodal LLM. ``cfg.vision=None`` gives a text-only LM with the same interface."""

  def __init__(self, cfg: MLLMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=pdt)
    E = cfg.decoder.hidden_size
    self.decoder = Decoder(cfg.decoder, cfg.gaze, **kw)
    if cfg.qwen_vision is not None:
      # The merger is the connector: its output is the decoder's width (no projector).
      self.vision = QwenVisionTower(cfg.qwen_vision, remat=cfg.decoder.remat, **kw)
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

  # -------------------------------------------------------------- Qwen-VL patches

  def _qwen_grids(self, inputs: QwenPatches, B: int) -> Grids:
    """The static grids of ``inputs`` (``QwenPatches``' docstring for where they come from),
    checked against a concrete ``patch_grids``."""
    host = concrete(inputs.patch_grids)
    given = inputs.grids
    if given is None and host is not None:
      given = QwenPatches.grids_of(host)
    if given is None and self.cfg.qwen_grids:
      given = (self.cfg.qwen_grids,) * B
      if host is not None and QwenPatches.grids_of(host) != given:
        raise ValueError(f"patch_grids {QwenPatches.grids_of(host)} differ from "
                         f"MLLMConfig.qwen_grids={self.cfg.qwen_grids}")
    if given is None:
      raise ValueError("the Qwen vision tower needs static grids: patch_grids is traced, the "
                       "QwenPatches has no grids (QwenPatches.of builds them on the host) and "
                       "MLLMConfig.qwen_grids is empty")
    grids = tuple(tuple(tuple(int(x) for x in g) for g in ex) for ex in given)
    if len(grids) != B:
      raise ValueError(f"QwenPatches.grids has {len(grids)} examples, the batch {B}")
    if host is not None and inputs.grids is not None and QwenPatches.grids_of(host) != grids:
      raise ValueError(f"QwenPatches.grids {grids} differ from its patch_grids "
                       f"{QwenPatches.grids_of(host)}")
    return grids

  def qwen_features(self, inputs, layout: TokenLayout, dtype
                    ) -> tuple[jax.Array, list[jax.Array]]:
    """A Qwen tower's merged features at the layout's PATCH slots: ``([B, S, E], deepstack)``,
    ``deepstack`` a list (Qwen3-VL: one per ``deepstack_visual_indexes``; Qwen2.5-VL: empty)
    of ``[B, S, E]``, all zero outside the PATCH slots.

    Design (static shapes). The tower needs its grids as Python ints (its attention segments,
    rotary angles, window order and position resampling are built on the host): they are the
    static ``QwenPatches.grids``, or read from a concrete ``patch_grids``, or the config's fixed
    buckets ``MLLMConfig.qwen_grids`` (the same grids for every example; an example with fewer
    segments has zero rows there, which the tower turns into features no slot reads). Each
    example's first ``sum(t h w)`` rows are cut statically; when every example has the same
    grids (always with ``qwen_grids``) the tower is vmapped over the examples (the batch axis
    and its sharding stay), else it runs once over all examples' rows (attention never crosses
    a temporal group, so this equals one call per image); each PATCH slot reads feature
    ``offset[b, frame] + patch_index`` (``qwen_frame_offsets``, static).

    Order. Both towers return one token per 2 x 2 merge block, blocks in raster order of the
    merged ``h/m x w/m`` grid, temporal groups in turn (the processor's order; Qwen2.5-VL undoes
    its window order); the layout's ``patch_index`` of a frame's ``gh x gw`` grid is the same
    raster index ``i * gw + j``, and segment ``k``'s ``t`` groups are its ``t`` consecutive frame
    ids (an ``Image`` for t = 1, a ``Video(t, h/m, w/m)``; a Qwen3-VL video is one segment of
    ``t = 1`` per group, as its model splits ``video_grid_thw``)."""
    qcfg = self.cfg.qwen_vision
    if isinstance(inputs, Mapping):
      inputs = QwenPatches(inputs["patches"], inputs["patch_grids"], inputs.get("grids"))
    elif not isinstance(inputs, QwenPatches) and hasattr(inputs, "patches"):
      # gaze_jax.data.features.PatchPixels (patches, grids [B, F, 3], second_per_grid): the
      # time steps are already in the layout's M-RoPE triples.
      inputs = QwenPatches(inputs.patches, inputs.grids)
    if not isinstance(inputs, QwenPatches):
      raise ValueError("a Qwen vision model takes QwenPatches(patches, patch_grids) (patch "
                       f"rows), not {type(inputs).__name__}")
    patches = inputs.patches
    B, S = layout.kind.shape
    if patches.ndim != 3 or patches.shape[0] != B or patches.shape[2] != qcfg.patch_dim:
      raise ValueError(f"patches must be [B={B}, P, {qcfg.patch_dim}] (C * temporal_patch_size "
                       f"* patch_size^2), got {tuple(patches.shape)}")
    grids = self._qwen_grids(inputs, B)
    m, u = qcfg.spatial_merge_size, qcfg.merge_unit
    F = layout.spec.max_images
    rows = [sum(t * h * w for t, h, w in ex) for ex in grids]
    if max(rows) > patches.shape[1]:
      raise ValueError(f"the grids {grids} need {max(rows)} patch rows, patches has "
                       f"{patches.shape[1]}")
    frames = [sum(t for t, _, _ in ex) for ex in grids]
    if max(frames) > F:
      raise ValueError(f"the grids {grids} give {max(frames)} frames, the layout holds "
                       f"max_images={F}")
    self._check_qwen_layout(grids, layout, m)
    if not sum(rows):
      zero = jnp.zeros((B, S, self.cfg.decoder.hidden_size), dtype)
      return zero, [zero] * len(qcfg.deepstack_visual_indexes)
    f = jnp.clip(layout.frame, 0)
    is_patch = (layout.kind == PATCH)[..., None]
    if len(set(grids)) == 1:
      feats, deep = self._qwen_tower_batched(patches[:, :rows[0]].astype(dtype), grids[0])
      offsets = jnp.asarray(np.broadcast_to(qwen_frame_offsets(grids[:1], u, F), (B, F)))
      idx = jnp.take_along_axis(offsets, f, axis=1) + jnp.clip(layout.patch_index, 0)
      idx = jnp.clip(idx, 0, feats.shape[1] - 1)[..., None]                    # [B, S, 1]
      read = lambda a: jnp.take_along_axis(a, idx, axis=1)
    else:
      flat = jnp.concatenate([patches[b, :n] for b, n in enumerate(rows) if n])
      out = self.vision(flat.astype(dtype), tuple(g for ex in grids for g in ex))
      feats, deep = out if qcfg.family == "qwen3_vl" else (out, [])
      offsets = jnp.asarray(qwen_frame_offsets(grids, u, F))
      idx = jnp.take_along_axis(offsets, f, axis=1) + jnp.clip(layout.patch_index, 0)
      idx = jnp.clip(idx, 0, feats.shape[0] - 1)
      read = lambda a: a[idx]
    place = lambda a: jnp.where(is_patch, read(a).astype(dtype), jnp.zeros((), dtype))
    return place(feats), [place(d) for d in deep]

  def _qwen_tower_batched(self, patches: jax.Array, grid) -> tuple[jax.Array, list]:
    """The tower over examples that share one grid set: ``patches [B, N, D]`` ->
    (``[B, N / m^2, E]``, DeepStack list of the same). ``vmap`` over the examples keeps the
    batch axis (and its sharding) through the tower, where the packed form's concatenation of
    all examples' rows would lose it."""
    graphdef, state = nnx.split(self.vision)

    def one(x):
      out = nnx.merge(graphdef, state)(x, grid)
      return out if self.cfg.qwen_vision.family == "qwen3_vl" else (out, [])
    return jax.vmap(one)(patches)

  def _check_qwen_layout(self, grids: Grids, layout: TokenLayout, m: int):
    """With a concrete layout: its frames must be the grids' temporal groups, ``(h/m, w/m)``
    each (with ``MLLMConfig.qwen_grids``, the leading ones: an example may have fewer)."""
    fg, fv = concrete(layout.frame_grid), concrete(layout.frame_valid)
    if fg is None or fv is None:
      return
    for b, ex in enumerate(grids):
      want = [(h // m, w // m) for t, h, w in ex for _ in range(t)]
      have = [tuple(int(x) for x in fg[b, f]) for f in np.flatnonzero(fv[b])]
      if have != want[:len(have)] or (have != want and not self.cfg.qwen_grids):
        raise ValueError(f"example {b}: the layout's frame grids {have} differ from the patch "
                         f"grids' merged frames {want} ((h / {m}, w / {m}) per temporal group)")

  def embed(self, tokens: jax.Array, layout: TokenLayout,
            images: Optional[jax.Array] = None) -> jax.Array:
    """Input embeddings ``[B, S, E]``: text ids at TEXT slots, patch features at PATCH slots
    (region-major, gathered by ``layout.frame`` / ``layout.patch_index``, or from the tiles of a
    tiled image: ``patch_sources``), learned context tokens at CTX slots, and the learned
    ``image_newline`` at TEXT slots that hold one of ``cfg.newline_token_ids``. A Qwen vision
    model takes ``QwenPatches`` as ``images`` (``qwen_features``; its DeepStack features are
    dropped here: ``__call__`` and ``prefill`` pass them to the decoder)."""
    return self._embed(tokens, layout, images)[0]

  def _embed(self, tokens, layout: TokenLayout, images=None):
    """``embed`` and the DeepStack features (None without them)."""
    deepstack = None
    self._check_layout(layout)
    kind = layout.kind
    B, S = kind.shape
    self._check_tokens(tokens, (B, S), f"tokens must be [B, S] = {(B, S)}, the layout's batch "
                       "size and seq_len")
    x = self.decoder.embed_tokens(tokens, valid=kind == TEXT)
    host_kind = concrete(kind)
    if images is not None and self.cfg.qwen_vision is not None:
      if host_kind is not None and not (host_kind == PATCH).any():
        raise ValueError("patches were given but the layout has no image/frame placeholders "
                         "(they would be dropped); pass images=None for a text-only layout")
      feats, deep = self.qwen_features(images, layout, x.dtype)
      x = jnp.where((kind == PATCH)[..., None], feats, x)
      deepstack = deep or None
    elif images is not None:
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
    return x, deepstack

  # -------------------------------------------------------------- forward passes

  def __call__(self, tokens: jax.Array, layout: TokenLayout, images: Optional[jax.Array] = None,
               *, active_k=None, return_selected: bool = False, selections=None):
    """Full-sequence forward (training). tokens int ``[B, S]`` (ignored at non-TEXT slots),
    images ``[B, F, H, W, C]`` or None. Returns float32 logits ``[B, S, V]``, and with
    ``return_selected`` a list per layer of region ids ``[B, S, Hq, K]`` (None when dense).
    ``selections`` (a list per layer of ids ``[B, S, Hq, K']``, -1 = none) replaces routing."""
    x, deepstack = self._embed(tokens, layout, images)
    logits, _, selected = self.decoder(x, layout, active_k=active_k,
                                       return_selected=return_selected, selections=selections,
                                       deepstack=deepstack)
    return (logits, selected) if return_selected else logits

  def prefill(self, tokens, layout, images=None, *, active_k=None, logits_index=None):
    """Full forward that also returns the KV cache (with gaze descriptors) of every layer.
    ``logits_index`` (int32 ``[B, T']``): the logits of these slots only (``[B, T', V]``; the
    LM head over every slot of a long prompt costs as much as a layer), else of all slots."""
    x, deepstack = self._embed(tokens, layout, images)
    logits, caches, _ = self.decoder(x, layout, active_k=active_k, want_cache=True,
                                     logits_index=logits_index, deepstack=deepstack)
    return logits, caches

  def decode_plan(self, layout: TokenLayout, q_index: jax.Array, offloaded: bool = False):
    """The layout-only part of the decode steps' attention plan (the text and context keys'
    fields, the kernels' KV block table), built once for a decode loop and passed to every
    ``decode`` (``plan_base``); None for dense attention. q_index: int32 ``[B, T]`` the slots
    of any one step's tokens; offloaded: the steps read ``OffloadedCache``s."""
    return attention_plan(self.cfg.decoder, self.cfg.gaze, layout, q_index,
                          jnp.dtype(self.cfg.dtype), offloaded=offloaded)

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

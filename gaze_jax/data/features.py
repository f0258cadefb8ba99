"""One raw example -> fixed-shape model features (numpy only: no tfds, no grain).

``ExampleProcessor(tokenizer, FeatureConfig(...))`` maps an example of the common schema
(``gaze_jax.data.builders``) to a dict of arrays with static shapes (S = ``spec.seq_len``,
F = ``spec.max_images``, G = ``max_gt_regions``):

  tokens     int32[S]     text ids at TEXT slots in order, 0 elsewhere;
  targets    int32[S]     the token at position ``position[s] + 1`` (next token BY POSITION:
                          patches are stored region-major, so that is not always slot s + 1);
                          0 where that position is not a text token;
  loss_mask  float32[S]   1 where the target is an answer token (``generated``);
  images     float32[F, H, W, C]  resized, normalised to [-1, 1] (SigLIP), zero-padded;
  gt_regions int32[G]     region ids hit by the answer's ground-truth boxes, -1 padded;
  object_regions int32[R] region ids hit by any object in view (``object_boxes``; R =
                          ``spec.max_regions``), -1 padded: what a question-blind "salience"
                          pick chooses among (all -1 where the data has no object boxes);
  + the layout features of ``TokenLayout.to_features()`` (one row, no batch axis).

With a media processor whose visuals are patch rows (``PatchMedia``: Qwen2.5-VL / Qwen3-VL,
``gaze_jax.data.qwen_vl.QwenVLMedia``), ``images`` is replaced by (F = ``spec.max_images``,
P = ``FeatureConfig.max_patches``, default F times the largest bucket's patches per frame,
D = ``C * T * P * P``, the media's ``patch_dim``):

  patches         float32[P, D]  the vision tower's patch rows (transformers' ``pixel_values``
                                 / ``pixel_values_videos`` rows) of every visual segment in
                                 sequence order, zero-padded;
  patch_grids     int32[F, 3]    per visual segment (the layout's ``frame_media`` index) its
                                 patch grid ``(t, gh, gw)`` (transformers' ``image_grid_thw`` /
                                 ``video_grid_thw`` rows; a Qwen3-VL video is one ``(1, gh,
                                 gw)`` per group of frames, as its model splits
                                 ``video_grid_thw``), (0, 0, 0) padded. Segment k's rows are
                                 ``patches[o_k : o_k + t gh gw]`` with ``o_k`` the sum of
                                 ``t gh gw`` over the segments before it; its t temporal groups
                                 are t consecutive layout frames of ``gh / m x gw / m`` tokens
                                 (``frame_grid``, m the merge size), each ``gh gw`` rows long;
  second_per_grid float32[F]     per visual segment, the seconds per temporal group of a
                                 Qwen2.5-VL video (``second_per_grid_ts``; its M-RoPE time step
                                 is already in the layout's ``rope_position``), 0 otherwise.

A batch is these stacked on a leading axis; ``batch_to_model_inputs`` unpacks one for the
model (the patch features as one ``PatchPixels`` in place of ``images``). Sequences that do
not fit the LayoutSpec raise ``ExampleTooLong`` naming the example,
or with ``FeatureConfig.skip_too_long`` are skipped (``__call__`` returns None) and counted.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Mapping, NamedTuple, Optional, Protocol, Sequence, Union

import numpy as np

from gaze_jax.data.boxes import boxes_to_regions, pad_ids
from gaze_jax.data.tokenizers import ChatTemplate, JinjaChatTemplate
from gaze_jax.gaze.layout import (PAD, TEXT, Image, LayoutSpec, Text, TokenLayout, Video,
                                  build_layout, frames_needed, num_regions, slots_needed)

log = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"
FEATURE_KEYS = ("tokens", "targets", "loss_mask", "images", "gt_regions")
# A batch holds ``images`` (square frames) or these (patch rows; the module docstring).
PATCH_KEYS = ("patches", "patch_grids", "second_per_grid")


# The LayoutSpec field (and config.data field) behind each limit named in ExampleTooLong.needs.
LIMIT_FIELDS = {"slots": "seq_len", "images/frames": "max_images", "regions": "max_regions",
                "text and context tokens": "max_nonvisual", "patches": "max_patches"}


class ExampleTooLong(ValueError):
  """An example needs more slots, frames or regions than the LayoutSpec has; ``needs`` maps
  each limit it exceeds (e.g. "slots") to ``(needed, available)``."""

  def __init__(self, message: str, needs: Optional[Mapping[str, tuple[int, int]]] = None):
    super().__init__(message)
    self.needs = dict(needs or {})


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
  """Static shapes and preprocessing of the model inputs.

  Attributes:
    spec: the LayoutSpec (seq_len, max_regions, max_images, region_shape, num_ctx) of the model.
    image_size: H = W of the model's images (resize target).
    patch_size: the pixels per visual token side (``MLLMConfig.token_pixels``: the patch size,
      times a pixel-shuffle factor); an image is an ``image_size // patch_size`` square grid
      (a remainder is dropped, as the vision tower's VALID patch convolution does).
    video_grid: the side of a video frame's token grid once the model pools it
      (``VisionConfig.pooled_grid``); None keeps the full grid.
    max_gt_regions: G, ground-truth region ids kept per example.
    skip_too_long: skip (and count) examples that do not fit instead of raising.
    mean, std: per-channel normalisation of ``pixels / 255`` (SigLIP: 0.5, 0.5 -> [-1, 1]).
    resample: Pillow resampling filter name for the resize ("bicubic", "bilinear", ...).
    vocab_size: the model's vocabulary size (``DecoderConfig.vocab_size``): a token id at or
      above it raises a ValueError naming the example (the model would otherwise clamp it
      inside jit); None checks only that ids are >= 0.
    max_patches: with a ``PatchMedia`` processor (Qwen-VL), the rows of ``patches`` per
      example; None: ``spec.max_images`` times the media's ``max_frame_patches`` (every frame
      at the largest bucket). Unused otherwise.
  """
  spec: LayoutSpec
  image_size: int
  patch_size: int
  video_grid: Optional[int] = None
  max_gt_regions: int = 16
  skip_too_long: bool = False
  mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  std: tuple[float, float, float] = (0.5, 0.5, 0.5)
  resample: str = "bicubic"
  vocab_size: Optional[int] = None
  max_patches: Optional[int] = None

  def __post_init__(self):
    if self.grid < 1:
      raise ValueError(f"FeatureConfig.image_size={self.image_size} is below one patch of "
                       f"{self.patch_size} px")
    if self.video_grid is not None and not 1 <= self.video_grid <= self.grid:
      raise ValueError(f"FeatureConfig.video_grid={self.video_grid} must be in [1, grid="
                       f"{self.grid}]")
    if self.max_gt_regions < 1:
      raise ValueError(f"FeatureConfig.max_gt_regions must be >= 1, got {self.max_gt_regions}")
    if self.vocab_size is not None and self.vocab_size < 1:
      raise ValueError(f"FeatureConfig.vocab_size must be >= 1 or None, got {self.vocab_size}")
    if self.max_patches is not None and (isinstance(self.max_patches, bool) or not isinstance(
        self.max_patches, (int, np.integer)) or self.max_patches < 1):
      raise ValueError(f"FeatureConfig.max_patches must be an int >= 1 or None, got "
                       f"{self.max_patches!r}")

  @property
  def grid(self) -> int:
    """Patches per side of an image."""
    return self.image_size // self.patch_size

  @property
  def frame_grid(self) -> int:
    """Tokens per side of a video frame (``video_grid``, or the full grid)."""
    return self.grid if self.video_grid is None else self.video_grid


# --------------------------------------------------------------------------- decoding

def _str(x) -> str:
  if isinstance(x, (bytes, np.bytes_)):
    return x.decode("utf-8")
  if isinstance(x, np.ndarray) and x.ndim == 0:
    return _str(x.item())
  return str(x)


def example_where(example: Mapping[str, Any]) -> str:
  """How errors name an example: its ``origin`` (file and record, set by
  ``pipeline.SplitSource``), else ``example '<id>'``."""
  origin = example.get("origin")
  return _str(origin) if origin is not None else f"example {_str(example.get('id', '?'))!r}"


def raw_turns(example: Mapping[str, Any]) -> list[tuple[str, str]]:
  """``turns`` as (question, answer) strings; accepts tfds' dict-of-lists and a list of dicts."""
  turns = example["turns"]
  if isinstance(turns, Mapping):
    return [(_str(q), _str(a)) for q, a in zip(turns["question"], turns["answer"])]
  return [(_str(t["question"]), _str(t["answer"])) for t in turns]


def raw_images(example: Mapping[str, Any]) -> list[np.ndarray]:
  imgs = example.get("images", [])
  return [np.asarray(im) for im in imgs]


def preprocess_image(image: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
  """uint8 ``[h, w, 3]`` (or grey / RGBA) -> float32 ``[S, S, 3]`` resized and normalised."""
  # PIL (the [data] extra) only here: the module imports without it
  from PIL import Image as PILImage

  im = np.asarray(image)
  if im.ndim == 3 and im.shape[-1] == 1:
    im = im[..., 0]
  pil = PILImage.fromarray(im.astype(np.uint8)).convert("RGB")
  if pil.size != (cfg.image_size, cfg.image_size):
    resample = getattr(PILImage.Resampling, cfg.resample.upper())
    pil = pil.resize((cfg.image_size, cfg.image_size), resample)
  x = np.asarray(pil, np.float32) / 255.0
  return (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)


# --------------------------------------------------------------------------- media

@dataclasses.dataclass(frozen=True)
class Visual:
  """One layout segment of visual tokens and its pixels: an ``Image`` (one frame, or a grid cut
  from tiles) or a ``Video``, with float32 ``pixels [frames, H, W, C]`` ready for the vision
  tower (every frame of a batch has the same ``H x W``). ``text_ids`` are the token ids of the
  segment's own text slots in sequence order: an ``Image(newline_rows=True)`` ends each of its
  ``gh`` rows with one (LLaVA-OneVision writes its image token there)."""
  segment: Union[Image, Video]
  pixels: np.ndarray
  text_ids: tuple[int, ...] = ()


# What one image or video becomes in the sequence: text (prompt, not trained: markers around
# the visual tokens, tile names) and visual segments, in order.
MediaPart = Union[str, Visual]


class MediaProcessor(Protocol):
  """A model family's image and video processing: one image (uint8 ``[h, w, 3]``) or one
  video (its frames) -> the parts that replace its placeholder in the conversation."""

  def image(self, image: np.ndarray) -> list[MediaPart]: ...

  def video(self, frames: Sequence[np.ndarray]) -> list[MediaPart]: ...


@dataclasses.dataclass(frozen=True)
class PatchVisual(Visual):
  """A ``Visual`` whose pixels are already the vision tower's patch rows (Qwen2.5-VL /
  Qwen3-VL): ``pixels [t * gh * gw, C * T * P * P]`` float32 (transformers' ``pixel_values``
  rows of this segment) with the static ``grid_thw = (t, gh, gw)``; the segment is ``Image(gh
  / m, gw / m)`` (t = 1) or ``Video(t, gh / m, gw / m)``. ``second_per_grid``: seconds per
  temporal group of a Qwen2.5-VL video (its M-RoPE time step), None otherwise."""
  grid_thw: tuple[int, int, int] = (1, 0, 0)
  second_per_grid: Optional[float] = None


class PatchMedia(MediaProcessor, Protocol):
  """A ``MediaProcessor`` whose visuals are ``PatchVisual``s (``qwen_vl.QwenVLMedia``): the
  example's features hold ``patches`` / ``patch_grids`` / ``second_per_grid`` instead of
  ``images`` (the module docstring). ``patch_dim``: D, the columns of a patch row;
  ``max_frame_patches``: the most patch rows one frame (temporal group) can have, at the
  largest bucket; ``tokens_per_second``: M-RoPE time positions per second of video (its
  ``Video`` segments carry ``time_interval = tokens_per_second * second_per_grid``,
  Qwen2.5-VL's ``get_rope_index``)."""
  patch_dim: int
  max_frame_patches: int
  tokens_per_second: float


def is_patch_media(media) -> bool:
  """Whether ``media`` gives patch rows (``PatchMedia``) rather than square frames."""
  return (isinstance(getattr(media, "patch_dim", None), int)
          and isinstance(getattr(media, "max_frame_patches", None), int))


class SquareResize:
  """The default media processing: an image is resized to the square ``cfg.image_size`` and
  normalised (``preprocess_image``), one ``Image(grid, grid)``; a video is one ``Video`` of its
  frames, each resized the same way (the model pools them to ``cfg.frame_grid``)."""

  def __init__(self, cfg: FeatureConfig):
    self.cfg = cfg

  def image(self, image: np.ndarray) -> list[MediaPart]:
    g = self.cfg.grid
    return [Visual(Image(g, g), preprocess_image(image, self.cfg)[None])]

  def video(self, frames: Sequence[np.ndarray]) -> list[MediaPart]:
    vg = self.cfg.frame_grid
    return [Visual(Video(len(frames), vg, vg),
                   np.stack([preprocess_image(f, self.cfg) for f in frames]))]


# --------------------------------------------------------------------------- conversation

Part = Union[tuple[str, str, bool], tuple[str, int]]


def render_conversation(template: Union[ChatTemplate, JinjaChatTemplate],
                        turns: Sequence[tuple[str, str]], n_media: int,
                        where: str = "example", video: bool = False) -> list[Part]:
  """The conversation as ``("text", str, generated)`` and ``("media", k)`` parts, in order.

  ``<image>`` markers in the questions place the media (images, or one video); without markers
  all media go before the first question, each followed by a newline (LLaVA's convention; a
  model's own Jinja template, ``JinjaChatTemplate``, places them as that template does).
  """
  turns = [(q, a) for q, a in turns]
  if not turns:
    raise ValueError(f"{where}: has no turns")
  markers = sum(q.count(IMAGE_MARKER) for q, _ in turns)
  if markers and markers != n_media:
    raise ValueError(f"{where}: {markers} {IMAGE_MARKER} markers but {n_media} images/videos")
  if isinstance(template, JinjaChatTemplate):
    return template.render_parts(turns, n_media, where, video=video, marker=IMAGE_MARKER)
  if markers == 0 and n_media:
    turns[0] = ((IMAGE_MARKER + "\n") * n_media + turns[0][0], turns[0][1])
  parts: list[Part] = []
  text, media = template.header(), 0
  for q, a in turns:
    pieces = (template.user_start + q).split(IMAGE_MARKER)
    for k, piece in enumerate(pieces):
      if k:
        parts += [("text", text, False), ("media", media)]
        text, media = "", media + 1
      text += piece
    parts.append(("text", text + template.user_end + template.assistant_start, False))
    parts.append(("text", a + template.assistant_end, True))
    text = template.turn_sep
  parts.append(("text", text, False))
  return [p for p in parts if p[0] == "media" or p[1]]


# --------------------------------------------------------------------------- targets

def next_token_targets(tokens: np.ndarray, kind: np.ndarray, position: np.ndarray,
                       generated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Next-token targets by position for one example (``[S]`` arrays).

  The logits at slot s predict the token at position ``position[s] + 1``, found through the
  inverse of the slot -> position map (PAD slots excluded). Returns ``targets int32[S]`` (0 where
  the next position is not a text token or does not exist) and ``loss_mask float32[S]`` (1 where
  that next token is an answer token).
  """
  kind, position = np.asarray(kind), np.asarray(position)
  S = kind.shape[0]
  live = np.nonzero(kind != PAD)[0]
  slot_at = np.full(int(position[live].max(initial=0)) + 2, -1, np.int64)
  slot_at[position[live]] = live
  nxt = np.full(S, -1, np.int64)
  nxt[live] = slot_at[position[live] + 1]
  ok = nxt >= 0
  is_text = np.zeros(S, bool)
  is_text[ok] = kind[nxt[ok]] == TEXT
  targets = np.where(is_text, np.asarray(tokens)[np.maximum(nxt, 0)], 0).astype(np.int32)
  gen = np.zeros(S, bool)
  gen[ok] = np.asarray(generated, bool)[nxt[ok]]
  return targets, (is_text & gen).astype(np.float32)


# --------------------------------------------------------------------------- processor

class ExampleProcessor:
  """Raw example -> features; see the module docstring. Thread-safe (grain may call it from
  several threads); ``skipped`` counts examples skipped for not fitting (``skip_too_long``).
  ``media`` turns each image / video into its segments and pixels (default ``SquareResize``;
  a model family's own processing, e.g. tiles, comes from ``gaze_jax.data``'s family
  processors; a ``PatchMedia`` one gives ``patches`` instead of ``images``)."""

  def __init__(self, tokenizer, cfg: FeatureConfig, media: Optional[MediaProcessor] = None):
    self.tokenizer = tokenizer
    self.cfg = cfg
    self.media = media if media is not None else SquareResize(cfg)
    n = getattr(tokenizer, "vocab_size", None)
    if cfg.vocab_size is not None and isinstance(n, int) and n > cfg.vocab_size:
      # Not an error yet: the ids this data uses may all fit; each example is checked.
      log.warning("the tokenizer has %d ids, more than the model's vocab_size=%d: examples "
                  "whose text uses the others will raise", n, cfg.vocab_size)
    self.skipped = 0
    self.skipped_ids: list[str] = []
    self.kept = 0
    # limit ("slots", ...) -> (the most a skipped example needed, the LayoutSpec's)
    self.most_needed: dict[str, tuple[int, int]] = {}
    self._lock = threading.Lock()

  # Pickled into grain worker processes: locks do not pickle.
  def __getstate__(self):
    d = dict(self.__dict__)
    d.pop("_lock")
    return d

  def __setstate__(self, d):
    self.__dict__.update(d)
    self._lock = threading.Lock()

  def segments(self, example: Mapping[str, Any]) -> tuple[list, list[int]]:
    """The example's segment list and its text token ids (in sequence order)."""
    segs, ids, _ = self._expand(example)
    return segs, ids

  def _expand(self, example: Mapping[str, Any]) -> tuple[list, list[int], list[Visual]]:
    """Segments, text token ids (in sequence order) and the visual parts, in the order of
    the layout's visual segments (their frames in the order of the layout's frames)."""
    where = example_where(example)
    images = raw_images(example)
    is_video = bool(np.asarray(example.get("is_video", False)))
    n_media = (1 if images else 0) if is_video else len(images)
    parts = render_conversation(self.tokenizer.template, raw_turns(example), n_media, where,
                                video=is_video)
    segs, ids, visuals = [], [], []

    def add_ids(toks: Sequence[int], generated: bool, text: str, check: bool = True):
      if not toks:
        return
      if check:
        self._check_ids(toks, text, where)
      if segs and isinstance(segs[-1], Text) and segs[-1].generated == generated:
        segs[-1] = Text(segs[-1].length + len(toks), generated)
      else:
        segs.append(Text(len(toks), generated))
      ids.extend(toks)

    def add_text(run: list[tuple[str, bool]]):
      """Consecutive text parts. A model's own template is tokenized as transformers tokenizes
      the rendered prompt, in one piece (a part boundary may fall inside a token, e.g. a
      generation prompt ending with a space); a token that overlaps trained text is trained."""
      if isinstance(self.tokenizer.template, JinjaChatTemplate):
        text = "".join(t for t, _ in run)
        toks, spans = self.tokenizer.encode_offsets(text)
        trained, at = [], 0
        for t, gen in run:
          if gen:
            trained.append((at, at + len(t)))
          at += len(t)
        self._check_ids(toks, text, where)
        for tok, (a, b) in zip(toks, spans):
          add_ids([tok], any(a < e and s < max(b, a + 1) for s, e in trained), text, False)
        return
      for t, gen in run:
        add_ids(self.tokenizer.encode(t), gen, t)

    run: list[tuple[str, bool]] = []
    for p in parts:
      if p[0] != "media":
        run.append((p[1], p[2]))
        continue
      expanded = (self.media.video(images) if is_video else self.media.image(images[p[1]]))
      for part in expanded:
        if isinstance(part, str):
          run.append((part, False))
          continue
        add_text(run)
        run = []
        want = part.segment.gh if getattr(part.segment, "newline_rows", False) else 0
        if len(part.text_ids) != want:
          raise ValueError(f"{where}: a {part.segment} segment has {want} text slots, its media "
                           f"part gives {len(part.text_ids)} token ids for them")
        segs.append(part.segment)
        self._check_ids(list(part.text_ids), str(part.segment), where)
        ids.extend(part.text_ids)            # the segment's own text slots, not a Text segment
        visuals.append(part)
    add_text(run)
    return segs, ids, visuals

  def _check_ids(self, ids: Sequence[int], text: str, where: str) -> None:
    """Raises ValueError when the tokenizer gave an id outside ``[0, cfg.vocab_size)``."""
    arr = np.asarray(ids, np.int64)
    V = self.cfg.vocab_size
    bad = arr[(arr < 0) | ((arr >= V) if V is not None else False)]
    if bad.size:
      vocab = "[0, ...)" if V is None else f"[0, {V})"
      raise ValueError(f"{where}: the tokenizer gave ids {sorted(set(bad.tolist()))[:5]} outside "
                       f"the model's vocabulary {vocab} for the text {text[:60]!r}; use the "
                       "model's tokenizer (or a model whose vocab_size covers it)")

  @property
  def patch_media(self) -> bool:
    """Whether the media gives patch rows (``patches`` features instead of ``images``)."""
    return is_patch_media(self.media)

  @property
  def max_patches(self) -> int:
    """P, the rows of ``patches`` (``FeatureConfig.max_patches``, default ``max_images``
    frames at the largest bucket)."""
    if self.cfg.max_patches is not None:
      return int(self.cfg.max_patches)
    return self.cfg.spec.max_images * int(self.media.max_frame_patches)

  def _check_fits(self, segs, where: str, patches: Optional[int] = None):
    spec = self.cfg.spec
    grids = [s for s in segs if not isinstance(s, Text)]
    # Grids with tokens (a tiled image is one, over several frame ids: frames_needed).
    token_frames = sum(1 if isinstance(s, Image) else s.frames for s in grids)
    frames = frames_needed(segs)
    regions = sum((1 if isinstance(s, Image) else s.frames)
                  * num_regions(s.gh, s.gw, spec.region_shape) for s in grids)
    newline = sum(s.gh for s in grids if isinstance(s, Image) and s.newline_rows)
    nonvisual = (sum(s.length for s in segs if isinstance(s, Text)) + newline
                 + token_frames * spec.num_ctx)
    slots = slots_needed(segs, spec)
    limits = {"slots": (slots, spec.seq_len), "images/frames": (frames, spec.max_images),
              "regions": (regions, spec.max_regions),
              "text and context tokens": (nonvisual, spec.max_nonvisual)}
    if patches is not None:
      limits["patches"] = (patches, self.max_patches)
    over = {what: nh for what, nh in limits.items() if nh[0] > nh[1]}
    if over:
      raise ExampleTooLong(f"{where} needs " + ", ".join(
          f"{need} {what}, more than the "
          f"{'FeatureConfig' if what == 'patches' else 'LayoutSpec'}'s {have}"
          for what, (need, have) in over.items()), over)

  def features(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Features of one example; raises ExampleTooLong (naming it) when it does not fit."""
    cfg, spec = self.cfg, self.cfg.spec
    where = example_where(example)
    segs, ids, visuals = self._expand(example)
    patch = self.patch_media
    self._check_fits(segs, where, sum(len(v.pixels) for v in visuals) if patch else None)
    layout = {k: v[0] for k, v in build_layout([segs], spec).to_features().items()}
    kind = layout["kind"]
    tokens = np.zeros(spec.seq_len, np.int32)
    text_slots = np.nonzero(kind == TEXT)[0]        # slot order = position order for text
    assert len(text_slots) == len(ids), (len(text_slots), len(ids))
    tokens[text_slots] = ids
    targets, loss_mask = next_token_targets(tokens, kind, layout["position"], layout["generated"])
    images = raw_images(example)
    out = {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}
    out.update(self._patches(visuals, where) if patch else {"images": self._frames(visuals, where)})
    out["gt_regions"] = self._box_regions(example, images, layout, where, "boxes", "box_image",
                                          cfg.max_gt_regions)
    out["object_regions"] = self._box_regions(example, images, layout, where, "object_boxes",
                                              "object_box_image", spec.max_regions)
    out.update(layout)
    return out

  def _frames(self, visuals: Sequence[Visual], where: str) -> np.ndarray:
    """``images [F, H, W, C]``: the visuals' frames in layout order, zero-padded."""
    cfg = self.cfg
    pix = np.zeros((cfg.spec.max_images, cfg.image_size, cfg.image_size, 3), np.float32)
    f = 0
    for v in visuals:
      for frame in np.asarray(v.pixels, np.float32):
        if frame.shape != pix.shape[1:]:
          raise ValueError(f"{where}: frame {f} has pixels {frame.shape}, the model takes "
                           f"{pix.shape[1:]} (FeatureConfig.image_size)")
        pix[f] = frame
        f += 1
    return pix

  def _patches(self, visuals: Sequence[Visual], where: str) -> dict[str, np.ndarray]:
    """``patches [P, D]``, ``patch_grids [F, 3]`` and ``second_per_grid [F]`` of the
    visuals (``PatchVisual``s; the module docstring)."""
    F, D = self.cfg.spec.max_images, int(self.media.patch_dim)
    patches = np.zeros((self.max_patches, D), np.float32)
    grids = np.zeros((F, 3), np.int32)
    seconds = np.zeros(F, np.float32)
    row = 0
    for k, v in enumerate(visuals):
      if not isinstance(v, PatchVisual):
        raise ValueError(f"{where}: {type(self.media).__name__} gave a {type(v).__name__}, "
                         "not the PatchVisual (patch rows) its features need")
      px = np.asarray(v.pixels, np.float32)
      t, gh, gw = (int(n) for n in v.grid_thw)
      if px.ndim != 2 or px.shape != (t * gh * gw, D):
        raise ValueError(f"{where}: a {v.segment} segment has patches {px.shape}, its grid "
                         f"{v.grid_thw} needs ({t * gh * gw}, {D})")
      patches[row:row + len(px)] = px               # _check_fits bounds the rows
      grids[k] = (t, gh, gw)
      seconds[k] = v.second_per_grid or 0.0
      row += len(px)
    return {"patches": patches, "patch_grids": grids, "second_per_grid": seconds}

  def _box_regions(self, example, images, layout, where, boxes_key: str, image_key: str,
                   size: int) -> np.ndarray:
    """The region ids hit by ``example[boxes_key]`` (on the images ``example[image_key]``),
    padded to ``size`` with -1; none when the example has no such boxes."""
    cfg = self.cfg
    boxes = np.asarray(example.get(boxes_key, np.zeros((0, 4))), np.float64).reshape(-1, 4)
    box_image = np.asarray(example.get(image_key, np.zeros(0)), np.int64).reshape(-1)
    if len(boxes) != len(box_image):
      raise ValueError(f"{where}: {len(boxes)} {boxes_key} but {len(box_image)} {image_key} "
                       "entries")
    if not len(boxes):
      return pad_ids(np.zeros(0, np.int32), size, where)
    if not isinstance(self.media, SquareResize):
      # Frame f is image f only when each image is one square frame.
      raise ValueError(f"{where}: {boxes_key} are mapped to regions only with the square "
                       f"resize (one frame per image), not with {type(self.media).__name__}")
    if box_image.min() < 0 or box_image.max() >= len(images):
      raise ValueError(f"{where}: {image_key} {box_image.tolist()} out of range for "
                       f"{len(images)} images")
    # Boxes are in original pixels; scale them to the resized image.
    hw = np.asarray([np.asarray(images[i]).shape[:2] for i in box_image], np.float64)
    scale = np.stack([cfg.image_size / hw[:, 1], cfg.image_size / hw[:, 0]] * 2, axis=-1)
    # Frame f of the layout is the f-th image / video frame (images are placed in order).
    ids = boxes_to_regions(layout, boxes * scale, box_image, (cfg.image_size, cfg.image_size),
                           cfg.spec.region_shape)
    return pad_ids(ids, size, where)

  def __call__(self, example: Mapping[str, Any]) -> Optional[dict[str, np.ndarray]]:
    """``features(example)``, or None (counted) for a too-long one with ``skip_too_long``."""
    try:
      out = self.features(example)
    except ExampleTooLong as e:
      if not self.cfg.skip_too_long:
        raise
      with self._lock:
        self.skipped += 1
        self.skipped_ids.append(_str(example.get("id", "?")))
        for what, (need, have) in e.needs.items():
          self.most_needed[what] = (max(need, self.most_needed.get(what, (0, 0))[0]), have)
      return None
    with self._lock:
      self.kept += 1
    return out

  def most_needed_text(self) -> str:
    """The most each LayoutSpec limit was exceeded by a skipped example, e.g. "412 slots
    (seq_len=80)"."""
    return ", ".join(f"{need} {what} ({LIMIT_FIELDS[what]}={have})"
                     for what, (need, have) in self.most_needed.items())


# --------------------------------------------------------------------------- batches

class PatchPixels(NamedTuple):
  """A batch's patch rows for a Qwen-VL vision tower (a pytree; the module docstring):
  ``ModelInputs.images`` when the batch has ``patches`` instead of ``images``."""
  patches: Any          # float32[B, P, D]
  grids: Any            # int32[B, F, 3] (t, gh, gw) per visual segment, 0 padded
  second_per_grid: Any  # float32[B, F]


class ModelInputs(NamedTuple):
  """What ``MLLM.__call__`` and the loss need, from one batch."""
  tokens: Any          # int32[B, S]
  images: Any          # float32[B, F, H, W, C], or PatchPixels (Qwen-VL patch rows)
  layout: TokenLayout
  targets: Any         # int32[B, S]
  loss_mask: Any       # float32[B, S]
  gt_regions: Any      # int32[B, G]
  object_regions: Any = None   # int32[B, R] or None (data without object boxes)


def batch_to_model_inputs(batch: Mapping[str, np.ndarray], spec: LayoutSpec) -> ModelInputs:
  """Splits a batch of stacked features into the model's inputs (host numpy arrays).

  ``images`` is the batch's ``images``, or a ``PatchPixels`` of its ``patches``,
  ``patch_grids`` and ``second_per_grid`` when it has those instead.

  Raises ValueError when a key is missing or the shapes disagree with ``spec``.
  """
  patch = "patches" in batch
  want = [k for k in FEATURE_KEYS if not (patch and k == "images")]
  missing = [k for k in want + (list(PATCH_KEYS) if patch else []) if k not in batch]
  if missing:
    raise ValueError(f"batch is missing {missing}")
  tokens = np.asarray(batch["tokens"])
  if tokens.ndim != 2 or tokens.shape[1] != spec.seq_len:
    raise ValueError(f"batch tokens have shape {tokens.shape}; expected [B, seq_len="
                     f"{spec.seq_len}]")
  if patch:
    images = PatchPixels(*(np.asarray(batch[k]) for k in PATCH_KEYS))
    B = tokens.shape[0]
    for name, x, want in (("patches", images.patches, "[B, max_patches, D]"),
                          ("patch_grids", images.grids, f"[B, max_images={spec.max_images}, 3]"),
                          ("second_per_grid", images.second_per_grid,
                           f"[B, max_images={spec.max_images}]")):
      ok = x.ndim == {"patches": 3, "patch_grids": 3}.get(name, 2) and x.shape[0] == B
      ok = ok and (name == "patches" or x.shape[1] == spec.max_images)
      ok = ok and (name != "patch_grids" or x.shape[2] == 3)
      if not ok:
        raise ValueError(f"batch {name} have shape {x.shape}; expected {want}")
  else:
    images = np.asarray(batch["images"])
    if images.ndim != 5 or images.shape[1] != spec.max_images:
      raise ValueError(f"batch images have shape {images.shape}; expected [B, max_images="
                       f"{spec.max_images}, H, W, C]")
  region_valid = np.asarray(batch.get("region_valid", np.zeros((0, 0))))
  if region_valid.ndim == 2 and region_valid.shape[1] != spec.max_regions:
    raise ValueError(f"batch has {region_valid.shape[1]} regions per example, spec.max_regions "
                     f"is {spec.max_regions}")
  layout = TokenLayout.from_features(batch, spec)
  return ModelInputs(tokens, images, layout, np.asarray(batch["targets"]),
                     np.asarray(batch["loss_mask"]), np.asarray(batch["gt_regions"]),
                     None if "object_regions" not in batch
                     else np.asarray(batch["object_regions"]))

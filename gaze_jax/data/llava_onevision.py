"""LLaVA-OneVision image and video processing at a fixed tile grid, as a ``MediaProcessor``.

transformers' processor picks each image's anyres grid from its size among the folder's
``image_grid_pinpoints``; our shapes are static, so the grid is ours to fix: ``rows x cols``
tiles of the vision tower's size ``S`` (e.g. one pinpoint, ``[2 * S, 2 * S]`` for 2 x 2). For an
image whose natural grid (``natural_grid``) is the fixed one, the pixels are those of
transformers' (Pillow) image processor and the segments reproduce its features and its prompt;
other images are fitted to the fixed grid instead. Steps, from the folder's processor settings:

  Image, ``grid = (rows, cols)`` (transformers' processing of an example's only image):
    1. to RGB (transparency composited onto white);
    2. the base image: resized to ``S x S``;
    3. the tiles: the image resized to fit ``rows * S x cols * S`` with its aspect kept,
       centred on a black canvas of that size, cut into ``S x S`` tiles row by row;
    4. ``* rescale_factor``, then ``(x - image_mean) / image_std``.
    It becomes ``Image(g, g)`` (the base image, ``g = S / patch_size`` tokens per side) and
    ``Image(gh, gw, newline_rows=True, tiles=(rows, cols))``: the stitched ``rows * g x cols * g``
    token grid with the rows or columns of the padding cut off (``unpadded_grid``, transformers'
    ``unpad_image``), an ``image_newline`` after each row.
  Image, ``grid = (0, 0)`` (transformers' processing of an image among several in one
    example): padded to a square with the mean colour, resized to ``S x S``: ``Image(g, g)``
    and one newline after it.
  Video: every frame resized to the video processor's size (which must be ``S``), rescaled and
    normalised: ``Video(frames, p, p)`` with ``p = ceil(g / 2)`` (the model pools each frame by
    bilinear interpolation) and one newline after the whole video.

The newlines are text slots holding the image (video) token id: the model gives them its
learned ``image_newline`` (``MLLMConfig.newline_token_ids``). A newline after an image or a
video is the token's text part (``image_token`` / ``video_token``); the newline rows of a tiled
grid are text slots of its segment, whose ids the part gives (``Visual.text_ids``).

Supported as transformers computes it: the anyres tiles with their unpadding, the base image,
the multi-image form, videos whose frames are all given (``do_sample_frames=false``). Refused
with an error naming the file and key: ``anyres_max`` downsampling (an image whose unpadded grid
holds more than ``1.1^2 x N`` tiles' tokens for ``vision_aspect_ratio="anyres_max_N"``: a grid of
at most ``1.21 N`` tiles never downsamples, e.g. 3 x 3 for ``anyres_max_9``), sizes other than
the vision tower's, ``vision_feature_select_strategy="default"``, center crops and frame
sampling. Video frames are resized with Pillow's filter, as transformers' image processor does;
transformers' video processor resizes with torchvision, whose antialiased filter may differ by
one 0-255 level at some pixels.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from etils import epath

from gaze_jax.model.hf_config import llava_onevision_configs, llava_onevision_token_ids
from gaze_jax.data.features import MediaPart, Visual
from gaze_jax.data.hf_pixels import (channels, processor_fields, rescale_normalize,
                                     resize_filter, rgb_image)
from gaze_jax.paths import read_json
from gaze_jax.gaze.layout import Image, Video

__all__ = ["FrameSettings", "OnevisionSettings", "LlavaOnevisionMedia", "natural_grid",
           "unpadded_grid", "patch_output_size"]

IMAGE_PROCESSORS = ("LlavaOnevisionImageProcessor", "LlavaOnevisionImageProcessorPil")
VIDEO_PROCESSORS = ("LlavaOnevisionVideoProcessor",)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers' defaults for what a processor file leaves out (image and video alike).
_DEFAULTS = dict(do_convert_rgb=True, do_resize=True, size={"height": 384, "width": 384},
                 resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                 image_mean=list(_CLIP_MEAN), image_std=list(_CLIP_STD))
_PINPOINTS = [[h * 384, w * 384] for h in range(1, 7) for w in range(1, 7)]
_ANYRES = re.compile(r"anyres_max_(\d+)")


def natural_grid(h: int, w: int, pinpoints: Sequence[Sequence[int]],
                 tile: int) -> tuple[int, int]:
  """The ``(rows, cols)`` tiles transformers gives an ``h x w`` image: the pinpoint
  ``(height, width)`` that keeps the most of the image's pixels when it is fitted into it,
  then wastes the fewest, in ``tile``-pixel tiles. Pick a fixed grid from it."""
  best, kept, waste = None, 0, math.inf
  for ph, pw in pinpoints:
    scale = min(pw / w, ph / h)
    k = min(int(w * scale) * int(h * scale), w * h)
    if k > kept or (k == kept and ph * pw - k < waste):
      best, kept, waste = (ph, pw), k, ph * pw - k
  return best[0] // tile, best[1] // tile


def patch_output_size(h: int, w: int, height: int, width: int) -> tuple[int, int]:
  """An ``h x w`` image fitted into ``height x width`` with its aspect kept (the fitted side
  rounded up), as transformers resizes it before the tiles are cut."""
  if width / w < height / h:
    return min(math.ceil(h * (width / w)), height), width
  return height, min(math.ceil(w * (height / h)), width)


def unpadded_grid(h: int, w: int, grid: tuple[int, int], g: int) -> tuple[int, int]:
  """The token grid that transformers keeps of the ``rows * g x cols * g`` stitched tiles of an
  ``h x w`` image (``unpad_image``): the rows (or columns) of the padding are cut off, the same
  number on both sides."""
  H, W = grid[0] * g, grid[1] * g
  if w / h > W / H:
    pad = (H - int(round(h * (W / w), 7))) // 2
    return H - 2 * pad, W
  pad = (W - int(round(w * (H / h), 7))) // 2
  return H, W - 2 * pad


@dataclasses.dataclass(frozen=True)
class FrameSettings:
  """How one processor (image or video) resizes, rescales and normalises: Pillow's filter
  number ``resample``, ``rescale_factor`` / ``mean`` / ``std`` (None: the step is off), and
  ``fill``, the 0-255 colour of ``image_mean`` that pads an image to a square."""
  size: int
  resample: int
  rescale_factor: Optional[float]
  mean: Optional[tuple[float, ...]]
  std: Optional[tuple[float, ...]]
  convert_rgb: bool
  fill: tuple[int, ...]
  where: str

  def check_size(self, tower: int) -> None:
    """Raises ValueError unless the processor's size is the vision tower's ``tower`` pixels."""
    if self.size != tower:
      raise ValueError(f"{self.where}: size {self.size} is not supported (only the vision "
                       f"tower's image size, {tower})")

  def normalise(self, x: np.ndarray) -> np.ndarray:
    return rescale_normalize(x, self.rescale_factor, self.mean, self.std)


@dataclasses.dataclass(frozen=True)
class OnevisionSettings:
  """What a LLaVA-OneVision folder says about images and videos.

  Attributes:
    image, video: the image and video processors' steps (``FrameSettings``); the image size is
      the tile size S, the vision tower's image size, and so must the video size be (checked
      when a video is processed: a folder without video settings has transformers' 384).
    token_grid: g, tokens per side of a tile (``vision_config.image_size // patch_size``).
    video_grid: p, tokens per side of a pooled video frame (``VisionConfig.pooled_grid``).
    pinpoints: the image processor's ``image_grid_pinpoints`` (what transformers chooses from).
    max_tiles: N of ``vision_aspect_ratio="anyres_max_N"``.
    image_token, video_token: their text; image_token_id, video_token_id: their ids.
    where: the folder (for errors).
  """
  image: FrameSettings
  video: FrameSettings
  token_grid: int
  video_grid: int
  pinpoints: tuple[tuple[int, int], ...]
  max_tiles: int
  image_token: str
  video_token: str
  image_token_id: int
  video_token_id: int
  where: str

  @classmethod
  def from_folder(cls, folder) -> "OnevisionSettings":
    """The settings of a ``save_pretrained`` folder (local or ``gs://``): ``config.json`` (the
    vision tower, the token ids, ``vision_aspect_ratio``), the image processor's fields from
    ``preprocessor_config.json`` (or the ``image_processor`` object of
    ``processor_config.json``), the video processor's from ``video_preprocessor_config.json``
    (or ``processor_config.json``'s ``video_processor``; transformers' defaults without either)
    and the processor's own fields from ``processor_config.json``.

    Raises FileNotFoundError for a missing ``config.json`` or image processor file, and a
    ValueError naming the file and key for a field we do not reproduce.
    """
    folder = epath.Path(folder)              # local or gs://
    model_file = folder / "config.json"
    if not model_file.is_file():
      raise FileNotFoundError(f"{folder} has no config.json (the model's vision tower gives the "
                              "tile and token sizes)")
    model = read_json(model_file)
    if model.get("model_type") != "llava_onevision":
      raise ValueError(f"{model_file}: model_type={model.get('model_type')!r}, expected "
                       "'llava_onevision'")
    _, vision = llava_onevision_configs(model)
    g = vision.grid
    proc_file = folder / "processor_config.json"
    proc = read_json(proc_file) if proc_file.is_file() else {}
    icfg, iwhere = processor_fields(folder / "preprocessor_config.json", proc, "image_processor",
                                    proc_file, IMAGE_PROCESSORS)
    if icfg is None:
      raise FileNotFoundError(f"{folder} has no preprocessor_config.json and no "
                              "processor_config.json with an image_processor")
    vcfg, vwhere = processor_fields(folder / "video_preprocessor_config.json", proc,
                                    "video_processor", proc_file, VIDEO_PROCESSORS)
    if vcfg is None:
      vcfg, vwhere = {}, "transformers' video processor defaults"
    if vcfg.get("do_sample_frames"):
      raise ValueError(f"{vwhere}: do_sample_frames=true is not supported (give the frames to "
                       "use)")
    image = _frame_settings(icfg, iwhere)
    image.check_size(vision.image_size)
    video = _frame_settings(vcfg, vwhere)
    pinpoints = icfg.get("image_grid_pinpoints") or _PINPOINTS
    if not all(isinstance(p, (list, tuple)) and len(p) == 2 and
               all(isinstance(n, int) and n > 0 for n in p) for p in pinpoints):
      raise ValueError(f"{iwhere}: image_grid_pinpoints={pinpoints!r} must be [height, width] "
                       "pairs of positive ints")
    strategy = proc.get("vision_feature_select_strategy") or "full"
    if strategy != "full":
      raise ValueError(f"{proc_file}: vision_feature_select_strategy={strategy!r} is not "
                       "supported (only 'full')")
    n = proc.get("num_image_tokens")
    if n is not None and n != g * g:
      raise ValueError(f"{proc_file}: num_image_tokens={n!r}, but {model_file} gives {g * g} "
                       f"tokens per tile ({g} x {g})")
    aspect = model.get("vision_aspect_ratio", "anyres_max_9")
    if proc.get("vision_aspect_ratio", aspect) != aspect:
      raise ValueError(f"{proc_file}: vision_aspect_ratio={proc['vision_aspect_ratio']!r}, but "
                       f"{model_file} says {aspect!r}")
    m = _ANYRES.fullmatch(str(aspect))
    if m is None:
      raise ValueError(f"{model_file}: vision_aspect_ratio={aspect!r} is not supported (only "
                       "'anyres_max_N')")
    ids = llava_onevision_token_ids(model)
    return cls(image=image, video=video, token_grid=g, video_grid=vision.pooled_grid(g, g)[0],
               pinpoints=tuple(tuple(p) for p in pinpoints), max_tiles=int(m.group(1)),
               image_token=proc.get("image_token", "<image>"),
               video_token=proc.get("video_token", "<video>"),
               image_token_id=ids["image"], video_token_id=ids["video"],
               where=str(folder))


def _frame_settings(cfg: Mapping[str, Any], where: str) -> FrameSettings:
  """One processor's steps (its size a square, ``check_size`` compares it with the tower)."""
  c = {**_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
  size = c["size"]
  side = (size.get("shortest_edge") if isinstance(size, Mapping) and "shortest_edge" in size
          else size.get("height") if isinstance(size, Mapping) and
          size.get("height") == size.get("width") else None)
  if isinstance(side, bool) or not isinstance(side, int) or side < 1:
    raise ValueError(f"{where}: size={size!r} is not supported (only a square "
                     "{\"height\": S, \"width\": S} or {\"shortest_edge\": S})")
  resample = resize_filter(c, where, "tiles and frames must be the vision tower's size")
  mean, std = (channels(c[k], k, where) for k in ("image_mean", "image_std"))
  return FrameSettings(size=side, resample=resample,
                       rescale_factor=float(c["rescale_factor"]) if c["do_rescale"] else None,
                       mean=mean if c["do_normalize"] else None,
                       std=std if c["do_normalize"] else None,
                       convert_rgb=bool(c["do_convert_rgb"]),
                       fill=tuple(int(x * 255) for x in mean), where=where)


class LlavaOnevisionMedia:
  """LLaVA-OneVision image and video processing at the fixed tile grid ``grid = (rows, cols)``
  (a ``MediaProcessor``; see the module docstring). ``(0, 0)``: the base image alone, as
  transformers processes an image among several in one example.
  """

  def __init__(self, settings: OnevisionSettings, grid: tuple[int, int]):
    rows, cols = grid
    for n in (rows, cols):
      if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"grid must be two ints >= 0 (rows, cols), got {grid!r}")
    if (rows == 0) != (cols == 0):
      raise ValueError(f"grid {grid!r}: rows and cols are both 0 (the base image only) or both "
                       ">= 1")
    self.settings = settings
    self.grid = (rows, cols)

  @classmethod
  def from_folder(cls, folder, grid: tuple[int, int]) -> "LlavaOnevisionMedia":
    """The processing of a ``save_pretrained`` folder (``OnevisionSettings.from_folder``) at
    ``grid``."""
    return cls(OnevisionSettings.from_folder(folder), grid)

  def natural_grid(self, h: int, w: int) -> tuple[int, int]:
    """The grid transformers would give an ``h x w`` image (``natural_grid``)."""
    return natural_grid(h, w, self.settings.pinpoints, self.settings.image.size)

  def tiled_grid(self, h: int, w: int) -> tuple[int, int]:
    """The token grid of an ``h x w`` image's tiles at the fixed grid (``unpadded_grid``).

    Raises ValueError when transformers would shrink it further (``anyres_max`` downsampling,
    which we do not reproduce).
    """
    s, g = self.settings, self.settings.token_grid
    uh, uw = unpadded_grid(h, w, self.grid, g)
    if math.sqrt(uh * uw / (s.max_tiles * g * g)) > 1.1:
      raise ValueError(f"{s.where}: a {h}x{w} image at the grid {self.grid} keeps {uh}x{uw} "
                       f"tokens, more than anyres_max_{s.max_tiles} allows; transformers would "
                       "downsample them, which is not supported: use a grid of at most "
                       f"{int(1.21 * s.max_tiles)} tiles")
    return uh, uw

  def _rgb(self, image: np.ndarray, fs: FrameSettings) -> np.ndarray:
    return rgb_image(image, fs.convert_rgb, self.settings.where)

  def pixels(self, image: np.ndarray) -> np.ndarray:
    """uint8 ``[h, w, 3]`` (or grey, RGBA) -> float32 ``[1 + rows * cols, S, S, 3]``: the base
    image, then the tiles row by row (``grid = (0, 0)``: the padded base image alone)."""
    # PIL (the [data] extra) only here: the module imports without it
    from PIL import Image as PILImage

    fs, (rows, cols) = self.settings.image, self.grid
    im = self._rgb(image, fs)
    S = fs.size
    resize = lambda a, h, w: np.asarray(PILImage.fromarray(a).resize((w, h), fs.resample))
    if not rows:
      h, w = im.shape[:2]
      side = max(h, w)
      square = np.empty((side, side, 3), np.uint8)
      square[...] = fs.fill
      y, x = (side - h) // 2, (side - w) // 2
      square[y:y + h, x:x + w] = im
      return fs.normalise(resize(square, S, S)[None])
    H, W = rows * S, cols * S
    nh, nw = patch_output_size(*im.shape[:2], H, W)
    canvas = np.zeros((H, W, 3), np.uint8)
    y, x = (H - nh) // 2, (W - nw) // 2
    canvas[y:y + nh, x:x + nw] = resize(im, nh, nw)
    tiles = canvas.reshape(rows, S, cols, S, 3).transpose(0, 2, 1, 3, 4).reshape(-1, S, S, 3)
    return fs.normalise(np.concatenate([resize(im, S, S)[None], tiles]))

  def image(self, image: np.ndarray) -> list[MediaPart]:
    """The parts that replace one image's placeholder (the module docstring)."""
    s, g = self.settings, self.settings.token_grid
    pixels = self.pixels(image)
    if not self.grid[0]:
      return [Visual(Image(g, g), pixels), s.image_token]
    uh, uw = self.tiled_grid(*np.asarray(image).shape[:2])
    return [Visual(Image(g, g), pixels[:1]),
            Visual(Image(uh, uw, newline_rows=True, tiles=self.grid), pixels[1:],
                   text_ids=(s.image_token_id,) * uh)]

  def frames(self, frames: Sequence[np.ndarray]) -> np.ndarray:
    """Video frames (uint8 ``[h, w, 3]`` each) -> float32 ``[T, S, S, 3]``."""
    # PIL (the [data] extra) only here: the module imports without it
    from PIL import Image as PILImage

    fs = self.settings.video
    fs.check_size(self.settings.image.size)
    if not len(frames):
      raise ValueError("a video needs at least one frame")
    S = fs.size
    out = [np.asarray(PILImage.fromarray(self._rgb(f, fs)).resize((S, S), fs.resample))
           for f in frames]
    return fs.normalise(np.stack(out))

  def video(self, frames: Sequence[np.ndarray]) -> list[MediaPart]:
    """The parts that replace a video's placeholder: its pooled frames, then the newline."""
    s = self.settings
    p = s.video_grid
    return [Visual(Video(len(frames), p, p), self.frames(frames)), s.video_token]

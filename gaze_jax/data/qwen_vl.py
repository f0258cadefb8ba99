"""Qwen2.5-VL and Qwen3-VL image and video processing at static sizes, as ``MediaProcessor``s.

transformers' Qwen processors (``Qwen2VLImageProcessor[Pil]``, used by both families, and the
``Qwen2VLVideoProcessor`` / ``Qwen3VLVideoProcessor``) resize every image to its own size
(``smart_resize``: both sides a multiple of ``factor = patch_size * merge_size``, 28 for
Qwen2.5-VL and 32 for Qwen3-VL, the area within ``[min_pixels, max_pixels]``). Our shapes are
static, so a config fixes a few **buckets**, ``(height, width)`` pairs in pixels (each side a
multiple of the factor), and every image or video is resized to one of them
(``qwen_vl_bucket``). Steps, from the folder's processor settings:

  1. to RGB (transparency composited onto white);
  2. resized to the bucket with Pillow's filter (``resample``, bicubic by default);
  3. ``* rescale_factor``, then ``(x - image_mean) / image_std`` (float32);
  4. patches (``patchify``): frames in groups of ``temporal_patch_size`` (T = 2; a still image
     is repeated T times, a video with a frame count that T does not divide repeats its last
     frame), each group cut into ``P x P`` patches, ordered by 2 x 2 merge block (row-major
     blocks, row-major patches inside a block): ``pixels [t * gh * gw, C * T * P * P]`` with the
     grid ``(t, gh, gw)``, ``gh = H / P``, ``gw = W / P`` (transformers' ``pixel_values`` and
     ``image_grid_thw`` / ``video_grid_thw``).

Equality with transformers. transformers resizes to the bucket exactly when its pixel budget is
pinned to the bucket's area and ``smart_resize`` of the image's size then gives the bucket
(``QwenVLMedia.pinned_size``: ``size={"shortest_edge": A, "longest_edge": A}`` with ``A = H * W``;
for a Qwen3-VL video ``A = frames * H * W``, its budget counts frames). ``qwen_vl_bucket``
prefers such buckets; for them the image pixels equal those of transformers' Pillow image
processor bit for bit. Video frames are resized with Pillow here, as the image processor does;
transformers' video processors resize with torchvision, whose antialiased bicubic filter may
differ by one 0-255 level at some pixels (frames already at the bucket size are not resized and
match to float32 round-off; its fused normalisation differs from ours by float32 round-off).

Prompt. The chat template writes ``<|vision_start|><|image_pad|><|vision_end|>`` for an image
(``<|video_pad|>`` for a video); the media processor replaces the whole wrapper
(``image_placeholder`` / ``video_placeholder``; ``qwen_vl_tokenizer`` sets them on a folder's
tokenizer), as transformers expands it:

  image: ``<|vision_start|>`` + ``Image(gh / 2, gw / 2)`` (one token per merged 2 x 2 patch
    block, transformers' ``t * gh * gw / 4`` pads) + ``<|vision_end|>``;
  Qwen2.5-VL video: ``<|vision_start|>`` + ``Video(t, gh / 2, gw / 2)`` (one grid per group of T
    frames) + ``<|vision_end|>``; a group lasts ``second_per_grid`` seconds (``T / fps``,
    transformers' ``second_per_grid_ts``); the Video's M-RoPE ``time_interval`` is
    ``tokens_per_second * second_per_grid`` (``config.json``
    ``vision_config``'s ``tokens_per_second``, transformers' default 4);
  Qwen3-VL video: per group of T frames, ``<{s:.1f} seconds><|vision_start|>`` +
    ``Image(gh / 2, gw / 2)`` + ``<|vision_end|>``, ``s`` the mean time of the group's first and
    last frame (frame index / fps; transformers' default fps 24 when the video has none).

Frames: Qwen3-VL's video processor samples frames (``do_sample_frames``, default on: ``fps``
frames per second of the video, at least ``min_frames``, ``np.linspace`` indices); that sampling
is reproduced (``QwenVLMedia.sample``) with the video's frame rate ``video_fps`` (default: 24, as
transformers assumes without metadata). Qwen2.5-VL's default is no sampling; its
``do_sample_frames=true`` is refused.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from etils import epath

from gaze_jax.data.features import MediaPart, PatchVisual
from gaze_jax.data.hf_pixels import (channels, check_image, processor_fields, rescale_normalize,
                                     resize_filter, rgb_image)
from gaze_jax.data.tokenizers import load_model_tokenizer
from gaze_jax.gaze.layout import Image, Video
from gaze_jax.paths import read_json

__all__ = ["FAMILIES", "QwenSteps", "QwenVLSettings", "QwenVLMedia", "PatchVisual",
           "qwen_vl_bucket", "smart_resize", "video_smart_resize", "patchify", "unpatchify",
           "patch_frames",
           "qwen_vl_tokenizer", "frame_timestamps"]

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
IMAGE_PROCESSORS = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorPil",
                    "Qwen2VLImageProcessorFast")
VIDEO_PROCESSORS = {"qwen2_5_vl": ("Qwen2VLVideoProcessor",),
                    "qwen3_vl": ("Qwen3VLVideoProcessor",)}
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HALF = (0.5, 0.5, 0.5)
_COMMON = dict(do_convert_rgb=True, do_resize=True, resample=3, do_rescale=True,
               rescale_factor=1 / 255, do_normalize=True, temporal_patch_size=2, merge_size=2)
# transformers' class defaults for what a processor file leaves out.
_IMAGE_DEFAULTS = dict(_COMMON, size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
                       image_mean=list(_CLIP_MEAN), image_std=list(_CLIP_STD), patch_size=14)
_VIDEO_DEFAULTS = {
    "qwen2_5_vl": dict(_COMMON, size={"shortest_edge": 128 * 28 * 28,
                                      "longest_edge": 28 * 28 * 768},
                       image_mean=list(_CLIP_MEAN), image_std=list(_CLIP_STD), patch_size=14,
                       do_sample_frames=False, fps=None, num_frames=None, min_frames=4,
                       max_frames=768),
    "qwen3_vl": dict(_COMMON, size={"shortest_edge": 128 * 32 * 32,
                                    "longest_edge": 32 * 32 * 768},
                     image_mean=list(_HALF), image_std=list(_HALF), patch_size=16,
                     do_sample_frames=True, fps=2, num_frames=None, min_frames=4,
                     max_frames=768),
}
_DEFAULT_FPS = 24.0           # transformers' frame rate for a video without metadata


# --------------------------------------------------------------------------- sizes

def smart_resize(height: int, width: int, factor: int, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
  """transformers' ``smart_resize`` (Qwen2-VL image and video processors): ``(h, w)`` rounded to
  multiples of ``factor``, scaled into ``[min_pixels, max_pixels]`` with the aspect kept."""
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"absolute aspect ratio must be smaller than 200, got "
                     f"{max(height, width) / min(height, width)}")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def video_smart_resize(frames: int, height: int, width: int, factor: int, min_pixels: int,
                       max_pixels: int, temporal_factor: int = 2) -> tuple[int, int]:
  """transformers' Qwen3-VL video ``smart_resize``: the budget counts the frames."""
  if frames < temporal_factor:
    raise ValueError(f"t:{frames} must be larger than temporal_factor:{temporal_factor}")
  if height < factor or width < factor:
    scale = max(factor / height, factor / width)
    height, width = int(height * scale), int(width * scale)
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"absolute aspect ratio must be smaller than 200, got "
                     f"{max(height, width) / min(height, width)}")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  t_bar = round(frames / temporal_factor) * temporal_factor
  if t_bar * h_bar * w_bar > max_pixels:
    beta = math.sqrt((frames * height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif t_bar * h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (frames * height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def _check_buckets(buckets, factor: int) -> tuple[tuple[int, int], ...]:
  if (isinstance(buckets, (list, tuple)) and len(buckets) == 2
      and all(isinstance(n, (int, np.integer)) for n in buckets)):
    buckets = [buckets]                                 # one (height, width)
  out = []
  for b in buckets:
    ok = (isinstance(b, (list, tuple)) and len(b) == 2
          and all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in b))
    if not ok or min(b) < factor or b[0] % factor or b[1] % factor:
      raise ValueError(f"bucket {b!r}: a bucket is (height, width) in pixels, each a positive "
                       f"multiple of {factor} (patch_size * merge_size)")
    out.append((int(b[0]), int(b[1])))
  if not out:
    raise ValueError("no buckets: give at least one (height, width)")
  return tuple(out)


def qwen_vl_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]],
                   factor: int = 28) -> tuple[int, int]:
  """The bucket ``(H, W)`` that an ``height x width`` image is resized to.

  1. Buckets that transformers itself would give this image with its pixel budget pinned to the
     bucket's area (``smart_resize(height, width, factor, H * W, H * W) == (H, W)``; these are
     the buckets of about the image's aspect ratio): for them our pixels are transformers' own.
     Among them, the one whose area is nearest the image's (``|log(H W / (h w))|``, the least
     rescaling; ties: the larger).
  2. Without such a bucket: the nearest by aspect ratio (``|log(W / H) - log(w / h)|``), then by
     area as above; the image is stretched to it (transformers would give it another size).

  ``factor`` is ``patch_size * merge_size`` (28 for Qwen2.5-VL, 32 for Qwen3-VL); every bucket
  side must be a multiple of it. Raises ValueError for bad buckets or sizes.
  """
  buckets = _check_buckets(buckets, factor)
  if min(height, width) < 1:
    raise ValueError(f"an image of {height}x{width} pixels has no bucket")

  def area_key(b):
    return (abs(math.log(b[0] * b[1] / (height * width))), -b[0] * b[1])

  def exact(b):
    try:
      return smart_resize(height, width, factor, b[0] * b[1], b[0] * b[1]) == b
    except ValueError:
      return False

  hits = [b for b in buckets if exact(b)]
  if hits:
    return min(hits, key=area_key)
  aspect = math.log(width / height)
  return min(buckets, key=lambda b: (round(abs(math.log(b[1] / b[0]) - aspect), 12),
                                     area_key(b)))


# --------------------------------------------------------------------------- patches

def patchify(frames: np.ndarray, patch_size: int, temporal_patch_size: int,
             merge_size: int) -> tuple[np.ndarray, tuple[int, int, int]]:
  """float ``[F, H, W, C]`` frames -> ``pixels [t * gh * gw, C * T * P * P]`` and the grid
  ``(t, gh, gw)`` in transformers' order (module docstring); ``F`` is padded to a multiple of T
  with the last frame."""
  x = np.asarray(frames, np.float32)
  F, H, W, C = x.shape
  P, T, m = patch_size, temporal_patch_size, merge_size
  if H % (P * m) or W % (P * m):
    raise ValueError(f"frames of {H}x{W} are not a multiple of {P * m} (patch_size * merge_size)")
  if F % T:
    x = np.concatenate([x, np.repeat(x[-1:], T - F % T, axis=0)])
  t, gh, gw = x.shape[0] // T, H // P, W // P
  x = x.transpose(0, 3, 1, 2).reshape(t, T, C, gh // m, m, P, gw // m, m, P)
  x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
  return np.ascontiguousarray(x.reshape(t * gh * gw, C * T * P * P)), (t, gh, gw)


def unpatchify(rows: np.ndarray, grid: tuple[int, int, int], *, merge_size: int = 2,
               temporal_patch_size: int = 2, channels: int = 3) -> np.ndarray:
  """``patchify``'s inverse: ``rows [t * gh * gw, C * T * P * P]`` of grid ``(t, gh, gw)`` ->
  float ``[t * T, gh * P, gw * P, C]`` frames (P from the row width)."""
  t, gh, gw = (int(n) for n in grid)
  C, T, m = channels, temporal_patch_size, merge_size
  P = int(round((rows.shape[-1] / (C * T)) ** 0.5))
  if C * T * P * P != rows.shape[-1] or rows.shape[0] != t * gh * gw:
    raise ValueError(f"patch rows {rows.shape} do not hold grid {grid} of {C} x {T} x P x P")
  x = np.asarray(rows, np.float32).reshape(t, gh // m, gw // m, m, m, C, T, P, P)
  x = x.transpose(0, 6, 1, 3, 7, 2, 4, 8, 5)          # t, T, bh, mh, P, bw, mw, P, C
  return x.reshape(t * T, gh * P, gw * P, C)


def patch_frames(patches: np.ndarray, patch_grids: np.ndarray, *, merge_size: int = 2,
                 temporal_patch_size: int = 2) -> np.ndarray:
  """A batch's patch rows back to normalised frames for pictures (gaze maps): float
  ``[B, F, H, W, C]`` with ``F = patch_grids.shape[1]`` (the layout's frame slots: a segment of
  ``t`` temporal groups gives ``t`` frames, the first image of each group), each frame
  stretched to the batch's largest ``H x W`` (nearest pixel; a region then covers the same
  share of its frame), zeros past an example's frames."""
  patches, grids = np.asarray(patches), np.asarray(patch_grids).reshape(len(patches), -1, 3)
  B, F = grids.shape[:2]
  P = int(round((patches.shape[-1] / (3 * temporal_patch_size)) ** 0.5))
  used = grids[grids[..., 0] > 0]
  H = int(used[:, 1].max()) * P if len(used) else P
  W = int(used[:, 2].max()) * P if len(used) else P
  out = np.zeros((B, F, H, W, 3), np.float32)
  for b in range(B):
    row, f = 0, 0
    for t, gh, gw in grids[b]:
      if not t:
        continue
      n = int(t * gh * gw)
      frames = unpatchify(patches[b, row:row + n], (t, gh, gw), merge_size=merge_size,
                          temporal_patch_size=temporal_patch_size)[::temporal_patch_size]
      row += n
      ys = np.arange(H) * frames.shape[1] // H
      xs = np.arange(W) * frames.shape[2] // W
      for fr in frames:
        if f < F:
          out[b, f] = fr[ys][:, xs]
        f += 1
  return out


def frame_timestamps(indices: Sequence[int], fps: float, temporal_patch_size: int) -> list[float]:
  """Qwen3-VL's time of each group of frames: frame index / fps, the indices padded with the
  last to a multiple of T, the mean of each group's first and last (``_calculate_timestamps``)."""
  idx = [int(i) for i in indices]
  if len(idx) % temporal_patch_size:
    idx += [idx[-1]] * (temporal_patch_size - len(idx) % temporal_patch_size)
  ts = [i / fps for i in idx]
  return [(ts[i] + ts[i + temporal_patch_size - 1]) / 2
          for i in range(0, len(ts), temporal_patch_size)]


# --------------------------------------------------------------------------- settings

@dataclasses.dataclass(frozen=True)
class QwenSteps:
  """One processor's pixel steps (image or video): Pillow filter ``resample``, ``rescale_factor``
  / ``mean`` / ``std`` (None: step off), ``convert_rgb``, its own pixel budget ``min_pixels`` /
  ``max_pixels`` (what transformers would do unpinned; informational), the patch sizes, and
  for videos the frame sampling fields."""
  resample: int
  rescale_factor: Optional[float]
  mean: Optional[tuple[float, ...]]
  std: Optional[tuple[float, ...]]
  convert_rgb: bool
  min_pixels: int
  max_pixels: int
  patch_size: int
  temporal_patch_size: int
  merge_size: int
  where: str
  sample_frames: bool = False
  fps: Optional[float] = None
  num_frames: Optional[int] = None
  min_frames: int = 4
  max_frames: int = 768

  @property
  def factor(self) -> int:
    return self.patch_size * self.merge_size

  def normalise(self, x: np.ndarray) -> np.ndarray:
    return rescale_normalize(x, self.rescale_factor, self.mean, self.std)


def _steps(cfg: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> QwenSteps:
  c = {**defaults, **{k: v for k, v in cfg.items() if v is not None}}
  size = dict(c["size"]) if isinstance(c["size"], Mapping) else {}
  for old, new in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
    if cfg.get(old) is not None:
      size[new] = cfg[old]
  lo, hi = size.get("shortest_edge"), size.get("longest_edge")
  if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (lo, hi)):
    raise ValueError(f"{where}: size={c['size']!r} is not supported (it needs "
                     "{\"shortest_edge\": min_pixels, \"longest_edge\": max_pixels})")
  resample = resize_filter(c, where, "images are resized to the buckets")
  for k in ("patch_size", "temporal_patch_size", "merge_size"):
    if isinstance(c[k], bool) or not isinstance(c[k], int) or c[k] < 1:
      raise ValueError(f"{where}: {k}={c[k]!r} must be a positive int")
  mean = std = None
  if c["do_normalize"]:
    mean, std = (channels(c[k], k, where) for k in ("image_mean", "image_std"))
  fps = c.get("fps")
  return QwenSteps(resample=resample,
                   rescale_factor=float(c["rescale_factor"]) if c["do_rescale"] else None,
                   mean=mean, std=std, convert_rgb=bool(c["do_convert_rgb"]), min_pixels=lo,
                   max_pixels=hi, patch_size=c["patch_size"],
                   temporal_patch_size=c["temporal_patch_size"], merge_size=c["merge_size"],
                   where=where, sample_frames=bool(c.get("do_sample_frames", False)),
                   fps=None if fps is None else float(fps), num_frames=c.get("num_frames"),
                   min_frames=int(c.get("min_frames", 4)), max_frames=int(c.get("max_frames",
                                                                                768)))


@dataclasses.dataclass(frozen=True)
class QwenVLSettings:
  """What a Qwen2.5-VL / Qwen3-VL folder says about images and videos.

  Attributes:
    family: ``"qwen2_5_vl"`` or ``"qwen3_vl"`` (``config.json``'s ``model_type``).
    image, video: the image and video processors' steps (``QwenSteps``).
    vision_start, vision_end, image_pad, video_pad: the marker tokens' text.
    where: the folder (for errors).
    tokens_per_second: Qwen2.5-VL's M-RoPE time positions per second of video
      (``vision_config.tokens_per_second``).
  """
  family: str
  image: QwenSteps
  video: QwenSteps
  vision_start: str = "<|vision_start|>"
  vision_end: str = "<|vision_end|>"
  image_pad: str = "<|image_pad|>"
  video_pad: str = "<|video_pad|>"
  where: str = "processor settings"
  tokens_per_second: float = 4.0

  @classmethod
  def defaults(cls, family: str) -> "QwenVLSettings":
    """transformers' class defaults for ``family`` (a Qwen3-VL image processor has no class of
    its own: its patch 16 and mean / std 0.5 come from the checkpoint's file, as here)."""
    if family not in FAMILIES:
      raise ValueError(f"family {family!r} is not one of {FAMILIES}")
    image = dict(_IMAGE_DEFAULTS)
    if family == "qwen3_vl":
      image.update(patch_size=16, image_mean=list(_HALF), image_std=list(_HALF),
                   size={"shortest_edge": 65536, "longest_edge": 16777216})
    return cls(family, _steps({}, image, f"{family} image defaults"),
               _steps({}, _VIDEO_DEFAULTS[family], f"{family} video defaults"),
               where=f"{family} defaults")

  @classmethod
  def from_folder(cls, folder) -> "QwenVLSettings":
    """The settings of a ``save_pretrained`` folder (local or ``gs://``): ``config.json``
    (``model_type``; the vision tower's patch sizes, checked), the image processor's fields from
    ``preprocessor_config.json`` (or ``processor_config.json``'s ``image_processor``), the video
    processor's from ``video_preprocessor_config.json`` (or ``processor_config.json``'s
    ``video_processor``; transformers' defaults without either).

    Raises FileNotFoundError for a missing ``config.json`` or image processor file, ValueError
    naming the file and key for a field we do not reproduce.
    """
    folder = epath.Path(folder)
    model_file = folder / "config.json"
    if not model_file.is_file():
      raise FileNotFoundError(f"{folder} has no config.json (its model_type names the family)")
    model = read_json(model_file)
    family = model.get("model_type")
    if family not in FAMILIES:
      raise ValueError(f"{model_file}: model_type={family!r}, expected one of {FAMILIES}")
    proc_file = folder / "processor_config.json"
    proc = read_json(proc_file) if proc_file.is_file() else {}
    icfg, iwhere = processor_fields(folder / "preprocessor_config.json", proc,
                                    "image_processor", proc_file, IMAGE_PROCESSORS)
    if icfg is None:
      raise FileNotFoundError(f"{folder} has no preprocessor_config.json and no "
                              "processor_config.json with an image_processor")
    vcfg, vwhere = processor_fields(folder / "video_preprocessor_config.json", proc,
                                    "video_processor", proc_file, VIDEO_PROCESSORS[family])
    if vcfg is None:
      vcfg, vwhere = {}, f"transformers' {family} video processor defaults"
    image = _steps(icfg, _IMAGE_DEFAULTS, iwhere)
    video = _steps(vcfg, _VIDEO_DEFAULTS[family], vwhere)
    if family == "qwen2_5_vl" and video.sample_frames:
      raise ValueError(f"{vwhere}: do_sample_frames=true is not supported for qwen2_5_vl (give "
                       "the frames to use)")
    vc = model.get("vision_config") or {}
    tower = {"patch_size": vc.get("patch_size"), "temporal_patch_size":
             vc.get("temporal_patch_size"), "merge_size": vc.get("spatial_merge_size")}
    for steps, where in ((image, iwhere), (video, vwhere)):
      for k, v in tower.items():
        if isinstance(v, int) and v != getattr(steps, k):
          raise ValueError(f"{where}: {k}={getattr(steps, k)}, but {model_file} vision_config "
                           f"says {v}: the patches must be the vision tower's")
    tps = vc.get("tokens_per_second", 4)
    if isinstance(tps, bool) or not isinstance(tps, (int, float)) or not tps > 0:
      raise ValueError(f"{model_file}: vision_config.tokens_per_second={tps!r} must be a number "
                       "> 0")
    return cls(family, image, video, where=str(folder), tokens_per_second=float(tps))


# --------------------------------------------------------------------------- media

class QwenVLMedia:
  """Qwen2.5-VL / Qwen3-VL image and video processing at static ``buckets`` (a
  ``MediaProcessor``; see the module docstring). ``buckets``: one ``(height, width)`` or a list,
  in pixels, each side a multiple of ``patch_size * merge_size`` of the image processor (and of
  the video processor for videos). ``video_fps``: the frame rate of the frames a video is given
  as (Qwen3-VL's sampling and timestamps, Qwen2.5-VL's ``second_per_grid``); None: 24, as
  transformers assumes for a video without metadata."""

  def __init__(self, settings: QwenVLSettings, buckets, video_fps: Optional[float] = None):
    self.settings = settings
    self.buckets = _check_buckets(buckets, settings.image.factor)
    if settings.video.factor != settings.image.factor:
      _check_buckets(self.buckets, settings.video.factor)
    if video_fps is not None and not video_fps > 0:
      raise ValueError(f"video_fps must be > 0, got {video_fps!r}")
    self.video_fps = video_fps

  @classmethod
  def from_folder(cls, folder, buckets, video_fps: Optional[float] = None) -> "QwenVLMedia":
    """The processing of a ``save_pretrained`` folder (``QwenVLSettings.from_folder``)."""
    return cls(QwenVLSettings.from_folder(folder), buckets, video_fps)

  @property
  def family(self) -> str:
    return self.settings.family

  @property
  def image_placeholder(self) -> str:
    """What the chat template writes for an image, which ``image`` replaces."""
    s = self.settings
    return s.vision_start + s.image_pad + s.vision_end

  @property
  def video_placeholder(self) -> str:
    s = self.settings
    return s.vision_start + s.video_pad + s.vision_end

  @property
  def patch_dim(self) -> int:
    """D = C * T * P * P, the columns of a patch row (``features.PatchMedia``)."""
    steps = [self.settings.image, self.settings.video]
    dims = {3 * s.temporal_patch_size * s.patch_size ** 2 for s in steps}
    if len(dims) != 1:
      raise ValueError(f"{self.settings.where}: the image and video processors' patches differ "
                       f"({sorted(dims)} values per patch); one vision tower takes one size")
    return dims.pop()

  @property
  def tokens_per_second(self) -> float:
    """M-RoPE time positions per second of video (``features.PatchMedia``)."""
    return self.settings.tokens_per_second

  @property
  def max_frame_patches(self) -> int:
    """The most patch rows of one frame (temporal group): the largest bucket's ``gh * gw``
    (``features.PatchMedia``)."""
    P = min(self.settings.image.patch_size, self.settings.video.patch_size)
    return max(h * w for h, w in self.buckets) // (P * P)

  # ---- sizes

  def bucket(self, height: int, width: int, video: bool = False) -> tuple[int, int]:
    """``qwen_vl_bucket`` of an ``height x width`` image (video frame)."""
    steps = self.settings.video if video else self.settings.image
    return qwen_vl_bucket(height, width, self.buckets, steps.factor)

  def pinned_size(self, bucket: tuple[int, int], frames: Optional[int] = None) -> dict:
    """The ``size`` that makes transformers' processor resize to ``bucket`` (when its
    ``smart_resize`` of the image gives it, ``qwen_vl_bucket``'s first rule): the pixel budget
    pinned to the bucket's area; for a Qwen3-VL video of ``frames`` (sampled) frames, to
    ``frames`` times it."""
    area = bucket[0] * bucket[1]
    if frames is not None and self.family == "qwen3_vl":
      area *= frames
    return {"shortest_edge": area, "longest_edge": area}

  # ---- pixels

  def _rgb(self, image: np.ndarray, steps: QwenSteps) -> np.ndarray:
    return rgb_image(image, steps.convert_rgb, steps.where)

  def _resized(self, image: np.ndarray, steps: QwenSteps, bucket) -> np.ndarray:
    # PIL (the [data] extra) only here: the module imports without it
    from PIL import Image as PILImage

    im = self._rgb(image, steps)
    H, W = bucket
    return np.asarray(PILImage.fromarray(im).resize((W, H), steps.resample))

  def image_pixels(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 ``[h, w, 3]`` (or grey, RGBA) -> ``pixels [gh * gw, C * T * P * P]`` float32 and
    ``(1, gh, gw)``, at the image's bucket."""
    s = self.settings.image
    im = check_image(image)
    x = s.normalise(self._resized(im, s, self.bucket(*im.shape[:2]))[None])
    return patchify(np.repeat(x, s.temporal_patch_size, axis=0), s.patch_size,
                    s.temporal_patch_size, s.merge_size)

  def image(self, image: np.ndarray) -> list[MediaPart]:
    """The parts that replace one ``image_placeholder``."""
    s, m = self.settings, self.settings.image.merge_size
    pixels, (t, gh, gw) = self.image_pixels(image)
    return [s.vision_start, PatchVisual(Image(gh // m, gw // m), pixels, grid_thw=(t, gh, gw)),
            s.vision_end]

  def sample(self, n: int) -> np.ndarray:
    """The indices of the frames the video processor keeps of ``n`` (all without sampling)."""
    v = self.settings.video
    if n < 1:
      raise ValueError("a video needs at least one frame")
    if not v.sample_frames:
      return np.arange(n)
    num = v.num_frames
    if num is None and v.fps is not None:
      num = int(n / (self.video_fps or _DEFAULT_FPS) * v.fps)
      num = min(max(num, v.min_frames), v.max_frames, n)
    if num is None:
      num = min(max(n, v.min_frames), v.max_frames)
    return np.linspace(0, n - 1, num).round().astype(int)

  def video_pixels(self, frames: Sequence[np.ndarray]
                   ) -> tuple[np.ndarray, tuple[int, int, int], np.ndarray]:
    """Video frames (uint8 ``[h, w, 3]`` each, one size) -> ``pixels [t * gh * gw, C * T * P *
    P]``, ``(t, gh, gw)`` and the sampled frame indices."""
    v = self.settings.video
    if not len(frames):
      raise ValueError("a video needs at least one frame")
    shapes = {np.asarray(f).shape[:2] for f in frames}
    if len(shapes) != 1:
      raise ValueError(f"a video's frames must have one size, got {sorted(shapes)}")
    idx = self.sample(len(frames))
    bucket = self.bucket(*shapes.pop(), video=True)
    x = v.normalise(np.stack([self._resized(frames[i], v, bucket) for i in idx]))
    pixels, grid = patchify(x, v.patch_size, v.temporal_patch_size, v.merge_size)
    return pixels, grid, idx

  def video(self, frames: Sequence[np.ndarray]) -> list[MediaPart]:
    """The parts that replace one ``video_placeholder`` (the module docstring)."""
    s, v = self.settings, self.settings.video
    m = v.merge_size
    pixels, (t, gh, gw), idx = self.video_pixels(frames)
    fps = self.video_fps or _DEFAULT_FPS
    if self.family == "qwen2_5_vl":
      sampled_fps = fps * len(idx) / len(frames)
      sec = v.temporal_patch_size / sampled_fps
      # M-RoPE: a group's time position advances tokens_per_second * its seconds.
      video = Video(t, gh // m, gw // m, time_interval=s.tokens_per_second * sec)
      return [s.vision_start,
              PatchVisual(video, pixels, grid_thw=(t, gh, gw), second_per_grid=sec),
              s.vision_end]
    parts: list[MediaPart] = []
    n = gh * gw
    for k, sec in enumerate(frame_timestamps(idx, fps, v.temporal_patch_size)):
      text = f"<{sec:.1f} seconds>{s.vision_start}"
      if parts:
        parts[-1] += text
      else:
        parts.append(text)
      parts += [PatchVisual(Image(gh // m, gw // m), pixels[k * n:(k + 1) * n],
                            grid_thw=(1, gh, gw)), s.vision_end]
    return parts


def qwen_vl_tokenizer(folder, media: Optional[QwenVLMedia] = None):
  """``tokenizers.load_model_tokenizer(folder)``, whose image / video placeholders for a Qwen-VL
  folder are already the whole ``<|vision_start|>...<|vision_end|>`` wrapper that
  ``QwenVLMedia`` replaces; with ``media``, its markers (``image_placeholder`` /
  ``video_placeholder``)."""
  tok = load_model_tokenizer(folder)
  if media is not None:
    tok.template = dataclasses.replace(tok.template, image_token=media.image_placeholder,
                                       video_token=media.video_placeholder)
  return tok

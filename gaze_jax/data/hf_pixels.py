"""Pixel steps that transformers' image and video processors share, for the families' own
processing (``gaze_jax.data.smolvlm``, ``gaze_jax.data.llava_onevision``,
``gaze_jax.data.qwen_vl``):
reading a processor's settings, the RGB conversion, and rescaling and normalisation as the
Pillow backend computes them.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from gaze_jax.paths import read_json


def channels(v: Any, key: str, where: str) -> tuple[float, ...]:
  """A per-channel setting (``image_mean``, ``image_std``): 3 numbers, or one for all three."""
  v = [v] * 3 if isinstance(v, (int, float)) and not isinstance(v, bool) else v
  if not isinstance(v, (list, tuple)) or len(v) != 3:
    raise ValueError(f"{where}: {key}={v!r} must be 3 numbers (one per RGB channel)")
  return tuple(float(x) for x in v)


def processor_fields(path, proc: Mapping[str, Any], key: str, proc_file,
                     kinds: Sequence[str]) -> tuple[Optional[dict], str]:
  """A processor's fields from its own file, else from ``processor_config.json``'s ``key``
  object (transformers 5); ``(None, "")`` when neither has them."""
  if path.is_file():
    cfg, where = read_json(path), str(path)
  elif isinstance(proc.get(key), Mapping):
    cfg, where = dict(proc[key]), f"{proc_file} ({key})"
  else:
    return None, ""
  kind = cfg.get(f"{key}_type")
  if kind is not None and kind not in kinds:
    raise ValueError(f"{where}: {key}_type={kind!r} is not supported (only {', '.join(kinds)})")
  return cfg, where


def resize_filter(c: Mapping[str, Any], where: str, why: str) -> int:
  """The Pillow filter number (0-5) of processor settings ``c`` that resize every image
  (``do_resize``, no centre crop), or a ValueError naming ``where`` and the key; ``why`` says
  why the processing must resize."""
  if not c["do_resize"]:
    raise ValueError(f"{where}: do_resize=false is not supported ({why})")
  if c.get("do_center_crop"):
    raise ValueError(f"{where}: do_center_crop=true is not supported")
  resample = c["resample"]
  if isinstance(resample, bool) or not isinstance(resample, int) or not 0 <= resample <= 5:
    raise ValueError(f"{where}: resample={resample!r} is not supported (one of Pillow's filter "
                     "numbers 0-5)")
  return resample


def check_image(im: np.ndarray) -> np.ndarray:
  """``im`` as an array, or a ValueError unless it is uint8 ``[h, w]``, ``[h, w, 1]``,
  ``[h, w, 3]`` or ``[h, w, 4]``."""
  im = np.asarray(im)
  if im.dtype != np.uint8 or im.ndim not in (2, 3) or (im.ndim == 3 and
                                                       im.shape[-1] not in (1, 3, 4)):
    raise ValueError(f"an image must be uint8 [h, w], [h, w, 1], [h, w, 3] or [h, w, 4], got "
                     f"{im.dtype} {im.shape}")
  return im


def to_rgb(im: np.ndarray) -> np.ndarray:
  """uint8 RGB ``[h, w, 3]``: grey repeated, transparency composited onto white (as
  transformers converts images)."""
  if im.ndim == 2:
    im = im[..., None]
  if im.shape[-1] == 1:
    return np.repeat(im, 3, axis=-1)
  if im.shape[-1] == 4:
    alpha = im[..., 3:4] / 255
    return np.round(alpha * im[..., :3] + (1 - alpha) * 255).astype(np.uint8)
  return im


def rgb_image(image: np.ndarray, convert_rgb: bool, where: str) -> np.ndarray:
  """uint8 ``[h, w, 3]`` of ``image`` (``check_image``): converted (``to_rgb``) when the
  processor's ``do_convert_rgb``, else it must already be RGB (a ValueError naming ``where``)."""
  im = check_image(image)
  if convert_rgb:
    return to_rgb(im)
  if im.ndim != 3 or im.shape[-1] != 3:
    raise ValueError(f"{where}: do_convert_rgb=false needs RGB images, got shape {im.shape}")
  return im


def rescale_normalize(x: np.ndarray, rescale_factor: Optional[float],
                      mean: Optional[Sequence[float]], std: Optional[Sequence[float]]
                      ) -> np.ndarray:
  """float32 ``x * rescale_factor`` (in float64 first), then ``(x - mean) / std`` in float32, as
  transformers' Pillow backend rescales and normalises (None skips a step)."""
  x = x.astype(np.float64) * rescale_factor if rescale_factor is not None else x
  x = x.astype(np.float32)
  if mean is not None:
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return x

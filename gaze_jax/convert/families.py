"""The Hugging Face model families we convert, by ``config.json``'s ``model_type``.

Each family gives a *plan* function ``plan(model_dir, gaze, *, dtype, param_dtype) ->
hf.LoadPlan``: our model config and the declarative weight map, read from the folder's
``config.json`` and safetensors headers (no weight is read). Everything that starts a model
from a folder goes through ``plan_hf``: the eager loaders, ``model.init=hf:<folder>`` in
training (weights placed straight into sharded parameters) and the export back to the folder
layout (the same map, inverted).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from gaze_jax.convert import hf, qwen_vl, smolvlm
from gaze_jax.convert.export import GAZE_PREFIX
from gaze_jax.convert.hf_io import PathLike, read_hf_config
from gaze_jax.convert.mapping import Rule
from gaze_jax.data.llava_onevision import LlavaOnevisionMedia
from gaze_jax.data.qwen_vl import QwenVLMedia, QwenVLSettings
from gaze_jax.data.smolvlm import SmolVLMMedia
from gaze_jax.model.config import GazeConfig

Plan = Callable[..., "hf.LoadPlan"]

# model_type -> plan function. A new family adds its entry here.
PLANS: dict[str, Plan] = {
    "llama": hf.plan_causal_lm,
    "qwen2": hf.plan_causal_lm,
    "qwen3": hf.plan_causal_lm,
    "llava_onevision": hf.plan_llava_onevision,
    "smolvlm": smolvlm.plan_smolvlm,
    "idefics3": smolvlm.plan_smolvlm,
    "qwen2_5_vl": qwen_vl.plan_qwen_vl,
    "qwen3_vl": qwen_vl.plan_qwen_vl,
}


def _smolvlm_media(folder: PathLike, grid: tuple[int, int], **_):
  return SmolVLMMedia.from_folder(folder, grid)


def _llava_onevision_media(folder: PathLike, grid: tuple[int, int], **_):
  return LlavaOnevisionMedia.from_folder(folder, grid)


def _qwen_vl_media(folder: PathLike, grid: tuple[int, int], buckets=(), video_fps=None):
  settings = QwenVLSettings.from_folder(folder)
  factor = settings.image.factor
  if tuple(grid) != (0, 0):
    raise ValueError(f"{folder}/config.json: model_type={settings.family!r} does not tile "
                     f"images, but config.data.image_grid={tuple(grid)}: leave it (0, 0) and "
                     "give config.data.buckets")
  if not buckets:
    raise ValueError(f"{folder}/config.json: model_type={settings.family!r} resizes every image "
                     "and video to one of a few static sizes, and config.data.buckets gives none: "
                     "set config.data.buckets to (height, width) pairs in pixels, each side a "
                     f"multiple of {factor} (patch_size * merge_size), e.g. (({factor * 12}, "
                     f"{factor * 16}), ({factor * 16}, {factor * 12}), ({factor * 14}, "
                     f"{factor * 14}))")
  try:
    return QwenVLMedia(settings, buckets, video_fps or None)
  except ValueError as e:
    raise ValueError(f"config.data.buckets={buckets!r} / config.data.video_fps={video_fps!r}: "
                     f"{e}") from None


# model_type -> the family's image / video processing, a ``gaze_jax.data.features.
# MediaProcessor`` made from the folder's processor files: ``make(folder, grid, buckets=,
# video_fps=)`` at a fixed tile grid (rows, cols; families that tile) or static ``buckets``
# ((height, width) pixel sizes; Qwen-VL), each taking what applies to it.
MEDIA: dict[str, Callable] = {
    "smolvlm": _smolvlm_media,
    "idefics3": _smolvlm_media,
    "llava_onevision": _llava_onevision_media,
    "qwen2_5_vl": _qwen_vl_media,
    "qwen3_vl": _qwen_vl_media,
}
# The families whose MEDIA entry takes ``buckets`` (and ``video_fps``).
BUCKETED = ("qwen2_5_vl", "qwen3_vl")


def media_processor(model_dir: PathLike, grid: tuple[int, int] = (0, 0), *, buckets=(),
                    video_fps=None):
  """The image / video processing of a model folder at the tile ``grid`` (``data.image_grid``)
  or, for Qwen2.5-VL / Qwen3-VL, at the static ``buckets`` (``data.buckets``: (height, width)
  pairs in pixels) with ``video_fps`` (``data.video_fps``: the frame rate of the videos' frames;
  None or 0: transformers' 24), or None for a family without one (a text-only LM: the default
  square resize applies).

  Raises the family's errors naming the processor file and key (a grid it cannot give), and a
  ValueError naming ``config.data.buckets`` for a Qwen-VL folder without buckets, or buckets
  given for another family."""
  mt = read_hf_config(model_dir).get("model_type")
  make = MEDIA.get(mt)
  buckets = tuple(tuple(b) if isinstance(b, (list, tuple)) else b for b in (buckets or ()))
  if buckets and mt not in BUCKETED:
    raise ValueError(f"config.data.buckets={buckets!r} is for Qwen-VL folders "
                     f"({', '.join(BUCKETED)}); {model_dir}/config.json has "
                     f"model_type={mt!r}: leave it empty")
  if make is None:
    return None
  grid = tuple(int(n) for n in grid)
  if mt in BUCKETED:
    return make(model_dir, grid, buckets=buckets, video_fps=video_fps)
  return make(model_dir, grid)


def plan_hf(model_dir: PathLike, gaze: GazeConfig = hf.DENSE_TEXT, *, dtype: str = "float32",
            param_dtype: str = "float32") -> "hf.LoadPlan":
  """The ``LoadPlan`` of a ``save_pretrained`` folder, by its ``model_type``.

  Raises ValueError naming ``config.json`` and the key for an unknown ``model_type``, and the
  family's own errors (a missing file, an unsupported field) before any weight is read.
  """
  cfg = read_hf_config(model_dir)
  mt = cfg.get("model_type")
  if mt not in PLANS:
    raise ValueError(f"{model_dir}/config.json: model_type={mt!r} is not a family we convert "
                     f"(supported: {', '.join(sorted(PLANS))})")
  return with_gaze_parts(PLANS[mt](model_dir, gaze, dtype=dtype, param_dtype=param_dtype))


def with_gaze_parts(plan: "hf.LoadPlan") -> "hf.LoadPlan":
  """A folder that we exported holds our fresh parameters under ``gaze.`` (``export.
  GAZE_PREFIX``): they are read from it instead of starting fresh, so that the exported model
  comes back exactly. Gaze tensors the model does not use (a dense model, no context tokens)
  are left unused and reported."""
  w = plan.weights
  kept = tuple(n for n in w.fresh if GAZE_PREFIX + n not in plan.tensors)
  rules = tuple(Rule(n, GAZE_PREFIX + n) for n in w.fresh if n not in kept)
  weights = dataclasses.replace(w, rules=w.rules + rules, fresh=kept,
                                allow_unused=w.allow_unused + (GAZE_PREFIX,))
  return dataclasses.replace(plan, weights=weights)

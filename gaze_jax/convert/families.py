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

from gaze_jax.convert import hf, smolvlm
from gaze_jax.convert.hf_io import PathLike, read_hf_config
from gaze_jax.convert.mapping import Rule
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
}


def _smolvlm_media(folder: PathLike, grid: tuple[int, int]):
  from gaze_jax.data.smolvlm import SmolVLMMedia
  return SmolVLMMedia.from_folder(folder, grid)


def _llava_onevision_media(folder: PathLike, grid: tuple[int, int]):
  from gaze_jax.data.llava_onevision import LlavaOnevisionMedia
  return LlavaOnevisionMedia.from_folder(folder, grid)


# model_type -> the family's image / video processing at a fixed tile grid (rows, cols), a
# ``gaze_jax.data.features.MediaProcessor`` made from the folder's processor files.
MEDIA: dict[str, Callable] = {
    "smolvlm": _smolvlm_media,
    "idefics3": _smolvlm_media,
    "llava_onevision": _llava_onevision_media,
}


def media_processor(model_dir: PathLike, grid: tuple[int, int] = (0, 0)):
  """The image / video processing of a model folder at the tile ``grid`` (``data.image_grid``),
  or None for a family without one (a text-only LM: the default square resize applies).

  Raises the family's errors naming the processor file and key (a grid it cannot give)."""
  mt = read_hf_config(model_dir).get("model_type")
  make = MEDIA.get(mt)
  return None if make is None else make(model_dir, tuple(int(n) for n in grid))


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
  from gaze_jax.convert.export import GAZE_PREFIX

  w = plan.weights
  kept = tuple(n for n in w.fresh if GAZE_PREFIX + n not in plan.tensors)
  rules = tuple(Rule(n, GAZE_PREFIX + n) for n in w.fresh if n not in kept)
  weights = dataclasses.replace(w, rules=w.rules + rules, fresh=kept,
                                allow_unused=w.allow_unused + (GAZE_PREFIX,))
  return dataclasses.replace(plan, weights=weights)

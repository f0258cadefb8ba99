"""Starting a run from a pretrained Hugging Face MLLM: ``config.model.init = "hf:<folder>"``.

The folder (a ``save_pretrained`` folder, local or ``gs://``) fixes the model's shape: its
``config.json`` gives the decoder, vision tower and connector (``gaze_jax.convert.families``);
the run's config gives only what is ours: the gaze settings (K, region shape, context tokens,
which start fresh), the dtypes, and how the decoder runs (``remat``, ``scan_layers``). A shape
field that the run's config also sets must agree with the folder, or the run stops before it
writes anything, naming the field. The weights are read straight into the sharded parameters
(``gaze_jax.convert.sharded``), and the tokenizer, chat template and image processing come from
the same folder (``data.tokenizer = "model"``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Mapping, Optional

from gaze_jax.convert.families import plan_hf
from gaze_jax.convert.sharded import check_plan, flat_paths, load_sharded
from gaze_jax.model.config import GazeConfig, MLLMConfig

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"
# Fields that say how the model runs, not what it holds: the run's config sets them.
RUNTIME_FIELDS = {"decoder": ("remat", "scan_layers"), "vision": (),
                  "model": ("init", "gaze", "decoder", "vision", "dtype", "param_dtype")}


def hf_folder(init: Optional[str]) -> Optional[str]:
  """The folder of ``"hf:<folder>"``, or None for another ``model.init``.

  Raises ValueError for ``"hf:"`` without a folder."""
  if not init or not str(init).startswith(HF_PREFIX):
    return None
  folder = str(init)[len(HF_PREFIX):]
  if not folder:
    raise ValueError("config.model.init='hf:' names no folder: use hf:<folder> (a local "
                     "save_pretrained folder or a gs:// prefix)")
  return folder


@functools.lru_cache(maxsize=8)
def _folder_model(folder: str, gaze: GazeConfig, dtype: str, param_dtype: str) -> MLLMConfig:
  return plan_hf(folder, gaze, dtype=dtype, param_dtype=param_dtype).model


def _agree(section: str, ours: Optional[Mapping[str, Any]], folder_cfg, folder: str) -> dict:
  """The runtime fields of ``config.model.<section>``; any other field it sets must equal the
  folder's (a ValueError naming the field otherwise)."""
  if not ours or folder_cfg is None:
    return {}
  have = dataclasses.asdict(folder_cfg)
  out = {}
  for key, value in ours.items():
    if key in RUNTIME_FIELDS[section]:
      out[key] = value
      continue
    if value is None:                     # left for the folder to give (common.hf_base_config)
      continue
    name = f"config.model.{key}" if section == "model" else f"config.model.{section}.{key}"
    if key not in have:
      raise ValueError(f"{name} is not a field of {type(folder_cfg).__name__}")
    want = have[key]
    if isinstance(want, tuple) and isinstance(value, list):
      value = tuple(value)
    if value != want:
      raise ValueError(f"{name}={value!r}, but {folder}/config.json gives {want!r}: with "
                       "model.init=hf: the model's shape comes from the folder (drop the field "
                       "from the config)")
  return out


def hf_model_config(folder: str, model: Mapping[str, Any], gaze: GazeConfig) -> MLLMConfig:
  """The ``MLLMConfig`` of a run started from ``folder``: the folder's model with the run's
  ``gaze``, dtypes and decoder runtime fields (``model`` is ``config.model`` as a dict).

  Raises ValueError / FileNotFoundError naming the folder's file and key (an unknown
  ``model_type``, a missing file) or the config field that disagrees with the folder.
  """
  dtype = str(model.get("dtype", "float32"))
  param_dtype = str(model.get("param_dtype", "float32"))
  base = _folder_model(folder, gaze, dtype, param_dtype)
  _agree("model", model, base, folder)
  decoder = dataclasses.replace(base.decoder, **_agree("decoder", model.get("decoder"),
                                                       base.decoder, folder))
  vision = base.vision
  if vision is not None:
    vision = dataclasses.replace(vision, **_agree("vision", model.get("vision"), vision, folder))
  return dataclasses.replace(base, decoder=decoder, vision=vision, gaze=gaze)


def _plan(folder: str, model_cfg: MLLMConfig):
  """A fresh plan of ``folder`` for ``model_cfg`` (not the cached config's: a plan's checkpoint
  is read while loading)."""
  plan = plan_hf(folder, model_cfg.gaze, dtype=model_cfg.dtype,
                 param_dtype=model_cfg.param_dtype)
  return dataclasses.replace(plan, model=model_cfg)


def check_folder(folder: str, model_cfg: MLLMConfig, abstract_params: Any) -> None:
  """Checks from the safetensors headers alone that ``folder`` holds every weight of
  ``model_cfg`` with its shape (``convert.sharded.check_plan``): the run stops before it
  writes anything, naming the file and the tensor."""
  check_plan(_plan(folder, model_cfg), flat_paths(abstract_params)[0])


def init_params(folder: str, model_cfg: MLLMConfig, abstract_params: Any, *, seed: int,
                allow_nonfinite: bool = False) -> Any:
  """The parameters of ``model_cfg`` read from ``folder`` straight into the shardings of
  ``abstract_params`` (pure-dict tree of ``ShapeDtypeStruct``); the context tokens start from
  their initialiser (``seed``)."""
  plan = _plan(folder, model_cfg)
  log.info("initialising the model from %s (%s)", folder, type(plan.model).__name__)
  return load_sharded(plan, abstract_params, seed=seed, allow_nonfinite=allow_nonfinite)

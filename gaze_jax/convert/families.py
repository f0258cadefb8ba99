"""The Hugging Face model families we convert, by ``config.json``'s ``model_type``.

Each family gives a *plan* function ``plan(model_dir, gaze, *, dtype, param_dtype) ->
hf.LoadPlan``: our model config and the declarative weight map, read from the folder's
``config.json`` and safetensors headers (no weight is read). Everything that starts a model
from a folder goes through ``plan_hf``: the eager loaders, ``model.init=hf:<folder>`` in
training (weights placed straight into sharded parameters) and the export back to the folder
layout (the same map, inverted).
"""

from __future__ import annotations

from typing import Callable

from gaze_jax.convert import hf
from gaze_jax.convert.hf_io import PathLike, read_hf_config
from gaze_jax.model.config import GazeConfig

Plan = Callable[..., "hf.LoadPlan"]

# model_type -> plan function. A new family adds its entry here.
PLANS: dict[str, Plan] = {
    "llama": hf.plan_causal_lm,
    "qwen2": hf.plan_causal_lm,
    "qwen3": hf.plan_causal_lm,
    "llava_onevision": hf.plan_llava_onevision,
}


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
  return PLANS[mt](model_dir, gaze, dtype=dtype, param_dtype=param_dtype)

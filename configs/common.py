"""Fields shared by every recipe: ``base_config(preset)`` returns a complete ConfigDict that the
recipes then adjust. Every field a recipe may override from the command line exists here
(``lock_config=True`` rejects unknown fields): the model's from the preset's dataclasses, the
other sections' from ``gaze_jax.train.sections``, which define each field, its default and its
check. ``gaze_jax.train.config.run_config`` turns the result into typed sections once, naming
any field a hand-built config lacks.
"""

import dataclasses
import typing

import ml_collections
from ml_collections import config_dict

from gaze_jax.model.config import MLLMConfig
from gaze_jax.model.presets import get_preset
from gaze_jax.train.config import model_fields
from gaze_jax.train.sections import SECTIONS
from gaze_jax.train.sharding import DEFAULT_RULES
from pallas_kernels.config import KernelConfig


def count_or_ratio(value):
  """A ConfigDict field that takes an int count or a float ratio, from a config file or the
  command line (``--config.model.gaze.top_k=0.25``): an object-typed ``FieldReference``. A plain
  field keeps the type of its first value: an int one refuses 0.25, a float one would turn the
  count 3 into the ratio 3.0."""
  return config_dict.FieldReference(value, field_type=object)


def config_fields(section) -> ml_collections.ConfigDict:
  """The fields of a config dataclass instance (a section of ``gaze_jax.train.sections``, a
  ``KernelConfig``) as config entries, those that are None as typed placeholders, so that
  ``--config.<section>.<field>=...`` can set every one of them (ml_collections cannot override
  a plain None field)."""
  hints = typing.get_type_hints(type(section))
  out = {}
  for f in dataclasses.fields(section):
    value = getattr(section, f.name)
    if value is None:
      args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
      # Optional[int] -> int; ``interpret`` (Any) is a bool from a config.
      out[f.name] = config_dict.placeholder(args[0] if args else bool)
    else:
      out[f.name] = value
  return ml_collections.ConfigDict(out)


def base_config(preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Model: the fields of gaze_jax.model.config dataclasses (decoder, vision, gaze, dtypes).
  preset_cfg = get_preset(preset)
  fields = model_fields(preset_cfg)
  # top_k is a count (int) or a ratio (float), from a config file or the command line
  # (--config.model.gaze.top_k=0.25). Recipes assign to it (c.model.gaze.top_k = 3), which
  # keeps the reference; rebuilding model.gaze from a dict would lose it.
  fields["gaze"]["top_k"] = count_or_ratio(preset_cfg.gaze.top_k)
  c.model = ml_collections.ConfigDict(fields)
  c.model.gaze.kernel = config_fields(preset_cfg.gaze.kernel or KernelConfig())
  # "" (random), "gguf:smollm2" or a .gguf file (decoder weights), or "hf:<folder>" (the whole
  # MLLM from a Hugging Face folder, local or gs://; its config.json fixes the model's shape).
  c.model.init = ""
  c.init_from_checkpoint = ""             # another run's workdir: start from its parameters
  # data, topk_schedule, optim, mesh, train, checkpoint, distributed: each field, its default
  # and what it means are those of gaze_jax.train.sections.
  for name, section in SECTIONS.items():
    c[name] = config_fields(section())
  c.logical_axis_rules = DEFAULT_RULES
  return c


def hf_base_config(folder: str) -> ml_collections.ConfigDict:
  """``base_config`` for a run that starts from a Hugging Face MLLM folder (local or gs://):
  ``model.init = "hf:<folder>"``, whose ``config.json`` gives the model's shape, so the shape
  fields are left empty (a field set anyway must agree with the folder); the decoder keeps its
  runtime fields (``remat``, ``scan_layers``); the tokenizer, chat template and image
  processing are the folder's (``data.tokenizer = "model"``); the training settings are a
  fine-tuning run's."""
  c = base_config("tiny")
  c.model.init = "hf:" + folder
  c.model.decoder = ml_collections.ConfigDict(dict(remat=False, scan_layers=False))
  c.model.vision = ml_collections.ConfigDict({})
  for f in dataclasses.fields(MLLMConfig):
    if f.name not in ("decoder", "vision", "gaze", "dtype", "param_dtype"):
      value = c.model[f.name]
      c.model[f.name] = config_dict.placeholder(type(value) if value is not None else object)
  c.data.tokenizer = "model"
  # Fine-tuning a pretrained model: bf16 compute, a short warm-up, no weight decay, parameters
  # and optimizer state sharded over all devices.
  c.model.dtype = "bfloat16"
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.0
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.train.num_steps = 3000
  c.train.log_every = 20
  c.train.eval_every = 500
  c.checkpoint.save_every = 500
  return c


def llava_json_data(c, json_files: dict, image_dir: str):
  """``c.data`` reads your LLaVA-format conversations (``gaze_jax.data.llava``): ``json_files``
  maps a split (``train``, ``validation``) to a JSON file, image paths are relative to
  ``image_dir``."""
  c.data.name = "llava_json"
  c.data.builder_config = "tiny"          # llava_json has no presets
  c.data.builder_overrides = ml_collections.ConfigDict(dict(
      json_files=ml_collections.ConfigDict(dict(json_files)), image_dir=image_dir,
      skip_bad=False))
  return c


def dense_first_stage(c, num_steps: int):
  """``c`` turned into its dense first stage: the same model and data with dense attention,
  trained from scratch for ``num_steps`` at a constant learning rate (the second stages that
  start from it warm up and decay on their own)."""
  c.model.gaze.attention = "dense"
  c.init_from_checkpoint = ""
  c.optim.end_lr_ratio = 1.0
  c.train.num_steps = num_steps
  return c

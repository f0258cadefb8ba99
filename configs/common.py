"""Fields shared by every recipe: ``base_config(preset)`` returns a complete ConfigDict that the
recipes then adjust. Every field a recipe may override from the command line exists here
(``lock_config=True`` rejects unknown fields), with its default: ``gaze_jax.train`` reads the
fields by attribute and has no defaults of its own, so this is their one definition.
``check_config`` names the fields a hand-built config lacks.
"""

import dataclasses
import typing

import ml_collections
from ml_collections import config_dict

from gaze_jax.model.config import MLLMConfig
from gaze_jax.model.presets import get_preset
from gaze_jax.train.config import count_or_ratio, model_fields, to_dict
from gaze_jax.train.sharding import DEFAULT_RULES
from pallas_kernels.config import KernelConfig


def kernel_fields(kernel=None) -> ml_collections.ConfigDict:
  """The fields of a ``KernelConfig`` (default: the defaults) as config entries, those that
  default to None as typed placeholders, so that ``--config.model.gaze.kernel.<field>=...``
  can set every one of them (ml_collections cannot override a plain None field)."""
  kernel = kernel or KernelConfig()
  hints = typing.get_type_hints(KernelConfig)
  out = {}
  for f in dataclasses.fields(KernelConfig):
    value = getattr(kernel, f.name)
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
  c.model.gaze.kernel = kernel_fields(preset_cfg.gaze.kernel)
  # "" (random), "gguf:smollm2" or a .gguf file (decoder weights), or "hf:<folder>" (the whole
  # MLLM from a Hugging Face folder, local or gs://; its config.json fixes the model's shape).
  c.model.init = ""
  c.init_from_checkpoint = ""             # another run's workdir: start from its parameters

  c.data = ml_collections.ConfigDict(dict(
      name="gaze_shapes", builder_config="64px",
      builder_overrides=ml_collections.ConfigDict(dict(num_train=20_000, num_validation=1_000,
                                                       num_test=1_000)),
      data_dir="",                        # default <workdir>/tfds
      tokenizer="byte", image_grid=(0, 0), seq_len=160, max_regions=16, max_images=1, max_nonvisual=None,
      batch_size=32, seed=0, num_threads=2, skip_too_long=False, train_split="train",
      eval_split="validation",
      # Qwen2.5-VL / Qwen3-VL folders (model.init=hf:): the static (height, width) pixel sizes
      # that every image and video is resized to (each side a multiple of 28 / 32); empty: not
      # a Qwen-VL run (such a folder is refused without them). video_fps: the frame rate of
      # the videos' frames (0: transformers' 24). max_patches: patch rows per example
      # (0: max_images frames at the largest bucket).
      buckets=(), video_fps=0.0, max_patches=0))

  # Progressive top-K (docs/method.md step 10): start (<= 0: all regions) -> model.gaze.top_k.
  c.topk_schedule = ml_collections.ConfigDict(dict(
      enabled=True, shape="linear", warmup_fraction=0.3, warmup_steps=-1, start=0))

  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=100, end_lr_ratio=0.1, weight_decay=0.05, b1=0.9,
      b2=0.95, eps=1e-8, clip_norm=1.0, decay_all=False,
      # (regex, lr multiplier[, start_step]) on paths like "decoder/layers/0/mlp/up_proj/kernel";
      # multiplier 0 freezes. First match wins; unmatched parameters use multiplier 1.
      param_groups=()))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.logical_axis_rules = DEFAULT_RULES

  c.train = ml_collections.ConfigDict(dict(
      num_steps=1000, seed=0, log_every=50, eval_every=0, eval_batches=8,
      log_fingerprints=False, peak_flops_per_device=0.0,
      # A step whose loss or gradient is not finite: "stop" the run (nothing past the last
      # finite step is saved) or "skip" its update (the step still counts); a run that skips
      # more than max_skipped steps in a row stops.
      on_nonfinite="stop", max_skipped=10,
      # Refuse a run whose train step needs well over a device's memory by
      # gaze_jax.model.memory's estimate (gaze_jax.train.preflight.check_memory).
      check_memory=True))
  c.checkpoint = ml_collections.ConfigDict(dict(
      save_every=500, keep=3, async_save=True, fallback=True,
      # Resuming with a config that differs from the checkpoint's in a field that changes the
      # training (model, data, optimizer, schedule) is refused unless this is True.
      allow_config_changes=False))
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=0, process_id=-1, auto=False,
      cpu_collectives="gloo"))
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


# Subtrees not compared by ``missing_fields``: the model dataclasses' fields (absent ones take
# the dataclass defaults, unknown ones raise; vision may be None) and the builder's keywords.
FREE_FORM = ("model.decoder", "model.vision", "model.gaze", "data.builder_overrides")


def missing_fields(config) -> list[str]:
  """The dotted names (``"checkpoint.fallback"``) of the fields of ``base_config`` that
  ``config`` (a ConfigDict, or nested mappings / namespaces) lacks."""
  out = []

  def walk(have, want, path):
    for key, value in want.items():
      name = f"{path}{key}"
      if name in FREE_FORM:
        continue
      if not isinstance(have, dict) or key not in have:
        out.append(name)
      elif isinstance(value, dict):
        walk(have[key], value, name + ".")
  walk(to_dict(config), base_config("tiny").to_dict(), "")
  return out


def check_config(config, where: str = "config") -> None:
  """Raises ValueError naming every field of ``base_config`` that ``config`` lacks."""
  missing = missing_fields(config)
  if missing:
    raise ValueError(f"{where} lacks the fields {', '.join(missing)}: build it from "
                     "configs/common.py base_config, which defines every field and its default")


def dense_first_stage(c, num_steps: int):
  """``c`` turned into its dense first stage: the same model and data with dense attention,
  trained from scratch for ``num_steps`` at a constant learning rate (the second stages that
  start from it warm up and decay on their own)."""
  c.model.gaze.attention = "dense"
  c.init_from_checkpoint = ""
  c.optim.end_lr_ratio = 1.0
  c.train.num_steps = num_steps
  return c

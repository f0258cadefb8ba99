"""Training configs -> model dataclasses, and the derived static shapes of a run.

The configs in ``configs/`` are ml_collections ``ConfigDict`` trees built from
``configs/common.py: base_config``, which defines every field and its default (the one
definition: this package reads fields by plain attribute access and has no defaults of its
own). Anything with the same attributes works (a ConfigDict, nested namespaces), and
``gaze_jax.model`` never imports ml_collections.

Config layout (see ``configs/demo.py`` for a complete example)::

  model.decoder.*, model.vision.* (or None), model.gaze.*   fields of the model dataclasses
  model.projector, model.dtype (compute), model.param_dtype (master weights)
  model.init          "" (random), "gguf:smollm2" or a .gguf path (decoder weights), or
                      "hf:<folder>" (the whole MLLM from a Hugging Face folder, local or gs://:
                      its config.json fixes the shape, see gaze_jax.train.model_init)
  data.*              dataset, tokenizer, static shapes (seq_len, max_regions, ...), batch size
  topk_schedule.*     progressive top-K: shape, warmup_fraction / warmup_steps, start
  optim.*             AdamW, warmup + cosine, clipping, param_groups (regex, lr multiplier)
  mesh.*, logical_axis_rules, train.*, checkpoint.*, distributed.*
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Mapping, Optional

from gaze_jax.gaze.layout import LayoutSpec
from gaze_jax.gaze.schedules import SHAPES
from gaze_jax.model.config import (DecoderConfig, FieldError, GazeConfig, MLLMConfig,
                                   VisionConfig)
from gaze_jax.train.dicts import to_dict
from gaze_jax.train.model_init import hf_folder, hf_model_config
from gaze_jax.train.optim import check_optim
from gaze_jax.train.preflight import check_example_fits


# The fields that hold an int count or a float ratio (the routing's K).
COUNT_OR_RATIO = ("model.gaze.top_k",)


def count_or_ratio(value):
  """A ConfigDict field that takes an int count or a float ratio, from a config file or the
  command line (``--config.model.gaze.top_k=0.25``): an object-typed ml_collections
  ``FieldReference``. A plain field keeps the type of its first value: an int one refuses 0.25,
  a float one would turn the count 3 into the ratio 3.0."""
  # Not at the top: this module imports without ml_collections (tests/train/test_units.py).
  from ml_collections import config_dict
  return config_dict.FieldReference(value, field_type=object)


def config_from_dict(d: Mapping[str, Any]):
  """A ConfigDict of the nested dict ``d`` (a run's ``config.json``) whose ``COUNT_OR_RATIO``
  fields take either type, as those of ``configs/common.py: base_config`` do."""
  # Not at the top: this module imports without ml_collections (tests/train/test_units.py).
  import ml_collections

  d = copy.deepcopy(dict(d))
  for name in COUNT_OR_RATIO:
    *path, leaf = name.split(".")
    node = d
    for key in path:
      node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict) and leaf in node:
      node[leaf] = count_or_ratio(node[leaf])
  return ml_collections.ConfigDict(d)


def _dataclass_from(cls, fields: Optional[Mapping[str, Any]], where: str):
  names = {f.name for f in dataclasses.fields(cls)}
  fields = dict(fields or {})
  unknown = sorted(set(fields) - names)
  if unknown:
    raise ValueError(f"{where}: unknown fields {unknown}; {cls.__name__} has {sorted(names)}")
  for k, v in list(fields.items()):
    if isinstance(v, list):          # ConfigDict stores tuples as given; JSON gives lists
      fields[k] = tuple(v)
  return _named(where, cls, **fields)


def _named(where: str, cls, **fields):
  """``cls(**fields)``; a bad field's error names it as the config tree does
  (``config.model.vision.patch_size=0 must be ...``, not ``VisionConfig.patch_size``)."""
  try:
    return cls(**fields)
  except FieldError as e:
    raise e.at(where) from None


def model_fields(cfg: MLLMConfig) -> dict:
  """The nested-dict form of an ``MLLMConfig`` (what ``configs/*.py`` put under ``model``)."""
  return dataclasses.asdict(cfg)


def mllm_config(model_cfg: Any, *, top_k=None) -> MLLMConfig:
  """``config.model`` -> ``MLLMConfig``; ``top_k`` replaces ``model.gaze.top_k`` (the trainer
  builds its model with the schedule's starting K as the static K_max)."""
  d = to_dict(model_cfg)
  gaze = dict(d.get("gaze") or {})
  if top_k is not None:
    gaze["top_k"] = top_k
  gz = _dataclass_from(GazeConfig, gaze, "config.model.gaze")
  folder = hf_folder(d.get("init"))
  if folder is not None:                   # the shape comes from the folder's config.json
    return hf_model_config(folder, d, gz)
  dec = _dataclass_from(DecoderConfig, d.get("decoder"), "config.model.decoder")
  vis = d.get("vision")
  vis = None if vis is None else _dataclass_from(VisionConfig, vis, "config.model.vision")
  # Absent top-level fields keep MLLMConfig's defaults (``init`` is the trainer's, not a field).
  top = {f.name: d[f.name] for f in dataclasses.fields(MLLMConfig)
         if f.name not in ("decoder", "vision", "gaze") and d.get(f.name) is not None}
  top = {k: tuple(v) if isinstance(v, list) else v for k, v in top.items()}
  return _named("config.model", MLLMConfig, decoder=dec, vision=vis, gaze=gz, **top)


def model_config_from_dict(d: Mapping[str, Any], where: str = "model") -> MLLMConfig:
  """An ``MLLMConfig`` from its ``dataclasses.asdict`` form (a checkpoint's ``meta``, JSON:
  lists for tuples). Raises ValueError naming ``where`` and the field for an unknown one."""
  d = dict(d)
  dec = _dataclass_from(DecoderConfig, d.pop("decoder", None), f"{where}.decoder")
  vis = d.pop("vision", None)
  vis = None if vis is None else _dataclass_from(VisionConfig, vis, f"{where}.vision")
  gz = _dataclass_from(GazeConfig, d.pop("gaze", None), f"{where}.gaze")
  top = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
  try:
    return _named(where, MLLMConfig, decoder=dec, vision=vis, gaze=gz, **top)
  except TypeError as e:
    raise ValueError(f"{where}: {e}") from None


def layout_spec(config: Any, model: MLLMConfig) -> LayoutSpec:
  """The static LayoutSpec of the batches (``config.data`` shapes + the model's gaze
  settings; the M-RoPE position triples when the decoder uses M-RoPE)."""
  data = config.data
  return LayoutSpec(seq_len=int(data.seq_len), max_regions=int(data.max_regions),
                    max_images=int(data.max_images),
                    region_shape=tuple(model.gaze.region_shape), num_ctx=model.gaze.num_ctx,
                    max_nonvisual=data.max_nonvisual,
                    mrope=model.decoder.mrope_section is not None)


@dataclasses.dataclass(frozen=True)
class TopKPlan:
  """Progressive top-K of a run (docs/method.md step 10): K goes from ``start`` to ``target`` over
  ``warmup_steps``; the model is compiled once with the static ``start`` as K_max.
  ``gaze`` is False for dense attention (no schedule)."""
  gaze: bool
  start: int
  target: int
  warmup_steps: int
  shape: str

  def __post_init__(self):
    if self.shape not in SHAPES:
      raise ValueError(f"config.topk_schedule.shape={self.shape!r} must be one of {SHAPES}")


def topk_plan(config: Any, model: MLLMConfig, spec: LayoutSpec) -> TopKPlan:
  """Resolves ``config.topk_schedule`` against the model's target K and the layout's regions.

  ``topk_schedule.start`` <= 0 means all regions (``spec.max_regions``, i.e. dense routing);
  ``warmup_steps`` < 0 means ``warmup_fraction * train.num_steps``; ``enabled=False`` trains
  at the target K from step 0.
  """
  if model.gaze.attention != "gaze":
    return TopKPlan(False, 0, 0, 0, "linear")
  target = model.gaze.resolve_k(spec.max_regions).schedule_target
  sched = config.topk_schedule
  if not sched.enabled:
    return TopKPlan(True, target, target, 0, "linear")
  start = int(sched.start)
  start = spec.max_regions if start <= 0 else start
  if not target <= start <= spec.max_regions:
    raise ValueError(f"config.topk_schedule.start={start} must be in [target K={target}, "
                     f"max_regions={spec.max_regions}]")
  warm = int(sched.warmup_steps)
  if warm < 0:
    frac = float(sched.warmup_fraction)
    if not 0.0 <= frac <= 1.0:
      raise ValueError(f"config.topk_schedule.warmup_fraction must be in [0, 1], got {frac}")
    warm = int(math.ceil(frac * int(config.train.num_steps)))
  return TopKPlan(True, start, target, warm, str(sched.shape))


def qwen_static_grids(config: Any, model: MLLMConfig) -> tuple[tuple[int, int, int], ...]:
  """A Qwen-VL model's fixed tower grids (``MLLMConfig.qwen_grids``) for a run whose images and
  videos all go to one bucket (``config.data.buckets``): every frame slot the patches can hold
  (``data.max_images``, fewer when ``data.max_patches`` is smaller) is one temporal group of
  ``(1, H / patch, W / patch)``. A video of ``t`` groups at that bucket is the same rows and
  the same tower output as ``t`` such slots (the towers attend within a temporal group), so
  the static grids fit every example; an example with fewer frames has zero rows there, which
  no slot reads. Several buckets: ``()`` (the trainer passes each batch's grids, one compile per
  distinct set). Other models: ``()``."""
  qv = model.qwen_vision
  buckets = tuple(getattr(config.data, "buckets", ()) or ())
  if qv is None or model.qwen_grids:
    return model.qwen_grids
  if len(buckets) == 2 and all(isinstance(n, int) for n in buckets):
    buckets = (buckets,)                                    # one (height, width)
  if len(buckets) != 1:
    return ()
  H, W = (int(n) for n in buckets[0])
  p = qv.patch_size
  h, w = H // p, W // p
  frames = int(config.data.max_images)
  max_patches = int(getattr(config.data, "max_patches", 0) or 0)
  if max_patches:
    frames = min(frames, max_patches // (h * w))
  return ((1, h, w),) * frames


def run_model_config(config: Any, *, top_k=None) -> MLLMConfig:
  """``mllm_config(config.model)`` with what the run's data fixes: a Qwen-VL model's static
  tower grids (``qwen_static_grids``)."""
  cfg = mllm_config(config.model, top_k=top_k)
  grids = qwen_static_grids(config, cfg)
  return dataclasses.replace(cfg, qwen_grids=grids) if grids != cfg.qwen_grids else cfg


def train_model_config(config: Any) -> tuple[MLLMConfig, LayoutSpec, TopKPlan]:
  """The model config the trainer compiles (static ``top_k`` = the schedule's start), the
  layout spec and the top-K plan."""
  target_cfg = run_model_config(config)
  spec = layout_spec(config, target_cfg)
  plan = topk_plan(config, target_cfg, spec)
  if plan.gaze and not target_cfg.gaze.top_k_per_example:
    # The static K_max of the one compiled program (per example: all regions already).
    return run_model_config(config, top_k=plan.start), spec, plan
  return target_cfg, spec, plan


def eval_model_config(config: Any) -> MLLMConfig:
  """The model config for evaluation: the target K of ``config.model.gaze.top_k``."""
  return run_model_config(config)


# (field, lowest value) of the counts a training run reads.
_COUNTS = (("train.num_steps", 1), ("train.log_every", 1), ("train.eval_every", 0),
           ("train.eval_batches", 0), ("checkpoint.save_every", 1), ("checkpoint.keep", 1),
           ("data.batch_size", 1), ("data.num_threads", 1), ("train.max_skipped", 0))
NONFINITE_ACTIONS = ("stop", "skip")


def check_train_config(config: Any) -> tuple[MLLMConfig, LayoutSpec, TopKPlan]:
  """Checks what a training run reads from ``config``, before it writes anything: the model
  dataclasses (each checks its fields), the layout spec, the input features and the smallest
  example against the layout (``preflight.check_example_fits``, one answer token: the run's
  tokenizer is checked with its chat template in ``preflight.check_before_writing``), the
  top-K plan, the counts of ``train`` / ``checkpoint`` / ``data`` and the ``optim`` fields.
  Touches no device (train_main.py runs it before ``jax.distributed.initialize``). Raises
  ValueError naming the field. Returns ``train_model_config(config)``."""
  # The layout first: a max_regions below one image's regions is that, not a K out of range.
  target_cfg = run_model_config(config)
  check_example_fits(config, target_cfg, layout_spec(config, target_cfg))
  model_cfg, spec, plan = train_model_config(config)
  for name, low in _COUNTS:
    section, field = name.split(".")
    x = getattr(getattr(config, section), field)
    if isinstance(x, bool) or not isinstance(x, int) or x < low:
      raise ValueError(f"config.{name}={x!r} must be an int >= {low}")
  if config.train.eval_every and not config.train.eval_batches:
    raise ValueError(f"config.train.eval_batches=0 with eval_every={config.train.eval_every} "
                     "would evaluate nothing: set it >= 1, or eval_every=0")
  if config.train.on_nonfinite not in NONFINITE_ACTIONS:
    raise ValueError(f"config.train.on_nonfinite={config.train.on_nonfinite!r} must be one of "
                     f"{NONFINITE_ACTIONS}")
  check_optim(config.optim)
  return model_cfg, spec, plan

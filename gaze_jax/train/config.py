"""Training configs -> a typed, checked ``RunConfig``: the model dataclasses, the other
sections (``gaze_jax.train.sections``), and the derived static shapes of a run.

The configs in ``configs/`` are ml_collections ``ConfigDict`` trees built from
``configs/common.py: base_config`` (what the command line overrides). ``run_config(config)``
turns one into a ``RunConfig`` once, at the boundary (``train_main``, ``trainer.train``, a run's
``config.json`` for evaluation): each section checks its own fields, the model is resolved
(from a Hugging Face folder's ``config.json`` for ``model.init=hf:``), and the layout spec and
the top-K plan are derived and checked. Everything below reads the typed fields. Anything with
the same attributes converts (a ConfigDict, nested namespaces or mappings), and
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
import functools
import logging
import math
from typing import Any, Mapping, Optional

from gaze_jax.gaze.layout import LayoutSpec
from gaze_jax.model.config import (DecoderConfig, FieldError, GazeConfig, MLLMConfig,
                                   VisionConfig)
from gaze_jax.train.dicts import config_json, to_dict
from gaze_jax.train.model_init import hf_folder, hf_model_config
from gaze_jax.train.sections import (SECTIONS, CheckpointSection, DataSection,
                                     DistributedSection, MeshSection, OptimSection,
                                     TopKScheduleSection, TrainSection)
from gaze_jax.train.sharding import DEFAULT_RULES, rules_from_config

log = logging.getLogger("gaze_jax.train")

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


def mllm_config(model_cfg: Any) -> MLLMConfig:
  """``config.model`` -> ``MLLMConfig`` (its shape from the Hugging Face folder of
  ``model.init=hf:<folder>``)."""
  d = to_dict(model_cfg)
  gz = _dataclass_from(GazeConfig, d.get("gaze"), "config.model.gaze")
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


def layout_spec(data: DataSection, model: MLLMConfig) -> LayoutSpec:
  """The static LayoutSpec of the batches (``config.data`` shapes + the model's gaze
  settings; the M-RoPE position triples when the decoder uses M-RoPE)."""
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



def topk_plan(sched: TopKScheduleSection, num_steps: int, model: MLLMConfig,
              spec: LayoutSpec) -> TopKPlan:
  """Resolves ``config.topk_schedule`` against the model's target K and the layout's regions.

  ``topk_schedule.start`` <= 0 means all regions (``spec.max_regions``, i.e. dense routing);
  ``warmup_steps`` < 0 means ``warmup_fraction * train.num_steps``; ``enabled=False`` trains
  at the target K from step 0.
  """
  if model.gaze.attention != "gaze":
    return TopKPlan(False, 0, 0, 0, "linear")
  target = model.gaze.resolve_k(spec.max_regions).schedule_target
  if not sched.enabled:
    return TopKPlan(True, target, target, 0, "linear")
  start = int(sched.start)
  start = spec.max_regions if start <= 0 else start
  if not target <= start <= spec.max_regions:
    raise ValueError(f"config.topk_schedule.start={start} must be in [target K={target}, "
                     f"max_regions={spec.max_regions}]")
  warm = int(sched.warmup_steps)
  if warm < 0:
    warm = int(math.ceil(float(sched.warmup_fraction) * num_steps))
  return TopKPlan(True, start, target, warm, sched.shape)


def qwen_static_grids(data: DataSection, model: MLLMConfig) -> tuple[tuple[int, int, int], ...]:
  """A Qwen-VL model's fixed tower grids (``MLLMConfig.qwen_grids``) for a run whose images and
  videos all go to one bucket (``data.buckets``): every frame slot the patches can hold
  (``data.max_images``, fewer when ``data.max_patches`` is smaller) is one temporal group of
  ``(1, H / patch, W / patch)``. A video of ``t`` groups at that bucket is the same rows and
  the same tower output as ``t`` such slots (the towers attend within a temporal group), so
  the static grids fit every example; an example with fewer frames has zero rows there, which
  no slot reads. Several buckets: ``()`` (the trainer passes each batch's grids, one compile per
  distinct set). Other models: ``()``."""
  qv = model.qwen_vision
  buckets = data.buckets
  if qv is None or model.qwen_grids:
    return model.qwen_grids
  if len(buckets) == 2 and all(isinstance(n, int) for n in buckets):
    buckets = (buckets,)                                    # one (height, width)
  if len(buckets) != 1:
    return ()
  H, W = (int(n) for n in buckets[0])
  p = qv.patch_size
  h, w = H // p, W // p
  frames = data.max_images
  if data.max_patches:
    frames = min(frames, data.max_patches // (h * w))
  return ((1, h, w),) * frames


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A run config, typed and checked (``run_config``): the sections of ``configs/common.py:
  base_config`` as dataclasses, the model resolved, and what they fix together.

  ``model`` is the model the run trains to (``config.model.gaze.top_k``, the target K; a Qwen-VL
  model's static tower grids for a one-bucket run), which evaluation and serving build;
  ``train_model`` the one the train step compiles (K_max = the top-K schedule's start).
  ``source`` is the config as given, in JSON form: what a run's ``config.json`` and its
  checkpoints record (``to_dict``)."""
  model: MLLMConfig
  init: str                               # config.model.init
  init_from_checkpoint: str               # another run's workdir: start from its parameters
  data: DataSection
  topk_schedule: TopKScheduleSection
  optim: OptimSection
  mesh: MeshSection
  logical_axis_rules: tuple
  train: TrainSection
  checkpoint: CheckpointSection
  distributed: DistributedSection
  spec: LayoutSpec                        # the static layout of every batch
  source: dict = dataclasses.field(repr=False, compare=False, default_factory=dict)

  @functools.cached_property
  def topk(self) -> TopKPlan:
    """The progressive top-K plan, resolved against the layout (``topk_plan``; raises
    ValueError naming the field). Derived on first use, so that
    ``preflight.check_train_config`` can name a layout too small for one image before a K that
    its regions cannot hold."""
    return topk_plan(self.topk_schedule, self.train.num_steps, self.model, self.spec)

  @property
  def train_model(self) -> MLLMConfig:
    """The model the train step compiles: the static K_max is the schedule's start (a
    per-example K routes over all regions already)."""
    if self.topk.gaze and not self.model.gaze.top_k_per_example \
        and self.topk.start != self.model.gaze.top_k:
      return dataclasses.replace(self.model, gaze=dataclasses.replace(self.model.gaze,
                                                                      top_k=self.topk.start))
    return self.model

  def to_dict(self) -> dict:
    """The config as given (JSON form), for ``dicts.to_dict`` / ``config_json``."""
    return copy.deepcopy(self.source)


# Fields outside the sections, with the defaults of a config that lacks them.
_TOP_LEVEL = {"init_from_checkpoint": "", "logical_axis_rules": DEFAULT_RULES}


def _section(cls, given: Any, name: str, missing: list, unknown: list):
  """``cls`` from the mapping ``given`` (``config.<name>``); the names it lacks (they take
  ``cls``'s defaults) and those ``cls`` does not have go to ``missing`` / ``unknown``."""
  fields = {f.name for f in dataclasses.fields(cls)}
  if not isinstance(given, Mapping):
    missing.append(name)
    return cls()
  missing += [f"{name}.{f}" for f in sorted(fields - set(given))]
  unknown += [f"{name}.{f}" for f in sorted(set(given) - fields)]
  try:
    return cls(**{k: v for k, v in given.items() if k in fields})
  except FieldError as e:
    raise e.at(f"config.{name}") from None


def run_config(config: Any, where: str = "config", *, old_run: bool = False) -> RunConfig:
  """``config`` (a ConfigDict, nested namespaces or mappings, e.g. a run's ``config.json``) as a
  ``RunConfig``, each section checked; a ``RunConfig`` is returned as it is (converted once).

  Raises ValueError naming the field: a bad value, a field ``base_config`` does not define, a
  field it defines that ``config`` lacks; prefixed with ``where`` (a flag, a file) unless it is
  "config". ``old_run``: ``config`` is the ``config.json`` of a run (``where`` names the file),
  maybe of an older version with fewer fields: a field it lacks takes its default and one no
  longer defined is ignored, each said in a warning.
  """
  if isinstance(config, RunConfig):
    return config
  try:
    return _run_config(config_json(config) or {}, where, old_run)
  except ValueError as e:
    if where == "config" or str(e).startswith(where):
      raise
    raise ValueError(f"{where}: {e}") from None


def _run_config(d: dict, where: str, old_run: bool) -> RunConfig:
  missing, unknown = [], []
  sections = {name: _section(cls, d.get(name), name, missing, unknown)
              for name, cls in SECTIONS.items()}
  top = {}
  for name, default in _TOP_LEVEL.items():
    if name in d:
      top[name] = d[name]
    else:
      missing.append(name)
      top[name] = default
  known = set(SECTIONS) | set(_TOP_LEVEL) | {"model"}
  unknown += sorted(set(d) - known)
  missing, unknown = sorted(missing), sorted(unknown)
  if "model" not in d:
    raise ValueError(f"{where} has no model section (config.model): build it from "
                     "configs/common.py base_config")
  if not old_run and (missing or unknown):
    parts = ([f"lacks the fields {', '.join(missing)}"] if missing else []) + \
            ([f"has unknown fields {', '.join(unknown)}"] if unknown else [])
    raise ValueError(f"{where} {' and '.join(parts)}: build it from configs/common.py "
                     "base_config, which defines every field and its default")
  if missing:
    log.warning("%s lacks the fields %s (a run of an older version): their defaults are used",
                where, ", ".join(missing))
  if unknown:
    log.warning("%s has fields this version does not know, ignored: %s", where,
                ", ".join(unknown))
  model = mllm_config(d["model"])
  data = sections["data"]
  grids = qwen_static_grids(data, model)
  if grids != model.qwen_grids:
    model = dataclasses.replace(model, qwen_grids=grids)
  rules = rules_from_config(top["logical_axis_rules"])
  return RunConfig(model=model, init=str(d["model"].get("init") or ""),
                   init_from_checkpoint=str(top["init_from_checkpoint"] or ""),
                   logical_axis_rules=rules, spec=layout_spec(data, model), source=d,
                   **sections)

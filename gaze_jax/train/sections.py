"""The sections of a run config other than the model, as typed dataclasses that check
themselves: the one definition of each field, its type, its default and its allowed values.

``configs/common.py: base_config`` builds its ConfigDict (what the command line overrides) from
these defaults; ``gaze_jax.train.config.run_config`` turns a ConfigDict back into them once, at
the boundary (``train_main``, ``eval_main``, ``trainer.train``), and everything below reads the
typed fields. A bad value raises the model config's ``FieldError`` (the same checks), which
``run_config`` names as the config tree holds it (``config.train.num_steps=0 must be an int
>= 1``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from gaze_jax.gaze.schedules import SHAPES
from gaze_jax.model.config import FieldError, check_counts, one_of
from gaze_jax.train.optim import parse_groups

NONFINITE_ACTIONS = ("stop", "skip")


def _any_int(obj, name: str) -> None:
  x = getattr(obj, name)
  if isinstance(x, bool) or not isinstance(x, int):
    raise FieldError(type(obj).__name__, name, f"={x!r} must be an int")


def _number(obj, name: str, ok, what: str) -> None:
  x = getattr(obj, name)
  if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) \
      or not ok(x):
    raise FieldError(type(obj).__name__, name, f"={x!r} must be a number {what}")


def _tuples(x):
  """JSON's lists (a run's config.json) as the tuples a config file gives."""
  return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


@dataclasses.dataclass(frozen=True)
class DataSection:
  """``config.data``: the dataset, tokenizer and the static shapes of every batch."""
  name: str = "gaze_shapes"
  builder_config: str = "64px"
  # The dataset builder's keywords (gaze_jax.data.builders), e.g. the synthetic sets' sizes.
  builder_overrides: dict = dataclasses.field(default_factory=lambda: dict(
      num_train=20_000, num_validation=1_000, num_test=1_000))
  data_dir: str = ""                      # default <workdir>/tfds
  # "byte", "words", "gguf:smollm2", a .gguf file, a folder with tokenizer.json, "hf:<model
  # folder>", or "model": the tokenizer and chat template of model.init's Hugging Face folder.
  tokenizer: str = "byte"
  image_grid: tuple = (0, 0)              # tiles (rows, cols) of a tiling family; (0, 0): none
  seq_len: int = 160
  max_regions: int = 16
  max_images: int = 1
  max_nonvisual: Optional[int] = None     # None: seq_len
  batch_size: int = 32
  seed: int = 0
  num_threads: int = 2
  skip_too_long: bool = False
  train_split: str = "train"
  eval_split: str = "validation"
  # Qwen2.5-VL / Qwen3-VL folders (model.init=hf:): the static (height, width) pixel sizes
  # that every image and video is resized to (each side a multiple of 28 / 32); empty: not a
  # Qwen-VL run (such a folder is refused without them). video_fps: the frame rate of the
  # videos' frames (0: transformers' 24). max_patches: patch rows per example (0: max_images
  # frames at the largest bucket).
  buckets: tuple = ()
  video_fps: float = 0.0
  max_patches: int = 0

  def __post_init__(self):
    object.__setattr__(self, "image_grid", _tuples(self.image_grid))
    object.__setattr__(self, "buckets", _tuples(self.buckets))
    object.__setattr__(self, "builder_overrides", dict(self.builder_overrides or {}))
    check_counts(self, (("seq_len", 1), ("max_regions", 1), ("max_images", 1),
                         ("batch_size", 1), ("num_threads", 1), ("max_patches", 0)))
    if self.max_nonvisual is not None:
      check_counts(self, (("max_nonvisual", 0),))
    _number(self, "video_fps", lambda x: x >= 0, ">= 0 (0: 24)")


@dataclasses.dataclass(frozen=True)
class TopKScheduleSection:
  """``config.topk_schedule``: progressive top-K, from ``start`` (<= 0: all regions) to
  ``config.model.gaze.top_k`` over ``warmup_steps`` (< 0: ``warmup_fraction`` of the run)."""
  enabled: bool = True
  shape: str = "linear"
  warmup_fraction: float = 0.3
  warmup_steps: int = -1
  start: int = 0

  def __post_init__(self):
    one_of(self, "shape", SHAPES)
    _number(self, "warmup_fraction", lambda x: 0 <= x <= 1, "in [0, 1]")
    _any_int(self, "warmup_steps")
    _any_int(self, "start")


@dataclasses.dataclass(frozen=True)
class OptimSection:
  """``config.optim``: AdamW with warm-up and cosine decay, clipping and parameter groups."""
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  end_lr_ratio: float = 0.1
  weight_decay: float = 0.05
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0                  # 0: none
  decay_all: bool = False
  # (regex, lr multiplier[, start_step]) on paths like "decoder/layers/0/mlp/up_proj/kernel";
  # multiplier 0 freezes. First match wins; unmatched parameters use multiplier 1.
  param_groups: tuple = ()

  def __post_init__(self):
    object.__setattr__(self, "param_groups", _tuples(self.param_groups))
    # A negative learning rate or weight decay, or betas outside [0, 1), would train without
    # an error.
    for name, ok, what in (
        ("learning_rate", lambda x: x > 0, "> 0"), ("warmup_steps", lambda x: x >= 0, ">= 0"),
        ("end_lr_ratio", lambda x: x >= 0, ">= 0"), ("weight_decay", lambda x: x >= 0, ">= 0"),
        ("b1", lambda x: 0 <= x < 1, "in [0, 1)"), ("b2", lambda x: 0 <= x < 1, "in [0, 1)"),
        ("eps", lambda x: x > 0, "> 0"), ("clip_norm", lambda x: x >= 0, ">= 0 (0: none)")):
      _number(self, name, ok, what)
    if int(self.warmup_steps) != self.warmup_steps:
      raise FieldError("OptimSection", "warmup_steps",
                       f"={self.warmup_steps!r} must be a whole number")
    parse_groups(self.param_groups)


@dataclasses.dataclass(frozen=True)
class MeshSection:
  """``config.mesh``: the device mesh's axis sizes; one axis may be -1 (the remaining
  devices)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    for name in ("data", "fsdp", "tensor"):       # their sizes: sharding.make_mesh
      _any_int(self, name)


@dataclasses.dataclass(frozen=True)
class TrainSection:
  """``config.train``: the loop's length, logging, evaluation and fault handling."""
  num_steps: int = 1000
  seed: int = 0
  log_every: int = 50
  eval_every: int = 0                     # 0: no evaluation during training
  eval_batches: int = 8
  log_fingerprints: bool = False
  peak_flops_per_device: float = 0.0      # for the MFU; 0: the device's known peak, if any
  # A step whose loss or gradient is not finite: "stop" the run (nothing past the last finite
  # step is saved) or "skip" its update (the step still counts); a run that skips more than
  # max_skipped steps in a row stops.
  on_nonfinite: str = "stop"
  max_skipped: int = 10
  # Refuse a run whose train step needs well over a device's memory by
  # gaze_jax.model.memory's estimate (gaze_jax.train.preflight.check_memory).
  check_memory: bool = True
  # Trace this many steps with jax.profiler into <workdir>/profile (TensorBoard's profile
  # plugin, xprof): the first steps after the one that compiles. 0: none.
  profile_steps: int = 0

  def __post_init__(self):
    check_counts(self, (("num_steps", 1), ("log_every", 1), ("eval_every", 0),
                         ("eval_batches", 0), ("max_skipped", 0), ("profile_steps", 0)))
    if self.eval_every and not self.eval_batches:
      raise FieldError("TrainSection", "eval_batches", f"=0 with eval_every={self.eval_every} "
                       "would evaluate nothing: set it >= 1, or eval_every=0")
    one_of(self, "on_nonfinite", NONFINITE_ACTIONS)


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
  """``config.checkpoint``: how often, how many, and what a resumed run may change."""
  save_every: int = 500
  keep: int = 3
  async_save: bool = True
  fallback: bool = True                   # restore the newest step that reads back whole
  # Resuming with a config that differs from the checkpoint's in a field that changes the
  # training (model, data, optimizer, schedule) is refused unless this is True.
  allow_config_changes: bool = False

  def __post_init__(self):
    check_counts(self, (("save_every", 1), ("keep", 1)))


@dataclasses.dataclass(frozen=True)
class DistributedSection:
  """``config.distributed``: a multi-process run's coordinator (``jax.distributed``)."""
  coordinator_address: str = ""
  num_processes: int = 0                  # 0: $JAX_NUM_PROCESSES
  process_id: int = -1                    # -1: $JAX_PROCESS_ID
  auto: bool = False                      # let jax detect the cluster (TPU pods, Slurm)
  cpu_collectives: str = "gloo"


# The sections of a run config, by their name in the config tree.
SECTIONS = {"data": DataSection, "topk_schedule": TopKScheduleSection, "optim": OptimSection,
            "mesh": MeshSection, "train": TrainSection, "checkpoint": CheckpointSection,
            "distributed": DistributedSection}

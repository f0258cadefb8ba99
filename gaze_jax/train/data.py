"""Input for training: ``config.data`` -> this host's grain iterator of fixed-shape batches.

Every function takes the run's ``RunConfig`` (``gaze_jax.train.config.run_config``); the
fields of ``config.data`` are those of ``gaze_jax.train.sections.DataSection``. ``batch_size``
is global: each host reads ``batch_size / process_count``.
"""

from __future__ import annotations

import zlib
from typing import Mapping, Optional

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from gaze_jax.convert.families import media_processor as family_media
from gaze_jax.data import pipeline
from gaze_jax.data.features import ExampleProcessor, FeatureConfig, is_patch_media
from gaze_jax.gaze.layout import LayoutSpec
from gaze_jax.model.config import MLLMConfig
from gaze_jax.train.config import RunConfig
from gaze_jax.train.model_init import hf_folder


def feature_config(run: RunConfig, model: MLLMConfig, spec: LayoutSpec, media=None):
  """The run's ``FeatureConfig``. ``media``: the run's media processing when already made
  (else ``media_processor(run)``). For Qwen-VL patch rows
  (``features.PatchMedia``) the square ``image_size`` is the largest bucket side (only the
  size preflight's blank image is made at) and ``max_patches`` is ``config.data.max_patches``
  (0: the default)."""
  if media is None:
    media = media_processor(run)
  if is_patch_media(media):
    return FeatureConfig(spec=spec, image_size=max(max(b) for b in media.buckets),
                         patch_size=media.settings.image.factor,
                         skip_too_long=run.data.skip_too_long,
                         vocab_size=model.decoder.vocab_size,
                         max_patches=run.data.max_patches or None)
  if model.vision is None:
    raise ValueError("training needs a model with a vision tower (config.model.vision)")
  v = model.vision
  grid = v.image_size // model.token_pixels
  return FeatureConfig(spec=spec, image_size=v.image_size, patch_size=model.token_pixels,
                       video_grid=v.pooled_grid(grid, grid)[0] if v.video_pool > 1 else None,
                       skip_too_long=run.data.skip_too_long,
                       vocab_size=model.decoder.vocab_size)


def media_processor(run: RunConfig):
  """The image / video processing of a run started from a Hugging Face folder
  (``model.init=hf:``): the folder's family processing at ``config.data.image_grid`` (tiles),
  or for Qwen2.5-VL / Qwen3-VL at ``config.data.buckets`` with ``config.data.video_fps``;
  None otherwise (``features.SquareResize``). A Qwen-VL folder without buckets is refused
  naming ``config.data.buckets``."""
  folder = hf_folder(run.init)
  if folder is None:
    return None
  d = run.data
  return family_media(folder, d.image_grid, buckets=d.buckets,
                      video_fps=float(d.video_fps) or None)


def example_processor(run: RunConfig, tokenizer, model: MLLMConfig, spec: LayoutSpec):
  """Raw example -> features for this run: its tokenizer, static shapes and image processing."""
  media = media_processor(run)
  return ExampleProcessor(tokenizer, feature_config(run, model, spec, media), media=media)


def data_dir(run: RunConfig, workdir) -> epath.Path:
  """``config.data.data_dir``, default ``<workdir>/tfds`` (local or ``gs://``)."""
  d = run.data.data_dir
  return epath.Path(d) if d else epath.Path(workdir) / "tfds"


def prepare(run: RunConfig, workdir):
  """Builds the dataset once (process 0), then every process opens it (from a ``gs://``
  data_dir, each host through its own local mirror)."""
  # Not at the top: builders imports tensorflow_datasets and PIL (the [data] extra), which the
  # trainer's module does not need (benchmarks/aot imports it without them).
  from gaze_jax.data import builders

  d = run.data
  kw = dict(name=d.name, data_dir=data_dir(run, workdir), config=d.builder_config,
            **d.builder_overrides)
  if jax.process_index() == 0:
    b = builders.prepare(kw.pop("name"), kw.pop("data_dir"), kw.pop("config"), **kw)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("gaze_jax.train.data.prepare")
  if jax.process_index() != 0:
    b = builders.builder(kw.pop("name"), kw.pop("data_dir"), kw.pop("config"), **kw)
  return b


def local_batch_size(run: RunConfig) -> int:
  bs = run.data.batch_size
  if bs % jax.process_count():
    raise ValueError(f"config.data.batch_size={bs} is not divisible by the "
                     f"{jax.process_count()} processes")
  return bs // jax.process_count()


def make_iterator(run: RunConfig, builder, tokenizer, model: MLLMConfig, spec: LayoutSpec, *,
                  split: Optional[str] = None, train: bool = True,
                  state: Optional[Mapping] = None):
  """This host's iterator of batches (endless and shuffled for training; one ordered pass
  otherwise), positioned at ``state`` when given."""
  d = run.data
  split = split or (d.train_split if train else d.eval_split)
  src = pipeline.data_source(builder, split)
  proc = example_processor(run, tokenizer, model, spec)
  ds = pipeline.make_dataset(src, proc, batch_size=local_batch_size(run), seed=d.seed,
                             shuffle=train, num_epochs=None if train else 1,
                             num_threads=d.num_threads)
  it = iter(ds)
  if state is not None:
    it.set_state(dict(state))
  return it


def fingerprint(batch: Mapping[str, np.ndarray]) -> str:
  """A short hash of a batch's tokens and images (or Qwen-VL patches; to check the data order
  across restarts)."""
  c = zlib.crc32(np.ascontiguousarray(batch["tokens"]).tobytes())
  for key in ("images", "patches"):
    if key in batch:
      c = zlib.crc32(np.ascontiguousarray(batch[key]).tobytes(), c)
  return f"{c:08x}"

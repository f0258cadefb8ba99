"""grain input pipeline over ``tfds.data_source``: shard per host, shuffle, featurise, batch.

Usage::

  from gaze_jax.data import pipeline, builders
  from gaze_jax.data.features import ExampleProcessor, FeatureConfig, batch_to_model_inputs

  b = builders.prepare("gaze_shapes", data_dir, "tiny")
  src = pipeline.data_source(b, "train")                    # this host's shard
  proc = ExampleProcessor(tokenizer, FeatureConfig(spec=spec, image_size=64, patch_size=8,
                                                   vocab_size=model_cfg.decoder.vocab_size))
  ds = pipeline.make_dataset(src, proc, batch_size=8, seed=0, num_epochs=None)
  it = iter(ds)
  batch = next(it)                                          # dict of [B, ...] numpy arrays
  state = it.get_state()                                    # save with the checkpoint ...
  it.set_state(state)                                       # ... and resume exactly there
  tokens, images, layout, targets, loss_mask, gt, objects = batch_to_model_inputs(batch, spec)

Determinism: the order depends only on ``seed`` and the shard; each epoch is reshuffled
(``repeat(reseed_each_epoch=True)``). tfds and grain are imported inside the functions, so
``gaze_jax.data`` itself imports without them.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from gaze_jax.data.features import (ExampleProcessor, ExampleTooLong, FeatureConfig,
                                    ModelInputs, batch_to_model_inputs, example_where)

__all__ = ["ExampleProcessor", "FeatureConfig", "ModelInputs", "batch_to_model_inputs",
           "SplitSource", "data_source", "make_dataset", "make_pipeline", "shard_split"]


def shard_split(split: str, process_index: Optional[int] = None,
                process_count: Optional[int] = None, drop_remainder: bool = True):
  """This process's part of ``split`` (``tfds.split_for_jax_process``; the defaults are
  ``jax.process_index()`` / ``jax.process_count()``). ``drop_remainder`` keeps every host's
  shard the same length, so that hosts run the same number of steps."""
  import tensorflow_datasets as tfds   # the [data] extra: the module imports without it

  return tfds.split_for_jax_process(split, process_index=process_index,
                                    process_count=process_count, drop_remainder=drop_remainder)


class SplitSource:
  """Random access to (this host's part of) one split of a prepared builder
  (``builder.as_data_source``) that says where each example comes from.

  Every example gets an ``origin`` text, ``"<file> record <n>: example '<id>'"`` (for
  ``llava_json`` the JSON file and the record's index in it, else the array_record file and
  the position in it), which the processor's errors quote. Opening checks that each shard file
  is there with the records dataset_info.json lists; a record that cannot be read or decoded
  (a corrupt file) raises ``builders.DamagedDatasetError`` naming the file and the record.
  ``description`` names the split and its data file (or folder).
  """

  def __init__(self, builder, split: str, read_split):
    from gaze_jax.data import builders   # tensorflow_datasets at its top: not this module's

    self._folder = builders.data_dir_of(builder)
    self._files = builder.info.splits[read_split].file_instructions
    builders.check_shards(self._files, self._folder)
    self._src = builder.as_data_source(read_split)
    self._ends = np.cumsum([fi.take for fi in self._files])     # [shards] last index + 1
    json_files = getattr(builder.builder_config, "json_files", None) or {}
    self._json = json_files.get(split)
    self.description = (f"{builder.name}/{builder.builder_config.name} split {split!r} "
                        f"({self._json or self._folder})")

  def __len__(self) -> int:
    return len(self._src)

  def _file_record(self, i: int) -> tuple[str, int]:
    """The shard file of example ``i`` and its position there."""
    k = int(np.searchsorted(self._ends, i, side="right"))
    fi = self._files[k]
    return fi.filename, fi.skip + i - int(self._ends[k] - fi.take)

  def __getitem__(self, i):
    from gaze_jax.data import builders   # tensorflow_datasets at its top: not this module's

    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"{self.description}: index {i} out of range [0, {len(self)})")
    try:
      ex = self._src[i]
    except Exception as e:       # array_record (RuntimeError), protobuf and decode errors
      path, pos = self._file_record(i)
      raise builders.DamagedDatasetError(
          f"{path}: record {pos} cannot be read ({type(e).__name__}: {e}); "
          f"{builders.rebuild_hint(self._folder)}") from e
    if self._json is not None:                  # llava_json keeps the record index in source
      path, pos = self._json, int(np.asarray(ex["source"]).reshape(-1)[0])
    else:
      path, pos = self._file_record(i)
    ex["origin"] = f"{path} record {pos}: {example_where(ex)}"
    return ex


def data_source(builder, split: str = "train", *, shard: bool = True,
                process_index: Optional[int] = None,
                process_count: Optional[int] = None) -> SplitSource:
  """Random-access source of a prepared builder's split (``SplitSource``), this host's shard of
  it unless ``shard=False``."""
  if not builder.is_prepared():
    raise ValueError(f"dataset {builder.name}/{builder.builder_config.name} is not prepared "
                     f"in {builder.data_dir}; call gaze_jax.data.builders.prepare first")
  if split not in builder.info.splits:
    raise ValueError(f"{builder.name}: no split {split!r}; has {sorted(builder.info.splits)}")
  return SplitSource(builder, split,
                     shard_split(split, process_index, process_count) if shard else split)


# With skip_too_long, a run fails when the first this many examples (or the whole source, if
# smaller) were all skipped: no example fits, and grain would search for one forever.
SKIP_CHECK_EXAMPLES = 256


class _FailIfNoneFits:
  """``processor`` as grain's map function (None = skipped; grain drops those, without calling
  a filter on them); raises ExampleTooLong once ``processor`` has skipped ``n`` examples without
  keeping one."""

  def __init__(self, processor: ExampleProcessor, n: int, where: str):
    self.processor, self.n, self.where = processor, n, where

  def __call__(self, example):
    p = self.processor
    out = p(example)
    if out is None and p.kept == 0 and p.skipped >= self.n:
      raise ExampleTooLong(
          f"{self.where}: all of the first {p.skipped} examples were skipped as too long "
          f"(skip_too_long), none fits: the most they needed is {p.most_needed_text()}; "
          "raise those limits or shorten the examples", p.most_needed)
    return out


def make_dataset(source, processor: ExampleProcessor, *, batch_size: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: Optional[int] = 1, drop_remainder: bool = True,
                 num_threads: int = 2, prefetch_buffer_size: int = 16):
  """A grain ``IterDataset`` of batches (dicts of numpy arrays with a leading ``[B]`` axis).

  Args:
    source: a random-access source (``data_source(...)``, or any sequence of raw examples).
    processor: raw example -> features (None = skip; see ``FeatureConfig.skip_too_long``;
      when the first ``SKIP_CHECK_EXAMPLES`` examples, or all if fewer, are all skipped,
      iterating raises ExampleTooLong).
    batch_size: examples per batch (per host).
    seed: shuffle seed; the same seed and shard give the same batches.
    shuffle: shuffle the examples (per epoch).
    num_epochs: passes over the source; None repeats forever.
    drop_remainder: drop a last, smaller batch (static shapes).
    num_threads, prefetch_buffer_size: grain read options (threads run ``processor``).
  Returns:
    ``grain.IterDataset``; ``iter()`` it, and use the iterator's ``get_state`` / ``set_state``
    to checkpoint and resume.
  """
  import grain   # the [data] extra: the module imports without it

  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs, reseed_each_epoch=True)
  where = getattr(source, "description", "the data source")
  n = max(1, min(SKIP_CHECK_EXAMPLES, len(source)))
  # Skipped examples (None) drop out here.
  ds = ds.map(_FailIfNoneFits(processor, n, where)).filter(lambda x: x is not None)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=prefetch_buffer_size))
  return it.batch(batch_size, drop_remainder=drop_remainder)


def make_pipeline(name: str, split: str, data_dir, tokenizer, feature_cfg: FeatureConfig, *,
                  batch_size: int, config="tiny", seed: int = 0, shuffle: Optional[bool] = None,
                  num_epochs: Optional[int] = 1, shard: bool = True,
                  process_index: Optional[int] = None, process_count: Optional[int] = None,
                  prepare: bool = True, num_threads: int = 2, **overrides):
  """Dataset name -> ``(IterDataset of batches, ExampleProcessor)`` in one call.

  Builds the dataset first when ``prepare`` (a prepared one is reused). ``shuffle`` defaults to
  True for "train" and False otherwise. The processor's ``skipped`` counts skipped examples.
  """
  from gaze_jax.data import builders   # tensorflow_datasets at its top: not this module's

  b = (builders.prepare if prepare else builders.builder)(name, data_dir, config, **overrides)
  src = data_source(b, split, shard=shard, process_index=process_index,
                    process_count=process_count)
  proc = ExampleProcessor(tokenizer, feature_cfg)
  ds = make_dataset(src, proc, batch_size=batch_size, seed=seed,
                    shuffle=(split == "train") if shuffle is None else shuffle,
                    num_epochs=num_epochs, num_threads=num_threads)
  return ds, proc

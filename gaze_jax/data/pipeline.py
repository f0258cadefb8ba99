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

from gaze_jax.data.features import (ExampleProcessor, FeatureConfig, ModelInputs,
                                    batch_to_model_inputs)

__all__ = ["ExampleProcessor", "FeatureConfig", "ModelInputs", "batch_to_model_inputs",
           "data_source", "make_dataset", "make_pipeline", "shard_split"]


def shard_split(split: str, process_index: Optional[int] = None,
                process_count: Optional[int] = None, drop_remainder: bool = True):
  """This process's part of ``split`` (``tfds.split_for_jax_process``; the defaults are
  ``jax.process_index()`` / ``jax.process_count()``). ``drop_remainder`` keeps every host's
  shard the same length, so that hosts run the same number of steps."""
  import tensorflow_datasets as tfds

  return tfds.split_for_jax_process(split, process_index=process_index,
                                    process_count=process_count, drop_remainder=drop_remainder)


def data_source(builder, split: str = "train", *, shard: bool = True,
                process_index: Optional[int] = None, process_count: Optional[int] = None):
  """Random-access source of a prepared builder's split (``builder.as_data_source``), this
  host's shard of it unless ``shard=False``."""
  if not builder.is_prepared():
    raise ValueError(f"dataset {builder.name}/{builder.builder_config.name} is not prepared "
                     f"in {builder.data_dir}; call gaze_jax.data.builders.prepare first")
  if split not in builder.info.splits:
    raise ValueError(f"{builder.name}: no split {split!r}; has {sorted(builder.info.splits)}")
  if shard:
    split = shard_split(split, process_index, process_count)
  return builder.as_data_source(split)


def make_dataset(source, processor: ExampleProcessor, *, batch_size: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: Optional[int] = 1, drop_remainder: bool = True,
                 num_threads: int = 2, prefetch_buffer_size: int = 16):
  """A grain ``IterDataset`` of batches (dicts of numpy arrays with a leading ``[B]`` axis).

  Args:
    source: a random-access source (``data_source(...)``, or any sequence of raw examples).
    processor: raw example -> features (None = skip; see ``FeatureConfig.skip_too_long``).
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
  import grain

  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs, reseed_each_epoch=True)
  ds = ds.map(processor).filter(lambda x: x is not None)   # skipped examples drop out here
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
  from gaze_jax.data import builders

  b = (builders.prepare if prepare else builders.builder)(name, data_dir, config, **overrides)
  src = data_source(b, split, shard=shard, process_index=process_index,
                    process_count=process_count)
  proc = ExampleProcessor(tokenizer, feature_cfg)
  ds = make_dataset(src, proc, batch_size=batch_size, seed=seed,
                    shuffle=(split == "train") if shuffle is None else shuffle,
                    num_epochs=num_epochs, num_threads=num_threads)
  return ds, proc

"""Data: offline TFDS datasets where gaze matters, a grain pipeline, tokenizers.

Submodules (tensorflow-datasets, grain, Pillow, scikit-learn and tokenizers are the ``[data]``
extra; nothing here imports them until it is used, so the model imports without them):

* ``builders``: TFDS builders ``gaze_shapes``, ``digit_grid``, ``gaze_video``, ``llava_json``
  (written as array_record) and ``prepare(name, data_dir, config, **overrides)``.
* ``pipeline``: grain over ``tfds.data_source``: per-host shards, shuffling, batching,
  checkpointable iterator state.
* ``features``: one raw example -> fixed-shape features (tokens, next-token targets by position,
  loss mask, images, layout, ground-truth region ids); ``batch_to_model_inputs``.
* ``tokenizers``: byte-level, Hugging Face ``tokenizer.json`` and GGUF tokenizers, chat templates.
* ``scenes``, ``llava``, ``boxes``: procedural scenes, LLaVA JSON parsing, box -> region ids.
"""

import importlib

_LAZY = {
    "prepare": "builders", "make_config": "builders", "BUILDERS": "builders",
    "make_dataset": "pipeline", "make_pipeline": "pipeline", "data_source": "pipeline",
    "ExampleProcessor": "features", "FeatureConfig": "features", "ModelInputs": "features",
    "batch_to_model_inputs": "features", "ExampleTooLong": "features",
    "ByteTokenizer": "tokenizers", "ChatTemplate": "tokenizers", "load_hf_tokenizer": "tokenizers",
    "load_gguf_tokenizer": "tokenizers",
    "boxes_to_regions": "boxes",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f"gaze_jax.data.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'gaze_jax.data' has no attribute {name!r}")

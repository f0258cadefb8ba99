"""A training run seen from outside: its tokenizer, its model restored from ``--workdir``, and
its evaluation batches, for ``eval_main.py`` (and the trainer's tokenizer).

The pieces live in ``gaze_jax.train`` (the checkpoint format, config -> model / layout, the
input pipeline) and are imported on use, so ``gaze_jax.eval`` and ``eval_main.py`` reach them
through this module only and ``import gaze_jax.runs`` is cheap.

* ``make_tokenizer(config.data.tokenizer)``: the run's tokenizer;
* ``restore(config, workdir, step=None) -> Restored(model, step, model_cfg, spec, tokenizer)``;
* ``eval_batches(config, workdir, model_cfg, spec, tokenizer, split) -> (builder, iterator)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Optional


def make_tokenizer(name: str):
  """"byte" -> ``ByteTokenizer``; "words" -> ``WordTokenizer`` over the synthetic datasets'
  vocabulary (``scenes.VOCABULARY``); "gguf:smollm2" -> SmolLM2's GGUF tokenizer (ChatML); a
  ``.gguf`` path -> its tokenizer; a folder -> its ``tokenizer.json``."""
  from gaze_jax.data import tokenizers

  if name == "byte":
    return tokenizers.ByteTokenizer()
  if name == "words":
    from gaze_jax.data.scenes import VOCABULARY
    return tokenizers.WordTokenizer(VOCABULARY)
  if name == "gguf:smollm2":
    from gaze_jax.convert.gguf import find_smollm2_gguf
    return tokenizers.load_gguf_tokenizer(find_smollm2_gguf())
  if name.endswith(".gguf"):
    return tokenizers.load_gguf_tokenizer(name)
  if Path(name).is_dir():
    return tokenizers.load_hf_tokenizer(name)
  raise ValueError(f"config.data.tokenizer={name!r}: use 'byte', 'words', 'gguf:smollm2', a "
                   ".gguf file or a folder with tokenizer.json")


class Restored(NamedTuple):
  """A trained run: its model at ``step``, the model config and layout spec its batches take,
  and its tokenizer (checked against the checkpoint's fingerprint)."""
  model: Any
  step: int
  model_cfg: Any
  spec: Any
  tokenizer: Any


def restore(config: Any, workdir, step: Optional[int] = None) -> Restored:
  """The run of ``config`` in ``workdir`` at ``step`` (default: its latest checkpoint), built
  at the target K of ``config.model.gaze`` (``train.checkpoint.restore_model``)."""
  from gaze_jax.train.checkpoint import restore_model
  from gaze_jax.train.config import eval_model_config, layout_spec

  tok = make_tokenizer(config.data.tokenizer)
  model, step = restore_model(workdir, config, step, tokenizer=tok)
  cfg = eval_model_config(config)
  return Restored(model, step, cfg, layout_spec(config, cfg), tok)


def eval_batches(config: Any, workdir, model_cfg, spec, tokenizer, split: str):
  """``(builder, iterator)``: the run's dataset (built under ``workdir`` when
  ``config.data.data_dir`` is empty) and one ordered pass over ``split`` in batches of
  ``config.data.batch_size``."""
  from gaze_jax.train import data

  builder = data.prepare(config, workdir)
  return builder, data.make_iterator(config, builder, tokenizer, model_cfg, spec, split=split,
                                     train=False)

"""A training run seen from outside: its tokenizer, its model restored from ``--workdir``, and
its evaluation batches, for ``eval_main.py`` (and the trainer's tokenizer).

The pieces live in ``gaze_jax.train`` (the checkpoint format, config -> model / layout, the
input pipeline) and are imported on use, so ``gaze_jax.eval`` and ``eval_main.py`` reach them
through this module only and ``import gaze_jax.runs`` is cheap.

* ``run_tokenizer(config)`` (``make_tokenizer(config.data.tokenizer)``): the run's tokenizer;
* ``restore(config, workdir, step=None) -> Restored(model, step, model_cfg, spec, tokenizer)``;
* ``eval_batches(config, workdir, model_cfg, spec, tokenizer, split) -> (builder, iterator)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Optional


def make_tokenizer(name: str):
  """"byte" -> ``ByteTokenizer``; "words" -> ``WordTokenizer`` over the synthetic datasets'
  vocabulary (``scenes.VOCABULARY``); "gguf:smollm2" -> SmolLM2's GGUF tokenizer (ChatML); a
  ``.gguf`` path -> its tokenizer; a folder -> its ``tokenizer.json``; "hf:<folder>" -> a
  model folder's tokenizer with its own Jinja chat template (``load_model_tokenizer``)."""
  from gaze_jax.data import tokenizers

  if name == "byte":
    return tokenizers.ByteTokenizer()
  if name == "words":
    from gaze_jax.data.scenes import VOCABULARY
    return tokenizers.WordTokenizer(VOCABULARY)
  if name == "gguf:smollm2":
    from gaze_jax.convert.gguf import find_smollm2_gguf
    return tokenizers.load_gguf_tokenizer(find_smollm2_gguf())
  if name.startswith("hf:"):
    return tokenizers.load_model_tokenizer(name[len("hf:"):])
  if name.endswith(".gguf"):
    return tokenizers.load_gguf_tokenizer(name)
  if Path(name).is_dir():
    return tokenizers.load_hf_tokenizer(name)
  raise ValueError(f"config.data.tokenizer={name!r}: use 'byte', 'words', 'gguf:smollm2', a "
                   ".gguf file, a folder with tokenizer.json, 'hf:<model folder>' or 'model'")


def run_tokenizer(config: Any):
  """The tokenizer of a run: ``make_tokenizer(config.data.tokenizer)``, where ``"model"`` is
  the tokenizer and chat template of ``config.model.init``'s Hugging Face folder."""
  from gaze_jax.train.model_init import hf_folder

  name = str(config.data.tokenizer)
  if name != "model":
    return make_tokenizer(name)
  folder = hf_folder(config.model.init)
  if folder is None:
    raise ValueError("config.data.tokenizer='model' takes the tokenizer of config.model.init's "
                     f"Hugging Face folder, but model.init={config.model.init!r} is not "
                     "hf:<folder>")
  return make_tokenizer("hf:" + folder)


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

  tok = run_tokenizer(config)
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

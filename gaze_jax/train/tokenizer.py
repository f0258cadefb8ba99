"""The tokenizer of a run, from its config: ``run_tokenizer(run)`` (what the trainer and a
restored run use) and ``make_tokenizer(name)`` (``config.data.tokenizer`` by name)."""

from __future__ import annotations

from pathlib import Path

from gaze_jax.convert.gguf import find_smollm2_gguf
from gaze_jax.data import tokenizers
from gaze_jax.train.config import RunConfig
from gaze_jax.train.model_init import hf_folder


def make_tokenizer(name: str):
  """"byte" -> ``ByteTokenizer``; "words" -> ``WordTokenizer`` over the synthetic datasets'
  vocabulary (``scenes.VOCABULARY``); "gguf:smollm2" -> SmolLM2's GGUF tokenizer (ChatML); a
  ``.gguf`` path -> its tokenizer; a folder -> its ``tokenizer.json``; "hf:<folder>" -> a
  model folder's tokenizer with its own Jinja chat template (``load_model_tokenizer``)."""
  if name == "byte":
    return tokenizers.ByteTokenizer()
  if name == "words":
    # Not at the top: scenes imports PIL (the [data] extra), which the trainer's module does
    # not need (benchmarks/aot imports it without).
    from gaze_jax.data.scenes import VOCABULARY
    return tokenizers.WordTokenizer(VOCABULARY)
  if name == "gguf:smollm2":
    return tokenizers.load_gguf_tokenizer(find_smollm2_gguf())
  if name.startswith("hf:"):
    return tokenizers.load_model_tokenizer(name[len("hf:"):])
  if name.endswith(".gguf"):
    return tokenizers.load_gguf_tokenizer(name)
  if Path(name).is_dir():
    return tokenizers.load_hf_tokenizer(name)
  raise ValueError(f"config.data.tokenizer={name!r}: use 'byte', 'words', 'gguf:smollm2', a "
                   ".gguf file, a folder with tokenizer.json, 'hf:<model folder>' or 'model'")


def run_tokenizer(run: RunConfig):
  """The tokenizer of a run: ``make_tokenizer(config.data.tokenizer)``, where ``"model"`` is
  the tokenizer and chat template of ``config.model.init``'s Hugging Face folder."""
  name = run.data.tokenizer
  if name != "model":
    return make_tokenizer(name)
  folder = hf_folder(run.init)
  if folder is None:
    raise ValueError("config.data.tokenizer='model' takes the tokenizer of config.model.init's "
                     f"Hugging Face folder, but model.init={run.init!r} is not hf:<folder>")
  return make_tokenizer("hf:" + folder)

"""Tiny random Hugging Face model folders, made here with transformers (no hub), for the tests of
model initialisation, export and the fine-tuning journey."""

from __future__ import annotations

import numpy as np

V = 128
TEXT_KW = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)
VISION_KW = dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=80,
                 num_hidden_layers=3, num_attention_heads=4)


def randomize(model, seed: int) -> None:
  """Replaces transformers' init (zero biases, unit norms, tiny weights) with values of O(1)
  effect, so that a wrongly mapped bias or norm changes the outputs."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      r = torch.randn(p.shape, generator=g)
      if "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.3 * r)
      elif p.ndim == 1 or name.endswith("probe"):
        p.copy_(0.3 * r)
      elif "embed" in name:
        p.copy_(0.5 * r)
      else:
        p.copy_(r / np.sqrt(np.prod(p.shape[1:])))


def save_llava_onevision(path, seed: int = 0, **config):
  """A tiny LLaVA-OneVision (SigLIP 32 px / patch 8, Qwen2 of width 64) saved to ``path``;
  returns the transformers model (float32, eval mode)."""
  import transformers

  kw = dict(text_config=transformers.Qwen2Config(**TEXT_KW).to_dict(),
            vision_config=transformers.SiglipVisionConfig(**VISION_KW).to_dict(),
            vision_feature_layer=-2, image_token_index=V - 1)
  kw.update(config)
  hf = transformers.LlavaOnevisionForConditionalGeneration(transformers.LlavaOnevisionConfig(**kw))
  randomize(hf, seed)
  hf.eval()
  hf.save_pretrained(path)
  return hf


# A closed little world for the journey tests: coloured squares and questions about them.
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}
CORPUS = ["What colour is the square? The square is red. green blue. User: Assistant: "
          "Describe the picture. A blue square on grey.\n"] * 20


def bpe_tokenizer(specials, vocab_size: int = 400, corpus=None):
  """A small byte-level BPE trained here on ``corpus`` (default ``CORPUS``), with ``specials``
  as special tokens."""
  import tokenizers

  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(specials),
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS if corpus is None else corpus, trainer)
  return tok


SMOLVLM_SPECIALS = (["<|endoftext|>", "<|im_start|>", "<end_of_utterance>",
                     "<fake_token_around_image>", "<image>", "<global-img>"] +
                    [f"<row_{i}_col_{j}>" for i in range(1, 5) for j in range(1, 5)])


def save_smolvlm(path, seed: int = 0):
  """A complete tiny SmolVLM folder, as ``save_pretrained`` writes one: the model (48 px tiles,
  patch 8, pixel shuffle 2: 3 x 3 tokens per tile; a Llama decoder of width 64), its
  tokenizer, SmolVLM's chat template and image processor (longest edge 96: up to 2 x 2 tiles).
  Returns the transformers model (float32, eval mode)."""
  import transformers
  from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
  from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

  path = str(path)
  tok = bpe_tokenizer(SMOLVLM_SPECIALS)
  _mkdir(path)
  tok.save(f"{path}/tokenizer.json")
  fast = transformers.PreTrainedTokenizerFast(tokenizer_file=f"{path}/tokenizer.json",
                                              bos_token="<|im_start|>",
                                              eos_token="<end_of_utterance>",
                                              pad_token="<|endoftext|>")
  images = SmolVLMImageProcessorPil(size={"longest_edge": 96},
                                    max_image_size={"longest_edge": 48})
  proc = transformers.Idefics3Processor(image_processor=images, tokenizer=fast, image_seq_len=9,
                                        chat_template=DEFAULT_CHAT_TEMPLATE)
  proc.save_pretrained(path)
  text = dict(model_type="llama", vocab_size=tok.get_vocab_size(), hidden_size=64,
              intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5,
              rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
  vision = dict(image_size=48, patch_size=8, hidden_size=32, intermediate_size=56,
                num_hidden_layers=2, num_attention_heads=4)
  cfg = transformers.SmolVLMConfig(text_config=text, vision_config=vision, scale_factor=2,
                                   image_token_id=tok.token_to_id("<image>"))
  hf = transformers.SmolVLMForConditionalGeneration(cfg)
  randomize(hf, seed)
  hf.eval()
  hf.save_pretrained(path)
  return hf


def _mkdir(path) -> None:
  import os
  os.makedirs(path, exist_ok=True)


def write_llava_json(folder, n: int, seed: int = 0, size: int = 64, validation: int = 8) -> dict:
  """``n`` LLaVA-format records about a coloured square on grey (``size`` px PNGs), split
  into train and ``validation`` records: ``{"json_files": {split: path}, "image_dir"}``, the
  ``data.builder_overrides`` of a ``llava_json`` run."""
  import json
  import os

  from PIL import Image as PILImage

  rng = np.random.default_rng(seed)
  images = os.path.join(str(folder), "images")
  os.makedirs(images, exist_ok=True)
  records = []
  for i in range(n):
    name = list(COLOURS)[i % len(COLOURS)]
    im = np.full((size, size, 3), 128, np.uint8)
    y, x = rng.integers(0, size // 2, 2)
    im[y:y + size // 2, x:x + size // 2] = COLOURS[name]
    PILImage.fromarray(im).save(os.path.join(images, f"{i}.png"))
    records.append({"id": f"sq{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the square?"},
        {"from": "gpt", "value": f"The square is {name}."}]})
  files = {}
  for split, recs in (("train", records[:-validation]), ("validation", records[-validation:])):
    files[split] = os.path.join(str(folder), f"{split}.json")
    with open(files[split], "w") as f:
      json.dump(recs, f)
  return {"json_files": files, "image_dir": images}


def fine_tuned(plan, seed: int, scale: float = 0.05):
  """Our model of ``plan`` (``convert.hf.build_planned``) with every weight changed by
  ``scale`` x N(0, 1) noise, as fine-tuning would change it (an export test must then see our
  weights, not the source's)."""
  from gaze_jax.convert.hf import build_planned
  from gaze_jax.convert.mapping import param_paths

  model = build_planned(plan, seed=seed)
  rng = np.random.default_rng(0)
  for var in param_paths(model).values():
    x = np.asarray(var.get_value())
    var.set_value(x + scale * rng.normal(size=x.shape).astype(np.float32))
  return model

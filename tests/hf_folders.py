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

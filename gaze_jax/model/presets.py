"""Named model shapes: a CPU-sized ``tiny`` model and the real shapes of the models the paper
and our parity tests use. Each preset is a function returning an ``MLLMConfig``; look them up
with ``get_preset(name)``.

Where the numbers come from (the published ``config.json`` of each checkpoint):
- SmolLM2-135M (HuggingFaceTB): Llama, 30 layers, 9 / 3 heads, head_dim 64, hidden 576, FFN
  1536, vocab 49152, theta 1e5, eps 1e-5, tied (also checked against its GGUF file).
- SigLIP2-So400m/16-384 (google/siglip2-so400m-patch16-384): hidden 1152, MLP 4304, 27 layers,
  16 heads, 24 x 24 patches.
- SigLIP-So400m/14-384 as LLaVA-OneVision uses it: the last block is dropped (26 layers) and the
  features are ``hidden_states[-1]`` without the post-LayerNorm; 27 x 27 patches.
- Qwen3-4B, Qwen2.5-7B, Qwen2-0.5B (Qwen): see each function.
- Qwen2.5-VL-3B / 7B-Instruct, Qwen3-VL-4B / 8B-Instruct (Qwen): the ``text_config`` numbers in
  each function; the vision towers are ``gaze_jax.model.qwen_vision``'s presets. Their visual
  grids vary with the processor's buckets: 2 x 2 regions by default (a 448 x 448 image at
  Qwen2.5-VL's 28 px per token is 16 x 16 tokens, Qwen3-VL's 32 px 14 x 14); choose the region
  shape for the buckets of a run.

The gaze settings follow docs/method.md: 4 context tokens, K = 4 regions, the grid cut 4 x 4 into
regions (6 x 6 on 24 x 24; 7 x 7 on 27 x 27, the last row/column of regions padded).

The presets of 0.5B parameters and more scan their decoder layers (``scan_layers``: the layer
compiles once); ``tiny`` and ``smollm2_135m`` (CPU / one-GPU runs) loop.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from gaze_jax.model import qwen_vision
from gaze_jax.model.config import DecoderConfig, GazeConfig, MLLMConfig, VisionConfig


def _siglip2_so400m_16_384() -> VisionConfig:
  """SigLIP2-So400m/16 at 384 px: 24 x 24 patches, last block + post-LayerNorm
  (``last_hidden_state``; the feature choice is ours, the paper does not say)."""
  return VisionConfig(image_size=384, patch_size=16, num_channels=3, hidden_size=1152,
                      intermediate_size=4304, num_layers=27, num_heads=16, layer_norm_eps=1e-6,
                      feature_layer=-1, post_layernorm=True, video_pool=2)


def tiny() -> MLLMConfig:
  """CPU-sized model for tests and the demo: 64 px images, patch 8 (8 x 8 grid, 2 x 2 regions,
  16 regions per image), a 2-layer ViT and a 2-layer GQA decoder (4 query / 2 KV heads)."""
  return MLLMConfig(
      vision=VisionConfig(image_size=64, patch_size=8, num_channels=3, hidden_size=64,
                          intermediate_size=128, num_layers=2, num_heads=4, layer_norm_eps=1e-6,
                          feature_layer=-1, post_layernorm=True, video_pool=2),
      decoder=DecoderConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                            rms_norm_eps=1e-6, qkv_bias=False, qk_norm=False,
                            tie_embeddings=False),
      gaze=GazeConfig(attention="gaze", top_k=4, region_shape=(2, 2), num_ctx=4))


def smollm2_135m() -> MLLMConfig:
  """SmolLM2-135M (the real LM, 134.5M parameters) with a small ViT-S/16 at 384 px
  (24 x 24 patches, 12 layers, hidden 384, 6 heads; about 21.6M parameters)."""
  return MLLMConfig(
      vision=VisionConfig(image_size=384, patch_size=16, num_channels=3, hidden_size=384,
                          intermediate_size=1536, num_layers=12, num_heads=6,
                          layer_norm_eps=1e-6, feature_layer=-1, post_layernorm=True,
                          video_pool=2),
      decoder=DecoderConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                            num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                            rope_theta=100000.0, rms_norm_eps=1e-5, qkv_bias=False,
                            qk_norm=False, tie_embeddings=True),
      gaze=GazeConfig(attention="gaze", top_k=4, region_shape=(6, 6), num_ctx=4))


def cambrian_4b() -> MLLMConfig:
  """The paper's Cambrian-4B shape: SigLIP2-So400m/16-384 + Qwen3-4B (q/k norm, tied
  embeddings; 4.02B LM parameters), 6 x 6 regions, K = 4, 4 context tokens."""
  return MLLMConfig(
      vision=_siglip2_so400m_16_384(),
      decoder=DecoderConfig(vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                            num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                            rope_theta=1000000.0, rms_norm_eps=1e-6, qkv_bias=False,
                            qk_norm=True, tie_embeddings=True, scan_layers=True),
      gaze=GazeConfig(attention="gaze", top_k=4, region_shape=(6, 6), num_ctx=4))


def qwen2_5_7b() -> MLLMConfig:
  """SigLIP2-So400m/16-384 + Qwen2.5-7B (qkv bias, untied LM head; 7.62B LM parameters)."""
  return MLLMConfig(
      vision=_siglip2_so400m_16_384(),
      decoder=DecoderConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                            num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                            rope_theta=1000000.0, rms_norm_eps=1e-6, qkv_bias=True,
                            qk_norm=False, tie_embeddings=False, scan_layers=True),
      gaze=GazeConfig(attention="gaze", top_k=4, region_shape=(6, 6), num_ctx=4))


def llava_onevision_0_5b() -> MLLMConfig:
  """LLaVA-OneVision-0.5B: SigLIP-So400m/14-384 (27 x 27 patches, 26 blocks, features without
  post-LayerNorm) + Qwen2-0.5B (qkv bias, tied; vocab 152000 as in the llava-hf checkpoint).
  7 x 7 regions cut the 27 x 27 grid 4 x 4 (the last region row/column is padded)."""
  return MLLMConfig(
      vision=VisionConfig(image_size=384, patch_size=14, num_channels=3, hidden_size=1152,
                          intermediate_size=4304, num_layers=26, num_heads=16,
                          layer_norm_eps=1e-6, feature_layer=-1, post_layernorm=False,
                          video_pool=2),
      decoder=DecoderConfig(vocab_size=152000, hidden_size=896, intermediate_size=4864,
                            num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                            rope_theta=1000000.0, rms_norm_eps=1e-6, qkv_bias=True,
                            qk_norm=False, tie_embeddings=True, scan_layers=True),
      gaze=GazeConfig(attention="gaze", top_k=4, region_shape=(7, 7), num_ctx=4))


def _qwen_vl(vision_preset: str, **decoder) -> MLLMConfig:
  qwen3 = vision_preset.startswith("qwen3")
  dec = DecoderConfig(vocab_size=151936, num_heads=decoder.pop("num_heads", None) or 32,
                      head_dim=128, rms_norm_eps=1e-6, qkv_bias=not qwen3, qk_norm=qwen3,
                      mrope_section=(24, 20, 20) if qwen3 else (16, 24, 24),
                      mrope_interleaved=qwen3, scan_layers=True, **decoder)
  return MLLMConfig(decoder=dec, qwen_vision=qwen_vision.PRESETS[vision_preset],
                    gaze=GazeConfig(attention="gaze", top_k=4, region_shape=(2, 2), num_ctx=4))


def qwen2_5_vl_3b() -> MLLMConfig:
  """Qwen2.5-VL-3B-Instruct: its ViT (32 blocks, window attention) + Qwen2.5-3B with M-RoPE
  [16, 24, 24] (36 layers, hidden 2048, FFN 11008, 16 / 2 heads, theta 1e6, tied)."""
  return _qwen_vl("qwen2_5_vl_3b", hidden_size=2048, intermediate_size=11008, num_layers=36,
                  num_heads=16, num_kv_heads=2, rope_theta=1000000.0, tie_embeddings=True)


def qwen2_5_vl_7b() -> MLLMConfig:
  """Qwen2.5-VL-7B-Instruct: its ViT + Qwen2.5-7B with M-RoPE [16, 24, 24] (28 layers, hidden
  3584, FFN 18944, 28 / 4 heads, vocab 152064, theta 1e6, untied)."""
  cfg = _qwen_vl("qwen2_5_vl_7b", hidden_size=3584, intermediate_size=18944, num_layers=28,
                 num_heads=28, num_kv_heads=4, rope_theta=1000000.0, tie_embeddings=False)
  return dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, vocab_size=152064))


def qwen3_vl_4b() -> MLLMConfig:
  """Qwen3-VL-4B-Instruct: its SigLIP2-like ViT (24 blocks, DeepStack at 5, 11, 17) + Qwen3-4B
  with interleaved M-RoPE [24, 20, 20] (36 layers, hidden 2560, FFN 9728, 32 / 8 heads, head_dim
  128, theta 5e6, tied)."""
  return _qwen_vl("qwen3_vl_4b", hidden_size=2560, intermediate_size=9728, num_layers=36,
                  num_heads=32, num_kv_heads=8, rope_theta=5000000.0, tie_embeddings=True)


def qwen3_vl_8b() -> MLLMConfig:
  """Qwen3-VL-8B-Instruct: its ViT (27 blocks, DeepStack at 8, 16, 24) + Qwen3-8B with
  interleaved M-RoPE [24, 20, 20] (36 layers, hidden 4096, FFN 12288, 32 / 8 heads, theta 5e6,
  untied)."""
  return _qwen_vl("qwen3_vl_8b", hidden_size=4096, intermediate_size=12288, num_layers=36,
                  num_heads=32, num_kv_heads=8, rope_theta=5000000.0, tie_embeddings=False)


PRESETS: dict[str, Callable[[], MLLMConfig]] = {
    "tiny": tiny,
    "smollm2_135m": smollm2_135m,
    "cambrian_4b": cambrian_4b,
    "qwen2_5_7b": qwen2_5_7b,
    "llava_onevision_0_5b": llava_onevision_0_5b,
    "qwen2_5_vl_3b": qwen2_5_vl_3b,
    "qwen2_5_vl_7b": qwen2_5_vl_7b,
    "qwen3_vl_4b": qwen3_vl_4b,
    "qwen3_vl_8b": qwen3_vl_8b,
}


def get_preset(name: str) -> MLLMConfig:
  """The ``MLLMConfig`` of preset ``name``; ValueError listing the known names otherwise.
  Customise a preset with ``dataclasses.replace`` (e.g. ``gaze=GazeConfig(attention="dense")``)."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known presets: "
                     f"{', '.join(sorted(PRESETS))}")
  return PRESETS[name]()

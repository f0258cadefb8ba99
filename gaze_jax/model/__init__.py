"""Flax NNX models: vision tower, projector, Llama/Qwen2/Qwen3 decoder with dense or gaze
attention, and the multimodal LLM that assembles them."""

from gaze_jax.model.attention import Attention, LayerCache, dense_attention
from gaze_jax.model.config import (DecoderConfig, GazeConfig, MLLMConfig, RopeScaling,
                                   VisionConfig)
from gaze_jax.model.decoder import Decoder
from gaze_jax.model.mllm import MLLM, pack_images
from gaze_jax.model.vision import Projector, VisionTower
from gaze_jax.model.generate import GenerateOutput, generate
from gaze_jax.model.presets import PRESETS, get_preset

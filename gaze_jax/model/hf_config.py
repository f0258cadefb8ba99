"""Hugging Face ``config.json`` (as a dict) -> our DecoderConfig / VisionConfig.

Reads plain JSON, so transformers is not needed. Fields a config.json leaves out take
transformers' defaults for that ``model_type``. RoPE is the default or Llama 3.1's
``rope_type="llama3"`` scaling. Anything we do not implement (another architecture, another
RoPE scaling, sliding windows, biases on o_proj, another activation) raises a
ValueError that names the field, instead of loading a model that silently computes something
else.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from gaze_jax.model.config import DecoderConfig, RopeScaling, VisionConfig

DECODER_TYPES = ("llama", "qwen2", "qwen3")
VISION_TYPES = ("siglip_vision_model",)

# transformers' defaults for fields a config.json may omit.
_DECODER_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-6,
                  rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu",
                  tie_word_embeddings=False),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  head_dim=128, rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu",
                  tie_word_embeddings=False),
}
_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
# LlavaOnevisionConfig's vision tower when its config.json gives none (SigLIP So400m/14).
_LLAVA_OV_VISION = dict(model_type="siglip_vision_model", hidden_size=1152,
                        intermediate_size=4304, patch_size=14, image_size=384,
                        num_hidden_layers=26, num_attention_heads=16, vision_use_head=False)


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")


def _llama3_scaling(p: Mapping[str, Any], where: str) -> RopeScaling:
  """Llama 3.1 RoPE scaling from a ``rope_parameters`` / ``rope_scaling`` dict; every field
  must be given (transformers requires them too)."""
  missing = [k for k in _LLAMA3_KEYS if p.get(k) is None]
  if missing:
    raise ValueError(f"{where}: rope_type='llama3' needs {', '.join(missing)}")
  try:
    return RopeScaling(factor=float(p["factor"]), low_freq_factor=float(p["low_freq_factor"]),
                       high_freq_factor=float(p["high_freq_factor"]),
                       original_max_position_embeddings=int(
                           p["original_max_position_embeddings"]))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: {e}") from None


def _rope(cfg: Mapping[str, Any], where: str,
          default: float) -> tuple[float, Optional[RopeScaling]]:
  """RoPE base and scaling from ``rope_parameters`` (transformers 5) or ``rope_theta`` /
  ``rope_scaling`` (transformers 4); the default (unscaled) RoPE and Llama 3.1's
  ``rope_type="llama3"`` are supported."""
  params = cfg.get("rope_parameters")
  if isinstance(params, Mapping) and params and all(isinstance(v, Mapping)
                                                    for v in params.values()):
    # Per-layer-type parameters ({"full_attention": {...}, ...}): one type only.
    if set(params) != {"full_attention"}:
      raise ValueError(f"{where}: rope_parameters per layer type {sorted(params)} are not "
                       "supported (only full attention)")
    params = params["full_attention"]
  scaling = cfg.get("rope_scaling")
  found = []
  for name, p in (("rope_parameters", params), ("rope_scaling", scaling)):
    if p is None:
      continue
    if not isinstance(p, Mapping):
      raise ValueError(f"{where}: {name} must be an object, got {p!r}")
    if p.get("partial_rotary_factor", 1.0) != 1.0:
      raise ValueError(f"{where}: {name}.partial_rotary_factor="
                       f"{p['partial_rotary_factor']} is not supported")
    kind = p.get("rope_type", p.get("type", "default"))
    if kind == "llama3":
      found.append(_llama3_scaling(p, f"{where}: {name}"))
    elif kind != "default":
      raise ValueError(f"{where}: {name}.rope_type={kind!r} is not supported (only 'default', "
                       "unscaled RoPE, and 'llama3')")
  if len(set(found)) > 1:
    raise ValueError(f"{where}: rope_parameters and rope_scaling give different llama3 "
                     f"scalings: {found}")
  if cfg.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"{where}: partial_rotary_factor={cfg['partial_rotary_factor']} is not "
                     "supported")
  theta = (params or {}).get("rope_theta")
  if theta is None:
    theta = cfg.get("rope_theta")
  return float(default if theta is None else theta), (found[0] if found else None)


def decoder_config_from_hf(cfg: Mapping[str, Any]) -> DecoderConfig:
  """A Llama / Qwen2 / Qwen3 ``config.json`` dict (or a LLaVA ``text_config``) ->
  DecoderConfig: Qwen2 gets ``qkv_bias``, Qwen3 ``qk_norm``.

  Raises ValueError for another ``model_type`` or a feature we do not implement.
  """
  mt = cfg.get("model_type")
  if mt not in DECODER_TYPES:
    raise ValueError(f"model_type={mt!r} is not a supported decoder (supported: "
                     f"{', '.join(DECODER_TYPES)}; LLaVA-OneVision: load_llava_onevision)")
  where = f"{mt} config"
  c = dict(_DECODER_DEFAULTS[mt])
  c.update({k: v for k, v in cfg.items() if v is not None})
  if c["hidden_act"] != "silu":
    raise ValueError(f"{where}: hidden_act={c['hidden_act']!r} is not supported (only 'silu')")
  if c.get("mlp_bias"):
    raise ValueError(f"{where}: mlp_bias=true is not supported")
  if mt in ("llama", "qwen3") and c.get("attention_bias"):
    raise ValueError(f"{where}: attention_bias=true (a bias on o_proj too) is not supported")
  if c.get("use_sliding_window") or any(t != "full_attention" for t in c.get("layer_types") or ()):
    raise ValueError(f"{where}: sliding-window attention (use_sliding_window / layer_types) is "
                     "not supported")
  heads = int(c["num_attention_heads"])
  kv = c.get("num_key_value_heads")
  # An explicit null head_dim means hidden_size / num_attention_heads, not the default.
  head_dim = cfg["head_dim"] if "head_dim" in cfg else c.get("head_dim")
  theta, scaling = _rope(cfg, where, c["rope_theta"])
  return DecoderConfig(
      vocab_size=int(c["vocab_size"]),
      hidden_size=int(c["hidden_size"]),
      intermediate_size=int(c["intermediate_size"]),
      num_layers=int(c["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=int(heads if kv is None else kv),
      head_dim=None if head_dim is None else int(head_dim),
      rope_theta=theta,
      rope_scaling=scaling,
      rms_norm_eps=float(c["rms_norm_eps"]),
      qkv_bias=(mt == "qwen2"),
      qk_norm=(mt == "qwen3"),
      tie_embeddings=bool(c["tie_word_embeddings"]),
  )


# Qwen-VL model_type -> (the decoder its text_config is, M-RoPE interleaved, transformers'
# default mrope_section, default rope_theta of its text config class).
QWEN_VL_TEXT = {"qwen2_5_vl": ("qwen2", False, (16, 24, 24), 1000000.0),
                "qwen3_vl": ("qwen3", True, (24, 20, 20), 500000.0)}
# transformers' text config defaults (Qwen2_5_VLTextConfig, Qwen3VLTextConfig) that differ from
# the plain decoders'.
_QWEN_VL_TEXT_DEFAULTS = {
    "qwen2_5_vl": dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       rms_norm_eps=1e-5),
    "qwen3_vl": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     head_dim=128, rms_norm_eps=1e-6),
}


def qwen_vl_decoder_config(cfg: Mapping[str, Any], where: str = "config.json") -> DecoderConfig:
  """The decoder of a ``qwen2_5_vl`` / ``qwen3_vl`` config (its ``text_config``): Qwen2 (qkv
  bias) / Qwen3 (q/k norm) with M-RoPE, ``mrope_section`` from ``rope_parameters`` (or the
  legacy ``rope_scaling``; transformers' defaults [16, 24, 24] / [24, 20, 20] otherwise),
  interleaved for Qwen3-VL (its rotary always interleaves). The LM head is tied when the
  top-level ``tie_word_embeddings`` (or, for configs saved before transformers 5, the text
  config's) says so. Raises ValueError naming ``where`` and the key otherwise."""
  mt = cfg.get("model_type")
  if mt not in QWEN_VL_TEXT:
    raise ValueError(f"{where}: model_type={mt!r}, expected one of "
                     f"{', '.join(map(repr, QWEN_VL_TEXT))}")
  base, interleaved, default_section, default_theta = QWEN_VL_TEXT[mt]
  text = cfg.get("text_config")
  if text is None:                # the flat configs of older checkpoints
    text = {k: v for k, v in cfg.items() if k not in ("vision_config", "model_type")}
  if not isinstance(text, Mapping):
    raise ValueError(f"{where}: text_config must be an object, got {text!r}")
  text = {**_QWEN_VL_TEXT_DEFAULTS[mt], **{k: v for k, v in text.items() if v is not None}}
  tw = f"{where}: text_config"
  rope = None
  for key in ("rope_parameters", "rope_scaling"):
    p = text.get(key)
    if p is None:
      continue
    if not isinstance(p, Mapping):
      raise ValueError(f"{tw}.{key} must be an object, got {p!r}")
    p = dict(p)
    section = p.pop("mrope_section", None)
    p.pop("mrope_interleaved", None)          # Qwen3-VL interleaves whatever it says
    if p.get("rope_type", p.get("type")) == "mrope":
      p.pop("type", None)
      p["rope_type"] = "default"
    text[key] = p
    if section is not None:
      rope = section
  text["model_type"] = base
  if "rope_theta" not in (text.get("rope_parameters") or {}) and text.get("rope_theta") is None:
    text["rope_theta"] = default_theta
  text["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings") or
                                     text.get("tie_word_embeddings"))
  try:
    dec = decoder_config_from_hf(text)
    return dataclasses.replace(dec, mrope_section=tuple(rope or default_section),
                               mrope_interleaved=interleaved)
  except ValueError as e:
    raise ValueError(f"{tw}: {e}") from None


def siglip_vision_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """The SigLIP vision part of a config: the config itself (``siglip_vision_model``) or the
  ``vision_config`` of a ``siglip`` or ``llava_onevision`` config."""
  mt = cfg.get("model_type")
  if mt in VISION_TYPES:
    return dict(cfg)
  if mt in ("siglip", "llava_onevision"):
    vc = cfg.get("vision_config")
    if vc is None:
      if mt == "siglip":
        return {"model_type": "siglip_vision_model"}
      return dict(_LLAVA_OV_VISION)
    if vc.get("model_type", "siglip_vision_model") not in VISION_TYPES:
      raise ValueError(f"{mt} config: vision_config.model_type={vc.get('model_type')!r} is not "
                       f"supported (only {', '.join(VISION_TYPES)})")
    return {"model_type": "siglip_vision_model", **vc}
  raise ValueError(f"model_type={mt!r} is not a supported vision tower (supported: "
                   f"{', '.join(VISION_TYPES)}, or the vision_config of siglip / llava_onevision)")


def vision_config_from_hf(cfg: Mapping[str, Any], *, feature_layer: int = -1,
                          post_layernorm: bool = True) -> VisionConfig:
  """A SigLIP vision config (or a config holding one, see ``siglip_vision_dict``) ->
  VisionConfig with the given feature layer and final-LayerNorm choice."""
  c = dict(_SIGLIP_DEFAULTS)
  c.update({k: v for k, v in siglip_vision_dict(cfg).items() if v is not None})
  if c["hidden_act"] != "gelu_pytorch_tanh":
    raise ValueError(f"SigLIP vision config: hidden_act={c['hidden_act']!r} is not supported "
                     "(only 'gelu_pytorch_tanh')")
  return VisionConfig(
      image_size=int(c["image_size"]),
      patch_size=int(c["patch_size"]),
      num_channels=int(c["num_channels"]),
      hidden_size=int(c["hidden_size"]),
      intermediate_size=int(c["intermediate_size"]),
      num_layers=int(c["num_hidden_layers"]),
      num_heads=int(c["num_attention_heads"]),
      layer_norm_eps=float(c["layer_norm_eps"]),
      feature_layer=int(feature_layer),
      post_layernorm=bool(post_layernorm),
  )


def llava_onevision_configs(cfg: Mapping[str, Any]) -> tuple[DecoderConfig, VisionConfig]:
  """A ``llava_onevision`` config -> (decoder, vision) configs.

  The vision features are ``hidden_states[vision_feature_layer]`` without the final LayerNorm,
  all patches (``vision_feature_select_strategy='full'``), as LLaVA-OneVision computes them;
  video frames are pooled to ``ceil(g / 2)`` per side by bilinear interpolation, as its
  ``apply_pooling``.
  """
  mt = cfg.get("model_type")
  if mt != "llava_onevision":
    raise ValueError(f"model_type={mt!r} is not 'llava_onevision'")
  where = "llava_onevision config"
  layer = cfg.get("vision_feature_layer", -1)
  if isinstance(layer, bool) or not isinstance(layer, int):
    raise ValueError(f"{where}: vision_feature_layer={layer!r} is not supported (only one int "
                     "layer, not a list)")
  strategy = cfg.get("vision_feature_select_strategy", "full")
  if strategy != "full":
    raise ValueError(f"{where}: vision_feature_select_strategy={strategy!r} is not supported "
                     "(SigLIP has no CLS token to drop: only 'full')")
  act = cfg.get("projector_hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"{where}: projector_hidden_act={act!r} is not supported (only 'gelu')")
  if not cfg.get("multimodal_projector_bias", True):
    raise ValueError(f"{where}: multimodal_projector_bias=false is not supported")
  text = dict(cfg.get("text_config") or {"model_type": "qwen2"})
  text.setdefault("model_type", "qwen2")
  # transformers moves a text_config tie_word_embeddings=true to the top level, and ties then.
  text["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings") or
                                     text.get("tie_word_embeddings"))
  decoder = decoder_config_from_hf(text)
  vision = dataclasses.replace(vision_config_from_hf(cfg, feature_layer=layer,
                                                     post_layernorm=False),
                               video_pool=2, video_pool_mode="bilinear")
  return decoder, vision


# transformers' LlavaOnevisionConfig defaults.
_LLAVA_OV_MEDIA = {"image": 151646, "video": 151647}


def llava_onevision_token_ids(cfg: Mapping[str, Any]) -> dict[str, int]:
  """``{"image": id, "video": id}`` of a ``llava_onevision`` config: ``image_token_index`` /
  ``video_token_index``, or their ``*_token_id`` aliases, else transformers' defaults."""
  out = {}
  for media, default in _LLAVA_OV_MEDIA.items():
    v = cfg.get(f"{media}_token_index", cfg.get(f"{media}_token_id"))
    v = default if v is None else v
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise ValueError(f"llava_onevision config: {media}_token_index={v!r} is not a token id")
    out[media] = v
  return out


def llava_onevision_media_ids(cfg: Mapping[str, Any], vocab_size: int) -> tuple[int, ...]:
  """The image and video token ids (``llava_onevision_token_ids``) inside the vocabulary: an
  id outside it can never be a token (a small test model may keep the default video id of a
  152K vocabulary)."""
  return tuple(v for v in llava_onevision_token_ids(cfg).values() if v < vocab_size)

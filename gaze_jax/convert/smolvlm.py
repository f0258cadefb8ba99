"""SmolVLM / Idefics3 ``save_pretrained`` folders -> our ``MLLM``.

Both families (``model_type`` ``smolvlm`` and ``idefics3``) are one architecture: a SigLIP-like
vision tower (``model.vision_model.``), the pixel-shuffle connector (``model.connector.``: each
``scale_factor x scale_factor`` block of patches concatenated into one token, then a bias-free
linear layer) and a Llama decoder (``model.text_model.``, SmolLM2 for SmolVLM). They become an
``MLLM`` with ``projector="pixel_shuffle"``.

How the vision tower differs from SigLIP's, and what we do about it:
  - positions: the learned ``grid x grid`` table is indexed by fractional-coordinate buckets
    (``VisionConfig.pos_resize="buckets"``), not resized bicubically; at the native size this
    is raster order for most grids, but not all (e.g. 25 x 25);
  - the features are the last block's output through the final LayerNorm, always
    (``feature_layer=-1``, ``post_layernorm=True``); there is no pooling head;
  - the activation is ``gelu_pytorch_tanh``, as ours; another is refused.
Images reach the tower as the processor's tiles (``gaze_jax.data.smolvlm``), each at the tower's
native size, so no padding mask is needed. Video frames are whole images at the full grid
(``video_pool=1``).

Fields transformers reads are checked; an unsupported value raises a ValueError naming
``config.json`` and the key. Fields transformers ignores (legacy keys of older checkpoints) are
ignored here too.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from gaze_jax.convert import hf
from gaze_jax.convert.hf import DENSE_TEXT, LoadPlan, decoder_rules, find_prefix, vision_rules
from gaze_jax.model.hf_config import decoder_config_from_hf
from gaze_jax.convert.hf_io import PathLike, load_safetensors, read_hf_config
from gaze_jax.convert.mapping import Rule, WeightMap, linear
from gaze_jax.model.config import DecoderConfig, GazeConfig, MLLMConfig, VisionConfig

__all__ = ["FAMILIES", "smolvlm_configs", "connector_rules", "plan_smolvlm", "load_smolvlm"]

# model_type -> the model_type of its vision_config.
FAMILIES = {"smolvlm": "smolvlm_vision", "idefics3": "idefics3_vision"}
# transformers' defaults (SmolVLMVisionConfig = Idefics3VisionConfig) for omitted fields.
_VISION_DEFAULTS = dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=16, num_channels=3, image_size=224, patch_size=32,
                        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
# The text config when config.json gives none: a Llama with rms_norm_eps 1e-5.
_TEXT_DEFAULT = {"model_type": "llama", "rms_norm_eps": 1e-5}
_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_channels", "image_size", "patch_size")


def _int_field(c: Mapping[str, Any], key: str, where: str) -> int:
  """``c[key]`` as a positive int; ``where`` names the object (``...: vision_config``)."""
  v = c[key]
  if isinstance(v, bool) or not isinstance(v, int) or v < 1:
    # transformers' type allows [h, w] pairs, but its embeddings compute one grid side.
    raise ValueError(f"{where}.{key}={v!r} is not supported (a positive int)")
  return v


def _vision_config(cfg: Mapping[str, Any], where: str) -> VisionConfig:
  mt = cfg.get("model_type")
  vc = cfg.get("vision_config") or {}
  if not isinstance(vc, Mapping):
    raise ValueError(f"{where}: vision_config must be an object, got {vc!r}")
  vmt = vc.get("model_type", FAMILIES[mt])
  if vmt not in FAMILIES.values():
    raise ValueError(f"{where}: vision_config.model_type={vmt!r} is not supported (only "
                     f"{', '.join(map(repr, FAMILIES.values()))})")
  c = dict(_VISION_DEFAULTS)
  c.update({k: v for k, v in vc.items() if v is not None})
  vw = f"{where}: vision_config"
  if c["hidden_act"] != "gelu_pytorch_tanh":
    raise ValueError(f"{vw}.hidden_act={c['hidden_act']!r} is not supported (only "
                     "'gelu_pytorch_tanh')")
  ints = {k: _int_field(c, k, vw) for k in _INTS}
  if ints["hidden_size"] % ints["num_attention_heads"]:
    raise ValueError(f"{vw}.hidden_size={ints['hidden_size']} is not divisible by "
                     f"num_attention_heads={ints['num_attention_heads']}")
  return VisionConfig(
      image_size=ints["image_size"], patch_size=ints["patch_size"],
      num_channels=ints["num_channels"], hidden_size=ints["hidden_size"],
      intermediate_size=ints["intermediate_size"], num_layers=ints["num_hidden_layers"],
      num_heads=ints["num_attention_heads"], layer_norm_eps=float(c["layer_norm_eps"]),
      feature_layer=-1, post_layernorm=True, video_pool=1, pos_resize="buckets")


def smolvlm_configs(cfg: Mapping[str, Any], where: str = "config.json"
                    ) -> tuple[DecoderConfig, VisionConfig, int]:
  """A ``smolvlm`` / ``idefics3`` config dict -> (decoder, vision, scale factor).

  The LM head is tied when the top-level ``tie_word_embeddings`` says so (the text config's own
  flag does not count, as in transformers 5). Raises ValueError naming ``where`` and the key
  for a field we do not support.
  """
  mt = cfg.get("model_type")
  if mt not in FAMILIES:
    raise ValueError(f"{where}: model_type={mt!r}, expected one of "
                     f"{', '.join(map(repr, FAMILIES))}")
  scale = cfg.get("scale_factor", 2)
  if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
    raise ValueError(f"{where}: scale_factor={scale!r} is not supported (a positive int)")
  vision = _vision_config(cfg, where)
  if vision.grid % scale:
    raise ValueError(f"{where}: scale_factor={scale} does not divide the vision tower's "
                     f"{vision.grid}x{vision.grid} patch grid (vision_config.image_size="
                     f"{vision.image_size} / patch_size={vision.patch_size})")
  text = cfg.get("text_config")
  text = dict(_TEXT_DEFAULT if text is None else text)
  text.setdefault("model_type", "llama")
  text["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
  try:
    decoder = decoder_config_from_hf(text)
  except ValueError as e:
    raise ValueError(f"{where}: text_config: {e}") from None
  return decoder, vision, scale


def connector_rules(prefix: str) -> list[Rule]:
  """The pixel-shuffle connector: our ``projector.proj.kernel`` <- ``{prefix}modality_projection
  .proj.weight`` (prefix e.g. ``"model.connector."``)."""
  return [Rule("projector.proj.kernel", f"{prefix}modality_projection.proj.weight", linear)]


def plan_smolvlm(model_dir: PathLike, gaze: GazeConfig = DENSE_TEXT, *, dtype: str = "float32",
                 param_dtype: str = "float32") -> LoadPlan:
  """The ``LoadPlan`` of a SmolVLM / Idefics3 directory (read from ``config.json`` and the
  safetensors headers; no weight is read)."""
  where = os.fspath(model_dir)
  dcfg, vcfg, scale = smolvlm_configs(read_hf_config(model_dir),
                                      os.path.join(where, "config.json"))
  tensors = load_safetensors(model_dir)
  dropped = hf._drop_buffers(tensors)
  dp = find_prefix(tensors, "embed_tokens.weight", "language model", where)
  vp = find_prefix(tensors, "embeddings.patch_embedding.weight", "vision tower", where)
  cp = find_prefix(tensors, "modality_projection.proj.weight", "pixel-shuffle connector", where)
  head = hf._find_optional(tensors, "lm_head.weight", where)
  dcfg = hf._tie_or_untie(dcfg, tensors, dp + "embed_tokens.weight", head, where)
  cfg = MLLMConfig(decoder=dcfg, vision=vcfg, gaze=gaze, projector="pixel_shuffle",
                   scale_factor=scale, dtype=dtype, param_dtype=param_dtype)
  rules = (decoder_rules(dcfg, dp, head) + vision_rules(vcfg, vp, ours="vision.") +
           connector_rules(cp))
  allow = hf._vision_unused(vcfg, vp)
  allow += [head] if (dcfg.tie_embeddings and head) else []
  weights = WeightMap(tuple(rules), {"decoder": dcfg.num_layers, "vision": vcfg.num_blocks},
                      tuple(allow), hf._fresh(gaze))
  return LoadPlan(cfg, weights, tensors, tuple(dropped), where)


def load_smolvlm(model_dir: PathLike, gaze: GazeConfig = DENSE_TEXT, *, dtype: str = "float32",
                 param_dtype: str = "float32", seed: int = 0, return_unused: bool = False,
                 allow_nonfinite: bool = False):
  """A SmolVLM / Idefics3 directory -> ``MLLM`` (SmolVLM vision tower, pixel-shuffle connector,
  Llama decoder).

  Context tokens (``gaze.num_ctx > 0``) are new parameters and keep their random
  initialisation (``seed``). Weights holding NaN or Inf raise a ValueError naming the tensor,
  unless ``allow_nonfinite``. Returns the MLLM, or ``(MLLM, unused keys)`` with
  ``return_unused``.

  Raises:
    ValueError: an unsupported config field (naming ``config.json`` and the key), a missing or
      wrongly shaped tensor (naming it), an unexpected one.
  """
  plan = plan_smolvlm(model_dir, gaze, dtype=dtype, param_dtype=param_dtype)
  return hf.build_planned(plan, seed=seed, return_unused=return_unused,
                          allow_nonfinite=allow_nonfinite)

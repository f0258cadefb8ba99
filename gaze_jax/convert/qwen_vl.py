"""Qwen2.5-VL / Qwen3-VL vision towers: ``config.json``'s ``vision_config`` -> our
``QwenVisionConfig``, and the weight rules from the checkpoint's ``visual.`` tensors to a
``QwenVisionTower`` (``gaze_jax.model.qwen_vision``).

Where the tower lives in a ``save_pretrained`` folder (transformers 5.25): Qwen2.5-VL writes the
legacy names, ``visual.blocks.0...`` (its ``_checkpoint_conversion_mapping``), Qwen3-VL writes
``model.visual.blocks.0...``; ``vision_prefix`` finds either. The rules are ``Layout`` hooks only
(pure transposes), so the sharded loader can read them piecewise and the export can invert them.
Block rules expand over ``counts["vision"]`` (``depth``), DeepStack mergers over
``counts["deepstack"]`` (``qwen_vision_counts``).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from gaze_jax.convert import hf
from gaze_jax.model.hf_config import qwen_vl_decoder_config
from gaze_jax.convert.hf_io import load_safetensors, read_hf_config
from gaze_jax.convert.mapping import Layout, Rule, WeightMap, identity, linear, load_weights
from gaze_jax.model.config import MLLMConfig
from gaze_jax.model.qwen_vision import ACTIVATIONS, QwenVisionConfig

__all__ = ["VISION_MODEL_TYPES", "patch3d", "qwen_vision_config", "qwen_vision_rules",
           "qwen_vision_counts", "vision_prefix", "load_qwen_vision", "qwen_vl_configs",
           "plan_qwen_vl", "load_qwen_vl"]

# model_type -> the model_type of its vision_config.
VISION_MODEL_TYPES = {"qwen2_5_vl": "qwen2_5_vl_vision", "qwen3_vl": "qwen3_vl_vision"}
# PyTorch ``nn.Conv3d`` weight ``[E, C, T, P, P]`` -> our patch kernel ``[C, T, P, P, E]``.
patch3d = Layout("patch3d", (1, 2, 3, 4, 0))
# The key that ends the patch embedding's weight: finds the tower's prefix.
_ANCHOR = "patch_embed.proj.weight"

# transformers' config defaults for fields a vision_config may omit (Qwen2_5_VLVisionConfig,
# Qwen3VLVisionConfig in transformers 5.25).
_DEFAULTS = {
    "qwen2_5_vl": dict(depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420,
                       num_heads=16, in_channels=3, patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2, window_size=112, out_hidden_size=3584,
                       fullatt_block_indexes=(7, 15, 23, 31)),
    "qwen3_vl": dict(depth=27, hidden_size=1152, hidden_act="gelu_pytorch_tanh",
                     intermediate_size=4304, num_heads=16, in_channels=3, patch_size=16,
                     spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584,
                     num_position_embeddings=2304, deepstack_visual_indexes=(8, 16, 24)),
}
_INTS = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
         "spatial_merge_size", "temporal_patch_size", "out_hidden_size")


def qwen_vision_config(cfg: Mapping[str, Any], where: str = "config.json") -> QwenVisionConfig:
  """A ``qwen2_5_vl`` / ``qwen3_vl`` config dict (the whole ``config.json``) -> the tower's
  config. Raises ValueError naming ``where`` and the key for a value we do not support."""
  mt = cfg.get("model_type")
  if mt not in VISION_MODEL_TYPES:
    raise ValueError(f"{where}: model_type={mt!r}, expected one of "
                     f"{', '.join(map(repr, VISION_MODEL_TYPES))}")
  vc = cfg.get("vision_config") or {}
  vw = f"{where}: vision_config"
  if not isinstance(vc, Mapping):
    raise ValueError(f"{vw} must be an object, got {vc!r}")
  c = dict(_DEFAULTS[mt])
  c.update({k: v for k, v in vc.items() if v is not None})
  if "in_chans" in vc and "in_channels" not in vc:      # the released Qwen2.5-VL configs
    c["in_channels"] = vc["in_chans"]
  for k in _INTS:
    v = c[k]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"{vw}.{k}={v!r} is not supported (a positive int)")
  if c["hidden_act"] not in ACTIVATIONS:
    raise ValueError(f"{vw}.hidden_act={c['hidden_act']!r} is not supported (one of "
                     f"{sorted(ACTIVATIONS)})")
  rope = c.get("rope_parameters") or {}
  if rope.get("rope_type", "axial") != "axial":
    raise ValueError(f"{vw}.rope_parameters.rope_type={rope['rope_type']!r} is not supported "
                     "(only 'axial')")
  fields = {k: c[k] for k in _INTS + ("hidden_act",)}
  fields["rope_theta"] = float(rope.get("rope_theta", 10000.0))
  if mt == "qwen2_5_vl":
    fields.update(window_size=c["window_size"],
                  fullatt_block_indexes=tuple(c["fullatt_block_indexes"]))
  else:
    fields.update(num_position_embeddings=c["num_position_embeddings"],
                  deepstack_visual_indexes=tuple(c["deepstack_visual_indexes"]))
  try:
    return QwenVisionConfig(family=mt, **fields)
  except ValueError as e:
    raise ValueError(f"{vw}: {e}") from None


def _linear(ours: str, src: str, layers=None) -> list[Rule]:
  """An ``nn.Linear`` with bias: ``{ours}.kernel`` / ``.bias`` <- ``{src}.weight`` / ``.bias``."""
  return [Rule(f"{ours}.kernel", f"{src}.weight", linear, layers),
          Rule(f"{ours}.bias", f"{src}.bias", identity, layers)]


def _norm(cfg: QwenVisionConfig, ours: str, src: str, layers=None) -> list[Rule]:
  """RMSNorm (weight only) for Qwen2.5-VL, LayerNorm (weight and bias) for Qwen3-VL."""
  rules = [Rule(f"{ours}.scale", f"{src}.weight", identity, layers)]
  if cfg.family == "qwen3_vl":
    rules.append(Rule(f"{ours}.bias", f"{src}.bias", identity, layers))
  return rules


def qwen_vision_rules(cfg: QwenVisionConfig, prefix: str, ours: str = "") -> list[Rule]:
  """Our ``{ours}patch_embed...`` <- ``{prefix}patch_embed...`` for either family.

  ``prefix`` is the tower's key prefix (``"visual."``, ``"model.visual."``, or ``""`` for a
  bare ``Qwen2_5_VisionTransformerPretrainedModel`` / ``Qwen3VLVisionModel`` state dict); ``ours``
  is ``""`` for a bare ``QwenVisionTower``, e.g. ``"vision."`` inside an MLLM."""
  p, o, L = prefix, ours, "vision"
  qwen3 = cfg.family == "qwen3_vl"
  rules = [Rule(f"{o}patch_embed.kernel", f"{p}patch_embed.proj.weight", patch3d)]
  if qwen3:
    rules += [Rule(f"{o}patch_embed.bias", f"{p}patch_embed.proj.bias"),
              Rule(f"{o}pos_embed", f"{p}pos_embed.weight")]
  b, s = f"{o}blocks.{{i}}.", f"{p}blocks.{{i}}."
  rules += _norm(cfg, b + "norm1", s + "norm1", L) + _norm(cfg, b + "norm2", s + "norm2", L)
  rules += _linear(b + "attn.qkv", s + "attn.qkv", L) + _linear(b + "attn.proj", s + "attn.proj", L)
  mlp = ("linear_fc1", "linear_fc2") if qwen3 else ("gate_proj", "up_proj", "down_proj")
  for n in mlp:
    rules += _linear(f"{b}mlp.{n}", f"{s}mlp.{n}", L)
  if qwen3:
    rules += _norm(cfg, f"{o}merger.norm", f"{p}merger.norm")
    rules += _linear(f"{o}merger.fc1", f"{p}merger.linear_fc1")
    rules += _linear(f"{o}merger.fc2", f"{p}merger.linear_fc2")
    d, ds, D = f"{o}deepstack_mergers.{{i}}.", f"{p}deepstack_merger_list.{{i}}.", "deepstack"
    rules += (_norm(cfg, d + "norm", ds + "norm", D) + _linear(d + "fc1", ds + "linear_fc1", D) +
              _linear(d + "fc2", ds + "linear_fc2", D))
  else:
    # Qwen2.5-VL's merger: ``ln_q`` and ``mlp = Sequential(Linear, GELU, Linear)``.
    rules += _norm(cfg, f"{o}merger.norm", f"{p}merger.ln_q")
    rules += _linear(f"{o}merger.fc1", f"{p}merger.mlp.0")
    rules += _linear(f"{o}merger.fc2", f"{p}merger.mlp.2")
  return rules


def qwen_vision_counts(cfg: QwenVisionConfig) -> dict[str, int]:
  """The layer counts the rules' ``{i}`` expand over."""
  return {"vision": cfg.depth, "deepstack": len(cfg.deepstack_visual_indexes)}


def vision_prefix(tensors: Mapping[str, Any]) -> str:
  """The tower's key prefix in a checkpoint (``"visual."``, ``"model.visual."``, ``""``).

  Raises ValueError when no key, or several, end with ``patch_embed.proj.weight``."""
  hits = sorted(k for k in tensors if k == _ANCHOR or k.endswith("." + _ANCHOR))
  if len(hits) != 1:
    raise ValueError(f"expected one vision tower ('...{_ANCHOR}') in the checkpoint, found "
                     f"{hits or 'none'}")
  return hits[0][:len(hits[0]) - len(_ANCHOR)]


def load_qwen_vision(tower, tensors: Mapping[str, Any], prefix: str | None = None, *,
                     allow_nonfinite: bool = False) -> None:
  """Copies a checkpoint's vision tensors into ``tower`` (a ``QwenVisionTower``) in place.

  ``tensors``: source key -> array (torch tensors pass through ``np.asarray`` after
  ``.numpy()``); keys outside the tower's prefix (the decoder) are ignored; every tower key
  must be used and every parameter covered (``mapping.load_weights``)."""
  prefix = vision_prefix(tensors) if prefix is None else prefix
  mine = {k: _numpy(v) for k, v in tensors.items() if k.startswith(prefix)}
  load_weights(tower, mine, qwen_vision_rules(tower.cfg, prefix), qwen_vision_counts(tower.cfg),
               allow_nonfinite=allow_nonfinite)


def _numpy(v) -> np.ndarray:
  if hasattr(v, "detach"):                 # a torch tensor
    v = v.detach().float().cpu().numpy()
  return np.asarray(v)


# ------------------------------------------------------------------ the whole model


def qwen_vl_configs(cfg: Mapping[str, Any], where: str = "config.json"):
  """A ``qwen2_5_vl`` / ``qwen3_vl`` config dict -> ``(DecoderConfig, QwenVisionConfig)``: the
  decoder with M-RoPE from ``text_config`` (``hf_config.qwen_vl_decoder_config``), the tower
  from ``vision_config``. Raises ValueError naming ``where`` and the key."""
  return qwen_vl_decoder_config(cfg, where), qwen_vision_config(cfg, where)


def plan_qwen_vl(model_dir, gaze=None, *, dtype: str = "float32", param_dtype: str = "float32"):
  """The ``hf.LoadPlan`` of a Qwen2.5-VL / Qwen3-VL ``save_pretrained`` folder (read from
  ``config.json`` and the safetensors headers; no weight is read): ``MLLMConfig(decoder,
  qwen_vision=tower)``; the decoder's weights under ``model.language_model.`` (found from
  ``embed_tokens.weight``), the head ``lm_head.weight`` (unless tied), the tower under
  ``visual.`` / ``model.visual.`` (``vision_prefix``) as our ``vision.``."""
  gaze = hf.DENSE_TEXT if gaze is None else gaze
  where = os.fspath(model_dir)
  dcfg, vcfg = qwen_vl_configs(read_hf_config(model_dir), os.path.join(where, "config.json"))
  if vcfg.out_hidden_size != dcfg.hidden_size:
    raise ValueError(f"{where}/config.json: vision_config.out_hidden_size="
                     f"{vcfg.out_hidden_size} differs from text_config.hidden_size="
                     f"{dcfg.hidden_size} (the merger feeds the decoder)")
  tensors = load_safetensors(model_dir)
  dropped = hf._drop_buffers(tensors)
  dp = hf.find_prefix(tensors, "embed_tokens.weight", "language model", where)
  try:
    vp = vision_prefix(tensors)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  head = hf._find_optional(tensors, "lm_head.weight", where)
  dcfg = hf._tie_or_untie(dcfg, tensors, dp + "embed_tokens.weight", head, where)
  cfg = MLLMConfig(decoder=dcfg, qwen_vision=vcfg, gaze=gaze, dtype=dtype,
                   param_dtype=param_dtype)
  rules = hf.decoder_rules(dcfg, dp, head) + qwen_vision_rules(vcfg, vp, ours="vision.")
  allow = [head] if (dcfg.tie_embeddings and head) else []
  counts = {"decoder": dcfg.num_layers, **qwen_vision_counts(vcfg)}
  weights = WeightMap(tuple(rules), counts, tuple(allow), hf._fresh(gaze))
  return hf.LoadPlan(cfg, weights, tensors, tuple(dropped), where)


def load_qwen_vl(model_dir, gaze=None, *, dtype: str = "float32", param_dtype: str = "float32",
                 seed: int = 0, return_unused: bool = False, allow_nonfinite: bool = False):
  """A Qwen2.5-VL / Qwen3-VL folder -> ``MLLM`` (``plan_qwen_vl``); context tokens
  (``gaze.num_ctx > 0``) keep their random initialisation (``seed``). Returns the model, or
  ``(model, unused keys)`` with ``return_unused``."""
  plan = plan_qwen_vl(model_dir, gaze, dtype=dtype, param_dtype=param_dtype)
  return hf.build_planned(plan, seed=seed, return_unused=return_unused,
                          allow_nonfinite=allow_nonfinite)

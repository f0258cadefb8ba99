"""Hugging Face safetensors checkpoints -> our NNX modules, with weights loaded.

Loaders (each reads ``config.json`` and the safetensors of a model directory):
  - ``load_causal_lm``: Llama / Qwen2 / Qwen3 ``*ForCausalLM`` -> text-only ``MLLM``.
  - ``load_siglip_vision``: SigLIP vision tower (``SiglipVisionModel``, or the vision half of a
    ``SiglipModel``) -> ``VisionTower``. The attention-pooling ``head`` is not built.
  - ``load_llava_onevision``: LLaVA-OneVision (SigLIP + projector + Qwen2) -> ``MLLM``.

The weight maps are declarative ``Rule`` lists (``mapping.py``). Key prefixes differ between
transformers versions (``language_model.model.layers`` in older checkpoints,
``model.language_model.layers`` in transformers 5 state dicts; ``vision_tower.vision_model.``
or ``vision_tower.``), so each part's prefix is found from an anchor tensor name instead of
being hard-coded.

What we do not convert: the SigLIP pooling head (left unused and reported: ``return_unused=True``,
and an INFO log line). LLaVA-OneVision's ``image_newline`` loads (``plan_llava_onevision``); its
anyres tiles are images laid out by ``gaze_jax.data.llava_onevision``. A config that
says ``tie_word_embeddings=true`` beside an ``lm_head.weight`` that differs from the embeddings
loads untied with the checkpoint's head and a warning, as transformers does. Images for our
towers are ``[N, H, W, C]``, already normalised as the Hugging Face image processor does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Mapping, MutableMapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gaze_jax.model.hf_config import (decoder_config_from_hf, llava_onevision_configs,
                                        llava_onevision_media_ids, vision_config_from_hf)
from gaze_jax.convert.hf_io import Checkpoint, PathLike, load_safetensors, read_hf_config
from gaze_jax.convert.mapping import (Rule, WeightMap, conv, identity, linear, load_weights,
                                      param_paths)
from gaze_jax.model.config import DecoderConfig, GazeConfig, MLLMConfig, VisionConfig
from gaze_jax.model.mllm import MLLM
from gaze_jax.model.vision import VisionTower

__all__ = ["load_safetensors", "read_hf_config", "decoder_config_from_hf",
           "vision_config_from_hf", "llava_onevision_configs", "decoder_rules", "vision_rules",
           "projector_rules", "find_prefix", "LoadPlan", "build_planned", "plan_causal_lm",
           "plan_llava_onevision", "load_causal_lm", "load_siglip_vision", "load_llava_onevision"]

log = logging.getLogger(__name__)

DENSE_TEXT = GazeConfig(attention="dense", num_ctx=0)
# Non-learned buffers that some older checkpoints saved; never parameters.
_BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")
_INIT = "<initial value>/"


# ------------------------------------------------------------------ rule maps

def decoder_rules(cfg: DecoderConfig, prefix: str, lm_head: Optional[str]) -> list[Rule]:
  """Llama / Qwen2 / Qwen3 decoder: our ``decoder.*`` <- ``{prefix}embed_tokens...``.

  Args:
    prefix: the decoder's key prefix, e.g. ``"model."`` or ``"model.language_model."``.
    lm_head: the LM head's key (``"lm_head.weight"``), or None when the embeddings are tied.
  Layer rules expand over ``counts["decoder"]``.
  """
  p, L = prefix, "decoder"
  rules = [Rule("decoder.embed.embedding", f"{p}embed_tokens.weight"),
           Rule("decoder.final_norm.scale", f"{p}norm.weight")]
  layer = [("input_norm.scale", "input_layernorm.weight", identity),
           ("post_attn_norm.scale", "post_attention_layernorm.weight", identity)]
  layer += [(f"attn.{n}_proj.kernel", f"self_attn.{n}_proj.weight", linear) for n in "qkvo"]
  if cfg.qkv_bias:
    layer += [(f"attn.{n}_proj.bias", f"self_attn.{n}_proj.bias", identity) for n in "qkv"]
  if cfg.qk_norm:
    layer += [(f"attn.{n}_norm.scale", f"self_attn.{n}_norm.weight", identity) for n in "qk"]
  layer += [(f"mlp.{n}_proj.kernel", f"mlp.{n}_proj.weight", linear)
            for n in ("gate", "up", "down")]
  rules += [Rule(f"decoder.layers.{{i}}.{ours}", f"{p}layers.{{i}}.{src}", hook, L)
            for ours, src, hook in layer]
  if not cfg.tie_embeddings:
    if lm_head is None:
      raise ValueError("the decoder has an untied LM head but the checkpoint has no "
                       "lm_head.weight (tie_word_embeddings=false)")
    rules.append(Rule("decoder.lm_head.kernel", lm_head, linear))
  return rules


def vision_rules(cfg: VisionConfig, prefix: str, ours: str = "") -> list[Rule]:
  """SigLIP vision tower: our ``{ours}patch_embed...`` <- ``{prefix}embeddings...``.

  ``ours`` is ``""`` for a bare VisionTower, ``"vision."`` inside an MLLM. Block rules expand
  over ``counts["vision"]`` (the blocks we build, up to the feature layer).
  """
  p, o, L = prefix, ours, "vision"
  rules = [Rule(f"{o}patch_embed.kernel", f"{p}embeddings.patch_embedding.weight", conv),
           Rule(f"{o}patch_embed.bias", f"{p}embeddings.patch_embedding.bias"),
           Rule(f"{o}pos_embed", f"{p}embeddings.position_embedding.weight")]
  block = [("norm1", "layer_norm1"), ("norm2", "layer_norm2")]
  for ours_n, src_n in block:
    rules += [Rule(f"{o}blocks.{{i}}.{ours_n}.scale", f"{p}encoder.layers.{{i}}.{src_n}.weight",
                   identity, L),
              Rule(f"{o}blocks.{{i}}.{ours_n}.bias", f"{p}encoder.layers.{{i}}.{src_n}.bias",
                   identity, L)]
  linears = [(f"{n}_proj", f"self_attn.{n}_proj") for n in "qkv"]
  linears += [("o_proj", "self_attn.out_proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")]
  for ours_n, src_n in linears:
    rules += [Rule(f"{o}blocks.{{i}}.{ours_n}.kernel", f"{p}encoder.layers.{{i}}.{src_n}.weight",
                   linear, L),
              Rule(f"{o}blocks.{{i}}.{ours_n}.bias", f"{p}encoder.layers.{{i}}.{src_n}.bias",
                   identity, L)]
  if cfg.post_layernorm:
    rules += [Rule(f"{o}post_norm.scale", f"{p}post_layernorm.weight"),
              Rule(f"{o}post_norm.bias", f"{p}post_layernorm.bias")]
  return rules


def projector_rules(prefix: str) -> list[Rule]:
  """LLaVA ``mlp2x_gelu`` projector: our ``projector.linear_{1,2}`` <- ``{prefix}linear_{1,2}``
  (prefix e.g. ``"multi_modal_projector."``)."""
  return [Rule(f"projector.linear_{n}.{k}", f"{prefix}linear_{n}.{s}", h)
          for n in (1, 2) for k, s, h in (("kernel", "weight", linear), ("bias", "bias", identity))]


def _vision_unused(cfg: VisionConfig, prefix: str) -> list[str]:
  """Key prefixes of a SigLIP tower that we do not build: the pooling head, the blocks after
  the feature layer and, without ``post_layernorm``, the final LayerNorm."""
  out = [f"{prefix}head."] + [f"{prefix}encoder.layers.{j}." for j in
                              range(cfg.num_blocks, cfg.num_layers)]
  if not cfg.post_layernorm:
    out.append(f"{prefix}post_layernorm.")
  return out


# ------------------------------------------------------------------ key discovery

def _matches(key: str, name: str) -> bool:
  return key == name or key.endswith("." + name)


def find_prefix(tensors: Mapping[str, np.ndarray], anchor: str, what: str, where: str) -> str:
  """The prefix ``p`` such that ``p + anchor`` is a key (``""``, ``"model."``, ...).

  Raises ValueError when no key or several keys end with ``anchor``.
  """
  hits = sorted(k for k in tensors if _matches(k, anchor))
  if not hits:
    raise ValueError(f"{where}: no {what} in the checkpoint (no tensor named '...{anchor}'); "
                     f"keys start like {sorted(tensors)[:3]}")
  if len(hits) > 1:
    raise ValueError(f"{where}: several {what}s in the checkpoint: {hits}")
  return hits[0][:len(hits[0]) - len(anchor)]


def _find_optional(tensors: Mapping[str, np.ndarray], name: str, where: str) -> Optional[str]:
  hits = sorted(k for k in tensors if _matches(k, name))
  if len(hits) > 1:
    raise ValueError(f"{where}: several tensors named '...{name}': {hits}")
  return hits[0] if hits else None


def _tie_or_untie(cfg: DecoderConfig, tensors: Checkpoint, embed: str,
                  head: Optional[str], where: str) -> DecoderConfig:
  """The decoder config the checkpoint really holds.

  A config that says ``tie_word_embeddings=true`` next to an ``lm_head.weight`` that differs
  from the embeddings is wrong about the checkpoint. transformers (5.x) then keeps the two
  apart, uses the checkpoint's head and warns; so do we (a logging warning naming the file
  and the tensor), so that our logits match its. A head equal to the embeddings (as some
  savers write it) keeps the tie and is reported unused.
  """
  if not cfg.tie_embeddings or head is None:
    return cfg
  e, h = tensors[embed], tensors[head]
  if e.shape == h.shape and np.array_equal(e, h):
    return cfg
  log.warning("%s: config.json says tie_word_embeddings=true, but tensor %r in %s differs from "
              "the embeddings %r: using the checkpoint's LM head, untied, as transformers does "
              "(set tie_word_embeddings=false in config.json to silence this)",
              where, head, tensors.file_of(head), embed)
  return dataclasses.replace(cfg, tie_embeddings=False)


def _drop_buffers(tensors: MutableMapping[str, np.ndarray]) -> list[str]:
  """Removes saved non-learned buffers from ``tensors`` in place; returns their keys."""
  dropped = sorted(k for k in tensors if k.endswith(_BUFFER_SUFFIXES))
  for k in dropped:
    del tensors[k]
  return dropped


def _keep_initial(model: nnx.Module, tensors: MutableMapping[str, np.ndarray],
                  paths: Sequence[str]) -> list[Rule]:
  """Rules that keep the initial value of parameters no checkpoint has (context tokens)."""
  params = param_paths(model)
  rules = []
  for path in paths:
    tensors[_INIT + path] = np.asarray(params[path].get_value(), np.float32)
    rules.append(Rule(path, _INIT + path))
  return rules


def _fresh(gaze: GazeConfig) -> tuple[str, ...]:
  """Our parameters that no Hugging Face checkpoint has: the context tokens start fresh."""
  return ("ctx_embed",) if gaze.num_ctx else ()


@dataclasses.dataclass(frozen=True)
class LoadPlan:
  """What a Hugging Face folder becomes, before any weight is read: our model config, the
  weight map that fills it from ``tensors`` (the folder's lazy checkpoint, headers only), and
  the checkpoint keys already set aside (saved buffers, another tower), for the report."""
  model: MLLMConfig
  weights: WeightMap
  tensors: Checkpoint
  set_aside: tuple[str, ...]
  where: str


def build_planned(plan: LoadPlan, *, seed: int = 0, return_unused: bool = False,
                  allow_nonfinite: bool = False):
  """``MLLM(plan.model)`` on the default device with the checkpoint's weights (fresh
  parameters keep their initialisation from ``seed``). Returns the model, or ``(model, unused
  keys)``."""
  model = MLLM(plan.model, rngs=nnx.Rngs(seed))
  rules = list(plan.weights.rules) + _keep_initial(model, plan.tensors, plan.weights.fresh)
  unused = _load(model, plan.tensors, rules, plan.weights.counts, plan.weights.allow_unused,
                 plan.where, allow_nonfinite)
  return _finish(model, list(plan.set_aside) + unused, plan.where, return_unused)


def _finish(model, unused: list[str], where: str, return_unused: bool):
  if unused:
    log.info("%s: %d checkpoint tensors left unused: %s", where, len(unused), unused)
  return (model, unused) if return_unused else model


# ------------------------------------------------------------------ loaders

def plan_causal_lm(model_dir: PathLike, gaze: GazeConfig = DENSE_TEXT, *,
                   dtype: str = "float32", param_dtype: str = "float32") -> LoadPlan:
  """The ``LoadPlan`` of a Llama / Qwen2 / Qwen3 causal LM directory (a text-only MLLM)."""
  where = os.fspath(model_dir)
  dcfg = decoder_config_from_hf(read_hf_config(model_dir))
  tensors = load_safetensors(model_dir)
  dropped = _drop_buffers(tensors)
  dp = find_prefix(tensors, "embed_tokens.weight", "token embedding", where)
  head = _find_optional(tensors, "lm_head.weight", where)
  dcfg = _tie_or_untie(dcfg, tensors, dp + "embed_tokens.weight", head, where)
  cfg = MLLMConfig(decoder=dcfg, vision=None, gaze=gaze, dtype=dtype, param_dtype=param_dtype)
  allow = (head,) if (dcfg.tie_embeddings and head) else ()
  weights = WeightMap(tuple(decoder_rules(dcfg, dp, head)), {"decoder": dcfg.num_layers},
                      allow, _fresh(gaze))
  return LoadPlan(cfg, weights, tensors, tuple(dropped), where)


def load_causal_lm(model_dir: PathLike, gaze: GazeConfig = DENSE_TEXT, *,
                   dtype: str = "float32", param_dtype: str = "float32", seed: int = 0,
                   return_unused: bool = False, allow_nonfinite: bool = False):
  """A Llama / Qwen2 / Qwen3 causal LM directory -> text-only ``MLLM`` (``vision=None``).

  Args:
    model_dir: holds ``config.json`` and ``model.safetensors`` (or a sharded index).
    gaze: our attention settings; context tokens (``gaze.num_ctx > 0``) are new parameters and
      keep their random initialisation (``seed``).
    dtype, param_dtype: compute and parameter dtypes of the MLLM.
    return_unused: also return the checkpoint keys left unused (a tied ``lm_head``, buffers).
    allow_nonfinite: load weights holding NaN or Inf (with a warning) instead of raising.
  Returns:
    the MLLM, or ``(MLLM, unused keys)``.
  Raises:
    ValueError: an unsupported config, a missing or wrongly shaped tensor, an unexpected one,
      or one holding NaN / Inf (naming the tensor and its file; see ``allow_nonfinite``).
  """
  plan = plan_causal_lm(model_dir, gaze, dtype=dtype, param_dtype=param_dtype)
  return build_planned(plan, seed=seed, return_unused=return_unused,
                       allow_nonfinite=allow_nonfinite)


def load_siglip_vision(model_dir: PathLike, feature_layer: int = -1, post_layernorm: bool = True,
                       *, dtype: str = "float32", param_dtype: str = "float32", seed: int = 0,
                       return_unused: bool = False, allow_nonfinite: bool = False):
  """A SigLIP directory (``SiglipVisionModel`` or ``SiglipModel``) -> ``VisionTower``.

  ``feature_layer=-1, post_layernorm=True`` gives SigLIP's ``last_hidden_state``;
  ``post_layernorm=False`` gives ``hidden_states[feature_layer]``. The pooling head, the
  blocks after the feature layer and (for a SiglipModel) the text tower are left unused.
  Weights holding NaN or Inf raise a ValueError naming the tensor, unless ``allow_nonfinite``.
  Returns the tower, or ``(tower, unused keys)`` with ``return_unused``.
  """
  where = os.fspath(model_dir)
  hf = read_hf_config(model_dir)
  vcfg = vision_config_from_hf(hf, feature_layer=feature_layer, post_layernorm=post_layernorm)
  tensors = load_safetensors(model_dir)
  dropped = _drop_buffers(tensors)
  vp = find_prefix(tensors, "embeddings.patch_embedding.weight", "SigLIP vision tower", where)
  # Another tower of the same checkpoint (SiglipModel's text_model, logit_scale): not ours.
  other = sorted(k for k in tensors if not k.startswith(vp))
  for k in other:                     # by name, so that their data is never read
    del tensors[k]
  tower = VisionTower(vcfg, rngs=nnx.Rngs(seed), dtype=jnp.dtype(dtype),
                      param_dtype=jnp.dtype(param_dtype))
  unused = _load(tower, tensors, vision_rules(vcfg, vp), {"vision": vcfg.num_blocks},
                 _vision_unused(vcfg, vp), where, allow_nonfinite)
  return _finish(tower, dropped + other + unused, where, return_unused)


def plan_llava_onevision(model_dir: PathLike, gaze: GazeConfig = DENSE_TEXT, *,
                         dtype: str = "float32", param_dtype: str = "float32") -> LoadPlan:
  """The ``LoadPlan`` of a LLaVA-OneVision directory (SigLIP, ``mlp2x_gelu`` projector,
  Qwen2, ``image_newline``).

  ``image_newline`` becomes our parameter of that name, given to the text slots that hold the
  image or video token id (``MLLMConfig.newline_token_ids``: LLaVA-OneVision's processor
  writes these ids where its model puts the newline, after each row of a tiled grid and after
  a video; ``gaze_jax.data.llava_onevision`` does the same). Video frames are pooled 2 x 2 by
  bilinear interpolation (``VisionConfig.video_pool_mode``), as its ``apply_pooling``.
  """
  where = os.fspath(model_dir)
  hf = read_hf_config(model_dir)
  if hf.get("model_type") != "llava_onevision":
    raise ValueError(f"{where}: model_type={hf.get('model_type')!r}, expected 'llava_onevision'")
  dcfg, vcfg = llava_onevision_configs(hf)
  tensors = load_safetensors(model_dir)
  dropped = _drop_buffers(tensors)
  dp = find_prefix(tensors, "embed_tokens.weight", "language model", where)
  vp = find_prefix(tensors, "embeddings.patch_embedding.weight", "vision tower", where)
  mp = find_prefix(tensors, "multi_modal_projector.linear_1.weight", "projector", where)
  newline = find_prefix(tensors, "image_newline", "image_newline", where) + "image_newline"
  head = _find_optional(tensors, "lm_head.weight", where)
  dcfg = _tie_or_untie(dcfg, tensors, dp + "embed_tokens.weight", head, where)
  cfg = MLLMConfig(decoder=dcfg, vision=vcfg, gaze=gaze, dtype=dtype, param_dtype=param_dtype,
                   newline_token_ids=llava_onevision_media_ids(hf, dcfg.vocab_size))
  rules = (decoder_rules(dcfg, dp, head) + vision_rules(vcfg, vp, ours="vision.") +
           projector_rules(mp + "multi_modal_projector.") + [Rule("image_newline", newline)])
  allow = _vision_unused(vcfg, vp)
  allow += [head] if (dcfg.tie_embeddings and head) else []
  weights = WeightMap(tuple(rules), {"decoder": dcfg.num_layers, "vision": vcfg.num_blocks},
                      tuple(allow), _fresh(gaze))
  return LoadPlan(cfg, weights, tensors, tuple(dropped), where)


def load_llava_onevision(model_dir: PathLike, gaze: GazeConfig = DENSE_TEXT, *,
                         dtype: str = "float32", param_dtype: str = "float32", seed: int = 0,
                         return_unused: bool = False, allow_nonfinite: bool = False):
  """A LLaVA-OneVision directory -> ``MLLM`` (SigLIP tower, ``mlp2x_gelu`` projector, Qwen2,
  ``image_newline``; see ``plan_llava_onevision``).

  The tower yields ``hidden_states[vision_feature_layer]`` without the final LayerNorm, as
  LLaVA-OneVision does. The SigLIP head and post-LayerNorm stay unused and are reported.
  Context tokens (``gaze.num_ctx > 0``) keep their random initialisation.
  Weights holding NaN or Inf raise a ValueError naming the tensor, unless ``allow_nonfinite``.
  Returns the MLLM, or ``(MLLM, unused keys)`` with ``return_unused``.
  """
  plan = plan_llava_onevision(model_dir, gaze, dtype=dtype, param_dtype=param_dtype)
  return build_planned(plan, seed=seed, return_unused=return_unused,
                       allow_nonfinite=allow_nonfinite)


def _load(model, tensors, rules, counts, allow_unused, where, allow_nonfinite) -> list[str]:
  """``load_weights`` with the checkpoint path added to its errors."""
  try:
    return load_weights(model, tensors, rules, counts, allow_unused=allow_unused,
                        allow_nonfinite=allow_nonfinite)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None

"""Llama / Qwen2 / Qwen3 decoder (one implementation, chosen by DecoderConfig)."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gaze_jax.gaze import TokenLayout
from gaze_jax.model.attention import Attention, LayerCache
from gaze_jax.model.config import DecoderConfig, GazeConfig
from gaze_jax.model.layers import RMSNorm, dense, named


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    kw = dict(use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    E, F = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = dense(E, F, ("embed", "mlp"), **kw)
    self.up_proj = dense(E, F, ("embed", "mlp"), **kw)
    self.down_proj = dense(F, E, ("mlp", "embed"), **kw)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

  def __init__(self, cfg: DecoderConfig, gaze: GazeConfig, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, name="embed",
                              param_dtype=param_dtype)
    self.attn = Attention(cfg, gaze, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, name="embed",
                                  param_dtype=param_dtype)
    self.mlp = MLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x, layout, **attn_kw):
    h, cache, selected = self.attn(self.input_norm(x), layout, **attn_kw)
    x = x + h
    return x + self.mlp(self.post_attn_norm(x)), cache, selected


@nnx.remat(static_argnums=(5,))
def _remat_layer(layer, x, layout, active_k, selection, return_selected):
  """One layer of a full-sequence forward under ``nnx.remat`` (``DecoderConfig.remat``)."""
  x, _, s = layer(x, layout, active_k=active_k, return_selected=return_selected,
                  selection=selection)
  return x, s


class Decoder(nnx.Module):
  """Token embedding, decoder layers, final norm and LM head (tied or not)."""

  def __init__(self, cfg: DecoderConfig, gaze: GazeConfig = GazeConfig(), *, rngs: nnx.Rngs,
               dtype=None, param_dtype=jnp.float32):
    self.cfg = cfg
    self.dtype = dtype
    self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                           embedding_init=named(nnx.initializers.normal(0.02), ("vocab", "embed")),
                           rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, gaze, rngs=rngs, dtype=dtype,
                                         param_dtype=param_dtype)
                            for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, name="embed",
                              param_dtype=param_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = dense(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), use_bias=False,
                           rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """int ``[B, T]`` -> ``[B, T, E]``; ids outside the vocabulary raise on the host."""
    return self.embed(tokens)

  def logits(self, x: jax.Array) -> jax.Array:
    """Final norm and LM head: ``[B, T, E]`` -> float32 ``[B, T, V]``."""
    x = self.final_norm(x)
    out = self.embed.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
    return out.astype(jnp.float32)

  def __call__(self, x: jax.Array, layout: TokenLayout, *,
               cache: Optional[Sequence[LayerCache]] = None, q_index=None, active_k=None,
               want_cache: bool = False, return_selected: bool = False,
               selections: Optional[Sequence[jax.Array]] = None):
    """Runs the layers on embeddings ``x [B, T, E]``.

    ``selections``: optional region ids per layer (``[B, T, Hq, K']``) that replace routing.

    Returns ``(logits [B, T, V], caches or None, selected or None)``; ``selected`` is a list
    per layer of ids ``[B, T, Hq, K]`` (gaze) or None (dense).
    """
    caches, selected = [], []
    if self.cfg.remat and cache is None and not want_cache:
      # Training form: recompute each layer in the backward pass instead of keeping its
      # activations (only the layer inputs are saved).
      for i, layer in enumerate(self.layers):
        x, s = _remat_layer(layer, x, layout, active_k,
                            None if selections is None else selections[i], return_selected)
        selected.append(s)
      return self.logits(x), None, (selected if return_selected else None)
    for i, layer in enumerate(self.layers):
      x, c, s = layer(x, layout, cache=None if cache is None else cache[i], q_index=q_index,
                      active_k=active_k, want_cache=want_cache, return_selected=return_selected,
                      selection=None if selections is None else selections[i])
      caches.append(c)
      selected.append(s)
    logits = self.logits(x)
    return (logits, caches if (want_cache or cache is not None) else None,
            selected if return_selected else None)

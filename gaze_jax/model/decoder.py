"""Llama / Qwen2 / Qwen3 decoder (one implementation, chosen by DecoderConfig)."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import checkify

from gaze_jax.gaze import TokenLayout
from gaze_jax.model.attention import Attention, LayerCache, attention_plan
from gaze_jax.model.config import DecoderConfig, GazeConfig
from gaze_jax.model.layers import RMSNorm, concrete, dense, named
from gaze_jax.model.offload import is_offloaded
from gaze_jax.model.partitioning import constrain


def check_token_ids(tokens, vocab_size: int, valid=None, what: str = "tokens") -> None:
  """Host-side check: every id of ``tokens`` (int ``[B, T]``) where ``valid`` (bool ``[B, T]``,
  None = everywhere) lies in ``[0, vocab_size)``. Raises ValueError naming the first bad ids and
  their ``[b, t]`` slots (an id outside the vocabulary would otherwise be clamped silently)."""
  tokens = np.asarray(tokens)
  bad = (tokens < 0) | (tokens >= vocab_size)
  if valid is not None:
    bad &= np.asarray(valid, bool)
  if bad.any():
    where = np.argwhere(bad)[:3]
    shown = ", ".join(f"{tokens[tuple(w)]} at {what}[{', '.join(map(str, w))}]" for w in where)
    raise ValueError(f"{what}: {int(bad.sum())} ids outside the model's vocabulary "
                     f"[0, {vocab_size}): {shown}")


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    kw = dict(use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    E, F = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = dense(E, F, ("embed", "mlp"), **kw)
    self.up_proj = dense(E, F, ("embed", "mlp"), **kw)
    self.down_proj = dense(F, E, ("mlp", "embed"), **kw)

  def __call__(self, x):
    return self.down_proj(constrain(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), "mlp"))


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
    return constrain(x + self.mlp(self.post_attn_norm(x)), "hidden"), cache, selected


def _full_layer(layer, x, layout, plan, active_k, selection, return_selected):
  """One layer of a full-sequence forward (no cache): ``x [B, T, E]`` -> ``(x, selected)``."""
  x, _, s = layer(x, layout, plan=plan, active_k=active_k, return_selected=return_selected,
                  selection=selection)
  return x, s


# ``DecoderConfig.remat``: only the layer's inputs are kept for the backward pass.
_remat_layer = nnx.remat(_full_layer, static_argnums=(6,))
# Inside a scan the loop already keeps XLA from merging the recomputation into the forward,
# so the optimisation barrier of prevent_cse is not needed (jax.checkpoint's docs).
_remat_scan_layer = nnx.remat(_full_layer, static_argnums=(6,), prevent_cse=False,
                              graph_updates=False)


class Decoder(nnx.Module):
  """Token embedding, decoder layers, final norm and LM head (tied or not)."""

  def __init__(self, cfg: DecoderConfig, gaze: GazeConfig = GazeConfig(), *, rngs: nnx.Rngs,
               dtype=None, param_dtype=jnp.float32):
    self.cfg, self.gaze = cfg, gaze
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

  def embed_tokens(self, tokens: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
    """int ``[B, T]`` -> ``[B, T, E]``.

    ``valid`` (bool ``[B, T]``, None = all) marks the ids that are used; the others (slots
    whose embedding is replaced, e.g. image patches) may hold anything. A used id outside
    ``[0, vocab_size)``:
      - concrete ``tokens`` (an eager call): ValueError on the host, naming the id and slot;
      - traced ``tokens`` (inside ``jax.jit``): a ``checkify.debug_check``, which raises only
        when the caller wraps the function with ``checkify.checkify(f,
        errors=checkify.user_checks)`` and is free otherwise. Entry points check on the host
        first (``generate``, the data pipeline's ``FeatureConfig.vocab_size``).
    The lookup clamps ids into the vocabulary, so that unused slots never index out of range.
    """
    V = self.cfg.vocab_size
    host = concrete(tokens)
    mask = None if valid is None else concrete(valid)
    if host is not None and (valid is None or mask is not None):
      check_token_ids(host, V, mask)
    else:
      bad = (tokens < 0) | (tokens >= V)
      if valid is not None:
        bad = bad & valid
      first = jnp.argmax(bad.reshape(-1))
      checkify.debug_check(~jnp.any(bad), f"tokens: id {{}} at flat slot {{}} is outside the "
                           f"vocabulary [0, {V})", tokens.reshape(-1)[first], first)
    return self.embed(jnp.clip(tokens, 0, V - 1))

  def logits(self, x: jax.Array) -> jax.Array:
    """Final norm and LM head: ``[B, T, E]`` -> float32 ``[B, T, V]``."""
    x = self.final_norm(x)
    out = self.embed.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
    return out.astype(jnp.float32)

  def _scan_layers(self, x, layout, plan, active_k, selections, return_selected,
                   deepstack=None):
    """The layers of a full-sequence forward as ``nnx.scan``s (``DecoderConfig.scan_layers``;
    with ``remat``, ``nnx.remat`` inside the body), so the layer is traced and compiled once
    (twice with DeepStack: one scan over the first ``n`` layers, which add the ``n`` DeepStack
    features after them, one over the rest).

    The layers stay stored one by one (``decoder/layers/<i>/...``: checkpoints, conversion,
    param groups and sharding rules unchanged); their states are stacked here into one
    DecoderLayer with ``[L, ...]`` weights that the scan slices. The stack is a copy of the
    layer weights for the pass; gradients flow back through it to each layer.

    x ``[B, T, E]``; selections: None or per layer ``[B, T, Hq, K']``; deepstack: None or a
    list of ``[B, T, E]`` (``__call__``).
    Returns ``(x [B, T, E], selected)``: a list per layer of ids ``[B, T, Hq, K]`` (or of None).
    """
    L = len(self.layers)
    n = 0 if deepstack is None else len(deepstack)
    parts = [(0, n), (n, L)] if 0 < n < L else [(0, L)]
    step = _remat_scan_layer if self.cfg.remat else _full_layer
    out = []
    for lo, hi in parts:
      graphdefs, states = zip(*(nnx.split(layer) for layer in list(self.layers)[lo:hi]))
      if any(g != graphdefs[0] for g in graphdefs[1:]):
        raise ValueError("scan_layers needs decoder layers of one structure")
      stacked = nnx.merge(graphdefs[0], jax.tree.map(lambda *xs: jnp.stack(xs), *states))
      sel = None if selections is None else jnp.stack(list(selections)[lo:hi])
      ds = jnp.stack([d.astype(x.dtype) for d in deepstack]) if (lo == 0 and n) else None

      # graph_updates=False: the layers only read their weights, nothing to write back.
      @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0), graph_updates=False)
      def body(x, layer, selection, extra):
        x, s = step(layer, x, layout, plan, active_k, selection, return_selected)
        return (x if extra is None else x + extra), s

      x, s = body(x, stacked, sel, ds)
      out += [None if s is None else s[i] for i in range(hi - lo)]
    return x, out

  def __call__(self, x: jax.Array, layout: TokenLayout, *,
               cache: Optional[Sequence[LayerCache]] = None, q_index=None, active_k=None,
               want_cache: bool = False, return_selected: bool = False,
               selections: Optional[Sequence[jax.Array]] = None, plan_base=None,
               logits_index: Optional[jax.Array] = None,
               deepstack: Optional[Sequence[jax.Array]] = None):
    """Runs the layers on embeddings ``x [B, T, E]``.

    ``selections``: optional region ids per layer (``[B, T, Hq, K']``) that replace routing.
    The attention plan of the layout (``attention_plan``) is built once here and shared by
    every layer; ``plan_base`` (a decode step's plan, ``MLLM.decode_plan``) gives it its
    layout-only parts, so that a decode loop builds those once. ``logits_index`` (int32
    ``[B, T']``, the prefill / decode forms): the logits of these rows only. With ``cfg.scan_layers`` the full-sequence form (no cache in or out) runs the
    layers as one scan (``_scan_layers``); prefill and decode, with per-layer caches, loop.
    ``deepstack`` (Qwen3-VL's DeepStack, full-sequence and prefill forms): a list of ``n``
    arrays ``[B, T, E]``, zero outside the visual slots; the ``k``-th is added to the hidden
    states after layer ``k`` (transformers' ``_deepstack_process`` after each of the first
    ``n`` layers). Decode steps (text only) take none.

    Returns ``(logits [B, T, V], caches or None, selected or None)``; ``selected`` is a list
    per layer of ids ``[B, T, Hq, K]`` (gaze) or None (dense).
    """
    caches, selected = [], []
    plan = attention_plan(self.cfg, self.gaze, layout, q_index, self.dtype or x.dtype,
                          reuse=plan_base, offloaded=is_offloaded(cache))
    deepstack = None if deepstack is None or not len(deepstack) else list(deepstack)
    if deepstack is not None and len(deepstack) > len(self.layers):
      raise ValueError(f"{len(deepstack)} DeepStack features for {len(self.layers)} layers")
    add = lambda i, x: (x + deepstack[i].astype(x.dtype)
                        if deepstack is not None and i < len(deepstack) else x)
    if self.cfg.scan_layers and cache is None and not want_cache:
      x, selected = self._scan_layers(x, layout, plan, active_k, selections, return_selected,
                                      deepstack)
      return self.logits(x), None, (selected if return_selected else None)
    if self.cfg.remat and cache is None and not want_cache:
      # Training form: recompute each layer in the backward pass instead of keeping its
      # activations (only the layer inputs are saved).
      for i, layer in enumerate(self.layers):
        x, s = _remat_layer(layer, x, layout, plan, active_k,
                            None if selections is None else selections[i], return_selected)
        x = add(i, x)
        selected.append(s)
      return self.logits(x), None, (selected if return_selected else None)
    for i, layer in enumerate(self.layers):
      x, c, s = layer(x, layout, plan=plan, cache=None if cache is None else cache[i],
                      q_index=q_index,
                      active_k=active_k, want_cache=want_cache, return_selected=return_selected,
                      selection=None if selections is None else selections[i])
      x = add(i, x)
      caches.append(c)
      selected.append(s)
    if logits_index is not None:
      x = jnp.take_along_axis(x, logits_index[:, :, None], axis=1)
    logits = self.logits(x)
    return (logits, caches if (want_cache or cache is not None) else None,
            selected if return_selected else None)

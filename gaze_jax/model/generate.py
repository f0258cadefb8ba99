"""Autoregressive generation: prefill plus a decode loop, compiled as one ``jax.jit`` function.

Flow (all on the device, no host round-trip per token):
  1. The caller builds the batch layout on the host from each example's prompt segments plus a
     reserved ``Text(n, generated=True)`` span at the end. The span gives the fixed-size KV
     cache its slots and RoPE positions for the new tokens; prompts may differ in length, so
     each example's first generated slot ``g[b]`` differs.
  2. ``model.prefill`` runs the full sequence once and returns the logits and every layer's KV
     cache (with the gaze region descriptors). The reserved slots hold placeholder tokens, but
     they sit at later positions than every prompt token, so no prompt row sees them (all
     causality is by position), and each decode step overwrites its slot before reading it.
  3. Token 0 comes from the prefill logits at slot ``g[b] - 1`` (the last prompt slot).
  4. A ``lax.while_loop`` feeds token ``i - 1`` at slot ``g[b] + i - 1`` (``q_index [B, 1]``)
     through ``model.decode``, which writes its k/v into the cache, and picks token ``i`` from
     the returned logits: greedy (argmax) when ``temperature == 0``, else temperature plus
     nucleus (top-p) sampling with ``fold_in(rng, i)``.
  5. An example that emitted a stop token is done: its later outputs are ``pad_id``. The loop
     stops after ``max_new_tokens`` tokens or as soon as every example is done.

The jitted function lives at module level, keyed on the model's graph definition and the static
options (``max_new_tokens``, greedy or not, ``return_logits``), so later calls with arrays of the
same shapes (other tokens, images, prompt lengths, keys, temperatures) do not retrace.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gaze_jax.gaze import PAD, PATCH, TEXT, TokenLayout
from gaze_jax.model.decoder import check_token_ids
from gaze_jax.model.layers import concrete
from gaze_jax.model.offload import offload as offload_cache
from gaze_jax.model.offload import offload_capacity


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  """Result of ``generate``.

  Attributes:
    tokens: int32 ``[B, M]`` new tokens; after an example's stop token, ``pad_id``.
    lengths: int32 ``[B]`` tokens up to and including the stop token (M when none came).
    num_steps: int32 scalar, tokens produced per example before the loop ended (M, or fewer
      when every example stopped early).
    logits: float32 ``[B, M, V]`` the logits that produced each token (before temperature),
      zeros for steps that did not run; only with ``return_logits=True``, else None.
    regions_read, regions_fetched: int32 ``[B]`` with an offloaded cache: the region blocks
      (per layer and KV head) the decode steps read, and those copied from host memory (the
      rest came from the device's region cache); else None.
  """
  tokens: Any
  lengths: Any
  num_steps: Any
  logits: Any = None
  regions_read: Any = None
  regions_fetched: Any = None

  @property
  def hit_rate(self) -> Optional[float]:
    """The share of region reads that the device's region cache served (offloaded only)."""
    if self.regions_read is None:
      return None
    read = int(np.sum(np.asarray(self.regions_read)))
    return 1.0 - int(np.sum(np.asarray(self.regions_fetched))) / read if read else None


jax.tree_util.register_dataclass(
    GenerateOutput, data_fields=["tokens", "lengths", "num_steps", "logits", "regions_read",
                                 "regions_fetched"], meta_fields=[])


# ------------------------------------------------------------------ sampling


def nucleus_mask(probs: jax.Array, top_p) -> jax.Array:
  """Tokens of the nucleus: the most probable tokens whose total probability first reaches
  ``top_p`` (the most probable token is always kept; ties at the cut are kept too).

  probs ``[..., V]``, top_p scalar in (0, 1] -> bool ``[..., V]``.
  """
  sp = -jnp.sort(-probs, axis=-1)                                   # descending
  before = jnp.cumsum(sp, axis=-1) - sp                              # mass ranked above each
  n_keep = jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1)
  cutoff = jnp.take_along_axis(sp, n_keep - 1, axis=-1)             # smallest kept prob
  return probs >= cutoff


def sample_logits(logits: jax.Array, rng: jax.Array, temperature, top_p) -> jax.Array:
  """Temperature plus nucleus sampling: logits float ``[B, V]`` -> int32 ids ``[B]``.

  ``temperature`` > 0 and ``top_p`` in (0, 1] may be traced scalars.
  """
  scaled = logits.astype(jnp.float32) / temperature
  keep = nucleus_mask(jax.nn.softmax(scaled, axis=-1), top_p)
  return jax.random.categorical(rng, jnp.where(keep, scaled, -jnp.inf), axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------ host-side checks


def _host(x, what: str) -> np.ndarray:
  """x as numpy; a ValueError naming ``what`` when it is traced."""
  out = concrete(x)
  if out is None:
    raise ValueError(f"generate needs a concrete (host) {what}, got a traced value; call it "
                     "outside jax.jit (it is compiled inside)")
  return out


def generated_span(layout: TokenLayout) -> tuple[np.ndarray, np.ndarray]:
  """First slot and length of each example's reserved generated span.

  Returns int ``[B]`` first slots and int ``[B]`` span lengths. Raises ValueError when an
  example has no ``Text(n, generated=True)`` span, no prompt before it, or anything but
  padding after it.
  """
  gen = _host(layout.generated, "layout").astype(bool)
  kind = _host(layout.kind, "layout")
  first = np.zeros(gen.shape[0], np.int64)
  count = np.zeros(gen.shape[0], np.int64)
  for b in range(gen.shape[0]):
    slots = np.flatnonzero(gen[b])
    if slots.size == 0:
      raise ValueError(f"example {b}: the layout has no generated span; end each prompt with "
                       "Text(max_new_tokens, generated=True) to reserve cache slots")
    g, n = int(slots[0]), int(slots.size)
    if slots[-1] != g + n - 1:
      raise ValueError(f"example {b}: the generated slots {slots.tolist()} are not one "
                       "contiguous span; generate needs exactly one generated Text at the end")
    if g == 0:
      raise ValueError(f"example {b}: the generated span starts at slot 0; generation needs a "
                       "prompt before it")
    if (kind[b, g + n:] != PAD).any():
      raise ValueError(f"example {b}: tokens follow the generated span (slots >= {g + n}); "
                       "the generated Text must be the last segment")
    first[b], count[b] = g, n
  return first, count


def _check_args(model, tokens, layout, images, max_new_tokens, rng, temperature, top_p,
                stop_tokens, pad_id):
  if not isinstance(layout, TokenLayout):
    raise ValueError(f"layout must be a TokenLayout, got {type(layout).__name__}")
  B, S = layout.kind.shape
  chex.assert_shape(tokens, (B, S), custom_message=f"tokens must be [B, S] = {(B, S)} like the "
                    "layout", exception_type=ValueError)
  # The prompt's ids (TEXT slots before the generated span) must be in the vocabulary.
  prompt = (_host(layout.kind, "layout") == TEXT) & ~_host(layout.generated, "layout").astype(bool)
  check_token_ids(_host(tokens, "tokens"), model.cfg.decoder.vocab_size, prompt, "tokens")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
      or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  first, count = generated_span(layout)
  short = np.flatnonzero(count < max_new_tokens)
  if short.size:
    b = int(short[0])
    raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the generated span reserved in "
                     f"the layout for example {b} ({int(count[b])} slots); reserve it with "
                     f"Text({max_new_tokens}, generated=True)")
  has_patches = bool((_host(layout.kind, "layout") == PATCH).any())
  if has_patches and images is None:
    raise ValueError("the layout has image/frame placeholders but images is None "
                     "(pack them with pack_images)")
  if images is not None and not has_patches:
    raise ValueError("images were given but the layout has no image/frame placeholders")
  temperature, top_p = float(temperature), float(top_p)
  if not temperature >= 0.0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs a PRNG key: pass rng=jax.random.key(...)")
  V = model.cfg.decoder.vocab_size
  if isinstance(stop_tokens, (int, np.integer)):
    stop_tokens = (stop_tokens,)
  stops = np.asarray(list(stop_tokens), dtype=np.int64).reshape(-1)
  bad = stops[(stops < 0) | (stops >= V)]
  if bad.size:
    raise ValueError(f"stop_tokens {bad.tolist()} are outside the vocabulary [0, {V})")
  if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)):
    raise ValueError(f"pad_id must be an int, got {pad_id!r}")
  # Pad to a few fixed sizes with -1 (never emitted), so that the stop list rarely retraces.
  size = max(4, 1 << int(np.ceil(np.log2(max(stops.size, 1)))))
  stops = np.concatenate([stops, np.full(size - stops.size, -1)]).astype(np.int32)
  return temperature, top_p, stops


# ------------------------------------------------------------------ the compiled loop


def _generate_impl(graphdef, state, tokens, layout, images, rng, temperature, top_p, stops,
                   pad_id, *, max_new_tokens: int, greedy: bool, return_logits: bool,
                   offload: bool):
  """Traced body of ``generate`` (see the module docstring). Shapes: tokens int32 ``[B, S]``,
  images ``[B, F, H, W, C]`` or None, stops int32 ``[n_stop]`` (-1 padded)."""
  model = nnx.merge(graphdef, state)
  M = max_new_tokens
  B = tokens.shape[0]
  first = jnp.argmax(layout.generated, axis=1).astype(jnp.int32)    # [B] first generated slot

  def pick(logits, i):                                               # [B, V] -> [B]
    if greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_logits(logits, jax.random.fold_in(rng, i), temperature, top_p)

  def emit(i, logits, state_):
    """Picks token i from logits [B, V] and records it."""
    out, lengths, done, all_logits = state_
    tok = jnp.where(done, pad_id, pick(logits, i))
    out = out.at[:, i].set(tok)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | (tok[:, None] == stops[None, :]).any(-1)
    if return_logits:
      all_logits = all_logits.at[:, i].set(logits)
    return tok, (out, lengths, done, all_logits)

  # The logits of the last prompt slot only: the LM head over the whole prompt would cost a
  # layer's worth of time to the first token.
  logits, caches = model.prefill(tokens, layout, images, logits_index=(first - 1)[:, None])
  if offload:                    # the visual K/V to host memory, a region cache on the device
    capacity = offload_capacity(model.cfg, layout.max_regions)
    caches = [offload_cache(c.k, c.v, c.descriptors, layout, capacity) for c in caches]
  # Built once for every step: the layout-only part of the decode steps' attention plan.
  plan_base = model.decode_plan(layout, first[:, None], offloaded=offload)
  last = logits[:, 0]                                                # [B, V]
  V = logits.shape[-1]
  rec = (jnp.full((B, M), pad_id, jnp.int32), jnp.zeros((B,), jnp.int32),
         jnp.zeros((B,), bool),
         jnp.zeros((B, M, V), jnp.float32) if return_logits else None)
  tok, rec = emit(0, last, rec)

  def cond(carry):
    i, _, _, rec = carry
    return (i < M) & ~jnp.all(rec[2])

  def body(carry):
    i, tok, caches, rec = carry
    q_index = (first + i - 1)[:, None]                               # [B, 1] slot of token i-1
    step_logits, caches = model.decode(tok[:, None], q_index, layout, caches,
                                       plan_base=plan_base)
    tok, rec = emit(i, step_logits[:, 0], rec)
    return i + 1, tok, caches, rec

  n, _, caches, rec = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, caches, rec))
  out, lengths, _, all_logits = rec
  read = fetched = None
  if offload:
    read = sum(c.needed for c in caches)
    fetched = sum(c.fetched for c in caches)
  return GenerateOutput(tokens=out, lengths=lengths, num_steps=n, logits=all_logits,
                        regions_read=read, regions_fetched=fetched)


_generate_jit = jax.jit(_generate_impl, static_argnums=(0,),
                        static_argnames=("max_new_tokens", "greedy", "return_logits",
                                         "offload"))


def generate(model, tokens, layout: TokenLayout, images=None, *, max_new_tokens: int,
             rng: Optional[jax.Array] = None, temperature: float = 0.0, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), pad_id: int = 0,
             return_logits: bool = False, offload: Optional[bool] = None) -> GenerateOutput:
  """Generates ``max_new_tokens`` tokens per example with one compiled prefill + decode loop.

  Args:
    model: an ``MLLM`` (NNX module; it is split and merged at the jit boundary, not mutated).
    tokens: int ``[B, S]`` prompt ids at TEXT slots (other slots, including the reserved
      generated span, are ignored).
    layout: TokenLayout ``[B, S]`` built on the host; each example ends with one
      ``Text(n, generated=True)`` span with ``n >= max_new_tokens``.
    images: ``[B, F, H, W, C]`` (see ``pack_images``), or None for text-only layouts.
    max_new_tokens: M, static; at most the shortest reserved span.
    rng: PRNG key, required when ``temperature > 0``.
    temperature: 0 for greedy decoding; > 0 divides the logits before nucleus sampling.
    top_p: nucleus mass in (0, 1]; 1 keeps the whole vocabulary.
    stop_tokens: ids that end an example (the stop token is included in its output).
    pad_id: id written after an example's stop token.
    return_logits: also return the float32 logits ``[B, M, V]`` behind every token.
    offload: keep the visual K/V in host memory while decoding, with a region cache on the
      device (``gaze_jax.model.offload``; gaze attention only); None: ``GazeConfig.offload``.
  Returns:
    GenerateOutput with tokens int32 ``[B, M]``, lengths int32 ``[B]``, num_steps and logits.
  Raises:
    ValueError for a layout without a generated span, a span shorter than ``max_new_tokens``,
    prompt ids outside the vocabulary (checked on the host), images missing or unexpected,
    bad sampling options or stop ids.
  """
  temperature, top_p, stops = _check_args(model, tokens, layout, images, max_new_tokens, rng,
                                          temperature, top_p, stop_tokens, pad_id)
  # A decode step reads the text and context keys besides its regions: only as many as the
  # batch has, not spec.max_nonvisual (S by default).
  layout = layout.for_decoding()
  # The reserved span's placeholders are never read; zero them so no check sees them.
  tokens = np.where(np.asarray(layout.generated, bool), 0, np.asarray(tokens))
  offload = model.cfg.gaze.offload if offload is None else bool(offload)
  if offload and model.cfg.gaze.attention != "gaze":
    raise ValueError("offload keeps the visual K/V in host memory for gaze attention, which "
                     "reads a few regions per step; this model's attention is dense")
  graphdef, state = nnx.split(model)
  greedy = temperature == 0.0
  if rng is None:
    rng = jax.random.key(0)                                          # unused when greedy
  return _generate_jit(graphdef, state, jnp.asarray(tokens, jnp.int32), layout,
                       None if images is None else jax.tree.map(jnp.asarray, images), rng,
                       jnp.float32(temperature if not greedy else 1.0), jnp.float32(top_p),
                       jnp.asarray(stops, jnp.int32), jnp.int32(pad_id),
                       max_new_tokens=int(max_new_tokens), greedy=greedy,
                       return_logits=bool(return_logits), offload=offload)

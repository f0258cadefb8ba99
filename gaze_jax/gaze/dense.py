"""Dense causal attention by RoPE position: ``jax.nn.dot_product_attention`` (XLA, or cuDNN on a
CUDA GPU), or a fused causal kernel that the caller passes (``kernel``: splash attention on a
TPU, ``pallas_kernels.splash.causal_kernel``; this package never imports the kernels).

Causality is by position, not slot order: the layout stores image patches region-major, so the
slots are not in position order. Two forms:
  * full sequence (the queries are the S key slots): the slots are sorted by position (PAD
    last), so that position causality becomes index causality, and the fused kernel runs with
    ``is_causal=True`` (no mask tensor; cuDNN and splash skip the masked blocks);
  * decode (T query rows at any positions): a boolean ``[B, 1, T, S]`` mask.
PAD rows, and rows that see no key, give zeros.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.extend
import jax.numpy as jnp

# cuDNN flash attention takes fp16/bf16 only and head dims that are multiples of 8, up to 128
# on every GPU (256 from Hopper on).
_CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)
_CUDNN_MAX_HEAD_DIM = 128


def _on_cuda() -> bool:
  backend = jax.extend.backend.get_backend()
  return backend.platform == "gpu" and "cuda" in backend.platform_version.lower()


IMPLEMENTATIONS = ("xla", "cudnn")


def pick_implementation(q: jax.Array, *, masked: bool) -> str:
  """The implementation for ``q [B, T, Hq, D]``: for the unmasked (causal) form, "cudnn" on a
  CUDA GPU where cuDNN takes the dtype and head dim; else "xla" (which is
  ``jax.nn.dot_product_attention``'s own default everywhere in jax 0.10). A ``masked`` call
  stays on XLA: cuDNN would turn the mask into a dense additive bias."""
  if masked:
    return "xla"
  D = q.shape[-1]
  if _on_cuda() and q.dtype in _CUDNN_DTYPES and D % 8 == 0 and D <= _CUDNN_MAX_HEAD_DIM:
    return "cudnn"
  return "xla"


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: Optional[jax.Array],
                     k_pos: jax.Array, k_valid: jax.Array, *, scale: Optional[float] = None,
                     implementation: Optional[str] = None,
                     length: Optional[int] = None,
                     kernel: Optional[Callable] = None) -> jax.Array:
  """Causal attention by position: row t sees the valid keys s with ``k_pos[s] <= q_pos[t]``.

  Args:
    q: ``[B, T, Hq, D]``; Hq a multiple of Hkv (GQA).
    k, v: ``[B, S, Hkv, D]``.
    q_pos: int ``[B, T]`` query positions (decode form), or None for the full-sequence form:
      T == S and the queries are the key slots (``q_pos == k_pos``).
    k_pos: int ``[B, S]`` key positions; unique among the valid slots of an example.
    k_valid: bool ``[B, S]``, False for PAD slots.
    scale: logit scale; default ``1 / sqrt(D)``.
    implementation: "xla", "cudnn" or None (``pick_implementation``).
    length: full-sequence form only: a static bound on the sorted positions to run, rounded
      up to a multiple of 128 (cuDNN's tile) and capped at S. Only rows whose position rank
      (index in position order) is below it are computed; the others give zeros.
    kernel: full-sequence form only: a fused index-causal kernel ``kernel(q, k, v, scale)`` on
      the position-sorted slots (``[B, n, Hq, D]`` queries, ``[B, n, Hkv, D]`` keys) run in
      place of ``jax.nn.dot_product_attention``, e.g. splash attention on a TPU
      (``pallas_kernels.splash.causal_kernel``); the decode form runs XLA's masked attention.
  Returns:
    ``[B, T, Hq, D]`` in q's dtype; zero for PAD rows (full form) and rows with no visible key.
  """
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  if implementation is None:
    implementation = pick_implementation(q, masked=q_pos is not None)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"causal_attention: implementation must be one of {IMPLEMENTATIONS} or "
                     f"None, got {implementation!r}")
  if q_pos is None:
    return _sorted_causal(q, k, v, k_pos, k_valid, scale=scale,
                          implementation=implementation, length=length, kernel=kernel)
  if length is not None:
    raise ValueError("length bounds the full-sequence form only (q_pos=None)")
  mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]    # [B, T, S]
  out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                     implementation=implementation)
  # An all-False mask row gets a uniform average of v from the kernel, not zeros.
  return jnp.where(mask.any(-1)[:, :, None, None], out, 0)


def _sorted_causal(q, k, v, pos, valid, *, scale, implementation, length, kernel):
  """The full-sequence form of ``causal_attention``: the first ``length`` slots in position
  order, through ``is_causal=True``, gathered back to slot order."""
  S = pos.shape[1]
  if q.shape[1] != S:
    raise ValueError(f"the full-sequence form needs T == S, got T={q.shape[1]}, S={S}")
  n = S if length is None else min(S, -(-max(1, int(length)) // 128) * 128)
  # PAD slots sort last (stable argsort: ties keep slot order); valid positions are unique, so
  # rank order is position order and a valid row sees exactly the keys at or before it.
  key = jnp.where(valid, pos, jnp.iinfo(pos.dtype).max)
  order = jnp.argsort(key, axis=1)                                        # [B, S] slots
  perm = order[:, :n]
  take = lambda x: jnp.take_along_axis(x, perm[:, :, None, None], axis=1)
  if kernel is not None:
    out = kernel(take(q), take(k), take(v), scale)
  else:
    out = jax.nn.dot_product_attention(take(q), take(k), take(v), is_causal=True, scale=scale,
                                       implementation=implementation)
  # PAD rows sort after every valid key, so they see all of them: zero them.
  keep = jnp.take_along_axis(valid, perm, axis=1)
  out = jnp.where(keep[:, :, None, None], out, 0)
  # Back to slot order by a gather at each slot's rank (rank >= n: the zero row appended), not
  # a scatter at perm: the partitioner splits a batched gather over the examples, but it
  # all-gathered the scatter's [B, S, H, D] output over them (a v5p step at fsdp 16).
  rank = jnp.minimum(jnp.argsort(order, axis=1), n)                       # [B, S]
  out = jnp.concatenate([out, jnp.zeros_like(out[:, :1])], axis=1)
  return jnp.take_along_axis(out, rank[:, :, None, None], axis=1)

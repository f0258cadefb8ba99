"""Metric rules shared by training (``train.step``) and evaluation (``eval``): one definition
of each, so the numbers a run logs and the numbers its evaluation reports mean the same thing.

Answer rows are the rows with ``loss_mask > 0`` (``gaze_jax.data.features``): under teacher
forcing the logits at such a row predict an answer token (or the answer's end token).

* ``target_logp``: log-probability of each row's target (NLL = its negation).
* ``answer_hits`` / ``exact_match``: argmax hits at answer rows, and the examples whose answer
  rows are all hits (greedy exact match; ``gaze_jax.eval.metrics`` shows why one teacher-forced
  pass gives it).
* ``masked_nll``: the train step's loss, token accuracy and answer-token count of a batch.
* ``routing_counts``: one layer's selections at the rows that count: valid ids per query head
  and distinct regions per KV head (``selected_union_size``), summed; ``routing_stats``: the
  train step's means of both over its routed rows.

``answer_hits`` and ``exact_match`` take numpy or jax arrays alike (evaluation calls them on
host arrays, training inside ``jax.jit``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gaze_jax.gaze.accounting import selected_union_size


def target_logp(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Log-probability of each target: float32 ``[B, S]`` from logits ``[B, S, V]`` and int
  targets ``[B, S]`` (the vocabulary axis is reduced where the logits are)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def answer_hits(pred, targets, mask):
  """bool ``[B, S]``: answer rows (``mask`` bool ``[B, S]``) whose argmax ``pred`` (int
  ``[B, S]``) equals the target."""
  return (pred == targets) & mask


def exact_match(pred, targets, mask):
  """Greedy exact match of each example: ``(match bool[B], has_answer bool[B])`` from argmax ids
  ``pred``, ``targets`` (int ``[B, S]``) and answer rows ``mask`` (bool ``[B, S]``); ``match``
  is False where the example has no answer row."""
  wrong = (pred != targets) & mask
  has = mask.any(axis=-1)
  return has & ~wrong.any(axis=-1), has


def masked_nll(logits: jax.Array, targets: jax.Array, mask: jax.Array):
  """Cross-entropy and argmax accuracy over ``mask``-ed positions.

  logits float ``[B, S, V]``, targets int ``[B, S]``, mask float ``[B, S]``.
  Returns (mean nll, accuracy, number of masked tokens) as float32 scalars.
  """
  nll = -target_logp(logits, targets)
  mask = mask.astype(jnp.float32)
  n = jnp.sum(mask)
  denom = jnp.maximum(n, 1.0)
  hit = answer_hits(jnp.argmax(logits, axis=-1), targets, mask > 0).astype(jnp.float32)
  return jnp.sum(nll * mask) / denom, jnp.sum(hit * mask) / denom, n


def routing_counts(ids: jax.Array, rows: jax.Array, num_kv_heads: int):
  """One layer's routing choices summed over ``rows``: int32 scalars ``(selected, union, n)``.

  Args:
    ids: int ``[B, S, Hq, K]`` selected region ids, -1 = none.
    rows: bool ``[B, S]``, the rows that count.
    num_kv_heads: Hkv.
  Returns:
    ``selected``: valid ids summed over the rows and query heads; ``union``: the distinct
    regions of each KV head's query heads (``selected_union_size``) summed over the rows and
    KV heads; ``n``: the number of rows.
  """
  ids = jnp.asarray(ids)
  rows = jnp.asarray(rows, bool)
  selected = jnp.where(rows[..., None], jnp.sum(ids >= 0, axis=-1), 0)             # [B, S, Hq]
  union = jnp.where(rows[..., None], selected_union_size(ids, num_kv_heads), 0)    # [B, S, Hkv]
  return jnp.sum(selected), jnp.sum(union), jnp.sum(rows)


def routing_stats(selected, num_kv_heads: int) -> dict:
  """Mean valid ids per (routed row, query head) and mean union per (routed row, KV head) over
  a list of per-layer ids ``[B, S, Hq, K]``; a routed row is one with a valid id."""
  sel_sum = union_sum = rows = 0.0
  for ids in selected:
    routed = jnp.any(ids >= 0, axis=(-1, -2))                                       # [B, S]
    sel, union, n = routing_counts(ids, routed, num_kv_heads)
    sel_sum += sel / ids.shape[2]
    union_sum += union / num_kv_heads
    rows += n
  rows = jnp.maximum(rows, 1.0)
  return {"selected_per_head": sel_sum / rows, "union_per_kv_head": union_sum / rows}

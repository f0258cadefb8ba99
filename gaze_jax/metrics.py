"""Metric rules shared by training (``train.step``) and evaluation (``eval``): one definition
of each, so the numbers a run logs and the numbers its evaluation reports mean the same thing.

Answer rows are the rows with ``loss_mask > 0`` (``gaze_jax.data.features``): under teacher
forcing the logits at such a row predict an answer token (or the answer's end token).

* ``target_logp``: log-probability of each row's target (NLL = its negation).
* ``answer_hits`` / ``exact_match``: argmax hits at answer rows, and the examples whose answer
  rows are all hits (greedy exact match; ``gaze_jax.eval.metrics`` shows why one teacher-forced
  pass gives it).
* ``masked_nll``: the train step's loss, token accuracy and answer-token count of a batch.

``answer_hits`` and ``exact_match`` take numpy or jax arrays alike (evaluation calls them on
host arrays, training inside ``jax.jit``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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

"""Non-finite training, caught: a run whose loss or gradient turns NaN or infinite stops (or
skips those steps' updates, ``config.train.on_nonfinite="skip"``) before it saves anything past
its last finite step, and a checkpoint whose parameters are not finite is refused.

``NonFiniteGuard`` follows each step's ``finite`` metric on the device (no host round trip per
step) and is read before every save and progress line: the first bad step is known exactly,
and since every save is preceded by a check, the checkpoints that rotation keeps are finite.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp

from gaze_jax.train.errors import CheckpointError

log = logging.getLogger("gaze_jax.train")


class TrainingDiverged(RuntimeError):
  """The loss or gradient of a step was not finite (the message names the step, what was kept
  and what to change)."""


class NonFiniteCheckpoint(CheckpointError):
  """A checkpoint's parameters hold NaN or infinite values."""


def nonfinite_leaves(params: Any) -> list[str]:
  """The ``/``-joined paths of the arrays of ``params`` that hold a NaN or an infinity."""
  finite = jax.device_get(jax.jit(lambda p: jax.tree.map(lambda x: jnp.isfinite(x).all(), p))(
      params))
  flat = jax.tree_util.tree_flatten_with_path(finite)[0]
  return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
          for path, ok in flat if not ok]


def check_finite(params: Any, where: str, *, allow: bool = False) -> None:
  """Raises ``NonFiniteCheckpoint`` naming ``where`` and the arrays when ``params`` are not all
  finite; with ``allow`` it only warns."""
  bad = nonfinite_leaves(params)
  if not bad:
    return
  shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
  if allow:
    log.warning("%s: non-finite parameters (%s), used as asked", where, shown)
    return
  raise NonFiniteCheckpoint(f"{where} holds non-finite parameters ({shown}): its run diverged. "
                            "Use an earlier step, or allow them explicitly")


class NonFiniteGuard:
  """Tracks the steps' ``finite`` flags on the device; ``check`` raises ``TrainingDiverged``.

  ``skip=False``: the first non-finite step stops the run. ``skip=True`` (the step dropped its
  own update): more than ``max_skipped`` such steps in a row stop it.
  """

  def __init__(self, *, skip: bool, max_skipped: int, sharding=None):
    self.skip, self.max_skipped = skip, max_skipped
    self.skipped = 0                     # steps skipped so far (read at ``check``)
    zeros = jnp.zeros((3,), jnp.int32)   # [first bad step (0: none), run of bad steps, skipped]
    self.carry = zeros if sharding is None else jax.device_put(zeros, sharding)

    def update(carry, step, finite):
      first, run, skipped = carry[0], carry[1], carry[2]
      ok = finite > 0.5
      run = jnp.where(ok, 0, run + 1)
      fatal = (run > max_skipped) if skip else ~ok
      first = jnp.where((first == 0) & fatal, step, first)
      return jnp.stack([first, run, skipped + (~ok).astype(jnp.int32)])
    self._update = jax.jit(update)

  def update(self, step: int, finite: jax.Array) -> None:
    self.carry = self._update(self.carry, jnp.int32(step), finite)

  def check(self, step: int, metrics: dict, ckpt, cleanup: Callable[[], Any]) -> None:
    """Raises ``TrainingDiverged`` (after ``ckpt``'s saves in flight end and ``cleanup``) when
    a step was fatal; logs the steps skipped since the last check."""
    first, _, skipped = (int(x) for x in jax.device_get(self.carry))
    if self.skip and skipped > self.skipped:
      log.warning("step %d: %d step(s) skipped since the last report, %d in all (non-finite "
                  "loss or gradient; config.train.on_nonfinite='skip')", step,
                  skipped - self.skipped, skipped)
    self.skipped = skipped
    if not first:
      return
    m = jax.device_get({k: metrics[k] for k in ("loss", "grad_norm")})
    ckpt.wait()
    kept = ckpt.steps()
    cleanup()
    what = (f"more than config.train.max_skipped={self.max_skipped} steps in a row up to step "
            f"{first} had a non-finite loss or gradient (their updates skipped)" if self.skip
            else f"step {first} had a non-finite loss or gradient")
    raise TrainingDiverged(
        f"{what}; at step {step}: loss {float(m['loss']):.4g}, grad_norm "
        f"{float(m['grad_norm']):.4g}. The run stopped and saved nothing past its last finite "
        f"step (checkpoints kept: {kept or 'none'}). Lower config.optim.learning_rate, keep "
        "config.optim.clip_norm > 0, or set config.train.on_nonfinite='skip'.")

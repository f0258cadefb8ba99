"""A ``jax.profiler`` trace of a few train steps (``config.train.profile_steps``), for
TensorBoard's profile plugin or xprof: what flax examples get from clu's ``Profile`` action
(clu's periodic actions import its TensorFlow summary writer; the trainer needs no TensorFlow).

The steps traced are the first ones after the step that compiles (of each start or resume), so
the trace shows the steady step, not the compiler. Each process writes its own trace under
``<workdir>/profile`` (local or ``gs://``)."""

from __future__ import annotations

import logging

import jax
from etils import epath

log = logging.getLogger("gaze_jax.train")


class StepProfile:
  """Traces steps ``first .. first + steps - 1``: call ``before(step)`` before a step runs and
  ``after(step, state)`` once it is dispatched (the trace waits for ``state``). ``steps`` 0:
  nothing."""

  def __init__(self, logdir, *, first: int, steps: int):
    self.logdir, self.first, self.last = epath.Path(logdir), first, first + steps - 1
    self.running = False

  def before(self, step: int) -> None:
    if step == self.first and self.last >= self.first:
      jax.profiler.start_trace(str(self.logdir))
      self.running = True

  def after(self, step: int, state) -> None:
    if self.running and step >= self.last:
      self.stop(state)
      log.info("profile of steps %d-%d written under %s (TensorBoard's profile plugin, or "
               "xprof)", self.first, step, self.logdir)

  def stop(self, state=None) -> None:
    """Ends a trace still running (the run stopped within it)."""
    if self.running:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.running = False

"""An ``MLLM`` without weights: ``abstract_model(cfg)``, every array a ``jax.ShapeDtypeStruct``
(``nnx.eval_shape``), for what needs only the parameters' shapes, dtypes and metadata: the
memory planner's counts (``gaze_jax.model.memory``) and the abstract trees a checkpoint
restores into (``gaze_jax.train.checkpoint``)."""

from __future__ import annotations

import jax
from flax import nnx

from gaze_jax.model.config import MLLMConfig
from gaze_jax.model.mllm import MLLM


class _ShapeOnlyRngs:
  """Stand-in for ``nnx.Rngs`` when only shapes matter: every stream returns the same key.

  ``nnx.Rngs`` bumps a traced counter on every call, and flax 0.12 then inspects the tracer's
  sharding, which costs time linear in the trace so far: building Qwen3-4B + SigLIP abstractly
  took 13 s with ``nnx.Rngs(0)`` and 0.7 s with this (same shapes, dtypes and metadata).
  """

  def __call__(self):
    return jax.random.key(0)

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return self.__call__


def abstract_model(cfg: MLLMConfig) -> MLLM:
  """``MLLM(cfg)`` with ``jax.ShapeDtypeStruct`` in place of every array (no memory used).

  Falls back to a real ``nnx.Rngs(0)`` (slower, same result) if a module needs more of the
  Rngs API than the shape-only stand-in offers.
  """
  try:
    return nnx.eval_shape(lambda: MLLM(cfg, rngs=_ShapeOnlyRngs()))
  except (AttributeError, TypeError):
    return nnx.eval_shape(lambda: MLLM(cfg, rngs=nnx.Rngs(0)))

"""What a decode step touches: apart from writing its cache slot, a gaze decode step builds no
array with a dimension the size of the cache (S slots); dense attention's step does (its scores
over every slot), which shows that the check can fail.

The check walks the traced step (jaxpr, into every sub-jaxpr: layer scans, jits, remat) and
lists each equation whose output has a dimension of size S, except the cache write
(``dynamic_update_slice``, a ``scatter`` per example) and the higher-order equations that carry the caches through.
"""

import jax
from jax.extend import core as jax_core
import numpy as np
import pytest
from flax import nnx

from gaze_jax.gaze import Image, Text
from gaze_jax.model import GazeConfig, pack_images
from gaze_jax.model.generate import generated_span
from tests.model.test_generate import make_model

NUM_IMAGES = 24           # 24 images x 16 patches: 384 visual slots in a cache of S = 452
SEQ_LEN = 452             # a size no other dimension of the step has
# Equations that only carry the caches (their bodies are walked) or write the new slot.
CARRIERS = {"scan", "pjit", "jit", "closed_call", "remat", "checkpoint", "custom_jvp_call",
            "custom_vjp_call", "custom_vjp_call_jaxpr", "cond", "while"}
# The cache write: one slot per example updated in place (a scatter once vmapped over the batch).
# An S-sized array built to be scattered into would itself be caught (broadcast, iota...).
CACHE_WRITE = {"dynamic_update_slice", "scatter"}


def sub_jaxprs(eqn):
  for value in eqn.params.values():
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
      if isinstance(v, jax_core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax_core.Jaxpr):
        yield v


def s_sized_equations(jaxpr, size: int) -> list[str]:
  """Primitive names (with output shapes) of the equations that build an array with a dimension
  of ``size``, other than cache writes and carriers."""
  found = []
  for eqn in jaxpr.eqns:
    for sub in sub_jaxprs(eqn):
      found += s_sized_equations(sub, size)
    name = eqn.primitive.name
    if name in CARRIERS or name in CACHE_WRITE:
      continue
    for var in eqn.outvars:
      shape = getattr(var.aval, "shape", ())
      if size in shape:
        found.append(f"{name}{tuple(shape)}")
  return found


def traced_decode_step(gaze: GazeConfig):
  """The jaxpr of one decode step as ``generate``'s loop runs it (layout cut for decoding,
  the plan's layout-only part built outside the step)."""
  # Head dim 16: the GPU kernels pad smaller heads (a copy of the cache that no real model's
  # 64 or 128 needs).
  model = make_model(gaze, hidden_size=64)
  example = [Text(3)] + [Image(4, 4)] * NUM_IMAGES + [Text(2), Text(4, generated=True)]
  layout = model.build_layout([example], SEQ_LEN, max_regions=4 * NUM_IMAGES,
                              max_images=NUM_IMAGES)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, (1, SEQ_LEN)).astype(np.int32)
  images = pack_images([[rng.normal(size=(16, 16, 3)).astype(np.float32)] * NUM_IMAGES], layout)
  layout = layout.for_decoding()
  _, caches = model.prefill(tokens, layout, images)
  first, _ = generated_span(layout)
  q_index = np.asarray(first, np.int32)[:, None]
  plan_base = model.decode_plan(layout, q_index)
  graphdef, state = nnx.split(model)

  def step(state, caches):
    return nnx.merge(graphdef, state).decode(tokens[:, :1], q_index, layout, caches,
                                             plan_base=plan_base)

  return jax.make_jaxpr(step)(state, caches).jaxpr, layout


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_gaze_decode_step_builds_nothing_the_size_of_the_cache(implementation):
  jaxpr, layout = traced_decode_step(GazeConfig(
      attention="gaze", top_k=2, region_shape=(2, 2), num_ctx=2,
      implementation=implementation))
  assert layout.spec.max_nonvisual < SEQ_LEN            # the step's text keys were cut
  assert s_sized_equations(jaxpr, SEQ_LEN) == []


def test_dense_decode_step_does_and_is_caught():
  jaxpr, _ = traced_decode_step(GazeConfig(attention="dense", num_ctx=0, region_shape=(2, 2)))
  assert s_sized_equations(jaxpr, SEQ_LEN)

"""The Mosaic kernel (``gaze_tpu``) on CPU: ``interpret=pltpu.InterpretParams()`` (which raises on
out-of-bounds reads and checks the scalar-prefetch pipeline) and ``interpret=True``, against the
reference; its gradient is the xla path's."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from gaze_jax.gaze import region_descriptors
from pallas_kernels import ops
from tests.gaze.random_cases import random_case
from tests.kernels.helpers import SMALL, assert_close, decode_slots, run

TPU = dataclasses.replace(SMALL, kernel="tpu", interpret=True)


@pytest.mark.parametrize("seed, group, routing, grads", [(40, 2, "head", True),
                                                          (41, 4, "group", False)])
def test_tpu_forward_and_xla_gradient_match_reference(seed, group, routing, grads):
  case = random_case(seed, group=group, routing=routing, force_video=seed % 2 == 1)
  out_r, ids_r, g_r = run(case, grads=grads)
  out_p, ids_p, g_p = run(case, config=TPU, grads=grads)
  np.testing.assert_array_equal(ids_p, ids_r)
  assert_close(out_p, out_r, "out")
  for name, a, b in zip("qkv", g_p or (), g_r or ()):
    assert_close(a, b, f"d{name}")


def test_tpu_decode_under_interpret_params():
  case = random_case(42, group=4)
  lay = case.layout
  full, _, _ = run(case, routing="head", route_prompt=True, score="dot", grads=False)
  slots = decode_slots(lay, 2)
  idx = jnp.asarray(slots, jnp.int32)
  take = lambda x: jnp.take_along_axis(x, idx[:, :, None, None], axis=1)
  config = dataclasses.replace(TPU, interpret=pltpu.InterpretParams())
  out = jax.jit(lambda q, qr, d: ops.gaze_attention(
      q, case.k, case.v, qr, None, lay, top_k=case.top_k, descriptors=d, q_index=idx,
      config=config))(take(case.q), take(case.q_route), region_descriptors(case.k_route, lay))
  assert_close(out, np.take_along_axis(np.asarray(full), slots[:, :, None, None], axis=1),
               "decode")


@pytest.mark.slow
def test_tpu_prefill_under_interpret_params():
  case = random_case(43, group=2)
  out_r, _, _ = run(case, grads=False)
  out_p, _, _ = run(case, config=dataclasses.replace(TPU, interpret=pltpu.InterpretParams()),
                    grads=False)
  assert_close(out_p, out_r, "out")

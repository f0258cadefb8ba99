"""The Mosaic kernels (``gaze_tpu``: forward, decode, backward dq and dk/dv) on CPU against the
reference, forward and gradients. ``interpret=pltpu.InterpretParams()`` raises on any
out-of-bounds block or DMA, so these cases also check that every window stays in bounds on odd
shapes: grids the regions do not divide, batch 1 and 3, odd text lengths, videos."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from gaze_jax.gaze import Image, Text, Video, build_layout, region_descriptors
from pallas_kernels import ops
from tests.gaze.random_cases import Case, random_case, spec_for
from tests.kernels.helpers import SMALL, assert_close, check_nan_in_pad_slots, decode_slots, run

TPU = dataclasses.replace(SMALL, kernel="tpu", interpret=True)
# The strict interpreter simulates every DMA of every grid step: default (larger) tiles.
STRICT = ops.KernelConfig(kernel="tpu", interpret=pltpu.InterpretParams())


def _check(case, config, grads=True):
  out_r, ids_r, g_r = run(case, grads=grads)
  out_p, ids_p, g_p = run(case, config=config, grads=grads)
  np.testing.assert_array_equal(ids_p, ids_r)
  assert_close(out_p, out_r, "out")
  for name, a, b in zip("qkv", g_p or (), g_r or ()):
    assert np.abs(np.asarray(b)).max() > 0
    assert_close(a, b, f"d{name}")


def _odd_case(batch: int, seed: int) -> Case:
  """Odd text lengths, a 5x7 image and a 3-frame 5x5 video under 2x3 / 3x3 regions (grids
  they do not divide), a generated answer of odd length."""
  ex = [[Text(3), Image(5, 7), Text(5), Video(3, 5, 5), Text(7, generated=True)],
        [Text(1), Video(2, 5, 5), Text(2), Text(9, generated=True)],
        [Image(5, 7), Text(11, generated=True)]]
  examples = [ex[i % 3] for i in range(batch)]
  region = (2, 3) if seed % 2 else (3, 3)
  spec = spec_for(examples, region, num_ctx=1, slack=3)      # 3 trailing PAD slots
  lay = build_layout(examples, spec)
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(keys[0], (batch, spec.seq_len, 4, 8))
  k = jax.random.normal(keys[1], (batch, spec.seq_len, 2, 8))
  v = jax.random.normal(keys[2], (batch, spec.seq_len, 2, 8))
  return Case(layout=lay, examples=examples, q=q, k=k, v=v, q_route=q, k_route=k, top_k=3,
              score="dot", routing="head", route_prompt=True)


# Batch 3 (three examples, 4 min in interpret mode) is slow; batch 1 covers both region shapes.
@pytest.mark.parametrize("batch, seed", [(1, 0), (1, 1),
                                         pytest.param(3, 1, marks=pytest.mark.slow)])
def test_forward_and_gradient_on_odd_shapes_under_interpret_params(batch, seed):
  _check(_odd_case(batch, seed), STRICT)


@pytest.mark.parametrize("seed, group, routing, video, newline", [
    (40, 2, "head", False, False), (41, 4, "group", True, False),
    (42, 2, "head", True, True)])   # images with newline rows (LLaVA's image_newline)
def test_forward_and_gradient_match_reference(seed, group, routing, video, newline):
  _check(random_case(seed, group=group, routing=routing, force_video=video,
                     newline_rows=newline), TPU)


def test_one_pass_and_default_tiles():
  case = random_case(44, group=2, force_video=True)
  _check(case, dataclasses.replace(TPU, passes="full"))
  _check(case, ops.KernelConfig(kernel="tpu", interpret=True), grads=False)


def test_nan_in_pad_slots_reaches_no_output_or_gradient():
  check_nan_in_pad_slots(TPU)


def test_decode_under_interpret_params():
  case = random_case(42, group=4)
  lay = case.layout
  full, _, _ = run(case, routing="head", route_prompt=True, score="dot", grads=False)
  slots = decode_slots(lay, 2)
  idx = jnp.asarray(slots, jnp.int32)
  take = lambda x: jnp.take_along_axis(x, idx[:, :, None, None], axis=1)
  out = jax.jit(lambda q, qr, d: ops.gaze_attention(
      q, case.k, case.v, qr, None, lay, top_k=case.top_k, descriptors=d, q_index=idx,
      config=dataclasses.replace(TPU, interpret=pltpu.InterpretParams())))(
      take(case.q), take(case.q_route), region_descriptors(case.k_route, lay))
  assert_close(out, np.take_along_axis(np.asarray(full), slots[:, :, None, None], axis=1),
               "decode")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [43, 45])
def test_prefill_and_gradient_under_interpret_params(seed):
  _check(random_case(seed, group=2, force_video=seed == 45), STRICT)


def test_calls_split_into_smem_sized_chunks_match_one_call(monkeypatch):
  """With a tiny SMEM budget every kernel runs as a loop of calls over chunks of examples and
  of tiles / blocks (the shapes of real training steps, whose lists outgrow SMEM)."""
  from pallas_kernels import gaze_tpu
  case = random_case(46, batch=3, group=2, force_video=True)
  monkeypatch.setattr(gaze_tpu, "SMEM_WORDS", 600)
  gaze_tpu._chunking.cache_clear()
  jax.clear_caches()
  try:
    nb, nt = gaze_tpu._chunking(3, 40, 30, 100)
    assert (nb, nt) == (1, 16)
    _check(case, TPU)
  finally:
    gaze_tpu._chunking.cache_clear()
    jax.clear_caches()

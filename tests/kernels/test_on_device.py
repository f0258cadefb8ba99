"""Compiled kernels on real hardware (skipped without it): the Triton kernels on a GPU and the
Mosaic kernel on a TPU, against the reference, in float32 and bfloat16, forward, gradients and
decode. The same checks run in interpret mode on CPU in the other files of this directory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaze_jax.gaze import region_descriptors
from pallas_kernels import ops
from tests.gaze.random_cases import random_case
from tests.kernels.helpers import assert_close, decode_slots, run

# Real head size: Triton needs tiles of at least 16 along every matmul dimension.
CASES = [(0, 1, "head"), (1, 2, "group"), (2, 4, "head"), (3, 8, "group")]


def _bf16(case):
  bf = lambda x: x.astype(jnp.bfloat16)
  return dataclasses.replace(case, q=bf(case.q), k=bf(case.k), v=bf(case.v))


def _check(case, config, atol):
  out_r, ids_r, g_r = run(case)
  out_p, ids_p, g_p = run(case, config=config)
  np.testing.assert_array_equal(ids_p, ids_r)
  assert_close(out_p, out_r, "out", atol=atol)
  if g_p is not None:
    for name, a, b in zip("qkv", g_p, g_r):
      assert_close(a, b, f"d{name}", atol=10 * atol)


@pytest.mark.gpu
@pytest.mark.parametrize("seed, group, routing", CASES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_kernels_match_reference_on_gpu(seed, group, routing, dtype):
  case = random_case(seed, group=group, routing=routing, head_dim=64)
  atol = 1e-4
  if dtype == "bfloat16":
    case, atol = _bf16(case), 3e-2
  _check(case, ops.KernelConfig(kernel="gpu", interpret=False), atol)
  _check(case, ops.KernelConfig(kernel="gpu", interpret=False, passes="full",
                                dense_rows="cudnn" if dtype == "bfloat16" else "xla"), atol)


@pytest.mark.gpu
def test_triton_decode_matches_prefill_rows_on_gpu():
  case = random_case(600, group=4, head_dim=128)
  full, _, _ = run(case, routing="head", route_prompt=True, score="dot", grads=False)
  slots = decode_slots(case.layout, 1)
  idx = jnp.asarray(slots, jnp.int32)
  take = lambda x: jnp.take_along_axis(x, idx[:, :, None, None], axis=1)
  out = jax.jit(lambda q, qr, d: ops.gaze_attention(
      q, case.k, case.v, qr, None, case.layout, top_k=case.top_k, descriptors=d, q_index=idx,
      config=ops.KernelConfig(kernel="gpu", interpret=False)))(
          take(case.q), take(case.q_route), region_descriptors(case.k_route, case.layout))
  assert_close(out, np.take_along_axis(np.asarray(full), slots[:, :, None, None], axis=1),
               "decode", atol=1e-4)


@pytest.mark.tpu
@pytest.mark.parametrize("seed, group, routing", CASES[:2])
def test_mosaic_kernel_matches_reference_on_tpu(seed, group, routing):
  case = _bf16(random_case(seed, group=group, routing=routing, head_dim=128))
  _check(case, ops.KernelConfig(kernel="tpu", interpret=False), 3e-2)

"""The kernels lower for real hardware from this CPU machine: Triton IR for CUDA (the generic
kernels, forward and backward) and Mosaic for TPU. This catches what interpret mode does not
check (power-of-two Triton tiles, Mosaic block-shape rules, unsupported primitives); compiling
to machine code and the numbers need the device (``@pytest.mark.gpu`` / ``tpu`` tests)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaze_jax.gaze import TEXT
from pallas_kernels import ops
from tests.gaze.random_cases import random_case


def _custom_calls(fn, platform, *args):
  try:
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
  except (ImportError, ModuleNotFoundError) as e:  # a jaxlib without that backend's bindings
    pytest.skip(f"cannot lower for {platform}: {e}")
  return set(re.findall(r"custom_call @([\w$.]+)", lowered.as_text()))


def _case():
  # Real head size (128) and bf16, so that the tiles are the ones a GPU / TPU would compile.
  case = random_case(50, group=4, head_dim=128, routing="head")
  bf = lambda x: x.astype(jnp.bfloat16)
  return case, bf(case.q), bf(case.k), bf(case.v)


@pytest.mark.parametrize("passes", ["split", "full"])
def test_gpu_kernels_lower_to_triton_forward_and_backward(passes):
  case, q, k, v = _case()
  cfg = ops.KernelConfig(kernel="gpu", interpret=False, passes=passes)

  def loss(q, k, v):
    out = ops.gaze_attention(q, k, v, case.q_route, case.k_route, case.layout, top_k=3,
                             config=cfg)
    return jnp.sum(out.astype(jnp.float32))

  calls = _custom_calls(jax.grad(loss, argnums=(0, 1, 2)), "cuda", q, k, v)
  assert calls == {"__gpu$xla.gpu.triton"}


@pytest.mark.parametrize("kernel, platform, call", [("gpu", "cuda", "__gpu$xla.gpu.triton"),
                                                    ("tpu", "tpu", "tpu_custom_call")])
def test_decode_kernels_lower(kernel, platform, call):
  case, q, k, v = _case()
  kind = np.asarray(case.layout.kind)
  idx = jnp.asarray(np.stack([np.flatnonzero(kind[b] == TEXT)[-1:] for b in range(2)]),
                    jnp.int32)
  qn = jnp.take_along_axis(q, idx[:, :, None, None], axis=1)
  qr = jnp.take_along_axis(case.q_route, idx[:, :, None, None], axis=1)
  cfg = ops.KernelConfig(kernel=kernel, interpret=False)
  fn = lambda q, k, v: ops.gaze_attention(q, k, v, qr, case.k_route, case.layout, top_k=3,
                                          q_index=idx, config=cfg)
  assert _custom_calls(fn, platform, qn, k, v) == {call}


def test_tpu_prefill_kernels_lower_to_mosaic():
  case, q, k, v = _case()
  cfg = ops.KernelConfig(kernel="tpu", interpret=False)
  fn = lambda q, k, v: ops.gaze_attention(q, k, v, case.q_route, case.k_route, case.layout,
                                          top_k=3, config=cfg)
  assert _custom_calls(fn, "tpu", q, k, v) == {"tpu_custom_call"}

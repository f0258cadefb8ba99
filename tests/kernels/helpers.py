"""Shared helpers of the kernel tests: one jit per case computes the output, the selection and
the gradients (through ``jax.vjp``), for the reference or for the Pallas kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gaze_jax.gaze import TEXT, gaze_attention
from pallas_kernels import ops

ATOL = 2e-5

# Small tiles so that the CPU sweeps have several tiles and splits (interpret mode).
SMALL = ops.KernelConfig(base_rows=16, routed_rows=4, min_rows=4, splits=3)


def options(case, **kw):
  opts = dict(top_k=case.top_k, score=case.score, routing=case.routing,
              route_prompt=case.route_prompt)
  opts.update(kw)
  return opts


def run(case, *, config=None, grads=True, **kw):
  """(out, ids, (dq, dk, dv) or None); ``config=None`` runs the reference implementation."""
  opts = options(case, **kw)
  w = jax.random.normal(jax.random.PRNGKey(7), case.q.shape)

  def attend(q, k, v):
    if config is None:
      return gaze_attention(q, k, v, case.q_route, case.k_route, case.layout,
                            implementation="reference", return_selected=True, **opts)
    return ops.gaze_attention(q, k, v, case.q_route, case.k_route, case.layout,
                              return_selected=True, config=config, **opts)

  @jax.jit
  def fn(q, k, v):
    if not grads:
      out, ids = attend(q, k, v)
      return out, ids, None
    (out, ids), vjp = jax.vjp(attend, q, k, v)
    g = vjp((w.astype(out.dtype), jnp.zeros(ids.shape, jax.dtypes.float0)))
    return out, ids, g

  return fn(case.q, case.k, case.v)


def decode_slots(layout, n: int = 3) -> np.ndarray:
  """The last ``n`` text slots of each example (the "new" decode tokens)."""
  kind = np.asarray(layout.kind)
  return np.stack([np.flatnonzero(kind[b] == TEXT)[-n:] for b in range(kind.shape[0])])


def assert_close(a, b, what, atol=ATOL):
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol,
                             rtol=1e-5, err_msg=what)


def nan_in_pad_slots(case):
  """``case`` with NaN written into the K/V of every PAD slot (the padding of non-divisible
  grids inside region windows, and the batch padding); routing keeps the clean keys."""
  import dataclasses
  from gaze_jax.gaze import PAD
  pad = jnp.asarray(np.asarray(case.layout.kind) == PAD)[:, :, None, None]
  assert bool(pad.any())
  poison = lambda x: jnp.where(pad, jnp.nan, x)
  return dataclasses.replace(case, k=poison(case.k), v=poison(case.v))


def check_nan_in_pad_slots(config):
  """NaN in PAD slots reaches no output or gradient of the kernels of ``config``: they equal
  the reference on the clean inputs. Seed 1 draws 2x3 regions over grids they do not divide,
  so PAD slots sit inside region windows."""
  from tests.gaze.random_cases import random_case
  case = random_case(1, group=2, force_video=True)
  out_r, _, g_r = run(case)
  out_p, _, g_p = run(nan_in_pad_slots(case), config=config)
  assert np.isfinite(np.asarray(out_p)).all()
  assert_close(out_p, out_r, "out")
  for name, a, b in zip("qkv", g_p, g_r):
    assert_close(a, b, f"d{name}")

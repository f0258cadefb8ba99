"""K from a ratio per example (``top_k_per_example``), the paper's semantics, against the
reference: a batch of a one-image and a two-image example at ratio 0.5 equals each example run
alone with its own integer K = ceil(0.5 x its regions), on every implementation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaze_jax.gaze import Image, LayoutSpec, Text, build_layout, gaze_attention

SPEC = LayoutSpec(seq_len=64, max_regions=8, max_images=2, region_shape=(2, 2), num_ctx=1)
EXAMPLES = [[Text(3), Image(4, 4), Text(4, generated=True)],                  # 4 regions
            [Text(2), Image(4, 4), Text(1), Image(4, 4), Text(4, generated=True)]]  # 8


def _inputs(seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(ks[0], (2, SPEC.seq_len, 4, 8))
  k = jax.random.normal(ks[1], (2, SPEC.seq_len, 2, 8))
  v = jax.random.normal(ks[2], (2, SPEC.seq_len, 2, 8))
  return q, k, v


def _entry(implementation):
  """The entry point of ``implementation``: the method's (``gaze_attention``) or the kernels'
  (``pallas_kernels.ops.gaze_attention``, interpret mode, small tiles)."""
  if implementation != "pallas":
    return functools.partial(gaze_attention, implementation=implementation)
  from pallas_kernels import ops
  from pallas_kernels.config import KernelConfig
  return functools.partial(ops.gaze_attention, config=KernelConfig(
      kernel="gpu", interpret=True, base_rows=16, routed_rows=4, min_rows=4))


@pytest.mark.parametrize("implementation", ["xla", "reference", "pallas"])
def test_per_example_ratio_equals_each_example_alone_with_its_own_k(implementation):
  q, k, v = _inputs()
  lay = build_layout(EXAMPLES, SPEC)
  attend = _entry(implementation)
  kw = dict(return_selected=True)
  out, ids = attend(q, k, v, q, k, lay, top_k=0.5, top_k_per_example=True, **kw)
  for b, want_k in enumerate((2, 4)):
    alone = build_layout([EXAMPLES[b]], SPEC)
    sl = slice(b, b + 1)
    o, i = gaze_attention(q[sl], k[sl], v[sl], q[sl], k[sl], alone, top_k=want_k,
                          implementation="reference", return_selected=True)
    np.testing.assert_allclose(np.asarray(out[sl]), np.asarray(o), atol=2e-5, rtol=1e-5)
    got = np.asarray(ids[b])
    want = np.asarray(i[0])
    np.testing.assert_array_equal(got[..., :want_k], want)
    assert (got[..., want_k:] == -1).all()
  # The schedule's count lowers the ratio from all regions: active_k=8 of 8 keeps all.
  out_all, ids_all = attend(q, k, v, q, k, lay, top_k=0.5, top_k_per_example=True,
                            active_k=jnp.int32(8), **kw)
  n = (np.asarray(ids_all) >= 0).sum(-1)
  assert n[0].max() == 4 and n[1].max() == 8


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_per_example_gradients_match_the_reference(implementation):
  """dq, dk, dv with K per example (the path the study trains) against the dense-masked
  reference with the same per-example K."""
  q, k, v = _inputs(1)
  lay = build_layout(EXAMPLES, SPEC)
  w = jax.random.normal(jax.random.PRNGKey(7), q.shape)
  def loss(q, k, v, impl):
    # Routing inputs are held fixed (the selection is discrete); gradients flow through q, k, v.
    out = _entry(impl)(q, k, v, jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), lay,
                       top_k=0.5, top_k_per_example=True)
    return jnp.sum(out * w)

  got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, implementation)
  want = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, "reference")
  for name, g, r in zip("qkv", got, want):
    assert float(jnp.abs(r).max()) > 0, f"d{name} of the reference is zero"
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=3e-5, rtol=1e-4,
                               err_msg=f"d{name}")


def test_per_example_needs_a_ratio():
  q, k, v = _inputs()
  with pytest.raises(ValueError, match="top_k_per_example needs top_k as a ratio"):
    gaze_attention(q, k, v, q, k, build_layout(EXAMPLES, SPEC), top_k=4,
                   top_k_per_example=True)


def test_resolved_k_is_the_one_rule_of_k():
  """``resolve_k`` (and ``GazeConfig.resolve_k``): the static K_max, the per-example ratio, the
  count of a full example, the schedule's target and each example's K."""
  from gaze_jax.gaze.routing import TopKError, resolve_k
  from gaze_jax.model import GazeConfig

  rk = resolve_k(0.25, 10)
  assert (rk.k_max, rk.ratio, rk.count, rk.schedule_target) == (3, None, 3, 3)
  rk = resolve_k(0.25, 10, per_example=True)
  assert (rk.k_max, rk.ratio, rk.count, rk.schedule_target) == (10, 0.25, 3, 2)
  assert GazeConfig(top_k=0.25, top_k_per_example=True).resolve_k(10) == rk
  valid = np.array([[1] * 10, [1] * 4 + [0] * 6], bool)
  np.testing.assert_array_equal(rk.per_example(valid), [3, 1])
  np.testing.assert_array_equal(resolve_k(4, 10).per_example(valid), [4, 4])
  with pytest.raises(TopKError, match=r"top_k=11 must be in \[1, max_regions=10\]"):
    resolve_k(11, 10)
  with pytest.raises(TopKError, match="top_k_per_example needs top_k as a ratio"):
    resolve_k(3, 10, per_example=True)

"""K from a ratio per example (``top_k_per_example``), the paper's semantics, against the
reference: a batch of a one-image and a two-image example at ratio 0.5 equals each example run
alone with its own integer K = ceil(0.5 x its regions), on every implementation."""

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


@pytest.mark.parametrize("implementation", ["xla", "reference", "pallas"])
def test_per_example_ratio_equals_each_example_alone_with_its_own_k(implementation):
  q, k, v = _inputs()
  lay = build_layout(EXAMPLES, SPEC)
  kw = dict(implementation=implementation, return_selected=True)
  if implementation == "pallas":
    kw["kernel_config"] = {"kernel": "gpu", "interpret": True, "base_rows": 16,
                           "routed_rows": 4, "min_rows": 4}
    from pallas_kernels.config import KernelConfig
    kw["kernel_config"] = KernelConfig(**kw["kernel_config"])
  out, ids = gaze_attention(q, k, v, q, k, lay, top_k=0.5, top_k_per_example=True, **kw)
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
  out_all, ids_all = gaze_attention(q, k, v, q, k, lay, top_k=0.5, top_k_per_example=True,
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
  kw = {}
  if implementation == "pallas":
    from pallas_kernels.config import KernelConfig
    kw["kernel_config"] = KernelConfig(kernel="gpu", interpret=True, base_rows=16,
                                       routed_rows=4, min_rows=4)

  def loss(q, k, v, impl, **extra):
    # Routing inputs are held fixed (the selection is discrete); gradients flow through q, k, v.
    out = gaze_attention(q, k, v, jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), lay,
                         top_k=0.5, top_k_per_example=True, implementation=impl, **extra)
    return jnp.sum(out * w)

  got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, implementation, **kw)
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

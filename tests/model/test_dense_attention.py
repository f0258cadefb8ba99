"""Dense causal attention by position (``gaze_jax.gaze.causal_attention`` and the model's
``dense_attention``) against a plain einsum + mask reference: forward and gradients, on a
layout whose patches are stored region-major, with GQA, PAD slots inside and after the
sequence, the decode form and rows that see nothing. Each full-sequence case runs with XLA and
with splash attention (the TPU kernel, in the Pallas interpreter here)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaze_jax.gaze import PAD, Image, LayoutSpec, Text, build_layout, causal_attention
from gaze_jax.model import dense_attention
from pallas_kernels import splash
from pallas_kernels.config import KernelConfig

HQ, HKV, D = 4, 2, 8


def _reference(q, k, v, q_pos, k_pos, k_valid, q_valid=None):
  """Softmax over the keys with ``k_pos <= q_pos`` and ``k_valid``, heads repeated for GQA;
  zeros for a row that sees no key or is not ``q_valid``."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
  if q_valid is not None:
    mask &= q_valid[:, :, None]
  mask = mask[:, None]
  logits = jnp.where(mask, logits, -1e30)
  e = jnp.where(mask, jnp.exp(logits - logits.max(-1, keepdims=True)), 0.0)
  denom = e.sum(-1, keepdims=True)
  p = e / jnp.where(denom > 0, denom, 1.0)
  return jnp.einsum("bhts,bshd->bthd", p, v)


def _layout(seq_len=64, long_answer=0):
  """Text, a 5x5 image in 2x2 regions (region-major, PAD slots where the grid does not fill a
  region), a context token, text and a generated answer; a text-only second example."""
  spec = LayoutSpec(seq_len=seq_len, max_regions=9, max_images=1, region_shape=(2, 2),
                    num_ctx=1)
  segs = [Text(3), Image(5, 5), Text(2), Text(4 + long_answer, generated=True)]
  lay = build_layout([segs, [Text(7)]], spec)
  pos = np.asarray(lay.position)
  valid = np.asarray(lay.kind) != PAD
  assert (np.diff(pos[0][valid[0]]) < 0).any()         # slot order is not position order
  assert (~valid[0][:valid[0].nonzero()[0].max()]).any()  # PAD slots inside the sequence
  return jnp.asarray(pos), jnp.asarray(valid)


def _qkv(seed, T, S):
  """float32 q ``[2, T, HQ, D]``, k, v ``[2, S, HKV, D]`` and a cotangent ``w`` like q."""
  kq, kk, kv, kw = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(kq, (2, T, HQ, D))
  k = jax.random.normal(kk, (2, S, HKV, D))
  v = jax.random.normal(kv, (2, S, HKV, D))
  w = jax.random.normal(kw, (2, T, HQ, D))
  return q, k, v, w


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grads(fn, w, q, k, v, *args):
  """``fn(q, k, v, *args)`` and the gradients of ``sum(fn * w)`` wrt q, k, v."""
  out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, *args), q, k, v)
  return out, pull(w.astype(out.dtype))


def _assert_matches(fn, ref, w, q, k, v, *args):
  out, grads = _value_and_grads(fn, w, q, k, v, *args)
  want, want_grads = _value_and_grads(ref, w, q, k, v, *args)
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
  for name, a, b in zip("qkv", grads, want_grads):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")
  return np.asarray(out)


# The full-sequence form (queries = the S slots) by both entry points, and its reference.
def _full(q, k, v, pos, valid, length=None, implementation=None):
  """``implementation="splash"``: splash attention passed as the fused kernel."""
  if implementation == "splash":
    return causal_attention(q, k, v, None, pos, valid, length=length,
                            kernel=splash.causal_kernel())
  return causal_attention(q, k, v, None, pos, valid, length=length,
                          implementation=implementation)


def _full_splash(q, k, v, pos, valid):
  return _full(q, k, v, pos, valid, implementation="splash")


def _full_model(q, k, v, pos, valid):
  return dense_attention(q, k, v, pos, pos, valid)


def _full_model_splash(q, k, v, pos, valid):
  return dense_attention(q, k, v, pos, pos, valid, KernelConfig(dense_rows="splash"))


def _full_reference(q, k, v, pos, valid):
  return _reference(q, k, v, pos, pos, valid, valid)


_full_forward = jax.jit(_full, static_argnums=(5, 6))
_full_reference_forward = jax.jit(_full_reference)
IMPLS = ["xla", "splash"]


@pytest.mark.parametrize("fn", [_full, _full_model, _full_splash, _full_model_splash],
                         ids=["causal_attention", "dense_attention", "causal_attention-splash",
                              "dense_attention-splash"])
def test_full_form_matches_reference_on_region_major_layout(fn):
  pos, valid = _layout()
  q, k, v, w = _qkv(0, 64, 64)
  out = _assert_matches(fn, _full_reference, w, q, k, v, pos, valid)
  assert not out[~np.asarray(valid)].any()                   # PAD rows are zero


@pytest.mark.parametrize("fn", [causal_attention, dense_attention],
                         ids=["causal_attention", "dense_attention"])
def test_decode_form_matches_reference(fn):
  """T = 3 query rows at chosen slots against the whole sequence as keys: a generated token, a
  patch and a row before every key (example 0); a text token, one whose only earlier keys are
  invalid and a PAD slot (example 1, first 3 keys invalid). The last two see nothing."""
  pos, valid = _layout()
  valid = valid.at[1, :3].set(False)
  q_index = jnp.asarray([[40, 20, 0], [6, 1, 30]], jnp.int32)
  q_pos = jnp.take_along_axis(pos, q_index, axis=1).at[0, 2].set(-1)
  q, k, v, w = _qkv(1, 3, 64)
  out = _assert_matches(fn, _reference, w, q, k, v, q_pos, pos, valid)
  sees = np.array([[True, True, False], [True, False, False]])
  assert not out[~sees].any() and out[sees].all(axis=-1).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_length_bounds_the_rows_by_position_rank(impl):
  """length=100 rounds up to 128 of S=160 sorted positions: rows ranked below 128 in position
  order are exact, the others zero."""
  pos, valid = _layout(seq_len=160, long_answer=100)
  q, k, v, _ = _qkv(3, 160, 160)
  out = np.asarray(_full_forward(q, k, v, pos, valid, 100, impl))
  want = np.asarray(_full_reference_forward(q, k, v, pos, valid))
  key = np.where(np.asarray(valid), np.asarray(pos), np.iinfo(np.int32).max)
  rank = np.argsort(np.argsort(key, axis=1, kind="stable"), axis=1)
  run = rank < 128
  assert (~run[0] & np.asarray(valid)[0]).any()              # some valid rows are cut off
  np.testing.assert_allclose(out[run], want[run], atol=1e-5, rtol=1e-5)
  assert not out[~run].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_stays_close_to_float32(impl):
  pos, valid = _layout(seq_len=160, long_answer=100)
  q, k, v, _ = _qkv(3, 160, 160)
  bf = lambda x: x.astype(jnp.bfloat16)
  out = _full_forward(bf(q), bf(k), bf(v), pos, valid, None, impl)
  assert out.dtype == jnp.bfloat16
  want = _full_reference_forward(q, k, v, pos, valid)
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2, rtol=3e-2)


def test_unknown_implementation_is_an_error():
  pos, valid = _layout()
  q, k, v, _ = _qkv(0, 64, 64)
  with pytest.raises(ValueError, match="implementation must be one of.*'flash'"):
    causal_attention(q, k, v, None, pos, valid, implementation="flash")

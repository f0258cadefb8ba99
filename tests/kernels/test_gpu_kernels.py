"""The generic Pallas kernels (``gaze_gpu``) in interpret mode on CPU against the dense-mask
reference: forward, gradients (custom_vjp) and the decode form, over the layout sweep of the core
tests (images, videos, non-divisible grids, GQA 1/2/4/8, K = 1 .. all, head / group routing)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaze_jax.gaze import (PATCH, TEXT, Image, LayoutSpec, Text, build_layout, gaze_attention,
                           region_descriptors)
from pallas_kernels import ops
from pallas_kernels import plan as kplan
from tests.gaze.random_cases import Case, random_case
from tests.kernels.helpers import SMALL, assert_close, check_nan_in_pad_slots, decode_slots, run


# Seeds whose drawn region shapes are 3x3, 2x3, 3x3, 1x1, 3x2, 2x2, 2x3, 3x3 (grids often not
# divisible by them); the rest of the structure is pinned by the position i in the sweep.
SWEEP_SEEDS = (0, 1, 2, 11, 4, 21, 6, 7)


def _sweep_case(i):
  # Every GQA ratio with both routings and both scores, K = 1 and K = all regions, a video in
  # every other case, separate route inputs in some.
  return random_case(SWEEP_SEEDS[i], group=[1, 2, 4, 8][i % 4], routing=["head", "group"][i // 4],
                     score=["dot", "cosine"][i % 2], top_k={0: 1, 3: "all"}.get(i % 4),
                     force_video=i % 2 == 1, separate_route=i % 3 == 0)


@pytest.mark.parametrize("i", range(len(SWEEP_SEEDS)))
def test_forward_and_gradients_match_reference(i):
  case = _sweep_case(i)
  # Small tiles (several tiles per sequence) with both pass plans; cases 2 and 6 use the
  # default tiles (one or two tiles per sequence here).
  config = dataclasses.replace(SMALL, passes=["split", "full"][i % 2])
  if i % 4 == 2:
    config = ops.KernelConfig()
  out_r, ids_r, g_r = run(case)
  out_p, ids_p, g_p = run(case, config=config)
  np.testing.assert_array_equal(ids_p, ids_r)
  assert (np.asarray(ids_r) >= 0).any()
  assert_close(out_p, out_r, "out")
  for name, a, b in zip("qkv", g_p, g_r):
    assert np.abs(np.asarray(b)).max() > 0
    assert_close(a, b, f"d{name}")


@pytest.mark.parametrize("passes", ["split", "full"])
def test_newline_rows_match_reference(passes):
  """Images with a text slot after each row of patches (LLaVA's image_newline), a video in
  the first example: forward and gradients against the reference."""
  case = random_case(33, group=2, top_k=2, force_video=True, newline_rows=True)
  out_r, ids_r, g_r = run(case)
  out_p, ids_p, g_p = run(case, config=dataclasses.replace(SMALL, passes=passes))
  np.testing.assert_array_equal(ids_p, ids_r)
  assert (np.asarray(ids_r) >= 0).any()
  assert_close(out_p, out_r, "out")
  for name, a, b in zip("qkv", g_p, g_r):
    assert_close(a, b, f"d{name}")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 116))
def test_forward_and_gradients_match_reference_more_seeds(seed):
  case = random_case(seed)
  out_r, ids_r, g_r = run(case)
  out_p, ids_p, g_p = run(case, config=SMALL)
  assert_close(out_p, out_r, "out")
  for name, a, b in zip("qkv", g_p, g_r):
    assert_close(a, b, f"d{name}")


def _long_answer_case():
  """Prompt text, two images (3x3 regions, a non-divisible 7x6 grid) and a long generated
  answer: with route_prompt=False the dense rows (patches, prompt text) end well before S."""
  spec = LayoutSpec(seq_len=264, max_regions=12, max_images=2, region_shape=(3, 3), num_ctx=2)
  segs = [Text(6), Image(6, 6), Text(3), Image(7, 6), Text(4), Text(150, generated=True)]
  lay = build_layout([segs, segs[:1] + segs[3:]], spec)
  keys = jax.random.split(jax.random.PRNGKey(5), 3)
  q = jax.random.normal(keys[0], (2, 264, 4, 8))
  k = jax.random.normal(keys[1], (2, 264, 2, 8))
  v = jax.random.normal(keys[2], (2, 264, 2, 8))
  return Case(layout=lay, examples=[segs], q=q, k=k, v=v, q_route=q, k_route=k, top_k=3,
              score="dot", routing="head", route_prompt=False)


@pytest.mark.parametrize("dense_rows", ["xla", "splash"])
def test_dense_rows_by_a_dense_kernel_match_reference(dense_rows):
  """dense_rows="xla" / "splash": patch and unrouted rows through jax.nn.dot_product_attention
  (cuDNN on a GPU) or splash attention (TPU; interpreted here) on the position-sorted sequence,
  over only the first ``dense_len`` positions (found from the concrete layout), the other rows
  through the kernels."""
  case = _long_answer_case()
  routed = np.asarray(case.layout.kind) == TEXT
  routed &= np.asarray(case.layout.generated)
  assert kplan.static_dense_len(case.layout, routed, None) < case.layout.seq_len
  config = dataclasses.replace(SMALL, dense_rows=dense_rows)
  out_r, _, g_r = run(case)
  out_p, _, g_p = run(case, config=config)
  assert_close(out_p, out_r, "out")
  for name, a, b in zip("qkv", g_p, g_r):
    assert_close(a, b, f"d{name}")


def test_active_k_is_traced_and_masks_ranks():
  case = random_case(33, group=2)
  K = case.layout.max_regions
  traces = []

  @jax.jit
  def f(ak):
    traces.append(1)
    return ops.gaze_attention(case.q, case.k, case.v, case.q, case.k, case.layout, top_k=K,
                              active_k=ak, config=SMALL)

  small = max(1, K // 3)
  out_small = f(jnp.int32(small))
  out_all = f(jnp.int32(K))
  assert len(traces) == 1
  want_small, _, _ = run(case, top_k=small, score="dot", routing="head", route_prompt=True,
                         grads=False)
  want_all, _, _ = run(case, top_k=K, score="dot", routing="head", route_prompt=True,
                       grads=False)
  assert_close(out_small, want_small, "active_k small")
  assert_close(out_all, want_all, "active_k all")


def test_bfloat16_inputs_stay_close_to_float32():
  case = random_case(34, group=4)
  out32, ids, _ = run(case, grads=False)
  bf = lambda x: x.astype(jnp.bfloat16)
  out16 = jax.jit(lambda q, k, v, s: ops.gaze_attention(
      q, k, v, None, None, case.layout, top_k=case.top_k, selection=s,
      route_prompt=case.route_prompt, config=SMALL))(bf(case.q), bf(case.k), bf(case.v), ids)
  assert out16.dtype == jnp.bfloat16
  assert_close(out16, out32, "bf16", atol=5e-2)


# ---------------------------------------------------------------- decode form


def _decode(case, routing, config, k=None, v=None, n_new=3):
  lay = case.layout
  slots = decode_slots(lay, n_new)
  idx = jnp.asarray(slots, jnp.int32)
  take = lambda x: jnp.take_along_axis(x, idx[:, :, None, None], axis=1)
  desc = region_descriptors(case.k_route, lay)
  k = case.k if k is None else k
  v = case.v if v is None else v
  step = jax.jit(lambda q, kc, vc, qr, d: ops.gaze_attention(
      q, kc, vc, qr, None, lay, top_k=case.top_k, routing=routing, descriptors=d, q_index=idx,
      return_selected=True, config=config))
  return step(take(case.q), k, v, take(case.q_route), desc), slots


@pytest.mark.parametrize("seed, routing, group, config", [
    (600, "head", 2, SMALL), (601, "group", 4, SMALL),
    (602, "head", 8, None)])   # None: the kernels' default KernelConfig
def test_decode_over_cache_equals_prefill_rows(seed, routing, group, config):
  case = random_case(seed, group=group)
  lay = case.layout
  full, full_ids, _ = run(case, routing=routing, route_prompt=True, score="dot", grads=False)
  slots = decode_slots(lay)
  # The cache holds large garbage after each example's last query: causality must hide it.
  noise = jax.random.normal(jax.random.PRNGKey(seed), case.k.shape) * 100
  after = (jnp.arange(lay.seq_len)[None, :, None, None]
           > jnp.asarray(slots.max(1))[:, None, None, None])
  (out, ids), _ = _decode(case, routing, config, k=jnp.where(after, noise, case.k),
                          v=jnp.where(after, noise, case.v))
  want = np.take_along_axis(np.asarray(full), slots[:, :, None, None], axis=1)
  want_ids = np.take_along_axis(np.asarray(full_ids), slots[:, :, None, None], axis=1)
  np.testing.assert_array_equal(ids, want_ids)
  assert_close(out, want, "decode")


def test_decode_reads_only_text_context_and_selected_regions():
  """Changing the K/V of every visual slot outside the group's selected regions must not change
  a decode output (the kernel's masked loads never bring them in)."""
  case = random_case(610, group=4)
  lay = case.layout
  (out, ids), slots = _decode(case, "head", SMALL, n_new=1)
  sel = np.asarray(ids)                                              # [B, 1, Hq, K]
  region = np.asarray(lay.region)
  B, S = region.shape
  Hkv = case.k.shape[2]
  G = sel.shape[2] // Hkv
  unselected = np.zeros((B, S, Hkv), bool)
  for b in range(B):
    for h in range(Hkv):
      union = sel[b, :, h * G:(h + 1) * G].ravel()
      unselected[b, :, h] = (np.asarray(lay.kind[b]) == PATCH) & ~np.isin(region[b], union)
  assert unselected.any()
  m = jnp.asarray(unselected)[..., None]
  (out2, _), _ = _decode(case, "head", SMALL, k=jnp.where(m, 1e3, case.k),
                         v=jnp.where(m, -1e3, case.v), n_new=1)
  assert_close(out2, out, "unselected K/V changed the output")


def test_nan_in_pad_slots_reaches_no_output_or_gradient():
  check_nan_in_pad_slots(SMALL)

"""Descriptors, routing scores, causal candidates, top-K, K as count or ratio, and random
routing (the baseline)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaze_jax.gaze import (PATCH, TEXT, Image, LayoutSpec, Text, build_layout, candidate_regions,
                           random_selection, region_descriptors, region_scores, resolve_top_k,
                           route, routed_rows, select_top_k, token_info)
from gaze_jax.gaze.routing import per_example_k
from tests.gaze.random_cases import random_case


def test_descriptors_are_mean_of_valid_keys_per_region():
  case = random_case(11, kv_heads=2)
  lay = case.layout
  desc = np.asarray(region_descriptors(case.k_route, lay))
  k = np.asarray(case.k_route)
  for b in range(k.shape[0]):
    for r in range(lay.max_regions):
      members = (np.asarray(lay.region[b]) == r) & (np.asarray(lay.kind[b]) == PATCH)
      want = k[b, members].mean(axis=0) if members.any() else np.zeros(k.shape[2:])
      np.testing.assert_allclose(desc[b, r], want, atol=1e-6)


def test_descriptors_ignore_padding_slots():
  """Padding slots of a non-divisible grid must not enter the mean, whatever they hold."""
  case = random_case(12)
  lay = case.layout
  pad = jnp.asarray(lay.kind) != PATCH
  noisy = jnp.where(pad[:, :, None, None], 1e4, case.k_route)
  np.testing.assert_allclose(region_descriptors(noisy, lay),
                             region_descriptors(case.k_route, lay), atol=1e-6)


def test_newline_rows_do_not_route_and_are_no_part_of_any_region():
  """A 4x4 grid with a newline slot after each row, 2x2 regions: the newline slots are text
  that carries the image's frame id, they do not route (they attend as the patch rows do), the
  text after the image does, and their keys never enter a descriptor."""
  spec = LayoutSpec(seq_len=40, max_regions=4, max_images=1, region_shape=(2, 2), num_ctx=0)
  lay = build_layout([[Text(1), Image(4, 4, newline_rows=True), Text(2)]], spec)
  kind, pos = np.asarray(lay.kind[0]), np.asarray(lay.position[0])
  newline = np.flatnonzero((kind == TEXT) & (pos > 0) & (pos < 21))
  np.testing.assert_array_equal(pos[newline], [5, 10, 15, 20])
  np.testing.assert_array_equal(np.asarray(lay.frame[0])[newline], [0, 0, 0, 0])
  query = token_info(lay, jnp.asarray(newline)[None])
  assert not np.asarray(routed_rows(query, True)).any()
  after = np.flatnonzero((kind == TEXT) & (pos > 20))
  assert np.asarray(routed_rows(token_info(lay, jnp.asarray(after)[None]), True)).all()
  k = jax.random.normal(jax.random.PRNGKey(0), (1, 40, 1, 4))
  noisy = k.at[0, newline].set(1e4)
  np.testing.assert_allclose(region_descriptors(noisy, lay), region_descriptors(k, lay))


def test_dot_and_cosine_scores_against_numpy():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)      # Hq = 4
  d = rng.normal(size=(2, 5, 2, 8)).astype(np.float32)      # Hkv = 2 -> G = 2
  dot = np.asarray(region_scores(jnp.asarray(q), jnp.asarray(d), score="dot"))
  cos = np.asarray(region_scores(jnp.asarray(q), jnp.asarray(d), score="cosine"))
  for h in range(4):
    kv = h // 2
    want = np.einsum("btd,brd->btr", q[:, :, h], d[:, :, kv]) / np.sqrt(8)
    np.testing.assert_allclose(dot[:, :, h], want, rtol=1e-5, atol=1e-6)
    qn = q[:, :, h] / np.linalg.norm(q[:, :, h], axis=-1, keepdims=True)
    dn = d[:, :, kv] / np.linalg.norm(d[:, :, kv], axis=-1, keepdims=True)
    np.testing.assert_allclose(cos[:, :, h], np.einsum("btd,brd->btr", qn, dn), atol=1e-5)


def test_only_regions_wholly_before_the_query_are_candidates():
  valid = jnp.array([[True, True, True, False]])
  last_pos = jnp.array([[4, 9, 20, 0]])
  q_pos = jnp.array([[4, 5, 10, 21]])
  cand = np.asarray(candidate_regions(valid, last_pos, q_pos))[0]
  np.testing.assert_array_equal(cand, [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]])


def test_top_k_matches_numpy_ranking_and_masks_non_candidates():
  rng = np.random.default_rng(1)
  scores = rng.normal(size=(2, 4, 2, 7)).astype(np.float32)
  cand = rng.random((2, 4, 7)) < 0.6
  sel = np.asarray(select_top_k(jnp.asarray(scores), jnp.asarray(cand), top_k=3,
                                num_kv_heads=2).ids)
  for b, t, h in np.ndindex(2, 4, 2):
    allowed = np.flatnonzero(cand[b, t])
    order = allowed[np.argsort(-scores[b, t, h, allowed])][:3]
    want = np.full(3, -1)
    want[:len(order)] = order
    np.testing.assert_array_equal(sel[b, t, h], want)


def test_group_routing_ranks_by_the_sum_over_the_group():
  rng = np.random.default_rng(2)
  scores = rng.normal(size=(1, 3, 4, 6)).astype(np.float32)   # Hq 4, Hkv 2
  cand = np.ones((1, 3, 6), bool)
  sel = np.asarray(select_top_k(jnp.asarray(scores), jnp.asarray(cand), top_k=2,
                                routing="group", num_kv_heads=2).ids)
  for t, g in np.ndindex(3, 2):
    summed = scores[0, t, 2 * g] + scores[0, t, 2 * g + 1]
    want = np.argsort(-summed)[:2]
    np.testing.assert_array_equal(sel[0, t, 2 * g], want)
    np.testing.assert_array_equal(sel[0, t, 2 * g + 1], want)


def test_traced_active_k_drops_lower_ranks_without_recompiling():
  rng = np.random.default_rng(3)
  scores = jnp.asarray(rng.normal(size=(1, 2, 1, 8)).astype(np.float32))
  cand = jnp.ones((1, 2, 8), bool)
  traces = []

  @jax.jit
  def f(k):
    traces.append(1)
    return select_top_k(scores, cand, top_k=5, active_k=k, num_kv_heads=1).ids

  full = np.asarray(f(5))
  for k in (1, 3, 0):
    got = np.asarray(f(k))
    np.testing.assert_array_equal(got[..., :k], full[..., :k])
    assert (got[..., k:] == -1).all()
  assert len(traces) == 1


def test_rows_that_do_not_route_select_nothing():
  case = random_case(13, kv_heads=1)
  lay = case.layout
  desc = region_descriptors(case.k_route, lay)
  routed = jnp.zeros(lay.kind.shape, bool)
  sel = route(case.q_route, desc, lay.region_valid, lay.region_last_pos, lay.position, routed,
              top_k=2)
  assert (np.asarray(sel.ids) == -1).all()


def test_per_example_k_by_hand():
  valid = jnp.array([[True] * 4 + [False] * 4, [True] * 8])          # 4 and 8 regions of 8
  k = lambda r, a=None: np.asarray(per_example_k(r, valid, a)).tolist()
  assert k(0.25) == [1, 2] and k(0.3) == [2, 3] and k(1.0) == [4, 8]
  # A schedule's count a of the 8: the ratio is max(0.25, a / 8).
  assert k(0.25, 8) == [4, 8] and k(0.25, 4) == [2, 4] and k(0.25, 2) == [1, 2]
  assert k(0.01) == [1, 1]                                           # at least one
  with pytest.raises(ValueError, match="ratio in"):
    per_example_k(1.5, valid)


def test_select_top_k_takes_a_k_per_example():
  rng = np.random.default_rng(4)
  scores = jnp.asarray(rng.normal(size=(2, 3, 2, 6)).astype(np.float32))
  cand = jnp.ones((2, 3, 6), bool)
  full = np.asarray(select_top_k(scores, cand, top_k=5, num_kv_heads=2).ids)
  got = np.asarray(select_top_k(scores, cand, top_k=5, active_k=jnp.array([2, 4]),
                                num_kv_heads=2).ids)
  np.testing.assert_array_equal(got[0, ..., :2], full[0, ..., :2])
  np.testing.assert_array_equal(got[1, ..., :4], full[1, ..., :4])
  assert (got[0, ..., 2:] == -1).all() and (got[1, ..., 4:] == -1).all()


def _random_draws(n_draws, routing="head"):
  """``n_draws`` random selections over 6 regions (one invalid), 4 rows at positions that see
  0, 2, 3 and 5 candidates, 4 query heads over 2 KV heads, K = 3; the last row unrouted."""
  valid = jnp.array([[True, True, True, True, True, False]])
  last_pos = jnp.array([[3, 5, 8, 11, 14, 0]])
  q_pos = jnp.array([[2, 6, 9, 20, 20]])
  routed = jnp.array([[True, True, True, True, False]])
  draw = jax.jit(lambda key: random_selection(key, valid, last_pos, q_pos, routed, num_heads=4,
                                              num_kv_heads=2, top_k=3, routing=routing).ids)
  return np.stack([np.asarray(draw(jax.random.PRNGKey(i)))[0] for i in range(n_draws)])


def test_random_routing_draws_k_distinct_candidates_uniformly():
  ids = _random_draws(600)                                 # [draws, T, Hq, K]
  n_cand = [0, 2, 3, 5]
  for t, n in enumerate(n_cand):
    row = ids[:, t]
    assert ((row >= 0).sum(-1) == min(3, n)).all()       # min(K, candidates), -1 after
    chosen = row[row >= 0]
    assert chosen.size == 0 or chosen.max() < n          # only causal candidates
    for d, h in np.ndindex(row.shape[:2]):
      got = row[d, h][row[d, h] >= 0]
      assert len(set(got.tolist())) == got.size          # distinct
  assert (ids[:, 4] == -1).all()                          # the unrouted row
  # Uniform over the 5 candidates of row 3: each is in a draw with probability 3/5; heads
  # draw independently.
  freq = np.stack([(ids[:, 3] == r).any(-1).mean(0) for r in range(5)])   # [5, Hq]
  np.testing.assert_allclose(freq, 0.6, atol=0.07)
  assert (ids[:, 3, 0] != ids[:, 3, 1]).any()


def test_random_group_routing_shares_a_draw_per_group():
  ids = _random_draws(50, routing="group")
  np.testing.assert_array_equal(ids[:, :, 0], ids[:, :, 1])
  np.testing.assert_array_equal(ids[:, :, 2], ids[:, :, 3])
  assert (ids[:, 3, 0] != ids[:, 3, 2]).any()


@pytest.mark.parametrize("top_k, n, want", [
    (4, 16, 4), (16, 16, 16), (0.25, 16, 4), (0.3, 16, 5), (1.0, 16, 16), (0.01, 16, 1),
    (20 / 128, 128, 20)])
def test_top_k_as_count_or_ratio(top_k, n, want):
  assert resolve_top_k(top_k, n) == want


@pytest.mark.parametrize("top_k, match", [
    (17, "K larger than the number of regions"), (0, r"top_k=0 must be at least 1"),
    (1.2, "ratio"), (0.0, "ratio"), (True, "int count or a float ratio"),
    ("4", "int count or a float ratio")])
def test_bad_top_k(top_k, match):
  with pytest.raises(ValueError, match=match):
    resolve_top_k(top_k, 16)

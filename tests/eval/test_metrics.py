"""Evaluation metrics on hand-made layouts, selections, logits and configs; every expected
number is worked out by hand in the test."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaze_jax.eval import budget, metrics
from gaze_jax.eval.text import normalize_answer, text_exact_match
from gaze_jax.gaze import Image, LayoutSpec, Text, Video, build_layout
from gaze_jax.metrics import exact_match, masked_nll, target_logp
from gaze_jax.model import GazeConfig
from gaze_jax.model.presets import cambrian_4b, tiny


def _slots(layout, b, kind_text_index):
  """Slot of the ``kind_text_index``-th text token of example b."""
  return int(np.flatnonzero(np.asarray(layout.kind)[b] == 0)[kind_text_index])


# ------------------------------------------------------------------ routing accuracy


def test_routing_accuracy_and_random_rate_by_hand():
  # Example 0: 4 regions (one 4x4 image, 2x2 regions). Example 1: two images, 8 regions, with a
  # text row between them (only the first image's 4 regions are candidates there). Example 2
  # has no ground truth: it must be left out.
  spec = LayoutSpec(seq_len=48, max_regions=8, max_images=2, region_shape=(2, 2), num_ctx=0)
  layout = build_layout([
      [Text(2), Image(4, 4), Text(3)],
      [Text(1), Image(4, 4), Text(1), Image(4, 4), Text(2)],
      [Text(2), Image(4, 4), Text(3)],
  ], spec)
  L, S, Hq, K = 2, 48, 2, 2
  sel = [np.full((3, S, Hq, K), -1, np.int32) for _ in range(L)]
  r0 = _slots(layout, 0, 3)            # after the image
  ra = _slots(layout, 1, 1)            # between the images
  rb = _slots(layout, 1, 2)            # after both
  r2 = _slots(layout, 2, 3)
  prompt = _slots(layout, 0, 4)        # a routed row that is not an answer row
  sel[0][0, r0] = [[1, 0], [2, -1]]    # 1 hit of 3 selections
  sel[0][1, ra] = [[2, 3], [0, 1]]     # 1 hit of 4
  sel[0][1, rb] = [[5, 6], [7, -1]]    # 2 hits of 3
  sel[0][2, r2] = [[0, 1], [2, 3]]     # no ground truth: ignored
  sel[0][0, prompt] = [[1, 1], [1, 1]]  # not an answer row: ignored
  sel[1][0, r0] = [[1, -1], [-1, -1]]  # layer 1: 1 hit of 1
  gt = np.array([[1, -1, -1], [2, 5, 6], [-1, -1, -1]], np.int32)
  mask = np.zeros((3, S), np.float32)
  mask[0, r0] = mask[1, ra] = mask[1, rb] = mask[2, r2] = 1
  stats = metrics.routing_accuracy(sel, gt, layout, metrics.answer_rows(mask))
  # Random rates |G & C| / |C|: row r0 1/4; row ra {2} of {0..3}: 1/4; row rb {2,5,6} of 8: 3/8.
  np.testing.assert_allclose(stats.hits, [4, 1])
  np.testing.assert_allclose(stats.selections, [10, 1])
  np.testing.assert_allclose(stats.random_hits, [3 / 4 + 4 / 4 + 3 * 3 / 8, 1 / 4])
  np.testing.assert_allclose(stats.accuracy_per_layer, [0.4, 1.0])
  np.testing.assert_allclose(stats.random_per_layer, [2.875 / 10, 0.25])
  assert stats.accuracy == pytest.approx(0.7)
  assert stats.random == pytest.approx((0.2875 + 0.25) / 2)
  # Sums add up over batches.
  both = stats + stats
  np.testing.assert_allclose(both.accuracy_per_layer, [0.4, 1.0])
  # Ceiling min(selections, |G & C|) per (row, head): r0 1 + 1, ra 1 + 1, rb 2 + 1 of 10;
  # layer 1: 1 of 1.
  np.testing.assert_allclose(stats.ceiling_per_layer, [0.7, 1.0])
  # Top-1 at the rows that predict an answer (r0, ra, rb: none follows another answer row):
  # rank 0 of each head, r0 1 (hit) / 2, ra 2 (hit) / 0, rb 5 (hit) / 7; layer 1 only r0's
  # head 0 selects (a hit). Uniform rates 1/4, 1/4, 3/8 per head.
  np.testing.assert_allclose(stats.top1_per_layer, [0.5, 1.0])
  np.testing.assert_allclose(stats.top1_random_per_layer, [(2 / 4 + 2 / 4 + 6 / 8) / 6, 0.25])
  # Coverage: the union over heads of r0 {0, 1, 2} of 4, ra {0..3} of 4, rb {5, 6, 7} of 8;
  # layer 1: r0 {1} of 4, nothing at ra and rb.
  np.testing.assert_allclose(stats.coverage_per_layer, [(0.75 + 1 + 0.375) / 3, 0.25 / 3])
  summary = stats.summary()
  assert summary["share_ceiling"] == pytest.approx(0.85)
  assert summary["top1"] == pytest.approx(0.75)
  assert summary["coverage_per_layer"] == pytest.approx([2.125 / 3, 0.25 / 3])
  # No object boxes: no salience baseline.
  assert np.isnan(summary["top1_salience"])
  # Salience |G & C & O| / |C & O|: objects in regions {1, 3} (example 0) and {2, 3, 5}
  # (example 1). r0: {1} of {1, 3} = 1/2; ra (candidates 0..3): {2} of {2, 3} = 1/2; rb: {2, 5}
  # of {2, 3, 5} = 2/3; two heads each at layer 0, r0's head 0 alone at layer 1.
  objects = np.array([[1, 3, -1], [2, 3, 5], [0, -1, -1]], np.int32)
  sal = metrics.routing_accuracy(sel, gt, layout, metrics.answer_rows(mask), objects)
  np.testing.assert_allclose(sal.top1_salience_per_layer, [(1 + 1 + 4 / 3) / 6, 0.5])
  np.testing.assert_allclose(sal.top1_per_layer, stats.top1_per_layer)
  # An example without objects among its candidates leaves the salience samples.
  objects[1] = -1
  sal = metrics.routing_accuracy(sel, gt, layout, metrics.answer_rows(mask), objects)
  np.testing.assert_allclose(sal.top1_salience_samples, [2, 1])
  np.testing.assert_allclose(sal.top1_salience_per_layer, [0.5, 0.5])


def test_first_answer_rows_are_the_rows_before_each_answer():
  spec = LayoutSpec(seq_len=32, max_regions=4, max_images=1, region_shape=(2, 2), num_ctx=0)
  layout = build_layout([[Text(2), Image(4, 4), Text(3), Text(2), Text(2)]], spec)
  t = [_slots(layout, 0, i) for i in (2, 3, 5, 6)]     # two answers of two rows each
  b, first = metrics.first_answer_rows(layout, (np.zeros(4, np.int64), np.asarray(t)))
  np.testing.assert_array_equal(first, [t[0], t[2]])


def test_routing_accuracy_rejects_bad_ground_truth():
  spec = LayoutSpec(seq_len=32, max_regions=4, max_images=1, region_shape=(2, 2), num_ctx=0)
  layout = build_layout([[Text(1), Image(4, 4), Text(2)]], spec)
  sel = [np.full((1, 32, 1, 1), -1, np.int32)]
  with pytest.raises(ValueError, match="outside the layout's 4 regions"):
    metrics.routing_accuracy(sel, np.array([[4]]), layout, (np.array([0]), np.array([20])))


# ------------------------------------------------------------------ visual KV entries


def test_kv_entries_count_valid_tokens_and_context_by_hand():
  # A 3x3 grid cut into 2x2 regions: valid tokens per region 4, 2, 2, 1 (padded at the edge).
  spec = LayoutSpec(seq_len=40, max_regions=4, max_images=1, region_shape=(2, 2), num_ctx=2)
  layout = build_layout([[Text(2), Image(3, 3), Text(2), Text(2, generated=True)]], spec)
  np.testing.assert_array_equal(metrics.region_token_counts(layout)[0], [4, 2, 2, 1])
  q, g = _slots(layout, 0, 3), _slots(layout, 0, 4)      # last prompt row, an answer row
  sel = [np.full((1, 40, 2, 2), -1, np.int32) for _ in range(2)]
  sel[0][0, q] = [[0, 3], [1, -1]]      # 4 + 1 and 2 tokens
  sel[1][0, q] = [[2, -1], [-1, -1]]    # 2 and 0 tokens
  sel[0][0, g] = [[0, 1], [2, 3]]       # 6 and 3
  sel[1][0, g] = [[0, 1], [0, 2]]       # 6 and 6
  rows = (np.array([0, 0]), np.array([q, g]))
  kv = metrics.routed_kv_entries(sel, layout, rows, route_prompt=True, num_kv_heads=1)
  # Each routed row also reads the 2 context tokens.
  per = [5, 2, 2, 0, 6, 3, 6, 6]
  assert kv.samples == 8
  assert kv.mean_entries == pytest.approx(np.mean(per) + 2)
  assert kv.mean_candidates == 4
  # Union over the 2 query heads of the one KV head: {0,1,3}, {2}, {0,1,2,3}, {0,1,2}.
  assert kv.mean_union == pytest.approx((3 + 1 + 4 + 3) / 4)
  # route_prompt=False: the prompt row is dense (9 patches + 2 context tokens).
  kv2 = metrics.routed_kv_entries(sel, layout, rows, route_prompt=False)
  assert kv2.mean_entries == pytest.approx((4 * 11 + 6 + 3 + 6 + 6 + 4 * 2) / 8)
  dense = metrics.dense_kv_entries(layout, rows)
  assert dense.mean_entries == 11
  # Fixed regions are not scored while decoding.
  assert metrics.routed_kv_entries(sel, layout, rows, scores_routing=False).mean_candidates == 0


# ------------------------------------------------------------------ exact match


def test_teacher_forced_exact_match_on_hand_made_logits():
  B, S, V = 3, 6, 5
  targets = np.array([[0, 3, 1, 4, 0, 0], [0, 2, 2, 2, 0, 0], [0, 1, 0, 0, 0, 0]])
  mask = np.array([[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], np.float32)
  want_argmax = np.array([[2, 3, 1, 4, 1, 1],      # right at every answer row (row 0 is not one)
                          [0, 2, 3, 2, 0, 0],      # wrong at the middle answer row
                          [0, 1, 0, 0, 0, 0]])     # no answer rows
  logits = np.random.default_rng(0).normal(size=(B, S, V))
  logits[np.arange(B)[:, None], np.arange(S)[None], want_argmax] = 10.0
  match, has = metrics.teacher_forced_exact_match(logits, targets, mask)
  np.testing.assert_array_equal(match, [True, False, False])
  np.testing.assert_array_equal(has, [True, True, False])
  assert metrics.token_accuracy(logits, targets, mask) == (5, 6)
  with pytest.raises(ValueError, match="must all be"):
    metrics.teacher_forced_exact_match(logits[:, :4], targets, mask)
  # The same rules under jit (the train step's loss, accuracy and exact match).
  loss, acc, n = jax.jit(masked_nll)(jnp.asarray(logits, jnp.float32), targets, mask)
  assert float(n) == 6 and float(acc) == pytest.approx(5 / 6)
  logp = np.asarray(target_logp(jnp.asarray(logits, jnp.float32), targets))
  assert float(loss) == pytest.approx(-(logp * mask).sum() / 6, rel=1e-6)
  jit_match, jit_has = jax.jit(exact_match)(jnp.asarray(want_argmax), targets, mask > 0)
  np.testing.assert_array_equal(jit_match, match)
  np.testing.assert_array_equal(jit_has, has)


def test_text_normalisation():
  assert normalize_answer("  The Red   circle. ") == "red circle"
  assert normalize_answer("An apple!") == normalize_answer("apple")
  assert normalize_answer("x-y") == "x y" and normalize_answer("a-b") == "b"   # "a" is an article
  assert normalize_answer("Théâtre, «oui»") == "théâtre oui"
  assert text_exact_match("the cat", ["dog", "Cat."])
  assert not text_exact_match("two cats", "cat")
  with pytest.raises(ValueError):
    text_exact_match("x", [])


# ------------------------------------------------------------------ configured budget


def test_configured_budget_and_flops_by_hand():
  cfg = tiny()          # K=4, 2x2 regions, N=4; 4 heads of 16 dims, 2 layers
  spec = LayoutSpec(seq_len=160, max_regions=16, max_images=2, region_shape=(2, 2), num_ctx=4)
  layout = build_layout([[Text(3), Image(8, 8), Text(4)], [Text(2), Video(2, 4, 4), Text(3)]],
                        spec)
  c = budget.configured_budget(cfg, layout)
  # Example 0: 4*4 + 4*1 = 20 entries; example 1 (2 frames): 16 + 8 = 24.
  assert c["top_k"] == 4 and c["examples"] == 2
  assert c["visual_kv"] == 22
  assert c["dense_visual_kv"] == ((64 + 4) + (32 + 8)) / 2
  hd = 4 * 16 * 2                                     # Hq * D * L
  assert c["flops"]["regions"] == 4 * 16 * hd        # 4 FLOPs per entry, head dim and layer
  assert c["flops"]["context"] == 4 * ((4 + 8) / 2) * hd
  assert c["flops"]["routing"] == 2 * ((16 + 8) / 2) * hd
  assert c["flops"]["total"] == pytest.approx(sum(c["flops"][k] for k in
                                                  ("regions", "context", "routing")))
  # A ratio K resolves against max_regions as the model does: ceil(0.25 * 16) = 4.
  ratio = dataclasses.replace(cfg, gaze=dataclasses.replace(cfg.gaze, top_k=0.25))
  assert budget.configured_budget(ratio, layout)["visual_kv"] == 22
  dense = dataclasses.replace(cfg, gaze=GazeConfig(attention="dense", region_shape=(2, 2)))
  d = budget.configured_budget(dense, layout)
  assert d["visual_kv"] == 54 and d["flops"]["total"] == 4 * 54 * hd
  # Measured FLOPs from means.
  assert budget.measured_flops(cfg, 10.0, 3.0) == {"attention": 40.0 * hd, "routing": 6.0 * hd,
                                                   "total": 46.0 * hd}


def test_configured_budget_with_k_per_example_by_hand():
  """A ratio K per example (``top_k_per_example``) is ceil(ratio x the example's own regions),
  not of the batch's max_regions: a short input gets fewer regions."""
  cfg = tiny()          # 2x2 regions, N=4; 4 heads of 16 dims, 2 layers
  spec = LayoutSpec(seq_len=160, max_regions=16, max_images=2, region_shape=(2, 2), num_ctx=4)
  # Example 0: one 8x8 image, 16 regions; example 1: one 4x4 image, 4 regions.
  layout = build_layout([[Text(3), Image(8, 8), Text(4)], [Text(2), Image(4, 4), Text(3)]], spec)
  ratio = dataclasses.replace(cfg, gaze=dataclasses.replace(cfg.gaze, top_k=0.25))
  per = dataclasses.replace(ratio, gaze=dataclasses.replace(ratio.gaze, top_k_per_example=True))
  # Of max_regions: K = ceil(0.25 * 16) = 4 for both: 4*4 + 4 = 20 entries each.
  assert budget.configured_budget(ratio, layout)["visual_kv"] == 20
  # Per example: K = 4 and ceil(0.25 * 4) = 1: 4*4 + 4 = 20 and 1*4 + 4 = 8 entries.
  c = budget.configured_budget(per, layout)
  assert c["visual_kv"] == (20 + 8) / 2 and c["top_k"] == 0.25
  hd = 4 * 16 * 2                                     # Hq * D * L
  assert c["flops"]["regions"] == 4 * ((16 + 4) / 2) * hd
  assert c["flops"]["context"] == 4 * 4 * hd
  assert c["flops"]["routing"] == 2 * ((16 + 4) / 2) * hd
  # The token-matched baseline has one grid per batch: the mean K, round((4 + 1) / 2) = 2
  # regions of 4 tokens; of max_regions, 4 regions.
  from gaze_jax.eval.baselines import gaze_budget_tokens
  assert list(budget.example_top_k(per, layout)) == [4, 1]
  assert gaze_budget_tokens(per, layout) == 2 * 4
  assert gaze_budget_tokens(ratio, layout) == 4 * 4


def test_paper_budget_on_the_cambrian_shape():
  # One 24x24 image, 6x6 regions, K = 4, N = 4: the paper's "144+4" against 576 dense.
  cfg = cambrian_4b()
  spec = LayoutSpec(seq_len=700, max_regions=16, max_images=1, region_shape=(6, 6), num_ctx=4)
  c = budget.configured_budget(cfg, build_layout([[Text(5), Image(24, 24), Text(9)]], spec))
  assert c["visual_kv"] == 148 and c["patches"] == 576
  # Qwen3-4B: 32 heads x 128 dims x 36 layers.
  assert c["flops"]["regions"] == 4 * 144 * 32 * 128 * 36

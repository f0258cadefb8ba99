"""Progressive top-K schedules and the budget / FLOP accounting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaze_jax.gaze import (decode_flops, progressive_top_k, selected_union_size,
                           visual_kv_budget)


def test_linear_schedule_goes_from_all_regions_to_target():
  ks = [int(progressive_top_k(s, start=16, target=4, warmup_steps=12)) for s in range(0, 20)]
  assert ks[0] == 16 and ks[12:] == [4] * 8
  assert ks[6] == 10                                   # halfway: 16 - 12 / 2
  assert all(a >= b for a, b in zip(ks, ks[1:]))       # never goes back up
  assert min(ks[:12]) > 4                              # the target only at the end


def test_cosine_schedule_starts_and_ends_slowly():
  ks = np.array([int(progressive_top_k(s, start=100, target=10, warmup_steps=100,
                                       shape="cosine")) for s in range(0, 101)])
  assert ks[0] == 100 and ks[100] == 10 and ks[50] == 55
  assert ks[0] - ks[10] < ks[45] - ks[55]              # slower at the start than the middle
  assert np.all(np.diff(ks) <= 0)


def test_step_schedule_has_plateaus():
  ks = [int(progressive_top_k(s, start=16, target=4, warmup_steps=8, shape="step",
                              num_stages=4)) for s in range(0, 10)]
  assert ks == [16, 16, 13, 13, 10, 10, 7, 7, 4, 4]


def test_schedule_is_traceable_and_clean_at_zero_warmup():
  f = jax.jit(lambda s: progressive_top_k(s, start=16, target=4, warmup_steps=10))
  assert int(f(jnp.int32(0))) == 16 and int(f(jnp.int32(10))) == 4
  assert int(progressive_top_k(0, start=16, target=4, warmup_steps=0)) == 4


@pytest.mark.parametrize("kw, match", [
    (dict(target=0), "target"), (dict(target=20), "target"), (dict(warmup_steps=-1), "warmup"),
    (dict(shape="exp"), "shape"), (dict(num_stages=0), "num_stages")])
def test_schedule_errors(kw, match):
  args = dict(start=16, target=4, warmup_steps=10)
  args.update(kw)
  with pytest.raises(ValueError, match=match):
    progressive_top_k(0, **args)


def test_kv_budget_on_the_papers_video_example():
  # 8 frames of 576 tokens, 36-token regions, 20 regions selected, 4 context tokens per frame.
  b = visual_kv_budget(top_k=20, region_size=36, num_ctx=4, n_frames=8, tokens_per_frame=576)
  assert b.gaze_entries == 752 and b.dense_entries == 4608
  assert round(100 * b.fraction, 1) == 16.3


def test_image_budget_matches_method_defaults():
  # K = 4 of 16 regions of a 24x24 grid: 144 + 4 entries against 576 dense.
  b = visual_kv_budget(top_k=4, region_size=36, num_ctx=4, n_frames=1, tokens_per_frame=576)
  assert (b.gaze_entries, b.dense_entries) == (148, 576)


def test_context_token_flops_match_the_papers_figure():
  # Qwen3-4B (36 layers, 32 query heads, head dim 128), 64 frames x 4 context tokens: the paper
  # reports 0.15 GFLOPs per decode query for the context tokens.
  f = decode_flops(top_k=0, region_size=9, num_ctx=4, n_frames=64, n_regions=1024,
                   num_heads=32, head_dim=128, num_layers=36)
  assert round(f["context"] / 1e9, 2) == 0.15
  assert f["regions"] == 0
  assert f["routing"] == 2 * 1024 * 32 * 128 * 36


def test_budget_errors():
  with pytest.raises(ValueError, match="top_k"):
    visual_kv_budget(top_k=-1, region_size=36, num_ctx=4, n_frames=1, tokens_per_frame=576)
  with pytest.raises(ValueError, match="> 0"):
    visual_kv_budget(top_k=1, region_size=36, num_ctx=4, n_frames=0, tokens_per_frame=576)


def test_union_of_a_groups_selections():
  ids = jnp.array([[[[0, 1], [1, 2], [5, -1], [5, -1]]]])    # [1, 1, Hq=4, K=2]
  np.testing.assert_array_equal(selected_union_size(ids, num_kv_heads=2), [[[3, 1]]])
  np.testing.assert_array_equal(selected_union_size(ids, num_kv_heads=1), [[[4]]])

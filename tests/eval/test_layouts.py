"""Layout surgery for the baselines: segments read back from layouts, the token-matched grid and
its inputs, the fixed-from-question anchor rows (no model needed)."""

import types

import numpy as np
import pytest

from gaze_jax.data.features import ModelInputs, next_token_targets
from gaze_jax.eval import baselines, layouts
from gaze_jax.gaze import PATCH, TEXT, Image, LayoutSpec, Text, Video, build_layout
from gaze_jax.model.presets import tiny

MIXED = [
    [Text(3), Image(8, 8), Text(4), Image(8, 8), Text(5, generated=True), Text(1)],
    [Text(6), Video(2, 4, 4), Text(2), Text(3, generated=True)],
    [Text(2), Image(8, 8), Video(3, 4, 4), Text(4), Text(2, generated=True)],
]
SPEC = LayoutSpec(seq_len=220, max_regions=40, max_images=5, region_shape=(2, 2), num_ctx=4)


def _inputs(examples, spec, seed=0, image_size=64):
  """ModelInputs with random tokens and images, targets by position."""
  layout = build_layout(examples, spec)
  rng = np.random.default_rng(seed)
  B, S = np.asarray(layout.kind).shape
  tokens = np.where(np.asarray(layout.kind) == TEXT, rng.integers(10, 500, (B, S)), 0)
  tokens = tokens.astype(np.int32)
  targets = np.zeros((B, S), np.int32)
  mask = np.zeros((B, S), np.float32)
  for b in range(B):
    targets[b], mask[b] = next_token_targets(tokens[b], np.asarray(layout.kind)[b],
                                             np.asarray(layout.position)[b],
                                             np.asarray(layout.generated)[b])
  images = rng.uniform(-1, 1, (B, spec.max_images, image_size, image_size, 3)).astype(np.float32)
  return ModelInputs(tokens, images, layout, targets, mask, np.full((B, 4), -1, np.int32))


def test_segments_read_back_rebuild_the_same_layout():
  layout = build_layout(MIXED, SPEC)
  segs = [layouts.example_segments(layout, b) for b in range(3)]
  assert segs[1] == [Text(6), Video(2, 4, 4), Text(2), Text(3, generated=True)]
  again = build_layout(segs, SPEC)
  for name, a in layout.to_features().items():
    np.testing.assert_array_equal(np.asarray(getattr(again, name)), np.asarray(a), err_msg=name)


@pytest.mark.parametrize("num_ctx", [0, 2])
def test_newline_rows_and_tiles_read_back(num_ctx):
  """LLaVA-OneVision's layouts: a base image, a tiled grid with a newline after each row, a
  one-row grid with its newline; rebuilt slot for slot."""
  spec = LayoutSpec(seq_len=160, max_regions=40, max_images=8, region_shape=(1, 2),
                    num_ctx=num_ctx)
  segs = [Text(3), Image(4, 4), Image(6, 8, newline_rows=True, tiles=(2, 2)), Text(2),
          Image(1, 4, newline_rows=True), Text(2, generated=True)]
  layout = build_layout([segs], spec)
  back = layouts.example_segments(layout, 0)
  if num_ctx:
    assert back == segs
  again = build_layout([back], spec)
  for name, a in layout.to_features().items():
    np.testing.assert_array_equal(np.asarray(getattr(again, name)), np.asarray(a), err_msg=name)


def test_token_matched_grid_follows_the_documented_rule():
  # Paper shape: 24x24 grid, K=4 regions of 6x6 -> 144 tokens -> a 12x12 grid (half the side).
  spec = LayoutSpec(seq_len=700, max_regions=16, max_images=1, region_shape=(6, 6), num_ctx=4)
  layout = build_layout([[Text(3), Image(24, 24), Text(5)]], spec)
  m = layouts.match_tokens(layout, image_hw=(384, 384), patch_size=16, video_pool=2,
                           target_tokens=4 * 36)
  assert m.grid == (12, 12) and m.image_hw == (192, 192) and m.visual_tokens == 144
  # 8 regions -> 288 tokens: 17x17 = 289 is the closest square.
  m = layouts.match_tokens(layout, image_hw=(384, 384), patch_size=16, video_pool=2,
                           target_tokens=288)
  assert m.grid == (17, 17)
  forced = layouts.match_tokens(layout, image_hw=(384, 384), patch_size=16, video_pool=2,
                                target_tokens=144, grid=6)
  assert forced.grid == (6, 6) and forced.visual_tokens == 36
  with pytest.raises(ValueError, match="grid=30"):
    layouts.match_tokens(layout, image_hw=(384, 384), patch_size=16, video_pool=2,
                         target_tokens=144, grid=30)


def test_token_matched_inputs_have_the_budget_s_visual_tokens():
  # The tiny preset: K = 4 regions of 2x2 -> 16 tokens; an 8x8 image becomes 4x4 (32 px), a
  # pooled 4x4 video frame becomes 2x2.
  model = types.SimpleNamespace(cfg=tiny())
  examples = [[Text(3), Image(8, 8), Text(4), Text(3, generated=True)],
              [Text(2), Image(8, 8), Text(2), Text(2, generated=True)]]
  spec = LayoutSpec(seq_len=120, max_regions=16, max_images=1, region_shape=(2, 2), num_ctx=4)
  inputs = _inputs(examples, spec)
  new, match = baselines.token_matched_inputs(model, inputs)
  assert match.grid == (4, 4) and match.image_hw == (32, 32)
  kind = np.asarray(new.layout.kind)
  assert ((kind == PATCH).sum(1) == 16).all()
  assert np.asarray(new.images).shape == (2, 1, 32, 32, 3)
  np.testing.assert_array_equal(np.asarray(new.layout.frame_grid)[:, 0], [[4, 4], [4, 4]])
  for b in range(2):
    # Same text in the same order, same answer targets.
    old_text = inputs.tokens[b][np.asarray(inputs.layout.kind)[b] == TEXT]
    np.testing.assert_array_equal(new.tokens[b][kind[b] == TEXT], old_text)
    np.testing.assert_array_equal(new.targets[b][new.loss_mask[b] > 0],
                                  inputs.targets[b][inputs.loss_mask[b] > 0])
  # The resampled images are a downscaled version: a constant image stays constant.
  const = inputs._replace(images=np.full_like(inputs.images, 0.25))
  np.testing.assert_allclose(baselines.token_matched_inputs(model, const)[0].images, 0.25,
                             atol=1e-6)


def test_token_matched_video_frames_stay_pooled():
  model = types.SimpleNamespace(cfg=tiny())            # video_pool 2
  spec = LayoutSpec(seq_len=160, max_regions=16, max_images=4, region_shape=(2, 2), num_ctx=4)
  inputs = _inputs([[Text(2), Video(4, 4, 4), Text(3), Text(2, generated=True)]], spec)
  new, match = baselines.token_matched_inputs(model, inputs)
  # Target 16 tokens over 4 frames: full grid 4 -> pooled 2x2 -> 4 x 4 = 16 tokens.
  assert match.grid == (4, 4) and match.visual_tokens == 16
  np.testing.assert_array_equal(np.asarray(new.layout.frame_grid)[0], [[2, 2]] * 4)
  assert new.layout.spec.region_shape == (2, 2)


def test_question_anchor_rows_point_at_the_last_prompt_row():
  spec = LayoutSpec(seq_len=120, max_regions=16, max_images=1, region_shape=(2, 2), num_ctx=4)
  layout = build_layout([[Text(2), Image(8, 8), Text(3), Text(4, generated=True), Text(2),
                          Text(3, generated=True)]], spec)
  kind, gen = np.asarray(layout.kind)[0], np.asarray(layout.generated)[0]
  text = np.flatnonzero(kind == TEXT)
  first_q_end, first_answer = text[4], text[5:9]      # the 5th text token ends question 1
  second_q_end, second_answer = text[10], text[11:14]
  anchors = layouts.question_anchor_rows(layout)[0]
  assert (anchors[first_answer] == first_q_end).all()
  assert (anchors[second_answer] == second_q_end).all()
  others = np.setdiff1d(np.arange(120), np.r_[first_answer, second_answer])
  np.testing.assert_array_equal(anchors[others], others)
  assert gen[first_answer].all() and not gen[first_q_end]

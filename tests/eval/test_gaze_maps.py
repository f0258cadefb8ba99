"""Gaze maps: heat from hand-made selections, PNG files of the documented size, selected regions
brighter than the others (padded edge regions, pooled video frames, frames and layers side by
side), the question and the predicted and true answers above, and a legend that names the
ground truth only where it is drawn."""

import numpy as np
import pytest

PIL = pytest.importorskip("PIL", reason="gaze maps need Pillow")
from PIL import Image as PILImage  # noqa: E402

from gaze_jax.eval import gaze_maps  # noqa: E402
from gaze_jax.gaze import Image, LayoutSpec, Text, Video, build_layout  # noqa: E402

GREY = 0.0          # normalised pixel value of mid grey (128 after un-normalising)


def _luma(img, y0, y1, x0, x1):
  return float(np.asarray(img, np.float64)[y0:y1, x0:x1].mean())


def test_selection_heat_counts_heads():
  sel = [np.full((1, 5, 4, 2), -1, np.int32) for _ in range(2)]
  sel[0][0, 3] = [[1, 2], [1, -1], [0, 2], [2, -1]]     # region 1: 2 heads, 2: 3 heads, 0: 1
  sel[1][0, 3] = [[1, -1], [-1, -1], [-1, -1], [-1, -1]]
  heat = gaze_maps.selection_heat(sel, 0, [3], 4, layer=0)
  np.testing.assert_allclose(heat, [[0.25, 0.5, 0.75, 0.0]])
  mean = gaze_maps.selection_heat(sel, 0, [3], 4, layer=None)
  np.testing.assert_allclose(mean, [[0.125, 0.375, 0.375, 0.0]])
  with pytest.raises(ValueError, match="layer=2"):
    gaze_maps.selection_heat(sel, 0, [3], 4, layer=2)


def test_padded_edge_regions_are_drawn_where_they_are(tmp_path):
  # 48 px image, patch 8 -> 6x6 grid; 4x4 regions: region 1 covers columns 4-5 (x 32..48 px),
  # cut at the border. Panel scale 256 / 48.
  spec = LayoutSpec(seq_len=80, max_regions=4, max_images=1, region_shape=(4, 4), num_ctx=0)
  layout = build_layout([[Text(2), Image(6, 6), Text(3)]], spec)
  images = np.full((1, 1, 48, 48, 3), GREY, np.float32)
  S = 80
  sel = [np.full((1, S, 2, 1), -1, np.int32)]
  row = int(np.flatnonzero(np.asarray(layout.kind)[0] == 0)[3])
  sel[0][0, row] = [[1], [1]]                               # both heads: region 1
  paths = gaze_maps.write_gaze_maps(tmp_path, images, layout, sel, {0: [row]},
                                    labels={0: ["token"]})
  img = np.asarray(PILImage.open(paths[0]).convert("RGB"))
  assert img.shape == (14 + 256, 256, 3)
  y0 = 14
  s = 256 / 48
  # Inside region 1 (x from 32 px = 171 panel px to the border, y 0..171): bright.
  inside = _luma(img, y0 + 5, y0 + int(32 * s) - 5, int(32 * s) + 5, 256)
  left = _luma(img, y0 + 5, y0 + int(32 * s) - 5, 5, int(32 * s) - 5)      # region 0
  below = _luma(img, y0 + int(32 * s) + 5, y0 + 250, int(32 * s) + 5, 256)  # region 3
  assert inside > left + 40 and inside > below + 40
  # Unselected regions show the dimmed grey (128 * 0.45).
  assert abs(left - 128 * gaze_maps.DIM) < 3


def test_video_frames_side_by_side_pooled_regions(tmp_path):
  # Two pooled 4x4 frames of 64 px images (2x2 regions of 2x2 pooled patches = 32 px each)
  # and one full 8x8 image; heat on frame 1's region (row 1, col 0) = global id 4 + 2 = 6
  # at row 0, and on the image's region 0 (id 8) at half the heads at row 1.
  spec = LayoutSpec(seq_len=200, max_regions=24, max_images=3, region_shape=(2, 2), num_ctx=4)
  layout = build_layout([[Text(2), Video(2, 4, 4), Text(2), Image(8, 8), Text(4)]], spec)
  rows = [int(r) for r in np.flatnonzero(np.asarray(layout.kind)[0] == 0)[-2:]]
  sel = [np.full((1, 200, 4, 1), -1, np.int32)]
  sel[0][0, rows[0]] = 6
  sel[0][0, rows[1], :2] = 8
  images = np.full((1, 3, 64, 64, 3), GREY, np.float32)
  gt = np.array([[6, -1]], np.int32)
  paths = gaze_maps.write_gaze_maps(tmp_path, images, layout, sel, {0: rows}, gt_regions=gt,
                                    gt_boxes={0: np.array([[2, 0, 0, 16, 16]])})
  img = np.asarray(PILImage.open(paths[0]).convert("RGB"))
  P, gap, lab = 256, 4, 14
  assert img.shape == (2 * (lab + P) + gap, 3 * P + 2 * gap, 3)
  # Row 0, frame 1 (second panel): region (1, 0) = y 128..256, x 0..128 of the panel.
  x1 = P + gap
  hot = _luma(img, lab + 133, lab + 250, x1 + 5, x1 + 123)
  cold_same_frame = _luma(img, lab + 5, lab + 123, x1 + 5, x1 + 123)
  cold_frame0 = _luma(img, lab + 133, lab + 250, 5, 123)
  assert hot > cold_same_frame + 40 and hot > cold_frame0 + 40
  # The ground-truth region is framed (magenta), just inside its border.
  np.testing.assert_array_equal(img[lab + 200, x1 + gaze_maps.GT_INSET], gaze_maps.GT_REGION)
  # Row 1: image region 0 (64 px patches grid 8 -> region = 16 px = 64 panel px) at heat 0.5,
  # dimmer than a full-heat region but brighter than the rest.
  y = 2 * lab + P + gap
  x2 = 2 * (P + gap)
  half = _luma(img, y + 5, y + 59, x2 + 5, x2 + 59)
  rest = _luma(img, y + 70, y + 250, x2 + 70, x2 + 250)
  assert rest + 20 < half < hot
  # The ground-truth box (frame 2, 16 px) is outlined.
  np.testing.assert_array_equal(img[y + 30, x2], gaze_maps.GT_BOX)


def test_panel_geometry_shrinks_for_many_frames():
  assert gaze_maps.panel_geometry((64, 64), 2) == (256, 256, 4.0)
  ph, pw, _ = gaze_maps.panel_geometry((64, 64), 64, max_width=2048)
  assert ph == pw == 48
  assert gaze_maps.panel_geometry((32, 64), 1)[:2] == (128, 256)


class _Words:
  vocab_size = 100

  def decode(self, ids, skip_special=True):
    return " ".join(f"w{i}" for i in ids)


def _answered_batch(gt_regions):
  """One example (prompt tokens 1 2 | a 4x4 image | 3 4 5 | answer 6 7) with its loss rows, the
  teacher-forced prediction (the second answer token wrong: 9) and, over 3 layers of 2 query
  heads, selections: layer 1 has both heads on region 3, the others one head on region 1."""
  from gaze_jax.data.features import ModelInputs

  spec = LayoutSpec(seq_len=32, max_regions=4, max_images=1, region_shape=(2, 2), num_ctx=0)
  layout = build_layout([[Text(2), Image(4, 4), Text(3), Text(2, generated=True)]], spec)
  kind = np.asarray(layout.kind)[0]
  text = np.flatnonzero(kind == 0)
  tokens = np.zeros((1, 32), np.int32)
  tokens[0, text] = np.arange(1, len(text) + 1)             # 1 2 | image | 3 4 5 | answer 6 7
  loss = np.zeros((1, 32), np.float32)
  loss[0, text[4:6]] = 1.0                                  # rows of prompt token 5 and answer 6
  targets = np.roll(tokens, -1, axis=1)
  pred = targets.copy()
  pred[0, text[5]] = 9                                      # the second answer token is wrong
  inputs = ModelInputs(tokens=tokens, targets=targets, loss_mask=loss, layout=layout,
                       images=np.zeros((1, 1, 32, 32, 3), np.float32),
                       gt_regions=np.array([gt_regions], np.int32))
  sel = [np.full((1, 32, 2, 1), -1, np.int32) for _ in range(3)]
  for l in range(3):
    sel[l][0, text[4:6], 0] = 3 if l == 1 else 1
    if l == 1:
      sel[l][0, text[4:6], 1] = 3
  return inputs, sel, pred


def spy_on_titles(monkeypatch) -> dict:
  """The keyword arguments ``write_gaze_maps`` gets (the titles, the labels), filled in as
  ``write_batch_gaze_maps`` calls it (also used by tests/test_predict.py)."""
  seen = {}
  real = gaze_maps.write_gaze_maps

  def spy(*args, **kw):
    seen.update(kw)
    return real(*args, **kw)

  monkeypatch.setattr(gaze_maps, "write_gaze_maps", spy)
  return seen


def test_batch_gaze_maps_show_question_answers_and_layers(tmp_path, monkeypatch):
  """The title is the prompt's text up to the row that predicts the first answer token (no
  image tokens, no answer), then the predicted and true answers, then the legend; every layer
  gets a column, and each selected region the number of heads that chose it."""
  inputs, sel, pred = _answered_batch([0, -1])
  seen = spy_on_titles(monkeypatch)
  paths = gaze_maps.write_batch_gaze_maps(tmp_path, inputs, sel, limit=1, tokenizer=_Words(),
                                          pred=pred)
  question, answers, legend = seen["titles"][0]
  assert question == "w1 w2 w3 w4 w5"
  assert answers == "predicted: w6 w9   true answer: w6 w7"
  assert legend == gaze_maps.LEGEND and "magenta: ground truth" in legend
  assert seen["labels"][0] == ["answer token 0: 'w6', predicted 'w6'",
                               "answer token 1: 'w7', predicted 'w9'"]
  img = np.asarray(PILImage.open(paths[0]).convert("RGB"))
  P, gap, lab, T, L = 160, 4, 14, 2, 3
  top = 4 * lab                                             # 3 title lines + the layer captions
  assert img.shape == (top + T * (lab + P) + (T - 1) * gap, L * P + (L - 1) * 2 * gap, 3)
  assert img[:lab].max() > 200                              # the title's white text
  # Layer 1 (the middle column): region 3 (bottom right) framed in full-heat cyan.
  x1, y0 = P + 2 * gap, top + lab
  np.testing.assert_array_equal(img[y0 + P - 1, x1 + P - 10], gaze_maps.selection_colour(1.0))
  # Layer 0: region 1 (top right) framed at half heat; the ground truth, region 0, in magenta.
  np.testing.assert_array_equal(img[y0, P - 10], gaze_maps.selection_colour(0.5))
  np.testing.assert_array_equal(img[y0 + 40, gaze_maps.GT_INSET], gaze_maps.GT_REGION)


def test_a_map_without_ground_truth_names_none_and_takes_the_answers_label(tmp_path,
                                                                          monkeypatch):
  """``predict``'s maps: no ground-truth region, so the legend names no ground truth and no
  magenta is drawn; the answer is titled as asked ("model's answer"), with a note line."""
  inputs, sel, _ = _answered_batch([-1, -1])
  seen = spy_on_titles(monkeypatch)
  paths = gaze_maps.write_batch_gaze_maps(tmp_path, inputs, sel, limit=1, tokenizer=_Words(),
                                          answer_label="model's answer",
                                          notes=["the image was stretched"])
  assert seen["titles"][0] == ["w1 w2 w3 w4 w5", "model's answer: w6 w7",
                               "the image was stretched", gaze_maps.legend()]
  assert "ground truth" not in gaze_maps.legend()
  assert gaze_maps.legend(gt_boxes=True).endswith("; white: ground-truth boxes")
  img = np.asarray(PILImage.open(paths[0]).convert("RGB"))
  assert not (img == np.asarray(gaze_maps.GT_REGION, np.uint8)).all(-1).any()


def test_selection_colour_ramps_towards_bright_cyan():
  low, high = gaze_maps.selection_colour(0.25), gaze_maps.selection_colour(1.0)
  assert high == (0, 255, 255)
  assert low[0] == 0 and low[1] < high[1] and low[2] < high[2]

"""gaze_video's one-frame question ("What colour was the <shape> in the last frame?"), its
variable clip lengths (``min_frames``) and its ``question_types`` field."""

import copy
import re

import numpy as np
import pytest

from gaze_jax.data import scenes

SIZE = 64


def _named(tracks, question):
  """The track whose shape the question names."""
  shape = re.search(r"the (\w+) in the last frame", question)[1]
  (tr,) = [t for t in tracks if t.shape == shape]
  return tr


def _answers(tracks, frames):
  return {q: a for t, q, a, _ in scenes.video_questions(tracks, frames)
          if t == "colour_in_last_frame"}


def _other_colour(*avoid):
  return next(c for c in scenes.COLOURS if c not in avoid)


def _box_pixels(frame, box):
  x0, y0, x1, y1 = box
  return frame[y0:y1, x0:x1]


def test_colour_in_last_frame_depends_on_the_named_object_in_the_last_frame_only():
  """Recolouring every other object (in every frame) and the named one in the earlier frames,
  and moving the other objects, leaves the answer and the named box's pixels in the last frame
  as they were; recolouring the named object in the last frame changes both."""
  checked = 0
  for i in range(30):
    rng = np.random.default_rng([5, i])
    frames = int(rng.integers(2, 6))
    tracks = scenes.video_tracks(rng, SIZE, frames, int(rng.integers(1, min(frames, 4) + 1)))
    for qtype, question, answer, needed in scenes.video_questions(tracks, frames):
      if qtype != "colour_in_last_frame":
        continue
      named = _named(tracks, question)
      assert needed == [(frames - 1, named.boxes[-1])]
      assert answer == named.colours[-1]
      before = scenes.render_video(tracks, SIZE, frames, np.random.default_rng(0))[-1]

      others = copy.deepcopy(tracks)
      for t in others:
        if t.shape == named.shape:
          # one colour before the last frame: the clip keeps a shape that changes colour
          t.colours[:-1] = [_other_colour(answer, t.colours[0])] * (frames - 1)
        else:
          t.colours = [_other_colour(c) for c in t.colours]
          t.boxes = t.boxes[::-1]                    # the other objects move elsewhere
      assert _answers(others, frames)[question] == answer
      after = scenes.render_video(others, SIZE, frames, np.random.default_rng(0))[-1]
      box = named.boxes[-1]
      overlap = any(scenes._overlap(box, t.boxes[-1]) for tr in (tracks, others) for t in tr
                    if t.shape != named.shape)
      if not overlap:                                # the region itself is unchanged
        assert (_box_pixels(after, box) == _box_pixels(before, box)).all()
        checked += 1

      changed = copy.deepcopy(tracks)
      new = _other_colour(answer, named.colours[0])
      _named(changed, question).colours[-1] = new
      assert _answers(changed, frames)[question] == new
      recoloured = scenes.render_video(changed, SIZE, frames, np.random.default_rng(0))[-1]
      assert (_box_pixels(recoloured, box) == scenes.COLOURS[new]).all(-1).any()
  assert checked > 20


def _changed(tracks):
  (ch,) = [t for t in tracks if t.colours[0] != t.colours[-1]]
  return ch


def test_changed_colour_in_last_frame_depends_on_the_changed_object_from_its_change_on():
  """The question names the shape that changed colour; its boxes are that shape's from the
  change frame on, which show the answer. Recolouring and moving the other objects, and
  recolouring the named one before its change, leaves the answer and those boxes' pixels as
  they were; recolouring the named one from the change on changes both."""
  checked = 0
  for i in range(30):
    rng = np.random.default_rng([6, i])
    frames = int(rng.integers(2, 6))
    tracks = scenes.video_tracks(rng, SIZE, frames, int(rng.integers(2, min(frames, 4) + 1)))
    (q,) = [q for q in scenes.video_questions(tracks, frames)
            if q[0] == "changed_colour_in_last_frame"]
    _, question, answer, needed = q
    named = _changed(tracks)
    assert _named(tracks, question) is named and answer == named.colours[-1]
    k = next(f for f in range(frames) if named.colours[f] == answer)
    assert [f for f, _ in needed] == list(range(k, frames))
    assert all(named.colours[f] != answer for f in range(k))    # earlier frames mislead

    def ask(trs):
      return [a for t, q_, a, _ in scenes.video_questions(trs, frames)
              if t == "changed_colour_in_last_frame" and q_ == question]

    before = scenes.render_video(tracks, SIZE, frames, np.random.default_rng(0))

    others = copy.deepcopy(tracks)
    for t in others:
      if t.shape == named.shape:
        t.colours[:k] = [_other_colour(answer, t.colours[0])] * k
      else:
        t.colours = [_other_colour(answer, c) for c in t.colours]
        t.boxes = t.boxes[::-1]
    assert ask(others) == [answer]
    after = scenes.render_video(others, SIZE, frames, np.random.default_rng(0))
    for f, box in needed:
      clear = not any(scenes._overlap(box, t.boxes[f]) for tr in (tracks, others) for t in tr
                      if t.shape != named.shape and f >= t.appear)
      if clear:                                    # the answering regions are unchanged
        assert (_box_pixels(after[f], box) == _box_pixels(before[f], box)).all()
        checked += 1

    changed = copy.deepcopy(tracks)
    new = _other_colour(answer, named.colours[0])
    _changed(changed).colours[k:] = [new] * (frames - k)
    assert ask(changed) == [new]
    recoloured = scenes.render_video(changed, SIZE, frames, np.random.default_rng(0))
    for f, box in needed:
      assert (_box_pixels(recoloured[f], box) == scenes.COLOURS[new]).all(-1).any()
  assert checked > 20


def test_changed_colour_in_last_frame_is_not_drawn_by_default():
  """Default clips never ask it (the default question types are the five older ones, so default
  datasets draw as before); asked for alone, every clip asks it about its last frames."""
  assert "changed_colour_in_last_frame" not in scenes.VIDEO_DEFAULT_QUESTION_TYPES
  assert scenes.VIDEO_DEFAULT_QUESTION_TYPES + ("changed_colour_in_last_frame",) == (
      scenes.VIDEO_QUESTION_TYPES)
  for i in range(20):
    ex = scenes.video_example(np.random.default_rng([2, i]), image_size=SIZE, frames=4,
                              min_objects=2, max_objects=3, example_id=str(i), source=i)
    assert ex["question_type"] != "changed_colour_in_last_frame"
    only = scenes.video_example(np.random.default_rng([2, i]), image_size=SIZE, frames=4,
                                min_objects=2, max_objects=3, example_id=str(i), source=i,
                                question_types=("changed_colour_in_last_frame",))
    assert only["question_type"] == "changed_colour_in_last_frame"
    frames = only["box_image"].tolist()                     # from the change to the last frame
    assert frames == list(range(frames[0], 4)) and frames[0] >= 1


def test_variable_clip_lengths_and_one_question_type():
  """With ``min_frames=2, frames=4`` clips have 2, 3 or 4 frames (each length seen); with
  ``question_types=("colour_in_last_frame",)`` every question is about the last frame, whose
  answer box shows the answered colour."""
  lengths = set()
  for i in range(60):
    ex = scenes.video_example(np.random.default_rng([1, i]), image_size=SIZE, frames=4,
                              min_frames=2, min_objects=1, max_objects=2, example_id=str(i),
                              source=i, question_types=("colour_in_last_frame",))
    n = len(ex["images"])
    lengths.add(n)
    assert ex["question_type"] == "colour_in_last_frame"
    assert ex["box_image"].tolist() == [n - 1]
    assert (ex["object_box_image"] < n).all() and (ex["object_box_image"] == n - 1).any()
    colour = scenes.COLOURS[ex["turns"][0]["answer"]]
    box = [int(v) for v in ex["boxes"][0]]
    assert (_box_pixels(ex["images"][-1], box) == colour).all(-1).any()
  assert lengths == {2, 3, 4}


def test_question_types_field_and_variable_lengths_in_the_builder(tmp_path):
  pytest.importorskip("tensorflow_datasets", reason="the [data] extra is not installed")
  from gaze_jax.data import builders
  from tests.data.helpers import all_examples, text

  b = builders.prepare("gaze_video", tmp_path, "tiny", min_frames=3, frames=5, max_objects=3,
                       question_types=("colour_in_last_frame", "change_frame"))
  seen = set()
  for split in ("train", "validation", "test"):
    for ex in all_examples(b, split):
      assert 3 <= len(ex["images"]) <= 5
      assert text(ex["question_type"]) in ("colour_in_last_frame", "change_frame")
      seen.add(len(ex["images"]))
  assert len(seen) > 1
  assert builders.make_config("gaze_video", "tiny").question_types == (
      scenes.VIDEO_DEFAULT_QUESTION_TYPES)


@pytest.mark.parametrize("overrides, message", [
    (dict(question_types=("colour_in_last_frame", "colour")), r"question_types.*'colour'"),
    (dict(question_types=()), "question_types"),
    (dict(min_frames=1), "min_frames=1"),
    (dict(min_frames=5), r"min_frames <= frames=4"),
    (dict(min_frames=2), r"max_objects <= min\(min_frames"),   # tiny has up to 3 objects
])
def test_bad_gaze_video_fields_name_the_field(tmp_path, overrides, message):
  pytest.importorskip("tensorflow_datasets", reason="the [data] extra is not installed")
  from gaze_jax.data import builders

  with pytest.raises(ValueError, match=message):
    builders.prepare("gaze_video", tmp_path, "tiny", **overrides)

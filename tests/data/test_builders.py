"""TFDS builders: small versions build in seconds, carry the declared features, answers agree
with the pictures, same seed gives the same bytes, and splits do not share scenes or digits."""

import hashlib
import re

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets", reason="the [data] extra is not installed")

from gaze_jax.data import builders, scenes  # noqa: E402
from tests.data.helpers import all_examples, image_digest, text  # noqa: E402

PROCEDURAL = ("gaze_shapes", "digit_grid", "gaze_video")


def _centre_rgb(image, box):
  x0, y0, x1, y1 = (float(v) for v in box)
  return tuple(int(c) for c in np.asarray(image)[int((y0 + y1 - 1) / 2), int((x0 + x1 - 1) / 2)])


@pytest.mark.parametrize("name", PROCEDURAL)
def test_tiny_builds_with_declared_features(tiny_builders, name):
  b = tiny_builders[name]
  cfg = b.builder_config
  want = {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}
  assert {s: b.info.splits[s].num_examples for s in want} == want
  frames = cfg.frames if name == "gaze_video" else 1
  size = cfg.image_size
  for split in want:
    for ex in all_examples(b, split):
      assert set(ex) == set(b.info.features.keys())
      assert len(ex["images"]) == frames
      for im in ex["images"]:
        assert im.shape == (size, size, 3) and im.dtype == np.uint8
      assert bool(ex["is_video"]) == (name == "gaze_video")
      boxes, where = ex["boxes"], ex["box_image"]
      assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
      assert len(boxes) >= 1 and where.shape == (len(boxes),) and where.dtype == np.int32
      assert (where >= 0).all() and (where < frames).all()
      assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= size).all()
      assert (boxes[:, 2:] > boxes[:, :2]).all()
      assert len(ex["turns"]["question"]) == len(ex["turns"]["answer"]) == 1
      assert text(ex["turns"]["answer"][0])


def test_gaze_shapes_answers_agree_with_the_pixels(tiny_builders):
  b = tiny_builders["gaze_shapes"]
  cell = b.builder_config.image_size / b.builder_config.grid
  rgb_name = {v: k for k, v in scenes.COLOURS.items()}
  seen = set()
  for split in ("train", "validation", "test"):
    for ex in all_examples(b, split):
      qtype, q, a = text(ex["question_type"]), text(ex["turns"]["question"][0]), \
          text(ex["turns"]["answer"][0])
      image, boxes = ex["images"][0], ex["boxes"]
      seen.add(qtype)
      if qtype == "colour":
        assert rgb_name[_centre_rgb(image, boxes[0])] == a, q
      elif qtype == "count":
        colour = re.match(r"How many (\w+) shapes", q).group(1)
        assert int(a) == len(boxes)
        assert all(rgb_name.get(_centre_rgb(image, bx)) == colour for bx in boxes)
        # Every pixel of that colour lies in one of the boxes: no object was missed.
        mask = (image == np.asarray(scenes.COLOURS[colour])).all(-1)
        covered = np.zeros_like(mask)
        for x0, y0, x1, y1 in boxes.astype(int):
          covered[y0:y1, x0:x1] = True
        assert not (mask & ~covered).any(), q
      elif qtype == "relation":
        ref, nb = boxes
        colour = re.search(r"the (\w+) \w+\?$", q).group(1)
        assert rgb_name[_centre_rgb(image, ref)] == colour
        dx = (nb[0] + nb[2] - ref[0] - ref[2]) / 2
        dy = (nb[1] + nb[3] - ref[1] - ref[3]) / 2
        want = {"left of": (dx < 0 and abs(dy) < cell), "right of": (dx > 0 and abs(dy) < cell),
                "above": (dy < 0 and abs(dx) < cell), "below": (dy > 0 and abs(dx) < cell)}
        word = re.search(r"is (left of|right of|above|below) the", q).group(1)
        assert want[word], (q, boxes)
      elif qtype == "size":
        width = boxes[0][2] - boxes[0][0]
        assert (width > 0.6 * cell) == (a == "large"), (q, width)
      elif qtype in ("colour_at", "shape_at"):
        row, col = (int(v) for v in re.search(r"row (\d+), column (\d+)\?$", q).groups())
        (x0, y0, x1, y1), = boxes
        assert (int(x0 // cell), int(y0 // cell)) == (col - 1, row - 1), (q, boxes)
        assert (int((x1 - 1) // cell), int((y1 - 1) // cell)) == (col - 1, row - 1), (q, boxes)
        if qtype == "colour_at":
          assert rgb_name[_centre_rgb(image, boxes[0])] == a, q
        else:
          # Corners of the box: filled only for a square; the centre: filled for every shape.
          colour = rgb_name[_centre_rgb(image, boxes[0])]
          corner = tuple(int(c) for c in image[int(y0), int(x0)])
          assert a in scenes.SHAPES and (corner == scenes.COLOURS[colour]) == (a == "square"), q
  assert {"colour", "count"} <= seen


@pytest.mark.parametrize("name", PROCEDURAL)
def test_object_boxes_hold_every_answer_box(tiny_builders, name):
  """``object_boxes`` lists every object in view (the salience baseline's choices): each box
  the answer depends on is one of them, on the same image, and each lies inside its image."""
  b = tiny_builders[name]
  size = b.builder_config.image_size
  for ex in all_examples(b, "train"):
    objs = {(int(f), tuple(box.tolist()))
            for f, box in zip(ex["object_box_image"], ex["object_boxes"])}
    assert objs and len(objs) == len(ex["object_boxes"])
    assert {(int(f), tuple(box.tolist())) for f, box in zip(ex["box_image"], ex["boxes"])} <= objs
    assert all(0 <= f < len(ex["images"]) and min(box) >= 0 and max(box) <= size
               for f, box in objs)
  if name == "digit_grid":               # every cell holds a digit
    n = b.builder_config.n
    assert len(ex["object_boxes"]) == n * n


def test_gaze_shapes_cell_questions_depend_on_their_cell_only():
  """"colour_at" / "shape_at" name a cell: the answer's box lies inside that cell, no other
  object reaches into it, and the box's centre shows the answered colour, so changing any
  other cell cannot change what the answer depends on."""
  size, grid = 64, 4
  cell = size // grid
  for i in range(40):
    ex = scenes.shapes_example(np.random.default_rng([2, i]), image_size=size, grid=grid,
                               min_objects=6, max_objects=10, example_id=str(i), source=i,
                               question_types=("colour_at", "shape_at"))
    q, a = ex["turns"][0]["question"], ex["turns"][0]["answer"]
    r, c = (int(v) - 1 for v in re.search(r"row (\d), column (\d)", q).groups())
    (x0, y0, x1, y1), = ex["boxes"].tolist()
    assert c * cell <= x0 < x1 <= (c + 1) * cell and r * cell <= y0 < y1 <= (r + 1) * cell, q
    others = [b for b in ex["object_boxes"].tolist() if b != [x0, y0, x1, y1]]
    assert len(others) == len(ex["object_boxes"]) - 1
    assert all(b[2] <= c * cell or b[0] >= (c + 1) * cell or b[3] <= r * cell
               or b[1] >= (r + 1) * cell for b in others), q
    if ex["question_type"] == "colour_at":
      assert _centre_rgb(ex["images"][0], ex["boxes"][0]) == scenes.COLOURS[a], q
    else:
      assert a in scenes.SHAPES


def test_gaze_shapes_where_questions_agree_with_the_pixels():
  """"where" names a colour that exactly one shape has (no other pixel of that colour is drawn
  outside its box) and answers that shape's cell, "row, column", counted from 1."""
  size, grid = 64, 4
  cell = size // grid
  for i in range(40):
    ex = scenes.shapes_example(np.random.default_rng([3, i]), image_size=size, grid=grid,
                               min_objects=6, max_objects=10, example_id=str(i), source=i,
                               question_types=("where",))
    q, a = ex["turns"][0]["question"], ex["turns"][0]["answer"]
    colour = re.fullmatch(r"Where is the (\w+) shape\?", q).group(1)
    (x0, y0, x1, y1), = ex["boxes"].astype(int).tolist()
    image = ex["images"][0]
    assert _centre_rgb(image, ex["boxes"][0]) == scenes.COLOURS[colour], q
    mask = (image == np.asarray(scenes.COLOURS[colour])).all(-1)
    mask[y0:y1, x0:x1] = False
    assert not mask.any(), q
    assert a == f"{y0 // cell + 1}, {x0 // cell + 1}", (q, a, ex["boxes"])
  # Not drawn unless asked for: the default types leave the default datasets as they were.
  assert "where" not in scenes.SHAPES_DEFAULT_QUESTION_TYPES


def test_gaze_shapes_question_types_field(tmp_path):
  b = builders.prepare("gaze_shapes", tmp_path, "tiny", question_types=("colour_at", "size"))
  got = {text(ex["question_type"]) for split in ("train", "validation")
         for ex in all_examples(b, split)}
  assert got == {"colour_at", "size"}
  with pytest.raises(ValueError, match="question_types"):
    builders.prepare("gaze_shapes", tmp_path, "tiny", question_types=("colour", "shape"))


def test_digit_grid_question_types_field_and_which_depends_on_its_cell_only(tmp_path):
  """question_types=("which",) asks only about a named cell; its box holds everything the
  answer depends on: with every other cell's digit replaced, the box's pixels and the answer
  (that cell's label) stay the same."""
  from sklearn.datasets import load_digits
  from gaze_jax.data import scenes
  digits = load_digits()
  rng = np.random.default_rng(0)
  pool = np.arange(len(digits.target))
  for i in range(20):
    ex = scenes.digit_grid_example(np.random.default_rng([1, i]), images=digits.images,
                                   labels=digits.target, pool=pool, image_size=64, n=4,
                                   example_id=str(i), question_types=("which",))
    assert ex["question_type"] == "which"
    r, c = (int(v) - 1 for v in re.match(r"Which digit is at row (\d), column (\d)\?",
                                         ex["turns"][0]["question"]).groups())
    source = ex["source"].copy()
    others = np.arange(16) != r * 4 + c
    source[others] = rng.choice(pool, others.sum())            # every other cell changes
    image = scenes.digit_grid_image(digits.images[source], 64, 4)
    x0, y0, x1, y1 = ex["boxes"][0].astype(int)
    # The box (its cell, border lines aside) is unchanged, and so is the answer.
    np.testing.assert_array_equal(image[y0 + 1:y1 - 1, x0 + 1:x1 - 1],
                                  ex["images"][0][y0 + 1:y1 - 1, x0 + 1:x1 - 1])
    assert ex["turns"][0]["answer"] == str(digits.target[source[r * 4 + c]])
    assert (image != ex["images"][0]).any()
  with pytest.raises(ValueError, match="question_types"):
    builders.prepare("digit_grid", tmp_path, "tiny", question_types=("colour",))


def test_digit_grid_answers_agree_with_sklearn_labels(tiny_builders):
  from sklearn.datasets import load_digits
  labels = load_digits().target
  b = tiny_builders["digit_grid"]
  n, size = b.builder_config.n, b.builder_config.image_size
  cell = size // n
  for split in ("train", "validation", "test"):
    for ex in all_examples(b, split):
      grid = labels[ex["source"]].reshape(n, n)
      q, a = text(ex["turns"]["question"][0]), text(ex["turns"]["answer"][0])
      boxes = ex["boxes"].astype(int).tolist()
      if m := re.match(r"Which digit is at row (\d), column (\d)\?", q):
        r, c = int(m[1]) - 1, int(m[2]) - 1
        assert a == str(grid[r, c]) and boxes == [[c * cell, r * cell, (c + 1) * cell,
                                                   (r + 1) * cell]]
      elif m := re.match(r"What is the sum of the digits in row (\d)\?", q):
        r = int(m[1]) - 1
        assert a == str(grid[r].sum()) and len(boxes) == n
        assert all(bx[1] == r * cell for bx in boxes)
      else:
        d = int(re.match(r"Where is the digit (\d)\?", q)[1])
        (r,), (c,) = np.nonzero(grid == d)
        assert a == f"row {r + 1}, column {c + 1}"
        assert boxes == [[c * cell, r * cell, (c + 1) * cell, (r + 1) * cell]]


def test_gaze_video_colour_answers_agree_with_the_right_frame(tiny_builders):
  rgb_name = {v: k for k, v in scenes.COLOURS.items()}
  b = tiny_builders["gaze_video"]
  checked = 0
  for split in ("train", "validation", "test"):
    for ex in all_examples(b, split):
      qtype, a = text(ex["question_type"]), text(ex["turns"]["answer"][0])
      frames = ex["images"]
      box, f = ex["boxes"][0], int(ex["box_image"][0])
      if qtype in ("last_appeared_colour", "colour_in_last_frame"):
        assert rgb_name[_centre_rgb(frames[f], box)] == a
        checked += 1
      if qtype == "change_frame":
        k = int(a.split()[1]) - 1
        assert f == k
        colour = re.search(r"turn (\w+)\?", text(ex["turns"]["question"][0]))[1]
        assert rgb_name[_centre_rgb(frames[k], box)] == colour
  assert checked > 0


def _record_digests(b):
  out = {}
  for p in sorted(builders.data_dir_of(b).glob("*.array_record-*")):
    out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
  return out


def test_same_seed_same_bytes(tmp_path):
  kw = dict(num_train=6, num_validation=2, num_test=2)
  a = builders.prepare("gaze_shapes", tmp_path / "a", "tiny", seed=3, **kw)
  b = builders.prepare("gaze_shapes", tmp_path / "b", "tiny", seed=3, **kw)
  c = builders.prepare("gaze_shapes", tmp_path / "c", "tiny", seed=4, **kw)
  da, db, dc = _record_digests(a), _record_digests(b), _record_digests(c)
  assert len(da) == 3 and da == db
  assert all(da[k] != dc[k] for k in da)
  v1 = builders.prepare("gaze_video", tmp_path / "a", "tiny", seed=3, **kw)
  v2 = builders.prepare("gaze_video", tmp_path / "b", "tiny", seed=3, **kw)
  assert _record_digests(v1) == _record_digests(v2)


def test_no_leakage_between_splits(tiny_builders):
  b = tiny_builders["gaze_shapes"]
  by_split = {s: all_examples(b, s) for s in ("train", "validation", "test")}
  seeds = {s: {int(e["source"][0]) for e in exs} for s, exs in by_split.items()}
  pics = {s: {image_digest(e["images"][0]) for e in exs} for s, exs in by_split.items()}
  for s, t in (("train", "validation"), ("train", "test"), ("validation", "test")):
    assert not seeds[s] & seeds[t] and not pics[s] & pics[t]
  assert len(seeds["train"]) == len(by_split["train"])        # one scene seed per example

  d = tiny_builders["digit_grid"]
  used = {s: set(np.concatenate([e["source"] for e in all_examples(d, s)]).tolist())
          for s in ("train", "validation", "test")}
  assert not used["train"] & used["validation"]
  assert not used["train"] & used["test"]
  assert not used["validation"] & used["test"]


def test_config_errors_name_the_field(tmp_path):
  with pytest.raises(ValueError, match="unknown config 'huge'"):
    builders.make_config("gaze_shapes", "huge")
  with pytest.raises(ValueError, match="unknown config fields.*colours"):
    builders.make_config("gaze_shapes", "tiny", colours=3)
  with pytest.raises(ValueError, match="unknown dataset"):
    builders.make_config("mnist")
  with pytest.raises(ValueError, match="max_objects"):
    builders.prepare("gaze_shapes", tmp_path, "tiny", max_objects=40)
  cfg = builders.make_config("gaze_shapes", "tiny", image_size=192)
  assert cfg.image_size == 192 and cfg.name.startswith("tiny-")
  assert builders.make_config("gaze_shapes", "tiny", image_size=192).name == cfg.name
  assert builders.make_config("gaze_shapes", "tiny", image_size=384).name != cfg.name


def test_overrides_read_back_from_a_run_config_name_the_same_folder():
  """A run's config.json gives tuples back as lists: eval_main's overrides must name the
  folder that training prepared, not a second one."""
  kinds = ("where", "colour_at")
  as_trained = builders.make_config("gaze_shapes", "tiny", question_types=kinds)
  from_json = builders.make_config("gaze_shapes", "tiny", question_types=list(kinds))
  assert from_json.name == as_trained.name
  other = builders.make_config("gaze_shapes", "tiny", question_types=("where",))
  assert other.name != as_trained.name

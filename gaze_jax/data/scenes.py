"""Procedural examples for the synthetic datasets, as plain Python dicts (no tfds here).

Every generator takes a ``numpy.random.Generator`` and returns one example in the common
schema that all builders share (see ``gaze_jax.data.builders``):

  id: str; images: list of uint8 ``[H, W, 3]``; is_video: bool (the images are the frames of
  one video); turns: list of ``{"question", "answer"}``; boxes: float32 ``[n, 4]`` pixel boxes
  ``(x0, y0, x1, y1)`` with exclusive ends (pixel ``i`` covers ``[i, i + 1)``) of what the answer
  depends on; box_image: int32 ``[n]`` index into ``images`` of each box; question_type: str;
  source: int64 ``[k]`` ids of the source material (scene seed, source digit images).

Images are drawn with Pillow. Examples depend only on the Generator, so seeding one per example
(the builders use ``np.random.default_rng([seed, scene_id])``) makes datasets reproducible and
independent of generation order.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 50, 47),
    "green": (60, 170, 70),
    "blue": (50, 100, 230),
    "yellow": (235, 205, 40),
    "purple": (150, 70, 200),
    "orange": (245, 135, 30),
}
# Half-extent of a shape as a fraction of its cell.
SIZES = {"small": 0.24, "large": 0.42}
BACKGROUND = (28, 28, 32)
# Every word of the templates below (and numbers up to 40: counts, digit sums, rows, frames), the
# vocabulary of ``gaze_jax.data.tokenizers.WordTokenizer`` for these datasets.
TEMPLATE_WORDS = ("What colour is the size shape shapes left of right above below How many are "
                  "there Which which digit digits at row column sum in Where was that appeared last "
                  "first changed In frame did turn").split()
VOCABULARY = tuple(dict.fromkeys([*TEMPLATE_WORDS, *SHAPES, *COLOURS, *SIZES,
                                  *(str(n) for n in range(41))]))


@dataclasses.dataclass(frozen=True)
class Obj:
  """One drawn shape; ``box`` is ``(x0, y0, x1, y1)`` in pixels, exclusive ends."""
  shape: str
  colour: str
  size: str
  row: int
  col: int
  box: tuple[int, int, int, int]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[int], rgb) -> None:
  """Draws ``shape`` filling the pixel box ``(x0, y0, x1, y1)`` (exclusive ends)."""
  x0, y0, x1, y1 = (int(v) for v in box)
  xe, ye = x1 - 1, y1 - 1                       # Pillow's boxes are inclusive
  cx, cy = (x0 + xe) / 2, (y0 + ye) / 2
  if shape == "circle":
    draw.ellipse([x0, y0, xe, ye], fill=rgb)
  elif shape == "square":
    draw.rectangle([x0, y0, xe, ye], fill=rgb)
  elif shape == "triangle":
    draw.polygon([(cx, y0), (xe, ye), (x0, ye)], fill=rgb)
  elif shape == "diamond":
    draw.polygon([(cx, y0), (xe, cy), (cx, ye), (x0, cy)], fill=rgb)
  elif shape == "cross":
    t = max(1, round((x1 - x0) / 6))            # half thickness of the bars
    draw.rectangle([x0, round(cy) - t, xe, round(cy) + t], fill=rgb)
    draw.rectangle([round(cx) - t, y0, round(cx) + t, ye], fill=rgb)
  else:
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _box_in_cell(rng, row: int, col: int, cell: float, half: int) -> tuple[int, int, int, int]:
  """A square box of side ``2 * half`` placed at a random spot inside cell (row, col)."""
  x_lo, y_lo = int(np.ceil(col * cell)), int(np.ceil(row * cell))
  x_hi, y_hi = int(np.floor((col + 1) * cell)), int(np.floor((row + 1) * cell))
  x0 = int(rng.integers(x_lo, max(x_lo, x_hi - 2 * half) + 1))
  y0 = int(rng.integers(y_lo, max(y_lo, y_hi - 2 * half) + 1))
  return (x0, y0, x0 + 2 * half, y0 + 2 * half)


def _canvas(size: int, rng) -> tuple[PILImage.Image, ImageDraw.ImageDraw]:
  tint = rng.integers(-6, 7, size=3)
  bg = tuple(int(c + t) for c, t in zip(BACKGROUND, tint))
  im = PILImage.new("RGB", (size, size), bg)
  return im, ImageDraw.Draw(im)


def _frame_boxes(frame_boxes, prefix: str = "") -> dict:
  """The schema's ``{prefix}boxes`` float32 ``[n, 4]`` and ``{prefix}box_image`` int32 ``[n]``
  from ``(image / frame index, box)`` pairs."""
  return {f"{prefix}boxes": np.asarray([b for _, b in frame_boxes], np.float32).reshape(-1, 4),
          f"{prefix}box_image": np.asarray([f for f, _ in frame_boxes], np.int32)}


# --------------------------------------------------------------------------- gaze_shapes

_DIRECTIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}


def shapes_scene(rng: np.random.Generator, image_size: int, grid: int,
                 n_objects: int) -> tuple[np.ndarray, list[Obj]]:
  """Draws ``n_objects`` shapes in distinct cells of a ``grid x grid`` cell grid.

  Returns uint8 ``[image_size, image_size, 3]`` and the objects.
  """
  if not 1 <= n_objects <= grid * grid:
    raise ValueError(f"n_objects must be in [1, grid^2={grid * grid}], got {n_objects}")
  cell = image_size / grid
  im, draw = _canvas(image_size, rng)
  cells = rng.choice(grid * grid, size=n_objects, replace=False)
  objs = []
  for c in cells:
    row, col = divmod(int(c), grid)
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    half = max(2, int(round(SIZES[size] * cell)))
    box = _box_in_cell(rng, row, col, cell, half)
    draw_shape(draw, shape, box, COLOURS[colour])
    objs.append(Obj(shape, colour, size, row, col, box))
  return np.asarray(im, np.uint8), objs


# Question types of gaze_shapes. The "_at" types name a grid cell, so the question says where
# to look; the others name an object by its kind (colour, size, relation), ask for all objects
# of a colour (count), or ask for the cell of the one shape of a colour (where: the answer's
# first token, its row, already needs that shape). "where" is known but not drawn by default,
# so the default datasets stay as they were.
SHAPES_QUESTION_TYPES = ("colour", "size", "relation", "count", "colour_at", "shape_at", "where")
SHAPES_DEFAULT_QUESTION_TYPES = SHAPES_QUESTION_TYPES[:-1]


def check_question_types(types: Sequence[str],
                         known: Sequence[str] = SHAPES_QUESTION_TYPES) -> tuple[str, ...]:
  """``types`` as a tuple; ValueError unless it is a non-empty subset of ``known``."""
  types = tuple(types)
  if not types or set(types) - set(known):
    raise ValueError(f"question_types must be a non-empty subset of {tuple(known)}, "
                     f"got {types}")
  return types


def shapes_questions(objs: Sequence[Obj]) -> list[tuple[str, str, str, list[Obj]]]:
  """Every well-posed question about a scene: ``(type, question, answer, objects needed)``.

  Only questions with one right answer are produced: "the triangle" needs a unique triangle,
  "the red circle" a unique red circle. Rows and columns are counted from 1, top left.
  """
  out = []
  for o in objs:
    where = f"in row {o.row + 1}, column {o.col + 1}"
    out.append(("colour_at", f"What colour is the shape {where}?", o.colour, [o]))
    out.append(("shape_at", f"What shape is {where}?", o.shape, [o]))
  by_shape = {s: [o for o in objs if o.shape == s] for s in SHAPES}
  by_cs = {}
  for o in objs:
    by_cs.setdefault((o.colour, o.shape), []).append(o)
  at = {(o.row, o.col): o for o in objs}
  for s, group in by_shape.items():
    if len(group) == 1:
      out.append(("colour", f"What colour is the {s}?", group[0].colour, group))
  for (colour, shape), group in by_cs.items():
    if len(group) != 1:
      continue
    ref = group[0]
    out.append(("size", f"What size is the {colour} {shape}?", ref.size, group))
    for word, (dr, dc) in _DIRECTIONS.items():
      nb = at.get((ref.row + dr, ref.col + dc))
      if nb is not None:
        out.append(("relation", f"What shape is {word} the {colour} {shape}?", nb.shape,
                    [ref, nb]))
  for colour in COLOURS:
    group = [o for o in objs if o.colour == colour]
    if group:
      out.append(("count", f"How many {colour} shapes are there?", str(len(group)), group))
    if len(group) == 1:
      o = group[0]
      out.append(("where", f"Where is the {colour} shape?", f"{o.row + 1}, {o.col + 1}", group))
  return out


def shapes_example(rng: np.random.Generator, *, image_size: int, grid: int,
                   min_objects: int, max_objects: int, example_id: str,
                   source: int,
                   question_types: Sequence[str] = SHAPES_DEFAULT_QUESTION_TYPES) -> dict:
  """One gaze_shapes example: a scene and one templated question about it.

  The question type is drawn uniformly among those of ``question_types`` that the scene allows,
  then one question of that type, so that easy-to-pose types (count) do not dominate.
  """
  question_types = check_question_types(question_types)
  n = int(rng.integers(min_objects, max_objects + 1))
  image, objs = shapes_scene(rng, image_size, grid, n)
  # count, colour_at and shape_at questions always exist; the other types exist only when a
  # referent is unique, so a scene without one is redrawn.
  qs = [q for q in shapes_questions(objs) if q[0] in question_types]
  while not qs:
    image, objs = shapes_scene(rng, image_size, grid, n)
    qs = [q for q in shapes_questions(objs) if q[0] in question_types]
  types = sorted({q[0] for q in qs})
  qtype = types[rng.integers(len(types))]
  pool = [q for q in qs if q[0] == qtype]
  _, question, answer, needed = pool[rng.integers(len(pool))]
  return {
      "id": example_id, "images": [image], "is_video": False,
      "turns": [{"question": question, "answer": answer}],
      **_frame_boxes([(0, o.box) for o in needed]),
      **_frame_boxes([(0, o.box) for o in objs], "object_"),
      "question_type": qtype, "source": np.asarray([source], np.int64),
  }


# --------------------------------------------------------------------------- digit_grid

def digit_grid_image(digits: np.ndarray, image_size: int, n: int) -> np.ndarray:
  """Pastes ``n * n`` digit images (``[n*n, h, w]``, ink in 0..16, sklearn's scale) on an
  ``n x n`` grid, white ink on black with grey cell borders. Returns uint8 ``[S, S, 3]``."""
  if image_size % n:
    raise ValueError(f"image_size={image_size} must be a multiple of the grid n={n}")
  cell = image_size // n
  margin = max(1, cell // 10)
  canvas = np.zeros((image_size, image_size), np.uint8)
  for k, d in enumerate(digits):
    r, c = divmod(k, n)
    ink = np.clip(np.asarray(d, np.float32) * (255.0 / 16.0), 0, 255).astype(np.uint8)
    tile = PILImage.fromarray(ink).resize((cell - 2 * margin,) * 2, PILImage.BILINEAR)
    y, x = r * cell + margin, c * cell + margin
    canvas[y:y + cell - 2 * margin, x:x + cell - 2 * margin] = np.asarray(tile)
  lines = np.arange(1, n) * cell
  canvas[lines, :] = 70
  canvas[:, lines] = 70
  return np.repeat(canvas[..., None], 3, axis=-1)


# "which": the digit at a named cell (one region answers it); "sum": a row's digits; "where":
# the cell of a digit that appears once.
DIGIT_QUESTION_TYPES = ("which", "sum", "where")


def digit_grid_example(rng: np.random.Generator, *, images: np.ndarray, labels: np.ndarray,
                       pool: np.ndarray, image_size: int, n: int, example_id: str,
                       question_types: Sequence[str] = DIGIT_QUESTION_TYPES) -> dict:
  """One digit_grid example built from the source digits ``pool`` (indices into
  ``images [N, 8, 8]`` / ``labels [N]``); ``source`` records which source images were used,
  cell by cell in row-major order. The question's type is drawn uniformly among those of
  ``question_types`` that the grid allows ("where" needs a digit that appears once)."""
  question_types = check_question_types(question_types, DIGIT_QUESTION_TYPES)
  chosen = rng.choice(pool, size=n * n, replace=len(pool) < n * n)
  grid_labels = labels[chosen].reshape(n, n)
  image = digit_grid_image(images[chosen], image_size, n)
  cell = image_size // n

  def cell_box(r, c):
    return (c * cell, r * cell, (c + 1) * cell, (r + 1) * cell)

  counts = np.bincount(grid_labels.reshape(-1), minlength=10)
  unique = [d for d in range(10) if counts[d] == 1]
  options = [t for t in DIGIT_QUESTION_TYPES if t in question_types and (t != "where" or unique)]
  if not options:
    raise ValueError(f"{example_id}: no digit appears once in the grid, so none of "
                     f"question_types={question_types} can be asked")
  qtype = options[rng.integers(len(options))]
  if qtype == "which":
    r, c = (int(v) for v in rng.integers(n, size=2))
    question = f"Which digit is at row {r + 1}, column {c + 1}?"
    answer, boxes = str(grid_labels[r, c]), [cell_box(r, c)]
  elif qtype == "sum":
    r = int(rng.integers(n))
    question = f"What is the sum of the digits in row {r + 1}?"
    answer, boxes = str(int(grid_labels[r].sum())), [cell_box(r, c) for c in range(n)]
  else:
    d = unique[rng.integers(len(unique))]
    r, c = (int(v[0]) for v in np.nonzero(grid_labels == d))
    question = f"Where is the digit {d}?"
    answer, boxes = f"row {r + 1}, column {c + 1}", [cell_box(r, c)]
  return {
      "id": example_id, "images": [image], "is_video": False,
      "turns": [{"question": question, "answer": answer}],
      **_frame_boxes([(0, box) for box in boxes]),
      **_frame_boxes([(0, cell_box(r, c)) for r in range(n) for c in range(n)], "object_"),
      "question_type": qtype, "source": np.asarray(chosen, np.int64),
  }


# --------------------------------------------------------------------------- gaze_video

@dataclasses.dataclass
class _Track:
  shape: str
  appear: int                       # first frame it is visible in
  colours: list[str]                # colour per frame
  boxes: list[tuple[int, int, int, int]]


def _overlap(a, b) -> bool:
  return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _trajectory(rng, image_size: int, frames: int, half: int) -> list[tuple[int, int, int, int]]:
  """A straight path that bounces off the borders, one box per frame."""
  lo, hi = half, image_size - half
  pos = rng.uniform(lo, hi, size=2)
  vel = rng.uniform(-0.08, 0.08, size=2) * image_size
  out = []
  for _ in range(frames):
    c = np.round(pos).astype(int)
    out.append((int(c[0]) - half, int(c[1]) - half, int(c[0]) + half, int(c[1]) + half))
    pos = pos + vel
    for a in range(2):                           # reflect at the borders
      if pos[a] < lo:
        pos[a], vel[a] = 2 * lo - pos[a], -vel[a]
      if pos[a] > hi:
        pos[a], vel[a] = 2 * hi - pos[a], -vel[a]
    pos = np.clip(pos, lo, hi)
  return out


def video_tracks(rng: np.random.Generator, image_size: int, frames: int,
                 n_objects: int) -> list[_Track]:
  """Shapes with distinct kinds and distinct appearance frames (object 0 at frame 0), moving
  without overlap (rejection sampling; after 100 tries an overlapping path is kept); exactly one
  object changes colour once, after it appeared."""
  if frames < 2:
    raise ValueError(f"a video needs at least 2 frames, got {frames}")
  if not 1 <= n_objects <= min(frames, len(SHAPES)):
    raise ValueError(f"n_objects must be in [1, min(frames, {len(SHAPES)})], got {n_objects}")
  half = max(2, int(round(0.1 * image_size)))
  shapes = rng.choice(len(SHAPES), size=n_objects, replace=False)
  appear = [0] + sorted(int(a) for a in rng.choice(np.arange(1, frames), size=n_objects - 1,
                                                   replace=False))
  paths: list[list] = []
  for _ in range(n_objects):
    for _attempt in range(100):                  # rejection sampling for non-overlapping paths
      path = _trajectory(rng, image_size, frames, half)
      if all(not _overlap(path[t], p[t]) for p in paths for t in range(frames)):
        break
    paths.append(path)
  names = list(COLOURS)
  tracks = []
  for i in range(n_objects):
    colour = names[rng.integers(len(names))]
    tracks.append(_Track(SHAPES[shapes[i]], appear[i], [colour] * frames, paths[i]))
  changers = [t for t in tracks if t.appear < frames - 1]
  ch = changers[rng.integers(len(changers))]
  k = int(rng.integers(ch.appear + 1, frames))
  new = [c for c in names if c != ch.colours[0]]
  new_colour = new[rng.integers(len(new))]
  ch.colours[k:] = [new_colour] * (frames - k)
  return tracks


def render_video(tracks: Sequence[_Track], image_size: int, frames: int, rng) -> list[np.ndarray]:
  tint = rng.integers(-6, 7, size=3)
  bg = tuple(int(c + t) for c, t in zip(BACKGROUND, tint))
  out = []
  for t in range(frames):
    im = PILImage.new("RGB", (image_size, image_size), bg)
    draw = ImageDraw.Draw(im)
    for tr in tracks:
      if t >= tr.appear:
        draw_shape(draw, tr.shape, tr.boxes[t], COLOURS[tr.colours[t]])
    out.append(np.asarray(im, np.uint8))
  return out


# Question types of gaze_video. "colour_in_last_frame" is about one region of one frame (the
# named shape in the clip's last frame); the others need the order of appearance or a change.
# "changed_colour_in_last_frame" asks the same question about the one shape that changed colour
# only: its earlier frames show that shape in another colour, so the answer lives in its regions
# from the change on and in no other object. It is known but not drawn by default, so the
# default datasets stay as they were.
VIDEO_QUESTION_TYPES = ("last_appeared_colour", "first_appeared_shape", "changed_shape",
                        "change_frame", "colour_in_last_frame", "changed_colour_in_last_frame")
VIDEO_DEFAULT_QUESTION_TYPES = VIDEO_QUESTION_TYPES[:-1]


def video_questions(tracks: Sequence[_Track], frames: int):
  """``(type, question, answer, [(frame, box), ...])`` for every question type."""
  last = max(tracks, key=lambda t: t.appear)
  first = min(tracks, key=lambda t: t.appear)
  ch = next(t for t in tracks if t.colours[0] != t.colours[-1])
  k = next(f for f in range(frames) if ch.colours[f] != ch.colours[0])
  out = [
      ("last_appeared_colour", "What colour was the shape that appeared last?",
       last.colours[last.appear], [(last.appear, last.boxes[last.appear])]),
      ("first_appeared_shape", "Which shape appeared first?", first.shape,
       [(first.appear, first.boxes[first.appear])]),
      ("changed_shape", "Which shape changed colour?", ch.shape,
       [(k - 1, ch.boxes[k - 1]), (k, ch.boxes[k])]),
      ("change_frame", f"In which frame did the {ch.shape} turn {ch.colours[k]}?",
       f"frame {k + 1}", [(k, ch.boxes[k])]),
  ]
  for tr in tracks:
    out.append(("colour_in_last_frame", f"What colour was the {tr.shape} in the last frame?",
                tr.colours[-1], [(frames - 1, tr.boxes[-1])]))
  out.append(("changed_colour_in_last_frame", f"What colour was the {ch.shape} in the last frame?",
              ch.colours[-1], [(f, ch.boxes[f]) for f in range(k, frames)]))
  return out


def video_example(rng: np.random.Generator, *, image_size: int, frames: int, min_objects: int,
                  max_objects: int, example_id: str, source: int,
                  min_frames: Optional[int] = None,
                  question_types: Sequence[str] = VIDEO_DEFAULT_QUESTION_TYPES) -> dict:
  """One gaze_video example: the frames of a short clip and one question about it.

  The clip has ``frames`` frames, or a number drawn uniformly in ``[min_frames, frames]`` when
  ``min_frames`` is given and smaller (``max_objects`` must not exceed it: each object appears
  at its own frame). The question type is drawn uniformly among ``question_types`` (default
  ``VIDEO_DEFAULT_QUESTION_TYPES``; any of ``VIDEO_QUESTION_TYPES``), then one question of that
  type.
  """
  question_types = check_question_types(question_types, VIDEO_QUESTION_TYPES)
  n = int(rng.integers(min_objects, max_objects + 1))
  if min_frames is not None and min_frames != frames:
    # Drawn only when the length varies, so that fixed-length clips keep their bytes.
    frames = int(rng.integers(min_frames, frames + 1))
  tracks = video_tracks(rng, image_size, frames, n)
  images = render_video(tracks, image_size, frames, rng)
  qs = [q for q in video_questions(tracks, frames) if q[0] in question_types]
  types = sorted({q[0] for q in qs})
  qtype = types[rng.integers(len(types))]
  pool = [q for q in qs if q[0] == qtype]
  _, question, answer, needed = pool[rng.integers(len(pool))]
  return {
      "id": example_id, "images": images, "is_video": True,
      "turns": [{"question": question, "answer": answer}],
      **_frame_boxes(needed),
      **_frame_boxes([(t, tr.boxes[t]) for tr in tracks for t in range(tr.appear, frames)],
                     "object_"),
      "question_type": qtype, "source": np.asarray([source], np.int64),
  }

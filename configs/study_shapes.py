"""Study task (issue: the model learns where to look): gaze_shapes scenes with many shapes and
questions that name one grid cell ("What colour is the shape in row r, column c?", "What shape
is in row r, column c?"), so the answer lives in one known region.

  python train_main.py --config=configs/study_shapes.py --workdir=/tmp/study_shapes

The ``tiny`` preset at 64 px with 8 px patches: an 8 x 8 patch grid cut into 2 x 2 regions, so
each of the 16 regions is one cell of the scene's 4 x 4 grid, 4 tokens each. Scenes hold 6 to
10 shapes, so a region that holds a shape is right only 1 time in 8 on average (the salience
baseline). The decoder has 4 layers, and the query heads of a GQA group route together:
2 groups x K = 2 regions cover at most 4 of the 16 cells, so accuracy needs routing.
"""

from configs import study_digits


def get_config():
  """study_digits' model, schedule and budget, on gaze_shapes cell questions."""
  c = study_digits.get_config()
  c.data.name = "gaze_shapes"
  c.data.builder_overrides.min_objects = 6
  c.data.builder_overrides.max_objects = 10
  c.data.builder_overrides.question_types = ("colour_at", "shape_at")
  return c

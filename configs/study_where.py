"""Study task (issue: the model learns where to look): gaze_shapes scenes with 6 to 10 shapes
and one question type, "Where is the red shape?", asked of a colour that one shape has. The
answer is that shape's cell, "row, column" ("2, 3"), so it lives in one known region and its
first token already needs it.

  python train_main.py --config=configs/study_where.py --workdir=/tmp/study_where

The model is study_shapes' (``tiny`` at 64 px with 8 px patches: 16 regions of 2 x 2 tokens, one
per cell; a 4-layer decoder; group routing with K = 2). Unlike a named cell, the referent is
named by its colour, which the patch features carry from the start, so the question can steer
routing before the model has learned to read positions.
"""

from configs import study_shapes


def get_config():
  """study_shapes with "where" questions."""
  c = study_shapes.get_config()
  c.data.builder_overrides.question_types = ("where",)
  return c

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

from configs import common


def get_config():
  c = common.base_config("tiny")
  c.model.decoder.num_layers = 4
  c.model.gaze.routing = "group"
  c.model.gaze.top_k = 2
  c.data.name = "gaze_shapes"
  c.data.builder_config = "64px"
  c.data.builder_overrides.num_train = 10_000
  c.data.builder_overrides.num_validation = 512
  c.data.builder_overrides.num_test = 512
  c.data.builder_overrides.min_objects = 6
  c.data.builder_overrides.max_objects = 10
  c.data.builder_overrides.question_types = ("colour_at", "shape_at")
  c.data.tokenizer = "words"
  c.data.seq_len = 96
  c.data.max_regions = 16
  c.data.batch_size = 32
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 50
  c.train.num_steps = 2_000
  c.train.log_every = 100
  c.train.eval_every = 500
  c.train.eval_batches = 16
  c.topk_schedule.warmup_fraction = 0.3
  c.checkpoint.save_every = 500
  c.checkpoint.keep = 1
  return c

"""Demo: a tiny gaze model on gaze_shapes, trained on a 2-core CPU in about 9 minutes.

  python train_main.py --config=configs/demo.py --workdir=/tmp/gaze_demo

The model is the ``tiny`` preset (2-layer ViT, 2-layer GQA decoder of width 64) at 64 px with
16 px patches: each cell of the scene's 4 x 4 grid is one patch and one gaze region, so a text
query picks K = 4 of the 16 cells (progressive top-K from all 16). Questions use the word-level
tokenizer (one token per template word), which a 2-layer decoder needs to read "the red
circle" in one attention step. 2,800 steps of batch 32 at learning rate 1e-3 (3e-3 and higher
learn the visual lookups far more slowly at this size).

The dense baseline is configs/demo_dense.py (same model and data, dense attention);
``make demo`` trains both and evaluates them side by side with the answer prior.
"""

from configs import common


def get_config():
  c = common.base_config("tiny")
  c.model.vision.patch_size = 16
  c.model.gaze.region_shape = (1, 1)
  c.model.gaze.top_k = 4
  c.data.builder_config = "64px"
  c.data.builder_overrides.num_train = 8_000
  c.data.builder_overrides.num_validation = 512
  c.data.builder_overrides.num_test = 512
  c.data.tokenizer = "words"
  c.data.seq_len = 48
  c.data.max_regions = 16
  c.data.batch_size = 32
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 50
  c.train.num_steps = 2_800
  c.train.log_every = 100
  c.train.eval_every = 700
  c.train.eval_batches = 16
  c.topk_schedule.warmup_fraction = 0.3
  c.checkpoint.save_every = 500
  c.checkpoint.keep = 2
  return c

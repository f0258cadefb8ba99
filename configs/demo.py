"""Demo: the tiny gaze model (2-layer ViT, 2-layer GQA decoder) on gaze_shapes at 64 px,
trained on a 2-core CPU in a few minutes with the progressive top-K (16 regions -> K=4).

  python train_main.py --config=configs/demo.py --workdir=/tmp/gaze_demo

The dense baseline is configs/demo_dense.py (same model and data, dense attention).
"""

from configs import common


def get_config():
  c = common.base_config("tiny")
  c.model.gaze.top_k = 4
  c.data.builder_config = "64px"
  c.data.builder_overrides.num_train = 8_000
  c.data.builder_overrides.num_validation = 512
  c.data.builder_overrides.num_test = 512
  c.data.seq_len = 128
  c.data.max_regions = 16
  c.data.batch_size = 32
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 50
  c.train.num_steps = 700
  c.train.log_every = 50
  c.train.eval_every = 350
  c.train.eval_batches = 16
  c.topk_schedule.warmup_fraction = 0.3
  c.checkpoint.save_every = 250
  c.checkpoint.keep = 2
  return c

"""Demo: a tiny multimodal LLM learns where to look, on a 2-core CPU in minutes (``make demo``).

  python train_main.py --config=configs/demo_base.py --workdir=/tmp/gaze_demo_base
  python train_main.py --config=configs/demo.py --workdir=/tmp/gaze_demo \
      --config.init_from_checkpoint=/tmp/gaze_demo_base

The task: gaze_shapes scenes of 6 to 10 shapes on a 4 x 4 grid, and one question, "Where is the
red shape?", asked of a colour that exactly one shape has. The answer is that shape's cell,
"2, 3", so it lives in one known region, and a shape picked at random is right only about 1
time in 8 (the salience baseline).

The model is the ``tiny`` preset (a 2-layer ViT, a GQA decoder of width 64) with a 4-layer
decoder, so that the layers after the first know the question when they route, at 64 px with
16 px patches: each cell of the grid is one patch and one gaze region. The query heads of a GQA
group route together (2 groups of 2 heads), so an answer row reads at most 2 x K of the 16
cells.

Training has two stages. configs/demo_base.py trains the model with dense attention; this
config starts from its parameters (``init_from_checkpoint``, which the commands above set) and
converts it to gaze attention at the target K from its first step. Its dense twin
(configs/demo_dense.py) trains the same steps from the same parameters with dense attention.
Without the first stage, gaze attention learns this task far more slowly.

Sparse from the first step, not the paper's progressive top-K: from this first stage, lowering K
over the first 30% of the steps leaves fewer steps at the target K and lost 6.3 points over
three seeds (docs/study.md, demo_ablations); ``--config.topk_schedule.enabled=True`` turns it
back on.
"""

from configs import study_where


def get_config():
  c = study_where.get_config()
  c.model.vision.patch_size = 16
  c.model.gaze.region_shape = (1, 1)
  c.model.gaze.top_k = 3
  c.data.seq_len = 48
  c.topk_schedule.enabled = False
  c.train.num_steps = 1_500
  c.train.eval_every = 500
  return c

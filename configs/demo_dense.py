"""Demo baseline: configs/demo.py with dense attention (every text query sees every patch), from
the same first stage and for the same steps.

  python train_main.py --config=configs/demo_dense.py --workdir=/tmp/gaze_demo_dense \
      --config.init_from_checkpoint=/tmp/gaze_demo_base
"""

from configs import demo


def get_config():
  c = demo.get_config()
  c.model.gaze.attention = "dense"
  return c

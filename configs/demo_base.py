"""Demo, first stage: the dense model that both demo models start from (``make demo``).

  python train_main.py --config=configs/demo_base.py --workdir=/tmp/gaze_demo_base

configs/demo.py's model and data with dense attention, trained from scratch at a constant
learning rate (no decay: the second stages warm up and decay on their own). Dense attention
first learns to find the shape of the named colour; the second stages then go on with dense
attention (configs/demo_dense.py) or convert the model to gaze attention (configs/demo.py), the
way a pretrained multimodal LLM would be converted. From scratch, gaze attention learns this task
far more slowly: the uniform attention of an untrained model says nothing about where the shape
is, so sparse routing has nothing to follow.
"""

from configs import common, demo


def get_config():
  return common.dense_first_stage(demo.get_config(), num_steps=1_500)

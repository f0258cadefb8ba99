"""Study task, first stage: configs/study_video.py's model and data with dense attention, from
scratch, at a constant learning rate (the second stages warm up and decay on their own).

  python train_main.py --config=configs/study_video_base.py --workdir=/tmp/study_video_base
"""

from configs import common, study_video


def get_config():
  c = common.dense_first_stage(study_video.get_config(), num_steps=1_000)
  c.train.eval_every = 500
  return c

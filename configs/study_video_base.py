"""Study task, first stage: configs/study_video.py's model and data with dense attention, from
scratch, at a constant learning rate (the second stages warm up and decay on their own).

  python train_main.py --config=configs/study_video_base.py --workdir=/tmp/study_video_base
"""

from configs import study_video


def get_config():
  c = study_video.get_config()
  c.model.gaze.attention = "dense"
  c.init_from_checkpoint = ""
  c.optim.end_lr_ratio = 1.0
  c.train.num_steps = 1_000
  c.train.eval_every = 500
  return c

"""Study task (issue 12): a video question about one frame, with clips of 2 to 4 frames, where
K from a ratio per example (the paper's semantics) and K from a ratio of the batch's
``max_regions`` differ.

  python train_main.py --config=configs/study_video_base.py --workdir=/tmp/study_video_base
  python train_main.py --config=configs/study_video.py --workdir=/tmp/study_video \
      --config.init_from_checkpoint=/tmp/study_video_base
  python train_main.py --config=configs/study_video.py --workdir=/tmp/study_video_per_example \
      --config.init_from_checkpoint=/tmp/study_video_base \
      --config.model.gaze.top_k_per_example=True
  python -m benchmarks.study --sweep=video --seeds=0,1,2          # all of it, three seeds

The task: gaze_video clips of 2 to 4 frames (``min_frames=2, frames=4``, drawn per clip) with
two shapes that appear, move and one of which changes colour, and one question type,
"changed_colour_in_last_frame": "What colour was the triangle in the last frame?", asked only
about the shape that changed colour. The answer lives in that shape's region (or the few that
its box straddles) in the frames from the change on, often the last frame alone; the same shape
shows another colour before the change, and the other shape's colour is a distractor. (Asked
about either shape, as "colour_in_last_frame" does, half the questions are about a shape whose
colour never changes, which any frame answers: random regions then came within 2.5 points of
the routed ones.)

The model is the ``tiny`` preset with a 4-layer decoder and group routing (2 GQA groups of 2
heads), at 64 px with 16 px patches and no video pooling (``video_pool=1``): 16 patch tokens
per frame, each one gaze region (``region_shape=(1, 1)``), and no context tokens
(``num_ctx=0``): with 4 per frame, a probe answered from the last frame's context tokens alone
(random regions 71.5% against the routed ones' 72.7%), so routing did not matter. A clip thus
has 32, 48 or 64 regions (``max_regions=64``) and as many visual tokens.

K is the ratio ``top_k=0.0625``: by default K = ceil(0.0625 x max_regions) = 4 for every
example, so a 2-frame clip reads 4 of its 32 regions (12.5%); with
``model.gaze.top_k_per_example=True`` each clip gets ceil(0.0625 x its own regions) = 2, 3 or 4
(6.25% of every clip), the paper's semantics.

Training has two stages, as in configs/demo.py: configs/study_video_base.py trains the model
with dense attention from scratch (1,000 steps); this config starts from its parameters
(``init_from_checkpoint``) and converts it to gaze attention at the target K from its first
step (no progressive top-K), for 600 steps, about 5 minutes on a 2-core CPU.
"""

from configs import study_digits


def get_config():
  c = study_digits.get_config()
  c.data.name = "gaze_video"
  c.data.builder_config = "64px"
  c.data.builder_overrides.frames = 4
  c.data.builder_overrides.min_frames = 2
  c.data.builder_overrides.min_objects = 2
  c.data.builder_overrides.max_objects = 2
  c.data.builder_overrides.question_types = ("changed_colour_in_last_frame",)
  c.data.builder_overrides.num_train = 8_000
  c.data.builder_overrides.num_validation = 512
  c.data.builder_overrides.num_test = 512
  c.data.max_images = 4                        # frames
  c.data.max_regions = 64                      # 4 frames x 16 one-patch regions
  c.data.seq_len = 96                          # 4 x 16 visual slots and the text
  c.model.vision.patch_size = 16
  c.model.vision.video_pool = 1
  c.model.gaze.region_shape = (1, 1)
  c.model.gaze.num_ctx = 0
  c.model.gaze.top_k = 0.0625
  c.topk_schedule.enabled = False
  c.train.num_steps = 600
  c.train.eval_every = 300
  c.train.eval_batches = 8
  return c

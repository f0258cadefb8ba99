"""Fine-tune LLaVA-OneVision (Qwen2 0.5B with SigLIP at 384 px) with gaze attention, starting
from its Hugging Face folder: the paper's recipe, which converts a pretrained MLLM by
fine-tuning it. The vision tower, projector, ``image_newline`` and decoder come from the folder
(its config.json fixes their shapes), as do the tokenizer, chat template and image / video
processing; the context tokens start fresh. Data: your LLaVA-format JSON and images
(``configs/common.py: llava_json_data``).

Each image is LLaVA-OneVision's base image (27 x 27 tokens, padded to a square, and its
newline: ``data.image_grid = (0, 0)``, transformers' form for several images), cut into 81
regions of 3 x 3; K = 25% of the regions, 4 context tokens per image. ``image_grid = (2, 2)``
adds the anyres tiles (a 54 x 54 grid with a newline per row for a square image: about 3,700
tokens per image); videos are frames pooled to 14 x 14 and one newline.

  # the checkpoint, once, where the hub is reachable (or copy it to a bucket):
  huggingface-cli download llava-hf/llava-onevision-qwen2-0.5b-ov-hf \\
      --local-dir ./llava-onevision-qwen2-0.5b-ov-hf

  python train_main.py --config=configs/llava_onevision_0_5b.py --workdir=/tmp/llava_ov_gaze \\
      --config.model.init=hf:./llava-onevision-qwen2-0.5b-ov-hf \\
      --config.data.builder_overrides.json_files.train=/data/train.json \\
      --config.data.builder_overrides.json_files.validation=/data/val.json \\
      --config.data.builder_overrides.image_dir=/data/images
  python eval_main.py --workdir=/tmp/llava_ov_gaze
  python predict_main.py --workdir=/tmp/llava_ov_gaze --image=photo.png --question="What is it?"
  python export_main.py --workdir=/tmp/llava_ov_gaze --out=/tmp/llava_ov_gaze_hf

  # Cloud TPU (e.g. v5e-8): the checkpoint, the run and the prepared dataset in a bucket
  python train_main.py --config=configs/llava_onevision_0_5b.py \\
      --workdir=gs://bucket/runs/llava_ov_gaze \\
      --config.model.init=hf:gs://bucket/models/llava-onevision-qwen2-0.5b-ov-hf \\
      --config.data.data_dir=gs://bucket/tfds \\
      --config.data.builder_overrides.json_files.train=/data/train.json \\
      --config.data.builder_overrides.json_files.validation=/data/val.json \\
      --config.data.builder_overrides.image_dir=/data/images
  python export_main.py --workdir=gs://bucket/runs/llava_ov_gaze --out=gs://bucket/llava_ov_gaze_hf
"""

from configs import common


def get_config():
  c = common.hf_base_config("./llava-onevision-qwen2-0.5b-ov-hf")
  common.llava_json_data(c, {"train": "train.json", "validation": "val.json"}, "images")
  c.model.decoder.remat = True
  c.model.gaze.top_k = 0.25
  c.model.gaze.region_shape = (3, 3)
  c.model.gaze.num_ctx = 4
  c.data.image_grid = (0, 0)
  # 729 visual tokens, a newline and 4 context tokens per image, and the conversation.
  c.data.max_images = 1
  c.data.max_regions = 81
  c.data.seq_len = 1024
  c.data.batch_size = 32
  c.optim.learning_rate = 1e-5
  return c

"""Fine-tune SmolVLM (or Idefics3) with gaze attention, starting from its Hugging Face folder:
the paper's recipe, which converts a pretrained MLLM by fine-tuning it. The vision tower,
pixel-shuffle connector and SmolLM2 decoder come from the folder (its config.json fixes their
shapes), as do the tokenizer, chat template and image processing; the context tokens start
fresh. Data: your LLaVA-format JSON and images (``configs/common.py: llava_json_data``).

SmolVLM-256M: 512 px tiles, 8 x 8 visual tokens per tile (patch 16, pixel shuffle 4), cut into
16 regions of 2 x 2; each image is 2 x 2 tiles plus the global image (``data.image_grid``),
K = 25% of the regions, 4 context tokens per tile.

  # the checkpoint, once, where the hub is reachable (or copy it to a bucket):
  huggingface-cli download HuggingFaceTB/SmolVLM-256M-Instruct --local-dir ./SmolVLM-256M-Instruct

  python train_main.py --config=configs/smolvlm.py --workdir=/tmp/smolvlm_gaze \\
      --config.model.init=hf:./SmolVLM-256M-Instruct \\
      --config.data.builder_overrides.json_files.train=/data/train.json \\
      --config.data.builder_overrides.json_files.validation=/data/val.json \\
      --config.data.builder_overrides.image_dir=/data/images
  python eval_main.py --workdir=/tmp/smolvlm_gaze
  python predict_main.py --workdir=/tmp/smolvlm_gaze --image=photo.png --question="What is it?"
  python export_main.py --workdir=/tmp/smolvlm_gaze --out=/tmp/smolvlm_gaze_hf

  # Cloud TPU: the checkpoint, the run and the prepared dataset in a bucket
  python train_main.py --config=configs/smolvlm.py --workdir=gs://bucket/runs/smolvlm_gaze \\
      --config.model.init=hf:gs://bucket/models/SmolVLM-256M-Instruct \\
      --config.data.data_dir=gs://bucket/tfds \\
      --config.data.builder_overrides.json_files.train=/data/train.json \\
      --config.data.builder_overrides.json_files.validation=/data/val.json \\
      --config.data.builder_overrides.image_dir=/data/images
  python export_main.py --workdir=gs://bucket/runs/smolvlm_gaze --out=gs://bucket/smolvlm_gaze_hf

In Colab (one GPU or a TPU v2-8): the same commands with ``--config.data.batch_size=8``.
"""

from configs import common


def get_config():
  c = common.hf_base_config("./SmolVLM-256M-Instruct")
  common.llava_json_data(c, {"train": "train.json", "validation": "val.json"}, "images")
  c.model.gaze.top_k = 0.25
  c.model.gaze.region_shape = (2, 2)
  c.model.gaze.num_ctx = 4
  c.data.image_grid = (2, 2)
  # 5 tiles x (64 visual + 4 context) tokens + the text of a turn or two.
  c.data.max_images = 5
  c.data.max_regions = 5 * 16
  c.data.seq_len = 640
  c.data.batch_size = 32
  c.optim.learning_rate = 2e-5
  return c

"""Fine-tune Qwen2.5-VL-7B-Instruct with gaze attention, starting from its Hugging Face folder.
The vision tower (window attention, 2 x 2 patch merger), the decoder with its M-RoPE and the
tokenizer, chat template and image processing come from the folder (its config.json fixes
their shapes); the context tokens start fresh. Data: your LLaVA-format JSON and images
(``configs/common.py: llava_json_data``).

Static shapes: every image is resized to one bucket, ``data.buckets = ((672, 672),)`` pixels
(a side a multiple of 28: patch 14 x merge 2), as transformers' processor does when its pixel
budget is pinned to that area: 48 x 48 patches, merged to a 24 x 24 grid of 576 visual tokens,
cut into 64 regions of 3 x 3; K = 25% of the regions, 4 context tokens per image. With one
bucket the vision tower compiles once (``MLLMConfig.qwen_grids``); several buckets
(``--config.data.buckets="((672, 672), (504, 896))"``, nearest by aspect ratio) compile one
step per distinct set of grids in a batch and train on one process only.

  # the checkpoint, once, where the hub is reachable (or copy it to a bucket):
  huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct --local-dir ./Qwen2.5-VL-7B-Instruct

  python train_main.py --config=configs/qwen2_5_vl_7b.py --workdir=/tmp/qwen2_5_vl_gaze \\
      --config.model.init=hf:./Qwen2.5-VL-7B-Instruct \\
      --config.data.builder_overrides.json_files.train=/data/train.json \\
      --config.data.builder_overrides.json_files.validation=/data/val.json \\
      --config.data.builder_overrides.image_dir=/data/images
  python eval_main.py --workdir=/tmp/qwen2_5_vl_gaze
  python export_main.py --workdir=/tmp/qwen2_5_vl_gaze --out=/tmp/qwen2_5_vl_gaze_hf

  # Cloud TPU (e.g. v5p-64): the checkpoint, the run and the prepared dataset in a bucket
  python train_main.py --config=configs/qwen2_5_vl_7b.py \\
      --workdir=gs://bucket/runs/qwen2_5_vl_gaze \\
      --config.model.init=hf:gs://bucket/models/Qwen2.5-VL-7B-Instruct \\
      --config.data.data_dir=gs://bucket/tfds \\
      --config.data.builder_overrides.json_files.train=/data/train.json \\
      --config.data.builder_overrides.json_files.validation=/data/val.json \\
      --config.data.builder_overrides.image_dir=/data/images

Memory: the 8.3B parameters take 16 bytes each in training (float32 weights and AdamW
moments), about 133 GB sharded over the mesh (fsdp takes the devices that tensor leaves), plus
the activations: use the Pallas kernels (``--config.model.gaze.implementation=pallas``) on a
pod, whose gathers do not grow with K_max.
"""

from configs import common

FOLDER = "./Qwen2.5-VL-7B-Instruct"
BUCKET = (672, 672)          # 24 x 24 merged tokens (factor 28)


def get_config(folder: str = FOLDER, bucket: tuple = BUCKET):
  c = common.hf_base_config(folder)
  common.llava_json_data(c, {"train": "train.json", "validation": "val.json"}, "images")
  c.model.decoder.remat = True
  c.model.decoder.scan_layers = True
  c.model.gaze.top_k = 0.25
  c.model.gaze.region_shape = (3, 3)
  c.model.gaze.num_ctx = 4
  c.data.buckets = (tuple(bucket),)
  # Up to 2 images x (576 visual + 4 context) tokens and the conversation.
  c.data.max_images = 2
  c.data.max_regions = 2 * 64
  c.data.seq_len = 2048
  c.data.batch_size = 64
  c.mesh.tensor = 4
  c.optim.learning_rate = 1e-5
  return c

"""Fine-tune Qwen3-VL-8B-Instruct with gaze attention, starting from its Hugging Face folder:
``configs/qwen2_5_vl_7b.py``'s recipe for Qwen3-VL (interleaved M-RoPE, DeepStack: features of
vision blocks 8, 16 and 24 added to the first decoder layers' visual tokens, which gaze keeps:
routing reads the layer's own K/V). The bucket is ``(768, 768)`` pixels (a side a multiple of
32: patch 16 x merge 2): 48 x 48 patches, merged to 24 x 24 = 576 visual tokens, 64 regions of
3 x 3, K = 25%.

  huggingface-cli download Qwen/Qwen3-VL-8B-Instruct --local-dir ./Qwen3-VL-8B-Instruct
  python train_main.py --config=configs/qwen3_vl_8b.py --workdir=gs://bucket/runs/qwen3_vl_gaze \\
      --config.model.init=hf:gs://bucket/models/Qwen3-VL-8B-Instruct \\
      --config.model.gaze.implementation=pallas \\
      --config.data.data_dir=gs://bucket/tfds \\
      --config.data.builder_overrides.json_files.train=/data/train.json \\
      --config.data.builder_overrides.json_files.validation=/data/val.json \\
      --config.data.builder_overrides.image_dir=/data/images

``make aot-full`` compiles this model's training step on a v5p-128 slice (64 chips, 4
sequences per chip) with the kernels and with dense attention: the README's pod-scale table
gives the peak HBM per chip of each.
"""

from configs import qwen2_5_vl_7b


def get_config():
  return qwen2_5_vl_7b.get_config("./Qwen3-VL-8B-Instruct", (768, 768))

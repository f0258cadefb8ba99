"""The paper's Cambrian-4B shape: SigLIP2-So400m/16-384 + Qwen3-4B, 24 x 24 patches cut into
16 regions of 6 x 6, K=4, 4 context tokens; progressive top-K over the first 30% of training.
For TPU / GPU pods: bf16 compute, float32 master weights, remat, parameters and optimizer
state sharded over ``fsdp`` (all devices by default), batch over ``data x fsdp``.

  python train_main.py --config=configs/cambrian_4b.py --workdir=gs://bucket/cambrian_4b
  # 8 GPUs with 2-way tensor parallelism:
  python train_main.py --config=configs/cambrian_4b.py --workdir=/ckpt/c4b \
      --config.mesh.fsdp=4 --config.mesh.tensor=2
  # multi-host (one process per host):
  python train_main.py --config=configs/cambrian_4b.py --workdir=... \
      --config.distributed.coordinator_address=host0:1234 \
      --config.distributed.num_processes=4 --config.distributed.process_id=$RANK

The data default is gaze_shapes at 384 px with the byte tokenizer (runs anywhere); for real
instruction data copy this file and set ``data.name = "llava_json"``,
``data.builder_overrides = {"json_files": {...}, "image_dir": ...}`` and
``data.tokenizer`` = a folder with Qwen3's tokenizer.json. Memory plan:
``python -m gaze_jax.model.memory --preset=cambrian_4b --batch=64 --seq_len=1024 --devices=8
--remat --attention_impl=pallas``
(the Pallas kernels: ``--config.model.gaze.implementation=pallas``; the xla path sizes its
gathers for K_max, the schedule's start of all regions, and needs 5-7x more here).
"""

from configs import common


def get_config():
  c = common.base_config("cambrian_4b")
  c.model.dtype = "bfloat16"
  c.model.decoder.remat = True
  c.model.gaze.top_k = 4
  c.data.builder_config = "384px"
  c.data.seq_len = 1024
  c.data.max_regions = 16
  c.data.batch_size = 64
  c.optim.learning_rate = 2e-5
  c.optim.warmup_steps = 300
  c.optim.weight_decay = 0.0
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.train.num_steps = 10_000
  c.train.log_every = 10
  c.train.eval_every = 1000
  c.checkpoint.save_every = 500
  return c

"""SigLIP2-So400m/16-384 + Qwen2.5-7B (qkv bias, untied LM head): the Cambrian-4B recipe at 7B,
with 4-way tensor parallelism on top of FSDP (heads, MLP and vocabulary split over ``tensor``).

  python train_main.py --config=configs/qwen2_5_7b.py --workdir=gs://bucket/qwen2_5_7b
  # e.g. 16 devices as fsdp 4 x tensor 4 (the default: fsdp takes what tensor leaves)
  python train_main.py --config=configs/qwen2_5_7b.py --workdir=/ckpt/q7b --config.mesh.tensor=4

See configs/cambrian_4b.py for multi-host flags and real instruction data. Memory plan:
``python -m gaze_jax.model.memory --preset=qwen2_5_7b --batch=64 --seq_len=1024 --devices=16
--remat --attention_impl=pallas``
(the Pallas kernels: ``--config.model.gaze.implementation=pallas``; the xla path sizes its
gathers for K_max, the schedule's start of all regions, and needs 5-7x more here).
"""

import ml_collections

from configs import cambrian_4b
from gaze_jax.model.presets import get_preset
from gaze_jax.train.config import model_fields


def get_config():
  c = cambrian_4b.get_config()
  fields = model_fields(get_preset("qwen2_5_7b"))
  c.model.decoder = ml_collections.ConfigDict(fields["decoder"])
  c.model.decoder.remat = True
  c.mesh.tensor = 4
  c.optim.learning_rate = 1e-5
  return c

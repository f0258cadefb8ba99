"""Training: config -> sharded train step, optax, progressive top-K, orbax checkpoints, metrics.

* ``trainer.train(config, workdir)``: the whole loop (what ``train_main.py`` runs).
* ``checkpoint.restore_model(workdir, config, step=None) -> (MLLM, step)``: a trained model
  for evaluation (``gaze_jax.runs.restore`` adds its tokenizer and layout spec);
  ``checkpoint.Checkpointer`` / ``CheckpointError``.
* ``step.TrainStep``: the jitted step (loss on answer tokens, AdamW, routing statistics).
* ``optim.make_optimizer``: AdamW + warm-up/cosine + clipping + regex parameter groups.
* ``sharding``: the ``data x fsdp x tensor`` mesh and logical axis rules.
* ``metrics``: TensorBoard / JSONL writers, progress line, FLOPs and MFU.
* ``config.run_config(config) -> RunConfig``: a config (ConfigDict, a run's ``config.json``)
  typed and checked once: the model (``MLLMConfig``), the other sections (``sections``: one
  self-checking dataclass each), the ``LayoutSpec`` and the top-K plan; ``dicts``: config
  trees as plain dicts.
* ``tokenizer.run_tokenizer(run)``: the run's tokenizer (``config.data.tokenizer``).

Submodules are imported on use, so ``import gaze_jax.train`` is cheap.
"""

import importlib

_LAZY = {"train": "trainer", "restore_model": "checkpoint", "Checkpointer": "checkpoint",
         "CheckpointError": "checkpoint", "TrainStep": "step", "make_optimizer": "optim",
         "make_mesh": "sharding"}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f"gaze_jax.train.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'gaze_jax.train' has no attribute {name!r}")

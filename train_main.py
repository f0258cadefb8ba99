"""Train a gaze-attention MLLM.

  python train_main.py --config=configs/demo.py --workdir=/tmp/gaze_demo
  python train_main.py --config=configs/demo.py --workdir=/tmp/gaze_demo \
      --config.train.num_steps=200 --config.model.gaze.top_k=2

Rerunning the same command resumes from the latest checkpoint in ``--workdir``. Each config's
docstring gives its exact command. Multi-process: set ``--config.distributed.
coordinator_address=host:port --config.distributed.num_processes=N
--config.distributed.process_id=i`` (or ``JAX_COORDINATOR_ADDRESS`` / cluster auto-detection
with ``--config.distributed.auto=True``).

An error meant for the user (a config field, a dataset record, a failed save) is one line; its
traceback goes to ``<workdir>/errors.log`` (``--verbose`` prints it too).
"""

import json
import logging

from absl import app, flags
from ml_collections import config_flags

from gaze_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl, tb/ and the dataset")
_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file",
                                          lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from gaze_jax.train.preflight import check_train_config
  where = f"--config={config_flags.get_config_filename(flags.FLAGS['config'])}"
  # The whole config, typed and checked once, before anything is written or a device touched.
  try:
    run = check_train_config(_CONFIG.value, where)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  # jax.distributed must be initialised before anything touches the devices.
  from gaze_jax.train import trainer
  trainer.maybe_initialize_distributed(run)
  summary = trainer.train(run, _WORKDIR.value)
  done = {k: summary[k] for k in ("step", "eval", "preempted", "wall_s")}
  logging.getLogger("gaze_jax").info("done: %s", json.dumps(done, default=str))


if __name__ == "__main__":
  cli.run(main, log_dir=lambda: _WORKDIR.value)

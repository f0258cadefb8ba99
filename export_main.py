"""Export a trained run.

  # A Hugging Face folder (a run started from model.init=hf:<folder>): the folder's config,
  # tokenizer and processor files with the run's weights, plus the gaze parts
  # (gaze.ctx_embed, gaze_config.json). transformers loads it; model.init=hf:<out> restores it.
  python export_main.py --workdir=/tmp/smolvlm_gaze --out=/tmp/smolvlm_gaze_hf
  python export_main.py --workdir=gs://bucket/runs/smolvlm --out=gs://bucket/exports/smolvlm

  # Parameters only, for serving (no optimizer state): a folder that eval_main.py and
  # predict_main.py take as --workdir.
  python export_main.py --workdir=/tmp/gaze_demo --out=/tmp/gaze_demo_serve --params_only

Exports the latest checkpoint, or ``--step``. An error is one line (``--verbose``: with its
traceback).
"""

from __future__ import annotations

import json

from absl import app, flags

from gaze_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's --workdir.", required=True)
flags.DEFINE_string("out", None, "Where the export goes (a local folder or gs://...).",
                    required=True)
flags.DEFINE_integer("step", None, "A checkpoint step (default: the latest).", lower_bound=0)
flags.DEFINE_bool("params_only", False, "Write the parameters only, for serving (our run "
                  "layout), instead of a Hugging Face folder.")
flags.DEFINE_string("dtype", None, "The dtype of the exported weights (e.g. bfloat16; default: "
                    "each tensor's dtype in the folder the run started from).")
flags.DEFINE_integer("max_shard_mb", 2048, "The largest safetensors shard, in MB.",
                     lower_bound=1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from gaze_jax import exports

  # A missing or foreign workdir, a bad --dtype: ValueError / FileNotFoundError, one line
  # through cli.run.
  if FLAGS.params_only:
    summary = exports.export_params(FLAGS.workdir, FLAGS.out, step=FLAGS.step)
  else:
    summary = exports.export_hf(FLAGS.workdir, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype,
                                max_shard_bytes=FLAGS.max_shard_mb << 20)
  print(json.dumps({"out": FLAGS.out, **summary}))


if __name__ == "__main__":
  cli.run(main)

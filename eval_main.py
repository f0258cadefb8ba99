"""Evaluates a trained run: answer accuracy, visual KV entries per query, attention FLOPs per
decode query and routing accuracy, beside baselines from the same weights (dense,
token-matched dense, fixed-from-question eviction) and, optionally, a separately trained model
(e.g. ``demo_dense``) on the same data. Writes ``eval_results.json``, ``eval_results.md`` and
gaze maps under ``--out_dir`` (default ``<workdir>/eval``). ``--workdir`` and ``--out_dir`` may be
local or ``gs://``.

The run is evaluated as it was trained: its model comes from its checkpoint (the target K, the
attention it trained with), its data and tokenizer from its ``config.json``. ``--config`` gives
other data settings; a config whose model differs from the trained one is refused, naming the
fields. To evaluate the same weights another way, say so: ``--override=gaze.top_k=2`` (how
attention routes: attention, top_k, score, routing, region_shape, ...); the overrides are
printed and recorded in the results. An error is one line (``--verbose``: with its traceback).

  python eval_main.py --workdir=/tmp/gaze_demo \\
      --compare_workdir=/tmp/gaze_demo_dense --compare_name=dense_twin
  python eval_main.py --workdir=/tmp/gaze_demo --override=gaze.top_k=1
"""

from __future__ import annotations

import logging

from absl import app, flags
from etils import epath
from ml_collections import config_flags

from gaze_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Data settings (default: the run's own "
                                "config.json); its model must be the trained one.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The run's --workdir (its checkpoints).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", lower_bound=0)
flags.DEFINE_list("splits", ["validation"], "Dataset splits to evaluate.")
flags.DEFINE_integer("max_batches", None, "Batches per split (default: config.train.eval_batches,"
                     " 0 = the whole split).", lower_bound=0)
flags.DEFINE_list("baselines", ["dense", "token_matched", "fixed_from_question",
                                "random_routing"], "Baselines from the same weights.")
flags.DEFINE_integer("random_seed", 0, "Seed of the random-routing baseline's draws.")
flags.DEFINE_integer("num_gaze_maps", 4, "Gaze-map PNGs per split.", lower_bound=0)
flags.DEFINE_bool("answer_prior", True, "Add the answer-prior row (most common training answer "
                  "per question, no image) and accuracy per question type.")
flags.DEFINE_bool("allow_nonfinite", False, "Evaluate even weights that hold NaN or infinite "
                  "values (a diverged run; refused otherwise).")
flags.DEFINE_string("out_dir", None, "Where results go (default <workdir>/eval).")
flags.DEFINE_list("override", [], "Evaluate the trained weights with these model changes, e.g. "
                  "gaze.top_k=2,gaze.attention=dense (printed and recorded).")
config_flags.DEFINE_config_file("compare_config", None, "Data settings of a second run to "
                                "compare (default: its own config.json).", lock_config=True)
flags.DEFINE_string("compare_workdir", None, "Workdir of the second run.")
flags.DEFINE_string("compare_name", None, "Row name of the second run (default: its config "
                    "file name).")
flags.mark_flags_as_required(["workdir"])
flags.register_validator("splits", bool, "give at least one split, e.g. --splits=validation")


@flags.multi_flags_validator(["compare_workdir", "compare_config", "compare_name"],
                             "--compare_config and --compare_name describe the run of "
                             "--compare_workdir: give it too")
def _compare_needs_a_workdir(values):
  return bool(values["compare_workdir"]) or (values["compare_config"] is None
                                             and not values["compare_name"])


def _load(config, workdir, step=None, overrides=None, flag="--config"):
  """The run in ``workdir`` (``runs.Restored``): its model as trained (with ``overrides``),
  its data from ``config`` (its own ``config.json`` when None)."""
  from gaze_jax import runs
  from gaze_jax.train.config import run_config
  try:
    config = None if config is None else run_config(config, flag)
    return runs.restore(config, workdir, step, overrides=overrides,
                        allow_nonfinite=FLAGS.allow_nonfinite)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def main(argv):
  del argv
  from gaze_jax.data.pipeline import data_source
  from gaze_jax.eval import GazeMaps, evaluate, markdown_report, write_report
  from gaze_jax.eval.evaluate import BASELINES
  from gaze_jax.eval.prior import answer_prior, qa_records

  from gaze_jax import runs

  workdir = FLAGS.workdir
  out = epath.Path(FLAGS.out_dir or epath.Path(workdir) / "eval")
  unknown = sorted(set(FLAGS.baselines) - set(BASELINES))
  if unknown:                        # before minutes of loading
    raise app.UsageError(f"--baselines: unknown {', '.join(unknown)}; known: "
                         f"{', '.join(BASELINES)}")
  try:
    overrides = runs.parse_overrides(FLAGS.override)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  model, step, cfg, spec, tok, config = _load(FLAGS.config, workdir, FLAGS.step, overrides)
  train_split = config.data.train_split
  max_batches = (FLAGS.max_batches if FLAGS.max_batches is not None
                 else config.train.eval_batches)
  max_batches = max_batches or None
  g = cfg.gaze
  log = logging.getLogger("gaze_jax.eval")
  log.info("evaluating %s at step %d as trained: attention %s%s", workdir, step, g.attention,
           f", K {g.top_k}, regions {g.region_shape}" if g.attention == "gaze" else "")
  if overrides:
    print("model overrides (not the trained model): " +
          ", ".join(f"{k}={v!r}" for k, v in overrides.items()))
  other = None
  if FLAGS.compare_workdir:
    other = _load(FLAGS.compare_config, FLAGS.compare_workdir, flag="--compare_config")
    name = FLAGS.compare_name or epath.Path(FLAGS.compare_workdir).name
  results = []
  train_records = None
  for split in FLAGS.splits:
    builder, batches = runs.eval_batches(config, workdir, cfg, spec, tok, split)
    records = groups = None
    if FLAGS.answer_prior:
      records = qa_records(data_source(builder, split))
      groups = [r.type for r in records]
      if train_records is None:
        train_records = qa_records(data_source(builder, train_split))
    # The main row is "gaze", or "dense_trained" for a model trained with dense attention
    # ("dense" is the gaze model's dense twin).
    main = "gaze" if cfg.gaze.attention == "gaze" else "dense_trained"
    res = evaluate(model, batches, spec, baselines=tuple(FLAGS.baselines), split=split,
                   name=main,
                   max_batches=max_batches, tokenizer=tok,
                   gaze_maps=GazeMaps(out / "gaze_maps" / split, count=FLAGS.num_gaze_maps),
                   groups=groups, random_seed=FLAGS.random_seed, log=log.info)
    if other is not None:
      o_model, o_step, o_cfg, o_spec, o_tok, o_config = other
      _, o_batches = runs.eval_batches(o_config, FLAGS.compare_workdir, o_cfg, o_spec, o_tok,
                                       split)
      o_res = evaluate(o_model, o_batches, o_spec, baselines=(), split=split, name=name,
                       max_batches=max_batches, groups=groups, log=log.info)
      res["results"][f"{name} (trained, step {o_step})"] = o_res["results"][name]
    if records is not None:
      # Over the examples the models were scored on (the last partial batch is dropped).
      prior = answer_prior(train_records, records[:res["examples"]])
      prior.pop("hits")
      res["results"]["answer_prior"] = {"name": "answer_prior", **prior}
    res["model_overrides"] = {k: v if isinstance(v, (int, float, str, bool)) else list(v)
                              for k, v in overrides.items()}
    results.append(res)
  paths = write_report(results, out)
  print(markdown_report(results))
  print(f"results: {paths['json']}  table: {paths['markdown']}  gaze maps: {out / 'gaze_maps'}")


if __name__ == "__main__":
  cli.run(main)

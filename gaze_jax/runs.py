"""A training run seen from outside: its tokenizer, its model restored from ``--workdir``, and
its evaluation batches, for ``eval_main.py``, ``predict`` and ``exports``.

The layer above ``gaze_jax.train``: the pieces live there (the checkpoint format, config ->
model / layout, the input pipeline, the run's tokenizer) and nothing in ``gaze_jax.train``
imports this module.

* ``run_tokenizer(run)`` (``gaze_jax.train.tokenizer``: ``make_tokenizer(config.data.
  tokenizer)``): the run's tokenizer;
* ``load_run_config(workdir)``: the config a run trained with (its ``config.json``), as a
  ``RunConfig``;
* ``restore(config, workdir, step=None, overrides=...) -> Restored(model, step, model_cfg, spec,
  tokenizer, config)``: the model as the run trained it (its checkpoint's record), changed only by
  explicit overrides;
* ``eval_batches(config, workdir, model_cfg, spec, tokenizer, split) -> (builder, iterator)``.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any, NamedTuple, Optional

from etils import epath

from gaze_jax.paths import read_json
from gaze_jax.train import data as data_lib
from gaze_jax.train.checkpoint import (CHECKPOINT_DIR, CheckpointError, Checkpointer,
                                       model_differences, restore_model, with_runtime_fields)
from gaze_jax.train.config import (RunConfig, layout_spec, model_config_from_dict,
                                   run_config)
# make_tokenizer: here too for the callers that build a tokenizer by name.
from gaze_jax.train.tokenizer import make_tokenizer, run_tokenizer  # noqa: F401


class Restored(NamedTuple):
  """A trained run: its model at ``step``, the model config and layout spec its batches take,
  its tokenizer (checked against the checkpoint's fingerprint) and the run config of its data
  (``RunConfig``)."""
  model: Any
  step: int
  model_cfg: Any
  spec: Any
  tokenizer: Any
  config: RunConfig


def run_config_path(workdir):
  """``<workdir>/config.json`` (an ``epath.Path``: local or ``gs://``)."""
  return epath.Path(workdir) / "config.json"


def load_run_config(workdir) -> RunConfig:
  """The config a run trained with (``<workdir>/config.json``, written by the trainer; local
  or ``gs://``) as a ``RunConfig``. FileNotFoundError without it; ValueError naming the file
  when it is not a JSON object (e.g. cut short) or holds a bad field. A field it lacks (a run
  of an older version) takes its default, with a warning naming it."""
  path = run_config_path(workdir)
  if not path.parent.is_dir():
    raise FileNotFoundError(f"--workdir {workdir} does not exist")
  if not path.is_file():
    raise FileNotFoundError(f"{workdir} has no config.json: is it the --workdir of a training "
                            "run (train_main.py writes config.json there)?")
  return run_config(read_json(path), str(path), old_run=True)


def trained_model(workdir, step: Optional[int] = None, config: Optional[RunConfig] = None):
  """``(MLLMConfig, meta)``: the model the run in ``workdir`` trained (its target K), read from
  the checkpoint's ``meta`` (``trained_model``), or for checkpoints written before it was
  recorded from the run's ``config.json`` (``config`` when already loaded). Raises
  ``CheckpointError`` without checkpoints."""
  ckpt = Checkpointer(epath.Path(workdir) / CHECKPOINT_DIR, read_only=True)
  try:
    found = ckpt.read_meta(step)
  finally:
    ckpt.close()
  if found is None:
    raise CheckpointError(f"no checkpoint under {epath.Path(workdir) / CHECKPOINT_DIR}")
  meta = found[1]
  if meta.get("trained_model"):
    return model_config_from_dict(meta["trained_model"], f"{workdir} checkpoint meta"), meta
  return (config or load_run_config(workdir)).model, meta


# What evaluation may change of a trained model: how its attention routes. Everything else
# (shapes, context tokens) is the weights'.
OVERRIDABLE = ("gaze.attention", "gaze.top_k", "gaze.score", "gaze.routing", "gaze.route_prompt",
               "gaze.region_shape", "gaze.top_k_per_example", "gaze.implementation",
               "gaze.query_chunk")


def parse_overrides(items) -> dict[str, Any]:
  """``["gaze.top_k=2", "gaze.attention=dense"]`` -> ``{"gaze.top_k": 2, ...}`` (values as
  Python literals, else strings). Raises ValueError naming a field that may not be
  overridden (``OVERRIDABLE``: the weights fix the rest) or an item without ``=``."""
  out = {}
  for item in items or ():
    key, sep, value = str(item).partition("=")
    key = key.strip().removeprefix("model.")
    if not sep:
      raise ValueError(f"--override {item!r}: use field=value, e.g. gaze.top_k=2")
    if key not in OVERRIDABLE:
      raise ValueError(f"--override {key}: only {', '.join(OVERRIDABLE)} may be overridden "
                       "(the other fields are the trained weights')")
    try:
      out[key] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key] = value.strip()
  return out


def with_overrides(cfg, overrides: dict[str, Any]):
  """``cfg`` (an ``MLLMConfig``) with ``{"gaze.<field>": value}`` applied."""
  gaze = {k.split(".", 1)[1]: v for k, v in overrides.items()}
  if "region_shape" in gaze:
    gaze["region_shape"] = tuple(gaze["region_shape"])
  return dataclasses.replace(cfg, gaze=dataclasses.replace(cfg.gaze, **gaze)) if gaze else cfg


def restore(config: Any, workdir, step: Optional[int] = None, *, overrides=None, mesh=None,
            rules=None, allow_nonfinite: bool = False) -> Restored:
  """The run in ``workdir`` at ``step`` (default: its latest checkpoint), built as it was
  trained: the model recorded in the checkpoint (``trained_model``; the target K), changed only
  by ``overrides`` (``parse_overrides``: how attention routes, said out loud by the caller).

  Args:
    config: the config whose data, tokenizer and static shapes to use (a ``RunConfig``, or
      what ``run_config`` converts; the run's own ``config.json`` when None). Its model must be
      the trained one: a field that differs (attention, K, widths) is a ValueError naming the
      fields, unless ``overrides`` sets it.
    overrides: ``{"gaze.top_k": 2, ...}`` applied to the trained model.
    mesh, rules: shard the weights (``train.checkpoint.restore_model``).
    allow_nonfinite: restore weights that hold NaN or infinite values (a diverged run), with a
      warning; refused otherwise.
  Raises:
    ValueError: ``config`` asks for another model than the one trained; the run's
      ``config.json`` is cut short or holds a bad field (the message names the file and field).
    CheckpointError: no checkpoint, one of another model's weights, another tokenizer,
      non-finite weights.
  """
  own = config is None
  config = load_run_config(workdir) if own else run_config(config)
  overrides = dict(overrides or {})
  trained, _ = trained_model(workdir, step, config if own else None)
  if not own:
    asked = config.model
    diff = {k: v for k, v in model_differences(trained, asked).items() if k not in overrides}
    if diff:
      shown = "; ".join(f"model.{k}: trained {a!r}, --config {b!r}"
                        for k, (a, b) in diff.items())
      raise ValueError(f"the config asks for another model than the run in {workdir} trained "
                       f"({shown}): evaluate the run as trained (its own config.json is the "
                       "default), or say --override=" + ",".join(
                           f"{k}={b!r}" for k, (_, b) in diff.items()))
    # How the model runs (dtypes, kernels, remat) is the config's to choose.
    trained = with_runtime_fields(trained, asked)
  cfg = with_overrides(trained, overrides)
  tok = run_tokenizer(config)
  model, step = restore_model(workdir, cfg, step, tokenizer=tok, mesh=mesh, rules=rules,
                              allow_nonfinite=allow_nonfinite)
  return Restored(model, step, cfg, layout_spec(config.data, cfg), tok, config)


def eval_batches(config: RunConfig, workdir, model_cfg, spec, tokenizer, split: str):
  """``(builder, iterator)``: the run's dataset (built under ``workdir`` when
  ``config.data.data_dir`` is empty) and one ordered pass over ``split`` in batches of
  ``config.data.batch_size``."""
  builder = data_lib.prepare(config, workdir)
  return builder, data_lib.make_iterator(config, builder, tokenizer, model_cfg, spec,
                                         split=split, train=False)

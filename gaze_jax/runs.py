"""A training run seen from outside: its tokenizer, its model restored from ``--workdir``, and
its evaluation batches, for ``eval_main.py``, ``predict`` and ``exports``.

The layer above ``gaze_jax.train``: the pieces live there (the checkpoint format, config ->
model / layout, the input pipeline, the run's tokenizer) and nothing in ``gaze_jax.train``
imports this module.

* ``run_tokenizer(config)`` (``gaze_jax.train.tokenizer``: ``make_tokenizer(config.data.
  tokenizer)``): the run's tokenizer;
* ``load_run_config(workdir)``: the config a run trained with (its ``config.json``);
* ``restore(config, workdir, step=None, overrides=...) -> Restored(model, step, model_cfg, spec,
  tokenizer)``: the model as the run trained it (its checkpoint's record), changed only by
  explicit overrides;
* ``eval_batches(config, workdir, model_cfg, spec, tokenizer, split) -> (builder, iterator)``.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
from typing import Any, NamedTuple, Optional

import ml_collections
from etils import epath

from gaze_jax.paths import read_json
from gaze_jax.train import data as data_lib
from gaze_jax.train.checkpoint import (CHECKPOINT_DIR, CheckpointError, Checkpointer,
                                       model_differences, restore_model, with_runtime_fields)
from gaze_jax.train.config import (config_from_dict, eval_model_config, layout_spec,
                                   model_config_from_dict)
# make_tokenizer: here too for the callers that build a tokenizer by name.
from gaze_jax.train.tokenizer import make_tokenizer, run_tokenizer  # noqa: F401


class Restored(NamedTuple):
  """A trained run: its model at ``step``, the model config and layout spec its batches take,
  and its tokenizer (checked against the checkpoint's fingerprint)."""
  model: Any
  step: int
  model_cfg: Any
  spec: Any
  tokenizer: Any


def run_config_path(workdir):
  """``<workdir>/config.json`` (an ``epath.Path``: local or ``gs://``)."""
  return epath.Path(workdir) / "config.json"


def load_run_config(workdir):
  """The ConfigDict a run trained with (``<workdir>/config.json``, written by the trainer;
  local or ``gs://``). FileNotFoundError without it; ValueError naming the file when it is not
  a JSON object (e.g. cut short). A field it lacks is found where it is read: see
  ``naming_missing_fields``."""
  path = run_config_path(workdir)
  if not path.parent.is_dir():
    raise FileNotFoundError(f"--workdir {workdir} does not exist")
  if not path.is_file():
    raise FileNotFoundError(f"{workdir} has no config.json: is it the --workdir of a training "
                            "run (train_main.py writes config.json there)?")
  return config_from_dict(read_json(path))


def _missing_field(error: AttributeError, config) -> Optional[str]:
  """The dotted name (``"data.tokenizer"``) of the field of ``config`` whose read raised
  ``error`` (ml_collections' ``AttributeError(KeyError(name))``, which names the leaf only), or
  None when ``error`` is not such a read of ``config`` or one of its sections."""
  if config is None:
    return None
  getattr_code = ml_collections.ConfigDict.__getattr__.__code__
  read = None
  tb = error.__traceback__
  while tb is not None:                # the innermost ConfigDict.__getattr__ raised it
    if tb.tb_frame.f_code is getattr_code:
      read = tb.tb_frame.f_locals.get("self"), tb.tb_frame.f_locals.get("attribute")
    tb = tb.tb_next
  if read is None:
    return None
  node, name = read

  def find(section, prefix):         # by identity: only this config's sections count
    if section is node:
      return prefix
    for key, value in section.items():
      if isinstance(value, ml_collections.ConfigDict):
        found = find(value, f"{prefix}{key}.")
        if found is not None:
          return found
    return None

  prefix = find(config, "")
  return None if prefix is None else f"{prefix}{name}"


@contextlib.contextmanager
def naming_missing_fields(config, workdir):
  """Within the block, reading a field that ``config`` (loaded from ``<workdir>/config.json``)
  lacks is a ValueError naming the field and the file, not an AttributeError naming the leaf
  (``config`` None: the block's errors pass unchanged).

  The check is made where a field is read rather than against today's list of fields, so that
  the runs of older versions, whose config.json lacks fields added since, still load."""
  try:
    yield
  except AttributeError as e:
    field = _missing_field(e, config)
    if field is None:
      raise
    raise ValueError(f"{run_config_path(workdir)} lacks the field {field} (train_main.py "
                     "writes every field; configs/common.py: base_config gives each one's "
                     "default)") from e


def trained_model(workdir, step: Optional[int] = None, run_config: Any = None):
  """``(MLLMConfig, meta)``: the model the run in ``workdir`` trained (its target K), read from
  the checkpoint's ``meta`` (``trained_model``), or for checkpoints written before it was
  recorded from the run's ``config.json``. Raises ``CheckpointError`` without checkpoints."""
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
  return eval_model_config(run_config or load_run_config(workdir)), meta


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
    config: the config whose data, tokenizer and static shapes to use (the run's own
      ``config.json`` when None). Its model must be the trained one: a field that differs
      (attention, K, widths) is a ValueError naming the fields, unless ``overrides`` sets it.
    overrides: ``{"gaze.top_k": 2, ...}`` applied to the trained model.
    mesh, rules: shard the weights (``train.checkpoint.restore_model``).
    allow_nonfinite: restore weights that hold NaN or infinite values (a diverged run), with a
      warning; refused otherwise.
  Raises:
    ValueError: ``config`` asks for another model than the one trained; the run's
      ``config.json`` is cut short or lacks a field (the message names the file and field).
    CheckpointError: no checkpoint, one of another model's weights, another tokenizer,
      non-finite weights.
  """
  run_config = load_run_config(workdir) if config is None else None
  config = config if config is not None else run_config
  overrides = dict(overrides or {})
  with naming_missing_fields(run_config, workdir):
    trained, _ = trained_model(workdir, step, run_config)
    if run_config is None:
      asked = eval_model_config(config)
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
    return Restored(model, step, cfg, layout_spec(config, cfg), tok)


def eval_batches(config: Any, workdir, model_cfg, spec, tokenizer, split: str):
  """``(builder, iterator)``: the run's dataset (built under ``workdir`` when
  ``config.data.data_dir`` is empty) and one ordered pass over ``split`` in batches of
  ``config.data.batch_size``."""
  builder = data_lib.prepare(config, workdir)
  return builder, data_lib.make_iterator(config, builder, tokenizer, model_cfg, spec,
                                         split=split, train=False)

"""What a resumed run must share with its checkpoint: ``check_resume``.

A checkpoint's ``meta`` records the model it holds, the tokenizer and the whole run config.
Before a run reads a weight from its workdir it compares them with its own:

* the fields that decide the weights' shapes (``checkpoint.WEIGHT_FIELDS``): a difference is
  refused, naming each field (reading the weights would fail with a dump of the tree);
* the tokenizer's fingerprint (``checkpoint.check_tokenizer``);
* every other config field: a run that resumes with another ``top_k``, ``region_shape``,
  attention, dataset, learning rate... would mix two trainings. Refused, naming each field,
  unless ``config.checkpoint.allow_config_changes``; the fields of ``FREE_TO_CHANGE`` (how the
  run is executed and logged, not what it trains) may change, and ``train.num_steps`` with a
  warning (the schedules follow the new length from there on).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from gaze_jax.train import checkpoint as ckpt_lib
from gaze_jax.train.dicts import config_json

log = logging.getLogger("gaze_jax.train")

# Fields (or prefixes ending in ".") a resumed run may change freely.
FREE_TO_CHANGE = (
    "train.log_every", "train.eval_every", "train.eval_batches", "train.log_fingerprints",
    "train.peak_flops_per_device", "train.on_nonfinite", "train.max_skipped",
    "train.profile_steps", "checkpoint.",
    "mesh.", "logical_axis_rules", "distributed.", "data.num_threads", "data.data_dir",
    # Where the first weights came from: a resumed run reads its own checkpoint.
    "model.init", "init_from_checkpoint",
    # How the model runs, not what it is (checkpoint.RUNTIME_FIELDS, without param_dtype: the
    # saved weights' dtype).
    "model.dtype", "model.decoder.remat", "model.decoder.scan_layers",
    "model.gaze.implementation", "model.gaze.query_chunk", "model.gaze.kernel",
    "model.gaze.offload", "model.gaze.offload_cache")
# Allowed with a warning: extending a run is common, but its schedules change from here on.
WARN_ON_CHANGE = ("train.num_steps",)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in (d or {}).items():
    if isinstance(v, dict) and v and k != "kernel":
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _matches(name: str, fields) -> bool:
  return any(name == f or (f.endswith(".") and name.startswith(f)) for f in fields)


def config_changes(saved: Optional[dict], config: Any) -> dict[str, tuple]:
  """``{field: (checkpoint's value, config's value)}`` for the fields of the run config that
  differ from those a checkpoint recorded (as JSON: tuples are lists), outside
  ``FREE_TO_CHANGE``; a field only one of them has (added since) is not a change."""
  now = _flat(config_json(config))
  old = _flat(saved)
  return {k: (old[k], now[k]) for k in sorted(set(old) & set(now))
          if old[k] != now[k] and not _matches(k, FREE_TO_CHANGE)}


def check_resume(meta: Optional[dict], config: Any, model_cfg, tokenizer, where: str) -> None:
  """Raises ``checkpoint.CheckpointError`` naming ``where`` and every field when a run of
  ``config`` (building ``model_cfg``, with ``tokenizer``) cannot resume from a checkpoint with
  ``meta`` (see the module docstring). A meta without a record passes that check."""
  meta = meta or {}
  diff = ckpt_lib.weight_differences(meta.get("model"), model_cfg)
  if diff:
    shown = "; ".join(f"model.{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in diff.items())
    raise ckpt_lib.CheckpointError(
        f"{where} holds a model with other weight shapes ({shown}). Resume with the run's own "
        "config, or train this one in another --workdir.")
  ckpt_lib.check_tokenizer(meta, tokenizer, where)
  changes = config_changes(meta.get("config"), config)
  noted = {k: v for k, v in changes.items() if _matches(k, WARN_ON_CHANGE)}
  changes = {k: v for k, v in changes.items() if k not in noted}
  shown = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changes.items())
  if changes and not config.checkpoint.allow_config_changes:
    raise ckpt_lib.CheckpointError(
        f"{where} was trained with another config ({shown}): resuming would mix two trainings. "
        "Resume with the run's config (its config.json), train this one in another --workdir, "
        "or resume anyway with --config.checkpoint.allow_config_changes=True.")
  if changes:
    log.warning("%s: resuming with config changes (config.checkpoint.allow_config_changes): "
                "%s", where, shown)
  for k, (a, b) in noted.items():
    log.warning("%s: %s changed from %r to %r: the learning-rate and top-K schedules follow the "
                "new value from here on", where, k, a, b)

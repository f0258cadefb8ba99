"""Config trees as plain dicts: ``to_dict`` (a ConfigDict, a ``RunConfig``, namespace or mapping
-> nested dict) and ``config_json`` (the same as JSON reads it back: what a run's
``config.json`` records). A leaf module: ``train.config`` converts configs through it, the
trainer and the resume check record them with it."""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional


def to_dict(cfg: Any) -> Optional[dict]:
  """A plain (nested) dict of a ConfigDict / namespace / mapping (None stays None)."""
  if cfg is None:
    return None
  if hasattr(cfg, "to_dict"):
    return cfg.to_dict()
  if isinstance(cfg, Mapping):
    return {k: to_dict(v) if isinstance(v, Mapping) or hasattr(v, "to_dict") else v
            for k, v in cfg.items()}
  return dict(vars(cfg))


def config_json(cfg: Any) -> Optional[dict]:
  """``to_dict(cfg)`` as JSON reads it back (tuples as lists, other objects as their ``str``):
  what a run's ``config.json`` and its checkpoints' ``meta`` record."""
  return json.loads(json.dumps(to_dict(cfg), default=str))

"""Optimiser: AdamW with linear warm-up + cosine decay and global-norm clipping, with
per-parameter learning-rate multipliers chosen by path regex.

Parameter paths are the ``/``-joined keys of ``nnx.to_pure_dict(params)``, e.g.
``decoder/layers/3/attn/q_proj/kernel``, ``projector/linear_1/bias``, ``vision/blocks/0/fc1/
kernel``, ``ctx_embed``. ``optim.param_groups`` is a list of ``(regex, multiplier)`` or
``(regex, multiplier, start_step)``; the first regex that ``re.fullmatch``-es a path wins and
unmatched parameters get multiplier 1:

* multiplier 0: frozen (no optimizer state, gradients dropped);
* ``start_step`` > 0: frozen until that step, then trained with the multiplier (e.g. LLaVA's
  "projector only, then everything" in one run: ``(("projector/.*", 1.0),
  (".*", 1.0, 1000))``).

Weight decay is decoupled (AdamW) and applies to parameters with ``ndim >= 2`` unless
``optim.decay_all``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def parse_groups(groups: Sequence) -> list[tuple[re.Pattern, float, int]]:
  out = []
  for g in groups or ():
    g = tuple(g)
    if len(g) not in (2, 3):
      raise ValueError(f"optim.param_groups entries are (regex, multiplier[, start_step]), "
                       f"got {g!r}")
    try:
      rx = re.compile(g[0])
    except re.error as e:
      raise ValueError(f"optim.param_groups: bad regex {g[0]!r}: {e}") from None
    mult, start = float(g[1]), int(g[2]) if len(g) == 3 else 0
    if mult < 0 or start < 0:
      raise ValueError(f"optim.param_groups {g!r}: multiplier and start_step must be >= 0")
    out.append((rx, mult, start))
  return out


def group_of(path: str, groups) -> tuple[int, float, int]:
  """(group index or -1, multiplier, start_step) of a parameter path."""
  for i, (rx, mult, start) in enumerate(groups):
    if rx.fullmatch(path):
      return i, mult, start
  return -1, 1.0, 0


def param_labels(params: Any, groups: Sequence) -> Any:
  """Tree of labels ("frozen", "default" or "group<i>") shaped like ``params``."""
  groups = parse_groups(groups)

  def label(path, _):
    i, mult, start = group_of(path_str(path), groups)
    if mult == 0.0:
      return "frozen"
    return "default" if i < 0 else f"group{i}"
  return jax.tree_util.tree_map_with_path(label, params)


def trainable_mask(params: Any, groups: Sequence) -> Any:
  """Bool tree: False for parameters frozen for the whole run (multiplier 0)."""
  return jax.tree.map(lambda lab: lab != "frozen", param_labels(params, groups))


def learning_rate_schedule(optim_cfg: Any, num_steps: int) -> Callable:
  """Linear warm-up from 0 to ``learning_rate`` over ``warmup_steps``, then cosine decay to
  ``learning_rate * end_lr_ratio`` at ``num_steps``."""
  lr = float(optim_cfg.learning_rate)
  warm = int(optim_cfg.warmup_steps)
  end = lr * float(optim_cfg.end_lr_ratio)
  if warm >= num_steps:
    return optax.linear_schedule(0.0, lr, max(warm, 1))
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=warm, decay_steps=num_steps,
                                            end_value=end)


def make_optimizer(optim_cfg: Any, params: Any, num_steps: int
                   ) -> tuple[optax.GradientTransformation, Callable]:
  """The optax transformation for ``params`` (a pure dict or its abstract shapes) and the base
  learning-rate schedule (for logging). ``optim_cfg``: ``config.optim``, checked
  (``sections.OptimSection``)."""
  base = learning_rate_schedule(optim_cfg, num_steps)
  groups = parse_groups(optim_cfg.param_groups)
  labels = param_labels(params, optim_cfg.param_groups)
  wd = float(optim_cfg.weight_decay)
  decay_all = bool(optim_cfg.decay_all)
  b1, b2 = float(optim_cfg.b1), float(optim_cfg.b2)
  eps = float(optim_cfg.eps)

  def adamw(mult: float, start: int):
    def lr(step):
      on = jnp.asarray(step >= start, jnp.float32) if start else 1.0
      return base(step) * mult * on
    mask = None if decay_all else (lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
    return optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=mask)

  transforms = {"frozen": optax.set_to_zero(), "default": adamw(1.0, 0)}
  for i, (_, mult, start) in enumerate(groups):
    if mult > 0:
      transforms[f"group{i}"] = adamw(mult, start)
  used = set(jax.tree.leaves(labels))
  transforms = {k: v for k, v in transforms.items() if k in used}
  tx = optax.multi_transform(transforms, labels)
  clip = float(optim_cfg.clip_norm)
  if clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx, base

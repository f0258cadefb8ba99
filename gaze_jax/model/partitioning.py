"""Logical axis names -> mesh axes: one resolution for the parameters (``train.sharding``) and
the activations (``constrain``), as MaxText constrains both by the same rules.

``constrain(x, names)`` applies ``with_sharding_constraint`` when a mesh of several devices is
set (``jax.set_mesh``) and rules are active (``activation_rules``); otherwise it returns x, so
the model runs unchanged on one device.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import Optional, Sequence, Union

import jax
from jax.sharding import PartitionSpec as P

Rules = Sequence[tuple[str, Union[None, str, Sequence[str]]]]
_warned: set = set()
_active: contextvars.ContextVar = contextvars.ContextVar("gaze_activation_rules", default=None)

# Logical names of activation dimensions (parameters use the same names for their dims).
BATCH = "batch"
ACTIVATIONS = {
    "hidden": (BATCH, None, "embed"),            # [B, T, E] residual stream
    "q": (BATCH, None, "heads", "head_dim"),     # [B, T, Hq, D] queries, attention output
    "kv": (BATCH, None, "kv_heads", "head_dim"),  # [B, S, Hkv, D]
    "mlp": (BATCH, None, "mlp"),                 # [B, T, F] SwiGLU hidden layer
}


@contextlib.contextmanager
def activation_rules(rules: Optional[Rules]):
  """Activates ``rules`` for ``constrain`` while a step traces."""
  token = _active.set(None if rules is None else tuple(rules))
  try:
    yield
  finally:
    _active.reset(token)


def constrain(x: jax.Array, kind: str) -> jax.Array:
  """``x`` constrained to the sharding of activation ``kind`` (``ACTIVATIONS``) under the
  active rules and the context mesh; x itself without both."""
  rules = _active.get()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh.empty or mesh.size == 1:
    return x
  spec = logical_to_spec(ACTIVATIONS[kind], x.shape, rules, mesh, where=f"activation {kind}")
  return jax.lax.with_sharding_constraint(x, spec)


def rule_axes(name: Optional[str], rules: Rules) -> tuple[str, ...]:
  if name is None:
    return ()
  for logical, axes in rules:
    if logical == name:
      if axes is None:
        return ()
      return (axes,) if isinstance(axes, str) else tuple(axes)
  return ()


def logical_to_spec(names: Sequence[Optional[str]], shape: Sequence[int], rules: Rules,
                    mesh, where: str = "") -> P:
  """PartitionSpec of an array with logical axis ``names`` and ``shape`` under ``rules``.

  Mesh axes of size 1 are dropped; an axis already used by an earlier dimension is skipped; a
  dimension the axes do not divide keeps only the leading axes that do (logged).
  """
  if len(names) != len(shape):
    raise ValueError(f"{where}: {len(names)} logical axis names {tuple(names)} for shape "
                     f"{tuple(shape)}")
  used: set = set()
  out = []
  for name, dim in zip(names, shape):
    axes = [a for a in rule_axes(name, rules) if a not in used and mesh.shape.get(a, 1) > 1]
    for a in axes:
      if a not in mesh.shape:
        raise ValueError(f"logical_axis_rules map {name!r} to {a!r}, not a mesh axis "
                         f"{tuple(mesh.shape)}")
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      dropped = axes.pop()
      key = (where, name, dropped)
      if key not in _warned:
        _warned.add(key)
        logging.info("sharding: %s dim %s=%d is not divisible by mesh axes; %r left out",
                     where, name, dim, dropped)
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return P(*out)

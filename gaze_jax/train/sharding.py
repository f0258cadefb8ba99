"""Device mesh and logical-axis sharding for training.

The mesh has three axes (maxtext / big_vision style):

* ``data``: pure data parallelism (parameters replicated);
* ``fsdp``: data parallelism with parameters and optimizer state sharded (ZeRO-3 style: XLA
  all-gathers a weight where it is used);
* ``tensor``: tensor (model) parallelism over heads, MLP width and vocabulary.

Every parameter carries logical axis names (``gaze_jax.model.layers``); ``logical_axis_rules``
(in the config) map each name to mesh axes, e.g. ``("embed", "fsdp")``, ``("mlp", "tensor")``.
A dimension that the mapped axes do not divide evenly stays replicated (logged once), so one
rule set serves every model size. Batches are sharded over ``("data", "fsdp")`` on their
leading axis.

The names are read from the parameters' metadata by ``nnx.get_partition_spec`` and resolved
by ``gaze_jax.model.partitioning.logical_to_spec``, the resolution the model constrains its
activations by; flax's own (``nn.logical_to_mesh_axes``, ``nnx.logical_axis_rules``) does not
see dimension sizes, so it cannot leave an indivisible dimension replicated. The optimizer
state's shardings follow the parameters' through ``optax.tree_utils.tree_map_params``.

The mesh uses ``AxisType.Auto`` axes: shardings are given to ``jax.jit`` (``in_shardings`` /
``out_shardings``) and XLA's partitioner inserts the collectives.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

# One logical -> mesh resolution, shared with the model (it constrains activations by it).
from gaze_jax.model.partitioning import BATCH, Rules, logical_to_spec, rule_axes

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes, or None = replicated). First match wins.
DEFAULT_RULES = (
    (BATCH, ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("pos", None),
    ("norm", None),
)



def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves ``{"data": -1, "fsdp": 2, "tensor": 1}`` (-1 = the rest, at most one) into sizes
  for ``MESH_AXES`` whose product is ``num_devices``."""
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh: unknown axes {unknown}; the mesh axes are {MESH_AXES}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  free = [i for i, s in enumerate(shape) if s == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"config.mesh: sizes must be positive or -1, got "
                     f"{dict(zip(MESH_AXES, shape))}")
  fixed = math.prod(s for s in shape if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"config.mesh: {num_devices} devices are not divisible by the fixed axes "
                       f"{dict(zip(MESH_AXES, shape))} (product {fixed})")
    shape[free[0]] = num_devices // fixed
  if math.prod(shape) != num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, shape))} has {math.prod(shape)} devices, "
                     f"but {num_devices} are available")
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int],
              devices: Optional[Sequence[Any]] = None) -> jax.sharding.Mesh:
  """A ``data x fsdp x tensor`` mesh (Auto axes) over ``devices`` (default: all devices)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(dict(sizes), len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def param_specs(abstract_params: nnx.State, rules: Rules, mesh: jax.sharding.Mesh) -> dict:
  """PartitionSpecs (a pure dict shaped like ``nnx.to_pure_dict(params)``) from the parameters'
  ``out_sharding`` logical names (``nnx.get_partition_spec``; P() for a parameter without
  names), resolved for their shapes by ``logical_to_spec``."""
  logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
  shapes = nnx.to_pure_dict(abstract_params)

  def resolve(path, names, x):
    names = tuple(names) or (None,) * len(x.shape)
    where = jax.tree_util.keystr(path, simple=True, separator=".")
    return logical_to_spec(names, x.shape, rules, mesh, where)
  return jax.tree_util.tree_map_with_path(resolve, logical, shapes,
                                          is_leaf=lambda x: isinstance(x, P))


def named(mesh: jax.sharding.Mesh, specs: Any) -> Any:
  """A tree of PartitionSpecs -> NamedShardings on ``mesh``."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any,
                        param_shardings: Any, default: Any) -> Any:
  """Shardings of ``tx``'s state: every copy of the parameters in it (Adam's ``mu``, ``nu``)
  takes the parameters' shardings, found by ``optax.tree_utils.tree_map_params``; the other
  leaves (step counts) get ``default``. Masked-out entries (``optax.MaskedNode``: parameters
  of another group, frozen ones) stay as they are."""
  def masked(x):
    return isinstance(x, optax.MaskedNode)
  return optax.tree_utils.tree_map_params(
      tx, lambda p, s: p if masked(p) else s, abstract_opt_state, param_shardings,
      transform_non_params=lambda _: default, is_leaf=masked)


def batch_spec(rules: Rules, mesh: jax.sharding.Mesh) -> P:
  """Spec of a batch-leading array: ``P(batch_axes)`` (trailing dims replicated)."""
  axes = [a for a in rule_axes(BATCH, rules) if mesh.shape.get(a, 1) > 1]
  return P(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))


def batch_shards(rules: Rules, mesh: jax.sharding.Mesh) -> int:
  """Number of ways the batch is split (its global size must be a multiple of this)."""
  return math.prod(mesh.shape[a] for a in rule_axes(BATCH, rules) if a in mesh.shape)


def shard_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
  """This host's part of a batch (numpy, leading axis = local examples) -> global jax Arrays.

  Each host passes its own rows; ``jax.make_array_from_process_local_data`` assembles the
  global batch (process p's rows become global rows ``p * local : (p + 1) * local``).
  """
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def rules_from_config(rules: Optional[Sequence]) -> Rules:
  """``config.logical_axis_rules`` (a list of ``(name, axes)`` pairs) as a tuple of tuples;
  None gives ``DEFAULT_RULES``."""
  if rules is None:
    return DEFAULT_RULES
  out = []
  for item in rules:
    if len(item) != 2:
      raise ValueError(f"config.logical_axis_rules entries are (name, axes) pairs, got {item!r}")
    name, axes = item
    if isinstance(axes, list):
      axes = tuple(axes)
    for a in (axes,) if isinstance(axes, str) else (axes or ()):
      if a not in MESH_AXES:
        raise ValueError(f"config.logical_axis_rules: {name!r} -> {a!r} is not a mesh axis "
                         f"{MESH_AXES}")
    out.append((name, axes))
  return tuple(out)

"""Declarative weight maps: ``{our parameter path: (source key, hook)}`` applied to an NNX model.

A converter is a list of ``Rule``s. ``{i}`` in a rule stands for a layer index and is expanded
over ``range(n)`` for the layer counts given. Hooks turn a source tensor into our layout
(``linear``: ``[out, in] -> [in, out]``; ``conv``: ``[out, in, kh, kw] -> [kh, kw, in, out]``).
Every model parameter must be covered and every shape must match, or ``load_weights`` raises a
ValueError that names the parameter and the source key.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

Hook = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
  return x


def linear(x: np.ndarray) -> np.ndarray:
  """PyTorch ``nn.Linear`` weight ``[out, in]`` -> our kernel ``[in, out]``."""
  return x.T


def conv(x: np.ndarray) -> np.ndarray:
  """PyTorch ``nn.Conv2d`` weight ``[out, in, kh, kw]`` -> our kernel ``[kh, kw, in, out]``."""
  return x.transpose(2, 3, 1, 0)


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: str                  # e.g. "decoder.layers.{i}.attn.q_proj.kernel"
  source: str                # e.g. "model.layers.{i}.self_attn.q_proj.weight"
  hook: Hook = identity
  layers: Optional[str] = None   # which layer count expands "{i}" (key of ``counts``)


def expand(rules: Sequence[Rule], counts: Mapping[str, int]) -> list[tuple[str, str, Hook]]:
  """Rules with ``{i}`` expanded: ``[(our_path, source_key, hook)]``."""
  out = []
  for r in rules:
    if "{i}" in r.ours:
      if r.layers is None or r.layers not in counts:
        raise ValueError(f"rule {r.ours!r} has {{i}} but no layer count {r.layers!r}")
      out += [(r.ours.format(i=i), r.source.format(i=i), r.hook) for i in range(counts[r.layers])]
    else:
      out.append((r.ours, r.source, r.hook))
  return out


def param_paths(model: nnx.Module) -> dict[str, nnx.Variable]:
  """Our parameters by dotted path (``decoder.layers.0.attn.q_proj.kernel``)."""
  return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_weights(model: nnx.Module, tensors: Mapping[str, np.ndarray], rules: Sequence[Rule],
                 counts: Mapping[str, int], *, allow_unused: Sequence[str] = ()) -> list[str]:
  """Copies ``tensors`` into ``model`` in place, following ``rules``.

  Args:
    tensors: source key -> array (anything ``np.asarray`` takes).
    allow_unused: source key prefixes that may stay unused (e.g. a vision head we don't build).
  Returns:
    the source keys left unused (all matching ``allow_unused``).
  Raises:
    ValueError: a missing source key, a shape mismatch, a parameter no rule covers, or an
      unused source key outside ``allow_unused``.
  """
  params = param_paths(model)
  used = set()
  covered = set()
  for ours, src, hook in expand(rules, counts):
    if ours not in params:
      raise ValueError(f"rule target {ours!r} is not a parameter of the model")
    if src not in tensors:
      raise ValueError(f"checkpoint has no tensor {src!r} (needed for {ours})")
    var = params[ours]
    value = np.asarray(hook(np.asarray(tensors[src], np.float32)))
    want = tuple(var.get_value().shape)
    if value.shape != want:
      raise ValueError(f"{src} has shape {value.shape} after conversion, but {ours} is {want}")
    var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))
    used.add(src)
    covered.add(ours)
  missing = sorted(set(params) - covered)
  if missing:
    raise ValueError(f"no weights for {len(missing)} parameters, e.g. {missing[:5]}")
  unused = sorted(set(tensors) - used)
  bad = [k for k in unused if not any(k.startswith(p) for p in allow_unused)]
  if bad:
    raise ValueError(f"{len(bad)} checkpoint tensors were not used, e.g. {bad[:5]}")
  return unused

"""Declarative weight maps: ``{our parameter path: (source key, hook)}`` applied to an NNX model.

A converter is a list of ``Rule``s. ``{i}`` in a rule stands for a layer index and is expanded
over ``range(n)`` for the layer counts given. Hooks turn a source tensor into our layout
(``linear``: ``[out, in] -> [in, out]``; ``conv``: ``[out, in, kh, kw] -> [kh, kw, in, out]``);
these are ``Layout`` hooks, which only reorder axes, so a piece of a parameter is read from a
piece of the file (``gaze_jax.convert.sharded``) and the map inverts for export.
Every model parameter must be covered, every shape must match and every value must be finite
(no NaN or Inf, unless ``allow_nonfinite``), or ``load_weights`` raises a ValueError that names
the parameter and the source key.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Layout:
  """A hook that only reorders the axes of a tensor (so that a piece of our parameter comes
  from a piece of the source, and the map can be inverted for export): our tensor is
  ``source.transpose(axes)``. Called on a source tensor it gives ours."""
  name: str
  axes: Optional[tuple[int, ...]] = None     # None: the identity

  def __call__(self, x: np.ndarray) -> np.ndarray:
    return x if self.axes is None else np.transpose(x, self.axes)

  def source_index(self, index: tuple) -> tuple:
    """The source slice that holds our slice ``index`` (a tuple of slices, one per axis)."""
    if self.axes is None:
      return tuple(index)
    out = [None] * len(self.axes)
    for ours, src in enumerate(self.axes):
      out[src] = index[ours]
    return tuple(out)

  def source_shape(self, shape: tuple) -> tuple:
    return tuple(int(n) for n in self.source_index(tuple(shape)))

  def inverse(self, x: np.ndarray) -> np.ndarray:
    """Our tensor -> the source layout (for export)."""
    return x if self.axes is None else np.transpose(x, np.argsort(self.axes))


identity = Layout("identity")
# PyTorch ``nn.Linear`` weight ``[out, in]`` -> our kernel ``[in, out]``.
linear = Layout("linear", (1, 0))
# PyTorch ``nn.Conv2d`` weight ``[out, in, kh, kw]`` -> our kernel ``[kh, kw, in, out]``.
conv = Layout("conv", (2, 3, 1, 0))

# Any callable source -> ours; only ``Layout`` hooks can be read piecewise and exported.
Hook = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: str                  # e.g. "decoder.layers.{i}.attn.q_proj.kernel"
  source: str                # e.g. "model.layers.{i}.self_attn.q_proj.weight"
  hook: Hook = identity
  layers: Optional[str] = None   # which layer count expands "{i}" (key of ``counts``)


@dataclasses.dataclass(frozen=True)
class WeightMap:
  """How a checkpoint fills a model: the rules, the layer counts their ``{i}`` expands over,
  the source key prefixes that may stay unused (a vision head we do not build), and our
  parameters that no checkpoint has (``fresh``: they keep their initial value, e.g. the
  context tokens ``ctx_embed``)."""
  rules: tuple[Rule, ...]
  counts: Mapping[str, int]
  allow_unused: tuple[str, ...] = ()
  fresh: tuple[str, ...] = ()

  def expanded(self) -> list[tuple[str, str, Hook]]:
    """``[(our_path, source_key, hook)]`` with layer indices expanded."""
    return expand(self.rules, self.counts)


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


def check_finite(value: np.ndarray, src: str, ours: str, where: str, allow: bool) -> None:
  """Raises ValueError naming the tensor and its file when ``value`` holds NaN or Inf (a corrupt
  or diverged checkpoint would otherwise load silently and give NaN logits); with ``allow``
  only logs a warning."""
  bad = ~np.isfinite(value)
  if not bad.any():
    return
  nan = int(np.isnan(value).sum())
  msg = (f"tensor {src!r} in {where} holds {nan} NaN and {int(bad.sum()) - nan} Inf values "
         f"(of {value.size}; it loads into {ours})")
  if not allow:
    raise ValueError(f"{msg}: a corrupt or diverged checkpoint? Pass allow_nonfinite=True to "
                     "load it anyway")
  log.warning("%s; loading it anyway (allow_nonfinite=True)", msg)


def load_weights(model: nnx.Module, tensors: Mapping[str, np.ndarray], rules: Sequence[Rule],
                 counts: Mapping[str, int], *, allow_unused: Sequence[str] = (),
                 allow_nonfinite: bool = False) -> list[str]:
  """Copies ``tensors`` into ``model`` in place, following ``rules``.

  Args:
    tensors: source key -> array (anything ``np.asarray`` takes); a lazy ``Checkpoint`` also
      says which file holds each tensor (``file_of``), for the error messages.
    allow_unused: source key prefixes that may stay unused (e.g. a vision head we don't build).
    allow_nonfinite: load tensors holding NaN or Inf (with a warning) instead of raising.
  Returns:
    the source keys left unused (all matching ``allow_unused``).
  Raises:
    ValueError: a missing source key, a shape mismatch, a NaN or Inf value (unless
      ``allow_nonfinite``), a parameter no rule covers, or an unused source key outside
      ``allow_unused``.
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
    where = tensors.file_of(src) if hasattr(tensors, "file_of") else "the checkpoint"
    check_finite(value, src, ours, where, allow_nonfinite)
    var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))
    used.add(src)
    covered.add(ours)
  return check_coverage(params, covered, tensors, used, allow_unused)


def check_coverage(params, covered, tensors, used, allow_unused: Sequence[str]) -> list[str]:
  """Raises ValueError when a parameter of ``params`` is not ``covered`` by a rule, or a
  checkpoint key of ``tensors`` is neither ``used`` nor under a prefix of ``allow_unused``.
  Returns the unused keys (all allowed)."""
  missing = sorted(set(params) - set(covered))
  if missing:
    raise ValueError(f"no weights for {len(missing)} parameters, e.g. {missing[:5]}")
  unused = sorted(set(tensors) - set(used))
  bad = [k for k in unused if not any(k.startswith(p) for p in allow_unused)]
  if bad:
    raise ValueError(f"{len(bad)} checkpoint tensors were not used, e.g. {bad[:5]}")
  return unused

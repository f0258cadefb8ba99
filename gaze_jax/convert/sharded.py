"""A Hugging Face folder straight into sharded parameters on a mesh.

``load_sharded(plan, abstract_params)`` fills the parameters of ``plan.model`` (a
``hf.LoadPlan``) one device's piece at a time: the piece is read from the matching piece of
the safetensors file (``Checkpoint.read_slice``; the rules' ``Layout`` hooks say which piece)
and put on its device before the next is read (``jax.make_array_from_single_device_arrays``),
so

* no process holds more than one piece of one tensor of the model on the host at a time (kept
  while the other devices that hold the same piece take it);
* a multi-host run reads only what its own devices hold (the callback runs for addressable
  devices only).

Everything is checked from the file headers before any weight is read: every parameter is
covered by a rule (or is fresh: the context tokens start from their initialiser), every source
tensor exists with the right shape, and no checkpoint tensor is left over unless allowed. A
piece holding NaN or Inf is an error naming the tensor and its file (``allow_nonfinite`` loads
it with a warning). Progress (tensors, bytes, seconds) is logged while it reads.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from gaze_jax.convert.hf import LoadPlan
from gaze_jax.convert.mapping import Layout, check_coverage, check_finite
from gaze_jax.model.mllm import MLLM

log = logging.getLogger(__name__)


def flat_paths(tree: Any) -> tuple[dict[str, Any], Any]:
  """``({dotted path: leaf}, treedef)`` of a pure-dict parameter tree (``nnx.to_pure_dict``):
  paths as the rules name them, ``decoder.layers.0.attn.q_proj.kernel``."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return {".".join(str(k.key) for k in path): leaf for path, leaf in leaves}, treedef


def check_plan(plan: LoadPlan, abstract: dict[str, Any]) -> list[str]:
  """Checks ``plan`` against our parameters ``abstract`` (``{path: ShapeDtypeStruct}``) from
  the file headers only. Returns the checkpoint keys left unused (all allowed).

  Raises ValueError naming the folder, the parameter and the checkpoint key: a rule whose
  target is not a parameter or whose hook cannot be read in pieces, a missing source tensor,
  a shape that does not match, a parameter no rule covers, an unexpected tensor.
  """
  tensors, where = plan.tensors, plan.where
  covered, used = set(plan.weights.fresh), set()
  try:
    for ours, src, hook in plan.weights.expanded():
      if ours not in abstract:
        raise ValueError(f"rule target {ours!r} is not a parameter of the model")
      if not isinstance(hook, Layout):
        raise ValueError(f"rule {ours!r} <- {src!r}: its hook cannot be read in pieces")
      if src not in tensors:
        raise ValueError(f"checkpoint has no tensor {src!r} (needed for {ours})")
      want = hook.source_shape(tuple(abstract[ours].shape))
      have = tensors.shape(src)
      if have != want:
        raise ValueError(f"tensor {src!r} in {tensors.file_of(src)} has shape {have}, but {ours} "
                         f"{tuple(abstract[ours].shape)} needs {want}")
      covered.add(ours)
      used.add(src)
    return check_coverage(abstract, covered, tensors, used, plan.weights.allow_unused)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def fresh_params(plan: LoadPlan, abstract: dict[str, Any], seed: int) -> dict[str, jax.Array]:
  """The parameters no checkpoint has (``plan.weights.fresh``) from their initialisers, made
  directly with their shardings: the whole model is initialised inside ``jit`` and only these
  are returned, so XLA computes nothing else."""
  names = plan.weights.fresh
  if not names:
    return {}

  def init():
    params, _ = flat_paths(nnx.to_pure_dict(nnx.state(MLLM(plan.model, rngs=nnx.Rngs(seed)),
                                                      nnx.Param)))
    return {n: params[n] for n in names}

  return jax.jit(init, out_shardings={n: abstract[n].sharding for n in names})()


class _Reader:
  """Reads the pieces of one source tensor, keeping the last piece for the other devices that
  hold the same one (replicated or partly replicated parameters)."""

  def __init__(self, plan: LoadPlan, src: str, ours: str, hook: Layout, dtype,
               allow_nonfinite: bool):
    self.plan, self.src, self.ours, self.hook = plan, src, ours, hook
    self.dtype, self.allow = dtype, allow_nonfinite
    self._key, self._value = None, None
    self.bytes_read = 0

  def __call__(self, index: tuple) -> np.ndarray:
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key != self._key:
      tensors = self.plan.tensors
      self._key = self._value = None        # the previous piece goes before the next is read
      piece = tensors.read_slice(self.src, self.hook.source_index(index))
      self.bytes_read += piece.nbytes
      check_finite(piece, self.src, self.ours, tensors.file_of(self.src), self.allow)
      self._key = key
      self._value = np.asarray(self.hook(piece), self.dtype, order="C")
    return self._value


def _place(shape: tuple, sharding, reader: _Reader) -> jax.Array:
  """``jax.make_array_from_callback`` one device at a time: each piece goes to its device
  before the next is read, so the host holds one piece, not all of this host's pieces."""
  indices = sharding.addressable_devices_indices_map(shape)
  arrays = [jax.device_put(reader(indices[d]), d) for d in indices]
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def load_sharded(plan: LoadPlan, abstract_params: Any, *, seed: int = 0,
                 allow_nonfinite: bool = False, log_every_s: float = 10.0) -> Any:
  """The parameters of ``plan.model`` read from ``plan.tensors`` into the shardings of
  ``abstract_params``.

  Args:
    plan: a ``LoadPlan`` (``gaze_jax.convert.families.plan_hf``).
    abstract_params: the pure-dict tree of ``jax.ShapeDtypeStruct`` (shape, dtype, sharding)
      of the model's parameters, e.g. the trainer's abstract parameters with their shardings.
    seed: the initialisation of the fresh parameters (context tokens).
    allow_nonfinite: load pieces holding NaN or Inf with a warning instead of raising.
    log_every_s: seconds between progress lines.
  Returns:
    the same tree of ``jax.Array``, each with its sharding.
  Raises:
    ValueError: from ``check_plan`` before anything is read; a piece holding NaN or Inf.
  """
  abstract, treedef = flat_paths(abstract_params)
  unused = check_plan(plan, abstract)
  if unused:
    log.info("%s: %d checkpoint tensors left unused: %s", plan.where, len(unused),
             list(plan.set_aside) + unused)
  out = dict(fresh_params(plan, abstract, seed))
  rules = plan.weights.expanded()
  total = sum(int(np.prod(abstract[o].shape)) * np.dtype(abstract[o].dtype).itemsize
              for o, _, _ in rules)
  t0 = last = time.time()
  done = read = 0
  for n, (ours, src, hook) in enumerate(rules):
    a = abstract[ours]
    reader = _Reader(plan, src, ours, hook, np.dtype(a.dtype), allow_nonfinite)
    out[ours] = _place(tuple(a.shape), a.sharding, reader)
    done += int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
    read += reader.bytes_read
    if time.time() - last >= log_every_s or n == len(rules) - 1:
      last = time.time()
      log.info("%s: %d/%d tensors, %.1f/%.1f MB placed (%.1f MB read on this host), %.0f s",
               plan.where, n + 1, len(rules), done / 1e6, total / 1e6, read / 1e6, last - t0)
  return jax.tree_util.tree_unflatten(treedef, [out[p] for p in abstract])

"""Our parameters back to a Hugging Face folder: ``export_hf(params, plan, out, gaze=...)``.

The folder is the one the model started from (``model.init=hf:<folder>``), with our weights:
the plan's weight map is inverted (each ``Layout`` hook transposes back), tensors keep the
dtype the source stored them in (or ``dtype``), and the checkpoint tensors our model does not
build (a vision head, the blocks past the feature layer) are copied from the source unchanged,
so transformers finds every key it expects. Every other file of the source folder (config,
tokenizer, chat template, image / video processor) is copied as it is. The gaze parts go into
tensors of their own (``gaze.ctx_embed``, the context tokens) and ``gaze_config.json`` (the
gaze settings): transformers reports them as unused keys, and ``model.init=hf:`` of the
exported folder restores them (``families.plan_hf``). Shards are at most ``max_shard_bytes``
(with ``model.safetensors.index.json`` when there are several). Any ``etils.epath`` path works
for ``out`` (local or ``gs://``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Mapping, Optional

import numpy as np
from etils import epath

from gaze_jax.convert.hf import LoadPlan
from gaze_jax.convert.hf_io import INDEX_NAME, SINGLE_NAME, safetensors_bytes
from gaze_jax.convert.mapping import Layout
from gaze_jax.model.config import GazeConfig

log = logging.getLogger(__name__)

GAZE_PREFIX = "gaze."          # our parameters that transformers' model does not have
GAZE_CONFIG = "gaze_config.json"
# Weight files of a source folder, replaced by ours (every other file is copied).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5",
                    ".gguf")
_WEIGHT_NAMES = (INDEX_NAME, "pytorch_model.bin.index.json")


def is_weight_file(name: str) -> bool:
  return name.endswith(_WEIGHT_SUFFIXES) or name in _WEIGHT_NAMES


def gaze_config_dict(gaze: GazeConfig) -> dict:
  """The gaze settings as ``gaze_config.json`` holds them (the kernel options stay out: they
  belong to the machine that runs the model)."""
  d = dataclasses.asdict(gaze)
  d.pop("kernel", None)
  d["region_shape"] = list(d["region_shape"])
  return d


def _export_tensors(params: Mapping[str, Any], plan: LoadPlan, dtype: Optional[str]):
  """``[(key, array)]`` in the source layout: our parameters through the inverted map, the
  fresh ones under ``GAZE_PREFIX``, and the source tensors our model does not build."""
  out = []
  for ours, src, hook in plan.weights.expanded():
    if not isinstance(hook, Layout):
      raise ValueError(f"{plan.where}: rule {ours!r} <- {src!r} cannot be inverted for export")
    want = np.dtype(dtype) if dtype else plan.tensors.dtype(src)
    out.append((src, lambda o=ours, h=hook, w=want: np.asarray(h.inverse(np.asarray(params[o])),
                                                                 w)))
  for ours in plan.weights.fresh:
    out.append((GAZE_PREFIX + ours, lambda o=ours: np.asarray(params[o], np.float32)))
  used = {src for _, src, _ in plan.weights.expanded()}
  for key in plan.tensors:
    if key not in used and any(key.startswith(p) for p in plan.weights.allow_unused):
      out.append((key, lambda k=key: np.asarray(plan.tensors[k], plan.tensors.dtype(k))))
  return out


def export_hf(params: Mapping[str, Any], plan: LoadPlan, out, *, gaze: GazeConfig,
              dtype: Optional[str] = None, max_shard_bytes: int = 2 << 30,
              extra_config: Optional[dict] = None) -> dict:
  """Writes our parameters as a Hugging Face folder at ``out``.

  Args:
    params: ``{dotted path: array}`` of the model (``sharded.flat_paths`` of the pure-dict
      parameters); arrays may be sharded ``jax.Array``s: each is gathered when it is written.
    plan: the ``LoadPlan`` of the folder the model started from (``families.plan_hf``): its
      weight map, its tensors (for the dtypes and the tensors we do not build) and its files.
    out: the folder to write (created; existing files of the same names are replaced).
    gaze: the model's gaze settings, written to ``gaze_config.json``.
    dtype: the dtype of every exported weight (e.g. ``"float32"``); default: each tensor's
      dtype in the source.
    max_shard_bytes: the largest shard file.
    extra_config: more fields for ``gaze_config.json`` (e.g. the run it came from).
  Returns:
    ``{"files": [...], "tensors": n, "bytes": total}``.
  """
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  src = epath.Path(plan.where)
  copied = []
  for f in sorted(src.iterdir()):
    if f.is_file() and not is_weight_file(f.name) and f.name != GAZE_CONFIG:
      (out / f.name).write_bytes(f.read_bytes())
      copied.append(f.name)
  tensors = _export_tensors(params, plan, dtype)
  # Shard assignment from the sizes alone, so that each shard is built and written in turn
  # (one shard in host memory at a time).
  sizes = []
  for key, get in tensors:
    if key.startswith(GAZE_PREFIX):
      sizes.append(int(np.asarray(params[key[len(GAZE_PREFIX):]]).nbytes))
    else:
      sizes.append(int(np.prod(plan.tensors.shape(key))) * (np.dtype(dtype).itemsize if dtype
                                                              else plan.tensors.dtype(key).itemsize))
  groups, size = [[]], 0
  for i, n in enumerate(sizes):
    if groups[-1] and size + n > max_shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append(i)
    size += n
  names = ([SINGLE_NAME] if len(groups) == 1 else
           [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))])
  weight_map = {}
  for name, group in zip(names, groups):
    shard = {tensors[i][0]: tensors[i][1]() for i in group}
    (out / name).write_bytes(safetensors_bytes(shard, {"format": "pt"}))
    weight_map.update((k, name) for k in shard)
    log.info("export: wrote %s (%d tensors, %.1f MB)", out / name, len(shard),
             sum(sizes[i] for i in group) / 1e6)
  if len(names) > 1:
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": sum(sizes)},
                                              "weight_map": weight_map}, indent=2))
  (out / GAZE_CONFIG).write_text(json.dumps({**gaze_config_dict(gaze),
                                             "tensors": sorted(k for k in weight_map
                                                               if k.startswith(GAZE_PREFIX)),
                                             **(extra_config or {})}, indent=2))
  return {"files": names + copied + [GAZE_CONFIG], "tensors": len(weight_map),
          "bytes": sum(sizes)}

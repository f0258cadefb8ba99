"""Reading Hugging Face checkpoints: safetensors files (single or sharded) and ``config.json``.

The safetensors reader is our own (the format is an 8-byte little-endian header length, a JSON
header ``{name: {dtype, shape, data_offsets}}`` and the raw bytes), so neither torch nor the
``safetensors`` package is needed. bfloat16 and float8 go through ``ml_dtypes`` (a jax
dependency). Floating tensors come back as float32 numpy arrays; integer and bool tensors (rare
buffers) keep their dtype.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Union

import ml_dtypes
import numpy as np

PathLike = Union[str, os.PathLike]

# safetensors dtype tag -> numpy dtype (little-endian, as the format stores them).
_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _corrupt(path: PathLike, why: str) -> ValueError:
  return ValueError(f"{path}: not a valid safetensors file ({why})")


def _to_numpy(raw: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """Bytes ``raw`` viewed as ``dtype`` -> float32 for floating types, a copy otherwise."""
  arr = raw.view(dtype)
  if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
    return np.array(arr)
  return arr.astype(np.float32)


def read_safetensors_file(path: PathLike) -> dict[str, np.ndarray]:
  """One ``.safetensors`` file -> ``{name: array}`` (floats as float32).

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the header or the byte ranges are inconsistent (truncated or corrupt file).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"safetensors file not found: {path}")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise _corrupt(path, f"only {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
      raise _corrupt(path, f"header claims {n} bytes but the file has {size - 8} after it")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise _corrupt(path, f"header is not JSON: {e}") from None
  if not isinstance(header, dict):
    raise _corrupt(path, "header is not a JSON object")
  header.pop("__metadata__", None)
  n_data = size - 8 - n
  # Memory-mapped, so a large checkpoint is read tensor by tensor (a plain ndarray view, so
  # that the converted arrays are plain ndarrays too).
  data = (np.asarray(np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(n_data,)))
          if n_data else np.zeros((0,), np.uint8))
  out = {}
  for name, info in header.items():
    try:
      tag, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise _corrupt(path, f"tensor {name!r} has a malformed entry {info!r}") from None
    if tag not in _DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {tag}, which we cannot read "
                       f"(known: {sorted(_DTYPES)})")
    dtype = _DTYPES[tag]
    want = math.prod(shape) * dtype.itemsize
    if not 0 <= begin <= end <= n_data or end - begin != want:
      raise _corrupt(path, f"tensor {name!r} {tag}{list(shape)} needs {want} bytes at "
                     f"[{begin}, {end}) of a {n_data}-byte data section (truncated file?)")
    out[name] = _to_numpy(data[begin:end], dtype).reshape(shape)
  del data
  return out


def load_safetensors(path: PathLike) -> dict[str, np.ndarray]:
  """Loads a checkpoint: a ``.safetensors`` file, or a directory holding ``model.safetensors``
  or a sharded ``model.safetensors.index.json`` (or exactly one other ``*.safetensors``).

  Returns ``{tensor name: numpy array}``; floating tensors (bf16, f16, f32, ...) as float32.
  Raises FileNotFoundError for a missing file or shard, ValueError for a corrupt one or an
  index whose weight map disagrees with its shards.
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    return read_safetensors_file(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at {path} (neither a file nor a directory)")
  index = os.path.join(path, INDEX_NAME)
  if os.path.isfile(index):
    return _load_sharded(path, index)
  single = os.path.join(path, SINGLE_NAME)
  if os.path.isfile(single):
    return read_safetensors_file(single)
  found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if len(found) == 1:
    return read_safetensors_file(os.path.join(path, found[0]))
  if not found:
    raise FileNotFoundError(f"{path} has no {SINGLE_NAME}, no {INDEX_NAME} and no other "
                            "*.safetensors file")
  raise ValueError(f"{path} has several *.safetensors files {found} but no {INDEX_NAME} "
                   "saying how they fit together")


def _load_sharded(root: str, index: str) -> dict[str, np.ndarray]:
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{index}: not a valid shard index (needs a 'weight_map'): {e}") from None
  out: dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    tensors = read_safetensors_file(os.path.join(root, shard))
    dup = sorted(set(tensors) & set(out))
    if dup:
      raise ValueError(f"{index}: tensors {dup[:5]} appear in more than one shard")
    out.update(tensors)
  missing = sorted(k for k in weight_map if k not in out)
  if missing:
    raise ValueError(f"{index} lists {len(missing)} tensors that its shards lack, e.g. "
                     f"{missing[:5]}")
  return out


def read_hf_config(path: PathLike) -> dict[str, Any]:
  """``config.json`` of a model directory (or the file itself) as a dict."""
  path = os.fspath(path)
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise FileNotFoundError(f"no Hugging Face config at {file}")
  try:
    with open(file) as f:
      cfg = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{file} is not valid JSON: {e}") from None
  if not isinstance(cfg, dict):
    raise ValueError(f"{file} must hold a JSON object, got {type(cfg).__name__}")
  return cfg

"""Reading Hugging Face checkpoints: safetensors files (single or sharded) and ``config.json``.

Files are read with the ``safetensors`` library (``safe_open``, numpy framework). A checkpoint
opens lazily: ``load_safetensors`` reads only the headers, and a tensor is read from disk when
it is asked for, so a converter touches each tensor once and never holds the whole checkpoint.
bfloat16 and float8 tensors come through ``ml_dtypes`` (a jax dependency): importing it
registers their numpy dtypes, which safetensors looks up by name. Floating tensors come back as
float32 numpy arrays; integer and bool tensors (rare buffers) keep their dtype.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, MutableMapping
from typing import Any, Union

import ml_dtypes  # noqa: F401  (registers bfloat16 / float8 with numpy for safetensors)
import numpy as np
from safetensors import SafetensorError, safe_open

PathLike = Union[str, os.PathLike]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _tensor_names(path: str) -> list[str]:
  """The tensor names in one file's header (the data is not read).

  Raises FileNotFoundError for a missing file, ValueError naming the file for a corrupt one.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"safetensors file not found: {path}")
  try:
    with safe_open(path, framework="numpy") as f:
      return list(f.keys())
  except SafetensorError as e:
    raise ValueError(f"{path}: not a valid safetensors file, truncated or corrupt ({e})"
                     ) from None


def _read_tensor(path: str, name: str) -> np.ndarray:
  """Tensor ``name`` of file ``path``: float32 for floating dtypes, its own dtype otherwise."""
  try:
    with safe_open(path, framework="numpy") as f:
      arr = f.get_tensor(name)
  except (SafetensorError, TypeError, OSError) as e:
    # TypeError: a dtype numpy does not know (one ml_dtypes lacks too).
    raise ValueError(f"{path}: cannot read tensor {name!r}: {e}") from None
  if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
    return arr
  return arr.astype(np.float32, copy=False)


class Checkpoint(MutableMapping):
  """``{tensor name: numpy array}`` over safetensors files, read from disk on access.

  Setting a name stores that array in memory; deleting one hides the tensor (converters drop
  saved buffers and add initial values this way). Each access reads the tensor again.
  """

  def __init__(self, files: dict[str, str], where: str):
    self._files = dict(files)        # tensor name -> the file that holds it
    self._set: dict[str, np.ndarray] = {}
    self._where = where

  def __getitem__(self, name: str) -> np.ndarray:
    if name in self._set:
      return self._set[name]
    if name not in self._files:
      raise KeyError(f"{self._where} has no tensor {name!r}")
    return _read_tensor(self._files[name], name)

  def __setitem__(self, name: str, value: np.ndarray) -> None:
    self._files.pop(name, None)
    self._set[name] = value

  def __delitem__(self, name: str) -> None:
    if self._set.pop(name, None) is None and self._files.pop(name, None) is None:
      raise KeyError(f"{self._where} has no tensor {name!r}")

  def __iter__(self) -> Iterator[str]:
    yield from self._files
    yield from self._set

  def __len__(self) -> int:
    return len(self._files) + len(self._set)

  def __contains__(self, name: object) -> bool:
    return name in self._set or name in self._files

  def __repr__(self) -> str:
    return f"Checkpoint({self._where!r}, {len(self)} tensors)"

  def shape(self, name: str) -> tuple[int, ...]:
    """The shape of tensor ``name``, from its file's header (no data is read)."""
    if name in self._set:
      return tuple(self._set[name].shape)
    try:
      with safe_open(self.file_of(name), framework="numpy") as f:
        return tuple(f.get_slice(name).get_shape())
    except SafetensorError as e:
      raise ValueError(f"{self.file_of(name)}: cannot read the header of {name!r}: {e}"
                       ) from None

  def read_slice(self, name: str, index: tuple) -> np.ndarray:
    """``self[name][index]`` (a tuple of slices, one per axis), reading only that part of the
    file: a host holds a piece of a tensor, never the whole, when a device holds a piece.
    Floating tensors come back as float32, like ``__getitem__``."""
    if name in self._set:
      return self._set[name][index]
    path = self.file_of(name)
    try:
      with safe_open(path, framework="numpy") as f:
        arr = f.get_slice(name)[tuple(index)] if index else f.get_tensor(name)
    except (SafetensorError, TypeError, OSError) as e:
      raise ValueError(f"{path}: cannot read tensor {name!r}: {e}") from None
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
      return arr
    return arr.astype(np.float32, copy=False)

  def file_of(self, name: str) -> str:
    """The file that holds tensor ``name`` (for messages); "<in memory>" for a set one."""
    if name in self._set:
      return "<in memory>"
    if name not in self._files:
      raise KeyError(f"{self._where} has no tensor {name!r}")
    return self._files[name]


def _one_file(path: str) -> Checkpoint:
  return Checkpoint({name: path for name in _tensor_names(path)}, path)


def load_safetensors(path: PathLike) -> Checkpoint:
  """Opens a checkpoint: a ``.safetensors`` file, or a directory holding ``model.safetensors``
  or a sharded ``model.safetensors.index.json`` (or exactly one other ``*.safetensors``).

  Returns a lazy ``{tensor name: numpy array}`` mapping (``Checkpoint``); floating tensors
  (bf16, f16, f32, ...) come out as float32. Only the headers are read here.
  Raises FileNotFoundError for a missing file or shard, ValueError for a corrupt one or an
  index whose weight map disagrees with its shards.
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    return _one_file(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at {path} (neither a file nor a directory)")
  index = os.path.join(path, INDEX_NAME)
  if os.path.isfile(index):
    return _load_sharded(path, index)
  single = os.path.join(path, SINGLE_NAME)
  if os.path.isfile(single):
    return _one_file(single)
  found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if len(found) == 1:
    return _one_file(os.path.join(path, found[0]))
  if not found:
    raise FileNotFoundError(f"{path} has no {SINGLE_NAME}, no {INDEX_NAME} and no other "
                            "*.safetensors file")
  raise ValueError(f"{path} has several *.safetensors files {found} but no {INDEX_NAME} "
                   "saying how they fit together")


def _load_sharded(root: str, index: str) -> Checkpoint:
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{index}: not a valid shard index (needs a 'weight_map'): {e}") from None
  files: dict[str, str] = {}
  for shard in sorted(set(weight_map.values())):
    file = os.path.join(root, shard)
    names = _tensor_names(file)
    dup = sorted(set(names) & set(files))
    if dup:
      raise ValueError(f"{index}: tensors {dup[:5]} appear in more than one shard")
    files.update((name, file) for name in names)
  missing = sorted(k for k in weight_map if k not in files)
  if missing:
    raise ValueError(f"{index} lists {len(missing)} tensors that its shards lack, e.g. "
                     f"{missing[:5]}")
  return Checkpoint(files, root)


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

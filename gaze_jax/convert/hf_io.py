"""Reading Hugging Face checkpoints: safetensors files (single or sharded) and ``config.json``,
from a local folder or a ``gs://`` prefix (any ``etils.epath`` path).

A safetensors file is an 8-byte little-endian header length, a JSON header (``{name: {"dtype",
"shape", "data_offsets": [begin, end]}}``) and the raw row-major data. ``SafetensorsFile``
reads the header once and then only the byte ranges asked for: a tensor, or the rows of a piece
of it (``read_slice``), so a host reads what its devices hold and never the whole checkpoint,
locally and in a bucket alike. A checkpoint opens lazily: ``load_safetensors`` reads only the
headers. bfloat16 and float8 come through ``ml_dtypes`` (a jax dependency). Floating tensors
come back as float32 numpy arrays; integer and bool tensors (rare buffers) keep their dtype.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, MutableMapping
from typing import Any, Union

import ml_dtypes
import numpy as np
from etils import epath

from gaze_jax.paths import read_json

PathLike = Union[str, os.PathLike]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_}
# The header of a sane file is far below this; a larger length is a corrupt file.
_MAX_HEADER = 100 << 20


class SafetensorsFile:
  """One ``.safetensors`` file: its header, and reads of whole tensors or row ranges.

  Raises FileNotFoundError for a missing file and ValueError naming the file for one that is
  truncated or corrupt (a header that is not JSON, offsets outside the data, a dtype we do not
  know).
  """

  def __init__(self, path: PathLike):
    self.path = epath.Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"safetensors file not found: {self.path}")
    size = self.path.stat().length
    try:
      with self.path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
          raise ValueError("shorter than its header length")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
          raise ValueError(f"header length {n} exceeds the file")
        header = json.loads(f.read(n))
      header.pop("__metadata__", None)
      self._start = 8 + n
      ends = [0]
      for name, t in header.items():
        if t["dtype"] not in DTYPES:
          raise ValueError(f"tensor {name!r} has dtype {t['dtype']!r}, which we do not read")
        begin, end = t["data_offsets"]
        want = int(np.prod(t["shape"], dtype=np.int64)) * np.dtype(DTYPES[t["dtype"]]).itemsize
        if end - begin != want or begin < 0:
          raise ValueError(f"tensor {name!r}: offsets {t['data_offsets']} do not fit its shape")
        ends.append(end)
      if self._start + max(ends) != size:
        raise ValueError(f"its header describes {max(ends)} bytes of data, the file holds "
                         f"{size - self._start}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error) as e:
      raise ValueError(f"{self.path}: not a valid safetensors file, truncated or corrupt ({e})"
                       ) from None
    self.header = header

  def names(self) -> list[str]:
    return list(self.header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in self.header[name]["shape"])

  def read(self, name: str, index: tuple = (), block_bytes: int = 16 << 20) -> np.ndarray:
    """``tensor[index]`` (a tuple of slices, one per axis, or () for all of it) in the file's
    dtype. Only the rows of the first axis that ``index`` selects are read (a row-major
    tensor's rows are contiguous), ``block_bytes`` of them at a time when the other axes are
    sliced too, so that a piece of a wide tensor (a column shard of an embedding) never holds
    the whole tensor on the host."""
    t = self.header[name]
    dtype, shape = np.dtype(DTYPES[t["dtype"]]), self.shape(name)
    begin = self._start + t["data_offsets"][0]
    index = tuple(index)
    if not shape or not index:
      with self.path.open("rb") as f:
        f.seek(begin)
        data = f.read(t["data_offsets"][1] - t["data_offsets"][0])
      arr = np.frombuffer(data, dtype).reshape(shape)
      return arr[index] if index else arr
    rows = range(shape[0])[index[0]]
    rest = (slice(None),) + index[1:]
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    step = max(1, len(rows) if index[1:] == (slice(None),) * len(index[1:])
               else block_bytes // row_bytes)
    pieces = []
    with self.path.open("rb") as f:
      for i in range(0, len(rows), step):
        block = rows[i:i + step]
        first, last = min(block[0], block[-1]), max(block[0], block[-1])
        f.seek(begin + first * row_bytes)
        data = f.read((last - first + 1) * row_bytes)
        arr = np.frombuffer(data, dtype).reshape((last - first + 1,) + shape[1:])
        rows_here = (slice(block[0] - first, block[-1] - first + 1) if block.step == 1
                     else np.asarray(block) - first)
        piece = arr[rows_here][rest]
        # A copy, so that the block read for it is freed before the next one is read.
        pieces.append(piece if step >= len(rows) else np.array(piece))
    if not pieces:
      return np.zeros((0,) + np.zeros(shape[1:], dtype)[index[1:]].shape, dtype)
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _as_float32(arr: np.ndarray) -> np.ndarray:
  """Floating tensors as float32 (no copy when they are float32 already); integer and bool ones
  keep their dtype."""
  if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
    return arr
  return np.asarray(arr, np.float32)


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
  """The bytes of a safetensors file holding ``tensors`` (in order) and ``metadata``: what
  ``SafetensorsFile`` reads back, and what transformers loads (``{"format": "pt"}``)."""
  names = {np.dtype(v): k for k, v in DTYPES.items()}
  header, offset, blobs = {"__metadata__": dict(metadata)}, 0, []
  for name, arr in tensors.items():
    arr = np.require(arr, requirements="C")      # (ascontiguousarray would make a scalar 1-D)
    if arr.dtype not in names:
      raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be written to safetensors")
    header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    blobs.append(arr.tobytes())
    offset += arr.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)          # the data starts 8-byte aligned, as the library's
  return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def _read_tensor(file: SafetensorsFile, name: str, index: tuple = ()) -> np.ndarray:
  """Tensor ``name`` of ``file`` (its piece ``index``): float32 for floating dtypes, its own
  dtype otherwise."""
  try:
    return _as_float32(file.read(name, tuple(index)))
  except OSError as e:
    raise ValueError(f"{file.path}: cannot read tensor {name!r}: {e}") from None


class Checkpoint(MutableMapping):
  """``{tensor name: numpy array}`` over safetensors files, read on access.

  Setting a name stores that array in memory; deleting one hides the tensor (converters drop
  saved buffers and add initial values this way). Each access reads the tensor again.
  """

  def __init__(self, files: dict[str, SafetensorsFile], where: str):
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
    self.file_of(name)
    return self._files[name].shape(name)

  def dtype(self, name: str) -> np.dtype:
    """The dtype tensor ``name`` is stored in (bfloat16, float32, ...)."""
    if name in self._set:
      return self._set[name].dtype
    self.file_of(name)
    return np.dtype(DTYPES[self._files[name].header[name]["dtype"]])

  def read_slice(self, name: str, index: tuple) -> np.ndarray:
    """``self[name][index]`` (a tuple of slices, one per axis), reading only the rows of the
    file that hold it: a host holds a piece of a tensor, not the whole, when a device holds a
    piece. Floating tensors come back as float32, like ``__getitem__``."""
    if name in self._set:
      return self._set[name][tuple(index)]
    self.file_of(name)
    return _read_tensor(self._files[name], name, index)

  def file_of(self, name: str) -> str:
    """The file that holds tensor ``name`` (for messages); "<in memory>" for a set one."""
    if name in self._set:
      return "<in memory>"
    if name not in self._files:
      raise KeyError(f"{self._where} has no tensor {name!r}")
    return str(self._files[name].path)


def _one_file(path: epath.Path) -> Checkpoint:
  file = SafetensorsFile(path)
  return Checkpoint({name: file for name in file.names()}, str(path))


def load_safetensors(path: PathLike) -> Checkpoint:
  """Opens a checkpoint: a ``.safetensors`` file, or a folder (local or ``gs://``) holding
  ``model.safetensors`` or a sharded ``model.safetensors.index.json`` (or exactly one other
  ``*.safetensors``).

  Returns a lazy ``{tensor name: numpy array}`` mapping (``Checkpoint``); floating tensors
  (bf16, f16, f32, ...) come out as float32. Only the headers are read here.
  Raises FileNotFoundError for a missing file or shard, ValueError for a corrupt one or an
  index whose weight map disagrees with its shards.
  """
  path = epath.Path(path)
  if path.is_file():
    return _one_file(path)
  if not path.is_dir():
    raise FileNotFoundError(f"no checkpoint at {path} (neither a file nor a directory)")
  index = path / INDEX_NAME
  if index.is_file():
    return _load_sharded(path, index)
  single = path / SINGLE_NAME
  if single.is_file():
    return _one_file(single)
  found = sorted(p.name for p in path.iterdir() if p.name.endswith(".safetensors"))
  if len(found) == 1:
    return _one_file(path / found[0])
  if not found:
    raise FileNotFoundError(f"{path} has no {SINGLE_NAME}, no {INDEX_NAME} and no other "
                            "*.safetensors file")
  raise ValueError(f"{path} has several *.safetensors files {found} but no {INDEX_NAME} "
                   "saying how they fit together")


def _load_sharded(root: epath.Path, index: epath.Path) -> Checkpoint:
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{index}: not a valid shard index (needs a 'weight_map'): {e}") from None
  files: dict[str, SafetensorsFile] = {}
  for shard in sorted(set(weight_map.values())):
    file = SafetensorsFile(root / shard)
    names = file.names()
    dup = sorted(set(names) & set(files))
    if dup:
      raise ValueError(f"{index}: tensors {dup[:5]} appear in more than one shard")
    files.update((name, file) for name in names)
  missing = sorted(k for k in weight_map if k not in files)
  if missing:
    raise ValueError(f"{index} lists {len(missing)} tensors that its shards lack, e.g. "
                     f"{missing[:5]}")
  return Checkpoint(files, str(root))


def read_hf_config(path: PathLike) -> dict[str, Any]:
  """``config.json`` of a model folder (or the file itself), local or ``gs://``, as a dict."""
  path = epath.Path(path)
  file = path / "config.json" if path.is_dir() else path
  if not file.is_file():
    raise FileNotFoundError(f"no Hugging Face config at {file}")
  return read_json(file)

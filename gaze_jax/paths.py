"""Run paths, local or in Cloud Storage: every run file goes through ``etils.epath.Path``.

``--workdir``, ``config.data.data_dir``, ``--out_dir`` and the like may be local folders or
``gs://bucket/...`` URIs (what orbax and tfds take too). ``pathlib.Path("gs://b/run")`` is the
local folder ``gs:/b/run``, so run files never go through ``pathlib``. On ``gs://`` epath uses
``tf.io.gfile`` when TensorFlow is installed, else fsspec's gcsfs (``EPATH_USE_TF=false``
chooses gcsfs even with TensorFlow); either works on Cloud TPU VMs with their default
credentials.

Rules that differ between the two, each defined once here:

* ``absolute(p)``: a local path made absolute, a URI kept as it is
  (``epath.Path("gs://b/x").absolute()`` is the local ``<cwd>/gs:/b/x``);
* ``write_atomic(p, data)``: a reader sees the old or the new contents, never a part (a local
  file is written beside and renamed over; a Cloud Storage object write is atomic already);
* ``list_files(folder)``: every file below a folder (epath has no recursive glob on URIs).

Cloud Storage objects cannot be appended to or renamed cheaply: a file that grows (``metrics.
jsonl``) is rewritten whole, and a rename copies every object.
"""

from __future__ import annotations

import json
import os
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_local(path: PathLike) -> bool:
  """Whether ``path`` is on a local filesystem (no ``scheme://`` prefix)."""
  return "://" not in os.fspath(path)


def absolute(path: PathLike) -> epath.Path:
  """``path`` as an ``epath.Path``, absolute when local; a ``gs://`` URI as it is."""
  p = epath.Path(path)
  return p.absolute() if is_local(p) else p


def write_atomic(path: PathLike, data: Union[str, bytes]) -> None:
  """Replaces the contents of ``path`` (text or bytes) so that a reader sees the old or the new
  contents, never a part (local: written to ``<name>.tmp`` beside it, then renamed over it)."""
  path = epath.Path(path)
  if not is_local(path):
    target = path                    # one object write: atomic in Cloud Storage
  else:
    target = path.with_name(path.name + ".tmp")
  with target.open("wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)
  if target != path:
    os.replace(target, path)


def list_files(folder: PathLike) -> list[epath.Path]:
  """Every file below ``folder`` (recursively), sorted; empty when it does not exist."""
  folder = epath.Path(folder)
  if not folder.is_dir():
    return []
  out = []
  for p in folder.iterdir():
    if p != folder:                  # a folder's own placeholder object on Cloud Storage
      out.extend(list_files(p) if p.is_dir() else [p])
  return sorted(out)


def read_json(path: PathLike) -> dict:
  """A JSON file holding an object (a config, a processor's settings), local or ``gs://``, as a
  dict; ValueError naming the file when it is not UTF-8 text, not valid JSON (e.g. cut short)
  or not an object."""
  path = epath.Path(path)
  try:
    out = json.loads(path.read_text())
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} is not UTF-8 text: {e}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(out, dict):
    raise ValueError(f"{path} must hold a JSON object, got {type(out).__name__}")
  return out


def append_text(path: PathLike, text: str) -> None:
  """Adds ``text`` at the end of the file ``path`` (created when missing). A local file is
  appended to; a ``gs://`` object, which cannot be, is rewritten whole with the text added."""
  path = epath.Path(path)
  if is_local(path):
    with path.open("a") as f:
      f.write(text)
  else:
    write_atomic(path, (path.read_text() if path.exists() else "") + text)

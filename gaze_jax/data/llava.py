"""LLaVA-format conversation JSON -> examples in the common schema (no tfds here).

Format: a JSON list of records
``{"id": ..., "image": "a.jpg" | ["a.jpg", "b.jpg"] (optional), "conversations": [{"from":
"human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...]}``; image paths are
relative to an image folder. Turns alternate human / gpt, starting with human. The number of
``<image>`` markers must equal the number of images, or be 0 (the images then go before the
first question, LLaVA's convention, which the pipeline applies).

A bad record (missing field, wrong roles, marker count, empty answer, an image that is missing,
unreadable or outside the image folder) raises ``LlavaRecordError`` naming the JSON file, the
record id and the file; with ``skip_bad=True`` it is skipped and listed in the returned
``skipped`` list instead (nothing is dropped silently).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from PIL import ImageOps

IMAGE_MARKER = "<image>"
_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant")


class LlavaRecordError(ValueError):
  """A malformed LLaVA record or a missing / unreadable image."""


@dataclasses.dataclass(frozen=True)
class LlavaRecord:
  id: str
  index: int
  images: tuple[Path, ...]
  turns: tuple[tuple[str, str], ...]


def _fail(json_path, index, rid, msg) -> LlavaRecordError:
  return LlavaRecordError(f"{json_path}: record {rid!r} (index {index}): {msg}")


def _check_utf8(text: str, json_path, index, rid, field: str) -> None:
  """JSON allows escapes of lone UTF-16 surrogates ("\\ud800"); the dataset stores UTF-8 text,
  which cannot hold them."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise _fail(json_path, index, rid, f"{field} holds {text[e.start:e.end]!r} at character "
                f"{e.start}, which is not valid Unicode text (a lone surrogate escape)") from None


def parse_record(rec, index: int, json_path, image_dir) -> LlavaRecord:
  """Validates one record (structure and that its image files exist and open)."""
  rid = rec.get("id", f"<no id, index {index}>") if isinstance(rec, dict) else f"<index {index}>"
  if not isinstance(rec, dict):
    raise _fail(json_path, index, rid, f"expected a JSON object, got {type(rec).__name__}")
  if "id" not in rec:
    raise _fail(json_path, index, rid, "has no 'id'")
  rid = str(rec["id"])
  _check_utf8(rid, json_path, index, rid, "'id'")
  conv = rec.get("conversations")
  if not isinstance(conv, list) or not conv:
    raise _fail(json_path, index, rid, "'conversations' must be a non-empty list")
  if len(conv) % 2:
    raise _fail(json_path, index, rid, f"'conversations' has {len(conv)} messages; expected "
                "human / gpt pairs")
  turns = []
  for k, msg in enumerate(conv):
    want = _HUMAN if k % 2 == 0 else _GPT
    if not isinstance(msg, dict) or not isinstance(msg.get("value"), str):
      raise _fail(json_path, index, rid, f"conversations[{k}] must be an object with a string "
                  "'value'")
    if msg.get("from") not in want:
      raise _fail(json_path, index, rid, f"conversations[{k}] is from {msg.get('from')!r}; "
                  f"expected one of {want}")
    _check_utf8(msg["value"], json_path, index, rid, f"conversations[{k}]")
    if k % 2:
      if IMAGE_MARKER in msg["value"]:
        raise _fail(json_path, index, rid, f"conversations[{k}] (an answer) holds {IMAGE_MARKER}")
      if not msg["value"].strip():      # nothing to learn, and no answer to score
        raise _fail(json_path, index, rid, f"conversations[{k}] (an answer) is empty")
      turns.append((conv[k - 1]["value"], msg["value"]))
  image = rec.get("image", [])
  names = [image] if isinstance(image, str) else image
  if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
    raise _fail(json_path, index, rid, f"'image' must be a file name or a list of them, "
                f"got {image!r}")
  markers = sum(q.count(IMAGE_MARKER) for q, _ in turns)
  if markers and markers != len(names):
    raise _fail(json_path, index, rid, f"has {markers} {IMAGE_MARKER} markers but "
                f"{len(names)} images")
  paths = []
  root = Path(image_dir).resolve()
  for n in names:
    p = Path(image_dir) / n
    # A name may use sub-folders, but must stay inside the image folder (no "../", no
    # absolute path, no link out of it).
    if not p.resolve().is_relative_to(root):
      raise _fail(json_path, index, rid, f"image {n!r} lies outside the image folder {root}")
    if not p.is_file():
      raise _fail(json_path, index, rid, f"image file {p} does not exist")
    try:
      with PILImage.open(p) as im:
        im.verify()
    except Exception as e:    # Pillow raises many types for corrupt files
      raise _fail(json_path, index, rid, f"image file {p} cannot be read: {e}") from e
    paths.append(p)
  return LlavaRecord(rid, index, tuple(paths), tuple(turns))


def parse_json(json_path, image_dir, *, skip_bad: bool = False
               ) -> tuple[list[LlavaRecord], list[dict]]:
  """All records of a LLaVA JSON file.

  Returns ``(records, skipped)``; ``skipped`` lists ``{"id", "index", "reason"}`` of the bad
  records (empty unless ``skip_bad``).
  """
  json_path = Path(json_path)
  try:
    data = json.loads(json_path.read_text())
  except json.JSONDecodeError as e:
    raise LlavaRecordError(f"{json_path}: not valid JSON: {e}") from e
  if not isinstance(data, list):
    raise LlavaRecordError(f"{json_path}: expected a JSON list of records, got "
                           f"{type(data).__name__}")
  records, skipped = [], []
  for i, rec in enumerate(data):
    try:
      records.append(parse_record(rec, i, json_path, image_dir))
    except LlavaRecordError as e:
      if not skip_bad:
        raise
      rid = rec.get("id") if isinstance(rec, dict) else None
      skipped.append({"id": None if rid is None else str(rid), "index": i, "reason": str(e)})
  return records, skipped


def load_image(path) -> np.ndarray:
  """uint8 ``[H, W, 3]`` of an image file (a path or an open binary file), as displayed: an
  EXIF orientation is applied (as transformers' ``load_image`` does; a phone photo is stored
  sideways), grey, palette and RGBA images are converted to RGB."""
  with PILImage.open(path) as im:
    return np.asarray(ImageOps.exif_transpose(im).convert("RGB"), np.uint8)


def record_example(rec: LlavaRecord, json_path=None) -> dict:
  """The record as an example of the common schema (loads its images)."""
  images = []
  for p in rec.images:
    try:
      images.append(load_image(p))
    except Exception as e:
      raise _fail(json_path, rec.index, rec.id, f"image file {p} cannot be decoded: {e}") from e
  return {
      "id": rec.id, "images": images, "is_video": False,
      "turns": [{"question": q, "answer": a} for q, a in rec.turns],
      "boxes": np.zeros((0, 4), np.float32), "box_image": np.zeros((0,), np.int32),
      "object_boxes": np.zeros((0, 4), np.float32),
      "object_box_image": np.zeros((0,), np.int32),
      "question_type": "llava", "source": np.asarray([rec.index], np.int64),
  }

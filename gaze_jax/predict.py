"""Ask a trained run a question about your own image: ``predict(workdir, image, question)``.

The run's model, tokenizer and layout come from its ``--workdir`` (its ``config.json`` and
latest checkpoint). The image is resized to the model's input size (said in the log; an image
whose aspect ratio differs from the model's input, e.g. a 300x200 photo for a 64x64 model, is
stretched: the log, ``Prediction.resize_note`` and the gaze map's title say so) and the
answer is generated greedily. For a gaze model, ``Prediction.regions`` lists per layer the
regions that the query heads selected at the row predicting the answer's first token, by the
number of heads, and ``write_gaze_map`` draws the selections of every answer token.

  from gaze_jax.predict import predict
  p = predict("/tmp/gaze_demo", "photo.png", "Where is the red shape?")
  print(p.answer)
  print(p.summary())
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
from typing import Any, Optional, Union

import numpy as np
from etils import epath

from gaze_jax import logs, runs
from gaze_jax.data.features import ExampleTooLong, batch_to_model_inputs
from gaze_jax.eval.evaluate import generate_answers
from gaze_jax.eval.gaze_maps import write_batch_gaze_maps
from gaze_jax.eval.text import decode
from gaze_jax.train.data import example_processor

log = logging.getLogger(__name__)

ImageLike = Union[str, os.PathLike, np.ndarray]
# Aspect ratios (width / height) this close count as the same: rounding a size to whole
# pixels or patches changes them a little.
ASPECT_TOLERANCE = 0.02


def aspect_changed(image_hw: tuple[int, int], model_hw: tuple[int, int]) -> bool:
  """Whether resizing an image of ``image_hw`` (height, width) to ``model_hw`` stretches it:
  their aspect ratios differ by more than ``ASPECT_TOLERANCE`` (relative)."""
  (h, w), (mh, mw) = image_hw, model_hw
  return abs(math.log((w / h) / (mw / mh))) > math.log1p(ASPECT_TOLERANCE)


def resize_note(image_hw: tuple[int, int], model_hw: tuple[int, int]) -> Optional[str]:
  """One line when resizing ``image_hw`` to ``model_hw`` (both (height, width)) stretches the
  image, e.g. "the image was stretched from 300x200 to the model's 64x64 (aspect ratio 1.50 ->
  1.00)" (width x height; the ratio is width / height); None when it keeps its aspect
  ratio."""
  if not aspect_changed(image_hw, model_hw):
    return None
  (h, w), (mh, mw) = image_hw, model_hw
  return (f"the image was stretched from {w}x{h} to the model's {mw}x{mh} (aspect ratio "
          f"{w / h:.2f} -> {mw / mh:.2f})")


@dataclasses.dataclass(frozen=True)
class RegionShare:
  """One gaze region and the share of the query heads that selected it at one layer."""
  region: int
  frame: int
  row: int           # the region's row and column in its frame's region grid (from 0)
  col: int
  heads: int         # query heads that selected it
  of_heads: int      # query heads in all

  @property
  def share(self) -> float:
    return self.heads / self.of_heads


@dataclasses.dataclass
class Prediction:
  """A generated answer. ``regions[layer]`` (most chosen first) are the regions the query heads
  selected at the row that predicts the answer's first token; empty for a dense model."""
  answer: str
  question: str
  regions: list[list[RegionShare]]
  image_size: tuple[int, int]          # the input image's (height, width) before resizing
  model_image_size: tuple[int, int]    # (height, width) the model saw it at
  inputs: Any = dataclasses.field(repr=False, default=None)     # the answered example
  selected: Any = dataclasses.field(repr=False, default=None)   # per layer ids [1, S, Hq, K]
  tokenizer: Any = dataclasses.field(repr=False, default=None)

  @property
  def resize_note(self) -> Optional[str]:
    """A line saying the image was stretched to the model's input size (its aspect ratio
    changed), or None when it was not (``resize_note``)."""
    return resize_note(self.image_size, self.model_image_size)

  def summary(self, top: int = 3) -> str:
    """Where the answer's first token looked, one line per layer, rows and columns counted
    from 1 as in the datasets' answers, e.g. ``layer 1: row 2 col 3 (4 of 4 heads), ...``."""
    if not self.regions:
      return "a dense model: every answer token reads every region"
    lines = []
    for layer, shares in enumerate(self.regions):
      picks = ", ".join(f"row {s.row + 1} col {s.col + 1}"
                        + (f" of frame {s.frame + 1}" if s.frame else "")
                        + f" ({s.heads} of {s.of_heads} heads)" for s in shares[:top])
      lines.append(f"layer {layer}: {picks or 'nothing selected'}")
    return "\n".join(lines)

  def write_gaze_map(self, path) -> Optional[epath.Path]:
    """Draws the regions each answer token selected, per layer, as a PNG at ``path`` (local or
    ``gs://``); returns it, or None for a dense model. Its title: the question, the model's
    answer, ``resize_note`` when the image was stretched, and the legend (no ground truth:
    ``predict`` has none)."""
    if self.selected is None or self.selected[0] is None:
      return None
    with tempfile.TemporaryDirectory() as tmp:
      written = write_batch_gaze_maps(tmp, self.inputs, self.selected, limit=1,
                                      tokenizer=self.tokenizer, answer_label="model's answer",
                                      notes=[self.resize_note] if self.resize_note else [])
      if not written:
        return None
      path = epath.Path(path)
      path.parent.mkdir(parents=True, exist_ok=True)
      epath.Path(written[0]).copy(path, overwrite=True)    # to any filesystem, gs:// too
    return path


def read_image(image: ImageLike) -> np.ndarray:
  """uint8 ``[H, W, 3]`` from a file path (any format Pillow reads; local or ``gs://``) or an
  array."""
  if isinstance(image, np.ndarray):
    arr = np.asarray(image)
    if arr.ndim == 2:
      arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
      raise ValueError(f"image array must be [H, W] or [H, W, 3|4], got shape {arr.shape}")
    if arr.dtype != np.uint8:
      raise ValueError(f"image array must be uint8 (0-255), got {arr.dtype}")
    return arr[..., :3]
  # As displayed (its EXIF orientation applied); llava imports PIL, the [data] extra, at its
  # top: not this module's.
  from gaze_jax.data.llava import load_image

  path = epath.Path(image)
  if not path.is_file():
    raise FileNotFoundError(f"image file {path} does not exist")
  try:
    with path.open("rb") as f:
      return load_image(f)
  except Exception as e:        # Pillow raises many types for files it cannot read
    raise ValueError(f"image file {path} cannot be read as an image: {e}") from None


def check_question(question) -> None:
  """Raises ValueError unless ``question`` is non-empty text that can be written as UTF-8.

  A question given as bytes that are not UTF-8 (absl keeps such command-line bytes as lone
  surrogates, ``"\\udcff"``) is refused, naming the bytes, rather than decoded with
  replacement characters: the model would be asked something the user did not write."""
  if not isinstance(question, str) or not question.strip():
    raise ValueError("question must be a non-empty string")
  try:
    question.encode("utf-8")
  except UnicodeEncodeError as e:
    bad = question[e.start:e.end]
    try:
      shown = "bytes " + " ".join(f"0x{b:02x}" for b in bad.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:       # a lone surrogate that no byte stands for
      shown = repr(bad)
    raise ValueError(f"the question is not UTF-8 text ({shown} at character {e.start}): "
                     "give it in UTF-8") from None


def _features(processor, spec, image: np.ndarray, question: str, answer: str):
  example = {"id": "predict", "images": [image],
             "turns": {"question": [question], "answer": [answer]}}
  try:
    feats = processor.features(example)
  except ExampleTooLong as e:
    raise ValueError(f"the question does not fit the model's context: {e} (seq_len="
                     f"{spec.seq_len}); ask a shorter question") from None
  return batch_to_model_inputs({k: v[None] for k, v in feats.items()}, spec)


def region_shares(inputs, selected) -> list[list[RegionShare]]:
  """Per layer, the regions the query heads selected at the row that predicts the answer's
  first token (the first row with ``inputs.loss_mask`` > 0), by share of the heads."""
  if not selected or selected[0] is None:
    return []
  rows = np.flatnonzero(np.asarray(inputs.loss_mask)[0] > 0)
  if rows.size == 0:
    return []
  lay = inputs.layout
  frame, row, col = (np.asarray(a)[0] for a in (lay.region_frame, lay.region_row, lay.region_col))
  out = []
  for ids in selected:
    per_head = np.asarray(ids)[0, rows[0]]                            # [Hq, K]
    counts: dict[int, int] = {}
    for head in per_head:
      for r in {int(i) for i in head if i >= 0}:
        counts[r] = counts.get(r, 0) + 1
    shares = [RegionShare(r, int(frame[r]), int(row[r]), int(col[r]), n, len(per_head))
              for r, n in counts.items()]
    out.append(sorted(shares, key=lambda x: (-x.heads, x.region)))
  return out


def model_image_hw(cfg, inputs) -> tuple[int, int]:
  """(height, width) in pixels of the first image of ``inputs`` as the model sees it: the
  square ``image_size`` of a SigLIP-style tower, a Qwen-VL tower's bucket (its patch grid)."""
  if cfg.qwen_vision is not None:
    _, gh, gw = (int(n) for n in np.asarray(inputs.images.grids)[0, 0])
    return gh * cfg.qwen_vision.patch_size, gw * cfg.qwen_vision.patch_size
  return cfg.vision.image_size, cfg.vision.image_size


def predict(workdir, image: ImageLike, question: str, *, max_new_tokens: int = 16,
            step: Optional[int] = None, restored=None, overrides=None,
            allow_nonfinite: bool = False) -> Prediction:
  """Answers ``question`` about ``image`` with the run in ``workdir``.

  Args:
    workdir: a training run's ``--workdir`` (``config.json`` and ``checkpoints/``).
    image: a file path or a uint8 ``[H, W, 3]`` array; resized to the model's image size
      (stretched when its aspect ratio differs: logged, and in ``Prediction.resize_note``).
    question: the question text (the chat template of the run's tokenizer is applied).
    max_new_tokens: the most answer tokens to generate.
    step: a checkpoint step (default: the latest).
    restored: a ``gaze_jax.runs.Restored`` to reuse (skips loading for repeated questions).
    overrides: ``{"gaze.top_k": 2, ...}``: answer with the trained model changed so
      (``gaze_jax.runs.parse_overrides``); by default the model is the one the run trained.
    allow_nonfinite: answer with weights that hold NaN or infinite values (refused otherwise).
  Raises:
    FileNotFoundError / ValueError naming the workdir, the image file, the question (empty, or
    not UTF-8 text: ``check_question``), ``max_new_tokens`` below 1, or the run's
    ``config.json`` and its field (cut short, a bad field);
    ``gaze_jax.train.checkpoint.CheckpointError`` when the workdir holds no checkpoint.
  """
  logs.show_progress()              # plain Python / a notebook: the resize line shows
  check_question(question)
  if max_new_tokens < 1:             # 0 would answer nothing; fewer breaks generation
    raise ValueError(f"max_new_tokens={max_new_tokens}: the answer needs at least 1 token")
  pixels = read_image(image)
  run = restored or runs.restore(None, workdir, step, overrides=overrides,
                                 allow_nonfinite=allow_nonfinite)
  processor = example_processor(run.config, run.tokenizer, run.model_cfg, run.spec)
  asked = _features(processor, run.spec, pixels, question, "?")
  size = model_image_hw(run.model_cfg, asked)
  stretched = resize_note(pixels.shape[:2], size)
  if stretched:
    log.warning("%s", stretched)
  elif pixels.shape[:2] != size:
    log.info("resizing the image from %dx%d to the model's %dx%d", pixels.shape[1],
             pixels.shape[0], size[1], size[0])
  toks, lengths, _ = generate_answers(run.model, asked, max_new_tokens=max_new_tokens,
                                      stop_tokens=tuple(getattr(run.tokenizer, "stop_ids", ())))
  ids = [int(i) for i in toks[0, :int(lengths[0])]]
  stops = set(getattr(run.tokenizer, "stop_ids", ()))
  ids = ids[:next((i for i, t in enumerate(ids) if t in stops), len(ids))]
  answer = " ".join(decode(run.tokenizer, ids).split())
  # The model's own answer, teacher-forced: its rows select what generation selected (routing
  # at a row depends only on the tokens before it).
  answered = _features(processor, run.spec, pixels, question, answer or "?")
  _, selected = run.model(answered.tokens, answered.layout, answered.images,
                          return_selected=True)
  return Prediction(answer=answer, question=question,
                    regions=region_shares(answered, selected),
                    image_size=tuple(int(x) for x in pixels.shape[:2]), model_image_size=size,
                    inputs=answered, selected=selected, tokenizer=run.tokenizer)

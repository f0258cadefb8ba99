"""Gaze maps: where the model looked while writing each answer token.

For one example, a layer and some answer rows, the heat of region r at row t is the share of
query heads that selected r (``selection_heat``). ``render_gaze_map`` draws it over the
example's images / video frames: one row per answer token, one column per layer (each column
holds the frames side by side). Unselected regions are dimmed to ``DIM``; a selected region is
lit (brightness ``DIM + (1 - DIM) * (0.5 + 0.5 * heat)``, so the image stays readable) and
framed in a cyan ramp (``selection_colour``), with the number of heads that chose it.
Ground-truth regions are framed in magenta, a few pixels inside their border. Cyan and magenta
are colours that no shape or digit of the datasets has.
Region rectangles in pixels come from the layout (``gaze_jax.data.boxes.region_pixel_extents``:
``region_row / region_col`` times the region shape in patches, times the patch size in pixels
of that frame's grid, so pooled video frames get larger regions, and padded regions at a grid
edge are cut at the image border). Ground-truth boxes, when given, are outlined in white.
Title lines (the question, the predicted and true answers, a legend that names the
ground-truth frames only where the example has some) go above everything; ``predict`` titles
its map's answer "model's answer", there being no true one.

Canvas geometry (what the tests check): every frame becomes a panel of ``(ph, pw)`` pixels with
``s = panel_size / max(H, W)`` (``ph = round(H * s)``, ``pw = round(W * s)``; ``panel_size``
shrinks when the C * F panels would exceed ``max_width``); a column is ``F * pw + (F - 1) * gap``
wide and columns are ``2 * gap`` apart; one row per answer token with a ``label_height`` pixel
caption above it and ``gap`` pixels between rows; ``label_height`` more per title line and for
the column captions: width ``C * col_w + (C - 1) * 2 * gap``, height ``top + T * (label_height +
ph) + (T - 1) * gap``.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np
from etils import epath

from gaze_jax.data.boxes import region_pixel_extents
from gaze_jax.data.qwen_vl import patch_frames
from gaze_jax.eval.text import decode
from gaze_jax.gaze.layout import TEXT as TEXT_KIND

DIM = 0.4                                 # brightness of unselected regions
GT_REGION = (255, 0, 255)                 # magenta: no shape of the datasets has it
GT_INSET = 3                              # pixels between a region's frame and its ground-truth one
GT_BOX = (255, 255, 255)
TEXT = (255, 255, 255)


def legend(gt_regions: bool = False, gt_boxes: bool = False) -> str:
  """The legend line: what the frames mean, naming the ground-truth frames only when the map
  draws some (``gt_regions``: magenta region frames; ``gt_boxes``: white boxes)."""
  parts = ["lit, cyan frame: selected regions (the number: how many query heads chose it)"]
  if gt_regions:
    parts.append("magenta: ground truth")
  if gt_boxes:
    parts.append("white: ground-truth boxes")
  return "; ".join(parts)


LEGEND = legend(gt_regions=True)          # a map with ground-truth regions (eval_main's)


def selection_colour(heat: float) -> tuple[int, int, int]:
  """The frame colour of a selected region, a cyan ramp from dim (one head of many) to bright
  (every head): cyan, like magenta, is no colour of the datasets' shapes or digits."""
  h = min(1.0, max(0.0, float(heat)))
  return (0, int(round(110 + 145 * h)), int(round(130 + 125 * h)))


def selection_heat(selected: Sequence, b: int, rows: Sequence[int], num_regions: int,
                   layer: Optional[int] = None) -> np.ndarray:
  """Share of query heads selecting each region: float ``[T, NR]`` in [0, 1].

  Args:
    selected: per layer, int ``[B, S, Hq, K]`` ids (-1 = none).
    b: the example; rows: its answer slots.
    num_regions: NR.
    layer: the layer to show; None averages the shares over all layers.
  """
  layers = range(len(selected)) if layer is None else [int(layer)]
  if layer is not None and not 0 <= int(layer) < len(selected):
    raise ValueError(f"layer={layer} out of range for {len(selected)} layers")
  rows = np.asarray(rows, np.int64)
  heat = np.zeros((len(rows), num_regions), np.float64)
  for l in layers:
    ids = np.asarray(selected[l])[b, rows]                       # [T, Hq, K]
    Hq = ids.shape[1]
    for i in range(len(rows)):
      v = ids[i][ids[i] >= 0]
      heat[i] += np.bincount(v, minlength=num_regions)[:num_regions] / Hq
  return heat / len(layers)


def to_uint8(images, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> np.ndarray:
  """Normalised float images ``[..., H, W, C]`` back to uint8 RGB (grey gives 3 channels)."""
  x = np.asarray(images, np.float64)
  c = x.shape[-1]
  x = x * np.asarray(std, np.float64)[:c] + np.asarray(mean, np.float64)[:c]
  x = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
  if c == 1:
    x = np.repeat(x, 3, axis=-1)
  return x[..., :3]


def panel_geometry(image_hw: tuple[int, int], n_frames: int, *, panel_size: int = 256,
                   max_width: int = 2048, gap: int = 4) -> tuple[int, int, float]:
  """``(ph, pw, scale)`` of one frame's panel (module docstring)."""
  H, W = image_hw
  size = panel_size
  if n_frames * panel_size + (n_frames - 1) * gap > max_width:
    size = max(48, max_width // n_frames)
  s = size / max(H, W)
  return int(round(H * s)), int(round(W * s)), s


def render_gaze_map(frames: np.ndarray, layout_row: dict, heat: np.ndarray, *,
                    region_shape: tuple[int, int], gt_regions=None, gt_boxes=None,
                    labels: Optional[Sequence[str]] = None,
                    column_labels: Optional[Sequence[str]] = None,
                    title: Union[str, Sequence[str], None] = None, num_heads: Optional[int] = None,
                    panel_size: int = 256, max_width: int = 2048, gap: int = 4,
                    label_height: int = 14) -> np.ndarray:
  """Draws an example's gaze map.

  Args:
    frames: uint8 ``[F, H, W, 3]`` the example's images / frames (layout frame order; the
      valid frames ``layout_row["frame_valid"]`` are drawn).
    layout_row: the example's layout features (``TokenLayout.to_features()`` row, no batch axis).
    heat: float in [0, 1], ``[T, NR]`` (one row per answer token) or ``[T, C, NR]`` (C columns
      side by side, e.g. one per layer).
    region_shape: (rh, rw) patches per region.
    gt_regions: optional int ids of ground-truth regions (-1 ignored): outlined.
    gt_boxes: optional float ``[n, 5]`` ``(frame, x0, y0, x1, y1)`` in image pixels: outlined.
    labels: optional caption per row; column_labels: optional caption per column.
    title: optional line(s) above everything (the question, the answers, a legend).
    num_heads: when given, each selected region shows ``round(heat * num_heads)``, the number
      of heads that chose it.
  Returns:
    uint8 ``[height, width, 3]`` (geometry in the module docstring).
  """
  # PIL (the [data] extra) only here: the module imports without it
  from PIL import Image as PILImage
  from PIL import ImageDraw

  frames = np.asarray(frames)
  heat = np.asarray(heat, np.float64)
  if heat.ndim == 2:
    heat = heat[:, None]
  valid = np.flatnonzero(np.asarray(layout_row["frame_valid"]).astype(bool))
  if valid.size == 0:
    raise ValueError("the example has no images / frames to draw a gaze map on")
  T, C = heat.shape[:2]
  F = len(valid)
  H, W = frames.shape[1:3]
  # Columns are 2 * gap apart so that they read as groups of frames.
  ph, pw, s = panel_geometry((H, W), C * F, panel_size=panel_size,
                             max_width=max_width - (C - 1) * gap, gap=gap)
  col_w = F * pw + (F - 1) * gap
  titles = [] if title is None else [title] if isinstance(title, str) else list(title)
  top = label_height * (len(titles) + (column_labels is not None))
  width = C * col_w + (C - 1) * 2 * gap
  height = top + T * (label_height + ph) + (T - 1) * gap
  canvas = np.zeros((height, width, 3), np.float64)
  ext = region_pixel_extents(layout_row, (H, W), region_shape) * s   # [NR, 4] in panel pixels
  region_frame = np.asarray(layout_row["region_frame"])
  bases = {int(f): np.asarray(PILImage.fromarray(frames[f]).resize(
      (pw, ph), PILImage.Resampling.BICUBIC), np.float64) for f in valid}

  def origin(row, col, f):               # top-left pixel of a panel
    x = col * (col_w + 2 * gap) + list(valid).index(f) * (pw + gap)
    return x, top + row * (label_height + ph + gap) + label_height

  lit = []                               # (row, col, region, heat) drawn with a frame
  for row in range(T):
    for col in range(C):
      for f in valid:
        x0, y0 = origin(row, col, int(f))
        panel = bases[int(f)] * DIM
        for r in np.flatnonzero((region_frame == f) & (heat[row, col] > 0)):
          a, b_, c, d = _px(ext[r], pw, ph)
          h = min(1.0, float(heat[row, col, r]))
          # Selected regions are lit (brighter with more heads), so the image stays readable.
          panel[b_:d, a:c] = bases[int(f)][b_:d, a:c] * (DIM + (1 - DIM) * (0.5 + 0.5 * h))
          lit.append((row, col, int(r), h))
        canvas[y0:y0 + ph, x0:x0 + pw] = panel
  img = PILImage.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  for row, col, r, h in lit:
    x0, y0 = origin(row, col, int(region_frame[r]))
    a, b_, c, d = _px(ext[r], pw, ph)
    draw.rectangle([x0 + a, y0 + b_, x0 + c - 1, y0 + d - 1], outline=selection_colour(h),
                   width=2 if h >= 0.5 else 1)
    if num_heads:
      draw.text((x0 + a + 3, y0 + b_ + 2), str(int(round(h * num_heads))), fill=TEXT)
  gt = [] if gt_regions is None else [int(g) for g in np.asarray(gt_regions).reshape(-1) if g >= 0]
  boxes = np.zeros((0, 5)) if gt_boxes is None else np.asarray(gt_boxes, np.float64).reshape(-1, 5)
  for i, line in enumerate(titles):
    draw.text((2, i * label_height + 1), str(line), fill=TEXT)
  for col, text in enumerate(column_labels or ()):
    draw.text((col * (col_w + 2 * gap) + 2, top - label_height + 1), str(text), fill=TEXT)
  for row in range(T):
    if labels is not None and row < len(labels):
      _, y0 = origin(row, 0, int(valid[0]))
      draw.text((2, y0 - label_height + 1), str(labels[row]), fill=TEXT)
    for col in range(C):
      for g in gt:
        f = int(region_frame[g])
        if f in bases and np.isfinite(ext[g]).all():
          x0, y0 = origin(row, col, f)
          a, b_, c, d = _px(ext[g], pw, ph)
          # Inset, so that a selected ground-truth region shows both frames.
          i = min(GT_INSET, max(0, (c - a) // 4), max(0, (d - b_) // 4))
          draw.rectangle([x0 + a + i, y0 + b_ + i, x0 + c - 1 - i, y0 + d - 1 - i],
                         outline=GT_REGION, width=2)
      for f, bx0, by0, bx1, by1 in boxes:
        if int(f) in bases:
          x0, y0 = origin(row, col, int(f))
          draw.rectangle([x0 + bx0 * s, y0 + by0 * s, x0 + bx1 * s - 1, y0 + by1 * s - 1],
                         outline=GT_BOX, width=2)
  return np.asarray(img)


def _px(rect, pw: int, ph: int) -> tuple[int, int, int, int]:
  """A float ``(x0, y0, x1, y1)`` rectangle as integer pixel bounds inside the panel."""
  x0, y0, x1, y1 = (int(round(v)) for v in rect)
  return max(0, x0), max(0, y0), min(pw, x1), min(ph, y1)


def write_gaze_maps(out_dir: Union[str, os.PathLike], images, layout, selected, rows: dict, *,
                    gt_regions=None, gt_boxes: Optional[dict] = None,
                    layers: Union[int, Sequence[int], None] = None,
                    labels: Optional[dict] = None, titles: Optional[dict] = None,
                    image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                    prefix: str = "gaze_map_", start: int = 0, **render_kw) -> list[str]:
  """Writes one PNG per example of ``rows``.

  Args:
    out_dir: created if missing; local or ``gs://`` (written through ``etils.epath``).
    images: float ``[B, F, H, W, C]`` normalised model images, or a Qwen-VL batch's patch rows
      (``PatchPixels``: drawn from ``qwen_vl.patch_frames``).
    layout: the batch's TokenLayout.
    selected: per layer, int ``[B, S, Hq, K]`` selected ids.
    rows: ``{b: [answer slots]}`` examples to draw and the rows of each.
    gt_regions: optional int ``[B, G]`` (-1 padded).
    gt_boxes: optional ``{b: [n, 5] (frame, x0, y0, x1, y1)}`` in model-image pixels.
    layers: the layers to show, side by side (an int: that layer alone, with no column
      caption; None: the mean over all layers).
    labels: optional ``{b: [caption per row]}``.
    titles: optional ``{b: line or lines}`` (the question, the answers).
    image_mean, image_std: the images' normalisation.
    prefix, start: files are ``{prefix}{start + i:04d}.png``.
    render_kw: passed to ``render_gaze_map`` (panel_size, max_width, gap, label_height).
  Returns:
    the written paths.
  """
  # PIL (the [data] extra) only here: the module imports without it
  from PIL import Image as PILImage

  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  feats = layout.to_features()
  NR = np.asarray(layout.region_valid).shape[1]
  if hasattr(images, "patches"):            # a Qwen-VL batch's patch rows (PatchPixels)
    images = patch_frames(images.patches, images.grids)
  pix = to_uint8(images, image_mean, image_std)
  columns = [layers] if layers is None or isinstance(layers, int) else list(layers)
  column_labels = None if layers is None or isinstance(layers, int) else \
      [f"layer {l}" for l in columns]
  # Head counts are whole numbers for one layer; a mean over layers has none.
  num_heads = None if layers is None else int(np.asarray(selected[0]).shape[2])
  paths = []
  for i, (b, r) in enumerate(rows.items()):
    row = {k: np.asarray(v)[b] for k, v in feats.items()}
    heat = np.stack([selection_heat(selected, b, r, NR, l) for l in columns], axis=1)
    img = render_gaze_map(pix[b], row, heat, region_shape=layout.spec.region_shape,
                          gt_regions=None if gt_regions is None else np.asarray(gt_regions)[b],
                          gt_boxes=None if gt_boxes is None else gt_boxes.get(b),
                          labels=None if labels is None else labels.get(b),
                          column_labels=column_labels, num_heads=num_heads,
                          title=None if titles is None else titles.get(b), **render_kw)
    path = out_dir / f"{prefix}{start + i:04d}.png"
    with path.open("wb") as f:
      PILImage.fromarray(img).save(f, format="PNG")
    paths.append(str(path))
  return paths


def write_batch_gaze_maps(out_dir, inputs, selected, *, limit: int, start: int = 0,
                          layers: Optional[Sequence[int]] = None, tokens_per_example: int = 4,
                          pred=None, tokenizer=None, image_mean=(0.5, 0.5, 0.5),
                          image_std=(0.5, 0.5, 0.5), panel_size: int = 160,
                          answer_label: str = "true answer", notes: Sequence[str] = (),
                          **render_kw) -> list[str]:
  """Gaze maps of the first ``limit`` examples of a batch that have images and answer rows:
  ``tokens_per_example`` answer rows spread evenly over the answer, one column per layer
  (``layers``, default all), the ground-truth regions outlined, and above them the question
  (the text before the answer), the answer (the targets, titled ``answer_label``: "true
  answer" for a dataset's examples, "model's answer" for ``predict``'s), given ``pred`` (int
  ``[B, S]``, the teacher-forced argmax at every row) the predicted one, each token's caption
  naming both, any ``notes`` (one line each) and the legend (ground truth named only for an
  example that has ground-truth regions)."""
  layers = list(range(len(selected))) if layers is None else list(layers)
  mask = np.asarray(inputs.loss_mask) > 0
  has_frames = np.asarray(inputs.layout.frame_valid).astype(bool).any(1)
  rows, labels, titles = {}, {}, {}
  kind, tokens = np.asarray(inputs.layout.kind), np.asarray(inputs.tokens)
  tg = np.asarray(inputs.targets)
  pr = None if pred is None else np.asarray(pred)
  gt = (np.full((mask.shape[0], 1), -1) if inputs.gt_regions is None
        else np.asarray(inputs.gt_regions).reshape(mask.shape[0], -1))

  def word(i):
    return (repr(decode(tokenizer, [int(i)], skip_special=False)) if tokenizer is not None
            else f"id {int(i)}")

  def text(ids):
    return (" ".join(decode(tokenizer, [int(i) for i in ids]).split()) if tokenizer is not None
            else " ".join(str(int(i)) for i in ids))

  for b in range(mask.shape[0]):
    if len(rows) >= limit:
      break
    slots = np.flatnonzero(mask[b])
    if slots.size == 0 or not has_frames[b]:
      continue
    pick = np.unique(np.linspace(0, slots.size - 1, min(tokens_per_example, slots.size))
                     .round().astype(int))
    rows[b] = slots[pick].tolist()
    labels[b] = [f"answer token {int(k)}: {word(tg[b, t])}"
                 + ("" if pr is None else f", predicted {word(pr[b, t])}")
                 for k, t in zip(pick, slots[pick])]
    # The prompt's text up to the row of the first answer token.
    prompt = tokens[b, :slots[0] + 1][kind[b, :slots[0] + 1] == TEXT_KIND]
    answer = f"{answer_label}: {text(tg[b, slots])}"
    if pr is not None:
      answer = f"predicted: {text(pr[b, slots])}   {answer}"
    titles[b] = [text(prompt), answer, *notes, legend(gt_regions=bool((gt[b] >= 0).any()))]
  if not rows:
    return []
  return write_gaze_maps(out_dir, inputs.images, inputs.layout, selected, rows,
                         gt_regions=inputs.gt_regions, layers=layers, labels=labels,
                         titles=titles, image_mean=image_mean, image_std=image_std,
                         start=start, panel_size=panel_size, **render_kw)

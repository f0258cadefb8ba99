"""Gaze maps: where the model looked while writing each answer token.

For one example, a layer and some answer rows, the heat of region r at row t is the share of
query heads that selected r (``selection_heat``). ``render_gaze_map`` draws it over the
example's images / video frames, side by side: the image is dimmed, and each selected region
is blended towards white with weight ``0.15 + 0.45 * heat`` (so selected regions come out
brighter than the rest; white because no drawn shape has that colour, so the heat cannot be
mistaken for an object). Region rectangles in pixels come from the layout
(``gaze_jax.data.boxes.region_pixel_extents``: ``region_row / region_col`` times the region
shape in patches, times the patch size in pixels of that frame's grid, so pooled video frames
get larger regions, and padded regions at a grid edge are cut at the image border).
Ground-truth regions are outlined in cyan, ground-truth boxes in magenta. An optional title
(the question) takes one caption line above everything.

Canvas geometry (what the tests check): every frame becomes a panel of ``(ph, pw)`` pixels with
``s = panel_size / max(H, W)`` (``ph = round(H * s)``, ``pw = round(W * s)``; ``panel_size``
shrinks to ``max(48, max_width // F)`` when F panels would exceed ``max_width``); one row per
answer token, a ``label_height`` pixel caption above each panel row, ``gap`` pixels between
panels and rows: width ``F * pw + (F - 1) * gap``, height ``T * (label_height + ph) +
(T - 1) * gap``, plus ``label_height`` with a title.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from gaze_jax.data.boxes import region_pixel_extents

HOT = np.array([255.0, 255.0, 255.0])     # selected regions blend towards this colour
DIM = 0.45                                # brightness of the image under the map
GT_REGION = (0, 220, 255)
GT_BOX = (255, 0, 255)


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
                    labels: Optional[Sequence[str]] = None, title: Optional[str] = None,
                    panel_size: int = 256, max_width: int = 2048, gap: int = 4,
                    label_height: int = 14) -> np.ndarray:
  """Draws an example's gaze map.

  Args:
    frames: uint8 ``[F, H, W, 3]`` the example's images / frames (layout frame order; the
      valid frames ``layout_row["frame_valid"]`` are drawn).
    layout_row: the example's layout features (``TokenLayout.to_features()`` row, no batch axis).
    heat: float ``[T, NR]`` in [0, 1], one row per answer token.
    region_shape: (rh, rw) patches per region.
    gt_regions: optional int ids of ground-truth regions (-1 ignored): outlined.
    gt_boxes: optional float ``[n, 5]`` ``(frame, x0, y0, x1, y1)`` in image pixels: outlined.
    labels: optional caption per row.
    title: optional line above everything (the question).
  Returns:
    uint8 ``[height, width, 3]`` (geometry in the module docstring).
  """
  from PIL import Image as PILImage
  from PIL import ImageDraw

  frames = np.asarray(frames)
  heat = np.asarray(heat, np.float64)
  valid = np.flatnonzero(np.asarray(layout_row["frame_valid"]).astype(bool))
  if valid.size == 0:
    raise ValueError("the example has no images / frames to draw a gaze map on")
  F = len(valid)
  H, W = frames.shape[1:3]
  ph, pw, s = panel_geometry((H, W), F, panel_size=panel_size, max_width=max_width, gap=gap)
  T = heat.shape[0]
  width = F * pw + (F - 1) * gap
  height = T * (label_height + ph) + (T - 1) * gap
  canvas = np.zeros((height, width, 3), np.float64)
  ext = region_pixel_extents(layout_row, (H, W), region_shape) * s   # [NR, 4] in panel pixels
  region_frame = np.asarray(layout_row["region_frame"])
  bases = [np.asarray(PILImage.fromarray(frames[f]).resize((pw, ph), PILImage.Resampling.BICUBIC),
                      np.float64) for f in valid]
  panel_x = {int(f): i * (pw + gap) for i, f in enumerate(valid)}
  for row in range(T):
    y0 = row * (label_height + ph + gap) + label_height
    for f in valid:
      x0 = panel_x[int(f)]
      panel = bases[list(valid).index(f)] * DIM
      for r in np.flatnonzero((region_frame == f) & (heat[row] > 0)):
        a, b_, c, d = _px(ext[r], pw, ph)
        w = 0.15 + 0.45 * min(1.0, float(heat[row, r]))   # the image stays visible
        panel[b_:d, a:c] = (1 - w) * panel[b_:d, a:c] + w * HOT
      canvas[y0:y0 + ph, x0:x0 + pw] = panel
  img = PILImage.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  gt = [] if gt_regions is None else [int(g) for g in np.asarray(gt_regions).reshape(-1) if g >= 0]
  boxes = np.zeros((0, 5)) if gt_boxes is None else np.asarray(gt_boxes, np.float64).reshape(-1, 5)
  for row in range(T):
    y0 = row * (label_height + ph + gap) + label_height
    if labels is not None and row < len(labels):
      draw.text((2, y0 - label_height + 1), str(labels[row]), fill=(255, 255, 255))
    for g in gt:
      f = int(region_frame[g])
      if f in panel_x and np.isfinite(ext[g]).all():
        a, b_, c, d = _px(ext[g], pw, ph)
        draw.rectangle([panel_x[f] + a, y0 + b_, panel_x[f] + c - 1, y0 + d - 1],
                       outline=GT_REGION, width=1)
    for f, bx0, by0, bx1, by1 in boxes:
      if int(f) in panel_x:
        x = panel_x[int(f)]
        draw.rectangle([x + bx0 * s, y0 + by0 * s, x + bx1 * s - 1, y0 + by1 * s - 1],
                       outline=GT_BOX, width=2)
  out = np.asarray(img)
  if title is not None:
    band = PILImage.new("RGB", (out.shape[1], label_height), (0, 0, 0))
    ImageDraw.Draw(band).text((2, 1), str(title), fill=(255, 255, 255))
    out = np.concatenate([np.asarray(band), out], axis=0)
  return out


def _px(rect, pw: int, ph: int) -> tuple[int, int, int, int]:
  """A float ``(x0, y0, x1, y1)`` rectangle as integer pixel bounds inside the panel."""
  x0, y0, x1, y1 = (int(round(v)) for v in rect)
  return max(0, x0), max(0, y0), min(pw, x1), min(ph, y1)


def write_gaze_maps(out_dir: Union[str, Path], images, layout, selected, rows: dict, *,
                    gt_regions=None, gt_boxes: Optional[dict] = None, layer: Optional[int] = None,
                    labels: Optional[dict] = None, titles: Optional[dict] = None,
                    image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                    prefix: str = "gaze_map_", start: int = 0, **render_kw) -> list[str]:
  """Writes one PNG per example of ``rows``.

  Args:
    out_dir: created if missing.
    images: float ``[B, F, H, W, C]`` normalised model images.
    layout: the batch's TokenLayout.
    selected: per layer, int ``[B, S, Hq, K]`` selected ids.
    rows: ``{b: [answer slots]}`` examples to draw and the rows of each.
    gt_regions: optional int ``[B, G]`` (-1 padded).
    gt_boxes: optional ``{b: [n, 5] (frame, x0, y0, x1, y1)}`` in model-image pixels.
    layer: layer to show (None: the mean over layers).
    labels: optional ``{b: [caption per row]}``.
    titles: optional ``{b: title}`` (the question).
    image_mean, image_std: the images' normalisation.
    prefix, start: files are ``{prefix}{start + i:04d}.png``.
    render_kw: passed to ``render_gaze_map`` (panel_size, max_width, gap, label_height).
  Returns:
    the written paths.
  """
  from PIL import Image as PILImage

  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  feats = layout.to_features()
  NR = np.asarray(layout.region_valid).shape[1]
  pix = to_uint8(images, image_mean, image_std)
  paths = []
  for i, (b, r) in enumerate(rows.items()):
    row = {k: np.asarray(v)[b] for k, v in feats.items()}
    heat = selection_heat(selected, b, r, NR, layer)
    img = render_gaze_map(pix[b], row, heat, region_shape=layout.spec.region_shape,
                          gt_regions=None if gt_regions is None else np.asarray(gt_regions)[b],
                          gt_boxes=None if gt_boxes is None else gt_boxes.get(b),
                          labels=None if labels is None else labels.get(b),
                          title=None if titles is None else titles.get(b), **render_kw)
    path = out_dir / f"{prefix}{start + i:04d}.png"
    PILImage.fromarray(img).save(path)
    paths.append(str(path))
  return paths


def write_batch_gaze_maps(out_dir, inputs, selected, *, limit: int, start: int = 0,
                          layer: Optional[int] = None, tokens_per_example: int = 4,
                          tokenizer=None, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                          **render_kw) -> list[str]:
  """Gaze maps of the first ``limit`` examples of a batch that have images and answer rows:
  ``tokens_per_example`` answer rows spread evenly over the answer, the middle layer by default,
  captions naming the token each row produces (with a tokenizer), the question above them (the
  text before the answer) and the ground-truth regions outlined."""
  from gaze_jax.eval.evaluate import decode
  from gaze_jax.gaze.layout import TEXT

  L = len(selected)
  layer = L // 2 if layer is None else layer
  mask = np.asarray(inputs.loss_mask) > 0
  has_frames = np.asarray(inputs.layout.frame_valid).astype(bool).any(1)
  rows, labels, titles = {}, {}, {}
  kind, tokens = np.asarray(inputs.layout.kind), np.asarray(inputs.tokens)
  for b in range(mask.shape[0]):
    if len(rows) >= limit:
      break
    slots = np.flatnonzero(mask[b])
    if slots.size == 0 or not has_frames[b]:
      continue
    pick = np.unique(np.linspace(0, slots.size - 1, min(tokens_per_example, slots.size))
                     .round().astype(int))
    rows[b] = slots[pick].tolist()
    tg = np.asarray(inputs.targets)[b]
    labels[b] = [f"layer {layer}, answer token {int(k)}: "
                 + (repr(decode(tokenizer, [int(tg[t])], skip_special=False))
                    if tokenizer is not None else f"id {int(tg[t])}")
                 for k, t in zip(pick, slots[pick])]
    if tokenizer is not None:          # the prompt's text up to the row of the first answer token
      prompt = tokens[b, :slots[0] + 1][kind[b, :slots[0] + 1] == TEXT]
      titles[b] = " ".join(decode(tokenizer, prompt).split())
  if not rows:
    return []
  return write_gaze_maps(out_dir, inputs.images, inputs.layout, selected, rows,
                         gt_regions=inputs.gt_regions, layer=layer, labels=labels,
                         titles=titles or None, image_mean=image_mean, image_std=image_std,
                         start=start, **render_kw)

"""Ground-truth boxes -> gaze region ids (for routing accuracy).

A region of frame ``f`` covers the pixels of its ``rh x rw`` patches; with a ``gh x gw`` patch
grid over an ``H x W`` image a patch is ``H / gh`` by ``W / gw`` pixels (for pooled video frames
the grid is the pooled one, so a patch is larger). The last region row / column of a grid that
the region shape does not divide is cut at the image border. A region is *hit* by a box when
their intersection has a positive area (touching edges do not count).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


def region_pixel_extents(layout: Mapping[str, np.ndarray], image_hw: tuple[int, int],
                         region_shape: tuple[int, int]) -> np.ndarray:
  """Pixel rectangle of every region of one example.

  Args:
    layout: one example's layout features (``TokenLayout.to_features()`` rows, no batch axis).
    image_hw: (H, W) of the (resized) images the model sees.
    region_shape: (rh, rw) patches per region.
  Returns:
    float64 ``[NR, 4]`` ``(x0, y0, x1, y1)``; NaN rows for invalid regions.
  """
  H, W = image_hw
  rh, rw = region_shape
  valid = np.asarray(layout["region_valid"], bool)
  frame = np.asarray(layout["region_frame"])
  grid = np.asarray(layout["frame_grid"])[np.clip(frame, 0, None)]     # [NR, 2]
  gh, gw = grid[:, 0].astype(np.float64), grid[:, 1].astype(np.float64)
  row = np.asarray(layout["region_row"], np.float64)
  col = np.asarray(layout["region_col"], np.float64)
  ph, pw = H / np.maximum(gh, 1), W / np.maximum(gw, 1)                # patch size in pixels
  y0, y1 = row * rh * ph, np.minimum((row + 1) * rh, gh) * ph
  x0, x1 = col * rw * pw, np.minimum((col + 1) * rw, gw) * pw
  out = np.stack([x0, y0, x1, y1], axis=-1)
  out[~valid] = np.nan
  return out


def boxes_to_regions(layout: Mapping[str, np.ndarray], boxes: np.ndarray, box_frame: np.ndarray,
                     image_hw: tuple[int, int], region_shape: tuple[int, int]) -> np.ndarray:
  """Sorted unique global region ids hit by any of the boxes.

  Args:
    layout: one example's layout features (no batch axis).
    boxes: float ``[n, 4]`` ``(x0, y0, x1, y1)`` in pixels of the resized image, exclusive ends.
    box_frame: int ``[n]`` layout frame id of each box.
    image_hw: (H, W) of the resized images.
    region_shape: (rh, rw).
  Returns:
    int32 ``[m]`` region ids (indices into the layout's region axis).
  Raises:
    ValueError when a box names a frame the layout does not have.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  box_frame = np.asarray(box_frame, np.int64).reshape(-1)
  if len(boxes) != len(box_frame):
    raise ValueError(f"got {len(boxes)} boxes but {len(box_frame)} box frames")
  frame_valid = np.asarray(layout["frame_valid"], bool)
  bad = [int(f) for f in box_frame if not (0 <= f < len(frame_valid) and frame_valid[f])]
  if bad:
    raise ValueError(f"boxes refer to frames {bad} that the layout does not have "
                     f"({int(frame_valid.sum())} frames)")
  ext = region_pixel_extents(layout, image_hw, region_shape)         # [NR, 4]
  region_frame = np.asarray(layout["region_frame"])
  hit = np.zeros(len(ext), bool)
  for (bx0, by0, bx1, by1), f in zip(boxes, box_frame):
    with np.errstate(invalid="ignore"):                               # NaN rows compare False
      hit |= ((region_frame == f) & (bx0 < ext[:, 2]) & (bx1 > ext[:, 0])
              & (by0 < ext[:, 3]) & (by1 > ext[:, 1]))
  return np.nonzero(hit)[0].astype(np.int32)


def pad_ids(ids: np.ndarray, size: int, where: str = "example") -> np.ndarray:
  """``ids`` padded with -1 to int32 ``[size]``; ValueError naming ``where`` if too many."""
  ids = np.asarray(ids, np.int32).reshape(-1)
  if len(ids) > size:
    raise ValueError(f"{where}: {len(ids)} ground-truth regions exceed max_gt_regions={size}; "
                     "raise FeatureConfig.max_gt_regions")
  out = np.full(size, -1, np.int32)
  out[:len(ids)] = ids
  return out

"""PyTorch's 1-D resize weights as matrices (numpy, built on the host): resizing a grid is then
two small products, exact to transformers' ``F.interpolate``. Used by the SigLIP tower's
position resizing, LLaVA-OneVision's video pooling and Qwen3-VL's position resampling."""

from __future__ import annotations

import numpy as np


def bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """float32 ``[n_out, n_in]`` weights of PyTorch's bicubic resize along one axis
  (``F.interpolate(mode="bicubic", align_corners=False)``, no antialiasing): Keys' cubic
  kernel with ``a = -0.75`` at source coordinate ``(i + 0.5) * n_in / n_out - 0.5``, and
  indices past the border clamped to it (edge replication)."""
  src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
  base = np.floor(src)
  t = src - base

  def near(x):                 # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):                  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)   # [n_out, 4]
  idx = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, n_in - 1)
  out = np.zeros((n_out, n_in), np.float64)
  np.add.at(out, (np.repeat(np.arange(n_out), 4), idx.ravel()), weights.ravel())
  return out.astype(np.float32)


def bilinear_matrix(n_in: int, n_out: int, align_corners: bool = False) -> np.ndarray:
  """float32 ``[n_out, n_in]`` weights of PyTorch's bilinear resize along one axis
  (``F.interpolate(mode="bilinear", align_corners=...)``, no antialiasing): the two neighbours
  of source coordinate ``max((i + 0.5) * n_in / n_out - 0.5, 0)``, or with ``align_corners``
  ``i * (n_in - 1) / (n_out - 1)`` (0 for a single output), the upper one clamped to the
  border."""
  i = np.arange(n_out, dtype=np.float64)
  if align_corners:
    src = i * (n_in - 1) / max(n_out - 1, 1)
  else:
    src = np.maximum((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  t = src - lo
  out = np.zeros((n_out, n_in), np.float64)
  np.add.at(out, (np.arange(n_out), lo), 1 - t)
  np.add.at(out, (np.arange(n_out), hi), t)
  return out.astype(np.float32)

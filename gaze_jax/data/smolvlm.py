"""SmolVLM / Idefics3 image processing at a fixed tile grid, as a ``MediaProcessor``.

transformers' processor chooses each image's tile grid from its size; our shapes are static, so
the grid is ours to fix (``rows x cols`` tiles plus the global image, or ``(0, 0)``: only the
global image). For an image whose natural grid (``natural_grid``) is the fixed one, the pixels
are those of transformers' (Pillow) image processor; other images are resized to the fixed grid
instead. Steps, from the folder's image-processor settings:

  1. to RGB (transparency composited onto white);
  2. ``do_resize``: the longest edge to ``size.longest_edge`` (aspect kept, the other side
     rounded up to an even number);
  3. with tiles: the image to ``rows * M x cols * M`` (``M = max_image_size.longest_edge``, the
     vision tower's size), cut into ``M x M`` tiles row by row, and that image resized to
     ``M x M`` as the global image; without tiles: the image to ``M x M``;
  4. ``* rescale_factor``, then ``(x - image_mean) / image_std``.

Each tile is one ``Image(g, g)`` segment (``g * g = image_seq_len`` visual tokens). The text
around the tiles is transformers': ``<fake_token_around_image><row_i_col_j>`` before each tile,
a newline after each row of tiles, then ``\\n<fake_token_around_image><global-img>`` before the
global image and ``<fake_token_around_image>`` after it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from etils import epath

from gaze_jax.data.features import MediaPart, Visual
from gaze_jax.data.hf_pixels import channels as _channels
from gaze_jax.data.hf_pixels import check_image, rescale_normalize
from gaze_jax.data.hf_pixels import to_rgb as _rgb
from gaze_jax.gaze.layout import Image
from gaze_jax.paths import read_json as _read

__all__ = ["TileSettings", "SmolVLMMedia", "natural_grid", "longest_edge_size"]

# The image-processor classes whose processing this module reproduces.
IMAGE_PROCESSORS = ("SmolVLMImageProcessor", "SmolVLMImageProcessorPil",
                    "Idefics3ImageProcessor", "Idefics3ImageProcessorPil")
# transformers' defaults for what a processor file leaves out (the same for both families).
_DEFAULTS = dict(do_convert_rgb=True, do_resize=True, size={"longest_edge": 4 * 364},
                 resample=1, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                 image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_image_splitting=True,
                 max_image_size={"longest_edge": 364})
_IMAGE_SEQ_LEN = 169          # the processors' default tokens per tile
_LARGEST = 4096               # transformers' cap on a resized side


def longest_edge_size(h: int, w: int, longest: int) -> tuple[int, int]:
  """``(h, w)`` after transformers' longest-edge resize: the longest side becomes ``longest``,
  the other keeps the aspect ratio (truncated, then made even), both capped at 4096."""
  aspect = w / h
  if w >= h:
    w, h = longest, int(longest / aspect)
    h += h % 2
  else:
    h, w = longest, int(longest * aspect)
    w += w % 2
  h, w = max(h, 1), max(w, 1)
  aspect = w / h
  if w >= h and w > _LARGEST:
    w, h = _LARGEST, int(_LARGEST / aspect)
  elif h > w and h > _LARGEST:
    h, w = _LARGEST, int(_LARGEST * aspect)
  return max(h, 1), max(w, 1)


def natural_grid(h: int, w: int, tile: int, longest: Optional[int]) -> tuple[int, int]:
  """The ``(rows, cols)`` tiles transformers' processor gives an ``h x w`` image (``(0, 0)``:
  not split), with tile size ``tile`` and the longest-edge resize ``longest`` (None: none).
  Pick a fixed grid from it (the typical size of your images)."""
  if longest is not None:
    h, w = longest_edge_size(h, w, longest)
  aspect = w / h
  # Rounded up to whole tiles; the second side is derived from the first one's new length.
  if w >= h:
    W = math.ceil(w / tile) * tile
    H = math.ceil(int(W / aspect) / tile) * tile
  else:
    H = math.ceil(h / tile) * tile
    W = math.ceil(int(H * aspect) / tile) * tile
  if H > tile or W > tile:
    return H // tile, W // tile
  return 0, 0


@dataclasses.dataclass(frozen=True)
class TileSettings:
  """What a SmolVLM / Idefics3 folder's processor files say about images.

  Attributes:
    tile_size: M, pixels per side of a tile and of the global image
      (``max_image_size.longest_edge``).
    tokens_per_side: g, visual tokens per side of a tile (``image_seq_len = g * g``).
    longest_edge: the first resize's longest edge (``size.longest_edge``), None without it.
    resample: Pillow's resampling filter number (1 = LANCZOS).
    rescale_factor: multiplies the 0-255 values (None: not rescaled).
    mean, std: per-channel normalisation (None: not normalised).
    convert_rgb: convert grey / transparent images to RGB first.
    splitting: the processor splits images into tiles (``do_image_splitting``).
    fake_token, global_token: the text around the tiles.
    where: the file the settings came from (for errors).
  """
  tile_size: int = 364
  tokens_per_side: int = 13
  longest_edge: Optional[int] = 4 * 364
  resample: int = 1
  rescale_factor: Optional[float] = 1 / 255
  mean: Optional[tuple[float, ...]] = (0.5, 0.5, 0.5)
  std: Optional[tuple[float, ...]] = (0.5, 0.5, 0.5)
  convert_rgb: bool = True
  splitting: bool = True
  fake_token: str = "<fake_token_around_image>"
  global_token: str = "<global-img>"
  where: str = "processor settings"

  @classmethod
  def from_folder(cls, folder) -> "TileSettings":
    """The settings of a ``save_pretrained`` folder: the image processor's fields from
    ``preprocessor_config.json`` (older folders) or the ``image_processor`` object of
    ``processor_config.json`` (transformers 5), ``image_seq_len`` from ``processor_config.json``
    and the text markers from ``tokenizer_config.json`` when it names them.

    Raises FileNotFoundError when the folder has neither file, ValueError naming the file and
    key for a field we do not reproduce.
    """
    folder = epath.Path(folder)              # local or gs://
    pre, proc = folder / "preprocessor_config.json", folder / "processor_config.json"
    pcfg = _read(proc) if proc.is_file() else {}
    if pre.is_file():
      icfg, where = _read(pre), str(pre)
    elif isinstance(pcfg.get("image_processor"), Mapping):
      icfg, where = dict(pcfg["image_processor"]), f"{proc} (image_processor)"
    else:
      raise FileNotFoundError(f"{folder} has no preprocessor_config.json and no "
                              "processor_config.json with an image_processor")
    kind = icfg.get("image_processor_type")
    if kind is not None and kind not in IMAGE_PROCESSORS:
      raise ValueError(f"{where}: image_processor_type={kind!r} is not supported (only "
                       f"{', '.join(IMAGE_PROCESSORS)})")
    c = {**_DEFAULTS, **{k: v for k, v in icfg.items() if v is not None}}
    tile = _edge(c["max_image_size"], "max_image_size", where)
    longest = _edge(c["size"], "size", where) if c["do_resize"] else None
    resample = c["resample"]
    if isinstance(resample, bool) or not isinstance(resample, int) or not 0 <= resample <= 5:
      raise ValueError(f"{where}: resample={resample!r} is not supported (one of Pillow's "
                       "filter numbers 0-5)")
    if c.get("do_center_crop"):
      raise ValueError(f"{where}: do_center_crop=true is not supported")
    mean = std = None
    if c["do_normalize"]:
      mean, std = (_channels(c[k], k, where) for k in ("image_mean", "image_std"))
    seq = pcfg.get("image_seq_len", _IMAGE_SEQ_LEN)
    g = math.isqrt(seq) if isinstance(seq, int) and seq > 0 else 0
    if g * g != seq:
      raise ValueError(f"{proc}: image_seq_len={seq!r} is not a square number of visual tokens "
                       "per tile")
    tokens = _tokenizer_markers(folder / "tokenizer_config.json")
    return cls(tile_size=tile, tokens_per_side=g, longest_edge=longest, resample=resample,
               rescale_factor=float(c["rescale_factor"]) if c["do_rescale"] else None,
               mean=mean, std=std, convert_rgb=bool(c["do_convert_rgb"]),
               splitting=bool(c["do_image_splitting"]),
               fake_token=tokens.get("fake_image_token", cls.fake_token),
               global_token=tokens.get("global_image_token", cls.global_token), where=where)


def _edge(size: Any, key: str, where: str) -> int:
  """``{"longest_edge": n}`` -> n (the only size form these processors resize with here)."""
  n = size.get("longest_edge") if isinstance(size, Mapping) else None
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"{where}: {key}={size!r} is not supported (only {{\"longest_edge\": n}})")
  return n


def _tokenizer_markers(path: epath.Path) -> dict[str, str]:
  """The marker strings a SmolVLM tokenizer config names (top level or in its
  ``extra_special_tokens`` object), e.g. ``fake_image_token``."""
  if not path.is_file():
    return {}
  cfg = _read(path)
  extra = cfg.get("extra_special_tokens")
  found = {**(extra if isinstance(extra, Mapping) else {}), **cfg}
  return {k: v for k, v in found.items()
          if k in ("fake_image_token", "global_image_token") and isinstance(v, str)}


class SmolVLMMedia:
  """SmolVLM / Idefics3 image processing at the fixed tile grid ``grid = (rows, cols)`` (a
  ``MediaProcessor``; see the module docstring). ``(0, 0)`` keeps only the global image.

  Raises ValueError for a grid the settings cannot give: tiles when the folder says
  ``do_image_splitting=false``, or ``(1, 1)`` (transformers does not split an image that fits
  one tile: use ``(0, 0)``).
  """

  def __init__(self, settings: TileSettings, grid: tuple[int, int]):
    rows, cols = grid
    for n in (rows, cols):
      if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"grid must be two ints >= 0 (rows, cols), got {grid!r}")
    if (rows == 0) != (cols == 0):
      raise ValueError(f"grid {grid!r}: rows and cols are both 0 (global image only) or both "
                       ">= 1")
    if (rows, cols) == (1, 1):
      raise ValueError("grid (1, 1): transformers does not split an image that fits one tile "
                       "(it gives (0, 0), the global image only); use (0, 0)")
    if rows and not settings.splitting:
      raise ValueError(f"{settings.where}: do_image_splitting=false, but grid {grid!r} asks "
                       "for tiles; use (0, 0)")
    self.settings = settings
    self.grid = (rows, cols)

  @classmethod
  def from_folder(cls, folder, grid: tuple[int, int]) -> "SmolVLMMedia":
    """The processing of a ``save_pretrained`` folder (``TileSettings.from_folder``) at
    ``grid``. When the folder holds the model's ``config.json`` too, its tile size and tokens
    per tile must agree with the vision tower's (a ValueError naming both files otherwise)."""
    settings = TileSettings.from_folder(folder)
    model = epath.Path(folder) / "config.json"
    if model.is_file():
      _check_model(settings, _read(model), model)
    return cls(settings, grid)

  @property
  def tiles_per_image(self) -> int:
    rows, cols = self.grid
    return rows * cols + 1

  def tiles(self, image: np.ndarray) -> np.ndarray:
    """uint8 ``[h, w, 3]`` (or grey ``[h, w]``, ``[h, w, 1]``, RGBA ``[h, w, 4]``) -> float32
    ``[rows * cols + 1, M, M, 3]``: the tiles row by row, then the global image."""
    # PIL (the [data] extra) only here: the module imports without it
    from PIL import Image as PILImage

    s, (rows, cols) = self.settings, self.grid
    im = check_image(image)
    im = _rgb(im) if s.convert_rgb else im
    pil = PILImage.fromarray(im[..., 0] if im.ndim == 3 and im.shape[-1] == 1 else im)

    def resize(p, h, w):                       # Pillow returns a copy at the same size
      return p.resize((w, h), resample=s.resample)

    if s.longest_edge is not None:
      pil = resize(pil, *longest_edge_size(pil.height, pil.width, s.longest_edge))
    M = s.tile_size
    out = []
    if rows:
      pil = resize(pil, rows * M, cols * M)
      out = [pil.crop((c * M, r * M, (c + 1) * M, (r + 1) * M))
             for r in range(rows) for c in range(cols)]
    out.append(resize(pil, M, M))
    x = np.stack([np.asarray(p) for p in out])
    x = x[..., None] if x.ndim == 3 else x
    return rescale_normalize(x, s.rescale_factor, s.mean, s.std)

  def image(self, image: np.ndarray) -> list[MediaPart]:
    """The parts that replace one image's placeholder: the markers and one ``Image(g, g)`` per
    tile, then the global image."""
    s, (rows, cols) = self.settings, self.grid
    pixels = self.tiles(image)
    g = s.tokens_per_side
    visual = [Visual(Image(g, g), p[None]) for p in pixels]
    parts: list[MediaPart] = []
    for r in range(rows):
      for c in range(cols):
        parts += [f"{s.fake_token}<row_{r + 1}_col_{c + 1}>", visual[r * cols + c]]
      parts.append("\n")
    parts += [("\n" if rows else "") + s.fake_token + s.global_token, visual[-1], s.fake_token]
    return _merge_text(parts)

  def video(self, frames: Sequence[np.ndarray]) -> list[MediaPart]:
    raise NotImplementedError(
        "SmolVLM video: transformers' video prompt needs each frame's timestamp and its frames "
        "are resized to keep their aspect ratio and padded (torchvision), which fixed shapes "
        "cannot reproduce; give the frames as images instead")


def _merge_text(parts: list[MediaPart]) -> list[MediaPart]:
  """Adjacent strings joined (one text part between two visual segments)."""
  out: list[MediaPart] = []
  for p in parts:
    if isinstance(p, str) and out and isinstance(out[-1], str):
      out[-1] += p
    else:
      out.append(p)
  return out


def _check_model(settings: TileSettings, cfg: Mapping[str, Any],
                 path: epath.Path) -> None:
  """The processor's tiles must be what the model's vision tower takes."""
  vc = cfg.get("vision_config") or {}
  size, patch, scale = vc.get("image_size"), vc.get("patch_size"), cfg.get("scale_factor", 2)
  if not all(isinstance(x, int) and x > 0 for x in (size, patch, scale)):
    return                             # the converter reports a bad config.json
  if size != settings.tile_size:
    raise ValueError(f"{settings.where}: max_image_size.longest_edge={settings.tile_size}, but "
                     f"{path}: vision_config.image_size={size}: tiles must be the vision tower's "
                     "size")
  g = size // patch // scale
  if g != settings.tokens_per_side:
    raise ValueError(f"image_seq_len={settings.tokens_per_side ** 2} (processor_config.json), "
                     f"but {path} gives {g * g} visual tokens per tile (image_size {size} / "
                     f"patch_size {patch} / scale_factor {scale}, squared)")

"""Token layout: the structure of an interleaved text / image / video sequence, as arrays.

A sequence is described per example by a list of segments (``Text``, ``Image``, ``Video``).
``build_layout`` turns a batch of such descriptions into a ``TokenLayout``: fixed-shape integer
arrays that travel with the activations through ``jax.jit`` (they are data, not Python
structure, so examples may differ in text lengths and image counts without retracing).

Storage order. Patches are stored **region-major**: the ``rh * rw`` tokens of one gaze region
are contiguous, so a region is one contiguous KV block starting at ``region_first``. A grid that
the region shape does not divide is padded to whole regions; the missing tokens are ``PAD``
slots, masked everywhere. RoPE positions are those of the dense raster-order sequence
(docs/method.md step 1): patch ``(i, j)`` of a ``gh x gw`` grid starting at position ``p`` has position
``p + i * gw + j``, and padding slots consume no position. All causality is by position.

Sequence (per example): ``[text][frame 0 patches][ctx x N][frame 1 patches][ctx x N]...[text]``
with ``N = spec.num_ctx`` context tokens after every image and every video frame.

Newline rows. ``Image(gh, gw, newline_rows=True)`` ends every row of patches with one text slot,
as LLaVA-NeXT / OneVision append their ``image_newline`` embedding to each row of a
high-resolution grid: patch ``(i, j)`` sits at ``p + i * (gw + 1) + j`` and the newline slot of
row ``i`` at ``p + i * (gw + 1) + gw``. The newline slots are TEXT slots that carry their
image's ``frame`` id (other text slots have -1): as keys they are text, visible to every later
row; as queries they attend as the image's patch rows do, densely and causally, without routing
(``masks.routed_rows``), so that gaze attention at K = all regions stays dense attention for any
region shape; region descriptors and routing candidates see only the patches. They are stored
after the image's regions (before its context tokens), in row order, and are listed in
``nonvisual_index``; their token ids are those of the text (the model gives them their
embedding, ``MLLM.embed``).

Tiles. ``Image(gh, gw, tiles=(th, tw))`` is an image whose grid is cut out of the stitched
features of ``th x tw`` tiles (LLaVA's anyres): the image takes ``th * tw`` consecutive frame
ids, one per tile, because the model's images hold one tile per frame id. The first carries
the grid (patches, regions, context tokens) and ``frame_tiles = (th, tw)``; the others hold
pixels only (``frame_valid`` False, no tokens). See ``MLLM.embed`` for how the grid is read
from the tiles.

M-RoPE triples. With ``LayoutSpec(mrope=True)`` the layout also holds ``rope_position``
``[B, S, 3]``: the (time, height, width) positions of Qwen2-VL / Qwen2.5-VL / Qwen3-VL's
multimodal RoPE, exactly as transformers' ``get_rope_index`` (5.x) gives them for the same token
sequence. A cursor ``c`` starts at 0:
  - a text slot (also a context token and a newline slot) takes ``(c, c, c)``, then ``c += 1``;
  - an image of a ``gh x gw`` grid starting at ``s = c`` gives patch ``(i, j)`` the triple
    ``(s, s + i, s + j)``, then ``c = s + max(gh, gw)``;
  - the frames of one ``Video`` share the start ``s`` (Qwen2.5-VL: one video is one group of
    ``frames x gh x gw`` tokens): frame ``k`` has time ``s + floor(k * time_interval)``
    (float32, ``tokens_per_second * second_per_grid_ts`` in transformers), and the cursor moves
    to ``s + max(gh, gw)`` once, after frame 0 (context tokens after a frame still take text
    positions from the cursor). Qwen3-VL instead writes a timestamp before every frame and
    gives each frame time ``s``: a Qwen3-VL video is one ``Video(1, gh, gw)`` (or ``Image``)
    per frame with its ``Text`` between them;
  - a generated text span starts at ``max(c, largest position so far + 1)``, as transformers'
    generation continues after the prompt (``rope_deltas``; the same as ``c`` unless a video's
    time positions run past the text after it).
Causality stays by ``position`` (storage order); the triples only rotate q and k. PAD slots
hold (0, 0, 0).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence, Union

import jax
import numpy as np

# Token kinds (values of TokenLayout.kind).
TEXT = 0
PATCH = 1
CTX = 2
PAD = 3


@dataclasses.dataclass(frozen=True)
class Text:
  """``length`` text tokens. ``generated`` marks tokens produced by the model (answer tokens
  under teacher forcing, decode tokens); ``route_prompt=False`` routes only those."""
  length: int
  generated: bool = False


@dataclasses.dataclass(frozen=True)
class Image:
  """One image whose patches form a ``gh x gw`` grid.

  ``newline_rows``: a TEXT slot after each row of patches (the module docstring).
  ``tiles``: None for an image read from one frame; ``(th, tw)`` for a grid cut from ``th x tw``
  tiles (one frame id each; the module docstring).
  """
  gh: int
  gw: int
  newline_rows: bool = False
  tiles: Optional[tuple[int, int]] = None


@dataclasses.dataclass(frozen=True)
class Video:
  """``frames`` frames, each a ``gh x gw`` grid (each frame is one grid, docs/method.md step 11).
  ``time_interval``: the M-RoPE time step between frames (Qwen2.5-VL:
  ``tokens_per_second * second_per_grid_ts``; the module docstring); unused without M-RoPE."""
  frames: int
  gh: int
  gw: int
  time_interval: float = 1.0


Segment = Union[Text, Image, Video]


def _whole(name: str, value, low: int) -> int:
  """``value`` as a Python int >= ``low``; a float, string or bool is refused (a static shape
  must be a whole number, and 2.7 or "64" are mistakes, not sizes)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
  if value < low:
    raise ValueError(f"{name} must be >= {low}, got {value}")
  return int(value)


@dataclasses.dataclass(frozen=True)
class LayoutSpec:
  """Static shape of a layout: everything here is a compile-time constant.

  Attributes:
    seq_len: S, storage slots per example (text + patches + region padding + ctx + batch pad).
    region_shape: (rh, rw) tokens per gaze region; default 6 x 6 (docs/method.md step 2).
    max_regions: NR, gaze regions per example, summed over all images and frames.
    max_images: F, frame ids per example: images, video frames and the extra tiles of tiled
      images (``Image.tiles``: one frame id per tile).
    num_ctx: N learnable context tokens inserted after every image / frame (default 4).
    max_nonvisual: N_nv, text plus context tokens per example; the decode path gathers this many
      keys instead of all S. Defaults to ``seq_len``.
    mrope: also build the M-RoPE position triples ``rope_position`` (the module docstring).
  """
  seq_len: int
  max_regions: int
  max_images: int
  region_shape: tuple[int, int] = (6, 6)
  num_ctx: int = 4
  max_nonvisual: int | None = None
  mrope: bool = False

  def __post_init__(self):
    if not isinstance(self.mrope, (bool, np.bool_)):
      raise ValueError(f"LayoutSpec.mrope must be a bool, got {self.mrope!r}")
    object.__setattr__(self, "mrope", bool(self.mrope))
    for name, low in (("seq_len", 1), ("max_regions", 1), ("max_images", 1), ("num_ctx", 0)):
      object.__setattr__(self, name, _whole(f"LayoutSpec.{name}", getattr(self, name), low))
    shape = self.region_shape
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__") or len(shape) != 2:
      raise ValueError(f"LayoutSpec.region_shape must be two positive ints, got {shape!r}")
    object.__setattr__(self, "region_shape",
                       tuple(_whole("LayoutSpec.region_shape", x, 1) for x in shape))
    if self.max_nonvisual is None:
      object.__setattr__(self, "max_nonvisual", self.seq_len)
    else:
      nv = _whole("LayoutSpec.max_nonvisual", self.max_nonvisual, 1)
      if nv > self.seq_len:
        raise ValueError(f"LayoutSpec.max_nonvisual must be in [1, seq_len={self.seq_len}], "
                         f"got {nv}")
      object.__setattr__(self, "max_nonvisual", nv)

  @property
  def region_size(self) -> int:
    """R = rh * rw storage slots per region (padding slots included)."""
    return self.region_shape[0] * self.region_shape[1]


_TOKEN_FIELDS = ("kind", "position", "frame", "region", "patch_index", "generated")
_REGION_FIELDS = ("region_valid", "region_frame", "region_first", "region_last",
                  "region_last_pos", "region_row", "region_col")
_FRAME_FIELDS = ("frame_valid", "frame_media", "frame_grid", "frame_tiles")


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """Sequence structure of a batch; a pytree whose leaves are arrays (usable inside jit).

  Per token, ``[B, S]``:
    kind: int32, TEXT / PATCH / CTX / PAD.
    position: int32 RoPE position (dense raster order; PAD slots: 0).
    frame: int32 image/frame id of PATCH and CTX tokens, -1 otherwise.
    region: int32 global region id of PATCH tokens, -1 otherwise.
    patch_index: int32 raster index ``i * gw + j`` of a PATCH token within its frame, the
      ordinal ``0..N-1`` of a CTX token, -1 otherwise; the model gathers patch embeddings with
      (frame, patch_index) and context embeddings with patch_index.
    generated: bool, text produced by the model (see ``Text.generated``).
  Per region, ``[B, NR]``:
    region_valid: bool.
    region_frame: int32 frame id.
    region_first, region_last: int32 first / last storage slot (``last = first + R - 1``).
    region_last_pos: int32 largest position of its tokens (a query at a larger position sees it
      whole, so it is a routing candidate).
    region_row, region_col: int32 coordinates of the region in its frame's region grid.
  Per frame, ``[B, F]``:
    frame_valid: bool; frame_media: int32 index of the Image/Video segment it came from.
    frame_grid: int32 ``[B, F, 2]`` patch grid (gh, gw).
    frame_tiles: int32 ``[B, F, 2]`` (th, tw) of a frame cut from tiles (``Image.tiles``: its
      tiles are the frame ids ``f .. f + th * tw - 1``, row-major); (0, 0) otherwise.
  Per example:
    nonvisual_index: int32 ``[B, N_nv]`` slots of the TEXT and CTX tokens, -1 padded.
  Static: ``spec`` (a LayoutSpec).
  Optional (``spec.mrope``, else None):
    rope_position: int32 ``[B, S, 3]`` M-RoPE (time, height, width) triples (module docstring).
  """
  kind: Any
  position: Any
  frame: Any
  region: Any
  patch_index: Any
  generated: Any
  region_valid: Any
  region_frame: Any
  region_first: Any
  region_last: Any
  region_last_pos: Any
  region_row: Any
  region_col: Any
  frame_valid: Any
  frame_media: Any
  frame_grid: Any
  frame_tiles: Any
  nonvisual_index: Any
  spec: LayoutSpec
  rope_position: Any = None

  @property
  def batch_size(self) -> int:
    return self.kind.shape[0]

  @property
  def seq_len(self) -> int:
    return self.spec.seq_len

  @property
  def max_regions(self) -> int:
    return self.spec.max_regions

  @property
  def region_size(self) -> int:
    return self.spec.region_size

  def for_decoding(self, multiple: int = 128) -> "TokenLayout":
    """This layout with ``nonvisual_index`` cut to the largest count of text and context slots
    in the batch, rounded up to ``multiple`` (at most S), and ``spec.max_nonvisual`` to match:
    a decode step reads these keys besides its selected regions, so it must not read
    ``spec.max_nonvisual`` (S by default) of them. Host side: the layout must be concrete
    (``generate`` does this once per call). Raises ValueError for a traced layout."""
    try:
      index = np.asarray(self.nonvisual_index)
    except jax.errors.TracerArrayConversionError:
      raise ValueError("for_decoding needs a concrete (host) layout") from None
    count = int((index >= 0).sum(axis=1).max(initial=0))
    n = min(self.seq_len, max(1, -(-count // multiple) * multiple))
    if n == index.shape[1]:
      return self
    spec = dataclasses.replace(self.spec, max_nonvisual=n)
    return dataclasses.replace(self, nonvisual_index=index[:, :n], spec=spec)

  def to_features(self) -> dict[str, Any]:
    """The arrays as a flat dict (for input pipelines: one example's rows batch by stacking);
    ``rope_position`` only when the layout has it (``spec.mrope``)."""
    out = {name: getattr(self, name) for name in LAYOUT_FIELDS}
    if self.rope_position is not None:
      out["rope_position"] = self.rope_position
    return out

  @classmethod
  def from_features(cls, features: dict[str, Any], spec: LayoutSpec) -> "TokenLayout":
    """Inverse of ``to_features``; extra keys in ``features`` are ignored (``rope_position``
    too unless ``spec.mrope``)."""
    names = LAYOUT_FIELDS + (("rope_position",) if spec.mrope else ())
    missing = [n for n in names if n not in features]
    if missing:
      raise ValueError(f"layout features are missing {missing}")
    return cls(spec=spec, **{n: features[n] for n in names})


LAYOUT_FIELDS = _TOKEN_FIELDS + _REGION_FIELDS + _FRAME_FIELDS + ("nonvisual_index",)

jax.tree_util.register_dataclass(
    TokenLayout,
    data_fields=list(LAYOUT_FIELDS) + ["rope_position"],
    meta_fields=["spec"],
)


def region_major_order(gh: int, gw: int, rh: int, rw: int) -> np.ndarray:
  """Raster patch index stored at each slot of a region-major grid.

  Returns int32 ``[n_regions, rh * rw]`` with ``n_regions = ceil(gh / rh) * ceil(gw / rw)``
  (regions in raster order of the region grid, tokens in raster order inside a region);
  -1 marks a padding slot where the grid does not fill the region.
  """
  nrh, nrw = -(-gh // rh), -(-gw // rw)
  i = np.arange(nrh)[:, None, None, None] * rh + np.arange(rh)[None, None, :, None]
  j = np.arange(nrw)[None, :, None, None] * rw + np.arange(rw)[None, None, None, :]
  i, j = np.broadcast_arrays(i, j)                     # [nrh, nrw, rh, rw]
  idx = np.where((i < gh) & (j < gw), i * gw + j, -1)
  return idx.reshape(nrh * nrw, rh * rw).astype(np.int32)


def _check_count(value, field: str, where: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{where}: {field} must be an int, got {value!r}")
  if value < minimum:
    raise ValueError(f"{where}: {field} must be >= {minimum}, got {value}")
  return int(value)


@dataclasses.dataclass(frozen=True)
class _Frame:
  """One grid of a visual segment, validated: its size, newline rows and tiles (``(0, 0)``:
  none)."""
  gh: int
  gw: int
  newline_rows: bool = False
  tiles: tuple[int, int] = (0, 0)

  @property
  def frame_ids(self) -> int:
    """Frame ids it takes: one per tile, or one."""
    return max(1, self.tiles[0] * self.tiles[1])

  def positions(self, raster: np.ndarray) -> np.ndarray:
    """Position offsets (from the grid's first position) of raster patch indices: a newline
    row adds one position per row."""
    if not self.newline_rows:
      return raster
    return raster // self.gw * (self.gw + 1) + raster % self.gw

  @property
  def num_positions(self) -> int:
    return self.gh * (self.gw + self.newline_rows)


def _frames_of(seg: Segment, where: str, spec: LayoutSpec) -> list[_Frame]:
  """Validated list of the grids that a visual segment contributes."""
  newline, tiles = False, (0, 0)
  if isinstance(seg, Image):
    n = 1
    if not isinstance(seg.newline_rows, (bool, np.bool_)):
      raise ValueError(f"{where}: newline_rows must be a bool, got {seg.newline_rows!r}")
    newline = bool(seg.newline_rows)
    if seg.tiles is not None:
      if isinstance(seg.tiles, (str, bytes)) or not hasattr(seg.tiles, "__len__") or \
          len(seg.tiles) != 2:
        raise ValueError(f"{where}: tiles must be None or two ints (th, tw), got {seg.tiles!r}")
      tiles = tuple(_check_count(t, "tiles", where, 1) for t in seg.tiles)
  else:
    n = _check_count(seg.frames, "frames", where, 1)
  gh = _check_count(seg.gh, "gh", where, 1)
  gw = _check_count(seg.gw, "gw", where, 1)
  rh, rw = spec.region_shape
  if rh > gh or rw > gw:
    raise ValueError(f"{where}: region_shape {spec.region_shape} is larger than the grid "
                     f"({gh}, {gw})")
  return [_Frame(gh, gw, newline, tiles)] * n


def _time_interval(seg: Segment, where: str) -> float:
  """The M-RoPE time step between the frames of a Video (1.0 for an Image)."""
  if isinstance(seg, Image):
    return 1.0
  v = seg.time_interval
  if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
      or not np.isfinite(v) or v < 0:
    raise ValueError(f"{where}: time_interval must be a number >= 0, got {v!r}")
  return float(v)


class _ExampleWriter:
  """Fills one example's rows of the layout arrays, segment by segment."""

  def __init__(self, arrays: dict[str, np.ndarray], b: int, spec: LayoutSpec, ex_where: str):
    self.a, self.b, self.spec, self.where = arrays, b, spec, ex_where
    self.slot = 0      # next storage slot
    self.pos = 0       # next RoPE position
    self.n_frames = 0
    self.n_regions = 0
    self.nonvisual: list[int] = []
    self.mpos = 0      # next M-RoPE text position (the cursor of the module docstring)
    self.mmax = -1     # largest M-RoPE position so far

  def _mrope(self, slots, triples: np.ndarray) -> None:
    """Writes M-RoPE triples ``[n, 3]`` at ``slots`` (when the layout has them)."""
    if "rope_position" in self.a and len(triples):
      self.a["rope_position"][self.b, slots] = triples
      self.mmax = max(self.mmax, int(triples.max()))

  def _mrope_text(self, slots, n: int, start: Optional[int] = None) -> None:
    """Text triples ``(c, c, c)`` for ``n`` slots from the cursor (or ``start``)."""
    c = self.mpos if start is None else start
    self._mrope(slots, np.repeat((c + np.arange(n))[:, None], 3, axis=1))
    self.mpos = c + n

  def _reserve(self, n: int, what: str) -> slice:
    if self.slot + n > self.spec.seq_len:
      raise ValueError(f"{self.where}: sequence longer than seq_len={self.spec.seq_len} "
                       f"(needs at least {self.slot + n} slots at {what})")
    s = slice(self.slot, self.slot + n)
    self.slot += n
    return s

  def text(self, seg: Text, where: str):
    n = _check_count(seg.length, "length", where, 0)
    s = self._reserve(n, where)
    a, b = self.a, self.b
    a["kind"][b, s] = TEXT
    a["position"][b, s] = self.pos + np.arange(n)
    a["generated"][b, s] = bool(seg.generated)
    self.nonvisual.extend(range(s.start, s.stop))
    self.pos += n
    # Generation continues after the largest prompt position (transformers' rope_deltas).
    self._mrope_text(s, n, max(self.mpos, self.mmax + 1) if seg.generated else None)

  def frame(self, fr: _Frame, media: int, where: str, mrope: tuple[int, int, float] = None):
    """Writes one grid (and its newline rows and context tokens). ``mrope``: (start ``s`` of
    its media, frame index ``k`` in the media, time interval), for the M-RoPE triples."""
    spec, a, b = self.spec, self.a, self.b
    rh, rw = spec.region_shape
    gh, gw = fr.gh, fr.gw
    f = self.n_frames
    if f + fr.frame_ids > spec.max_images:
      raise ValueError(f"{where}: more than max_images={spec.max_images} images/frames"
                       + (f" (a tiled image takes {fr.frame_ids}, one per tile)"
                          if fr.frame_ids > 1 else ""))
    order = region_major_order(gh, gw, rh, rw)              # [nr, R]
    nr = order.shape[0]
    if self.n_regions + nr > spec.max_regions:
      raise ValueError(f"{where}: more than max_regions={spec.max_regions} regions "
                       f"(needs {self.n_regions + nr})")
    s = self._reserve(order.size, where)
    flat = order.reshape(-1)
    real = flat >= 0
    pos = self.pos + fr.positions(np.maximum(flat, 0))
    region_ids = self.n_regions + np.repeat(np.arange(nr), spec.region_size)
    slots = np.arange(s.start, s.stop)
    a["kind"][b, s] = np.where(real, PATCH, PAD)
    a["position"][b, s] = np.where(real, pos, 0)
    a["frame"][b, s] = np.where(real, f, -1)
    a["region"][b, s] = np.where(real, region_ids, -1)
    a["patch_index"][b, s] = flat
    r = slice(self.n_regions, self.n_regions + nr)
    a["region_valid"][b, r] = True
    a["region_frame"][b, r] = f
    a["region_first"][b, r] = slots[::spec.region_size]
    a["region_last"][b, r] = slots[::spec.region_size] + spec.region_size - 1
    a["region_last_pos"][b, r] = np.where(real, pos, -1).reshape(nr, -1).max(axis=1)
    nrw = -(-gw // rw)
    a["region_row"][b, r] = np.arange(nr) // nrw
    a["region_col"][b, r] = np.arange(nr) % nrw
    a["frame_valid"][b, f] = True
    a["frame_media"][b, f:f + fr.frame_ids] = media
    a["frame_grid"][b, f] = (gh, gw)
    a["frame_tiles"][b, f] = fr.tiles
    s0, k, interval = mrope if mrope is not None else (self.mpos, 0, 1.0)
    raster = np.maximum(flat, 0)
    t = s0 + int(np.float32(k) * np.float32(interval))     # float32 and truncated, as torch
    self._mrope(slots[real], np.stack([np.full(raster.shape, t), s0 + raster // gw,
                                       s0 + raster % gw], axis=1)[real])
    if k == 0:
      self.mpos = s0 + max(gh, gw)
    if fr.newline_rows:
      # One text slot after each row of patches (the module docstring).
      n = self._reserve(gh, where + " newline rows")
      a["kind"][b, n] = TEXT
      a["position"][b, n] = self.pos + np.arange(gh) * (gw + 1) + gw
      a["frame"][b, n] = f                # marks them as the image's (they do not route)
      self.nonvisual.extend(range(n.start, n.stop))
      self._mrope_text(n, gh)
    self.pos += fr.num_positions
    self.n_regions += nr
    self.n_frames += fr.frame_ids
    # Context tokens after every image / frame (docs/method.md step 9).
    c = self._reserve(spec.num_ctx, where + " context tokens")
    a["kind"][b, c] = CTX
    a["position"][b, c] = self.pos + np.arange(spec.num_ctx)
    a["frame"][b, c] = f
    a["patch_index"][b, c] = np.arange(spec.num_ctx)
    self.nonvisual.extend(range(c.start, c.stop))
    self.pos += spec.num_ctx
    self._mrope_text(c, spec.num_ctx)


def build_layout(examples: Sequence[Sequence[Segment]], spec: LayoutSpec) -> TokenLayout:
  """Builds a TokenLayout (numpy arrays, host side) for a batch of example descriptions.

  Args:
    examples: B lists of segments, e.g. ``[[Text(5), Image(24, 24), Text(12, generated=True)]]``.
    spec: static maxima and region shape.
  Returns:
    TokenLayout with per-token arrays ``[B, S]``; slots after the last segment are PAD.
  Raises:
    ValueError naming the example, segment and field for any bad structure.
  """
  if isinstance(examples, (Text, Image, Video)) or not isinstance(examples, Sequence):
    raise ValueError("examples must be a list (batch) of lists of segments")
  if len(examples) == 0:
    raise ValueError("examples must hold at least one example")
  B, S, NR, F = len(examples), spec.seq_len, spec.max_regions, spec.max_images
  i32 = np.int32
  arrays = {
      "kind": np.full((B, S), PAD, i32), "position": np.zeros((B, S), i32),
      "frame": np.full((B, S), -1, i32), "region": np.full((B, S), -1, i32),
      "patch_index": np.full((B, S), -1, i32), "generated": np.zeros((B, S), bool),
      "region_valid": np.zeros((B, NR), bool), "region_frame": np.full((B, NR), -1, i32),
      "region_first": np.zeros((B, NR), i32), "region_last": np.zeros((B, NR), i32),
      "region_last_pos": np.zeros((B, NR), i32), "region_row": np.full((B, NR), -1, i32),
      "region_col": np.full((B, NR), -1, i32), "frame_valid": np.zeros((B, F), bool),
      "frame_media": np.full((B, F), -1, i32), "frame_grid": np.zeros((B, F, 2), i32),
      "frame_tiles": np.zeros((B, F, 2), i32),
      "nonvisual_index": np.full((B, spec.max_nonvisual), -1, i32),
  }
  if spec.mrope:
    arrays["rope_position"] = np.zeros((B, S, 3), i32)
  for b, segments in enumerate(examples):
    ex_where = f"example {b}"
    if isinstance(segments, (Text, Image, Video)) or not isinstance(segments, Sequence):
      raise ValueError(f"{ex_where}: expected a list of segments, got {type(segments).__name__}")
    w = _ExampleWriter(arrays, b, spec, ex_where)
    media = 0
    for si, seg in enumerate(segments):
      where = f"{ex_where}, segment {si} ({type(seg).__name__})"
      if isinstance(seg, Text):
        w.text(seg, where)
      elif isinstance(seg, (Image, Video)):
        start, interval = w.mpos, _time_interval(seg, where)
        for k, fr in enumerate(_frames_of(seg, where, spec)):
          w.frame(fr, media, where, (start, k, interval))
        media += 1
      else:
        raise ValueError(f"{where}: unknown segment type {type(seg).__name__}; "
                         "use Text, Image or Video")
    if len(w.nonvisual) > spec.max_nonvisual:
      raise ValueError(f"{ex_where}: {len(w.nonvisual)} text and context tokens exceed "
                       f"max_nonvisual={spec.max_nonvisual}")
    arrays["nonvisual_index"][b, :len(w.nonvisual)] = w.nonvisual
  return TokenLayout(spec=spec, **arrays)


def num_regions(gh: int, gw: int, region_shape: tuple[int, int]) -> int:
  """Regions of one ``gh x gw`` grid, padding included: ``ceil(gh/rh) * ceil(gw/rw)``."""
  rh, rw = region_shape
  return math.ceil(gh / rh) * math.ceil(gw / rw)


def slots_needed(segments: Sequence[Segment], spec: LayoutSpec) -> int:
  """Storage slots one example needs (handy to choose ``seq_len``)."""
  n = 0
  for seg in segments:
    if isinstance(seg, Text):
      n += seg.length
    else:
      frames = 1 if isinstance(seg, Image) else seg.frames
      newline = seg.gh if isinstance(seg, Image) and seg.newline_rows else 0
      n += frames * (num_regions(seg.gh, seg.gw, spec.region_shape) * spec.region_size
                     + newline + spec.num_ctx)
  return n


def frames_needed(segments: Sequence[Segment]) -> int:
  """Frame ids one example needs (``max_images``): one per image (one per tile of a tiled
  image) and one per video frame."""
  n = 0
  for seg in segments:
    if isinstance(seg, Image):
      n += seg.tiles[0] * seg.tiles[1] if seg.tiles is not None else 1
    elif isinstance(seg, Video):
      n += seg.frames
  return n

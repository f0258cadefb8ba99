"""Layout surgery for the baselines and for generation, on host numpy arrays.

* ``example_segments`` reads an example's segment list (``Text`` / ``Image`` / ``Video``) back
  from a TokenLayout, so that a variant of the same sequence can be rebuilt with
  ``build_layout`` (other grid sizes, or the prompt alone).
* ``relayout`` moves a batch's text tokens into a new layout (text in the same order) and
  recomputes the next-token targets and the answer mask.
* ``question_anchor_rows`` finds, for every answer slot, the last prompt row before its answer
  (the row where the fixed-from-question baseline chooses its regions).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import numpy as np

from gaze_jax.data.features import ModelInputs, next_token_targets
from gaze_jax.gaze.layout import (PATCH, TEXT, Image, LayoutSpec, Segment, Text, TokenLayout,
                                  Video, build_layout, num_regions, slots_needed)


def _np(x) -> np.ndarray:
  return np.asarray(x)


def example_segments(layout: TokenLayout, b: int) -> list[Segment]:
  """Segments of example ``b`` such that ``build_layout`` reproduces its rows.

  Frames of one media (``frame_media``) become one ``Video`` when there are several, an
  ``Image`` otherwise (a one-frame video gives the same layout as an image of its grid). An
  image keeps its tiles (``frame_tiles``) and its newline rows (text slots with its frame id).
  With M-RoPE triples (``rope_position``), a video keeps its time step (``Video.time_interval``,
  ``video_time_interval``), so that the rebuilt layout has the same triples.
  """
  kind, gen, frame = _np(layout.kind)[b], _np(layout.generated)[b].astype(bool), \
      _np(layout.frame)[b]
  valid = _np(layout.frame_valid)[b].astype(bool)
  newline = (kind == TEXT) & (frame >= 0)
  rows = {f: bool((newline & (frame == f)).any()) for f in np.flatnonzero(valid)}
  events = []                                     # (first slot, segment or frame id)
  text = np.flatnonzero((kind == TEXT) & ~newline)
  if text.size:
    # A new text run starts where slots are not consecutive or the generated flag flips.
    starts = np.flatnonzero(np.r_[True, (np.diff(text) != 1) | (gen[text][1:] != gen[text][:-1])])
    ends = np.r_[starts[1:], text.size]
    for s, e in zip(starts, ends):
      events.append((int(text[s]), Text(int(e - s), bool(gen[text[s]]))))
  for f in np.flatnonzero(valid):
    slots = np.flatnonzero((frame == f) & (kind == PATCH))
    events.append((int(slots.min()), int(f)))
  events.sort(key=lambda e: e[0])
  media, grid = _np(layout.frame_media)[b], _np(layout.frame_grid)[b]
  tiles = _np(layout.frame_tiles)[b]
  rope = None if layout.rope_position is None else _np(layout.rope_position)[b]
  segs: list[Segment] = []
  run: list[int] = []

  def flush():
    if run:
      f = run[0]
      gh, gw = (int(x) for x in grid[f])
      if len(run) == 1:
        segs.append(Image(gh, gw, newline_rows=rows[f],
                          tiles=tuple(int(x) for x in tiles[f]) if tiles[f].any() else None))
      else:
        interval = 1.0
        if rope is not None:
          times = [int(rope[(frame == g) & (kind == PATCH), 0].min()) for g in run]
          interval = video_time_interval([t - times[0] for t in times])
        segs.append(Video(len(run), gh, gw, time_interval=interval))
      run.clear()

  for _, e in events:
    if isinstance(e, Text):
      flush()
      segs.append(e)
    else:
      if run and media[e] != media[run[0]]:
        flush()
      run.append(e)
  flush()
  return segs


def video_time_interval(steps: Sequence[int]) -> float:
  """A ``Video.time_interval`` that gives frame ``k`` the M-RoPE time offset ``steps[k]``
  (``steps[0] = 0``), as ``build_layout`` computes it: ``int(float32(k) * float32(interval))``.

  The offsets of a video fix its interval only up to an interval of values; the middle of
  that interval is taken (the rebuilt triples are the same). Raises ValueError when no interval
  gives these offsets."""
  steps = [int(s) for s in steps]
  f32 = np.float32
  ok = lambda v: all(int(f32(k) * f32(v)) == s for k, s in enumerate(steps))
  if len(steps) < 2:
    return 1.0
  lo = max(s / k for k, s in enumerate(steps) if k)
  hi = min((s + 1) / k for k, s in enumerate(steps) if k)
  for v in ((lo + hi) / 2, lo, float(np.nextafter(f32(lo), f32(np.inf)))):
    if lo <= v < hi and ok(v):
      return float(v)
  raise ValueError(f"no time_interval gives the video frames the M-RoPE time steps {steps}")


def text_tokens(tokens, layout: TokenLayout, b: int) -> np.ndarray:
  """Text token ids of example ``b`` in sequence order."""
  return _np(tokens)[b][_np(layout.kind)[b] == TEXT]


def relayout(inputs: ModelInputs, segments: Sequence[Sequence[Segment]], spec: LayoutSpec,
             images=None) -> ModelInputs:
  """The batch's text placed into the layout of ``segments`` (one list per example).

  Text tokens keep their order; a shorter new text (a prompt alone) takes the leading ones, a
  longer one is padded with 0. Targets and the answer mask are recomputed from the new layout
  (next token by position). ``images`` replaces the batch's images when given; ``gt_regions``
  are dropped (-1): region ids of another grid would not mean the same regions.
  """
  layout = build_layout(list(segments), spec)
  B, S = spec_shape = _np(layout.kind).shape
  tokens = np.zeros(spec_shape, np.int32)
  targets = np.zeros(spec_shape, np.int32)
  loss_mask = np.zeros(spec_shape, np.float32)
  kind = _np(layout.kind)
  for b in range(B):
    old = text_tokens(inputs.tokens, inputs.layout, b)
    slots = np.flatnonzero(kind[b] == TEXT)
    n = min(len(old), len(slots))
    tokens[b, slots[:n]] = old[:n]
    targets[b], loss_mask[b] = next_token_targets(tokens[b], kind[b], _np(layout.position)[b],
                                                  _np(layout.generated)[b])
  gt = np.full_like(_np(inputs.gt_regions), -1)
  return ModelInputs(tokens, inputs.images if images is None else images, layout, targets,
                     loss_mask, gt)


# ------------------------------------------------------------------ token-matched dense


@dataclasses.dataclass(frozen=True)
class TokenMatch:
  """The downsampled input of the token-matched dense baseline.

  grid: (gh', gw') full-image patch grid after downsampling (video frames use it pooled).
  image_hw: (H', W') = grid * patch_size pixels.
  visual_tokens: mean patch tokens per example at that grid.
  target_tokens: mean gaze budget ``K * region_size`` it was matched to.
  """
  grid: tuple[int, int]
  image_hw: tuple[int, int]
  visual_tokens: float
  target_tokens: float


def _new_grid(g: tuple[int, int], full: tuple[int, int], pooled: tuple[int, int],
              new_full: tuple[int, int], pool: int, where: str) -> tuple[int, int]:
  if g == full:
    return new_full
  if g == pooled:
    return (new_full[0] // pool, new_full[1] // pool)
  raise ValueError(f"{where}: frame grid {g} is neither the full grid {full} nor the pooled "
                   f"grid {pooled} of the images")


def _tokens_at(layout: TokenLayout, full, pooled, new_full, pool) -> np.ndarray:
  """Patch tokens per example if the full grid became ``new_full``: int ``[B]``."""
  valid, grid = _np(layout.frame_valid).astype(bool), _np(layout.frame_grid)
  out = np.zeros(valid.shape[0], np.int64)
  for b, f in zip(*np.nonzero(valid)):
    gh, gw = _new_grid(tuple(int(x) for x in grid[b, f]), full, pooled, new_full, pool,
                       f"example {b}, frame {f}")
    out[b] += gh * gw
  return out


def match_tokens(layout: TokenLayout, *, image_hw: tuple[int, int], patch_size: int,
                 video_pool: int, target_tokens, grid: Optional[int] = None) -> TokenMatch:
  """Chooses the downsampled grid of the token-matched dense baseline.

  The rule: the dense model should read about as many patch tokens as a gaze query reads from
  its selected regions, ``target = K * region_size`` (context tokens stay in both sequences and
  cancel out). The image side is scaled by one factor for the whole batch: the new full grid
  height ``gh'`` runs over ``1..gh`` (width ``round(gw * gh' / gh)``, video frames pooled by
  ``video_pool`` as before) and the one with the smallest mean relative error
  ``|tokens(gh') - target| / target`` over the examples with images wins (ties: the larger
  grid; with video frames in the batch ``gh'`` steps by ``video_pool``, so pooling crops
  nothing). For square 24 x 24 images, K = 4 and 6 x 6 regions (target 144) that is 12 x 12: half
  the side, a quarter of the tokens. ``grid`` forces ``gh'`` instead.

  Args:
    layout: the batch's layout (full-size grids and pooled video grids).
    image_hw: (H, W) of the batch's images; patch_size, video_pool: the vision tower's.
    target_tokens: int or int ``[B]`` gaze budget per example.
    grid: optional forced new grid height.
  """
  H, W = image_hw
  full = (H // patch_size, W // patch_size)
  pool = max(1, int(video_pool))
  pooled = (full[0] // pool, full[1] // pool)
  has = _np(layout.frame_valid).astype(bool).any(1)
  target = np.broadcast_to(np.asarray(target_tokens, np.float64), has.shape)
  if not has.any():
    raise ValueError("the batch has no images: the token-matched baseline needs some")
  videos = (_np(layout.frame_grid)[_np(layout.frame_valid).astype(bool)] != full).any(-1).any()
  lo = pool if videos else 1                      # pooled frames need gh' >= pool

  def width(gh):
    return max(lo if videos else 1, int(round(full[1] * gh / full[0])))

  if grid is not None:
    if not lo <= int(grid) <= full[0]:
      raise ValueError(f"token_matched grid={grid} must be in [{lo}, {full[0]}]")
    choices = [int(grid)]
  else:
    # With video frames only multiples of the pool size: the pooling would crop the rest.
    choices = list(range(lo, full[0] + 1, pool if videos else 1))
  best = None
  for gh in choices:
    tok = _tokens_at(layout, full, pooled, (gh, width(gh)), pool)[has]
    err = float(np.mean(np.abs(tok - target[has]) / np.maximum(target[has], 1)))
    if best is None or err <= best[0]:
      best = (err, gh, float(tok.mean()))
  _, gh, mean_tok = best
  new = (gh, width(gh))
  return TokenMatch(grid=new, image_hw=(new[0] * patch_size, new[1] * patch_size),
                    visual_tokens=mean_tok, target_tokens=float(target[has].mean()))


def token_matched_segments(layout: TokenLayout, match: TokenMatch, *, image_hw, patch_size: int,
                           video_pool: int) -> list[list[Segment]]:
  """Every example's segments with images / frames at the matched grid."""
  H, W = image_hw
  full = (H // patch_size, W // patch_size)
  pool = max(1, int(video_pool))
  pooled = (full[0] // pool, full[1] // pool)
  out = []
  for b in range(_np(layout.kind).shape[0]):
    segs = []
    for s in example_segments(layout, b):
      if isinstance(s, Text):
        segs.append(s)
        continue
      gh, gw = _new_grid((s.gh, s.gw), full, pooled, match.grid, pool, f"example {b}")
      segs.append(Image(gh, gw) if isinstance(s, Image) else Video(s.frames, gh, gw))
    out.append(segs)
  return out


def resize_images(images, image_hw: tuple[int, int]) -> np.ndarray:
  """``[B, F, H, W, C]`` -> ``[B, F, H', W', C]`` with antialiased linear resampling (area-like
  averaging when downsampling)."""
  images = np.asarray(images, np.float32)
  B, F, _, _, C = images.shape
  out = jax.image.resize(images, (B, F, int(image_hw[0]), int(image_hw[1]), C), "linear",
                         antialias=True)
  return np.asarray(out, np.float32)


def spec_for(segments: Sequence[Sequence[Segment]], base: LayoutSpec, *,
             seq_len: Optional[int] = None) -> LayoutSpec:
  """A LayoutSpec for ``segments`` derived from ``base``: the region shape clipped to the
  smallest grid (a dense model ignores regions, but ``build_layout`` needs them to fit), and
  at least the regions, slots (``seq_len`` or ``base.seq_len``) and text + context tokens that
  every example needs."""
  rs = tuple(base.region_shape)
  grids = [(s.gh, s.gw) for ex in segments for s in ex if not isinstance(s, Text)]
  if grids:
    rs = (min(rs[0], min(g[0] for g in grids)), min(rs[1], min(g[1] for g in grids)))
  need_regions, need_nonvisual = 1, 1
  for ex in segments:
    frames = [(1 if isinstance(s, Image) else s.frames, s) for s in ex if not isinstance(s, Text)]
    need_regions = max(need_regions, sum(n * num_regions(s.gh, s.gw, rs) for n, s in frames))
    need_nonvisual = max(need_nonvisual, sum(s.length for s in ex if isinstance(s, Text))
                         + base.num_ctx * sum(n for n, _ in frames))
  probe = LayoutSpec(seq_len=1, max_regions=1, max_images=1, region_shape=rs,
                     num_ctx=base.num_ctx)
  S = max([seq_len or base.seq_len] + [slots_needed(ex, probe) for ex in segments])
  return LayoutSpec(seq_len=S, max_regions=need_regions, max_images=base.max_images,
                    region_shape=rs, num_ctx=base.num_ctx,
                    max_nonvisual=min(S, max(base.max_nonvisual, need_nonvisual)),
                    mrope=base.mrope)


# ------------------------------------------------------------------ prompts and anchors


def question_anchor_rows(layout: TokenLayout) -> np.ndarray:
  """For every slot, the row whose routing the fixed-from-question baseline uses: int
  ``[B, S]``.

  Slots of a generated (answer) span map to the last non-generated text slot before the span
  (the last prompt row: it produces the answer's first token and sees the whole question);
  every other slot maps to itself. Text slots are in position order, so "before" is by slot.
  A span with no prompt text before it keeps its own rows.
  """
  kind, gen = _np(layout.kind), _np(layout.generated).astype(bool)
  B, S = kind.shape
  out = np.broadcast_to(np.arange(S), (B, S)).copy()
  for b in range(B):
    anchor = -1
    for s in range(S):
      if kind[b, s] != TEXT:
        continue
      if not gen[b, s]:
        anchor = s
      elif anchor >= 0:
        out[b, s] = anchor
  return out


def prompt_segments(segments: Sequence[Segment], max_new_tokens: int) -> list[Segment]:
  """The segments before the first generated Text, then ``Text(max_new_tokens, generated=True)``
  (the reserved span ``generate`` fills)."""
  out = []
  for s in segments:
    if isinstance(s, Text) and s.generated:
      break
    out.append(s)
  return out + [Text(int(max_new_tokens), generated=True)]

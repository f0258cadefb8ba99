"""Seeded random layouts and tensors for the gaze tests."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from gaze_jax.gaze import (Image, LayoutSpec, Text, Video, build_layout, frames_needed, num_regions,
                           slots_needed)

REGION_SHAPES = [(1, 1), (2, 2), (2, 3), (3, 2), (3, 3)]


def random_example(rng: np.random.Generator, region_shape, *, max_visual: int = 3,
                   allow_video: bool = True, force_video: bool = False,
                   newline_rows: bool = False):
  """Text, 1..max_visual images/videos (grids not always divisible), a generated answer;
  ``newline_rows`` gives every image a text slot after each row of patches (the draws are
  the same either way)."""
  rh, rw = region_shape
  segs = [Text(int(rng.integers(0, 4)))]
  for i in range(int(rng.integers(1, max_visual + 1))):
    gh = int(rng.integers(rh, 2 * rh + 2))
    gw = int(rng.integers(rw, 2 * rw + 2))
    if (force_video and i == 0) or (allow_video and rng.random() < 0.3):
      segs.append(Video(int(rng.integers(2, 4)), gh, gw))
    else:
      segs.append(Image(gh, gw, newline_rows=newline_rows))
    if rng.random() < 0.6:
      segs.append(Text(int(rng.integers(1, 4))))
  segs.append(Text(int(rng.integers(1, 4)), generated=True))
  return segs


def _regions(segs, region_shape):
  n = 0
  for s in segs:
    if isinstance(s, Image):
      n += num_regions(s.gh, s.gw, region_shape)
    elif isinstance(s, Video):
      n += s.frames * num_regions(s.gh, s.gw, region_shape)
  return n


def _frames(segs):
  return frames_needed(segs)


def spec_for(examples, region_shape, num_ctx, rng=None, slack: int = 0) -> LayoutSpec:
  probe = LayoutSpec(seq_len=1, max_regions=1, max_images=1, region_shape=region_shape,
                     num_ctx=num_ctx)
  extra = lambda: int(rng.integers(0, slack + 1)) if rng is not None else slack
  return LayoutSpec(
      seq_len=max(slots_needed(e, probe) for e in examples) + extra(),
      max_regions=max(_regions(e, region_shape) for e in examples) + extra(),
      max_images=max(_frames(e) for e in examples) + extra(),
      region_shape=region_shape, num_ctx=num_ctx)


@dataclasses.dataclass
class Case:
  layout: object
  examples: list
  q: jax.Array
  k: jax.Array
  v: jax.Array
  q_route: jax.Array
  k_route: jax.Array
  top_k: int
  score: str
  routing: str
  route_prompt: bool


def random_case(seed: int, *, batch: int = 2, head_dim: int = 8, group=None, kv_heads=None,
                separate_route: bool = False, force_video: bool = False, top_k=None,
                score=None, routing=None, newline_rows: bool = False) -> Case:
  """A random batch: layout, q/k/v (and route inputs) and routing options; the keyword
  arguments pin what the caller needs covered, the rest is drawn from ``seed``."""
  rng = np.random.default_rng(seed)
  rs = REGION_SHAPES[int(rng.integers(len(REGION_SHAPES)))]
  num_ctx = int(rng.integers(0, 3))
  examples = [random_example(rng, rs, force_video=force_video and b == 0,
                             newline_rows=newline_rows) for b in range(batch)]
  spec = spec_for(examples, rs, num_ctx, rng, slack=3)
  layout = build_layout(examples, spec)
  G = group if group is not None else int(rng.choice([1, 2, 4, 8]))
  Hkv = kv_heads if kv_heads is not None else int(rng.integers(1, 3))
  Hq, S, D = G * Hkv, spec.seq_len, head_dim
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(keys[0], (batch, S, Hq, D))
  k = jax.random.normal(keys[1], (batch, S, Hkv, D))
  v = jax.random.normal(keys[2], (batch, S, Hkv, D))
  if separate_route:
    q_route = jax.random.normal(keys[3], (batch, S, Hq, D))
    k_route = jax.random.normal(keys[4], (batch, S, Hkv, D))
  else:
    q_route, k_route = q, k
  drawn_k = int(rng.integers(1, spec.max_regions + 1))
  drawn_score = str(rng.choice(["dot", "cosine"]))
  drawn_routing = str(rng.choice(["head", "group"]))
  if top_k == "all":
    top_k = spec.max_regions
  return Case(layout=layout, examples=examples, q=q, k=k, v=v, q_route=q_route,
              k_route=k_route, top_k=drawn_k if top_k is None else top_k,
              score=score or drawn_score, routing=routing or drawn_routing,
              route_prompt=bool(rng.random() < 0.7))

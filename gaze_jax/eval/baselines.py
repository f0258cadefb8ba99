"""Baselines built from the gaze model's own weights (docs/method.md, the paper's baselines).

* ``dense_twin(model)``: the same parameters under ``GazeConfig(attention="dense")``; the context
  tokens stay in the sequence (the twin reads them like any other token).
* ``token_matched_inputs(model, inputs)``: the dense twin's input with images downsampled so that
  a dense query reads about as many patch tokens as a gaze query reads from its K selected
  regions (``layouts.match_tokens`` documents the rule).
* ``fixed_from_question``: KV eviction as HERMES / InfiniPot-V do it, without training: the
  regions are chosen once, at the last prompt row (per layer and query head, by the model's own
  routing), and every answer row attends to those instead of routing again. Two forward passes:
  the first routes, the second runs with the first pass's last-prompt-row regions copied to the
  answer rows through ``MLLM.__call__(selections=...)``.
* ``random_selections``: random routing, the same model with each row's regions drawn at random
  (K distinct causal candidates per row and query head, or per GQA group with group routing;
  a fresh draw per layer), through ``MLLM.__call__(selections=...)``: what the model gets
  from K regions it did not choose.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gaze_jax.data.features import ModelInputs
from gaze_jax.eval import layouts
from gaze_jax.eval.budget import example_top_k
from gaze_jax.gaze.routing import random_selection
from gaze_jax.model.mllm import MLLM


def dense_twin(model):
  """An MLLM with ``model``'s parameters and dense attention (no copy: the arrays are shared).

  The twin's structure comes from ``nnx.eval_shape`` (nothing is initialised) and its state is
  ``model``'s, so for a 4B model no second set of weights is allocated.
  """
  cfg = model.cfg
  dense_cfg = dataclasses.replace(cfg, gaze=dataclasses.replace(cfg.gaze, attention="dense"))
  abstract = nnx.eval_shape(lambda: MLLM(dense_cfg, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract)
  return nnx.merge(graphdef, nnx.state(model))


def gaze_budget_tokens(cfg, layout) -> int:
  """``K * region_size``: the patch tokens of K selected regions (padding slots included).

  With ``top_k_per_example`` K differs between examples while the token-matched batch has one
  grid: K is then the mean over the examples with an image, rounded (at least 1)."""
  ks = example_top_k(cfg, layout)[np.asarray(layout.region_valid).any(axis=-1)]
  k = max(1, round(float(ks.mean()))) if ks.size else 1
  return k * layout.spec.region_size


def token_matched_inputs(model, inputs: ModelInputs, *, grid: Optional[int] = None
                         ) -> tuple[ModelInputs, layouts.TokenMatch]:
  """The batch for the token-matched dense baseline, and the grid it uses.

  Images are resized to ``match.image_hw`` (antialiased linear), and the layout is rebuilt
  with every image (and video frame, pooled as before) at the new grid; text is unchanged.
  The region shape of the new layout is clipped to the smallest grid: the dense model does not
  route, so only the patch count matters.
  """
  vcfg = model.cfg.vision
  if vcfg is None:
    raise ValueError("the token-matched baseline needs a model with a vision tower")
  images = np.asarray(inputs.images)
  hw = images.shape[2:4]
  match = layouts.match_tokens(inputs.layout, image_hw=hw, patch_size=model.cfg.token_pixels,
                               video_pool=vcfg.video_pool,
                               target_tokens=gaze_budget_tokens(model.cfg, inputs.layout),
                               grid=grid)
  segs = layouts.token_matched_segments(inputs.layout, match, image_hw=hw,
                                        patch_size=model.cfg.token_pixels,
                                        video_pool=vcfg.video_pool)
  spec = layouts.spec_for(segs, inputs.layout.spec)
  small = layouts.resize_images(images, match.image_hw)
  return layouts.relayout(inputs, segs, spec, images=small), match


def fixed_selections(selected, anchor_rows):
  """Every row's selection replaced by its anchor row's: per layer ``[B, S, Hq, K]`` ids
  gathered along S with ``anchor_rows`` int ``[B, S]`` (``layouts.question_anchor_rows``)."""
  idx = jnp.asarray(anchor_rows, jnp.int32)[:, :, None, None]
  return [jnp.take_along_axis(s, idx, axis=1) for s in selected]


def routing_layout(layout, anchor_rows, route_prompt: bool):
  """The layout of the first (routing) pass of the fixed-from-question baseline.

  With ``route_prompt=False`` prompt rows do not route, so the anchor rows are marked
  ``generated`` for that pass only, which makes them route (rows before them are unchanged);
  with the default ``route_prompt=True`` this is ``layout`` itself.
  """
  if route_prompt:
    return layout
  gen = np.asarray(layout.generated).astype(bool).copy()
  anchors = np.asarray(anchor_rows)
  for b in range(gen.shape[0]):
    moved = anchors[b] != np.arange(gen.shape[1])
    gen[b, anchors[b][moved]] = True
  return dataclasses.replace(layout, generated=gen)


def random_selections(cfg, layout, key: jax.Array) -> list:
  """Per decoder layer, int32 ``[B, S, Hq, K]`` random region ids for every row of ``layout``
  (``gaze.random_selection`` with the model's K, per example where the model's is, and routing;
  layer l draws with
  ``fold_in(key, l)``). Rows the model does not route ignore them."""
  dec, gz = cfg.decoder, cfg.gaze
  rk = gz.resolve_k(layout.max_regions)
  pos = jnp.asarray(layout.position, jnp.int32)
  every_row = jnp.ones(pos.shape, bool)
  return [random_selection(jax.random.fold_in(key, layer), jnp.asarray(layout.region_valid),
                           jnp.asarray(layout.region_last_pos), pos, every_row,
                           num_heads=dec.num_heads, num_kv_heads=dec.num_kv_heads,
                           top_k=rk.k_max, routing=gz.routing, k_ratio=rk.ratio).ids
          for layer in range(dec.num_layers)]

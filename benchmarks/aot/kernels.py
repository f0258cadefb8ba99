"""The gaze kernels compiled for a target, in the shapes that matter: the Qwen3-4B head layout
(32 query heads, 8 KV heads, head dim 128), 6 x 6 = 36-token regions, 4 context tokens per
image or frame, the default ``KernelConfig`` (only the kernel family and ``interpret=False``
are set).

Cases:
  * ``train``: forward + backward (``value_and_grad``) of one attention layer over 4 images x
    576 patches + 1,024 text tokens, K = 10% of the regions; ``passes="split"`` (the default:
    base and routed passes) and ``"full"``;
  * ``decode``: one new token per example, batch 8, over a 64-frame x 576 video cache
    (36,864 visual tokens), K = 10%: the split-K decode kernel.
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from gaze_jax.gaze import (TEXT, Image, LayoutSpec, Text, Video, build_layout, num_regions,
                           slots_needed)
from pallas_kernels import ops

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
REGION = (6, 6)
NUM_CTX = 4
KEEP = 0.1


def _layout(segments, batch: int):
  probe = LayoutSpec(seq_len=1, max_regions=1, max_images=1, region_shape=REGION,
                     num_ctx=NUM_CTX)
  frames = sum(s.frames if isinstance(s, Video) else 1 for s in segments
               if isinstance(s, (Image, Video)))
  nr = sum((s.frames if isinstance(s, Video) else 1) * num_regions(s.gh, s.gw, REGION)
           for s in segments if isinstance(s, (Image, Video)))
  text = sum(s.length for s in segments if isinstance(s, Text))
  spec = LayoutSpec(seq_len=slots_needed(segments, probe), max_regions=nr, max_images=frames,
                    region_shape=REGION, num_ctx=NUM_CTX, max_nonvisual=text + frames * NUM_CTX)
  return build_layout([segments] * batch, spec)


def train_layout(batch: int = 2):
  """4 images x 576 patches and 1,024 text tokens (the training-step benchmark shape)."""
  segs = [Text(256)]
  for _ in range(4):
    segs += [Image(24, 24), Text(16)]
  segs += [Text(704, generated=True)]
  return _layout(segs, batch)


def decode_layout(batch: int = 8, frames: int = 64):
  """A ``frames`` x 576 video cache with a question and an answer being generated."""
  return _layout([Text(200), Video(frames, 24, 24), Text(60), Text(16, generated=True)], batch)


def _config(kernel: str, **kw) -> ops.KernelConfig:
  return ops.KernelConfig(kernel=kernel, interpret=False, **kw)


def train_case(kernel: str, dtype, passes: str = "split", batch: int = 2, **config):
  """(fn, args) of forward + backward of one attention layer: args are abstract q, k, v and
  the layout's arrays (traced, as in a model); ``config``: more ``KernelConfig`` fields."""
  lay = train_layout(batch)
  cfg = _config(kernel, passes=passes, **config)
  S = lay.seq_len

  def step(q, k, v, layout):
    def loss(q, k, v):
      out = ops.gaze_attention(q, k, v, q, k, layout, top_k=KEEP, config=cfg)
      return jnp.sum(out.astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  return step, _qkv(batch, S, S, dtype) + (lay,), lay


def decode_case(kernel: str, dtype, batch: int = 8, frames: int = 64, **config):
  """(fn, abstract args): one decode step's attention (descriptors cached at prefill)."""
  lay = decode_layout(batch, frames)
  cfg = _config(kernel, **config)
  kind = np.asarray(lay.kind)
  idx = jnp.asarray(np.stack([np.flatnonzero(kind[b] == TEXT)[-16:-15] for b in range(batch)]),
                    jnp.int32)
  S, NR = lay.seq_len, lay.max_regions

  def step(q, k, v, desc, q_index, layout):
    return ops.gaze_attention(q, k, v, q, None, layout, top_k=KEEP, q_index=q_index,
                              descriptors=desc, config=cfg)

  q, k, v = _qkv(batch, 1, S, dtype)
  desc = jax.ShapeDtypeStruct((batch, NR, KV_HEADS, HEAD_DIM), dtype)
  return step, (q, k, v, desc, idx, lay), lay


def _qkv(batch, T, S, dtype):
  return (jax.ShapeDtypeStruct((batch, T, HEADS, HEAD_DIM), dtype),
          jax.ShapeDtypeStruct((batch, S, KV_HEADS, HEAD_DIM), dtype),
          jax.ShapeDtypeStruct((batch, S, KV_HEADS, HEAD_DIM), dtype))


def shapes_note(lay) -> dict:
  return {"batch": int(lay.kind.shape[0]), "slots": int(lay.seq_len),
          "regions": int(lay.max_regions), "frames": int(lay.spec.max_images),
          "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
          "region_tokens": REGION[0] * REGION[1], "keep": KEEP}

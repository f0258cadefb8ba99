"""Budget and FLOP accounting: the one module of these formulas (docs/method.md step 12, the FLOP
figures of the paper, and the train-step FLOPs behind MFU).

"Visual KV entries per query" = ``K * region_size + N * n_frames``; dense = all visual tokens.
FLOPs count a multiply-add as 2: one query head reading one key costs ``2 * D`` for ``q . k``
and ``2 * D`` for ``p * v`` (``attention_flops``).

FLOPs per train step (``train_flops``), the backward pass counted as twice the forward (so
train = 3 x forward):

  forward = 2 * B * S * (L * (E * (Hq + 2 * Hkv) * D + Hq * D * E + 3 * E * F) + E * V)  # decoder
          + B * S * attention_flops(S) / 2           # causal attention: half the keys on average
          + 2 * B * Fr * P * (Lv * (4 * Ev^2 + 2 * Ev * Fv) + Pr)    # ViT + projector
          + B * Fr * P * attention_flops(P) of the ViT      # bidirectional: every patch key

with B the global batch, S the sequence slots, Fr the image/frame slots per example, P the
ViT patches per image and Pr the projector's multiply-adds per patch: ``Ev * E + E * E`` for
``mlp2x_gelu``, ``Ev * E`` for ``pixel_shuffle`` (one ``s^2 Ev x E`` product per ``s^2``
patches). A Qwen-VL tower (``qwen_vision``): P its patches per frame (one temporal group),
``2 * Ev * Fv`` becomes ``3 * Ev * Fv`` for Qwen2.5-VL's gated MLP, and its merger counts
``4 * Ev^2 + Ev * E`` per patch (a ``4 Ev x 4 Ev`` and a ``4 Ev x E`` product per 2 x 2 patches);
Qwen2.5-VL's window layers are counted as full-frame attention (an upper bound).
Attention is counted as dense causal (an upper bound for gaze, whose routed
text rows read fewer keys; patch rows stay dense). Embedding lookups are free.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class KVBudget:
  """Visual KV entries read by one routed query (per head and layer)."""
  gaze_entries: int     # K * region_size + num_ctx * n_frames
  dense_entries: int    # n_frames * tokens_per_frame

  @property
  def fraction(self) -> float:
    """Gaze entries as a fraction of dense (0.163 for the paper's video example)."""
    return self.gaze_entries / self.dense_entries


def visual_kv_budget(*, top_k: int, region_size: int, num_ctx: int, n_frames: int,
                     tokens_per_frame: int) -> KVBudget:
  """KV budget of one query: e.g. 8 frames of 576 tokens, 36-token regions, K=20, N=4 gives
  752 gaze entries against 4608 dense (16.3%)."""
  for name, x in (("top_k", top_k), ("region_size", region_size), ("num_ctx", num_ctx),
                  ("n_frames", n_frames), ("tokens_per_frame", tokens_per_frame)):
    if x < 0:
      raise ValueError(f"{name} must be >= 0, got {x}")
  if n_frames * tokens_per_frame == 0:
    raise ValueError("n_frames * tokens_per_frame must be > 0")
  return KVBudget(gaze_entries=top_k * region_size + num_ctx * n_frames,
                  dense_entries=n_frames * tokens_per_frame)


def attention_flops(entries: int, *, num_heads: int, head_dim: int, num_layers: int) -> int:
  """FLOPs of attention for one decode query over ``entries`` keys, all heads and layers:
  ``4 * entries * Hq * D * L``."""
  return 4 * entries * num_heads * head_dim * num_layers


def train_flops(cfg, *, batch: int, seq_len: int, frames: int, patches: int) -> float:
  """FLOPs of one train step (forward + backward) of an ``MLLMConfig`` by the formula in the
  module docstring."""
  d = cfg.decoder
  E, F, L, V = d.hidden_size, d.intermediate_size, d.num_layers, d.vocab_size
  Hq, Hkv, D = d.num_heads, d.num_kv_heads, d.head_dim
  per_layer = E * (Hq + 2 * Hkv) * D + Hq * D * E + 3 * E * F
  fwd = 2.0 * batch * seq_len * (L * per_layer + E * V)
  fwd += batch * seq_len * attention_flops(seq_len, num_heads=Hq, head_dim=D, num_layers=L) / 2
  q = cfg.qwen_vision
  if (cfg.vision is not None or q is not None) and frames:
    if q is not None:
      Ev, Fv, Lv = q.hidden_size, q.intermediate_size, q.depth
      mlp = 3 if q.family == "qwen2_5_vl" else 2
      proj = 4 * Ev * Ev + Ev * E
    else:
      v = cfg.vision
      Ev, Fv, Lv, mlp = v.hidden_size, v.intermediate_size, v.num_layers, 2
      proj = Ev * E + (E * E if cfg.projector == "mlp2x_gelu" else 0)
    n = batch * frames * patches
    fwd += 2.0 * n * (Lv * (4 * Ev * Ev + mlp * Ev * Fv) + proj)
    # Summed over the ViT's heads, the attention of one patch is that of one head of width Ev.
    fwd += n * attention_flops(patches, num_heads=1, head_dim=Ev, num_layers=Lv)
  return 3.0 * fwd


def routing_flops(n_regions: int, *, num_heads: int, head_dim: int, num_layers: int) -> int:
  """FLOPs of scoring ``n_regions`` descriptors for one query: ``2 * NR * Hq * D * L``
  (the top-K itself is a comparison, not counted)."""
  return 2 * n_regions * num_heads * head_dim * num_layers


def decode_flops(*, top_k: int, region_size: int, num_ctx: int, n_frames: int, n_regions: int,
                 num_heads: int, head_dim: int, num_layers: int) -> dict[str, int]:
  """Per decode query, split as the paper reports it: selected regions, context tokens, routing."""
  dims = dict(num_heads=num_heads, head_dim=head_dim, num_layers=num_layers)
  return {"regions": attention_flops(top_k * region_size, **dims),
          "context": attention_flops(num_ctx * n_frames, **dims),
          "routing": routing_flops(n_regions, **dims)}


def selected_union_size(ids: jax.Array, num_kv_heads: int) -> jax.Array:
  """Distinct regions that the query heads of each GQA group selected: the blocks one KV head
  must read for that query (docs/method.md, Efficiency).

  Args:
    ids: int32 ``[B, T, Hq, K]`` selected ids, -1 = none.
    num_kv_heads: Hkv.
  Returns:
    int32 ``[B, T, Hkv]``.
  """
  B, T, Hq, K = ids.shape
  g = ids.reshape(B, T, num_kv_heads, -1)                             # [B, T, Hkv, G*K]
  s = jnp.sort(g, axis=-1)
  first = jnp.concatenate([jnp.ones_like(s[..., :1], bool), s[..., 1:] != s[..., :-1]], -1)
  return jnp.sum(first & (s >= 0), axis=-1).astype(jnp.int32)

"""Parameter counts and a per-device memory estimate for an ``MLLMConfig``, without building
weights (the model is instantiated abstractly with ``nnx.eval_shape``), and the exact bytes of
the same step from a compile (``compiled_memory``).

CLI (absl flags; prints a table in GiB per device and what would make it fit)::

  python -m gaze_jax.model.memory --preset=cambrian_4b --batch=8 --seq_len=4096 --devices=8
  python -m gaze_jax.model.memory --preset=qwen2_5_7b --batch=16 --seq_len=8192 --devices=8 \\
      --mode=infer --cache_len=9216 --param_bytes=2
  python -m gaze_jax.model.memory --preset=cambrian_4b --batch=8 --seq_len=4096 --devices=8 \\
      --attention_impl=pallas --topk_start=8
  python -m gaze_jax.model.memory --preset=tiny --batch=2 --seq_len=512 --compute_bytes=4 --exact

``--exact`` also compiles the step for the local backend (one device) and prints XLA's buffer
assignment next to the estimate.

Training is estimated at the K the trainer compiles (K_max, the progressive top-K schedule's
start: all regions unless ``config.topk_schedule.start`` says otherwise), not the target K:
the XLA path sizes its gathered region blocks by K_max; the Pallas kernels' working set
depends on the tile, not on K.

The estimate is a planning aid, accurate to tens of percent: XLA fuses, rematerialises and
reuses buffers in ways that a formula cannot follow, and adds its own temporaries. Leave
10-20% headroom, or measure: ``compiled_memory`` (``--exact``) compiles the step on the local
backend, and ``make aot`` compiles for an H100 or a TPU without one (benchmarks/aot).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import sys
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax
from absl import flags
from flax import nnx

from gaze_jax.gaze.layout import Image, Text, Video, num_regions
from gaze_jax.gaze.routing import resolve_k
from gaze_jax.model.abstract import abstract_model
from gaze_jax.model.config import MLLMConfig
from gaze_jax.model.presets import PRESETS, get_preset

GiB = 1 << 30
# "xla": this package's XLA paths (GazeConfig.implementation="xla"); "pallas": its Pallas gaze
# kernels (implementation="pallas"; dense decoder attention and the vision tower stay on XLA);
# "flash": a fused kernel for every attention, the vision tower's included.
ATTENTION_IMPLS = ("xla", "pallas", "flash")
COMPONENTS = ("params", "grads", "optimizer", "gathered_weights", "activations",
              "vision_activations", "logits", "kv_cache", "descriptors")


# ------------------------------------------------------------------ parameter counts

_GROUPS = {"vision": "vision", "projector": "projector", "decoder": "decoder",
           "ctx_embed": "ctx"}


def _param_table(cfg: MLLMConfig) -> dict[str, int]:
  """Parameter counts by group plus the sizes the memory estimate needs: the largest decoder
  layer and vision block (cached per config)."""
  try:
    return dict(_cached_param_table(cfg))
  except TypeError:            # an unhashable config (e.g. a list field): count without cache
    return _count_param_table(cfg)


@functools.lru_cache(maxsize=64)
def _cached_param_table(cfg: MLLMConfig) -> dict[str, int]:
  return _count_param_table(cfg)


def _count_param_table(cfg: MLLMConfig) -> dict[str, int]:
  state = nnx.state(abstract_model(cfg), nnx.Param)
  groups = collections.Counter({g: 0 for g in _GROUPS.values()})
  layers, blocks = collections.Counter(), collections.Counter()
  table = {}
  for path, var in nnx.to_flat_state(state):
    n = math.prod(var.get_value().shape)
    groups[_GROUPS.get(path[0], "other")] += n
    if path[:2] == ("decoder", "layers"):
      layers[path[2]] += n
    elif path[:2] == ("vision", "blocks"):
      blocks[path[2]] += n
  table.update(groups)
  table["decoder_layer"] = max(layers.values(), default=0)
  table["vision_block"] = max(blocks.values(), default=0)
  return table


def count_params(cfg: MLLMConfig) -> dict[str, int]:
  """Parameters of ``MLLM(cfg)`` by part: ``vision``, ``projector``, ``decoder`` (embedding,
  layers, final norm, LM head when untied), ``ctx`` (context-token embeddings) and ``total``
  (plus ``other`` for any further top-level module, when there is one).

  Computed from ``nnx.eval_shape``: no weights are created, so real sizes cost no memory.
  """
  t = _param_table(cfg)
  out = {k: t[k] for k in ("vision", "projector", "decoder", "ctx")}
  if t.get("other"):
    out["other"] = t["other"]
  out["total"] = sum(out.values())
  return out


# ------------------------------------------------------------------ memory estimate

def _local_batch(batch: int, devices: int) -> int:
  """Examples per device: the batch is split over all devices (data parallel, FSDP included)."""
  return -(-batch // devices)


def _visual_shape(cfg: MLLMConfig, images: int, video_frames: int):
  """(frames through the vision tower, gaze regions, sequence slots) of one example."""
  v, gz = cfg.vision, cfg.gaze
  if v is None:
    return 0, 0, 0
  R = gz.region_shape[0] * gz.region_shape[1]
  g = cfg.token_grid
  nr_img = num_regions(g, g, gz.region_shape)
  gp = v.pooled_grid(g, g)[0]
  nr_vid = num_regions(gp, gp, gz.region_shape) if video_frames else 0
  regions = images * nr_img + video_frames * nr_vid
  slots = images * (nr_img * R + gz.num_ctx) + video_frames * (nr_vid * R + gz.num_ctx)
  return images + video_frames, regions, slots


def _check_args(cfg, batch, seq_len, devices, mode, param_bytes, compute_bytes, cache_len,
                images, video_frames, attention_impl):
  for name, x in (("batch", batch), ("seq_len", seq_len), ("devices", devices),
                  ("param_bytes", param_bytes), ("compute_bytes", compute_bytes)):
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
      raise ValueError(f"{name} must be a positive int, got {x!r}")
  if mode not in ("train", "infer"):
    raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}")
  if attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
  if cache_len is not None and cache_len < seq_len:
    raise ValueError(f"cache_len={cache_len} must be >= seq_len={seq_len} (the cache holds the "
                     "prompt and the generated tokens)")
  for name, x in (("images", images), ("video_frames", video_frames)):
    if x < 0:
      raise ValueError(f"{name} must be >= 0, got {x}")
  if cfg.vision is None and images + video_frames:
    raise ValueError("the model has no vision tower: images and video_frames must be 0")


def _compiled_k(rk, compiled_top_k, n_regions: int, train: bool) -> int:
  """K_max the model is compiled with: all regions with a per-example K (``rk``, the model's
  ``ResolvedK``); else ``compiled_top_k`` (a count or a ratio, like ``GazeConfig.top_k``) when
  given, else all regions in training (the trainer's default schedule start,
  ``topk_schedule.start <= 0``) and the model's K for inference."""
  if rk.ratio is not None:
    return rk.k_max
  if compiled_top_k is None:
    return n_regions if train else rk.k_max
  try:
    return resolve_k(compiled_top_k, n_regions).k_max
  except ValueError as e:
    raise ValueError(f"compiled_top_k: {e}") from None


def _estimate(cfg: MLLMConfig, *, batch: int, seq_len: int, devices: int = 1,
              fsdp: bool = True, mode: str = "train", param_bytes: int = 4,
              compute_bytes: int = 2, remat: bool = False, cache_len: Optional[int] = None,
              images: Optional[int] = None, video_frames: int = 0,
              attention_impl: Optional[str] = None, freeze_vision: bool = False,
              compiled_top_k: Optional[Union[int, float]] = None):
  """(bytes per component, formula per component, derived sizes); see ``estimate_memory``."""
  if images is None:
    images = 1 if cfg.vision is not None else 0
  if attention_impl is None:
    attention_impl = "pallas" if cfg.gaze.implementation == "pallas" else "xla"
  _check_args(cfg, batch, seq_len, devices, mode, param_bytes, compute_bytes, cache_len,
              images, video_frames, attention_impl)
  t = _param_table(cfg)
  d, gz, vc = cfg.decoder, cfg.gaze, cfg.vision
  E, F, L, V = d.hidden_size, d.intermediate_size, d.num_layers, d.vocab_size
  Hq, Hkv, D = d.num_heads, d.num_kv_heads, d.head_dim
  cb, pb = compute_bytes, param_bytes
  bl = _local_batch(batch, devices)
  T = bl * seq_len                                   # decoder tokens per device
  n_frames, NR, vis_slots = _visual_shape(cfg, images, video_frames)
  if vis_slots > seq_len:
    raise ValueError(f"{images} images and {video_frames} video frames take {vis_slots} slots "
                     f"(patches, region padding, context tokens) but seq_len={seq_len}")
  gaze = gz.attention == "gaze" and NR > 0
  train = mode == "train"
  rk = gz.resolve_k(NR) if gaze else None
  K = rk.count if gaze else 0
  K_max = _compiled_k(rk, compiled_top_k, NR, train) if gaze else 0
  R = gz.region_shape[0] * gz.region_shape[1]
  shards = devices if fsdp else 1
  N = count_params(cfg)["total"]
  n_train = N - (t["vision"] if freeze_vision else 0)
  # Which attentions run fused (output + f32 log-sum-exp kept, nothing of size K or S).
  fused = attention_impl == "flash" or (attention_impl == "pallas" and gz.attention == "gaze")
  fused_vision = attention_impl == "flash"
  out = dict.fromkeys(COMPONENTS, 0)
  how = dict.fromkeys(COMPONENTS, "")

  out["params"] = N * pb // shards
  how["params"] = f"{N / 1e9:.3f}B x {pb} B / {shards} shard(s)"
  if train:
    out["grads"] = n_train * pb // shards
    how["grads"] = f"{n_train / 1e9:.3f}B trainable x {pb} B / {shards}"
    out["optimizer"] = n_train * 8 // shards
    how["optimizer"] = f"AdamW mu + nu: {n_train / 1e9:.3f}B x 2 x 4 B / {shards}"
  if fsdp and devices > 1:
    biggest = max(t["decoder_layer"], t["vision_block"])
    out["gathered_weights"] = 2 * biggest * cb
    how["gathered_weights"] = "FSDP all-gather: 2 x largest layer x compute bytes"

  # Decoder activations: per token and layer, in the compute dtype,
  #   norms: inputs and outputs of the two RMSNorms ........ 4E
  #   q (before and after RoPE) and the attention output .... 3 Hq D
  #   k (before and after RoPE) and v ....................... 3 Hkv D
  #   SwiGLU: gate, up, silu(gate), their product ........... 4F
  # plus what attention keeps for its backward pass:
  #   xla dense:  over all S keys, f32 masked logits, their exp and the probabilities, the
  #               probabilities in the compute dtype, a bool mask: Hq S (12 + cb) + S
  #   xla gaze:   the same over S + K R keys, and the gathered K/V blocks of the K regions
  #               (k, v in compute dtype, v again in f32 unless cb = 4) with their mask:
  #               Hs K R (D (2 cb + 4) + 1), Hs = Hq, or Hkv with group routing; K is the
  #               compiled K_max (the schedule's start in training): a traced active K only
  #               masks the gathered blocks
  #   fused (pallas gaze, flash): output + f32 log-sum-exp only, Hq 4, whatever K: the
  #               kernels walk K/V in tiles and recompute the scores in the backward pass
  per_tok = cb * (4 * E + 3 * Hq * D + 3 * Hkv * D + 4 * F)
  if fused:
    attn_tok = Hq * 4
  elif gaze:
    Hs = Hkv if gz.routing == "group" else Hq
    v_f32 = 4 if cb < 4 else 0                     # the cast of v to f32 is a no-op in f32
    attn_tok = (Hq * (seq_len + K_max * R) * (12 + cb) + seq_len
                + Hs * K_max * R * (D * (2 * cb + v_f32) + 1))
  else:
    attn_tok = Hq * seq_len * (12 + cb) + seq_len
  route_tok = Hq * NR * 4 if gaze else 0             # f32 routing scores (forward only)
  layer_tok = per_tok + attn_tok
  if train:
    if remat:
      out["activations"] = L * T * E * cb + T * (layer_tok + route_tok)
      how["activations"] = "remat: L x T x E (layer inputs) + one layer recomputed"
    else:
      out["activations"] = T * E * cb + L * T * layer_tok + T * route_tok
      how["activations"] = (f"L x T x {layer_tok / 1024:.0f} KiB/token "
                            f"({attention_impl} attention"
                            + (f", K_max={K_max}" if gaze else "") + ")")
    # f32 logits, f32 log-softmax (or its gradient) and the compute-dtype matmul output.
    out["logits"] = T * V * (cb + 8)
    how["logits"] = f"T x V x ({cb} + 4 + 4) B"
  else:
    rows = T if not (gaze and gz.query_chunk) else bl * min(seq_len, gz.query_chunk)
    out["activations"] = 2 * T * E * cb + T * per_tok + rows * (attn_tok + route_tok)
    how["activations"] = "prefill: residual stream + one layer's working set"
    out["logits"] = T * V * (cb + 4)
    how["logits"] = "prefill returns f32 logits for every slot: T x V x (cb + 4) B"

  if vc is not None and n_frames:
    Ev, Fv, P = vc.hidden_size, vc.intermediate_size, vc.grid * vc.grid
    Lv = cfg.vision.num_blocks
    Ti = bl * n_frames * P                          # vision tokens per device
    v_tok = cb * (6 * Ev + 2 * Fv) + (vc.num_heads * 4 if fused_vision
                                      else vc.num_heads * P * (8 + cb))
    if train and not freeze_vision:
      if remat:
        out["vision_activations"] = Lv * Ti * Ev * cb + Ti * v_tok
      else:
        out["vision_activations"] = Lv * Ti * v_tok
      how["vision_activations"] = (f"{bl * n_frames} frames x {P} tokens x {Lv} blocks"
                                   + (" (remat)" if remat else ""))
    else:
      out["vision_activations"] = Ti * (Ev * cb + v_tok)
      how["vision_activations"] = "forward only: one block's working set + features"

  if not train:
    S_c = cache_len or seq_len
    out["kv_cache"] = 2 * L * Hkv * D * S_c * bl * cb
    how["kv_cache"] = f"2 x {L} layers x {Hkv} x {D} x {S_c} slots x {bl} x {cb} B"
    if gaze:
      out["descriptors"] = L * NR * Hkv * D * bl * 4
      how["descriptors"] = f"{L} x {NR} regions x {Hkv} x {D} x {bl} x 4 B (f32)"
  info = dict(local_batch=bl, tokens=T, regions=NR, top_k=K, compiled_top_k=K_max,
              frames=n_frames, images=images, video_frames=video_frames,
              attention_impl=attention_impl)
  return out, how, info


def estimate_memory(cfg: MLLMConfig, *, batch: int, seq_len: int, devices: int = 1,
                    fsdp: bool = True, mode: str = "train", param_bytes: int = 4,
                    compute_bytes: int = 2, remat: bool = False,
                    cache_len: Optional[int] = None, images: Optional[int] = None,
                    video_frames: int = 0, attention_impl: Optional[str] = None,
                    freeze_vision: bool = False,
                    compiled_top_k: Optional[Union[int, float]] = None) -> dict[str, int]:
  """Rough peak memory per device, in bytes, by component.

  Notation: N parameters (``count_params``), b = ceil(batch / devices) examples per device
  (the batch is split over all devices), T = b x seq_len decoder tokens per device, E / F / L /
  V / Hq / Hkv / D the decoder's width, FFN width, layers, vocabulary, query heads, KV heads and
  head dim, cb = ``compute_bytes``, pb = ``param_bytes``, shards = devices with ``fsdp`` else 1.

  - ``params``: N pb / shards.
  - ``grads`` (train): trainable N pb / shards (vision excluded with ``freeze_vision``).
  - ``optimizer`` (train): AdamW mu and nu in float32, 8 bytes per trainable parameter / shards.
  - ``gathered_weights`` (FSDP on > 1 device): 2 x the largest layer x cb (the layer in use and
    the next one prefetched).
  - ``activations``: decoder activations kept for the backward pass (train) or the prefill
    working set (infer). Per token and layer: cb (4E + 3 Hq D + 3 Hkv D + 4F) (norm inputs and
    outputs, q / k before and after RoPE, v, attention output, the four SwiGLU tensors) plus
    the attention's saved tensors: ``attention_impl="xla"`` (this package's XLA paths) keeps
    f32 masked logits, their exp and the probabilities, the probabilities in cb and a bool
    mask, Hq S (12 + cb) + S dense, Hq (S + K R) (12 + cb) + S + Hs K R (D (2 cb + 4) + 1)
    gaze (Hs = Hq, Hkv with group routing: the gathered region blocks, with v's f32 copy, the
    "+ 4", only when cb < 4), K = K_max the model is compiled with (``compiled_top_k``);
    ``"pallas"`` (this package's gaze kernels) and ``"flash"`` keep Hq 4 (output aside, the
    f32 log-sum-exp per row and head) whatever K, as the kernels walk the keys in tiles.
    Gaze adds Hq NR 4 of f32 routing scores, alive for one layer. Train: T E cb + L T
    (per-layer bytes); with ``remat`` (per-layer checkpointing) L T E cb + T (per-layer bytes)
    for the layer being recomputed. Infer: 2 T E cb + T (per-layer bytes), one layer at a
    time. Checked against XLA's buffer assignment on CPU (float32, batch 2 x 512 slots, a
    2-layer SmolLM2 cut with 16 regions of 2 x 2): the trainer's whole step (AdamW, K_max =
    4, 8, 16) within 10%; the temporaries of a plain gradient (dense and gaze at K = 4)
    within 6%.
  - ``vision_activations``: frames = ``images`` + ``video_frames`` per example, P = patches per
    frame, per token and block cb (6 Ev + 2 Fv) + (heads P (8 + cb), or heads 4 with
    ``"flash"``);
    all blocks kept in training (layer inputs only with remat), one block otherwise
    (inference, ``freeze_vision``).
  - ``logits``: train T V (cb + 8) (matmul output, f32 logits, f32 log-softmax / gradient);
    infer T V (cb + 4) (prefill returns logits for every slot).
  - ``kv_cache`` (infer): 2 L Hkv D cache_len b cb, ``cache_len`` defaulting to ``seq_len``.
  - ``descriptors`` (infer, gaze): L NR Hkv D b 4 (float32 region means), NR = regions per
    example from ``images`` full frames and ``video_frames`` frames pooled by ``video_pool``.

  ``images`` defaults to 1 for a model with a vision tower. ``attention_impl``: one of
  ``ATTENTION_IMPLS``, ``"xla"`` (this package's XLA paths), ``"pallas"`` (its Pallas gaze
  kernels; dense decoder attention and the vision tower stay on XLA) or ``"flash"`` (a fused
  kernel for every attention, the vision tower's included); None follows
  ``cfg.gaze.implementation`` (``"pallas"`` or else ``"xla"``). ``compiled_top_k``: the static
  K the model is compiled with (K_max; a count or a ratio like ``GazeConfig.top_k``); the
  trainer compiles at the progressive top-K schedule's start (``config.topk_schedule.start``)
  and only masks the blocks past the active K, so the XLA path's gathered blocks are sized by
  K_max. None means all regions in training (the default schedule starts there) and
  ``cfg.gaze.top_k`` for inference; ignored for dense attention. Raises ValueError for
  arguments that cannot describe a run (e.g. the images do not fit in ``seq_len``, K_max
  outside [1, regions]). Returns the bytes of every component in ``COMPONENTS`` and their
  ``total``.
  """
  out, _, _ = _estimate(cfg, batch=batch, seq_len=seq_len, devices=devices, fsdp=fsdp,
                        mode=mode, param_bytes=param_bytes, compute_bytes=compute_bytes,
                        remat=remat, cache_len=cache_len, images=images,
                        video_frames=video_frames, attention_impl=attention_impl,
                        freeze_vision=freeze_vision, compiled_top_k=compiled_top_k)
  out["total"] = sum(out.values())
  return out


# ------------------------------------------------------------------ exact: a compile

_DTYPE_OF_BYTES = {2: "bfloat16", 4: "float32"}


def _segments(cfg: MLLMConfig, seq_len: int, images: int, video_frames: int,
              generated: int) -> list:
  """One example of the estimate's shape: a text token, the images and video frames, text up
  to ``seq_len`` slots, then ``generated`` reserved slots (inference)."""
  segs = [Text(1)]
  if cfg.vision is not None:
    g = cfg.token_grid
    gp = cfg.vision.pooled_grid(g, g)[0]
    segs += [Image(g, g)] * images + ([Video(video_frames, gp, gp)] if video_frames else [])
  rest = seq_len - 1 - _visual_shape(cfg, images, video_frames)[2]
  if rest < 0:
    raise ValueError(f"seq_len={seq_len} leaves no slot for text next to the images")
  segs += [Text(rest)] if rest else []
  return segs + ([Text(generated, generated=True)] if generated else [])


def compiled_bytes(compiled) -> dict[str, int]:
  """Bytes of a compiled program on one device, from XLA's buffer assignment
  (``compiled.memory_analysis()``): ``argument``, ``output``, ``alias`` (outputs that reuse
  donated arguments), ``temp``, ``generated_code`` and ``peak`` = argument + output - alias +
  temp, what the program holds at once. Raises ValueError when the backend reports none."""
  m = compiled.memory_analysis()
  if m is None:
    raise ValueError(f"the {jax.default_backend()} backend reports no memory analysis")
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
         ("argument", "output", "alias", "temp", "generated_code")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def compiled_memory(cfg: MLLMConfig, *, batch: int, seq_len: int, mode: str = "train",
                    param_bytes: int = 4, compute_bytes: int = 2, remat: bool = False,
                    cache_len: Optional[int] = None, images: Optional[int] = None,
                    video_frames: int = 0, attention_impl: Optional[str] = None,
                    freeze_vision: bool = False,
                    compiled_top_k: Optional[Union[int, float]] = None) -> dict[str, int]:
  """Exact memory of the step ``estimate_memory`` describes (one device, no sharding): the step
  is compiled for the local default backend and XLA's buffer assignment is read
  (``compiled_bytes``). Nothing runs and no weights are created, but the compile takes seconds
  to minutes. For a backend without a local device (an H100 or TPU from a CPU machine) use the
  deviceless compiles of ``make aot`` (benchmarks/aot).

  Train: the forward, a cross-entropy gradient and an AdamW update, the state donated, as the
  trainer's step (which adds metrics and routing statistics); the model is built at K_max
  (``compiled_top_k``, as the trainer does at its schedule's start). Infer: ``MLLM.prefill``
  over ``cache_len`` slots, the prompt and the reserved generated span, as ``generate`` runs
  it. The arguments mean what they mean for ``estimate_memory``; ``param_bytes`` and
  ``compute_bytes`` pick float32 (4) or bfloat16 (2), ``attention_impl`` "xla" or "pallas"
  (the "flash" kernels are not this package's). Returns ``compiled_bytes``' dict.
  """
  if attention_impl == "flash":
    raise ValueError("attention_impl='flash' is an estimate only; the exact mode compiles "
                     "this package's attention ('xla' or 'pallas')")
  for name, b in (("param_bytes", param_bytes), ("compute_bytes", compute_bytes)):
    if b not in _DTYPE_OF_BYTES:
      raise ValueError(f"{name}={b!r}: the exact mode compiles float32 (4) or bfloat16 (2)")
  _, _, info = _estimate(cfg, batch=batch, seq_len=seq_len, mode=mode, param_bytes=param_bytes,
                         compute_bytes=compute_bytes, cache_len=cache_len, images=images,
                         video_frames=video_frames, attention_impl=attention_impl,
                         compiled_top_k=compiled_top_k)
  gz = cfg.gaze
  if info["regions"] and not gz.top_k_per_example:
    gz = dataclasses.replace(gz, top_k=info["compiled_top_k"])
  cfg = dataclasses.replace(
      cfg, dtype=_DTYPE_OF_BYTES[compute_bytes], param_dtype=_DTYPE_OF_BYTES[param_bytes],
      decoder=dataclasses.replace(cfg.decoder, remat=remat),
      gaze=dataclasses.replace(gz, implementation=info["attention_impl"]))
  generated = (cache_len or seq_len) - seq_len if mode == "infer" else 0
  segs = _segments(cfg, seq_len, info["images"], info["video_frames"], generated)
  model = abstract_model(cfg)
  layout = model.build_layout([segs] * batch, seq_len + generated,
                              max_regions=max(info["regions"], 1),
                              max_images=max(info["frames"], 1))
  sds = jax.ShapeDtypeStruct
  tokens = sds((batch, seq_len + generated), jnp.int32)
  pics = None
  if cfg.vision is not None and info["frames"]:
    v = cfg.vision
    pics = sds((batch, info["frames"], v.image_size, v.image_size, v.num_channels), jnp.float32)
  frozen = nnx.All(nnx.Param, nnx.PathContains("vision")) if freeze_vision else nnx.Nothing
  graphdef, fixed, params, rest = nnx.split(model, frozen, nnx.Param, ...)
  if mode == "infer":
    def prefill(fixed, params, tokens, layout, pics):
      return nnx.merge(graphdef, fixed, params, rest).prefill(tokens, layout, pics)
    lowered = jax.jit(prefill).lower(fixed, params, tokens, layout, pics)
  else:
    tx = optax.adamw(1e-4)

    def step(fixed, params, opt_state, tokens, layout, pics):
      def loss(p):
        logits = nnx.merge(graphdef, fixed, p, rest)(tokens, layout, pics)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()
      grads = jax.grad(loss)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    lowered = jax.jit(step, donate_argnums=(1, 2)).lower(
        fixed, params, jax.eval_shape(tx.init, params), tokens, layout, pics)
  return compiled_bytes(lowered.compile())


# ------------------------------------------------------------------ CLI

def _gib(x: float) -> str:
  return f"{x / GiB:10.2f}"


def _count(n: int) -> str:
  return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M" if n >= 1e4 else str(n)


def _top_k_arg(text: str):
  """A K as ``GazeConfig.top_k`` takes it: ``8`` (count) or ``0.5`` (ratio of the regions)."""
  try:
    return float(text) if any(c in text for c in ".eE") else int(text)
  except ValueError:
    raise ValueError(f"--topk_start={text!r} is neither a count nor a ratio") from None


def _flags() -> flags.FlagValues:
  """The CLI's flags, in a FlagValues of their own: importing this module (the trainer and the
  checkpoints do) adds nothing to the program's global flags."""
  fv = flags.FlagValues()
  kw = dict(flag_values=fv)
  flags.DEFINE_enum("preset", None, sorted(PRESETS), "model preset", **kw)
  flags.DEFINE_integer("batch", 1, "global batch (examples)", lower_bound=1, **kw)
  flags.DEFINE_integer("seq_len", 2048, "slots per example (prompt length in infer mode)",
                       lower_bound=1, **kw)
  flags.DEFINE_integer("devices", 1, "devices the batch and (with fsdp) the weights are split "
                       "over", lower_bound=1, **kw)
  flags.DEFINE_boolean("fsdp", True, "shard parameters and optimizer state; --nofsdp "
                       "replicates them (plain data parallel)", **kw)
  flags.DEFINE_enum("mode", "train", ["train", "infer"], "training step or prefill", **kw)
  flags.DEFINE_integer("param_bytes", 4, "bytes per stored weight", lower_bound=1, **kw)
  flags.DEFINE_integer("compute_bytes", 2, "bytes per activation", lower_bound=1, **kw)
  flags.DEFINE_boolean("remat", False, "per-layer activation checkpointing", **kw)
  flags.DEFINE_integer("cache_len", None, "KV cache slots (infer)", lower_bound=1, **kw)
  flags.DEFINE_integer("images", None, "full-size images per example (default 1 with a vision "
                       "tower)", lower_bound=0, **kw)
  flags.DEFINE_integer("video_frames", 0, "video frames per example (pooled video_pool x "
                       "video_pool)", lower_bound=0, **kw)
  flags.DEFINE_enum("attention_impl", None, list(ATTENTION_IMPLS),
                    "xla: this package's XLA paths (store scores and gathered regions); pallas: "
                    "its Pallas gaze kernels (working set independent of K); flash: a fused "
                    "kernel for every attention, vision included (default: the preset's "
                    "gaze.implementation)", **kw)
  flags.DEFINE_string("topk_start", None, "gaze: the K the model is compiled with, K_max "
                      "(config.topk_schedule.start; a count or a ratio); default all regions "
                      "in train mode (the trainer's default schedule start), the preset's top_k "
                      "in infer mode", **kw)
  flags.DEFINE_enum("attention", None, ["gaze", "dense"], "override the preset's attention",
                    **kw)
  flags.DEFINE_integer("query_chunk", None, "gaze: process this many query rows at a time "
                       "(GazeConfig.query_chunk)", lower_bound=1, **kw)
  flags.DEFINE_boolean("freeze_vision", False, "no gradients / optimizer state / saved "
                       "activations for the vision tower", **kw)
  flags.DEFINE_float("hbm_gib", 80.0, "memory per device to compare against (80 for an H100)",
                     **kw)
  flags.DEFINE_boolean("exact", False, "also compile the step for the local backend (one "
                       "device) and print XLA's buffer assignment (compiled_memory); seconds "
                       "to minutes", **kw)
  flags.mark_flag_as_required("preset", **kw)
  return fv


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The CLI; ``argv`` without the program name (default ``sys.argv[1:]``). Returns the exit
  status: 0, or 2 for bad flags or a setting that cannot describe a run."""
  argv = list(sys.argv[1:] if argv is None else argv)
  fv = _flags()
  if {"--help", "-h", "--helpfull"} & set(argv):
    print(f"usage: python -m gaze_jax.model.memory --preset=NAME [flags]\n{__doc__}\n"
          f"{fv.get_help()}")
    return 0
  try:
    rest = fv(["gaze_jax.model.memory"] + argv)[1:]
    if rest:
      raise flags.Error(f"unexpected arguments {rest}")
    topk_start = None if fv.topk_start is None else _top_k_arg(fv.topk_start)
  except (flags.Error, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  args = fv
  cfg = get_preset(args.preset)
  if args.attention is not None:
    cfg = dataclasses.replace(cfg, gaze=dataclasses.replace(cfg.gaze, attention=args.attention))
  if args.query_chunk is not None:
    cfg = dataclasses.replace(cfg, gaze=dataclasses.replace(cfg.gaze,
                                                            query_chunk=args.query_chunk))
  kw = dict(batch=args.batch, seq_len=args.seq_len, devices=args.devices, fsdp=args.fsdp,
            mode=args.mode, param_bytes=args.param_bytes, compute_bytes=args.compute_bytes,
            remat=args.remat, cache_len=args.cache_len, images=args.images,
            video_frames=args.video_frames, attention_impl=args.attention_impl,
            freeze_vision=args.freeze_vision, compiled_top_k=topk_start)
  try:
    out, how, info = _estimate(cfg, **kw)
    if args.exact and args.devices != 1:
      raise ValueError("--exact compiles for one local device: use --devices=1 (meshes: "
                       "make aot, benchmarks/aot)")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  total = sum(out.values())
  n = count_params(cfg)
  print(f"{args.preset}: {_count(n['total'])} parameters (vision {_count(n['vision'])}, "
        f"projector {_count(n['projector'])}, decoder {_count(n['decoder'])}, "
        f"ctx {_count(n['ctx'])})")
  gz = cfg.gaze
  impl, K, K_max = info["attention_impl"], info["top_k"], info["compiled_top_k"]
  gaze = gz.attention == "gaze" and info["regions"] > 0
  att = f"gaze K={K} of {info['regions']} regions" if gaze else "dense"
  if gaze and K_max != K:
    att += f", compiled at K_max={K_max}"
  print(f"mode={args.mode} batch={args.batch} ({info['local_batch']}/device) "
        f"seq_len={args.seq_len} devices={args.devices} fsdp={'on' if args.fsdp else 'off'} "
        f"remat={'on' if args.remat else 'off'} params={args.param_bytes}B "
        f"compute={args.compute_bytes}B attention={att} ({impl}) "
        f"frames/example={info['frames']}")
  print(f"{'component':<20}{'GiB/device':>10}  formula")
  for k in COMPONENTS:
    if out[k]:
      print(f"{k:<20}{_gib(out[k])}  {how[k]}")
  print(f"{'total':<20}{_gib(total)}")
  if args.exact:
    exact_kw = {k: v for k, v in kw.items() if k not in ("devices", "fsdp")}
    try:
      c = compiled_memory(cfg, **exact_kw)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    print(f"compiled for {jax.default_backend()} (XLA buffer assignment, one device):")
    for k in ("argument", "output", "alias", "temp", "peak"):
      print(f"{'exact_' + k:<20}{_gib(c[k])}")
    print(f"estimate / exact peak: {total / max(c['peak'], 1):.2f}")
  if out["logits"] > 0.3 * total:
    print("note: the [T, V] logits are a large share: " + (
        "a chunked or fused cross-entropy avoids materialising them" if args.mode == "train"
        else "generation needs only the last position's logits"))
  budget = args.hbm_gib * GiB
  if total <= 0.85 * budget:
    print(f"fits in {args.hbm_gib:g} GiB with {(budget - total) / GiB:.1f} GiB to spare "
          "(keep 10-20% for XLA temporaries)")
    return 0
  verdict = "does NOT fit" if total > budget else "is tight (under 15% headroom)"
  print(f"{verdict} in {args.hbm_gib:g} GiB per device. Other settings:")
  tries = []
  if args.mode == "train" and not args.remat:
    tries.append(("--remat", dict(remat=True)))
  if impl == "xla" and gaze:
    tries.append(("--attention_impl=pallas", dict(attention_impl="pallas")))
  if impl == "xla" and gaze and K_max > K:
    tries.append((f"--topk_start={K} (fixed K)", dict(compiled_top_k=K)))
  if impl != "flash":
    tries.append(("--attention_impl=flash", dict(attention_impl="flash")))
  if args.mode == "train" and not args.remat and impl != "flash":
    tries.append(("--remat --attention_impl=flash", dict(remat=True, attention_impl="flash")))
  if (args.mode == "infer" and impl == "xla" and gaze and not gz.query_chunk
      and args.seq_len > 512):
    chunked = dataclasses.replace(cfg, gaze=dataclasses.replace(gz, query_chunk=512))
    tries.append(("--query_chunk=512", dict(cfg=chunked)))
  if not args.fsdp and args.devices > 1:
    tries.append(("fsdp (drop --nofsdp)", dict(fsdp=True)))
  if args.mode == "train" and not args.freeze_vision and cfg.vision is not None:
    tries.append(("--freeze_vision", dict(freeze_vision=True)))
  if info["local_batch"] > 1:
    tries.append((f"--batch={args.batch // 2}", dict(batch=max(1, args.batch // 2))))
  tries.append((f"--devices={2 * args.devices}", dict(devices=2 * args.devices)))
  if args.param_bytes > 2 and args.mode == "infer":
    tries.append(("--param_bytes=2", dict(param_bytes=2)))
  for flag, change in tries:
    o, _, _ = _estimate(change.pop("cfg", cfg), **{**kw, **change})
    t2 = sum(o.values())
    print(f"  {flag:<32}{_gib(t2)} GiB" + ("  fits" if t2 <= 0.85 * budget else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())

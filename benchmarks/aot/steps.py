"""Model steps compiled for a target: the jitted training step (forward + backward + AdamW
update, the trainer's own ``TrainStep`` with its shardings), a prefill and a decode step, each
with ``implementation="xla"`` and ``"pallas"`` side by side.

``small_steps``: the ``tiny`` preset (bf16 compute) on an H100 and on a v5p slice of 8 chips
with an ``fsdp=4 x tensor=2`` mesh (``make aot``, CI). ``full_steps``: the pod / serving
scale (``make aot-full``): ``cambrian_4b`` training on ``v5p:4x4x4`` (64 chips) at batch 256 and
16 x 4,096 tokens, with 2 and all 36 decoder layers (scanned: the compile time stays nearly
flat in depth), ``qwen3_vl_8b`` training there at batch 256 (kernels against the dense model),
and ``qwen2_5_7b`` and ``qwen3_vl_8b`` decode on one H100 at batch 32 over a 64-frame video
cache; ``qwen2_5_7b``'s decode also on one v5p chip, in HBM and with the visual KV offloaded to
host memory (``decode_offload``: ``GazeConfig.offload``; the tiny preset's in ``make aot``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from benchmarks.aot import targets as tg
from gaze_jax.gaze import Image, Text, Video, build_layout
from gaze_jax.model.attention import LayerCache
from gaze_jax.model.partitioning import activation_rules
from gaze_jax.model.presets import get_preset
from gaze_jax.train import checkpoint as ckpt_lib
from gaze_jax.train import trainer

IMPLEMENTATIONS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class StepCase:
  """One model and input shape to compile."""
  label: str
  preset: str
  segments: tuple           # one example's segments (every example is the same)
  batch: int
  mesh: dict                # {"data": d, "fsdp": f, "tensor": t}
  decoder_layers: Optional[int] = None
  steps: tuple = ("train", "prefill", "decode")
  dtype: str = "bfloat16"
  param_dtype: str = "float32"   # "bfloat16": weights as served, not float32 master weights
  remat: bool = True
  attention: str = "gaze"   # "dense": the dense model of the same preset (the baseline)
  # gaze: "xla" / "pallas"; dense: "xla" (jax.nn.dot_product_attention) / "splash" (TPU)
  implementations: tuple = IMPLEMENTATIONS
  bucket: tuple = ()        # a Qwen-VL model's one (height, width) image size in pixels
  gaze: tuple = ()          # (field, value) pairs replacing the preset's model.gaze fields


def _config(case: StepCase, implementation: str, kernel: str):
  from configs import common
  c = common.base_config(case.preset)
  c.model.dtype = case.dtype
  c.model.param_dtype = case.param_dtype
  c.model.decoder.remat = case.remat
  if case.decoder_layers is not None:
    c.model.decoder.num_layers = case.decoder_layers
  for field, value in case.gaze:
    c.model.gaze[field] = value
  c.model.gaze.attention = case.attention
  if case.attention == "dense":
    # The dense model's attention: XLA, or splash (KernelConfig.dense_rows) on a TPU.
    c.model.gaze.kernel = {"kernel": kernel, "interpret": False, "dense_rows": implementation}
  else:
    c.model.gaze.implementation = implementation
    if implementation == "pallas":
      c.model.gaze.kernel = {"kernel": kernel, "interpret": False}
  if case.bucket:
    # A Qwen-VL model: every image at one bucket fixes the tower's grids (qwen_static_grids).
    c.data.buckets = (case.bucket,)
  lay = _layout(case, c)
  c.data.seq_len = lay.seq_len
  c.data.max_regions = lay.max_regions
  c.data.max_images = lay.spec.max_images
  c.data.max_nonvisual = lay.spec.max_nonvisual
  c.data.batch_size = case.batch
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (case.mesh.get(a, 1) for a in
                                             ("data", "fsdp", "tensor"))
  return c, lay


def _layout(case: StepCase, c):
  from gaze_jax.gaze import LayoutSpec, num_regions, slots_needed
  rs = tuple(c.model.gaze.region_shape)
  probe = LayoutSpec(seq_len=1, max_regions=1, max_images=1, region_shape=rs,
                     num_ctx=c.model.gaze.num_ctx)
  segs = list(case.segments)
  frames = sum(s.frames if isinstance(s, Video) else 1 for s in segs if not isinstance(s, Text))
  nr = sum((s.frames if isinstance(s, Video) else 1) * num_regions(s.gh, s.gw, rs)
           for s in segs if not isinstance(s, Text))
  text = sum(s.length for s in segs if isinstance(s, Text))
  mrope = c.model.decoder.get("mrope_section") is not None
  spec = LayoutSpec(seq_len=slots_needed(segs, probe), max_regions=nr, max_images=frames,
                    region_shape=rs, num_ctx=c.model.gaze.num_ctx,
                    max_nonvisual=text + frames * c.model.gaze.num_ctx, mrope=mrope)
  return build_layout([segs] * case.batch, spec)


def _visual(case: StepCase, model_cfg, lay) -> dict:
  """The abstract visual features of a batch: ``images [B, F, H, W, C]``, or a Qwen-VL
  model's patch rows at its fixed grids (``patches``, ``patch_grids``, ``second_per_grid``)."""
  B, F = case.batch, lay.spec.max_images
  sds = jax.ShapeDtypeStruct
  q = model_cfg.qwen_vision
  if q is not None:
    rows = sum(t * h * w for t, h, w in model_cfg.qwen_grids)
    return {"patches": sds((B, rows, q.patch_dim), jnp.float32),
            "patch_grids": sds((B, F, 3), jnp.int32),
            "second_per_grid": sds((B, F), jnp.float32)}
  v = model_cfg.vision
  return {"images": sds((B, F, v.image_size, v.image_size, v.num_channels), jnp.float32)}


def _batch(case: StepCase, model_cfg, lay) -> dict:
  """Abstract host batch (shapes and dtypes of the pipeline's batches)."""
  B, S = case.batch, lay.seq_len
  sds = jax.ShapeDtypeStruct
  b = {"tokens": sds((B, S), jnp.int32), "targets": sds((B, S), jnp.int32),
       "loss_mask": sds((B, S), jnp.float32), **_visual(case, model_cfg, lay)}
  for name, arr in lay.to_features().items():
    b[name] = sds(np.shape(arr), np.asarray(arr).dtype)
  return b


def _with(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def _compile(t: tg.Target, mesh, name, fn, args, *, rules=None, kv_shape=None, **kw):
  """``tg.compile_fn`` under ``mesh`` and the activation ``rules`` (as the trainer traces its
  steps) and the gaze kernels the program holds (Triton kernels with their registers from the
  XLA dump on a GPU, Mosaic kernel names on a TPU). With ``kv_shape`` (the global
  ``(B, S, Hkv, D)`` of the keys), also the all-gathers of K/V-sized arrays the partitioner
  inserted (``kv_all_gathers``: none when the kernels run in shard_map)."""
  with tg.dump_dir(t.platform == "cuda") as dump, jax.set_mesh(mesh), activation_rules(rules):
    rec, compiled = tg.compile_fn(name, fn, args, dump_dir=dump, **kw)
    if compiled is not None:
      rec["kernels"] = (tg.triton_kernels(dump) if dump else tg.mosaic_kernels(compiled))
      if kv_shape is not None:
        rec["kv_all_gathers"] = kv_all_gathers(compiled.as_text(), kv_shape)
  return rec, compiled


_ALL_GATHER = re.compile(r"= \w+\[([0-9,]+)\][^ ]* all-gather\(")


def kv_all_gathers(hlo: str, kv_shape) -> int:
  """All-gathers in compiled HLO text whose result is K/V-sized: rank 4, ``[B', S, H', D]``
  with the keys' sequence length S and head dim D (any batch or head extent)."""
  _, S, _, D = kv_shape
  n = 0
  for dims in _ALL_GATHER.findall(hlo):
    d = [int(x) for x in dims.split(",")]
    n += len(d) == 4 and d[1] == S and d[3] == D
  return n


def _record(rec: dict, compiled, t: tg.Target, extra: dict) -> dict:
  rec.update(extra)
  rec["hbm_bytes"] = t.hbm_bytes
  mem = rec.get("memory") or {}
  if mem and t.hbm_bytes:
    rec["fits"] = mem["peak"] <= t.hbm_bytes
  return rec


def compile_case(case: StepCase, t: tg.Target, *, log=print, only: str = "") -> list[dict]:
  """Every step of ``case`` on ``t`` with each of its implementations (those for which
  ``only`` is in ``<label>_<implementation>``)."""
  out = []
  kernel = "tpu" if t.platform == "tpu" else "gpu"
  for impl in case.implementations:
    if only not in f"{case.label}_{impl}":
      continue
    config, lay = _config(case, impl, kernel)
    mesh = t.mesh(case.mesh)
    s = trainer.build(config, mesh=mesh)
    base = {"case": case.label, "preset": case.preset,
            "implementation": impl if case.attention == "gaze" else _dense_name(impl),
            "target": t.name, "mesh": dict(case.mesh), "batch": case.batch,
            "seq_len": lay.seq_len, "decoder_layers": s.model_cfg.decoder.num_layers,
            "dtype": case.dtype, "remat": case.remat,
            "full_layers": get_preset(case.preset).decoder.num_layers}
    host = _batch(case, s.model_cfg, lay)
    batch = _with(host, jax.tree.map(lambda _: s.batch_sharding, host))
    if "train" in case.steps:
      state = {"params": s.abstract_params, "opt_state": s.abstract_opt_state,
               "step": jax.ShapeDtypeStruct((), jnp.int32)}
      state = _with(state, s.state_shardings)
      fn = s.train_step.__call__
      name = f"train_{case.label}_{impl}"
      dec = s.model_cfg.decoder
      rec, comp = _compile(t, mesh, name, fn, (state, batch), rules=s.rules,
                           kv_shape=(case.batch, lay.seq_len, dec.num_kv_heads, dec.head_dim),
                           in_shardings=(s.state_shardings, s.batch_sharding),
                           out_shardings=(s.state_shardings, tg.replicated(mesh)),
                           donate_argnums=(0,))
      out.append(_record(rec, comp, t, {**base, "step": "train"}))
      _log_rec(log, out[-1])
    if {"prefill", "decode", "decode_offload"} & set(case.steps):
      out += _serve_steps(case, t, s, config, lay, mesh, base, log)
  return out


def _dense_name(impl: str) -> str:
  """The record's implementation of a dense-model case: "dense" (XLA) or "dense_splash"."""
  return "dense" if impl == "xla" else f"dense_{impl}"


def _serve_steps(case, t, s, config, lay, mesh, base, log) -> list[dict]:
  """Prefill (full forward that returns every layer's KV cache) and one decode step (one new
  token per example against the cache) of the model at its target K."""
  cfg = s.config.model
  gd, _, rest = ckpt_lib.abstract_params(cfg)
  params = _with(s.abstract_params, s.state_shardings["params"])
  pshard = s.state_shardings["params"]
  bsh = s.batch_sharding
  out = []
  feats = {k: v for k, v in _batch(case, cfg, lay).items()
           if k not in ("targets", "loss_mask")}
  feats = _with(feats, jax.tree.map(lambda _: bsh, feats))
  from gaze_jax.train.step import batch_layout, visual_input

  def prefill(params, b):
    model = nnx.merge(gd, params, rest)
    layout = batch_layout(b, lay.spec)
    logits, caches = model.prefill(b["tokens"], layout, visual_input(b, cfg))
    return logits[:, -1], caches

  if "prefill" in case.steps:
    name = f"prefill_{case.label}_{base['implementation']}"
    rec, comp = _compile(t, mesh, name, prefill, (params, feats), rules=s.rules,
                         in_shardings=(pshard, bsh))
    out.append(_record(rec, comp, t, {**base, "step": "prefill"}))
    _log_rec(log, out[-1])
  if "decode" in case.steps:
    dec = cfg.decoder
    B, S = case.batch, lay.seq_len
    kv = jax.ShapeDtypeStruct((B, S, dec.num_kv_heads, dec.head_dim), jnp.dtype(case.dtype))
    desc = (jax.ShapeDtypeStruct((B, lay.max_regions, dec.num_kv_heads, dec.head_dim),
                                 jnp.dtype(case.dtype))
            if cfg.gaze.attention == "gaze" else None)
    caches = [LayerCache(k=kv, v=kv, descriptors=desc) for _ in range(dec.num_layers)]
    csh = jax.tree.map(lambda _: NamedSharding(mesh, bsh.spec), caches)
    out.append(_compile_decode(case, t, s, cfg, lay, mesh, feats, _with(caches, csh), log,
                               {**base, "step": "decode", "cache_slots": S}))
  if "decode_offload" in case.steps and cfg.gaze.attention == "gaze":
    caches, C = _offloaded_caches(case, s, cfg, lay, mesh)
    out.append(_compile_decode(case, t, s, cfg, lay, mesh, feats, caches, log,
                               {**base, "step": "decode_offload", "cache_slots": lay.seq_len,
                                "region_cache": C}))
  return out


def _compile_decode(case, t, s, cfg, lay, mesh, feats, caches, log, extra) -> dict:
  """One decode step (one new token per example) against ``caches`` (abstract, with their
  shardings), the caches donated."""
  from gaze_jax.train.step import batch_layout
  gd, _, rest = ckpt_lib.abstract_params(cfg)
  params = _with(s.abstract_params, s.state_shardings["params"])
  bsh = s.batch_sharding
  lay_feats = {k: v for k, v in feats.items() if k not in ("tokens", *_visual(case, cfg, lay))}
  lsh = jax.tree.map(lambda _: bsh, lay_feats)
  csh = jax.tree.map(lambda x: x.sharding, caches)
  tok = jax.ShapeDtypeStruct((case.batch, 1), jnp.int32, sharding=bsh)
  # An offloaded cache's host rows are read, never written: they come as their own argument,
  # not donated, and the step returns the rest (a serving loop keeps the rows where they are;
  # returned, they would be a host-side copy).
  offloaded = extra["step"] == "decode_offload"
  keep = ((lambda c: dataclasses.replace(c, k_host=None, v_host=None)) if offloaded
          else (lambda c: c))
  hosts = [(c.k_host, c.v_host) for c in caches] if offloaded else []
  hsh = [(c.k_host, c.v_host) for c in csh] if offloaded else []
  caches, csh = [keep(c) for c in caches], [keep(c) for c in csh]

  def decode(params, tokens, q_index, layout_feats, caches, hosts):
    model = nnx.merge(gd, params, rest)
    layout = batch_layout(layout_feats, lay.spec)
    if hosts:
      caches = [dataclasses.replace(c, k_host=k, v_host=v) for c, (k, v) in zip(caches, hosts)]
    logits, caches = model.decode(tokens, q_index, layout, caches)
    return logits[:, -1], [keep(c) for c in caches]

  name = f"{extra['step']}_{case.label}_{extra['implementation']}"
  rec, comp = _compile(t, mesh, name, decode, (params, tok, tok, lay_feats, caches, hosts),
                       rules=s.rules,
                       in_shardings=(s.state_shardings["params"], bsh, bsh, lsh, csh, hsh),
                       out_shardings=(bsh, csh), donate_argnums=(4,))
  rec = _record(rec, comp, t, extra)
  _log_rec(log, rec)
  return rec


def _offloaded_caches(case, s, cfg, lay, mesh):
  """Abstract ``OffloadedCache``s of every layer (``GazeConfig.offload``): the visual K/V in
  host memory (``memory_kind="pinned_host"``), the text and context K/V, the descriptors and a
  region cache of ``offload_capacity`` blocks per example and KV head on the device. Returns
  ``(caches, the region cache's blocks C)``."""
  from jax.sharding import PartitionSpec as P

  from gaze_jax.model.offload import OffloadedCache, host_rows, offload_capacity
  dec, dtype = cfg.decoder, jnp.dtype(case.dtype)
  B, S, Hkv, D = case.batch, lay.seq_len, dec.num_kv_heads, dec.head_dim
  N = lay.spec.max_nonvisual or S
  C = offload_capacity(cfg, lay.max_regions)
  R = cfg.gaze.region_shape[0] * cfg.gaze.region_shape[1]
  spec = s.batch_sharding.spec
  dev = NamedSharding(mesh, spec)
  # The host rows are not sharded: a block is a dynamic slice of one row, which a sharded
  # row axis would turn into collectives over host memory (one device serves here).
  host = NamedSharding(mesh, P(), memory_kind="pinned_host")
  sds = lambda shape, sh, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
  rows = host_rows(B * Hkv * lay.max_regions, R, D, dtype)
  buf = host_rows(B * Hkv * C, R, D, dtype)      # the region cache holds rows of the same form
  one = OffloadedCache(
      k_host=sds(rows.shape, host, rows.dtype), v_host=sds(rows.shape, host, rows.dtype),
      k_nv=sds((B, N, Hkv, D), dev), v_nv=sds((B, N, Hkv, D), dev),
      descriptors=sds((B, lay.max_regions, Hkv, D), dev),
      buf_k=sds(buf.shape, dev, buf.dtype), buf_v=sds(buf.shape, dev, buf.dtype),
      buf_ids=sds((B, Hkv, C), dev, jnp.int32), buf_used=sds((B, Hkv, C), dev, jnp.int32),
      step=sds((), NamedSharding(mesh, P()), jnp.int32), fetched=sds((B,), dev, jnp.int32),
      needed=sds((B,), dev, jnp.int32))
  return [one] * dec.num_layers, C


def _log_rec(log, r):
  mem = r.get("memory") or {}
  cost = r.get("cost") or {}
  log(f"  {r['name']} on {r['target']}: {'ok' if r['compiled'] else 'FAILED'} "
      f"({r['compile_s']} s)"
      + (f", peak {mem.get('peak', 0) / 2**30:.2f} GiB/chip" if mem else "")
      + (f", {cost['flops']:.3g} FLOPs/chip" if cost else "")
      + (f", kernels {sorted({k['kernel'] if isinstance(k, dict) else k for k in r['kernels']})}"
         if r.get("kernels") else "")
      + ("" if r["compiled"] else "\n    " + r.get("error", "").replace("\n", "\n    ")))


# ---------------------------------------------------------------- the cases


def _tiny_segments():
  return (Text(8), Image(8, 8), Text(40, generated=True))


def small_steps(t: tg.Target) -> list[dict]:
  """``make aot``: the tiny preset (64 px images, 16 regions of 2 x 2 patches, 2-layer GQA
  decoder), batch 8, on an H100 (one device) or a TPU slice of 8 chips (fsdp 4 x tensor 2)."""
  mesh = {"data": 1, "fsdp": 4, "tensor": 2} if t.platform == "tpu" else {"data": 1}
  out = compile_case(StepCase("tiny", "tiny", _tiny_segments(), batch=8, mesh=mesh,
                              steps=("train", "prefill", "decode", "decode_offload")), t)
  if t.platform == "tpu":
    # The dense model with XLA's attention and with splash (the decode step is a masked
    # attention, XLA in both, so it is left out).
    out += compile_case(StepCase("tiny_dense", "tiny", _tiny_segments(), batch=8, mesh=mesh,
                                 attention="dense", steps=("train", "prefill"),
                                 implementations=("xla", "splash")), t)
  return out


# configs/qwen3_vl_8b.py's gaze: 3 x 3 regions (64 per 24 x 24 image), K = 25%.
QWEN_GAZE = (("region_shape", (3, 3)), ("top_k", 0.25))


def _cambrian_segments(tokens: int = 4096):
  """4 images x 576 patches (+ 4 context tokens each) and text up to ``tokens`` slots."""
  visual = 4 * (576 + 4)
  segs = [Text(128)]
  for _ in range(4):
    segs += [Image(24, 24)]
  segs += [Text(tokens - visual - 128 - 256), Text(256, generated=True)]
  return tuple(segs)


# 64 frames, each 2 x 2-pooled to 12 x 12 patches (the video path of the vision tower).
VIDEO64 = (Text(200), Video(64, 12, 12), Text(60), Text(64, generated=True))


def full_steps(platform: str, only: str = "") -> list[dict]:
  """``make aot-full``: see the module docstring. ``only``: compile just the cases whose
  ``<label>_<implementation>`` contains it."""
  out = []
  if platform == "tpu":
    t = tg.tpu("v5p:4x4x4")
    mesh = {"data": 1, "fsdp": 16, "tensor": 4}
    # Batch 256 (16 sequences per fsdp shard, heads split 4 ways), then 16; 2 layers and all
    # 36 (the preset scans its layers: the program holds one layer body whatever the depth).
    cases = [StepCase(f"cambrian_4b_{layers}l_b{batch}", "cambrian_4b", _cambrian_segments(),
                      batch=batch, mesh=mesh, decoder_layers=layers, steps=("train",))
             for batch in (256, 16) for layers in (2, 36)]
    # The dense model at full depth: the baseline of the kernels' temporaries.
    cases += [StepCase(f"cambrian_4b_dense_36l_b{batch}", "cambrian_4b", _cambrian_segments(),
                       batch=batch, mesh=mesh, decoder_layers=36, steps=("train",),
                       attention="dense", implementations=("xla", "splash"))
              for batch in (256, 16)]
    # Qwen3-VL-8B (its 27-block tower with DeepStack, 36 decoder layers) at 4 sequences per chip:
    # 4 images at the 768 x 768 bucket (48 x 48 patches, 24 x 24 merged tokens) per sequence;
    # gaze with the kernels against the dense model (XLA's attention and splash).
    cases += [StepCase("qwen3_vl_8b_b256", "qwen3_vl_8b", _cambrian_segments(), batch=256,
                       mesh=mesh, steps=("train",), implementations=("pallas",),
                       bucket=(768, 768), gaze=QWEN_GAZE),
              StepCase("qwen3_vl_8b_dense_b256", "qwen3_vl_8b", _cambrian_segments(), batch=256,
                       mesh=mesh, steps=("train",), attention="dense",
                       implementations=("xla", "splash"), bucket=(768, 768), gaze=QWEN_GAZE)]
  else:
    t = tg.h100()
    segs = VIDEO64
    cases = [StepCase("qwen2_5_7b_video64", "qwen2_5_7b", segs, batch=32, mesh={"data": 1},
                      steps=("decode",)),
             # Qwen3-VL-8B over the same cache: 64 frame slots (temporal groups of 2 frames at
             # 384 x 384: 12 x 12 merged tokens each).
             StepCase("qwen3_vl_8b_video64", "qwen3_vl_8b", segs, batch=32, mesh={"data": 1},
                      steps=("decode",), bucket=(384, 384), gaze=QWEN_GAZE)]
  for case in cases:
    out += compile_case(case, t, only=only)
  if platform == "tpu":
    # The qwen2_5_7b decode over a 64-frame cache on one v5p chip, in HBM and offloaded (the
    # deviceless H100 topology has no host memory kind: there the offloaded arrays would count
    # as device memory).
    out += compile_case(StepCase("qwen2_5_7b_video64", "qwen2_5_7b", VIDEO64, batch=32,
                                 mesh={"data": 1}, steps=("decode", "decode_offload")),
                        tg.tpu("v5p:1x1"), only=only)
  return out

"""Benchmark: gaze attention kernels against dense attention, on the same inputs in one run.

Implementations compared per case: dense cuDNN (``jax.nn.dot_product_attention(...,
implementation="cudnn")``), dense XLA (``implementation="xla"``), our dense-mask reference, our
xla gather path, and our Pallas kernels (``pallas_kernels.ops``). Cases that cannot run on the
current backend (cuDNN without a CUDA GPU, the reference when its mask would not fit) are
skipped with a note in the JSON.

Shapes (default): the Qwen3-4B head layout (32 query heads, 8 KV heads, head dim 128, bf16),
6x6 = 36-token regions, 4 context tokens per frame. Cases:
  * decode: one new token, batch 1 / 8 / 32, visual cache 64x144 (9,216) and 64x576 (36,864)
    tokens, keep 10% and 25% of the regions, group routing, head routing with independent
    scores and head routing with scores correlated across a group's heads. Reported: time,
    K/V bytes read, achieved bandwidth, speed-up over cuDNN dense, the union fraction u of the
    regions a KV head reads, and the routing time (scores + top-K) on its own.
  * train: fwd + bwd of one attention layer, 4 images x 576 + 1,024 text and 16 frames x 576 +
    2,048 text; the Pallas path runs the dense (patch) rows with cuDNN (``dense_rows``) and the
    routed text and context rows with the kernels; also reported without that split.
  * prefill: routed prefill of 8,192 text tokens over a 36,864-token visual cache (forward),
    with independent selections per token (group and head routing) and with selections shared
    by the tokens of 16-token tiles (the kernels' best case); also with 4x larger routed tiles.
Times are medians over ``--repeats`` runs of ``--inner`` back-to-back calls (asynchronous
dispatch, one block at the end), after a warm-up. Selections come from synthetic scores (the
same ids feed every gaze implementation), so that u can be controlled; routing is timed apart.

  python benchmarks/attention.py                 # the full set (meant for an H100)
  python benchmarks/attention.py --small         # CPU check: tiny shapes, ~1-2 minutes
  python benchmarks/attention.py --table benchmarks/results/attention_gpu.json   # Markdown
  python benchmarks/attention.py --readme README.md   # also put the table into the README
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gaze_jax.gaze import (Image, LayoutSpec, Selection, Text, Video, build_layout,  # noqa: E402
                           gaze_attention, region_descriptors, route, select_top_k,
                           slots_needed)
from gaze_jax.gaze.layout import PATCH  # noqa: E402
from benchmarks.readme import replace_between  # noqa: E402
from benchmarks.timing import median_seconds  # noqa: E402
from pallas_kernels import ops  # noqa: E402
from pallas_kernels import plan as kplan  # noqa: E402

IMPLS = ("cudnn_dense", "xla_dense", "reference", "xla_gather", "pallas")

# What the design should reach on an H100 (the targets); see docs in the JSON.
TARGETS = {
    "decode_10pct_36864_b8_group": "pallas >= 7x faster than cuDNN dense and >= 2.4 TB/s on "
                                   "the bytes it reads",
    "train_step": "attention fwd+bwd <= 1.15x cuDNN dense",
    "routed_prefill": "pallas >= 3x faster than dense",
}


@dataclasses.dataclass(frozen=True)
class Shapes:
  heads: int = 32
  kv_heads: int = 8
  head_dim: int = 128
  dtype: str = "bfloat16"
  region: int = 6
  num_ctx: int = 4


def _run_impl(name, fn, args, a, extra=None):
  """Times one implementation; failures (e.g. out of memory) become a note."""
  try:
    t = median_seconds(jax.jit(fn), *args, repeats=a.repeats, inner=a.inner)
  except Exception as e:  # noqa: BLE001 - a benchmark records why a case could not run
    msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
    print(f"    {name}: failed: {msg}", flush=True)
    return {"skipped": f"failed: {msg}"}
  rec = {"time_s": t}
  rec.update(extra or {})
  print(f"    {name}: {t * 1e3:.3f} ms", flush=True)
  return rec


def _skip(reason):
  return {"skipped": reason}


# ---------------------------------------------------------------- inputs


def _layout(segments, sh: Shapes, batch: int):
  rs = (sh.region, sh.region)
  probe = LayoutSpec(seq_len=1, max_regions=1, max_images=1, region_shape=rs,
                     num_ctx=sh.num_ctx)
  S = slots_needed(segments, probe)
  frames = sum(s.frames if isinstance(s, Video) else 1 for s in segments
               if isinstance(s, (Image, Video)))
  nr = 0
  for s in segments:
    if isinstance(s, (Image, Video)):
      f = s.frames if isinstance(s, Video) else 1
      nr += f * -(-s.gh // sh.region) * -(-s.gw // sh.region)
  text = sum(s.length for s in segments if isinstance(s, Text))
  spec = LayoutSpec(seq_len=S, max_regions=nr, max_images=frames, region_shape=rs,
                    num_ctx=sh.num_ctx, max_nonvisual=text + frames * sh.num_ctx)
  return build_layout([segments] * batch, spec)


def _synthetic_ids(key, layout, q_index, *, heads, kv_heads, top_k, routing, corr,
                   token_tile=1):
  """Top-K ids from synthetic scores: per head ``corr * group + sqrt(1 - corr^2) * own``;
  with ``token_tile > 1`` the tokens of each tile of that many share their scores (a stand-in
  for the correlated selections of neighbouring question tokens)."""
  B, T = q_index.shape
  NR = layout.max_regions
  G = heads // kv_heads
  k1, k2 = jax.random.split(key)
  n = -(-T // token_tile)
  shared = jnp.repeat(jax.random.normal(k1, (B, n, kv_heads, 1, NR)), token_tile, 1)[:, :T]
  own = jnp.repeat(jax.random.normal(k2, (B, n, kv_heads, G, NR)), token_tile, 1)[:, :T]
  scores = (corr * shared + math.sqrt(max(0.0, 1 - corr * corr)) * own).reshape(B, T, heads, NR)
  pos = jnp.take_along_axis(jnp.asarray(layout.position), q_index, axis=1)
  cand = jnp.asarray(layout.region_valid)[:, None, :] & (
      jnp.asarray(layout.region_last_pos)[:, None, :] < pos[:, :, None])
  return select_top_k(scores, cand, top_k=top_k, routing=routing, num_kv_heads=kv_heads).ids


def _qkv(key, B, T, S, sh: Shapes):
  dt = jnp.dtype(sh.dtype)
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (B, T, sh.heads, sh.head_dim), dt)
  k = jax.random.normal(kk, (B, S, sh.kv_heads, sh.head_dim), dt)
  v = jax.random.normal(kv, (B, S, sh.kv_heads, sh.head_dim), dt)
  return q, k, v


def _mem_reference(B, T, S, sh: Shapes) -> float:
  """Bytes the reference materialises (bool mask, float32 logits and probabilities)."""
  return B * T * sh.heads * S * 9.0


def _has_cudnn() -> bool:
  return jax.default_backend() == "gpu"


# ---------------------------------------------------------------- decode


def bench_decode(a, sh: Shapes, cfg: ops.KernelConfig, *, batch, frames, grid, keep, routing,
                 corr):
  segs = [Text(32), Video(frames, grid, grid), Text(a.prompt), Text(1, generated=True)]
  layout = _layout(segs, sh, batch)
  S, NR = layout.seq_len, layout.max_regions
  K = max(1, math.ceil(keep * NR))
  kind = np.asarray(layout.kind)
  q_index = jnp.asarray(np.full((batch, 1), S - 1), jnp.int32)
  assert kind[0, S - 1] == 0
  key = jax.random.PRNGKey(batch * 1000 + frames * grid + int(keep * 100))
  q, k, v = _qkv(key, batch, 1, S, sh)
  ids = _synthetic_ids(jax.random.fold_in(key, 1), layout, q_index, heads=sh.heads,
                       kv_heads=sh.kv_heads, top_k=K, routing=routing, corr=corr)
  routed = jnp.ones((batch, 1), bool)
  itemsize = jnp.dtype(sh.dtype).itemsize
  dense_bytes = batch * S * sh.kv_heads * sh.head_dim * 2 * itemsize
  visual = frames * grid * grid
  print(f"  decode B={batch} visual={visual} keep={keep} K={K} routing={routing} corr={corr}",
        flush=True)

  plan, prep, stats = _prepare(layout, q, k, v, ids, routed, q_index, cfg, sh)
  gaze_bytes = float(jnp.sum(stats["bytes_read"]))
  u = float(jnp.mean(stats["union_fraction"]))

  rec = {"case": "decode", "batch": batch, "visual_tokens": visual, "frames": frames,
         "grid": grid, "keep": keep, "top_k": K, "regions": NR, "routing": routing,
         "score_corr": corr, "seq_len": S, "union_fraction": u, "impls": {}}
  impls = rec["impls"]
  bw = lambda b: (lambda t: {"bytes": b, "tb_per_s": b / t / 1e12})
  dense_fn = lambda impl: (lambda q, k, v: jax.nn.dot_product_attention(q, k, v,
                                                                       implementation=impl))
  if _has_cudnn():
    impls["cudnn_dense"] = _run_impl("cudnn_dense", dense_fn("cudnn"), (q, k, v), a)
  else:
    impls["cudnn_dense"] = _skip(f"cuDNN needs a CUDA GPU (backend={jax.default_backend()})")
  impls["xla_dense"] = _run_impl("xla_dense", dense_fn("xla"), (q, k, v), a)
  sel = Selection(ids)
  gz = lambda impl: (lambda q, k, v: gaze_attention(
      q, k, v, None, None, layout, top_k=K, selection=sel, q_index=q_index,
      implementation=impl))
  if _mem_reference(batch, 1, S, sh) * sh.kv_heads < a.max_reference_bytes:
    impls["reference"] = _run_impl("reference", gz("reference"), (q, k, v), a)
  else:
    impls["reference"] = _skip("reference mask and repeated K/V would not fit")
  impls["xla_gather"] = _run_impl("xla_gather", gz("xla"), (q, k, v), a)
  impls["pallas"] = _run_pallas(a, layout, plan, prep, ids, routed, q_index, cfg, q, k, v)
  for name in ("cudnn_dense", "xla_dense"):
    if "time_s" in impls[name]:
      impls[name].update(bw(dense_bytes)(impls[name]["time_s"]))
  if "time_s" in impls["pallas"]:
    impls["pallas"].update(bw(gaze_bytes)(impls["pallas"]["time_s"]))
    impls["pallas"]["kernel_tb_per_s"] = gaze_bytes / impls["pallas"]["kernel_s"] / 1e12
  # Routing on its own: scores against cached descriptors + causal top-K.
  desc = region_descriptors(k, layout)
  q_route = q.astype(jnp.float32)
  pos = jnp.take_along_axis(jnp.asarray(layout.position), q_index, axis=1)
  rec["routing_s"] = _run_impl("routing", lambda qr, d: route(
      qr, d, layout.region_valid, layout.region_last_pos, pos, routed, top_k=K,
      routing=routing).ids, (q_route, desc), a).get("time_s")
  _speedups(rec)
  return rec


def _plan(layout, q, k, routed, q_index, cfg):
  """The kernels' plan (once per layout, shared by the layers of a step)."""
  return kplan.build_plan(layout, q_index, routed, heads=(q.shape[2], k.shape[2], q.shape[3]),
                          dtype=q.dtype, config=cfg)


def _prepare(layout, q, k, v, ids, routed, q_index, cfg, sh):
  """The plan, the packed kernel operands and what the kernels read."""
  plan = jax.jit(lambda: _plan(layout, q, k, routed, q_index, cfg))()
  prep = ops.prepare(q, k, v, ids, plan, unique=True)
  stats = ops.read_stats(prep, itemsize=jnp.dtype(sh.dtype).itemsize)
  return plan, prep, stats


def _run_pallas(a, layout, plan, prep, ids, routed, q_index, cfg, q, k, v, extra=None):
  """The whole op (routed lists, packing, kernels, merges; plan given) and the kernels alone;
  the plan's build is timed apart (it is shared by all layers of a step)."""
  rec = _run_impl("pallas", lambda q, k, v, p: ops.attention(
      q, k, v, layout, ids, plan=p, unique_ids=True), (q, k, v, plan), a, extra)
  if "time_s" not in rec:
    return rec
  st, shape = prep.static, prep.shape
  kern = _run_impl("  kernels only", lambda q, k, v, aux: ops.Prepared(
      st, q, k, v, aux, shape).forward(), (prep.q, prep.k, prep.v, prep.aux), a)
  rec["kernel_s"] = kern.get("time_s")
  rec["plan_s"] = _run_impl("  plan", lambda: _plan(layout, q, k, routed, q_index, cfg), (),
                            a).get("time_s")
  return rec


def _speedups(rec):
  base = rec["impls"].get("cudnn_dense", {}).get("time_s")
  ref_name = "cudnn_dense"
  if base is None:
    base = rec["impls"].get("xla_dense", {}).get("time_s")
    ref_name = "xla_dense"
  rec["speedup_baseline"] = ref_name if base is not None else None
  for r in rec["impls"].values():
    if base is not None and "time_s" in r:
      r["speedup"] = base / r["time_s"]


# ---------------------------------------------------------------- training step


def bench_train(a, sh: Shapes, cfg: ops.KernelConfig, *, name, segments, keep, routing):
  layout = _layout(segments, sh, a.train_batch)
  B, S, NR = a.train_batch, layout.seq_len, layout.max_regions
  K = max(1, math.ceil(keep * NR))
  key = jax.random.PRNGKey(7)
  q, k, v = _qkv(key, B, S, S, sh)
  q_index = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  ids = _synthetic_ids(jax.random.fold_in(key, 1), layout, q_index, heads=sh.heads,
                       kv_heads=sh.kv_heads, top_k=K, routing=routing, corr=0.0)
  kind = jnp.asarray(layout.kind)
  routed = kind == 0
  ids = jnp.where(routed[:, :, None, None], ids, -1)
  w = jax.random.normal(jax.random.fold_in(key, 2), q.shape, q.dtype)
  print(f"  train {name}: B={B} S={S} K={K} routing={routing}", flush=True)

  def step(attn):
    def loss(q, k, v):
      return jnp.sum((attn(q, k, v) * w).astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))

  rec = {"case": "train", "name": name, "batch": B, "seq_len": S, "regions": NR, "top_k": K,
         "keep": keep, "routing": routing, "impls": {}}
  impls = rec["impls"]
  dense = lambda impl: step(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation=impl))
  if _has_cudnn():
    impls["cudnn_dense"] = _run_impl("cudnn_dense", dense("cudnn"), (q, k, v), a)
  else:
    impls["cudnn_dense"] = _skip(f"cuDNN needs a CUDA GPU (backend={jax.default_backend()})")
  if B * sh.heads * S * S * 12.0 < a.max_reference_bytes:
    impls["xla_dense"] = _run_impl("xla_dense", dense("xla"), (q, k, v), a)
  else:
    impls["xla_dense"] = _skip("[B, H, S, S] logits and their gradient would not fit")
  sel = Selection(ids)
  gz = lambda impl, chunk=None: step(lambda q, k, v: gaze_attention(
      q, k, v, None, None, layout, top_k=K, selection=sel, implementation=impl,
      query_chunk=chunk))
  if _mem_reference(B, S, S, sh) * 3 < a.max_reference_bytes:
    impls["reference"] = _run_impl("reference", gz("reference"), (q, k, v), a)
  else:
    impls["reference"] = _skip("the [B, S, Hq, S] mask, logits and gradients would not fit")
  impls["xla_gather"] = _run_impl("xla_gather", gz("xla", a.query_chunk), (q, k, v), a)
  dense_impl = "cudnn" if _has_cudnn() else "xla"
  hyb = dataclasses.replace(cfg, dense_rows=dense_impl, dense_len=_dense_len(layout))
  plans = {c: jax.jit(lambda c=c: _plan(layout, q, k, routed, None, c))() for c in (hyb, cfg)}
  impls["pallas"] = _run_impl("pallas", lambda q, k, v, p: step(lambda q, k, v: ops.attention(
      q, k, v, layout, ids, plan=p, unique_ids=True))(q, k, v),
      (q, k, v, plans[hyb]), a, {"dense_rows": dense_impl})
  impls["pallas_kernels_only"] = _run_impl(
      "pallas_kernels_only", lambda q, k, v, p: step(lambda q, k, v: ops.attention(
          q, k, v, layout, ids, plan=p, unique_ids=True))(q, k, v),
      (q, k, v, plans[cfg]), a, {"note": "every row through the kernels (no dense-row split)"})
  _speedups(rec)
  return rec


def _dense_len(layout) -> int:
  """Static bound on the positions of the dense rows (patch rows here): the last patch + 1."""
  kind, pos = np.asarray(layout.kind), np.asarray(layout.position)
  return int(pos[kind == PATCH].max()) + 1


# ---------------------------------------------------------------- routed prefill


def bench_prefill(a, sh: Shapes, cfg: ops.KernelConfig, *, text, frames, grid, keep, routing,
                  corr, token_tile=1):
  segs = [Text(32), Video(frames, grid, grid), Text(text)]
  layout = _layout(segs, sh, 1)
  S, NR = layout.seq_len, layout.max_regions
  K = max(1, math.ceil(keep * NR))
  T = text
  q_index = jnp.asarray(np.arange(S - T, S)[None], jnp.int32)
  key = jax.random.PRNGKey(11)
  q, k, v = _qkv(key, 1, T, S, sh)
  ids = _synthetic_ids(jax.random.fold_in(key, 1), layout, q_index, heads=sh.heads,
                       kv_heads=sh.kv_heads, top_k=K, routing=routing, corr=corr,
                       token_tile=token_tile)
  routed = jnp.ones((1, T), bool)
  print(f"  prefill T={T} visual={frames * grid * grid} K={K} routing={routing} "
        f"token_tile={token_tile}", flush=True)
  rec = {"case": "prefill", "text_tokens": T, "visual_tokens": frames * grid * grid,
         "seq_len": S, "regions": NR, "top_k": K, "keep": keep, "routing": routing,
         "score_corr": corr, "token_tile": token_tile, "impls": {},
         "note": "dense baselines attend every query to all S keys (no causal mask: "
                 "cuDNN's causal mask is top-left aligned for T != S); the exact causal "
                 "dense work is (S - T/2) / S of that"}
  impls = rec["impls"]
  dense = lambda impl: (lambda q, k, v: jax.nn.dot_product_attention(q, k, v,
                                                                     implementation=impl))
  if _has_cudnn():
    impls["cudnn_dense"] = _run_impl("cudnn_dense", dense("cudnn"), (q, k, v), a)
  else:
    impls["cudnn_dense"] = _skip(f"cuDNN needs a CUDA GPU (backend={jax.default_backend()})")
  if sh.heads * T * S * 8.0 < a.max_reference_bytes:
    impls["xla_dense"] = _run_impl("xla_dense", dense("xla"), (q, k, v), a)
  else:
    impls["xla_dense"] = _skip("[H, T, S] logits would not fit")
  sel = Selection(ids)
  gz = lambda impl, chunk=None: (lambda q, k, v: gaze_attention(
      q, k, v, None, None, layout, top_k=K, selection=sel, q_index=q_index,
      implementation=impl, query_chunk=chunk))
  if _mem_reference(1, T, S, sh) * 2 < a.max_reference_bytes:
    impls["reference"] = _run_impl("reference", gz("reference"), (q, k, v), a)
  else:
    impls["reference"] = _skip("the [T, Hq, S] mask and logits would not fit")
  impls["xla_gather"] = _run_impl("xla_gather", gz("xla", a.query_chunk), (q, k, v), a)
  plan, prep, stats = _prepare(layout, q, k, v, ids, routed, q_index, cfg, sh)
  rec["union_fraction_per_tile"] = float(jnp.mean(stats["union_fraction"]))
  impls["pallas"] = _run_pallas(
      a, layout, plan, prep, ids, routed, q_index, cfg, q, k, v,
      {"routed_rows": cfg.routed_rows, "bytes": float(jnp.sum(stats["bytes_read"]))})
  big = dataclasses.replace(cfg, routed_rows=4 * cfg.routed_rows)
  big_plan = jax.jit(lambda: _plan(layout, q, k, routed, q_index, big))()
  impls["pallas_routed_rows_x4"] = _run_impl(
      "pallas_routed_rows_x4", lambda q, k, v, p: ops.attention(
          q, k, v, layout, ids, plan=p, unique_ids=True), (q, k, v, big_plan), a, {"routed_rows": big.routed_rows})
  _speedups(rec)
  return rec


# ---------------------------------------------------------------- report


def markdown(report: dict) -> str:
  """Markdown tables (one per case kind) from a report written by this script."""
  fmt = lambda r: ("skip" if "time_s" not in r else
                   f"{r['time_s'] * 1e3:.3f}" + (f" ({r['speedup']:.2f}x)" if "speedup" in r
                                                 else ""))
  lines = [f"Backend `{report['backend']}` ({report['device']}), jax {report['jax']}, "
           f"{report['shapes']['heads']}/{report['shapes']['kv_heads']} heads, head dim "
           f"{report['shapes']['head_dim']}, {report['shapes']['dtype']}. Times in ms "
           "(speed-up over cuDNN dense, or XLA dense where cuDNN did not run).", ""]
  dec = [r for r in report["results"] if r["case"] == "decode"]
  if dec:
    lines += ["| batch | visual | keep | routing | u | cuDNN | XLA dense | reference | "
              "xla gather | Pallas | Pallas TB/s (op / kernels) |", "|" + "---|" * 11]
    for r in dec:
      im = r["impls"]
      routing = r["routing"] + (f" (corr {r['score_corr']})" if r["score_corr"] else "")
      tbs, ktbs = im["pallas"].get("tb_per_s"), im["pallas"].get("kernel_tb_per_s")
      bw = "-" if tbs is None else f"{tbs:.3g} / {ktbs:.3g}"
      lines.append(f"| {r['batch']} | {r['visual_tokens']} | {r['keep']:.0%} | {routing} | "
                   f"{r['union_fraction']:.2f} | " + " | ".join(fmt(im[n]) for n in IMPLS)
                   + f" | {bw} |")
    lines.append("")
  tr = [r for r in report["results"] if r["case"] == "train"]
  if tr:
    lines += ["| training step (fwd+bwd) | seq | keep | cuDNN | XLA dense | reference | "
              "xla gather | Pallas (+cuDNN rows) | Pallas only |", "|" + "---|" * 9]
    for r in tr:
      im = r["impls"]
      lines.append(f"| {r['name']} | {r['seq_len']} | {r['keep']:.0%} | "
                   + " | ".join(fmt(im[n]) for n in IMPLS) + f" | "
                   f"{fmt(im['pallas_kernels_only'])} |")
    lines.append("")
  pf = [r for r in report["results"] if r["case"] == "prefill"]
  if pf:
    lines += ["| routed prefill | visual | keep | routing | cuDNN | XLA dense | reference | "
              "xla gather | Pallas | Pallas (4x rows) |", "|" + "---|" * 10]
    for r in pf:
      im = r["impls"]
      routing = r["routing"] + (f", shared by {r['token_tile']} tokens"
                                if r.get("token_tile", 1) > 1 else "")
      lines.append(f"| {r['text_tokens']} text | {r['visual_tokens']} | {r['keep']:.0%} | "
                   f"{routing} | " + " | ".join(fmt(im[n]) for n in IMPLS)
                   + f" | {fmt(im['pallas_routed_rows_x4'])} |")
  return "\n".join(lines) + "\n"


README_BEGIN, README_END = "<!-- bench:attention -->", "<!-- /bench:attention -->"


def update_readme(path: Path, table: str) -> None:
  """Writes ``table`` between the ``README_BEGIN`` / ``README_END`` marker lines of ``path``."""
  replace_between(path, README_BEGIN, README_END, table)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--small", action="store_true", help="tiny shapes for a CPU check")
  ap.add_argument("--headline", action="store_true",
                  help="only the cases of the targets (make gpu-check: ~8 minutes on an H100):"
                       " decode at 36,864 and 9,216 visual tokens, batch 8, 10%% kept; the "
                       "training step over 4 images x 576 + 1,024 text; routed prefill")
  ap.add_argument("--cases", default="decode,train,prefill")
  ap.add_argument("--repeats", type=int, default=None)
  ap.add_argument("--inner", type=int, default=None, help="calls per timed run")
  ap.add_argument("--prompt", type=int, default=None, help="text tokens after the video")
  ap.add_argument("--train-batch", type=int, default=1)
  ap.add_argument("--query-chunk", type=int, default=None, help="xla gather path row chunks")
  ap.add_argument("--max-reference-gb", type=float, default=None)
  ap.add_argument("--out", default=None)
  ap.add_argument("--table", default=None, help="print the Markdown table of a JSON report")
  ap.add_argument("--readme", default=None,
                  help=f"also write the table into this file between {README_BEGIN} and "
                       f"{README_END}")
  a = ap.parse_args(argv)
  if a.table:
    table = markdown(json.loads(Path(a.table).read_text()))
    print(table, end="")
    if a.readme:
      update_readme(Path(a.readme), table)
    return

  small = a.small
  sh = Shapes(heads=4, kv_heads=2, head_dim=32, dtype="float32") if small else Shapes()
  a.repeats = a.repeats or (1 if small else 5)
  a.inner = a.inner or (1 if small else 10)
  a.prompt = a.prompt or (16 if small else 256)
  a.query_chunk = a.query_chunk or (64 if small else 256)
  a.max_reference_bytes = (a.max_reference_gb or (2 if small else 24)) * 2 ** 30
  # Decode splits: sized by ops.default_splits from the kernel's compiled occupancy.
  cfg = ops.KernelConfig(splits=4 if small else None)
  cases = set(a.cases.split(","))
  head = a.headline and not small
  print(f"backend={jax.default_backend()} device={jax.devices()[0]} small={small}", flush=True)
  results = []
  keeps = (0.25,) if small else (0.1,) if head else (0.1, 0.25)
  if "decode" in cases:
    visuals = [(2, 12)] if small else [(64, 12), (64, 24)]
    batches = (1, 2) if small else (8,) if head else (1, 8, 32)
    routings = [("group", 0.0), ("head", 0.0)] + ([] if small or head else [("head", 0.8)])
    for frames, grid in visuals:
      for batch in batches:
        for keep in keeps:
          for routing, corr in routings:
            if small and batch == 2 and routing == "head":
              continue
            results.append(bench_decode(a, sh, cfg, batch=batch, frames=frames, grid=grid,
                                        keep=keep, routing=routing, corr=corr))
  if "train" in cases:
    sets = ([("2 images x 144 + 48 text", [Text(16), Image(12, 12), Image(12, 12),
                                            Text(32, generated=True)])] if small else
            [("4 images x 576 + 1,024 text", [Text(64)] + [Image(24, 24)] * 4
              + [Text(448), Text(512, generated=True)]),
             ("16 frames x 576 + 2,048 text", [Text(64), Video(16, 24, 24), Text(1472),
                                               Text(512, generated=True)])])
    sets = sets[:1] if head else sets
    for name, segs in sets:
      for keep in keeps:
        results.append(bench_train(a, sh, cfg, name=name, segments=segs, keep=keep,
                                   routing="group"))
  if "prefill" in cases:
    text, frames, grid = (48, 2, 12) if small else (8192, 64, 24)
    # Independent selections per token (group / head routing), and selections shared by the
    # tokens of 16-token tiles (what the kernels reach when neighbouring tokens agree).
    for routing, token_tile in (("group", 1), ("head", 1), ("group", 16)):
      results.append(bench_prefill(a, sh, cfg, text=text, frames=frames, grid=grid,
                                   keep=keeps[0], routing=routing, corr=0.0,
                                   token_tile=token_tile))
  report = {
      "benchmark": "gaze_attention_kernels", "backend": jax.default_backend(),
      "device": str(jax.devices()[0]), "jax": jax.__version__,
      "python": platform.python_version(), "small": small, "headline": head,
      "shapes": dataclasses.asdict(sh), "kernel_config": dataclasses.asdict(cfg),
      "repeats": a.repeats, "inner": a.inner, "targets": TARGETS,
      "notes": ["pallas runs in interpret mode on CPU: its CPU times only show that it runs",
                "bytes are K/V bytes read (dense: the whole cache; pallas: the listed blocks' "
                "rows, masked window rows excluded)"] if jax.default_backend() == "cpu" else
               ["bytes are K/V bytes read (dense: the whole cache; pallas: the listed "
                "blocks' rows, masked window rows excluded)"],
      "results": results,
  }
  suffix = "_small" if small else ""
  out = Path(a.out or Path(__file__).resolve().parent / "results"
             / f"attention_{jax.default_backend()}{suffix}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2) + "\n")
  table = markdown(report)
  print(table)
  print(f"wrote {out}")
  if a.readme:
    update_readme(Path(a.readme), table)
    print(f"updated the table in {a.readme}")


if __name__ == "__main__":
  main()

"""Benchmark: decoding with gaze attention against the model's own dense attention, same weights.

For each decoder shape (SmolLM2-135M; the Qwen3-4B decoder with its layers cut to ``--layers``
to fit a CPU's memory), image count (16 and 64 images of 24 x 24 tokens: 9,216 and 36,864
visual tokens) and batch:

* **decode tokens/s**: the loop ``generate`` runs, one token per step through
  ``MLLM.decode`` (the layout ``for_decoding``, the plan's layout-only part built once, the KV
  caches donated and carried), over a cache filled with random values (a prefill of 36,864
  tokens would take minutes a layer on a CPU), for dense attention, gaze at K = 1, 10%, 25% and
  all regions, and the same prompt without images (``no images``); the rows are interleaved
  ``--repeats`` times and the medians kept;
* **the bytes model**: the bytes one step reads (weights, and the KV entries: all valid slots
  for dense; the text and context keys, the K regions per KV head and the region descriptors
  for gaze), fitted as ``t = t0 + bytes / bandwidth`` on the dense step and the step without
  images; each gaze step's time against that prediction, and the share of the ideal speed-up
  reached (the measured gaze / dense speed-up over the model's ``t(dense) / t(gaze bytes)``);
* **time to first token** (``--ttft``): ``generate`` with one new token (vision tower, prefill
  and the first pick) at 16 images with a small vision tower, gaze against dense.

Writes JSON (default ``benchmarks/results/generate_<backend>.json``) and, with ``--readme``, the
README table. ``--gpu`` runs the Pallas kernels and the xla path on a GPU (``--impls``).

  python benchmarks/generate.py --readme README.md            # CPU, xla path
  python benchmarks/generate.py --gpu --readme README.md      # a GPU: pallas and xla
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gaze_jax.gaze import Image, Text, build_layout, slots_needed  # noqa: E402
from gaze_jax.gaze.layout import TEXT, CTX, PAD  # noqa: E402
from gaze_jax.model.config import GazeConfig, MLLMConfig, VisionConfig  # noqa: E402
from gaze_jax.model.presets import get_preset  # noqa: E402

GRID, REGION = 24, (6, 6)          # 576 tokens per image, 16 regions of 36
PROMPT, QUESTION, NEW = 20, 12, 16
SMALL_VISION = VisionConfig(image_size=384, patch_size=16, hidden_size=64, intermediate_size=128,
                            num_layers=1, num_heads=2)


def decoder_shapes(args) -> dict:
  """name -> DecoderConfig of ``--models``: SmolLM2-135M (``--smol_layers``, all 30 by
  default), the Qwen3-4B decoder cut to ``--qwen_layers``."""
  smol = get_preset("smollm2_135m").decoder
  qwen = get_preset("cambrian_4b").decoder
  shapes = {"smollm2_135m": dataclasses.replace(smol, num_layers=args.smol_layers),
            "qwen3_4b": dataclasses.replace(qwen, num_layers=args.qwen_layers)}
  return {(n if n == "smollm2_135m" else f"{n}_{args.qwen_layers}l"): shapes[n]
          for n in args.models.split(",")}


def make_model(decoder, attention: str, top_k, impl: str, vision=None, query_chunk=None):
  from flax import nnx

  from gaze_jax.model.mllm import MLLM
  gaze = GazeConfig(attention=attention, top_k=top_k, routing="group", region_shape=REGION,
                    num_ctx=4, implementation=impl, query_chunk=query_chunk)
  return MLLM(MLLMConfig(decoder=decoder, vision=vision, gaze=gaze), rngs=nnx.Rngs(0))


def layout_of(images: int, batch: int):
  """The prompt: text, ``images`` images, the question, 16 reserved new tokens; ``for_decoding``."""
  segs = [Text(PROMPT)] + [Image(GRID, GRID)] * images + [Text(QUESTION),
                                                         Text(NEW, generated=True)]
  from gaze_jax.gaze import LayoutSpec
  nr = max(1, images * (GRID // REGION[0]) * (GRID // REGION[1]))
  spec = LayoutSpec(seq_len=1, max_regions=nr, max_images=max(1, images), region_shape=REGION,
                    num_ctx=4)
  spec = dataclasses.replace(spec, seq_len=slots_needed(segs, spec), max_nonvisual=None)
  return build_layout([segs] * batch, spec).for_decoding()


def step_bytes(decoder, layout, attention: str, k: int) -> float:
  """Bytes one decode step reads: the weights, and the KV entries (float32)."""
  Hkv, D, L = decoder.num_kv_heads, decoder.head_dim, decoder.num_layers
  E, F, V, H = decoder.hidden_size, decoder.intermediate_size, decoder.vocab_size, decoder.num_heads
  weights = L * (E * H * D + 2 * E * Hkv * D + H * D * E + 3 * E * F) + V * E
  kind = np.asarray(layout.kind)
  B = kind.shape[0]
  entry = 2 * Hkv * D                                   # k and v of one slot, all KV heads
  if attention == "dense":
    kv = L * (kind != PAD).sum() * entry
  else:
    nonvisual = ((kind == TEXT) | (kind == CTX)).sum()
    regions = B * min(k, layout.max_regions) * layout.region_size
    descriptors = B * layout.max_regions * Hkv * D
    kv = L * ((nonvisual + regions) * entry + descriptors)
  return 4.0 * (weights + kv)


def random_caches(decoder, layout, rng):
  """One cache of random values for every row of a case (dense ignores the descriptors): the
  rows pass it on, donated, so that only one copy is alive."""
  from gaze_jax.model.attention import LayerCache
  B, S = layout.kind.shape
  shape = (B, S, decoder.num_kv_heads, decoder.head_dim)
  draw = lambda s: jnp.asarray(rng.standard_normal(s, np.float32))
  return [LayerCache(draw(shape), draw(shape),
                     draw((B, layout.max_regions, decoder.num_kv_heads, decoder.head_dim)))
          for _ in range(decoder.num_layers)]


def offloaded_caches(model, layout, caches):
  """``caches`` (one ``LayerCache`` per layer) offloaded as ``generate(offload=True)`` does
  after its prefill (``gaze_jax.model.offload``), with the model's region cache size."""
  from gaze_jax.model.offload import offload, offload_capacity
  cap = offload_capacity(model.cfg, layout.max_regions)
  move = jax.jit(lambda c: offload(c.k, c.v, c.descriptors, layout, cap))
  return [move(c) for c in caches]


def decode_runner(model, layout, steps: int, offloaded: bool = False):
  """A jitted function running ``steps`` decode steps as generate's loop does (greedy), the
  caches donated (``OffloadedCache``s with ``offloaded``); returns (run(caches) -> (tokens,
  caches))."""
  from flax import nnx
  gd, state = nnx.split(model)
  first = jnp.asarray(np.argmax(np.asarray(layout.generated), axis=1), jnp.int32)

  def run(state, caches):
    m = nnx.merge(gd, state)
    plan_base = m.decode_plan(layout, first[:, None], offloaded=offloaded)

    def body(i, carry):
      tok, caches = carry
      logits, caches = m.decode(tok[:, None], (first + i)[:, None], layout, caches,
                                plan_base=plan_base)
      return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), caches

    tok0 = jnp.ones(first.shape, jnp.int32)
    return jax.lax.fori_loop(0, steps, body, (tok0, caches))

  f = jax.jit(run, donate_argnums=(1,))
  return lambda caches: f(state, caches)


def time_rows(rows: dict, caches: dict, repeats: int) -> dict:
  """rows: name -> (run, cache key); caches: key -> the cache those rows pass on. Medians of
  seconds per call, the rows interleaved (a first round compiles and warms up)."""
  samples = {name: [] for name in rows}
  for r in range(repeats + 1):
    for name, (run, key) in rows.items():
      t0 = time.perf_counter()
      out, caches[key] = run(caches[key])
      jax.block_until_ready(out)
      if r:
        samples[name].append(time.perf_counter() - t0)
  return {name: statistics.median(s) for name, s in samples.items()}


def decode_case(decoder, images: int, batch: int, keeps, impl: str, steps: int, repeats: int,
                rng, bounds: bool = True, offload: bool = False) -> dict:
  """The rows of one shape (see the module docstring); with ``offload`` also each of ``keeps``
  with the visual KV in host memory (``<K> offloaded``: its region cache's hit rate and the
  bytes it copies from host memory per token)."""
  layout = layout_of(images, batch)
  text_layout = layout_of(0, batch)
  NR = layout.max_regions
  ks = {f"K={int(p * 100)}%": max(1, int(np.ceil(p * NR))) for p in keeps}
  if bounds:                           # K = 1 and all regions: the range the model must follow
    ks = {"K=1": 1, **ks, "K=all": NR}
  rows, meta = {}, {}
  caches = {"text": random_caches(decoder, text_layout, rng),
            "images": random_caches(decoder, layout, rng)}
  dense = make_model(decoder, "dense", 1, impl)
  rows["no images"] = (decode_runner(dense, text_layout, steps), "text")
  meta["no images"] = step_bytes(decoder, text_layout, "dense", 0)
  rows["dense"] = (decode_runner(dense, layout, steps), "images")
  meta["dense"] = step_bytes(decoder, layout, "dense", 0)
  for name, k in ks.items():
    rows[name] = (decode_runner(make_model(decoder, "gaze", k, impl), layout, steps), "images")
    meta[name] = step_bytes(decoder, layout, "gaze", k)
  offloaded = {}
  for p in (keeps if offload else ()):
    name = f"K={int(p * 100)}%"
    model = make_model(decoder, "gaze", ks[name], impl)
    key = offloaded[name] = f"{name} offloaded"
    caches[key] = offloaded_caches(model, layout, random_caches(decoder, layout, rng))
    rows[key] = (decode_runner(model, layout, steps, offloaded=True), key)
    meta[key] = meta[name]
  secs = time_rows(rows, caches, repeats)
  step = {n: s / steps for n, s in secs.items()}
  # The bytes model, fitted on the dense step and the step without images.
  bw = (meta["dense"] - meta["no images"]) / max(step["dense"] - step["no images"], 1e-12)
  t0 = step["no images"] - meta["no images"] / bw
  out = {"images": images, "visual_tokens": images * GRID * GRID, "batch": batch,
         "regions": NR, "seq_len": layout.seq_len, "steps": steps, "fit": {
             "bandwidth_bytes_per_s": bw, "t0_s": t0}, "rows": {}}
  for name in rows:
    pred = t0 + meta[name] / bw
    row = {"step_s": step[name], "tokens_per_s": batch / step[name], "bytes": meta[name],
           "predicted_s": pred, "vs_prediction": step[name] / pred}
    if name not in ("dense", "no images"):
      row["k"] = ks[name.removesuffix(" offloaded")]
      row["speedup"] = step["dense"] / step[name]
      # What the bytes allow: the fitted model's dense time over its time for these bytes.
      row["ideal_speedup"] = (t0 + meta["dense"] / bw) / pred
      row["share_of_ideal"] = row["speedup"] / row["ideal_speedup"]
    out["rows"][name] = row
  for name, key in offloaded.items():
    # The counts ran over every timed call (the caches are passed on): per token of them all.
    fetched = sum(int(jnp.sum(c.fetched)) for c in caches[key])
    read = sum(int(jnp.sum(c.needed)) for c in caches[key])
    block = 2 * layout.region_size * decoder.head_dim * 4            # k and v, float32
    tokens = batch * steps * (repeats + 1)
    out["rows"][key].update(offload_of=name, hit_rate=1 - fetched / read,
                            host_bytes_per_token=fetched * block / tokens)
  return out


def ttft_case(decoder, images: int, impl: str, keep: float, repeats: int) -> dict:
  """Seconds to the first token (vision, prefill, first pick) of ``generate``, gaze against
  dense, interleaved."""
  from gaze_jax.model import generate
  layout = layout_of(images, 1)
  k = max(1, int(np.ceil(keep * layout.max_regions)))
  # The xla path's prefill in chunks of query rows: all rows at once would hold [S, S] masks.
  models = {"dense": make_model(decoder, "dense", 1, impl, SMALL_VISION),
            "gaze": make_model(decoder, "gaze", k, impl, SMALL_VISION,
                               query_chunk=1024 if impl == "xla" else None)}
  tokens = np.ones(layout.kind.shape, np.int32)
  pix = np.random.default_rng(0).standard_normal((1, images, 384, 384, 3)).astype(np.float32)
  run = {n: (lambda m=m: generate(m, tokens, layout, pix, max_new_tokens=1).tokens)
         for n, m in models.items()}
  for f in run.values():
    jax.block_until_ready(f())
  samples = {n: [] for n in run}
  for _ in range(repeats):
    for n, f in run.items():
      t = time.perf_counter()
      jax.block_until_ready(f())
      samples[n].append(time.perf_counter() - t)
  med = {n: statistics.median(s) for n, s in samples.items()}
  return {"images": images, "k": k, "layers": decoder.num_layers, "dense_s": med["dense"],
          "gaze_s": med["gaze"], "gaze_vs_dense": med["gaze"] / med["dense"]}


README_BEGIN, README_END = "<!-- generate-bench begin -->", "<!-- generate-bench end -->"
OFFLOAD_MARKERS = ("<!-- generate-offload begin -->", "<!-- generate-offload end -->")


def readme_table(result: dict) -> str:
  lines = [f"Decode with the model's own attention, same weights "
           f"(`benchmarks/generate.py`, {result['date']}, {result['device']}; "
           f"{result['implementation']} path, float32, group routing, 6 x 6 regions). "
           "Tokens/s of the decode loop, gaze / dense speed-up, the share of the speed-up that "
           "the bytes read allow, and the step time against the bytes model fitted on the dense "
           "step and the step without images:", "",
           "| decoder | visual tokens | batch | dense tok/s | K | gaze tok/s | speed-up | "
           "share of ideal | vs bytes model |", "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
  for name, cases in result["decode"].items():
    for c in cases:
      d = c["rows"]["dense"]
      for k, r in c["rows"].items():
        if "speedup" not in r or "offload_of" in r:
          continue
        lines.append(f"| {name} | {c['visual_tokens']:,} | {c['batch']} | "
                     f"{d['tokens_per_s']:.1f} | {k} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['share_of_ideal']:.0%} | "
                     f"{r['vs_prediction']:.2f} |")
  for name, t in result.get("ttft", {}).items():
    lines += ["", f"Time to first token ({name} cut to {t['layers']} layers, {t['images']} images "
              f"of 576 tokens, a 1-layer vision tower, batch 1): dense {t['dense_s']:.2f} s, "
              f"gaze (K = {t['k']}) {t['gaze_s']:.2f} s ({t['gaze_vs_dense']:.2f}x)."]
  return "\n".join(lines)


def offload_table(result: dict) -> Optional[str]:
  """The README table of a run's ``--offload`` rows (None without them)."""
  off = [(name, c, r) for name, cases in result["decode"].items() for c in cases
         for r in c["rows"].values() if "offload_of" in r]
  if not off:
    return None
  lines = [f"Decode with the visual KV in host memory (`benchmarks/generate.py --offload`, "
           f"{result['date']}, {result['device']}; {result['implementation']} path, float32, "
           "group routing, 6 x 6 regions, the region cache at its default size"
           + ("; on a CPU host and device memory are the same RAM, so this is the cost of the "
              "region cache's bookkeeping and copies, not of a host link"
              if result["backend"] == "cpu" else "")
           + "; the random caches route at random, so the hit rate is far below a real "
           "model's):", "",
           "| decoder | visual tokens | batch | K | in device tok/s | offloaded tok/s | "
           "offloaded / in device | hit rate | host to device bytes / token |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
  for name, c, r in off:
    base = c["rows"][r["offload_of"]]
    lines.append(f"| {name} | {c['visual_tokens']:,} | {c['batch']} | {r['offload_of']} | "
                 f"{base['tokens_per_s']:.1f} | {r['tokens_per_s']:.1f} | "
                 f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['hit_rate']:.1%} | "
                 f"{r['host_bytes_per_token'] / 1e6:.2f} MB |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default="smollm2_135m,qwen3_4b")
  ap.add_argument("--images", default="16,64")
  ap.add_argument("--batches", default="1,4")
  ap.add_argument("--keeps", default="0.1,0.25")
  ap.add_argument("--smol_layers", type=int, default=30)
  ap.add_argument("--qwen_layers", type=int, default=2)
  ap.add_argument("--steps", type=int, default=8, help="decode steps per timed call")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--ttft", action=argparse.BooleanOptionalAction, default=True)
  ap.add_argument("--ttft_layers", type=int, default=4,
                  help="decoder layers of the time-to-first-token runs (a CPU prefill over "
                  "9k tokens takes seconds a layer)")
  ap.add_argument("--bounds", action=argparse.BooleanOptionalAction, default=True,
                  help="also K = 1 and K = all regions")
  ap.add_argument("--offload", action="store_true",
                  help="also each --keeps with the visual KV in host memory (offload=True)")
  ap.add_argument("--gpu", action="store_true", help="on a GPU: the Pallas kernels and xla")
  ap.add_argument("--impls", default=None, help="default: xla on CPU, pallas,xla on a GPU")
  ap.add_argument("--out", default=None)
  ap.add_argument("--readme", default=None)
  ap.add_argument("--readme_blocks", default="decode,offload",
                  help="the README tables to rewrite: decode (the gaze / dense table), offload "
                  "(the --offload rows, when the run has them)")
  args = ap.parse_args()
  backend = jax.default_backend()
  impls = (args.impls or ("pallas,xla" if args.gpu else "xla")).split(",")
  rng = np.random.default_rng(0)
  result = {"date": datetime.date.today().isoformat(), "backend": backend,
            "device": jax.devices()[0].device_kind if backend != "cpu"
            else f"{platform.processor() or platform.machine()} CPU",
            "implementation": impls[0], "args": vars(args), "decode": {}, "ttft": {}}
  for name, decoder in decoder_shapes(args).items():
    for impl in impls:
      key = name if impl == impls[0] else f"{name} ({impl})"
      result["decode"][key] = []
      for images in map(int, args.images.split(",")):
        for batch in map(int, args.batches.split(",")):
          c = decode_case(decoder, images, batch, [float(p) for p in args.keeps.split(",")],
                          impl, args.steps, args.repeats, rng, bounds=args.bounds,
                          offload=args.offload)
          result["decode"][key].append(c)
          print(f"{key} {c['visual_tokens']} tokens, batch {batch}: " + ", ".join(
              f"{n} {r['tokens_per_s']:.1f} tok/s" for n, r in c["rows"].items()), flush=True)
    # On a CPU the Qwen3 prefill's dense attention over 9k tokens (32 heads) does not fit in
    # memory: time to first token of the SmolLM2 shape only.
    if args.ttft and (args.gpu or name.startswith("smollm2")):
      cut = dataclasses.replace(decoder, num_layers=min(decoder.num_layers, args.ttft_layers))
      result["ttft"][name] = ttft_case(cut, 16, impls[0], 0.1, args.repeats)
      print(f"{name} ttft: {result['ttft'][name]}", flush=True)
  out = Path(args.out or ROOT / f"benchmarks/results/generate_{backend}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {out}")
  if args.readme:
    write_readme(Path(args.readme), result, args.readme_blocks.split(","))


def write_readme(readme: Path, result: dict, blocks) -> None:
  """Rewrites the README's tables of ``result`` named in ``blocks``: "decode" (the gaze / dense
  table), "offload" (the ``--offload`` rows, when the run has them)."""
  from benchmarks.readme import replace_between
  if "decode" in blocks:
    replace_between(readme, README_BEGIN, README_END, readme_table(result))
  table = offload_table(result) if "offload" in blocks else None
  if table:
    replace_between(readme, *OFFLOAD_MARKERS, table)


if __name__ == "__main__":
  main()

"""Benchmark: the region cache of offloaded decoding (``generate(offload=True)``): its hit rate
and the bytes each generated token copies from host memory, against the bytes the same steps
read when the visual K/V stay in device memory. Counts only, no timing.

With ``offload=True`` each layer's visual K/V sit in host memory after the prefill and a cache
of ``C`` region blocks per example and KV head sits on the device (``gaze_jax.model.offload``);
a decode step reads the union of the regions its KV head's query heads selected and copies the
missing blocks in. ``C`` is ``GazeConfig.offload_cache`` (0: the most one step can select, the
"union" ``offload_capacity``); each setting runs at 1x (``offload_cache=0``), 2x and 4x of it.
Per setting, with ``tokens`` the tokens the decode steps generated (examples x steps; the first
token comes from the prefill, which reads no block from the region cache) and a block ``R =
region_h * region_w`` slots of ``head_dim`` values for K and for V:

* ``hit_rate``: 1 - fetched / read, summed over layers, KV heads and examples;
* ``regions_read_per_token`` / ``regions_fetched_per_token``: blocks per token (all layers and
  KV heads of one example);
* ``bytes_fetched_per_token``: fetched x R x head_dim x 2 (K, V) x dtype bytes / tokens, the
  host-to-device traffic; ``device_bytes_read_per_token``: the same for the blocks read, what
  the steps read from device memory when nothing is offloaded;
* ``tokens_equal_in_device``: the offloaded tokens equal those of ``offload=False``.

Two settings:

1. ``demo``: the gaze run of ``make demo`` (``<out>/gaze``, ``--demo_workdir``), on the
   validation examples as the evaluation builds them (the prompt before the first answer, a
   reserved span, greedy, the tokenizer's stop tokens). Skipped, saying how to make it, when
   the run does not exist.
2. ``smollm2_video``: the real SmolLM2-135M decoder (its GGUF file, float32), a small random
   vision tower, and a synthetic video: ``--frames`` frames of a photo that ships with
   matplotlib (the study extra; scikit-image is not a dependency of the project), panned and
   zoomed a little per frame, pooled 2x2 to 12 x 12 tokens (4 regions of 6 x 6 per frame);
   ``--new_tokens`` tokens (no stop token) after a ChatML question.

  python -m benchmarks.offload_hits            # both: benchmarks/results/offload_hits.json
  python -m benchmarks.offload_hits --demo_workdir=out/demo/gaze --examples=64 --frames=32
  python -m benchmarks.offload_hits --no_smollm2 --out=/tmp/offload_hits.json
  python -m benchmarks.offload_hits --from_json --readme README.md    # the README's table
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gaze_jax.model.generate import generate  # noqa: E402
from gaze_jax.model.offload import offload_capacity  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "offload_hits.json"
DEMO_WORKDIR = ROOT / "out" / "demo" / "gaze"
# Region cache sizes, as multiples of the one-step union (1: offload_cache = 0).
MULTIPLES = (1, 2, 4)
PHOTO = "grace_hopper.jpg"           # matplotlib's sample data, 600 x 512


# ------------------------------------------------------------------ measuring


def with_offload_cache(model, entries: int):
  """``model`` with ``cfg.gaze.offload_cache = entries``, sharing its parameters (no copy:
  the structure comes from ``nnx.eval_shape``, the state is ``model``'s)."""
  from flax import nnx

  from gaze_jax.model.mllm import MLLM
  cfg = model.cfg
  cfg = dataclasses.replace(cfg, gaze=dataclasses.replace(cfg.gaze, offload_cache=int(entries)))
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: MLLM(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model))


def capacity_of(cfg, layout) -> int:
  """``offload_capacity``: the region cache's entries per example and KV head of ``cfg`` over
  a prompt layout (its decoding layout's ``max_regions``, which ``generate`` sizes it by)."""
  return offload_capacity(cfg, layout.for_decoding().max_regions)


def union_of(cfg, layout) -> int:
  """The region cache's entries at ``offload_cache = 0``: the most regions one decode step of
  one KV head can select."""
  return capacity_of(dataclasses.replace(cfg, gaze=dataclasses.replace(cfg.gaze,
                                                                       offload_cache=0)), layout)


def block_bytes(cfg, layout) -> int:
  """Bytes of one region block of one KV head: R slots x head_dim values, K and V, in the
  KV cache's dtype (the compute dtype)."""
  return layout.region_size * cfg.decoder.head_dim * 2 * jnp.dtype(cfg.dtype).itemsize


def measure(model, prompts: Sequence, *, max_new_tokens: int,
            multiples: Sequence[int] = MULTIPLES, stop_tokens: Sequence[int] = (),
            pad_id: int = 0, log=print) -> dict:
  """Greedy offloaded generation of every prompt at each region cache size, against in-device
  generation.

  Args:
    model: a gaze ``MLLM``.
    prompts: ``(tokens int [B, S], layout TokenLayout [B, S], images [B, F, H, W, C] or None)``
      per batch, each example ending with ``Text(n >= max_new_tokens, generated=True)``; all
      of the same region count (one union, one cache size per setting).
    multiples: cache sizes as multiples of the one-step union (1: ``offload_cache = 0``).
  Returns:
    ``{"model": ..., "settings": {"<m>x": figures}}`` (JSON-ready; the module docstring).
  """
  cfg = model.cfg
  dec = cfg.decoder
  layouts = [p[1] for p in prompts]
  unions = {union_of(cfg, lay) for lay in layouts}
  if len(unions) != 1:
    raise ValueError(f"the batches select up to {sorted(unions)} regions a step: give batches "
                     "of one region count")
  (union,) = unions
  blk = block_bytes(cfg, layouts[0])
  max_regions = layouts[0].for_decoding().max_regions
  # The in-device reference, once per batch.
  refs = [generate(model, t, lay, im, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                   pad_id=pad_id, return_logits=True, offload=False) for t, lay, im in prompts]
  settings = {}
  for m in multiples:
    entries = 0 if m == 1 else int(m) * union
    cached = with_offload_cache(model, entries)
    capacity = capacity_of(cached.cfg, layouts[0])
    read = fetched = tokens = examples = steps = 0
    equal, logit_diff = True, 0.0
    for (t, lay, im), ref in zip(prompts, refs):
      out = generate(cached, t, lay, im, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                     pad_id=pad_id, return_logits=True, offload=True)
      B = int(np.asarray(out.tokens).shape[0])
      n = int(out.num_steps)
      read += int(np.sum(np.asarray(out.regions_read)))
      fetched += int(np.sum(np.asarray(out.regions_fetched)))
      # Every example runs every decode step (a stopped one too, its reads counted).
      tokens += B * (n - 1)
      examples += B
      steps += n - 1
      equal &= bool(np.array_equal(np.asarray(out.tokens), np.asarray(ref.tokens)))
      logit_diff = max(logit_diff, float(np.max(np.abs(np.asarray(out.logits)
                                                       - np.asarray(ref.logits)))))
    per = lambda x: x / tokens if tokens else None
    row = {
        "offload_cache": entries, "capacity": capacity, "capacity_over_union": capacity / union,
        "examples": examples, "batches": len(prompts), "decode_steps": steps,
        "tokens": tokens, "regions_read": read, "regions_fetched": fetched,
        "hit_rate": 1.0 - fetched / read if read else None,
        "regions_read_per_token": per(read), "regions_fetched_per_token": per(fetched),
        # One step's distinct regions per layer and KV head (at most the union).
        "regions_read_per_step_layer_kv_head": per(read / (dec.num_layers * dec.num_kv_heads)),
        "bytes_fetched_per_token": per(fetched * blk),
        "device_bytes_read_per_token": per(read * blk),
        "region_cache_bytes_per_example": capacity * blk * dec.num_kv_heads * dec.num_layers,
        "tokens_equal_in_device": equal, "max_abs_logit_diff": logit_diff,
    }
    log(f"  {m}x union ({capacity} entries): hit rate {row['hit_rate']:.3f}, "
        f"{row['regions_fetched_per_token']:.1f} of {row['regions_read_per_token']:.1f} blocks "
        f"and {row['bytes_fetched_per_token']:.0f} of {row['device_bytes_read_per_token']:.0f} "
        f"bytes per token from host memory; tokens equal in-device: {equal}")
    settings[f"{m}x"] = row
  g = cfg.gaze
  return {
      "model": {"num_layers": dec.num_layers, "num_heads": dec.num_heads,
                "num_kv_heads": dec.num_kv_heads, "head_dim": dec.head_dim,
                "dtype": str(jnp.dtype(cfg.dtype)), "top_k": g.top_k, "routing": g.routing,
                "region_shape": list(g.region_shape), "num_ctx": g.num_ctx},
      "max_new_tokens": int(max_new_tokens), "stop_tokens": [int(s) for s in stop_tokens],
      "max_regions": int(max_regions), "region_size": int(layouts[0].region_size),
      "union": int(union), "block_bytes": int(blk),
      # What in-device decoding keeps on the device per example: every region's K/V.
      "visual_kv_bytes_per_example": int(max_regions * blk * dec.num_kv_heads * dec.num_layers),
      # The first example's in-device answer (the callers decode it).
      "example_tokens": [int(i) for i in np.asarray(refs[0].tokens)[0]],
      "settings": settings,
  }


# ------------------------------------------------------------------ the demo's checkpoints


def demo_prompts(run, workdir, examples: int, max_new_tokens: int) -> list:
  """The first ``examples`` validation examples of a restored run (``runs.Restored``; whole
  batches of its ``data.batch_size``, its data under ``workdir`` as ``eval_main`` finds it) as
  ``generate_answers`` builds them: each example's segments before its first answer, then a
  reserved ``Text(max_new_tokens, generated=True)``. Returns ``[(tokens int32 [B, S], layout,
  images [B, F, H, W, C])]``."""
  from gaze_jax import runs
  from gaze_jax.data.features import batch_to_model_inputs
  from gaze_jax.eval import layouts
  from gaze_jax.eval.evaluate import _images_for

  _, batches = runs.eval_batches(run.config, workdir, run.model_cfg, run.spec, run.tokenizer,
                                 "validation")
  out, seen = [], 0
  for batch in batches:
    inputs = batch_to_model_inputs(batch, run.spec)
    lay = inputs.layout
    B = int(np.asarray(lay.kind).shape[0])
    segs = [layouts.prompt_segments(layouts.example_segments(lay, b), max_new_tokens)
            for b in range(B)]
    prompt = layouts.relayout(inputs, segs, layouts.spec_for(segs, lay.spec))
    # The evaluation's own rule for the model's image input.
    out.append((prompt.tokens, prompt.layout, _images_for(run.model, prompt)))
    seen += B
    if seen >= examples:
      break
  return out


def demo_setting(workdir: Path, *, examples: int, max_new_tokens: int,
                 multiples: Sequence[int] = MULTIPLES, log=print) -> dict:
  """The demo's gaze run in ``workdir``; ``{"skipped": why}`` when it does not exist."""
  workdir = Path(workdir)
  if not (workdir / "checkpoints").is_dir():
    why = (f"{workdir} holds no trained run: `make demo` trains it (minutes on a CPU; the gaze "
           "run is out/demo/gaze), or give --demo_workdir")
    log(f"[offload_hits] demo: skipped: {why}")
    return {"skipped": why}
  from gaze_jax import runs
  run = runs.restore(None, workdir)
  log(f"[offload_hits] demo: {workdir} at step {run.step}")
  prompts = demo_prompts(run, workdir, examples, max_new_tokens)
  stops = tuple(getattr(run.tokenizer, "stop_ids", ()))
  res = measure(run.model, prompts, max_new_tokens=max_new_tokens, multiples=multiples,
                stop_tokens=stops, log=log)
  from gaze_jax.eval.text import decode
  ids = res["example_tokens"]
  ids = ids[:next((i for i, t in enumerate(ids) if t in stops), len(ids))]
  return {"workdir": _portable(workdir), "step": int(run.step), "split": "validation",
          "answer": " ".join(decode(run.tokenizer, ids).split()), **res}


def _portable(path: Path) -> str:
  """``path`` relative to the repository when inside it (the JSON keeps no absolute path)."""
  p = Path(path).resolve()
  return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name


# ------------------------------------------------------------------ SmolLM2 and a long video


def video_frames(frames: int, size: int = 384, pan: int = 2, zoom: int = 1) -> np.ndarray:
  """float32 ``[frames, size, size, 3]`` in [-1, 1] (SigLIP's normalisation): matplotlib's
  sample photo, a square crop that moves ``pan`` px right and down and shrinks ``zoom`` px a
  side per frame (consecutive frames alike, as in a video), resized to ``size``."""
  from matplotlib import cbook
  from PIL import Image as PILImage
  photo = PILImage.open(cbook.get_sample_data(PHOTO, asfileobj=False)).convert("RGB")
  first = min(photo.size) - frames * pan             # room to pan
  if first - 2 * zoom * frames < size // 4:
    raise ValueError(f"{frames} frames pan and zoom past the {photo.size} photo: fewer frames")
  out = []
  for t in range(frames):
    side = first - 2 * zoom * t
    x0 = (pan + zoom) * t
    crop = photo.crop((x0, x0, x0 + side, x0 + side)).resize((size, size), PILImage.BILINEAR)
    out.append(np.asarray(crop, np.float32) / 127.5 - 1.0)
  return np.stack(out)


def smollm2_model(frames: int, query_chunk: int = 1024):
  """The SmolLM2-135M preset in float32 with a small random vision tower (1 layer, width
  64, 384 px, 16 px patches, video frames pooled 2x2 to 12 x 12) and the decoder weights of
  the GGUF file (as the trainer's ``model.init = "gguf:smollm2"``). Returns (model, tokenizer).
  ``query_chunk`` bounds the prefill's score memory (``frames`` x 144 + text slots)."""
  from flax import nnx

  from gaze_jax.convert import gguf
  from gaze_jax.data.tokenizers import load_gguf_tokenizer
  from gaze_jax.model.config import VisionConfig
  from gaze_jax.model.mllm import MLLM
  from gaze_jax.model.presets import get_preset

  path = gguf.find_smollm2_gguf()
  preset = get_preset("smollm2_135m")
  vision = VisionConfig(image_size=384, patch_size=16, hidden_size=64, intermediate_size=128,
                        num_layers=1, num_heads=2)
  cfg = dataclasses.replace(preset, vision=vision, dtype="float32", param_dtype="float32",
                            gaze=dataclasses.replace(preset.gaze, query_chunk=query_chunk))
  model = MLLM(cfg, rngs=nnx.Rngs(0))
  got = nnx.to_pure_dict(nnx.state(gguf.load_gguf_causal_lm(path), nnx.Param))["decoder"]
  params = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(params)
  if jax.tree.structure(got) != jax.tree.structure(pure["decoder"]):
    raise ValueError(f"{path}: its decoder does not match the smollm2_135m preset's")
  pure["decoder"] = jax.tree.map(lambda g, w: jnp.asarray(g, w.dtype), got, pure["decoder"])
  nnx.replace_by_pure_dict(params, pure)
  nnx.update(model, params)
  return model, load_gguf_tokenizer(path)


QUESTION = "Describe what happens in this video, frame by frame."


def smollm2_prompt(model, tokenizer, frames: int, new_tokens: int):
  """One example: ChatML ``user`` turn with the video then ``QUESTION``, the assistant's turn
  opened, ``new_tokens`` reserved. Returns ``(tokens int32 [1, S], layout, images [1, F, 384,
  384, 3])``."""
  from gaze_jax.gaze import Text, Video, build_layout, slots_needed
  from gaze_jax.gaze.layout import TEXT
  from gaze_jax.model.mllm import pack_images

  t = tokenizer.template
  before = tokenizer.encode(t.header() + t.user_start)
  after = tokenizer.encode("\n" + QUESTION + t.user_end + t.assistant_start)
  vcfg = model.cfg.vision
  gh, gw = vcfg.pooled_grid(vcfg.image_size // vcfg.patch_size,
                            vcfg.image_size // vcfg.patch_size)
  rh, rw = model.cfg.gaze.region_shape
  segs = [Text(len(before)), Video(frames, gh, gw), Text(len(after)),
          Text(new_tokens, generated=True)]
  regions = frames * math.ceil(gh / rh) * math.ceil(gw / rw)
  spec = model.layout_spec(seq_len=1, max_regions=regions, max_images=frames)
  spec = dataclasses.replace(spec, seq_len=slots_needed(segs, spec), max_nonvisual=None)
  layout = build_layout([segs], spec)
  kind, gen = np.asarray(layout.kind)[0], np.asarray(layout.generated)[0].astype(bool)
  tokens = np.zeros((1, spec.seq_len), np.int32)
  slots = np.flatnonzero((kind == TEXT) & ~gen)
  tokens[0, slots] = before + after
  images = pack_images([[video_frames(frames, vcfg.image_size)]], layout)
  return tokens, layout, images


def smollm2_setting(*, frames: int, new_tokens: int, multiples: Sequence[int] = MULTIPLES,
                    log=print) -> dict:
  """SmolLM2-135M over a ``frames``-frame synthetic video; ``{"skipped": why}`` without the
  GGUF file."""
  from gaze_jax.eval.text import decode
  try:
    model, tok = smollm2_model(frames)
  except FileNotFoundError as e:
    log(f"[offload_hits] smollm2_video: skipped: {e}")
    return {"skipped": str(e)}
  prompt = smollm2_prompt(model, tok, frames, new_tokens)
  log(f"[offload_hits] smollm2_video: {frames} frames, {prompt[1].seq_len} slots, "
      f"{prompt[1].max_regions} regions")
  res = measure(model, [prompt], max_new_tokens=new_tokens, multiples=multiples, log=log)
  # The answer means little (the vision tower is random): it shows that the LM decodes.
  return {"frames": frames, "frame_grid": [12, 12], "photo": f"matplotlib {PHOTO}",
          "pan_px": 2, "zoom_px": 1, "question": QUESTION, "seq_len": int(prompt[1].seq_len),
          "answer": decode(tok, res["example_tokens"]), **res}


# ------------------------------------------------------------------ the record


def git_commit() -> Optional[str]:
  """HEAD's hash, with ``+dirty`` when tracked files differ from it (None outside git)."""
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return head + ("+dirty" if dirty else "")


def record(settings: dict) -> dict:
  """The JSON record: the date, the machine, the jax version, the git commit, the settings."""
  import os
  return {"date": datetime.date.today().isoformat(),
          "machine": f"{os.cpu_count()}-core {platform.machine()} CPU machine "
                     f"({platform.system()})",
          "backend": jax.default_backend(), "jax_version": jax.__version__,
          "git_commit": git_commit(), "settings": settings}


README_BEGIN, README_END = "<!-- offload-hits begin -->", "<!-- offload-hits end -->"
TITLES = {"demo": "the demo's gaze run (validation answers)",
          "smollm2_video": "SmolLM2-135M over a synthetic video"}


# Nominal rates of an H100 SXM (datasheet figures, not measured here): what the bytes per token
# would cost over the host link against the HBM reads they replace.
H100_HOST_LINK = 64e9
H100_HBM = 3.35e12


def readme_table(rec: dict) -> str:
  """The README's table of a record: per setting and cache size, the hit rate and the bytes
  per token copied from host memory against those read from device memory without offload."""
  lines = [f"Region cache of offloaded decoding (`benchmarks/offload_hits.py`, {rec['date']}, "
           f"{rec['machine']}, jax {rec['jax_version']}; float32; counts, not timings). Bytes "
           "per generated token, all layers and KV heads:", "",
           "| setting | region cache (blocks / example / KV head) | hit rate | copied from host "
           "| read in device memory without offload | on an H100's host link | "
           "on its HBM | tokens as in device |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
  for name, s in rec["settings"].items():
    if "settings" not in s:
      continue
    for row in s["settings"].values():
      copied, read = row["bytes_fetched_per_token"], row["device_bytes_read_per_token"]
      lines.append(f"| {TITLES.get(name, name)} | {row['capacity']} | {row['hit_rate']:.1%} | "
                   f"{copied / 1e3:,.1f} kB | {read / 1e3:,.1f} kB | "
                   f"{copied / H100_HOST_LINK * 1e6:,.2f} us | "
                   f"{read / H100_HBM * 1e6:,.2f} us | "
                   f"{'yes' if row['tokens_equal_in_device'] else 'NO'} |")
  lines += ["", f"The last two columns are the bytes' time at nominal rates: "
            f"{H100_HOST_LINK / 1e9:.0f} GB/s for an H100's PCIe 5 x16 host link, "
            f"{H100_HBM / 1e12:.2f} TB/s for its HBM3."]
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", type=Path, default=RESULT, help="the JSON to write")
  ap.add_argument("--demo_workdir", type=Path, default=DEMO_WORKDIR,
                  help="the gaze run of `make demo` (out/demo/gaze)")
  ap.add_argument("--examples", type=int, default=64, help="demo validation examples (whole "
                  "batches)")
  ap.add_argument("--demo_new_tokens", type=int, default=16, help="the demo's answer budget "
                  "(it stops at its end token, as predict does)")
  ap.add_argument("--frames", type=int, default=32, help="frames of the synthetic video")
  ap.add_argument("--new_tokens", type=int, default=32, help="SmolLM2's new tokens")
  ap.add_argument("--multiples", default=",".join(map(str, MULTIPLES)),
                  help="region cache sizes, multiples of the one-step union")
  ap.add_argument("--no_demo", action="store_true")
  ap.add_argument("--no_smollm2", action="store_true")
  ap.add_argument("--readme", type=Path, default=None, help="rewrite this README's table")
  ap.add_argument("--from_json", action="store_true", help="only rewrite the table, from --out")
  args = ap.parse_args(argv)
  if args.from_json:
    rec = json.loads(args.out.read_text())
    _write_readme(args.readme, rec)
    return rec
  multiples = tuple(int(m) for m in args.multiples.split(","))
  settings = {}
  if not args.no_demo:
    settings["demo"] = demo_setting(args.demo_workdir, examples=args.examples,
                                    max_new_tokens=args.demo_new_tokens, multiples=multiples)
  if not args.no_smollm2:
    settings["smollm2_video"] = smollm2_setting(frames=args.frames, new_tokens=args.new_tokens,
                                                multiples=multiples)
  rec = record(settings)
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(rec, indent=2) + "\n")
  print(f"[offload_hits] wrote {args.out}")
  _write_readme(args.readme, rec)
  return rec


def _write_readme(path: Optional[Path], rec: dict) -> None:
  table = readme_table(rec)
  print(table)
  if path is not None:
    from benchmarks.readme import replace_between
    replace_between(path, README_BEGIN, README_END, table)


if __name__ == "__main__":
  main()

"""Benchmark: host memory of starting a model from a Hugging Face folder, sharded loading
(``gaze_jax.convert.sharded.load_sharded``, as ``model.init=hf:`` does) against the eager loader
(``gaze_jax.convert.hf.build_planned``: the whole model on the host first).

A LLaVA-OneVision-shaped checkpoint of random float32 weights is written (``--hidden``,
``--layers``, ``--vocab`` set its size), then each loader runs in its own process on
``--devices`` simulated CPU devices with ``fsdp`` over all of them. Reported per loader:

* ``numpy_peak``: the peak of host allocations that Python and numpy make while loading
  (``tracemalloc``; buffers that XLA allocates are not in it, but on CPU devices XLA may keep
  a numpy piece as the device buffer itself, zero-copy, so the pieces that became parameters
  count too); ``numpy_transient``: that peak minus what is still held once loading is done,
  the memory the loader held on top of the parameters;
* ``rss_growth``: the peak resident memory minus the resident memory before loading (on CPU
  devices the parameters themselves live in host memory, so this is at least the model size);

against the checkpoint size and its largest tensor. Writes JSON (default
``benchmarks/results/hf_init_memory.json``) and, with ``--readme``, the README's sentence on it.

  python benchmarks/hf_init_memory.py --devices 8 --readme README.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOAD = r"""
import json, resource, sys, tracemalloc
import jax, numpy as np
from flax import nnx
from gaze_jax.convert.families import plan_hf
from gaze_jax.model import GazeConfig
from gaze_jax.train import sharding as shard_lib
from gaze_jax.train.checkpoint import abstract_like, abstract_params

folder, how = sys.argv[1], sys.argv[2]
gaze = GazeConfig(attention="gaze", num_ctx=4, region_shape=(2, 2), top_k=2)
plan = plan_hf(folder, gaze)
mesh = shard_lib.make_mesh({"data": 1, "fsdp": jax.device_count(), "tensor": 1})
_, abs_state, _ = abstract_params(plan.model)
shardings = shard_lib.named(mesh, shard_lib.param_specs(abs_state, shard_lib.DEFAULT_RULES, mesh))
abstract = abstract_like(nnx.to_pure_dict(abs_state), shardings)
jax.block_until_ready(jax.device_put(np.zeros(8), shardings["decoder"]["final_norm"]["scale"]))

def rss():                                    # kB -> bytes (Linux)
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

before = rss()
tracemalloc.start()
if how == "sharded":
  from gaze_jax.convert.sharded import load_sharded
  params = jax.block_until_ready(load_sharded(plan, abstract, log_every_s=1e9))
else:
  from gaze_jax.convert.hf import build_planned
  model = build_planned(plan)
  params = jax.block_until_ready(jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                                                shardings))
  del model
import gc
gc.collect()
numpy_held, numpy_peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
on_devices = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
print(json.dumps({"numpy_peak": numpy_peak, "numpy_held_after": numpy_held,
                  "numpy_transient": numpy_peak - numpy_held, "rss_before": before, "rss_peak": peak,
                  "rss_growth": peak - before, "bytes_on_devices": on_devices,
                  "devices": jax.device_count()}))
"""


def write_checkpoint(folder: Path, hidden: int, layers: int, vocab: int, seed: int) -> dict:
  """A LLaVA-OneVision-shaped folder of random float32 weights, written one shard at a time."""
  import torch
  import transformers

  from gaze_jax.convert.hf_io import INDEX_NAME, safetensors_bytes

  text = transformers.Qwen2Config(vocab_size=vocab, hidden_size=hidden,
                                  intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                                  num_attention_heads=hidden // 64, num_key_value_heads=2)
  vision = transformers.SiglipVisionConfig(image_size=64, patch_size=16, hidden_size=256,
                                           intermediate_size=1024, num_hidden_layers=4,
                                           num_attention_heads=4)
  cfg = transformers.LlavaOnevisionConfig(text_config=text.to_dict(),
                                          vision_config=vision.to_dict(),
                                          vision_feature_layer=-1, image_token_index=vocab - 1)
  with torch.device("meta"):
    hf = transformers.LlavaOnevisionForConditionalGeneration(cfg)
  folder.mkdir(parents=True, exist_ok=True)
  cfg.save_pretrained(folder)
  rng = np.random.default_rng(seed)
  shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
  shard, shard_bytes, files, weight_map = {}, 0, [], {}

  def flush():
    nonlocal shard, shard_bytes
    name = f"model-{len(files) + 1:05d}.safetensors"
    (folder / name).write_bytes(safetensors_bytes(shard, {"format": "pt"}))
    weight_map.update((k, name) for k in shard)
    files.append(name)
    shard, shard_bytes = {}, 0

  for k, shape in shapes.items():
    shard[k] = (0.02 * rng.standard_normal(shape, dtype=np.float32))
    shard_bytes += shard[k].nbytes
    if shard_bytes > 256 << 20:
      flush()
  if shard:
    flush()
  total = sum(int(np.prod(s)) * 4 for s in shapes.values())
  (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                               "weight_map": weight_map}))
  return {"bytes": total, "tensors": len(shapes),
          "largest_tensor_bytes": max(int(np.prod(s)) * 4 for s in shapes.values()),
          "shards": len(files)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--hidden", type=int, default=1024)
  ap.add_argument("--layers", type=int, default=16)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--out", default=str(ROOT / "benchmarks/results/hf_init_memory.json"))
  ap.add_argument("--readme", default=None, help="write the README's sentence from the JSON")
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp) / "llava"
    ckpt = write_checkpoint(folder, args.hidden, args.layers, args.vocab, seed=0)
    print(f"checkpoint: {ckpt['bytes'] / 1e6:.0f} MB in {ckpt['shards']} shards, largest tensor "
          f"{ckpt['largest_tensor_bytes'] / 1e6:.1f} MB", flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
    results = {}
    for how in ("sharded", "eager"):
      p = subprocess.run([sys.executable, "-c", LOAD, str(folder), how], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True)
      results[how] = json.loads(p.stdout.strip().splitlines()[-1])
      r = results[how]
      print(f"{how}: numpy peak {r['numpy_peak'] / 1e6:.1f} MB, transient "
            f"{r['numpy_transient'] / 1e6:.1f} MB "
            f"({r['numpy_transient'] / ckpt['bytes']:.3f} x the model, "
            f"{r['numpy_transient'] / ckpt['largest_tensor_bytes']:.2f} x its largest tensor); "
            f"RSS growth {r['rss_growth'] / 1e6:.0f} MB; on devices "
            f"{r['bytes_on_devices'] / 1e6:.0f} MB", flush=True)
  out = {"date": datetime.date.today().isoformat(), "machine": platform.node(),
         "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
         "args": vars(args), "checkpoint": ckpt, "results": results}
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
  print(f"wrote {args.out}")
  if args.readme:
    from benchmarks.readme import replace_between
    replace_between(Path(args.readme), README_BEGIN, README_END, readme_text(out))


README_BEGIN, README_END = "<!-- hf-init-memory begin -->", "<!-- hf-init-memory end -->"


def readme_text(run: dict) -> str:
  """The README's sentence on host memory, from a run's JSON."""
  ck, s, e = run["checkpoint"], run["results"]["sharded"], run["results"]["eager"]
  mb = lambda b: f"{b / 1e6:,.0f} MB"
  return (f"Loading a {mb(ck['bytes'])} LLaVA-OneVision-shaped checkpoint (largest tensor "
          f"{mb(ck['largest_tensor_bytes'])}) onto {s['devices']} simulated devices with fsdp "
          f"{s['devices']}, the loader holds at most {mb(s['numpy_transient'])} of host memory "
          f"above the parameters ({s['numpy_transient'] / ck['largest_tensor_bytes']:.2f} x the "
          f"largest tensor, {s['numpy_transient'] / ck['bytes']:.2f} x the model), where building "
          f"the model on the host first grows the process by {mb(e['rss_growth'])} "
          f"({e['rss_growth'] / ck['bytes']:.1f} x the model; sharded: {mb(s['rss_growth'])}, "
          f"the simulated devices' memory included) (`benchmarks/hf_init_memory.py`, "
          f"{run['date']}, {run['cpus']}-core {run['processor']} machine).")


if __name__ == "__main__":
  main()

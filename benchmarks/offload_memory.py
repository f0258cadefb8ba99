"""Benchmark: device and host memory of a decode step with the visual KV offloaded to host memory
(``GazeConfig.offload``) against the same step with the whole cache in device memory, compiled
by the real TPU compiler on this CPU machine (libtpu; no TPU needed).

The case is ``qwen2_5_7b`` decoding at batch 32 over a 64-frame video cache (64 frames of
12 x 12 tokens, 6 x 6 regions: 256 regions, K = 4) on one v5p chip, with bfloat16 weights as
served (float32 master weights, as ``make aot-full`` compiles the step, would add their bf16
casts to both). XLA's ``memory_analysis()`` gives the device figures (arguments,
outputs, temporaries) and, separately, the host memory the offloaded rows take. The deviceless
H100 topology has no host memory kind (an offloaded array would count as device memory), so
the GPU figures need a GPU.

  make .venv-aot-tpu/.installed
  JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 .venv-aot-tpu/bin/python -m benchmarks.offload_memory \\
      --readme README.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "offload_memory.json"
GiB = 1 << 30
CASE = "qwen2_5_7b_video64"


def measure() -> dict:
  import jax

  from benchmarks.aot import steps as st
  from benchmarks.aot import targets as tg
  case = st.StepCase(CASE, "qwen2_5_7b", st.VIDEO64, batch=32,
                     mesh={"data": 1}, steps=("decode", "decode_offload"),
                     implementations=("xla",), param_dtype="bfloat16")
  # The same step with each KV head's query heads routing together: a step selects K regions
  # per KV head instead of 7 x K, so the region cache holds 4 blocks instead of 28.
  group = dataclasses.replace(case, label=f"{CASE}_group", steps=("decode_offload",),
                              gaze=(("routing", "group"),))
  recs = [*st.compile_case(case, tg.tpu("v5p:1x1")),
          *st.compile_case(group, tg.tpu("v5p:1x1"))]
  return {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
          "jax": jax.__version__, "target": "v5p:1x1", "case": case.label,
          "batch": case.batch, "records": recs}


def weight_bytes() -> int:
  """The parameters' bytes (bfloat16) of the case's model."""
  import jax

  from gaze_jax.model.presets import get_preset
  from gaze_jax.train.checkpoint import abstract_params
  _, params, _ = abstract_params(dataclasses.replace(get_preset("qwen2_5_7b"),
                                                     param_dtype="bfloat16"))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def readme_block(result: dict) -> str:
  rows = {(r["step"], r["case"]): r for r in result["records"]}
  w = result.get("weights_bytes", 0)
  lines = [f"Decode step of `qwen2_5_7b` at batch 32 over a 64-frame video cache (9,216 visual "
           f"tokens per example, 256 regions of 6 x 6, K = 4) on one {result['target']} chip, "
           f"compiled by libtpu (`benchmarks/offload_memory.py`, {result['date']}, "
           f"{result['machine']} CPU, jax {result['jax']}); bfloat16 weights "
           f"({w / GiB:.1f} GiB):", "",
           "| decode step | device peak | KV on the device | temporaries | host memory | "
           "region cache |", "|---|---:|---:|---:|---:|---:|"]
  for key, name in ((("decode", CASE), "whole cache in device memory"),
                    (("decode_offload", CASE), "visual KV offloaded"),
                    (("decode_offload", f"{CASE}_group"),
                     "visual KV offloaded, a GQA group routing together")):
    r = rows.get(key)
    if r is None or not r.get("compiled"):
      lines.append(f"| {name} | not compiled | | | | |")
      continue
    m = r["memory"]
    # The step's inputs are the weights and the caches (its outputs alias the donated caches).
    lines.append(f"| {name} | {m['peak'] / GiB:.2f} GiB | {(m['argument'] - w) / GiB:.2f} GiB | "
                 f"{m['temp'] / GiB:.2f} GiB | {m.get('host_peak', 0) / GiB:.2f} GiB | "
                 + (f"{r['region_cache']} blocks / example / KV head |" if "region_cache" in r
                    else "- |"))
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=str(OUT))
  ap.add_argument("--readme", default=None)
  ap.add_argument("--from_json", action="store_true", help="only rewrite the README block")
  args = ap.parse_args()
  if args.from_json:
    result = json.loads(Path(args.out).read_text())
  else:
    result = measure()
    result["weights_bytes"] = weight_bytes()
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.out}")
  block = readme_block(result)
  print(block)
  if args.readme:
    from benchmarks.readme import replace_between
    replace_between(Path(args.readme), "<!-- offload-memory begin -->",
                    "<!-- offload-memory end -->", block)


if __name__ == "__main__":
  main()

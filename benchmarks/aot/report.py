"""The README's compile table, rendered from the JSON files of ``make aot`` / ``make aot-full``
(``python -m benchmarks.aot.run table --readme README.md``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from benchmarks.readme import replace_between

BEGIN, END = "<!-- aot:table -->", "<!-- /aot:table -->"
GIB = 2 ** 30


def _load(results: Path, name: str) -> Optional[dict]:
  p = results / f"{name}.json"
  return json.loads(p.read_text()) if p.exists() else None


def _gib(x) -> str:
  """Bytes as GiB (MiB below 1 GiB, so that small programs do not read as 0)."""
  if x is None:
    return "-"
  return f"{x / GIB:.2f} GiB" if x >= GIB else f"{x / 2 ** 20:.1f} MiB"


def _ok(rec) -> str:
  if rec.get("compiled"):
    return "yes"
  return "no: out of HBM" if rec.get("out_of_memory") else "**no**"


def gpu_kernel_table(report: dict) -> str:
  lines = [f"H100 (sm_90a), Triton kernels of `gaze_gpu` ({report['date']}, jax {report['jax']},"
           " ptxas from the triton wheel; Qwen3-4B heads 32/8 x 128, 36-token regions, default"
           " `KernelConfig`):", "",
           "| case | kernel | compiled | registers | spill (B) | shared mem (KB) | grid | "
           "programs / SM |", "|---|---|---|---:|---:|---:|---|---:|"]
  for rec in report.get("kernels", []):
    for k in rec.get("kernels") or [None]:
      if k is None:
        lines.append(f"| {rec['name']} | - | {_ok(rec)} | - | - | - | - | - |")
        continue
      smem = k.get("shared_bytes")
      lines.append(f"| {rec['name']} | {k['kernel']} | {_ok(rec)} | {k.get('registers', '-')} "
                   f"| {k.get('spill_store_bytes', '-')} | "
                   f"{'-' if smem is None else f'{smem / 1024:.1f}'} | {k.get('grid', '-')} | "
                   f"{k.get('programs_per_sm', '-')} |")
  return "\n".join(lines)


def tpu_kernel_table(report: dict) -> str:
  lines = [f"TPU, Mosaic kernels of `gaze_tpu` ({report['date']}, libtpu via jax "
           f"{report['jax']}; one chip, same shapes):", "",
           "| target | case | compiled | Mosaic kernels | peak HBM | compile (s) |",
           "|---|---|---|---|---:|---:|"]
  for rec in report.get("kernels", []):
    ks = ", ".join(k.replace("gaze_tpu_", "") for k in rec.get("kernels", []))
    lines.append(f"| {rec['target']} | {rec['name']} | {_ok(rec)} | {ks} | "
                 f"{_gib((rec.get('memory') or {}).get('peak'))} | {rec['compile_s']} |")
  return "\n".join(lines)


def step_table(reports: list[dict], title: str) -> str:
  lines = [title, "",
           "| target | mesh | step | implementation | compiled | peak / chip | chip HBM "
           "| FLOPs / chip | bytes / chip |", "|---|---|---|---|---|---:|---:|---:|---:|"]
  for report in reports:
    for r in report.get("steps", []):
      mem = r.get("memory") or {}
      cost = r.get("cost") or {}
      mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
      step = f"{r['step']} ({r['preset']}, {r['decoder_layers']} layers, batch {r['batch']} x " \
             f"{r['seq_len']})"
      lines.append(
          f"| {r['target']} | {mesh} | {step} | {r['implementation']} | {_ok(r)} | "
          f"{_gib(mem.get('peak'))} | {_gib(r.get('hbm_bytes'))} | "
          f"{cost['flops']:.3g} | {cost['bytes_accessed']:.3g} |" if cost else
          f"| {r['target']} | {mesh} | {step} | {r['implementation']} | {_ok(r)} | "
          f"{_gib(mem.get('peak'))} | {_gib(r.get('hbm_bytes'))} | n/a | n/a |")
  return "\n".join(lines)


def slope_table(report: dict) -> str:
  """Peak HBM per chip of the training step at two decoder depths, its per-layer slope, and
  the preset's full depth: compiled when the deeper case is the full depth, else a linear
  extrapolation (marked); with the compile times (a scanned decoder's stay nearly flat)."""
  by = {}
  for r in report.get("steps", []):
    if r.get("step") == "train" and (r.get("memory") or {}).get("peak") is not None:
      by.setdefault((r["preset"], r["implementation"], r["batch"]), {})[r["decoder_layers"]] = r
  lines = []
  for (preset, impl, batch), d in sorted(by.items()):
    if len(d) < 2:
      continue
    (l1, r1), (l2, r2) = sorted(d.items())[:2]
    p1, p2 = r1["memory"]["peak"], r2["memory"]["peak"]
    slope = (p2 - p1) / (l2 - l1)
    full = r1.get("full_layers", 36)
    if l2 == full:
      est = _gib(p2) + (" (compiled)" if r2.get("compiled") else " (out of HBM)")
    else:
      est = _gib(p1 + slope * (full - l1)) + " (**extrapolated**)"
    lines.append(f"| {preset} | {impl} | {batch} | {l1}: {_gib(p1)} | {l2}: {_gib(p2)} | "
                 f"{_gib(slope)} | "
                 f"{est} | {r1.get('compile_s', '-')} / {r2.get('compile_s', '-')} | "
                 f"{_gib(r1.get('hbm_bytes'))} |")
  if not lines:
    return ""
  return "\n".join(["Peak HBM per chip of the training step by decoder depth (compiled, or the "
                    "compiler's out-of-memory figure) and at the preset's full depth:", "",
                    "| preset | implementation | batch | layers: peak | layers: peak | "
                    "per layer | full depth | compile (s) | chip HBM |",
                    "|---|---|---:|---:|---:|---:|---:|---:|---:|"] + lines)


def dense_table(report: dict) -> str:
  """Per training case at full depth: peak HBM per chip of gaze with the kernels against the
  dense model of the same preset and batch (XLA's attention and splash), and their ratio."""
  gaze, dense = {}, {}
  for r in report.get("steps", []):
    peak = (r.get("memory") or {}).get("peak")
    if r.get("step") != "train" or peak is None or r["decoder_layers"] != r.get("full_layers"):
      continue
    key = (r["preset"], r["batch"], r["decoder_layers"], r["seq_len"])
    if r["implementation"] == "pallas":
      gaze[key] = r
    elif r["implementation"].startswith("dense"):
      dense.setdefault(key, {})[r["implementation"]] = r
  lines = []
  for key in sorted(gaze.keys() & dense.keys()):
    g, d = gaze[key], dense[key]
    best = min(x["memory"]["peak"] for x in d.values())
    cells = ", ".join(f"{name} {_gib(x['memory']['peak'])}" for name, x in sorted(d.items()))
    lines.append(f"| {g['preset']} | {g['target']} | {key[1]} x {key[3]} | {key[2]} | "
                 f"{_gib(g['memory']['peak'])} | {cells} | "
                 f"{g['memory']['peak'] / best:.2f}x |")
  if not lines:
    return ""
  return "\n".join(["Training at full depth, gaze with the Pallas kernels against the dense model "
                    "(peak HBM per chip; ratio to the lower dense figure):", "",
                    "| preset | target | batch x slots | layers | gaze (pallas) | dense | "
                    "ratio |", "|---|---|---|---:|---:|---|---:|"] + lines)


def table(results: Path) -> str:
  parts = []
  h100, tpu = _load(results, "aot_h100"), _load(results, "aot_tpu")
  full_h100, full_tpu = _load(results, "aot_full_h100"), _load(results, "aot_full_tpu")
  if h100:
    parts.append(gpu_kernel_table(h100))
  if tpu:
    parts.append(tpu_kernel_table(tpu))
  small = [r for r in (h100, tpu) if r]
  if small:
    parts.append(step_table(small, "Model steps (`make aot`: the `tiny` preset, bf16, remat; "
                                   "a TPU slice of 8 chips as fsdp 4 x tensor 2). FLOPs and "
                                   "bytes are XLA's `cost_analysis()` (none on the deviceless "
                                   "GPU compile); a Pallas kernel counts as 0 FLOPs there:"))
  full = [r for r in (full_tpu, full_h100) if r]
  if full:
    parts.append(step_table(full, "Pod and serving scale (`make aot-full`):"))
    if full_tpu:
      for s in (slope_table(full_tpu), dense_table(full_tpu)):
        if s:
          parts.append(s)
  problems = [p for r in (h100, tpu, full_h100, full_tpu) if r for p in r.get("problems", [])]
  if problems:
    parts.append("Problems found: " + "; ".join(problems))
  return "\n\n".join(parts) + "\n"


def update_readme(path: Path, text: str) -> None:
  replace_between(path, BEGIN, END, text)

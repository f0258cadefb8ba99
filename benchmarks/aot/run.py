"""``make aot``: compile every gaze kernel and model step for an H100 and for TPU slices on this
CPU machine, with the real compilers, and write JSON under ``benchmarks/results/``.

  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 JAX_PLATFORMS=cpu python -m benchmarks.aot.run h100
  JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 python -m benchmarks.aot.run tpu
  python -m benchmarks.aot.run table          # the README table from the JSON files
  ... run h100|tpu --full                     # the pod / serving scale (make aot-full)

Each target runs in its own virtual environment (``jax-cuda12-plugin`` + ``triton``, or
``libtpu``); ``make aot`` creates them. The exit status is non-zero when a kernel or a step
fails to compile, when a bf16 GPU kernel spills registers, or when the decode kernel's
compiled occupancy is not the one ``pallas_kernels.ops`` sizes its split-K for.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.aot import kernels as kc
from benchmarks.aot import targets as tg

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _header(target: str) -> dict:
  return {"target": target, "date": datetime.date.today().isoformat(),
          "machine": f"{os.cpu_count()}-core {platform.machine()} CPU machine, no accelerator "
                     "(deviceless compile)",
          "jax": jax.__version__, "python": platform.python_version()}


def _log(msg: str):
  print(msg, flush=True)


# ---------------------------------------------------------------- H100


def h100_kernels(t: tg.Target, dump_root: str) -> list[dict]:
  """Every Triton kernel of ``gaze_gpu`` (forward and its passes, backward dq and dk/dv,
  decode), bf16 and float32, compiled for sm_90a."""
  sh = t.one_device()
  cases = []
  for dtype in ("bfloat16", "float32"):
    dt = jnp.dtype(dtype)
    for passes in ("split", "full"):
      fn, args, lay = kc.train_case("gpu", dt, passes)
      cases.append((f"train_{passes}_{dtype}", fn, args, lay))
    fn, args, lay = kc.decode_case("gpu", dt)
    cases.append((f"decode_{dtype}", fn, args, lay))
  out = []
  for name, fn, args, lay in cases:
    args, shardings = tg.abstract(args, sh)
    with tg.dump_dir(True, dump_root, name) as dump:
      rec, _ = tg.compile_fn(name, fn, args, in_shardings=shardings, dump_dir=dump)
      if rec["compiled"]:
        rec["kernels"] = tg.triton_kernels(dump)
    rec["dtype"] = "bfloat16" if "bfloat16" in name else "float32"
    rec["shapes"] = kc.shapes_note(lay)
    _log(f"  {name}: {'ok' if rec['compiled'] else 'FAILED'} ({rec['compile_s']} s)"
         + "".join(f"\n    {k['kernel']}: {k.get('registers')} regs, "
                   f"{k.get('spill_store_bytes', 0)} B spilled, {k.get('shared_bytes')} B smem, "
                   f"grid {k.get('grid')}, {k.get('programs_per_sm')}/SM"
                   for k in rec.get("kernels", [])))
    out.append(rec)
  return out


# ---------------------------------------------------------------- TPU


TPU_KERNEL_TARGETS = ("v5e:1x1", "v5p:2x2x1")


def tpu_kernels() -> list[dict]:
  """The Mosaic kernels (forward, decode, backward) on one chip of v5e and of v5p, in bf16
  (the TPU dtype), and float32 training on v5e."""
  out = []
  for name in TPU_KERNEL_TARGETS:
    t = tg.tpu(name)
    sh = t.one_device()
    cases = []
    for dtype in ("bfloat16", "float32"):
      if dtype == "float32" and name != TPU_KERNEL_TARGETS[0]:
        continue
      dt = jnp.dtype(dtype)
      # bf16 at batch 8: its lists outgrow one call's SMEM budget, so the kernels run as
      # loops of chunked calls (gaze_tpu.SMEM_WORDS), as in real training steps.
      fn, args, lay = kc.train_case("tpu", dt, batch=8 if dtype == "bfloat16" else 2)
      cases.append((f"train_{dtype}", fn, args, lay))
      if dtype == "bfloat16":
        # Batch 2: Mosaic's compile time grows with batch x blocks (41 s at batch 8 over
        # this cache's ~1,100 blocks), and the kernel is the same.
        fn, args, lay = kc.decode_case("tpu", dt, batch=2)
        cases.append((f"decode_{dtype}", fn, args, lay))
    for case, fn, args, lay in cases:
      args, shardings = tg.abstract(args, sh)
      rec, compiled = tg.compile_fn(case, fn, args, in_shardings=shardings)
      rec.update(target=name, dtype="bfloat16" if "bfloat16" in case else "float32",
                 shapes=kc.shapes_note(lay), hbm_bytes=t.hbm_bytes)
      if compiled is not None:
        rec["kernels"] = tg.mosaic_kernels(compiled)
      _log(f"  {name} {case}: {'ok' if rec['compiled'] else 'FAILED'} ({rec['compile_s']} s)"
           + (f" kernels {rec.get('kernels')}, peak {rec['memory'].get('peak', 0) / 2**20:.0f}"
              " MiB" if rec["compiled"] else "\n    " + rec["error"].replace("\n", "\n    ")))
      out.append(rec)
  return out


# ---------------------------------------------------------------- checks


def check(report: dict) -> list[str]:
  """What makes ``make aot`` fail: compile failures, bf16 GPU spills, a decode occupancy other
  than ``ops.DECODE_PROGRAMS_PER_SM``, K/V all-gathers in a step with the kernels (ours or
  splash), and a splash step whose program holds no splash kernel."""
  from pallas_kernels import ops
  problems = []
  for section in ("kernels", "steps"):
    for rec in report.get(section, []):
      where = f"{section}/{rec.get('target', report['target'])}/{rec['name']}"
      if not rec.get("compiled") and not (report.get("full") and rec.get("out_of_memory")):
        # At pod scale "does not fit" is a finding (recorded with the compiler's figure).
        problems.append(f"{where}: did not compile: {rec.get('error', '')[:300]}")
      impl = rec.get("implementation", "")
      if impl == "dense_splash" and rec.get("compiled") and not any(
          str(k).startswith("splash_") for k in rec.get("kernels", [])):
        problems.append(f"{where}: no splash kernel in the compiled program")
      if impl in ("pallas", "dense_splash") and rec.get("kv_all_gathers"):
        problems.append(f"{where}: {rec['kv_all_gathers']} all-gathers of K/V: the kernels "
                        "did not run in shard_map")
      for k in rec.get("kernels", []):
        if not isinstance(k, dict):
          continue
        if "ptxas_error" in k:
          problems.append(f"{where}/{k['kernel']}: ptxas: {k['ptxas_error'][:200]}")
        if rec.get("dtype") == "bfloat16" and k.get("spill_store_bytes", 0) > 0:
          problems.append(f"{where}/{k['kernel']}: spills {k['spill_store_bytes']} B "
                          f"({k.get('registers')} registers)")
        if (section == "kernels" and rec["name"].startswith("decode_")
            and k["kernel"] == "gaze_fwd_full"):
          want = ops.DECODE_PROGRAMS_PER_SM.get(jnp.dtype(rec["dtype"]).itemsize)
          if k.get("programs_per_sm") != want:
            problems.append(f"{where}/gaze_fwd_full: {k.get('programs_per_sm')} programs per "
                            f"SM compiled, ops.DECODE_PROGRAMS_PER_SM says {want}")
  return problems


def _write(report: dict, path: Path):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
  _log(f"wrote {path}")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("what", choices=["h100", "tpu", "table"])
  ap.add_argument("--full", action="store_true", help="the pod / serving-scale steps")
  ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
  ap.add_argument("--dump", default=None, help="keep XLA dumps under this folder")
  ap.add_argument("--only", default="", help="kernels | steps (default both)")
  ap.add_argument("--case", default="", help="--full: only the step cases whose "
                  "<label>_<implementation> contains this (e.g. b256_xla); their records "
                  "replace those of the same name in the JSON")
  ap.add_argument("--readme", default=None, help="rewrite the aot table of this README")
  a = ap.parse_args(argv)
  if a.what == "table":
    from benchmarks.aot import report as rp
    text = rp.table(RESULTS)
    print(text)
    if a.readme:
      rp.update_readme(Path(a.readme), text)
    return 0
  t0 = time.time()
  name = ("aot_full_" if a.full else "aot_") + a.what
  report = _header(a.what)
  report["full"] = a.full
  if a.what == "h100":
    t = tg.h100()
    if not a.full and a.only in ("", "kernels"):
      _log("H100 kernels")
      report["kernels"] = h100_kernels(t, a.dump)
    if a.only in ("", "steps"):
      from benchmarks.aot import steps as st
      _log("H100 model steps")
      report["steps"] = st.full_steps("h100", a.case) if a.full else st.small_steps(t)
  else:
    if not a.full and a.only in ("", "kernels"):
      _log("TPU kernels")
      report["kernels"] = tpu_kernels()
    if a.only in ("", "steps"):
      from benchmarks.aot import steps as st
      _log("TPU model steps")
      report["steps"] = st.full_steps("tpu", a.case) if a.full else st.small_steps(tg.tpu("v5p:2x2x2"))
  report["wall_s"] = round(time.time() - t0, 1)
  out = Path(a.out) if a.out else RESULTS / f"{name}.json"
  if a.case and out.exists():   # a partial run: keep the other cases' records
    new = {r["name"] for r in report.get("steps", [])}
    old = json.loads(out.read_text()).get("steps", [])
    report["steps"] = [r for r in old if r["name"] not in new] + report.get("steps", [])
  problems = check(report)
  report["problems"] = problems
  _write(report, out)
  for p in problems:
    _log(f"PROBLEM: {p}")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())

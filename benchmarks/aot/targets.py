"""Compile targets without a device, and what a compile records.

The real compilers run on this CPU machine: XLA's GPU pipeline with its Triton and ptxas for an
H100 (``jax-cuda12-plugin`` + ``triton``, run with ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1
JAX_PLATFORMS=cpu``), and libtpu's XLA:TPU with Mosaic for TPU slices (``libtpu``, run with
``JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1``). Nothing executes: a record proves compilation and
resource use (registers, spills, shared memory, VMEM, memory per chip), not numerics or speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.experimental import topologies
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

H100_TARGET = Path(__file__).with_name("h100_target_config.txtpb")   # a GpuTargetConfigProto

# H100 SXM per-SM limits (occupancy arithmetic).
SM_REGISTERS = 65536
SM_SHARED_BYTES = 233472
SM_THREADS = 2048
SM_BLOCKS = 32
CTA_RESERVED_SHARED = 1024


# ---------------------------------------------------------------- targets


@dataclasses.dataclass(frozen=True)
class Target:
  """A deviceless compile target: its devices and a mesh over them."""
  name: str            # "h100", "v5e:1x1", "v5p:2x2x2", ...
  platform: str        # "cuda" or "tpu"
  devices: tuple
  hbm_bytes: Optional[int]

  def mesh(self, shape: dict[str, int]) -> Mesh:
    """A mesh with Auto axes (``shape`` maps axis names to sizes; their product must be the
    number of devices)."""
    names = tuple(shape)
    sizes = tuple(int(shape[n]) for n in names)
    if int(np.prod(sizes)) != len(self.devices):
      raise ValueError(f"mesh {shape} needs {int(np.prod(sizes))} devices, "
                       f"{self.name} has {len(self.devices)}")
    if self.platform == "tpu":
      from jax.experimental import mesh_utils
      devs = mesh_utils.create_device_mesh(sizes, list(self.devices))
    else:
      devs = np.asarray(self.devices).reshape(sizes)
    return Mesh(devs, names, axis_types=(AxisType.Auto,) * len(names))

  def one_device(self):
    return jax.sharding.SingleDeviceSharding(self.devices[0])


def h100() -> Target:
  topo = topologies.get_topology_desc("", platform="cuda", target_config=H100_TARGET.read_text(),
                                      topology="1x1x1")
  return Target("h100", "cuda", tuple(topo.devices), 80 * 2 ** 30)


# HBM per chip (GiB) of the TPU generations we compile for.
TPU_HBM_GIB = {"v5e": 16, "v5 lite": 16, "v5p": 95, "v6e": 32, "v6 lite": 32, "v4": 32}


def tpu(name: str) -> Target:
  """A TPU slice by topology name (``v5e:1x1``, ``v5p:2x2x2``, ``v5p:4x4x4``, ...)."""
  kw = {}
  if name.endswith(":1x1"):
    kw["chips_per_host_bounds"] = [1, 1, 1]
  topo = topologies.get_topology_desc(topology_name=name, platform="tpu", **kw)
  gen = name.split(":")[0]
  hbm = TPU_HBM_GIB.get(gen)
  return Target(name, "tpu", tuple(topo.devices), None if hbm is None else hbm * 2 ** 30)


# ---------------------------------------------------------------- compiling and records


def abstract(tree, sharding):
  """ShapeDtypeStructs of ``tree`` (arrays or ShapeDtypeStructs) with one ``sharding`` for
  every leaf, and that sharding tree (for ``in_shardings``)."""
  shardings = jax.tree.map(lambda _: sharding, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings), shardings


def memory_record(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  rec = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
         ("argument", "output", "alias", "temp", "generated_code")}
  # What the program holds at its peak on one device: inputs, outputs (donated inputs counted
  # once) and temporaries.
  rec["peak"] = rec["argument"] + rec["output"] - rec["alias"] + rec["temp"]
  # Host memory (arrays with memory_kind="pinned_host": the offloaded visual KV).
  host = {k: int(getattr(m, f"host_{k}_size_in_bytes", 0) or 0)
          for k in ("argument", "output", "alias", "temp")}
  rec["host_peak"] = host["argument"] + host["output"] - host["alias"] + host["temp"]
  return rec


def cost_record(compiled) -> Optional[dict]:
  """FLOPs and bytes accessed per device (``cost_analysis()``); None where the compiler gives
  none (XLA:GPU without a device)."""
  try:
    c = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - a missing analysis is recorded, not fatal
    return None
  if isinstance(c, (list, tuple)):
    c = c[0] if c else None
  if not c:
    return None
  return {"flops": float(c.get("flops", 0.0)), "bytes_accessed": float(c.get("bytes accessed",
                                                                             0.0))}


def compile_fn(name: str, fn: Callable, args: tuple, *, in_shardings, out_shardings=None,
               donate_argnums=(), dump_dir: Optional[str] = None) -> tuple[dict, Any]:
  """Lowers and compiles ``fn(*args)`` (abstract args) as ``jit_<name>``; returns (record,
  compiled or None). A failure is recorded with its message, not raised."""
  fn = _named(fn, name)
  rec: dict = {"name": name}
  t0 = time.time()
  try:
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=donate_argnums)
    lowered = jitted.lower(*args)
    opts = {"xla_dump_to": dump_dir} if dump_dir else None
    compiled = lowered.compile(compiler_options=opts) if opts else lowered.compile()
  except Exception as e:  # noqa: BLE001 - the compile error is the result
    rec.update(compiled=False, error=_first_lines(e), compile_s=round(time.time() - t0, 1))
    need = out_of_memory(str(e))
    if need is not None:
      # The compiler's own figure: what the program would need per chip.
      args_b = argument_bytes(args)
      rec.update(out_of_memory=True,
                 memory={"temp": need, "argument": args_b, "peak": need + args_b,
                         "from": "the compiler's out-of-memory report"})
    return rec, None
  rec.update(compiled=True, compile_s=round(time.time() - t0, 1),
             memory=memory_record(compiled), cost=cost_record(compiled))
  return rec, compiled


_OOM = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT])\)")


def out_of_memory(message: str) -> Optional[int]:
  """Bytes of HLO temporaries per chip from XLA:TPU's "Ran out of memory in memory space hbm"
  error, or None for another error."""
  m = _OOM.search(message)
  if not m:
    return None
  return int(float(m.group(1)) * 2 ** (10 * "KMGT".index(m.group(2)) + 10))


def argument_bytes(args) -> int:
  """Bytes of the abstract arguments held by one device (their shards)."""
  total = 0
  for x in jax.tree.leaves(args):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
  return total


def _named(fn, name):
  def wrapper(*a):
    return fn(*a)
  wrapper.__name__ = wrapper.__qualname__ = name
  return wrapper


def _first_lines(e: Exception, n: int = 6) -> str:
  lines = [ln for ln in str(e).splitlines() if ln.strip()]
  return "\n".join(lines[:n])[:2000] or type(e).__name__


def replicated(mesh):
  return NamedSharding(mesh, P())


# ---------------------------------------------------------------- Triton kernels: ptxas


def ptxas_path() -> str:
  """ptxas of the triton wheel (13.x; its plain ``ptxas`` is older and rejects PTX 9.x)."""
  import triton
  p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
  if not p.exists():
    p = p.with_name("ptxas")
  return str(p)


_THUNK = re.compile(r"kCustomKernel.*?\]\s+(\S+)\s+grid:\s*\[([\d, ]+)\]\s+threads:\s*"
                    r"\[([\d, ]+)\]\s+shared_memory:\s*(\d+)\s+bytes")


def triton_kernels(dump_dir: str, prefix: str = "gaze_") -> list[dict]:
  """The Triton kernels of one compile (its XLA dump folder) whose names start with
  ``prefix``: launch (grid, threads, shared memory, from the thunk sequence) and ptxas's
  registers and spills for sm_90a, with the occupancy (programs per SM) they allow."""
  launches: dict[str, list] = {}
  for path in glob.glob(os.path.join(dump_dir, "*thunk_sequence.txt")):
    if "after_thunk_passes" not in path:
      for name, found in parse_launches(Path(path).read_text(), prefix).items():
        launches.setdefault(name, []).extend(found)
  ptx_of = {}
  for path in glob.glob(os.path.join(dump_dir, "*.ptx")):
    text = Path(path).read_text(errors="replace")
    for name in re.findall(r"\.entry\s+([A-Za-z0-9_$]+)", text):
      if name.startswith(prefix):
        ptx_of[name] = path
  out = []
  for name in sorted(set(launches) | set(ptx_of)):
    rec = {"kernel": name}
    if name in launches:
      rec.update(launches[name][0])
      if len(launches[name]) > 1:
        rec["launches"] = len(launches[name])
    if name in ptx_of:
      rec.update(_ptxas(ptx_of[name], name))
    if "registers" in rec and "threads" in rec:
      rec["programs_per_sm"] = occupancy(rec["registers"], rec["threads"],
                                         rec.get("shared_bytes", 0))
    out.append(rec)
  return out


def _ptxas(ptx: str, entry: str) -> dict:
  res = subprocess.run([ptxas_path(), "-v", "--gpu-name=sm_90a", ptx, "-o", os.devnull],
                       capture_output=True, text=True)
  text = res.stdout + res.stderr
  if res.returncode:
    return {"ptxas_error": text.strip()[-500:]}
  return parse_ptxas(text, entry)


def parse_ptxas(text: str, entry: str) -> dict:
  """Registers, spills and stack of ``entry`` from ``ptxas -v`` output (one block per entry:
  "Compiling entry function 'NAME'", then its figures)."""
  for b in text.split("Compiling entry function '")[1:]:
    if not b.startswith(entry + "'"):
      continue
    regs = re.search(r"Used (\d+) registers", b)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", b)
    stack = re.search(r"(\d+) bytes stack frame", b)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else 0,
            "spill_load_bytes": int(spill.group(2)) if spill else 0,
            "stack_bytes": int(stack.group(1)) if stack else 0,
            # ptxas C7515: wgmma pipelining lost (a performance note, not an error).
            "wgmma_serialized": bool(re.search(rf"C7515[^\n]*'{entry}'", text))}
  return {"ptxas_error": f"no entry {entry} in ptxas output"}


def parse_launches(text: str, prefix: str = "gaze_") -> dict[str, list]:
  """Launches of the kernels named ``prefix*`` in an XLA thunk-sequence dump: grid, threads,
  dynamic shared memory."""
  out: dict[str, list] = {}
  for m in _THUNK.finditer(text):
    if m.group(1).startswith(prefix):
      out.setdefault(m.group(1), []).append(
          {"grid": [int(x) for x in m.group(2).split(",")],
           "threads": int(m.group(3).split(",")[0]), "shared_bytes": int(m.group(4))})
  return out


def occupancy(registers: int, threads: int, shared_bytes: int) -> int:
  """Programs (CTAs) of a kernel that fit on one H100 SM at once: registers are allocated per
  warp in units of 256 within each of the 4 sub-partitions (16,384 registers each)."""
  warps = -(-threads // 32)
  per_warp = -(-registers * 32 // 256) * 256
  warps_per_quarter = (SM_REGISTERS // 4) // max(per_warp, 1)
  by_regs = (warps_per_quarter * 4) // warps
  by_smem = SM_SHARED_BYTES // (shared_bytes + CTA_RESERVED_SHARED) if shared_bytes else SM_BLOCKS
  by_threads = SM_THREADS // threads
  return int(max(0, min(by_regs, by_smem, by_threads, SM_BLOCKS)))


@contextlib.contextmanager
def dump_dir(wanted: bool = True, keep_under: Optional[str] = None, name: str = "dump"):
  """An XLA dump folder for one compile: ``keep_under/name`` (kept), a temporary folder
  (removed afterwards), or None when not ``wanted``."""
  if not wanted:
    yield None
  elif keep_under:
    d = os.path.join(keep_under, name)
    os.makedirs(d, exist_ok=True)
    yield d
  else:
    with tempfile.TemporaryDirectory(prefix="gaze_aot_") as d:
      yield d


# ---------------------------------------------------------------- Mosaic kernels


def mosaic_kernels(compiled) -> list[str]:
  """Names of the Mosaic (``tpu_custom_call``) kernels in a compiled TPU program."""
  try:
    text = compiled.as_text()
  except Exception:  # noqa: BLE001
    return []
  # Ours (gaze_tpu_*) and jax's splash attention (splash_{mha,mqa}_{fwd,dq,dkv}...).
  return sorted(set(re.findall(r"(?:gaze_tpu|splash_m[hq]a)_[a-z_]+", text)))

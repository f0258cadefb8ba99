"""Kernel options: ``KernelConfig`` (static choices of tiles, passes and launches), the
defaults that fill what it leaves as None, and the mesh axes a kernel call is split over
(``mesh_axes``). Importing this module does not import Pallas, so model configs can hold a
``KernelConfig``."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from pallas_kernels import blocks as blk

KERNELS = ("auto", "gpu", "tpu")
DENSE_ROWS = (None, "cudnn", "xla", "splash")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static kernel choices (hashable; every field is a compile-time constant).

  kernel: "auto" (TPU kernels on a TPU, else the generic GPU kernels), "gpu" or "tpu".
  interpret: None (True on CPU), a bool, or ``pltpu.InterpretParams()`` for the TPU kernel.
  block_k: KV window rows BK (default: the next power of two >= max(16, region size) for
    Triton; a multiple of 8 >= region size for Mosaic).
  base_rows, routed_rows: rows (tokens x group heads, powers of two) of a tile in the base and
    routed passes (base_rows default: ``launch_defaults``).
  passes: "split" (base + routed passes) or "full" (one pass with the whole mask).
  decode_rows: up to this many query tokens use the decode form.
  splits: split-K programs per (example, KV head) in the decode form; None fills one wave
    of the GPU (``default_splits``).
  min_rows: smallest tile (Triton's ``tl.dot`` needs 16 rows; TPU tiles are at least 8).
  dense_rows: None or an implementation of dense causal attention: "xla", "cudnn" or "splash"
    (TPU). In the gaze kernels (T == S), the dense rows (patch rows, unrouted text) go to it
    (``pallas_kernels.plan``); None keeps them in the kernels. In the dense model
    (``attention="dense"``) it is the attention's implementation; None picks cuDNN on a CUDA
    GPU, splash on a TPU, else XLA (``pallas_kernels.splash.dense_rows``).
  dense_len: static bound (positions) on the dense rows; default: found from the layout when it
    is concrete (built on the host and closed over), else the whole sequence. Rounded up to a
    multiple of 128 for the dense kernel.
  num_warps, num_stages: Triton launch parameters of the forward kernels; bwd_num_warps,
    bwd_num_stages of the backward kernels. None: ``launch_defaults`` for the input dtype,
    the choices with which ``make aot`` compiles every bf16 kernel without register spills.
  batch_axes, head_axis: under a device mesh, the mesh axes that split the examples and the
    heads (``gaze_attention`` runs in ``shard_map``); axes the mesh lacks are ignored.
  """
  kernel: str = "auto"
  interpret: Any = None
  block_k: Optional[int] = None
  base_rows: Optional[int] = None
  routed_rows: int = 16
  passes: str = "split"
  decode_rows: int = 16
  splits: Optional[int] = None
  min_rows: int = 16
  dense_rows: Optional[str] = None
  dense_len: Optional[int] = None
  num_warps: Optional[int] = None
  num_stages: Optional[int] = None
  bwd_num_warps: Optional[int] = None
  bwd_num_stages: Optional[int] = None
  batch_axes: tuple = ("data", "fsdp")
  head_axis: Optional[str] = "tensor"

  def __post_init__(self):
    object.__setattr__(self, "batch_axes", tuple(self.batch_axes))
    if self.kernel not in KERNELS:
      raise ValueError(f"KernelConfig.kernel must be one of {KERNELS}, got {self.kernel!r}")
    if self.passes not in ("split", "full"):
      raise ValueError(f"KernelConfig.passes must be 'split' or 'full', got {self.passes!r}")
    if self.dense_rows not in DENSE_ROWS:
      raise ValueError(f"KernelConfig.dense_rows must be one of {DENSE_ROWS}, "
                       f"got {self.dense_rows!r}")
    for name in ("base_rows", "routed_rows", "min_rows"):
      n = getattr(self, name)
      if n is not None and (n < 1 or n != blk.next_pow2(n)):
        raise ValueError(f"KernelConfig.{name} must be a power of two, got {n}")
    if (self.splits is not None and self.splits < 1) or self.decode_rows < 1:
      raise ValueError("KernelConfig.splits and decode_rows must be >= 1")


def launch_defaults(dtype, kernel: str, block_k: int = 64, head_dim: int = 128) -> dict:
  """Tile and launch choices that ``KernelConfig`` leaves as None, by input dtype and the size
  of a K/V block.

  GPU (ptxas for an H100, ``make aot``): 16-bit inputs take 64-row base tiles, 4 warps and 2
  pipeline stages forward (3 stages spill the routed forward); the backward kernels take 8
  warps once a block holds ``BK x D >= 4096`` elements (dk/dv keep two such float32
  accumulators: 4 warps spill at 64 x 128), 4 below. float32 runs TF32x3 products: 32-row
  base tiles (64 rows exceed the 227 KB of shared memory) and 8 warps, which still spill a few
  hundred bytes in the backward kernels: bf16 is the GPU training dtype.
  TPU: 64-row base tiles (the launch fields are unused).
  """
  wide = jnp.dtype(dtype).itemsize >= 4
  if kernel == "gpu":
    big = block_k * head_dim >= 4096
    return dict(base_rows=32 if wide else 64, num_warps=8 if wide else 4, num_stages=2,
                bwd_num_warps=8 if (big or wide) else 4, bwd_num_stages=2)
  return dict(base_rows=64, num_warps=None, num_stages=None, bwd_num_warps=None,
              bwd_num_stages=None)


def resolved(cfg: KernelConfig, dtype, kernel: str, block_k: int,
              head_dim: int) -> KernelConfig:
  """``cfg`` with its None launch fields set from ``launch_defaults``."""
  fill = {k: v for k, v in launch_defaults(dtype, kernel, block_k, head_dim).items()
          if getattr(cfg, k) is None}
  return dataclasses.replace(cfg, **fill) if fill else cfg


def resolve_kernel(config: KernelConfig) -> tuple[str, Any]:
  """(kernel family, interpret flag) for the current backend."""
  backend = jax.default_backend()
  kernel = config.kernel
  if kernel == "auto":
    kernel = "tpu" if backend == "tpu" else "gpu"
  interpret = config.interpret
  if interpret is None:
    interpret = backend == "cpu" or (kernel == "tpu" and backend != "tpu")
    if interpret and kernel == "tpu":
      from jax.experimental.pallas import tpu as pltpu
      interpret = pltpu.InterpretParams()
  return kernel, interpret


def mesh_axes(cfg: KernelConfig, batch: int, q_heads: int, kv_heads: int):
  """``(batch axes or None, head axis or None)`` that split a Pallas call's examples and heads
  under the context mesh, or None when there is nothing to split (no mesh of more than one
  device, or inside a ``shard_map`` already). Examples go over the axes of ``cfg.batch_axes``
  that divide them (the others replicate); heads over ``cfg.head_axis``, which must divide both
  head counts."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh.are_all_axes_manual:
    return None
  sizes = dict(mesh.shape)
  batch_axes, n = [], 1
  for a in cfg.batch_axes:
    if a in sizes and batch % (n * sizes[a]) == 0:
      batch_axes.append(a)
      n *= sizes[a]
  head = None
  if cfg.head_axis in sizes and sizes[cfg.head_axis] > 1:
    t = sizes[cfg.head_axis]
    if kv_heads % t or q_heads % t:
      raise ValueError(f"the mesh axis {cfg.head_axis!r} has {t} devices, which do not divide "
                       f"the {kv_heads} KV heads (and {q_heads} query heads) of the attention: "
                       f"use a '{cfg.head_axis}' size that divides {kv_heads}, or set "
                       "KernelConfig.head_axis=None to replicate the heads")
    head = cfg.head_axis
  bat = tuple(batch_axes) or None
  if bat is None and head is None:
    return None
  return bat, head



# Programs of the decode kernel (``gaze_fwd_full`` at the default launch parameters) that fit
# on one SM at once, by input itemsize: 65,536 registers / (registers per thread x threads).
# `make aot` compiles the kernel for an H100, reads its registers and shared memory (ptxas,
# the launch) and fails if these are not the compiled kernel's occupancy.
DECODE_PROGRAMS_PER_SM = {2: 3, 4: 1}


def default_splits(batch: int, kv_heads: int, itemsize: int = 2,
                   num_sms: Optional[int] = None) -> int:
  """Split-K for the decode form: as many splits per (example, KV head) as fill one wave of
  ``DECODE_PROGRAMS_PER_SM`` programs on every SM (132 on an H100), between 1 and 32 (a
  second, partial wave would cost as much as the first)."""
  if num_sms is None:
    num_sms = getattr(jax.devices()[0], "core_count", None) or 132
  per_sm = DECODE_PROGRAMS_PER_SM.get(int(itemsize), 1)
  return int(max(1, min(32, per_sm * num_sms // (batch * kv_heads))))


def default_block_k(region_size: int, kernel: str) -> int:
  if kernel == "tpu":
    return blk.ceil_to(max(region_size, 8), 8)
  return blk.next_pow2(max(16, region_size))

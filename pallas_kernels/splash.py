"""Dense causal attention on TPU through jax's Pallas splash attention kernel.

``gaze_jax.gaze.dense.causal_attention`` sorts the slots by position, so that causality by
position is causality by index; this module runs that sorted, index-causal attention with
``splash_attention.make_splash_mha`` (a static ``CausalMask``: the kernel skips the blocks above
the diagonal and never builds a mask tensor). GQA is native to the kernel: ``[Hq, n, D]`` queries
against ``[Hkv, n, D]`` keys.

Under a device mesh the call runs in ``jax.shard_map`` (XLA cannot partition a Mosaic call),
examples over ``KernelConfig.batch_axes`` and heads over ``KernelConfig.head_axis``, by the same
rule as the gaze kernels (``config.mesh_axes``); inside a ``shard_map`` already (the dense rows
of the gaze kernels) it runs on the local shard.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.config import KernelConfig, mesh_axes, resolve_kernel

# Splash tiles: q and kv blocks of the largest of these that divides the padded length
# (MaxText's default is 512); every length is padded to a multiple of the smallest.
BLOCKS = (512, 256, 128)


def padded_length(n: int) -> int:
  """The sequence length the kernel runs at: n rounded up to a multiple of ``BLOCKS[-1]``."""
  return -(-n // BLOCKS[-1]) * BLOCKS[-1]


def _kernel(n: int, heads: int, interpret):
  """The splash kernel of a causal ``[heads, n, n]`` mask. Built in each trace: its block lists
  become constants of that trace (splash caches the host-side mask processing itself)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  b = next(b for b in BLOCKS if n % b == 0)
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                        block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  mask = sm.MultiHeadMask([sm.CausalMask((n, n))] * heads)
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                            interpret=interpret)


def _local(q, k, v, *, scale: float, interpret):
  """Index-causal attention on one shard: q ``[B, n, Hq, D]``, k/v ``[B, n, Hkv, D]``."""
  B, n, Hq, D = q.shape
  m = padded_length(n)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, m - n), (0, 0), (0, 0))) if m > n else x
  heads_first = lambda x: jnp.swapaxes(pad(x), 1, 2)                   # [B, H, m, D]
  # The kernel does not scale its logits: scale q (MaxText does the same).
  qs = heads_first((q * scale).astype(q.dtype))
  # The TPU interpreter (InterpretParams) rejects the grid that vmap adds: use the generic one.
  kernel = _kernel(m, Hq, interpret if isinstance(interpret, bool) else True)
  out = jax.vmap(kernel)(qs, heads_first(k), heads_first(v))
  # Padded rows sit after every real one: causally they are never seen, so they are cut.
  return jnp.swapaxes(out, 1, 2)[:, :n].astype(q.dtype)


def causal(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
           config: KernelConfig | None = None) -> jax.Array:
  """Attention in which row i sees keys 0..i (index causality), by splash attention.

  Args:
    q: ``[B, n, Hq, D]``; k, v: ``[B, n, Hkv, D]`` (Hq a multiple of Hkv); n is padded to a
      multiple of 128 inside.
    scale: logit scale.
    config: ``KernelConfig`` for ``interpret`` (None: the interpreter on a CPU) and the mesh
      axes of the examples and heads.
  Returns:
    ``[B, n, Hq, D]`` in q's dtype.
  """
  cfg = config or KernelConfig()
  # Splash is a TPU kernel: off a TPU it runs in the interpreter unless cfg.interpret says not.
  _, interpret = resolve_kernel(dataclasses.replace(cfg, kernel="tpu"))
  run = functools.partial(_local, scale=scale, interpret=interpret)
  axes = mesh_axes(cfg, q.shape[0], q.shape[2], k.shape[2])
  if axes is None:
    return run(q, k, v)
  from jax.sharding import PartitionSpec as P
  spec = P(axes[0], None, axes[1], None)
  return jax.shard_map(run, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)



def causal_kernel(config: KernelConfig | None = None):
  """``causal`` as the fused kernel of ``gaze_jax.gaze.dense.causal_attention``
  (``kernel(q, k, v, scale)``)."""
  return lambda q, k, v, scale: causal(q, k, v, scale=scale, config=config)


def dense_rows(config: KernelConfig | None, backend: str | None = None):
  """How the dense rows run: ``(implementation, kernel)`` for
  ``gaze_jax.gaze.dense.causal_attention``. ``config.dense_rows`` ("xla", "cudnn" or "splash")
  picks; None picks splash on a TPU (``backend``, default jax's) and leaves the rest to
  ``causal_attention`` (cuDNN on a CUDA GPU, else XLA)."""
  choice = None if config is None else config.dense_rows
  if choice is None and (backend or jax.default_backend()) == "tpu":
    choice = "splash"
  if choice == "splash":
    return None, causal_kernel(config)
  return choice, None

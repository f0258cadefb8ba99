"""Kernel-side helpers shared by the GPU (Triton) and TPU (Mosaic) kernels: the exact gaze mask
of one (row tile x key block) pair and the online-softmax constants.

Everything here is plain jnp on small arrays, so it traces inside a kernel body: the rows are
``[M]`` vectors (M = query tokens x heads of a tile), the keys ``[BK]`` vectors of one block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gaze_jax.gaze.layout import PAD
from gaze_jax.gaze.masks import base_rule, region_rule

NEG = -1e30   # finite "minus infinity": masked logits, and the lse of a row that sees nothing


def mask_parts(mode: str, qkind, qpos, qframe, qrouted, kkind, kpos, kframe, rid):
  """The exact gaze mask of rows x keys, in two parts: ``(base, candidate)``.

  ``base``: keys visible without routing (None in "routed" mode); ``candidate``: keys a row
  sees if it selected the block's region (None in "base" mode). The visible keys are
  ``base | (candidate & hit)``. Every argument is a 2-D int32 array (or a scalar for ``rid``,
  the block's region id, -1 for a text/context chunk) and the rules are elementwise, so the
  result has the broadcast shape: rows ``[M, 1]`` with keys ``[1, BK]`` give ``[M, BK]``, and
  rows ``[1, M]`` with keys ``[BK, 1]`` give the transposed ``[BK, M]`` (the dk/dv kernels).
  PAD rows and PAD keys are never visible. The rules are ``gaze_jax.gaze.masks``'.
  """
  base = cand = None
  if mode in ("base", "full"):
    base = base_rule(qkind, qpos, qframe, qrouted, kkind, kpos, kframe)
  if mode in ("routed", "full"):
    cand = region_rule(qkind, qpos, qrouted, kkind, kpos) & (rid >= 0)
  return base, cand


def combine(base, cand, hit):
  """``base | (cand & hit)`` with either part absent (None)."""
  if cand is None:
    return base
  sel = cand & hit
  return sel if base is None else base | sel


def row_masker(mode: str, qkind, qpos, qframe, qrouted, hit=None):
  """Per-tile mask builder (GPU kernels): the row fields are fixed for a tile.

  Args:
    mode: "base" (no routed keys), "routed" (routed keys only) or "full" (both).
    qkind, qpos, qframe, qrouted: int32 row fields, ``[M]`` or ``[M, 1]`` (PAD rows see
      nothing).
    hit: ``hit(rid) -> bool [M, 1]``, whether each row selected region ``rid`` (``hit_from_bits``
      or ``hit_from_ids``); unused in "base" mode.
  Returns:
    ``mask(kkind, kpos, kframe, rid, full=None) -> bool [M, BK]``: which keys of one block each
    row sees (``mask_parts``). Key fields are the block's window rows, ``[BK]`` or ``[1, BK]``
    (PAD outside the block); ``rid`` is its region id (-1 for a text/context chunk). ``full``
    (a traced scalar bool, from the block list) says every real row sees every real key: the
    mask is then the outer product of two vectors, and the per-element rules are skipped
    (``lax.cond``).
  """
  col = lambda a: a if a.ndim == 2 else a[:, None]                   # [M, 1]
  rows = tuple(col(a) for a in (qkind, qpos, qframe, qrouted))
  real_row = rows[0] != PAD

  def mask(kkind, kpos, kframe, rid, full=None):
    row = lambda a: a if a.ndim == 2 else a[None, :]                 # [1, BK]
    keys = (row(kkind), row(kpos), row(kframe))
    rules = lambda: combine(*mask_parts(mode, *rows, *keys, rid),
                            None if mode == "base" else hit(rid))
    if full is not None:
      return jax.lax.cond(full, lambda: real_row & (keys[0] != PAD), rules)
    return rules()

  return mask


def hit_from_ids(ids):
  """Membership from the rows' ids ``[M, Kp]`` (-1 none): ``hit(rid) -> bool [M, 1]``, an
  ``[M, Kp]`` compare per block (the TPU kernels)."""
  return lambda rid: jnp.max(jnp.where(ids == rid, 1, 0), axis=1, keepdims=True) > 0


def hit_from_bits(load_word):
  """``hit`` for ``row_masker`` from per-row selection bitmasks: ``load_word(w)`` returns the
  rows' int32 word ``w`` ``[M]`` (bit ``r % 32`` of word ``r // 32`` is region r). One column
  load and two bit operations per block, whatever K is (the GPU kernels)."""
  def hit(rid):
    r = jnp.maximum(rid, 0)
    word = load_word(jax.lax.shift_right_logical(r, 5))
    return (jax.lax.shift_right_logical(word, jnp.broadcast_to(r & 31, word.shape)) & 1
            > 0)[:, None]
  return hit


def selection_bits(ids, num_regions: int):
  """int32 ``[..., ceil(NR / 32)]`` bitmasks of the ids ``[..., K]`` (-1 none; no repeats)."""
  W = -(-num_regions // 32)
  ok = (ids >= 0) & (ids < num_regions)
  word = jnp.where(ok, ids // 32, W)
  bit = jnp.where(ok, jax.lax.shift_left(jnp.ones_like(ids), ids % 32), 0)
  lead = ids.shape[:-1]
  flat_word = word.reshape(-1, ids.shape[-1])
  rows = jnp.arange(flat_word.shape[0])[:, None]
  out = jnp.zeros((flat_word.shape[0], W + 1), jnp.int32)
  # Distinct ids set distinct bits, so adding is or-ing.
  out = out.at[rows, flat_word].add(bit.reshape(flat_word.shape))
  return out[:, :W].reshape(*lead, W)


def dot_nt(a, b, precision):
  """``a @ b.T`` with float32 accumulation: ``[M, D] x [N, D] -> [M, N]``."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


def dot_nn(a, b, precision):
  """``a @ b`` with float32 accumulation."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


def dot_tn(a, b, precision):
  """``a.T @ b`` with float32 accumulation: ``[M, N] x [M, D] -> [N, D]``."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)

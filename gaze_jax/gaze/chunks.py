"""Query-row chunking: run a per-row computation a chunk of rows at a time (``lax.map``), so
that the ``[rows, keys]`` scores and gathers of one chunk bound the working set."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def map_query_chunks(fn, chunk: int, *xs):
  """``fn(*chunk_xs)`` over chunks of ``chunk`` query rows, results concatenated back.

  Every array leaf of ``xs`` (pytrees; None leaves stay None) is ``[B, T, ...]``; so is every
  leaf of ``fn``'s result. T is padded to a multiple of ``chunk`` with zero rows, whose results
  are dropped: ``fn`` must only not produce NaN for them (zero rows are unrouted rows that see
  nothing, wherever a plan or routing mask is among ``xs``).
  """
  leaves = [x for x in jax.tree.leaves(xs)]
  B, T = leaves[0].shape[:2]
  n = -(-T // chunk)
  pad = n * chunk - T

  def split(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)

  outs = jax.lax.map(lambda c: fn(*c), jax.tree.map(split, xs))
  return jax.tree.map(
      lambda y: jnp.moveaxis(y, 0, 1).reshape(B, n * chunk, *y.shape[3:])[:, :T], outs)

"""The one timing rule of the benchmarks: the median over ``repeats`` of the wall time of a call,
after a first call that compiles (and warms caches), waiting for the device to finish."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, *args, repeats: int, inner: int = 1) -> float:
  """Median seconds per call of ``fn(*args)`` over ``repeats`` samples of ``inner`` calls each
  (``inner`` > 1 amortises the dispatch of very short calls). ``fn`` runs as given: jit it
  first to time the compiled function."""
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = None
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / inner)
  return statistics.median(samples)

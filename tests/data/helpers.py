"""Small helpers shared by the data tests."""

import numpy as np


def all_examples(builder, split):
  src = builder.as_data_source(split)
  return [src[i] for i in range(len(src))]


def text(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def image_digest(im) -> bytes:
  return np.ascontiguousarray(np.asarray(im)).tobytes()

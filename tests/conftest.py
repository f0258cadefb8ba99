"""Shared pytest setup: hardware markers skip themselves where the hardware is missing."""

import jax
import pytest


def _has(platform: str) -> bool:
  try:
    return len(jax.devices(platform)) > 0
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  for platform in ("gpu", "tpu"):
    if _has(platform):
      continue
    skip = pytest.mark.skip(reason=f"needs a {platform.upper()}")
    for item in items:
      if platform in item.keywords:
        item.add_marker(skip)

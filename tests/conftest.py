"""Shared pytest setup: hardware markers skip themselves where the hardware is missing; a Cloud
Storage emulator for the ``gs://`` tests (``gcs``, ``gcs_dir``; see ``tests/gcs_emulator.py``)."""

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


@pytest.fixture(scope="session")
def gcs():
  """The session's Cloud Storage emulator (``tests.gcs_emulator.GcsEmulator``: bucket
  ``gs://bucket``, its variables in ``os.environ`` while the session runs)."""
  from tests.gcs_emulator import GcsEmulator

  with GcsEmulator() as emulator:
    yield emulator


@pytest.fixture
def gcs_dir(gcs, request):
  """A fresh ``gs://bucket/<test name>`` folder (an ``epath.Path``) for one test."""
  import re

  return gcs.root / re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")
